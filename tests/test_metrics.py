"""cpu tier: the metrics against independent implementations (scikit-learn, direct loops)."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fasthydra import metrics

pytestmark = pytest.mark.cpu


def _probs(n=200, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 2, -1)
    y = torch.randint(0, c, (n,), generator=g)
    return p, y


def test_accuracy_nll_brier_against_loops():
    p, y = _probs()
    pn, yn = p.numpy(), y.numpy()
    assert metrics.accuracy(p, y) == pytest.approx(np.mean(pn.argmax(1) == yn))
    assert metrics.nll(p, y) == pytest.approx(-np.mean([math.log(pn[i, yn[i]]) for i in range(len(yn))]))
    standard = np.mean([sum((pn[i, c] - (c == yn[i])) ** 2 for c in range(pn.shape[1])) for i in range(len(yn))])
    assert metrics.brier_score(p, y, "standard") == pytest.approx(standard)
    paper = np.mean([(pn[i] ** 2).sum() - 2 * pn[i, yn[i]] for i in range(len(yn))])
    assert metrics.brier_score(p, y, "paper") == pytest.approx(paper)
    assert -1 <= metrics.brier_score(p, y) <= 1


def test_perfect_predictions():
    y = torch.tensor([0, 2, 1])
    p = torch.nn.functional.one_hot(y, 3).double()
    assert metrics.accuracy(p, y) == 1.0
    assert metrics.brier_score(p, y, "paper") == pytest.approx(-1.0)
    assert metrics.expected_calibration_error(p, y) == pytest.approx(0.0)


def test_ece_against_a_direct_loop():
    p, y = _probs(500, 4, seed=3)
    conf, pred = p.max(1)
    ece, n = 0.0, len(y)
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        in_bin = [i for i in range(n) if (conf[i] > lo or (b == 0 and conf[i] >= lo)) and conf[i] <= hi]
        if in_bin:
            acc = np.mean([pred[i].item() == y[i].item() for i in in_bin])
            cf = np.mean([conf[i].item() for i in in_bin])
            ece += len(in_bin) / n * abs(acc - cf)
    assert metrics.expected_calibration_error(p, y, 15) == pytest.approx(ece, abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_against_sklearn(ties):
    g = torch.Generator().manual_seed(1)
    s_in = torch.rand(300, generator=g)
    s_out = torch.rand(200, generator=g) + 0.3
    if ties:
        s_in, s_out = (s_in * 10).round(), (s_out * 10).round()
    labels = np.r_[np.zeros(300), np.ones(200)]
    expected = roc_auc_score(labels, np.r_[s_in.numpy(), s_out.numpy()])
    assert metrics.ood_auroc(s_in, s_out) == pytest.approx(expected, abs=1e-12)
    assert metrics.ood_auroc(torch.zeros(5), torch.zeros(7)) == pytest.approx(0.5)


def test_gaussian_mixture_moments_and_nll():
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(50, 4, 2, generator=g, dtype=torch.float64)
    var = torch.rand(50, 4, 2, generator=g, dtype=torch.float64) + 0.1
    y = torch.randn(50, 2, generator=g, dtype=torch.float64)
    mu, ale, epi = metrics.gaussian_mixture_moments(mean, var)
    # law of total variance against the mixture's second moment
    second = (var + mean**2).mean(1)
    assert torch.allclose(ale + epi, second - mu**2)
    dens = (torch.exp(-0.5 * (y[:, None] - mean) ** 2 / var) / torch.sqrt(2 * math.pi * var)).mean(1)
    assert metrics.gaussian_mixture_nll(mean, var, y) == pytest.approx(float(-torch.log(dens).mean()))
    assert metrics.rmse(mu, y) == pytest.approx(float(((mu - y) ** 2).mean().sqrt()))


def test_interval_coverage_is_about_the_level():
    g = torch.Generator().manual_seed(4)
    y = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    cov = metrics.interval_coverage(torch.zeros(20000, 1), torch.ones(20000, 1), y, 0.95)
    assert abs(cov - 0.95) < 0.01


def test_metric_input_errors():
    p, y = _probs()
    with pytest.raises(TypeError, match="integer"):
        metrics.accuracy(p, y.double())
    with pytest.raises(ValueError, match=r"labels must be \(N,\)"):
        metrics.nll(p, y[:5])
    with pytest.raises(ValueError, match="convention"):
        metrics.brier_score(p, y, "tfp")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, C\)"):  # accuracy counted a 9 as a miss
        metrics.accuracy(p, torch.full_like(y, p.shape[1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, C\)"):  # nll raised an IndexError
        metrics.nll(p, torch.full_like(y, -1))
    for bins in (0, 2.5, True):
        with pytest.raises((ValueError, TypeError), match="n_bins"):
            metrics.reliability_bins(p, y, bins)
    with pytest.raises(ValueError, match="score_out contains NaN"):  # the area depended on the NaN's place
        metrics.ood_auroc(torch.randn(4), torch.tensor([0.3, float("nan")]))
    with pytest.raises(ValueError, match=r"score_in must hold one score per row, shape \(N,\); got shape \(4, 5\)"):
        metrics.ood_auroc(p[:4], torch.rand(3))  # (the mixture's probs: 20 scores and an area, before)
    with pytest.raises(ValueError, match=r"score_out must hold one score per row"):
        metrics.ood_auroc(torch.rand(3), torch.rand(3, 1))
    with pytest.raises(TypeError, match=r"score_in must be real scores, got torch.bool"):
        metrics.ood_auroc(torch.rand(3) > 0.5, torch.rand(3))
    assert metrics.ood_auroc([0.1, 0.2], (0.3, 0.15)) == pytest.approx(0.75)  # (sequences still taken)


def test_classification_metrics_refuse_what_is_not_probabilities():
    """Logits, unnormalised scores or NaN passed as probs gave plausible numbers (nll clamped negatives to
    eps: about 27.6; ECE and Brier of nonsense); a 16-bit softmax over many classes still passes."""
    p, y = _probs()
    logits = torch.log(p) + 1.0
    scaled = p * 1.5
    with_nan = p.clone()
    with_nan[0, 0] = float("nan")
    for bad in (logits, scaled, with_nan):
        for metric in (metrics.accuracy, metrics.nll, metrics.brier_score, metrics.expected_calibration_error,
                       metrics.reliability_bins):
            with pytest.raises(ValueError, match="probs must be probabilities"):
                metric(bad, y)
    wide = torch.softmax(torch.randn(64, 32000) * 4, -1)
    labels = torch.randint(0, 32000, (64,))
    for dtype in (torch.float16, torch.bfloat16):  # rows off by rounding only: accepted
        assert metrics.brier_score(wide.to(dtype), labels) == pytest.approx(metrics.brier_score(wide, labels), abs=1e-3)


def test_metrics_of_no_rows_are_nan():
    """No rows: every classification metric is NaN (ECE said 0.0, as if perfectly calibrated)."""
    p, y = _probs()
    for metric in (metrics.accuracy, metrics.nll, metrics.brier_score, metrics.expected_calibration_error):
        assert math.isnan(metric(p[:0], y[:0])), metric.__name__


def test_regression_metrics_never_broadcast():
    """Shapes that differ are an error, not a broadcast: rmse of (N, K) against (N,) used to average an
    (N, N, K)-like grid of differences into a plausible-looking number."""
    mean, var, y = torch.randn(5, 3, 2), torch.rand(5, 3, 2) + 0.1, torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"pred_mean, target must share one shape; got pred_mean \(5, 2\), target"):
        metrics.rmse(y, y[:, 0])
    with pytest.raises(ValueError, match=r"mean, var must share one shape \(\*, \*, \*\)"):
        metrics.gaussian_mixture_moments(mean[:, 0], var[:, 0])
    with pytest.raises(ValueError, match=r"target must have shape \(5, 2\); got target \(5, 1\)"):
        metrics.gaussian_mixture_nll(mean, var, y[:, :1])
    with pytest.raises(ValueError, match="pred_var"):
        metrics.interval_coverage(y, var[:1, 0], y)
    with pytest.raises(ValueError, match="level"):
        metrics.interval_coverage(y, var[:, 0], y, 1.0)
    assert metrics.rmse(y, y + 2.0) == pytest.approx(2.0)


def test_regression_metrics_refuse_variances_that_are_not_positive():
    mean, y = torch.randn(6, 3, 2), torch.randn(6, 2)
    for bad in (-torch.rand(6, 3, 2), torch.zeros(6, 3, 2), torch.full((6, 3, 2), float("nan"))):
        with pytest.raises(ValueError, match="var must be finite and > 0"):
            metrics.gaussian_mixture_moments(mean, bad)
        with pytest.raises(ValueError, match="var must be finite and > 0"):
            metrics.gaussian_mixture_nll(mean, bad, y)
        with pytest.raises(ValueError, match="pred_var must be finite and > 0"):  # counted those rows as misses
            metrics.interval_coverage(mean[:, 0], bad[:, 0], y)
