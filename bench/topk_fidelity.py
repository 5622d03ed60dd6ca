"""Fidelity of Hydra distilled from top-k teacher caches, against the dense teacher, at large C.

    python bench/topk_fidelity.py [--heads 8] [--epochs 10] [--ks 8 32 128] [--out runs/topk_fidelity]

One ensemble of M MLPs is trained on ``blobs-1000`` (1000 classes, generated locally); its outputs
are cached once dense (float32, (N, M, C)) and once per k as a top-k cache (float16 values + int32
indices, (N, M, k)), each through ``teacher_outputs(..., cache_path=...)`` so that the bytes on disk
are measured, not computed. Hydra (stage 1 KD, then stage 2) is distilled from each cache with the
same seed, and scored on the test set: accuracy, NLL, MU (mean epistemic uncertainty) and OOD AUROC.
Then the loss alone, dense vs top-k, at one large-C shape: teacher bytes read per row and time.
Writes ``results.json``, ``table.md`` and ``fidelity.png`` to --out and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fasthydra.data import load_dataset
from fasthydra.demo import STAGE2_EPOCHS_FACTOR, classification_metrics
from fasthydra.distill import (DistillConfig, distill, members_output, mlp_body, remove_teacher_cache, teacher_loader,
                               teacher_outputs, train_ensemble)


def kept_mass(dense: torch.Tensor, temperature: float, k: int) -> float:
    """Mean over (example, member) of the tempered probability mass in the k largest logits."""
    total, count = 0.0, 0
    for rows in dense.split(2048):
        p = torch.softmax(rows.float() / temperature, dim=-1)
        total += float(p.topk(k, dim=-1).values.sum(-1).sum())
        count += p.shape[0] * p.shape[1]
    return total / count


def cache_bytes(path: str, top_k: int | None) -> int:
    files = [path] if top_k is None else [f"{path}.values.npy", f"{path}.indices.npy"]
    return sum(os.path.getsize(f) for f in files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10, help="members and stage 1; stage 2 runs 2.5x as many")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/topk_fidelity")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    progress = sys.stderr.isatty()
    torch.manual_seed(args.seed)
    data = load_dataset("blobs-1000", seed=args.seed)
    d_in, c = data.in_features, data.num_outputs
    gen = torch.Generator().manual_seed(args.seed)
    train = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=args.batch_size, shuffle=True,
                       generator=gen)

    def make_member():
        return nn.Sequential(mlp_body(d_in, args.width), nn.Linear(args.width, c))

    t0 = time.perf_counter()
    members = train_ensemble(make_member, train, args.heads, "classification", epochs=args.epochs, seed=args.seed,
                             progress=progress)
    print(f"ensemble trained in {time.perf_counter() - t0:.0f}s", flush=True)
    ordered = DataLoader(TensorDataset(data.x_train), batch_size=1024, shuffle=False)
    rows = {"ensemble": {**classification_metrics(members_output(members, data.x_test, "classification"),
                                                  data.y_test,
                                                  members_output(members, data.x_ood, "classification")),
                         "cache_bytes": None, "seconds": None}}
    cfg = DistillConfig(temperature=args.temperature, epochs_stage1=args.epochs,
                        epochs_stage2=max(1, round(STAGE2_EPOCHS_FACTOR * args.epochs)), lr=3e-3, seed=args.seed,
                        progress=progress)
    for top_k in [None, *args.ks]:
        name = "dense" if top_k is None else f"k={top_k}"
        path = os.path.join(args.out, "teacher_dense.npy" if top_k is None else f"teacher_top{top_k}")
        remove_teacher_cache(path)  # an earlier run's cache holds other members' outputs (another seed or epochs)
        teacher = teacher_outputs(members, ordered, "classification", cache_path=path, top_k=top_k,
                                  progress=progress)
        t1 = time.perf_counter()
        _, hydra = distill(mlp_body(d_in, args.width), args.width, c, args.heads,
                           teacher_loader(data.x_train, teacher, args.batch_size, args.seed), "classification", cfg)
        with torch.no_grad():
            row = classification_metrics(hydra(data.x_test), data.y_test, hydra(data.x_ood))
        rows[name] = {**row, "cache_bytes": cache_bytes(path, top_k), "seconds": time.perf_counter() - t1}
        if top_k is None:  # how much of each member's tempered distribution a top-k cache keeps
            masses = {k: kept_mass(teacher, args.temperature, k) for k in args.ks}
        else:
            rows[name]["tempered_mass_kept"] = masses[top_k]
        print(f"{name}: nll {row['nll']:.4f} mu {row['mu']:.4f} ({rows[name]['seconds']:.0f}s)", flush=True)
        del teacher

    dense = rows["dense"]
    lines = ["| teacher | cache on disk | smaller than dense | tempered mass kept | acc | NLL | NLL / dense | MU | "
             "MU / dense | OOD AUROC |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        size = "-" if r["cache_bytes"] is None else f"{r['cache_bytes'] / 2**20:.1f} MiB"
        ratio = "-" if r["cache_bytes"] is None else f"{dense['cache_bytes'] / r['cache_bytes']:.1f}x"
        mass = f"{r['tempered_mass_kept']:.3f}" if "tempered_mass_kept" in r else "-"
        lines.append(f"| {name} | {size} | {ratio} | {mass} | {r['acc']:.4f} | {r['nll']:.4f} | "
                     f"{r['nll'] / dense['nll']:.3f} | {r['mu']:.4f} | {r['mu'] / dense['mu']:.3f} | "
                     f"{r['ood_auroc']:.3f} |")
    table = "\n".join(lines)
    print(table)
    meta = {"dataset": "blobs-1000", "heads": args.heads, "epochs": args.epochs, "temperature": args.temperature,
            "seed": args.seed, "n_train": len(data.y_train), "classes": c, "torch": torch.__version__}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, os.path.join(args.out, "fidelity.png"))
    reads = teacher_read_table()
    print(reads)
    with open(os.path.join(args.out, "table.md"), "a") as f:
        f.write("\n" + reads + "\n")
    return 0


def teacher_read_table(b: int = 256, m: int = 4, c: int = 32000, ks=(8, 32, 128), rounds: int = 5) -> str:
    """The loss on given logits, forward + backward, dense teacher vs top-k caches at one large-C
    shape: teacher bytes read per row (fp16 values + int32 indices vs fp16 logits) and the median
    time, side by side in one run (the device the defaults pick: the torch path on a CPU)."""
    import statistics

    from fasthydra import TopKTeacher, hydra_kl_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    z = (torch.randn(b, m, c, generator=g, device=device) * 3).requires_grad_()
    dense = (torch.randn(b, m, c, generator=g, device=device) * 3).half()

    def timed(teacher):
        times = []
        for _ in range(rounds + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            hydra_kl_loss(z, teacher, 2.0).backward()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            z.grad = None
        return statistics.median(times[1:])

    lines = [f"| teacher ({device}, B={b}, M={m}, C={c}) | teacher bytes per row | median ms | x dense |",
             "|---|---:|---:|---:|"]
    base = timed(dense)
    lines.append(f"| dense (fp16) | {m * c * 2} | {base * 1e3:.2f} | 1.00 |")
    for k in ks:
        values, indices = dense.float().topk(k, dim=-1)
        t = timed(TopKTeacher(values.half(), indices.int()))
        lines.append(f"| top-{k} (fp16 + int32) | {m * k * 6} | {t * 1e3:.2f} | {base / t:.2f} |")
    return "\n".join(lines)


def plot(rows: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in rows if n != "ensemble"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, label in zip(axes, ("nll", "mu", "cache_bytes"), ("test NLL", "MU (epistemic, test)",
                                                                     "cache on disk (MiB)")):
        vals = [rows[n][key] / (2**20 if key == "cache_bytes" else 1) for n in names]
        ax.bar(names, vals, color=["#555"] + ["#1f77b4"] * (len(names) - 1))
        if key != "cache_bytes":
            ax.axhline(rows["ensemble"][key], color="#d62728", ls="--", lw=1, label="ensemble")
            ax.legend(fontsize=8)
        else:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
    fig.suptitle("Hydra from top-k teacher caches vs the dense teacher (blobs-1000)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
