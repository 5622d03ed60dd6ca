"""Markdown table from a pytest-benchmark JSON file (the extra_info every case carries).

    pytest bench/ --benchmark-only --benchmark-json=out.json && python bench/summarize.py out.json
"""

from __future__ import annotations

import json
import sys


def _f(value, spec):
    return "-" if value is None else format(value, spec)


def markdown(records: list[dict]) -> str:
    head = ("| op | shape (B, D, M, C) | provider | median ms | rate | x eager | / GEMM floor | peak memory | "
            "memory / eager |\n|---|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in records:
        mem = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.1f} MiB"
        lines.append(f"| {r['op']} | {r['shape']} ({r['B']}, {r['D']}, {r['M']}, {r['C']}) | {r['provider']} | "
                     f"{r['median_ms']:.2f} | {r['rate']:.1f} {r['rate_unit']} | {r['speedup_vs_eager']:.2f} | "
                     f"{_f(r['over_gemm_floor'], '.2f')} | {mem} | {_f(r['memory_vs_eager'], '.3f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        data = json.load(f)
    records = [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info")]
    print(markdown(records))
    compiled = [r for r in records if r.get("compile_seconds")]
    if compiled:
        print(f"\ntorch.compile time (outside the timings): "
              + ", ".join(f"{r['op']}/{r['shape']} {r['compile_seconds']:.1f}s" for r in compiled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
