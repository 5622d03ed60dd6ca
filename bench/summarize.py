"""Markdown table (and a chart) from a pytest-benchmark JSON file (the extra_info every case carries), or from a
record of bench/gpu_check.py (its rows, latency rows, variant ratios and targets: the tables bench/RESULTS.md keeps).

    pytest bench/ --benchmark-only --benchmark-json=out.json && python bench/summarize.py out.json [--plot out.png]
    python bench/summarize.py gpu_check.json [--plot out.png]
"""

from __future__ import annotations

import json
import sys

import common as C


def _f(value, spec):
    return "-" if value is None else format(value, spec)


def _rate(value: float, unit: str) -> str:
    return f"{value / 1000:.1f} TFLOP/s" if unit == "GFLOP/s" and value >= 10_000 else f"{value:.1f} {unit}"


def _table(head: tuple, rows) -> str:
    """A Markdown table: head is (name, right-aligned) pairs, rows are tuples of cell strings."""
    lines = ["| " + " | ".join(name for name, _ in head) + " |",
             "|" + "|".join("---:" if right else "---" for _, right in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def markdown(records: list[dict]) -> str:
    head = (("op", 0), ("shape (B, D, M, C)", 0), ("provider", 0), ("median ms", 1), ("rate", 1), ("x eager", 1),
            ("/ GEMM floor", 1), ("peak memory", 1), ("memory / eager", 1))
    return _table(head, ((r["op"], f"{r['shape']} ({r['B']}, {r['D']}, {r['M']}, {r['C']})", r["provider"],
                          f"{r['median_ms']:.2f}", _rate(r["rate"], r["rate_unit"]),
                          _f(r.get("speedup_vs_eager"), ".2f"), _f(r.get("over_gemm_floor"), ".2f"),
                          C.fmt_bytes(r.get("peak_memory_bytes")),
                          _f(r.get("memory_vs_eager"), ".3f")) for r in records))


def plot(records: list[dict], path: str) -> None:
    """Speed-up over eager per op and shape, one bar per provider; and peak memory over eager's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cases = list(dict.fromkeys((r["op"], r["shape"]) for r in records))
    providers = [p for p in ("compile", "fasthydra", "liger") if any(r["provider"] == p for r in records)]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(cases) * 0.8), 8), sharex=True)
    x = np.arange(len(cases))
    width = 0.8 / max(len(providers), 1)
    for i, prov in enumerate(providers):
        speed, mem = [], []
        for case in cases:
            r = next((r for r in records if (r["op"], r["shape"]) == case and r["provider"] == prov), None)
            speed.append(r["speedup_vs_eager"] if r and r.get("speedup_vs_eager") is not None else np.nan)
            mem.append(r["memory_vs_eager"] if r and r.get("memory_vs_eager") is not None else np.nan)
        axes[0].bar(x + i * width, speed, width, label=prov)
        axes[1].bar(x + i * width, mem, width, label=prov)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("speed-up over eager (x)")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_ylabel("peak memory / eager's")
    axes[1].set_xticks(x + width * (len(providers) - 1) / 2)
    axes[1].set_xticklabels([f"{op}\n{shape}" for op, shape in cases], rotation=45, ha="right", fontsize=8)
    axes[0].legend()
    axes[0].set_title("fasthydra benchmarks (medians, measured side by side)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gpu_check_records(data: dict) -> list[dict]:
    """A gpu_check record's measured rows in the pytest-benchmark form markdown() and plot() read (the rate from the
    case); rows that hold an error instead are listed by gpu_check_extras."""
    import torch

    out = []
    for r in data["rows"]:
        if "error" in r:
            continue
        case = C.Case(r["op"], r["shape"], r["B"], r["D"], r["M"], r["C"], getattr(torch, r["dtype"]), "cuda")
        rate, unit = C.rate(case, r["seconds"])
        out.append({**r, "median_ms": r["seconds"] * 1e3, "rate": rate, "rate_unit": unit})
    return out


def gpu_check_extras(data: dict) -> str:
    """What else a gpu_check record holds for bench/RESULTS.md: the run's facts, latency rows, the small step's host
    time by pieces, variants, the default design's bounds, targets, and the cases that failed."""
    parts = [", ".join(f"{k} {data[k]}" for k in ("device", "date", "commit", "torch", "triton") if data.get(k))]
    if data.get("copy_bytes_per_s"):
        parts.append(f"measured copy: {data['copy_bytes_per_s'] / 1e9:.0f} GB/s")
    if data.get("tests"):
        parts.append(f"gpu tests: {str(data['tests'].get('summary', data['tests'])).strip('= ')}")
    if data.get("latency"):
        parts.append(_table((("op", 0), ("shape", 0), ("provider", 0), ("GPU us", 1), ("host us", 1)), (
            (r["op"], r["shape"], r["provider"], _f(r.get("gpu_us"), ".0f"), _f(r.get("host_us"), ".0f"))
            for r in data["latency"] if "error" not in r)))
    if data.get("host_breakdown"):
        parts.append("host time of the small step's pieces (us per call): " + ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in data["host_breakdown"].items()))
    if data.get("variants"):
        parts.append(_table((("op", 0), ("shape", 0), ("variant", 0), ("time / default", 1),
                             ("memory / default", 1)), (
            (v["op"], v["shape"], v["provider"], _f(v["time_vs_default"], ".2f"), _f(v.get("memory_vs_default"), ".2f"))
            for v in data["variants"])))
    if data.get("bounds"):
        parts.append(_table((("op", 0), ("shape", 0), ("GEMM floor ms", 1), ("loss pass GB", 1),
                             ("bound / floor", 1), ("measured / floor", 1)), (
            (b["op"], b["shape"], f"{b['floor_s'] * 1e3:.3f}", f"{b['loss_pass_bytes'] / 1e9:.2f}",
             f"{b['bound_over_floor']:.2f}", f"{b['measured_over_floor']:.2f}") for b in data["bounds"])))
    if data.get("targets"):
        parts.append(_table((("target", 0), ("verdict", 0), ("value", 1)),
                            ((label, verdict, _f(value, ".3f")) for label, verdict, value in data["targets"])))
    failed = [r for r in data.get("rows", []) + data.get("latency", []) if "error" in r]
    if failed:
        parts.append(_table((("op", 0), ("shape", 0), ("provider", 0), ("error", 0)),
                            ((r["op"], r["shape"], r["provider"], r["error"]) for r in failed)))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        data = json.load(f)
    if "benchmarks" in data:
        records = [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info")]
    elif "rows" in data:
        records = gpu_check_records(data)
    else:
        raise SystemExit(f"{argv[0]}: neither a pytest-benchmark JSON (no 'benchmarks') nor a bench/gpu_check.py "
                         "record (no 'rows')")
    print(markdown(records))
    if "rows" in data:
        print("\n" + gpu_check_extras(data))
    if "--plot" in argv:
        plot(records, argv[argv.index("--plot") + 1])
    compiled = [r for r in records if r.get("compile_seconds")]
    if compiled:
        print("\ntorch.compile time (outside the timings): "
              + ", ".join(f"{r['op']}/{r['shape']} {r['compile_seconds']:.1f}s" for r in compiled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
