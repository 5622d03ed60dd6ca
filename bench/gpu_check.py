"""One-shot GPU check for a lent machine: the gpu test tier, then the benchmarks, a short table and JSON.

    python bench/gpu_check.py [--out bench/gpu_results.json] [--budget-s 420]

Built to finish well under 8 minutes on an H100 (run it with a 480 s timeout): the gpu tests get at
most 150 s, the target cases run first, torch.compile only where a target names it, and no new case
starts after 330 s (the table says which were left out; the longest case, the big bf16 one with
its compile, takes about a minute). Timing is triton.testing.do_bench (warm-up, L2 flushed between runs, median); peak
memory is torch.cuda.max_memory_allocated above what was live before the step. Without CUDA it
refuses with exit code 2 and changes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common as C  # noqa: E402

# The GPU targets of the benchmark issue: (op, shape name, what, bound)
TARGETS = [
    ("linear_fwdbwd", "gpu-large", "over_gemm_floor", ("<=", 1.4)),
    ("linear_fwdbwd", "gpu-large", "speedup_vs_compile", (">=", 1.5)),
    ("linear_fwdbwd", "gpu-large", "speedup_vs_eager", (">=", 2.5)),
    ("linear_fwdbwd", "gpu-large", "memory_vs_eager", ("<=", 0.10)),
    ("linear_fwdbwd", "gpu-small", "speedup_vs_eager", (">=", 5.0)),
]
# torch.compile costs tens of seconds per case on a GPU: only where a target compares against it.
COMPILE_CASES = {("linear_fwdbwd", "gpu-large")}


def run_gpu_tests(timeout: float) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider"],
                             cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
        return {"returncode": out.returncode, "summary": tail, "seconds": time.perf_counter() - start,
                "failures": [ln for ln in out.stdout.splitlines() if ln.startswith("FAILED")][:20]}
    except subprocess.TimeoutExpired:
        return {"returncode": None, "summary": f"timed out after {timeout:.0f}s", "seconds": timeout, "failures": []}


def _do_bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def bench_case(case: C.Case, provider: str) -> dict:
    inputs = C.make_inputs(case)
    step = C.make_callable(case, provider, inputs)
    seconds = _do_bench(step)
    peak = C.peak_memory_bytes(step, "cuda")
    return {"op": case.op, "shape": case.name, "dtype": str(case.dtype).replace("torch.", ""), "provider": provider,
            "B": case.B, "D": case.D, "M": case.M, "C": case.C, "seconds": seconds, "peak_memory_bytes": peak,
            "compile_seconds": inputs.extra.get("compile_seconds")}


def add_ratios(rows: list[dict], floors: dict) -> list[dict]:
    """Speed-ups over eager and compile, time over the GEMM floor and memory over eager, per case."""
    by_case: dict[tuple, dict] = {}
    for r in rows:
        by_case.setdefault((r["op"], r["shape"]), {})[r["provider"]] = r
    for (op, shape), group in by_case.items():
        eager, compiled = group.get("eager"), group.get("compile")
        for r in group.values():
            r["speedup_vs_eager"] = eager["seconds"] / r["seconds"] if eager else None
            r["speedup_vs_compile"] = compiled["seconds"] / r["seconds"] if compiled else None
            floor = floors.get((op, shape))
            r["gemm_floor_seconds"] = floor
            r["over_gemm_floor"] = r["seconds"] / floor if floor else None
            mem_e = eager and eager.get("peak_memory_bytes")
            r["memory_vs_eager"] = r["peak_memory_bytes"] / mem_e if mem_e and r["peak_memory_bytes"] else None
    return rows


def rate_of(row: dict) -> str:
    case = C.Case(row["op"], row["shape"], row["B"], row["D"], row["M"], row["C"], getattr(torch, row["dtype"]), "cuda")
    value, unit = C.rate(case, row["seconds"])
    return f"{value / 1000:.1f} TFLOP/s" if unit == "GFLOP/s" else f"{value:.0f} {unit}"


def format_table(rows: list[dict], device: str) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    head = (f"{'device':22} {'op':14} {'shape':10} {'dtype':8} {'provider':10} {'ms':>9} {'rate':>14} "
            f"{'x eager':>8} {'/floor':>7} {'peak mem':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{device[:22]:22} {r['op']:14} {r['shape']:10} {r['dtype']:8} {r['provider']:10} "
                     f"{r['seconds'] * 1e3:9.3f} {rate_of(r):>14} {f(r['speedup_vs_eager'], '8.2f')} "
                     f"{f(r['over_gemm_floor'], '7.2f')} {C.fmt_bytes(r['peak_memory_bytes']):>11}")
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[tuple[str, str, float | None]]:
    """(target, PASS/FAIL/MISSING, value) for every GPU target, from the fasthydra rows."""
    out = []
    for op, shape, key, (cmp, bound) in TARGETS:
        row = next((r for r in rows if r["op"] == op and r["shape"] == shape and r["provider"] == "fasthydra"), None)
        value = None if row is None else row.get(key)
        label = f"{op} {shape}: {key} {cmp} {bound}"
        if value is None:
            out.append((label, "MISSING", None))
        else:
            ok = value <= bound if cmp == "<=" else value >= bound
            out.append((label, "PASS" if ok else "FAIL", value))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_results.json"))
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="start no new case after this many seconds (the gpu tests get at most 150 s of it)")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU; none is visible here (nothing was run)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    device = torch.cuda.get_device_name(0)
    tests = {"summary": "skipped"} if args.skip_tests else run_gpu_tests(timeout=min(150.0, args.budget_s / 2))
    print(f"gpu tests: {tests['summary']}", flush=True)

    all_cases = C.cases("cuda")
    priority = [c for c in all_cases if (c.op, c.name) in {(t[0], t[1]) for t in TARGETS}]
    order = priority + [c for c in all_cases if c not in priority]
    rows, left_out, floors = [], [], {}
    for case in order:
        if time.perf_counter() - start > args.budget_s:
            left_out.append(case.key)
            continue
        floors[(case.op, case.name)] = _do_bench(C.gemm_floor_callable(case))
        for provider in C.PROVIDERS:
            if C.provider_available(provider, "cuda"):
                continue
            if provider == "compile" and (case.op, case.name) not in COMPILE_CASES:
                continue
            try:
                rows.append(bench_case(case, provider))
            except Exception as exc:  # keep going: the table says what failed
                rows.append({"op": case.op, "shape": case.name, "dtype": str(case.dtype).replace("torch.", ""),
                             "provider": provider, "error": f"{type(exc).__name__}: {exc}"[:300]})
            torch.cuda.empty_cache()
        print(f"  done {case.key} ({time.perf_counter() - start:.0f}s)", flush=True)
    good = add_ratios([r for r in rows if "error" not in r], floors)
    print(format_table(good, device))
    for r in rows:
        if "error" in r:
            print(f"ERROR {r['op']} {r['shape']} {r['provider']}: {r['error']}")
    targets = check_targets(good)
    for label, verdict, value in targets:
        print(f"target {verdict:7} {label} (measured {value if value is None else round(value, 3)})")
    if left_out:
        print(f"left out (time budget): {', '.join(left_out)}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"device": device, "date": datetime.date.today().isoformat(), "commit": commit,
              "torch": torch.__version__, "triton": __import__("triton").__version__, "tests": tests,
              "rows": rows, "targets": targets, "left_out": left_out, "seconds": time.perf_counter() - start}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1, default=str)
    print(f"wrote {args.out} ({record['seconds']:.0f}s)")
    return 0 if tests.get("returncode") in (0, None) and all(v != "FAIL" for _, v, _ in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
