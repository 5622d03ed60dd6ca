"""Metrics of the Hydra paper's comparison: classification on mixture probabilities, regression on
Gaussian mixtures, and out-of-distribution detection. All return Python floats.

Classification functions take ``probs (N, C)`` (rows summing to 1: logits or unnormalised scores are a
ValueError) and integer labels ``(N,)``.
"""

from __future__ import annotations

import math

import torch

from fasthydra.functional import _check_int, uncertainty  # noqa: F401  (uncertainty: re-exported)


def _check_probs(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(probs, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("probs and labels must be torch.Tensors")
    if probs.dim() != 2:
        raise ValueError(f"probs must be (N, C), got shape {tuple(probs.shape)}")
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"labels must be (N,) = ({probs.shape[0]},), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    y = labels.detach().long()
    if len(y) and not (0 <= int(y.min()) and int(y.max()) < probs.shape[1]):  # (an evaluation: a host read is fine)
        raise ValueError(f"labels must lie in [0, C) = [0, {probs.shape[1]}), got values from {int(y.min())} to "
                         f"{int(y.max())}")
    p = probs.detach().double()
    if p.numel():  # logits or unnormalised scores passed by mistake gave plausible numbers (nll clamps them)
        lo, hi, worst = float(p.min()), float(p.max()), float((p.sum(1) - 1).abs().max())
        if not (lo >= -PROB_TOL and hi <= 1 + PROB_TOL and worst <= ROW_SUM_TOL):  # NaN fails too
            raise ValueError(f"probs must be probabilities (in [0, 1], rows summing to 1 within {ROW_SUM_TOL}); got "
                             f"values from {lo:.4g} to {hi:.4g} and a row sum off by {worst:.3g} (logits? use "
                             f"uncertainty(z).probs or softmax)")
    return p, y


# How far probabilities may stray: 16-bit softmax rows over many classes sum to 1 within a few 1e-3.
PROB_TOL, ROW_SUM_TOL = 1e-6, 1e-2


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose most probable class is the label."""
    p, y = _check_probs(probs, labels)
    return float((p.argmax(-1) == y).double().mean()) if len(y) else float("nan")


def nll(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-log P_y`` (probabilities floored at eps)."""
    p, y = _check_probs(probs, labels)
    return float(-p.gather(1, y[:, None]).clamp_min(eps).log().mean())


def brier_score(probs: torch.Tensor, labels: torch.Tensor, convention: str = "paper") -> float:
    """Brier score. ``convention="paper"``: ``sum_c P_c^2 - 2 P_y`` (TensorFlow Probability's, in [-1, 1],
    as the Hydra paper reports it); ``"standard"``: ``sum_c (P_c - 1[c = y])^2`` (in [0, 2])."""
    p, y = _check_probs(probs, labels)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    paper = (p * p).sum(1) - 2 * p_y
    if convention == "paper":
        return float(paper.mean())
    if convention == "standard":
        return float((paper + 1).mean())
    raise ValueError(f"convention must be 'paper' or 'standard', got {convention!r}")


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with equal-width bins on the max probability: ``sum_bins |bin|/N * |acc(bin) - conf(bin)|``.
    Bins are (lo, hi], the first one [0, 1/n_bins]."""
    p, y = _check_probs(probs, labels)
    n_bins = _check_int("n_bins", n_bins, 1)
    if not len(y):
        return float("nan")  # (as the other metrics of no rows)
    conf, pred = p.max(1)
    correct = (pred == y).double()
    bins = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)
    total = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(conf))
    acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    cnf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
    keep = total > 0
    return float(((acc[keep] - cnf[keep]).abs()).sum() / max(len(y), 1))


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15):
    """(bin centres, accuracy per bin, confidence per bin, count per bin) for reliability diagrams."""
    p, y = _check_probs(probs, labels)
    n_bins = _check_int("n_bins", n_bins, 1)
    conf, pred = p.max(1)
    bins = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(conf))
    acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, (pred == y).double())
    cnf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
    safe = count.clamp_min(1)
    centres = (torch.arange(n_bins, dtype=torch.float64) + 0.5) / n_bins
    return centres, acc / safe, cnf / safe, count


def _scores(name: str, scores) -> torch.Tensor:
    """One score per row, (N,) (a list or an array too), as float64. A (N, C) tensor was flattened into N * C
    scores: passing the mixture's probs where its uncertainty was meant gave an area and no error."""
    s = torch.as_tensor(scores).detach()
    if s.dim() > 1:
        raise ValueError(f"{name} must hold one score per row, shape (N,); got shape {tuple(s.shape)} (score rows by "
                         f"an uncertainty: uncertainty(z).epistemic or .total, not .probs)")
    if s.dtype.is_complex or s.dtype == torch.bool:
        raise TypeError(f"{name} must be real scores, got {s.dtype}")
    return s.double().reshape(-1)


def ood_auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """Area under the ROC curve with in-domain rows as negatives and OOD rows as positives, scored by an
    uncertainty (higher = more OOD). The Mann-Whitney statistic with ties counted one half."""
    s_in, s_out = _scores("score_in", score_in), _scores("score_out", score_out)
    if len(s_in) == 0 or len(s_out) == 0:
        raise ValueError("ood_auroc needs at least one in-domain and one OOD score")
    for name, s in (("score_in", s_in), ("score_out", s_out)):
        if torch.isnan(s).any():  # a NaN has no rank: the area would be an artefact of the sort
            raise ValueError(f"{name} contains NaN ({int(torch.isnan(s).sum())} of {len(s)} scores)")
    scores = torch.cat([s_in, s_out])
    # average ranks (1-based) with ties sharing their mean rank
    order = torch.argsort(scores, stable=True)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    uniq, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    n_in, n_out = len(s_in), len(s_out)
    rank_sum_out = ranks[n_in:].sum()
    return float((rank_sum_out - n_out * (n_out + 1) / 2) / (n_in * n_out))


# ----------------------------------------------------------------------------------------------
# regression: Gaussian mixtures of M heads
# ----------------------------------------------------------------------------------------------


def _check_shapes(want: tuple | None = None, **tensors) -> None:
    """Tensors of one shape (want's, where given: None entries any size), never broadcast into each other."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    bad = len(set(shapes.values())) > 1 or (want is not None and (
        len(first) != len(want) or any(w is not None and w != f for w, f in zip(want, first))))
    if bad:
        wanted = "" if want is None else " (" + ", ".join("*" if w is None else str(w) for w in want) + ")"
        what = f"must have shape{wanted}" if len(shapes) == 1 else f"must share one shape{wanted}"
        raise ValueError(f"{', '.join(shapes)} {what}; got " + ", ".join(f"{n} {sh}" for n, sh in shapes.items()))


def _check_variance(name: str, var: torch.Tensor) -> None:
    """Variances finite and > 0: a raw (pre-softplus) output or NaN gave NaN moments and likelihoods, and a
    coverage that silently counted those rows as misses."""
    if var.numel() and not bool(torch.isfinite(var).all() and (var > 0).all()):  # (an evaluation: host read)
        raise ValueError(f"{name} must be finite and > 0 everywhere, got values from {float(var.min()):.4g} to "
                         f"{float(var.max()):.4g} (a raw variance output before softplus?)")


def gaussian_mixture_moments(mean: torch.Tensor, var: torch.Tensor):
    """Predictive mean and variance of an equal-weight mixture of M Gaussians, split in two.

    mean, var: (N, M, K). Returns (mean (N, K), aleatoric = mean_m var_m, epistemic = var_m(mu_m)),
    total variance = aleatoric + epistemic.
    """
    _check_shapes((None, None, None), mean=mean, var=var)
    _check_variance("var", var)
    mu = mean.mean(1)
    aleatoric = var.mean(1)
    epistemic = mean.var(1, unbiased=False)
    return mu, aleatoric, epistemic


def rmse(pred_mean: torch.Tensor, target: torch.Tensor) -> float:
    """Root mean squared error of predictions against targets of the same shape."""
    _check_shapes(pred_mean=pred_mean, target=target)
    return float(((pred_mean.double() - target.double()) ** 2).mean().sqrt())


def gaussian_mixture_nll(mean: torch.Tensor, var: torch.Tensor, target: torch.Tensor) -> float:
    """Mean negative log-likelihood of targets (N, K) under the equal-weight mixture (N, M, K), per output."""
    _check_shapes((None, None, None), mean=mean, var=var)
    _check_shapes((mean.shape[0], mean.shape[2]), target=target)
    _check_variance("var", var)
    mean, var, y = mean.double(), var.double(), target.double().unsqueeze(1)
    log_comp = -0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var)  # (N, M, K)
    log_mix = torch.logsumexp(log_comp, dim=1) - math.log(mean.shape[1])
    return float(-log_mix.mean())


def interval_coverage(pred_mean: torch.Tensor, pred_var: torch.Tensor, target: torch.Tensor,
                      level: float = 0.95) -> float:
    """Fraction of targets inside the central Gaussian interval of the predictive moments."""
    _check_shapes(pred_mean=pred_mean, pred_var=pred_var, target=target)
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    _check_variance("pred_var", pred_var)
    z = math.sqrt(2.0) * torch.special.erfinv(torch.tensor(level, dtype=torch.float64)).item()
    half = z * pred_var.double().sqrt()
    inside = (target.double() - pred_mean.double()).abs() <= half
    return float(inside.double().mean())


__all__ = ["accuracy", "nll", "brier_score", "expected_calibration_error", "reliability_bins", "ood_auroc",
           "gaussian_mixture_moments", "rmse", "gaussian_mixture_nll", "interval_coverage", "uncertainty"]
