"""cpu tier: `fasthydra demo` end to end, small configurations (the full runs are in the README/notes)."""

import io
import json

import pytest
import torch

from fasthydra.demo import run

pytestmark = pytest.mark.cpu


def test_digits_demo_writes_results_report_and_plots(tmp_path):
    res = run("digits", heads=3, epochs=4, out=str(tmp_path), progress=False, stream=io.StringIO())
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["dataset"] == "digits" and saved["heads"] == 3
    assert set(saved["methods"]) == {"ensemble", "kd", "hydra"}
    for row in saved["methods"].values():
        assert {"acc", "nll", "brier", "ece", "mu", "ood_auroc", "params", "seconds"} <= set(row)
        assert 0 <= row["acc"] <= 1 and -1 <= row["brier"] <= 1
    assert saved["methods"]["kd"]["mu"] == 0.0  # one head: no disagreement by construction
    assert saved["methods"]["kd"]["ood_auroc"] == 0.5
    assert saved["methods"]["hydra"]["mu"] > 0
    # Hydra: one body + 3 heads; the ensemble: 3 whole networks
    assert saved["methods"]["hydra"]["params"] < saved["methods"]["ensemble"]["params"]
    for name in ("report.md", "reliability.png", "uncertainty_hist.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert res == saved


def test_demo_is_deterministic(tmp_path):
    kwargs = dict(heads=2, epochs=2, progress=False, plots=False, stream=io.StringIO())
    a = run("digits", out=str(tmp_path / "a"), **kwargs)
    b = run("digits", out=str(tmp_path / "b"), **kwargs)
    for method in a["methods"]:
        for key in ("acc", "nll", "mu"):
            assert a["methods"][method][key] == b["methods"][method][key]


def test_a_second_run_in_the_same_folder_uses_its_own_teacher(tmp_path):
    """A top-k run writes its teacher cache into `out`; a later run there (another seed: other members, another
    split) must distil from its own members, not from the cache left behind (which it once did: its Hydra fell to
    chance, accuracy 0.10, on this configuration)."""
    kwargs = dict(heads=3, epochs=4, out=str(tmp_path), teacher_top_k=3, progress=False, plots=False,
                  stream=io.StringIO())
    first = run("digits", seed=0, **kwargs)
    second = run("digits", seed=1, **kwargs)
    for res in (first, second):
        assert res["methods"]["hydra"]["acc"] > 0.8 and res["methods"]["kd"]["acc"] > 0.7, res["methods"]


def test_toy_regression_epistemic_rises_off_the_data(tmp_path):
    res = run("toy-regression", heads=5, epochs=40, out=str(tmp_path), progress=False,
              stream=io.StringIO())
    for method in ("ensemble", "hydra"):
        row = res["methods"][method]
        assert row["epistemic_ood"] / row["epistemic"] > 1.0, (method, row)
    assert res["methods"]["kd"]["epistemic"] == 0.0
    assert (tmp_path / "predictive.png").stat().st_size > 0
    with open(tmp_path / "results.json") as f:
        assert {"rmse", "nll", "coverage", "epistemic", "ood_auroc"} <= set(json.load(f)["methods"]["hydra"])
    assert torch.isfinite(torch.tensor(res["methods"]["hydra"]["nll"]))


def test_mlp_heads_option(tmp_path):
    kwargs = dict(heads=2, epochs=1, progress=False, plots=False, stream=io.StringIO())
    linear = run("digits", out=str(tmp_path / "a"), **kwargs)
    mlp = run("digits", out=str(tmp_path / "b"), head_hidden=16, **kwargs)
    assert linear["head_hidden"] is None and mlp["head_hidden"] == 16
    # MLP heads: 2 x (64*16 + 16 + 16*10 + 10) parameters instead of 2 x (64*10 + 10)
    grown = mlp["methods"]["hydra"]["params"] - linear["methods"]["hydra"]["params"]
    assert grown == 2 * (64 * 16 + 16 + 16 * 10 + 10) - 2 * (64 * 10 + 10)


def test_demo_with_a_top_k_teacher_cache(tmp_path):
    res = run("digits", heads=2, epochs=2, out=str(tmp_path), progress=False, plots=False, stream=io.StringIO(),
              teacher_top_k=3)
    assert res["teacher_top_k"] == 3
    n = res["teacher_cache_bytes"] // (2 * 3 * 6)  # rows: 2 members x 3 kept entries x 6 bytes each
    assert n * 2 * 3 * 6 == res["teacher_cache_bytes"] and n > 1000
    assert (tmp_path / "teacher_topk.values.npy").exists() and (tmp_path / "teacher_topk.json").exists()
    assert res["methods"]["hydra"]["mu"] > 0 and 0 < res["methods"]["hydra"]["acc"] <= 1
