"""Benchmark session plumbing: import path for bench/common.py and the summary table at the end."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import common  # noqa: E402


def format_table(rows) -> str:
    """The short table: provider, shape, ms, rate, speed-up over eager, time over the GEMM floor, memory."""
    head = (f"{'op':14} {'shape':10} {'dtype':8} {'provider':10} {'ms':>9} {'rate':>15} {'x eager':>8} "
            f"{'/floor':>7} {'peak mem':>11} {'mem/eager':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        floor = "-" if r["over_gemm_floor"] is None else f"{r['over_gemm_floor']:.2f}"
        mem_ratio = "-" if r["memory_vs_eager"] is None else f"{r['memory_vs_eager']:.3f}"
        rate = f"{r['rate']:.1f} {r['rate_unit']}"
        lines.append(f"{r['op']:14} {r['shape']:10} {r['dtype']:8} {r['provider']:10} {r['median_ms']:9.2f} "
                     f"{rate:>15} {r['speedup_vs_eager']:8.2f} {floor:>7} "
                     f"{common.fmt_bytes(r['peak_memory_bytes']):>11} {mem_ratio:>9}")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter):
    mod = sys.modules.get("test_bench")
    rows = getattr(mod, "RESULTS", None)
    if rows:
        terminalreporter.write_sep("=", "fasthydra benchmark summary (medians; ratios measured in this run)")
        terminalreporter.write_line(format_table(rows))
        compiled = [r for r in rows if r["compile_seconds"] is not None]
        if compiled:
            total = sum(r["compile_seconds"] for r in compiled)
            terminalreporter.write_line(f"torch.compile time, outside every timing: {total:.1f}s over "
                                        f"{len(compiled)} cases")
