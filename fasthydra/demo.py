"""`fasthydra demo`: ensemble vs KD vs Hydra on an embedded data set, the paper's comparison.

Trains an ensemble of M small MLPs, caches their outputs, distils them twice (KD: one head against
the ensemble mean; Hydra: M heads, one per member, from the KD model expanded) and compares the three
on the test set and on the set's out-of-distribution inputs. Writes results.json, report.md and PNG
plots to the output folder; prints the paper-style table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fasthydra import metrics
from fasthydra.data import DATASETS, LOADER_MODULES, DataSplit, load_dataset, toy_function
from fasthydra.distill import (
    DistillConfig,
    _check_device,
    count_parameters,
    distill,
    members_output,
    mlp_body,
    remove_teacher_cache,
    teacher_loader,
    teacher_outputs,
    train_ensemble,
)
from fasthydra.functional import _check_int, _check_temperature, uncertainty

CLASSIFICATION_KEYS = ("acc", "nll", "brier", "ece", "mu", "ood_auroc")
REGRESSION_KEYS = ("rmse", "nll", "coverage", "epistemic", "ood_auroc")


def _predict_classification(fn, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return fn(x).float().cpu()


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, logits_ood: torch.Tensor) -> dict:
    """Paper metrics of a (N, M, C) multi-head prediction (M = 1 for KD)."""
    u, u_ood = uncertainty(logits.double()), uncertainty(logits_ood.double())
    return {"acc": metrics.accuracy(u.probs, y), "nll": metrics.nll(u.probs, y),
            "brier": metrics.brier_score(u.probs, y, "paper"),
            "ece": metrics.expected_calibration_error(u.probs, y, 15),
            "mu": float(u.epistemic.mean()), "mu_ood": float(u_ood.epistemic.mean()),
            "ood_auroc": metrics.ood_auroc(u.epistemic, u_ood.epistemic)}


def _split_mv(out: torch.Tensor):
    k = out.shape[-1] // 2
    return out[..., :k], out[..., k:]


def regression_metrics(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor, mean_ood: torch.Tensor,
                       var_ood: torch.Tensor) -> dict:
    mu, ale, epi = metrics.gaussian_mixture_moments(mean.double(), var.double())
    _, _, epi_ood = metrics.gaussian_mixture_moments(mean_ood.double(), var_ood.double())
    return {"rmse": metrics.rmse(mu, y), "nll": metrics.gaussian_mixture_nll(mean, var, y),
            "coverage": metrics.interval_coverage(mu, ale + epi, y, 0.95), "epistemic": float(epi.mean()),
            "epistemic_ood": float(epi_ood.mean()), "ood_auroc": metrics.ood_auroc(epi.sum(-1), epi_ood.sum(-1))}


# Stage 2 gets this many times the epochs of stage 1: the expanded heads start identical and need
# the extra steps to pull apart towards their members (on digits, 1x reaches about 0.45 of the
# ensemble's MU, 2.5x about 0.6-0.7; see the README).
STAGE2_EPOCHS_FACTOR = 2.5


def run(dataset: str = "digits", heads: int = 8, epochs: int = 40, out: str = "runs/demo", device: str = "cpu",
        seed: int = 0, temperature: float = 4.0, width: int = 64, batch_size: int = 64, data_dir: str | None = None,
        progress: bool = True, plots: bool = True, stream=None, head_hidden: int | None = None,
        teacher_top_k: int | None = None) -> dict:
    """Runs the comparison and writes results.json (+ report.md and plots). Returns the results dict.

    Every argument is checked before the data set is read or anything trains (``check_run_args``)."""
    import sys

    check_run_args(dataset, heads, epochs, device, temperature, width, batch_size, head_hidden, teacher_top_k, seed,
                   plots)
    stream = stream or sys.stdout
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's RNG state is left alone
        torch.manual_seed(seed)
        return _run(dataset, heads, epochs, out, device, seed, temperature, width, batch_size, data_dir, progress,
                    plots, stream, head_hidden, teacher_top_k)


# The demo extra's modules a run may need, with the names pip knows them by.
PACKAGES = {"sklearn": "scikit-learn", "mnist1d": "mnist1d", "torchvision": "torchvision", "matplotlib": "matplotlib"}


def check_run_args(dataset: str, heads: int, epochs: int, device: str, temperature: float, width: int = 64,
                   batch_size: int = 64, head_hidden: int | None = None, teacher_top_k: int | None = None,
                   seed: int = 0, plots: bool = True) -> None:
    """ValueError / TypeError naming the first bad argument of ``run`` (the CLI shows it as a usage error),
    ModuleNotFoundError naming the demo extra's packages the run needs and this environment lacks. What
    depends on the data (top-k against the number of classes) is checked once it is loaded, before the
    members train."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    _check_int("heads", heads, 2)  # one head has no disagreement to show: that is the KD row
    _check_int("epochs", epochs, 1)
    _check_int("width", width, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed)
    if head_hidden is not None:
        _check_int("head_hidden", head_hidden, 1)
    if teacher_top_k is not None:
        _check_int("teacher_top_k", teacher_top_k, 1)
    _check_temperature(temperature)
    _check_device(device)
    needs = LOADER_MODULES.get(dataset, ()) + (("matplotlib",) if plots else ())
    missing = [PACKAGES[m] for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"the demo on {dataset} needs {', '.join(missing)}: pip install 'fasthydra[demo]'")


def _run(dataset, heads, epochs, out, device, seed, temperature, width, batch_size, data_dir, progress, plots,
         stream, head_hidden, teacher_top_k=None) -> dict:
    data = load_dataset(dataset, seed=seed, data_dir=data_dir)
    if teacher_top_k is not None and (data.task != "classification" or teacher_top_k > data.num_outputs):
        raise ValueError(f"teacher_top_k = {teacher_top_k} needs a classification data set with at least that many "
                         f"classes; {dataset} is {data.task} with {data.num_outputs} outputs")
    os.makedirs(out, exist_ok=True)
    task, d_in, n_out = data.task, data.in_features, data.num_outputs
    head_out = n_out if task == "classification" else 2 * n_out
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=batch_size, shuffle=True,
                              generator=gen)

    def make_member():
        return nn.Sequential(mlp_body(d_in, width), nn.Linear(width, head_out))

    t0 = time.perf_counter()
    members = train_ensemble(make_member, train_loader, heads, task, epochs=epochs, lr=3e-3, device=device,
                             seed=seed, progress=progress)
    t_ens = time.perf_counter() - t0
    ordered = DataLoader(TensorDataset(data.x_train), batch_size=512, shuffle=False)
    # A top-k teacher goes through a memory-mapped cache, as a large-C run would use it; one left in `out` by an
    # earlier run holds other members' outputs (another seed, width or number of epochs), never these
    cache = os.path.join(out, "teacher_topk") if teacher_top_k else None
    if cache:
        remove_teacher_cache(cache)
    teacher = teacher_outputs(members, ordered, task, device=device, top_k=teacher_top_k, cache_path=cache,
                              progress=progress)
    cfg = DistillConfig(temperature=temperature if task == "classification" else 1.0, epochs_stage1=epochs,
                        epochs_stage2=max(1, round(STAGE2_EPOCHS_FACTOR * epochs)), lr=3e-3, noise_std=0.0, seed=seed,
                        device=device, progress=progress)
    t1 = time.perf_counter()
    hidden = head_hidden if task == "classification" else None  # Gaussian heads are linear
    kd, hydra = distill(mlp_body(d_in, width), width, n_out, heads, teacher_loader(data.x_train, teacher, batch_size,
                                                                                   seed), task, cfg,
                        hidden_features=hidden)
    t_distill = time.perf_counter() - t1

    xt, xo = data.x_test.to(device), data.x_ood.to(device)
    results = {"dataset": dataset, "heads": heads, "task": task, "ood": data.ood_description,
               "seed": seed, "epochs": epochs, "temperature": cfg.temperature, "head_hidden": hidden,
               "teacher_top_k": teacher_top_k, "teacher_cache_bytes": _teacher_bytes(teacher), "methods": {}}
    preds = {}
    for name, model in (("ensemble", None), ("kd", kd), ("hydra", hydra)):
        if name == "ensemble":
            def fn(x):
                return members_output(members, x, task)
        elif task == "classification":
            fn = model
        else:
            def fn(x, model=model):
                return torch.cat(model(x), dim=-1)
        out_test, out_ood = _predict_classification(fn, xt), _predict_classification(fn, xo)
        preds[name] = (out_test, out_ood)
        if task == "classification":
            row = classification_metrics(out_test, data.y_test, out_ood)
        else:
            row = regression_metrics(*_split_mv(out_test), data.y_test, *_split_mv(out_ood))
        row["params"] = count_parameters(members if name == "ensemble" else model)
        row["seconds"] = t_ens if name == "ensemble" else t_distill  # KD is Hydra's stage 1: one run
        results["methods"][name] = row

    print(format_table(results), file=stream)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if plots:
        write_plots(results, preds, data, out, members, kd, hydra, device)
    write_report(results, out, plots)
    print(f"wrote {os.path.join(out, 'results.json')} and report.md", file=stream)
    return results


def _teacher_bytes(teacher) -> int:
    """Bytes of the cached teacher outputs (a top-k cache: its values and indices)."""
    parts = teacher if isinstance(teacher, tuple) else (teacher,)
    return int(sum(t.numel() * t.element_size() for t in parts))


def format_table(results: dict) -> str:
    keys = CLASSIFICATION_KEYS if results["task"] == "classification" else REGRESSION_KEYS
    head = f"{'method':10}" + "".join(f"{k:>11}" for k in keys) + f"{'params':>10}"
    lines = [f"{results['dataset']}: M = {results['heads']} ({results['task']}); OOD = {results['ood']}", head,
             "-" * len(head)]
    for name, row in results["methods"].items():
        cells = "".join(f"{row[k]:11.3e}" if k in ("mu", "epistemic") else f"{row[k]:11.4f}" for k in keys)
        lines.append(f"{name:10}{cells}{row['params']:10d}")
    return "\n".join(lines)


def write_report(results: dict, out: str, plots: bool) -> None:
    keys = CLASSIFICATION_KEYS if results["task"] == "classification" else REGRESSION_KEYS
    lines = [f"# fasthydra demo: {results['dataset']}", "",
             f"M = {results['heads']} heads/members, seed {results['seed']}, {results['epochs']} epochs for the "
             f"members and stage 1, {STAGE2_EPOCHS_FACTOR}x that for stage 2, "
             f"T = {results['temperature']}. OOD set: {results['ood']}.", "",
             "| method | " + " | ".join(keys) + " | params |", "|---" * (len(keys) + 2) + "|"]
    for name, row in results["methods"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + f" | {row['params']} |")
    if plots:
        lines += ["", "![reliability](reliability.png)" if results["task"] == "classification" else
                  "![predictive](predictive.png)", "", "![uncertainty](uncertainty_hist.png)"]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _histograms(plt, scores: dict, results: dict, xlabel: str, path: str) -> None:
    """One panel per method: the uncertainty of test rows against OOD rows, on shared bins."""
    fig, axes = plt.subplots(1, len(scores), figsize=(12, 4))
    for ax, (name, (s_in, s_out)) in zip(axes, scores.items()):
        top = float(torch.cat([s_in, s_out]).max()) or 1e-6
        bins = torch.linspace(0, top, 30).numpy()
        ax.hist(s_in.numpy(), bins=bins, alpha=0.6, label="test (in-domain)")
        ax.hist(s_out.numpy(), bins=bins, alpha=0.6, label="OOD")
        ax.set_title(f"{name}: AUROC {results['methods'][name]['ood_auroc']:.3f}")
        ax.set_xlabel(xlabel)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(results, preds, data: DataSplit, out, members, kd, hydra, device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    if data.task == "classification":
        fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharey=True)
        for ax, name in zip(axes, names):
            probs = uncertainty(preds[name][0].double()).probs
            centres, acc, conf, count = metrics.reliability_bins(probs, data.y_test, 15)
            keep = count > 0
            ax.bar(centres[keep].numpy(), acc[keep].numpy(), width=1 / 15, edgecolor="k", alpha=0.7,
                   label="accuracy")
            ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
            ax.set_title(f"{name}: ECE {results['methods'][name]['ece']:.3f}")
            ax.set_xlabel("confidence")
        axes[0].set_ylabel("accuracy")
        axes[0].legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "reliability.png"), dpi=100)
        plt.close(fig)
        scores = {n: (uncertainty(preds[n][0].double()).epistemic, uncertainty(preds[n][1].double()).epistemic)
                  for n in names}
        _histograms(plt, scores, results, "epistemic uncertainty (MU)", os.path.join(out, "uncertainty_hist.png"))
        return
    # regression: the epistemic variance (summed over outputs) plays the part of MU
    def epistemic(out_):
        return metrics.gaussian_mixture_moments(*[v.double() for v in _split_mv(out_)])[2].sum(-1)

    scores = {n: (epistemic(preds[n][0]), epistemic(preds[n][1])) for n in names}
    _histograms(plt, scores, results, "epistemic variance", os.path.join(out, "uncertainty_hist.png"))
    if data.in_features != 1:
        return
    grid = torch.linspace(-8, 8, 400)[:, None]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    with torch.no_grad():
        outs = {"ensemble": members_output(members, grid.to(device), "regression").cpu(),
                "kd": torch.cat(kd(grid.to(device)), -1).cpu(), "hydra": torch.cat(hydra(grid.to(device)), -1).cpu()}
    g = grid[:, 0].numpy()
    for ax, name in zip(axes, names):
        mu, ale, epi = metrics.gaussian_mixture_moments(*[v.double() for v in _split_mv(outs[name])])
        mu, ale, epi = mu[:, 0].numpy(), ale[:, 0].numpy(), epi[:, 0].numpy()
        ax.scatter(data.x_train[:, 0], data.y_train[:, 0], s=4, c="grey", alpha=0.5, label="train")
        ax.plot(g, toy_function(grid)[:, 0].numpy(), "k:", lw=1, label="true mean")
        total = (ale + epi) ** 0.5
        ax.fill_between(g, mu - 2 * total, mu + 2 * total, color="tab:orange", alpha=0.3, label="±2 sd total")
        ax.fill_between(g, mu - 2 * epi ** 0.5, mu + 2 * epi ** 0.5, color="tab:blue", alpha=0.5,
                        label="±2 sd epistemic")
        ax.plot(g, mu, "tab:blue", lw=1.5, label="predictive mean")
        ax.set_title(name)
        ax.set_ylim(-8, 8)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "predictive.png"), dpi=100)
    plt.close(fig)
