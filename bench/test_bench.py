"""pytest-benchmark suite: `pytest bench/ --benchmark-only` (FASTHYDRA_BENCH_QUICK=1: few rounds).

Every case runs its providers in one session, eager first, and each result carries in extra_info
the rate, the speed-up over eager measured in this run, the floor measured in this run (the GEMMs
the op needs, or for the memory-bound ops one elementwise sweep moving the same bytes) and the
op's time over it, and the peak memory (GPU: max_memory_allocated; CPU: a fresh process per case).
"""

import pytest
import torch

import common as C

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAIRS = [(case, provider) for case in C.cases(DEVICE) for provider in C.PROVIDERS]
RESULTS: list[dict] = []  # read by conftest.py's summary table
_EAGER_SECONDS: dict[str, float] = {}
_EAGER_MEMORY: dict[str, int | None] = {}
_FLOOR_SECONDS: dict[str, float | None] = {}

pytestmark = pytest.mark.bench


def _rounds(step) -> tuple[int, int]:
    if C.quick_mode():
        return 3, 1
    estimate = C.median_seconds(step, rounds=1, warmup=1)
    return max(5, min(30, int(3.0 / max(estimate, 1e-4)))), 1


def _floor_seconds(case: C.Case) -> float | None:
    if case.key not in _FLOOR_SECONDS:
        floor = C.gemm_floor_callable(case)
        rounds = 3 if C.quick_mode() else 9
        _FLOOR_SECONDS[case.key] = None if floor is None else C.median_seconds(floor, rounds=rounds)
    return _FLOOR_SECONDS[case.key]


def _memory(case: C.Case, provider: str, step) -> int | None:
    if case.device == "cuda":
        return C.peak_memory_bytes(step, "cuda")
    if C.quick_mode() and (case.name != "large-C" or provider == "compile"):
        return None  # short mode: the fresh-process probes run for the large-C case only
    return C.peak_memory_fresh_process(case, provider)


@pytest.mark.parametrize("case,provider", PAIRS, ids=[f"{c.key}-{p}" for c, p in PAIRS])
def test_bench(benchmark, case, provider):
    reason = C.provider_available(provider, case.device)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    inputs = C.make_inputs(case)
    step = C.make_callable(case, provider, inputs)
    rounds, warmup = _rounds(step)
    benchmark.group = case.key
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    seconds = benchmark.stats.stats.median

    if provider == "eager":
        _EAGER_SECONDS[case.key] = seconds
    elif case.key not in _EAGER_SECONDS:  # eager filtered out of this run: measure it here
        eager_step = C.make_callable(case, "eager", C.make_inputs(case))
        _EAGER_SECONDS[case.key] = C.median_seconds(eager_step, rounds=rounds)
    eager_seconds = _EAGER_SECONDS[case.key]
    floor = _floor_seconds(case)
    peak = _memory(case, provider, step)
    if provider == "eager":
        _EAGER_MEMORY[case.key] = peak
    eager_peak = _EAGER_MEMORY.get(case.key)
    value, unit = C.rate(case, seconds)

    info = {
        "op": case.op, "shape": case.name, "B": case.B, "D": case.D, "M": case.M, "C": case.C,
        "dtype": str(case.dtype).replace("torch.", ""), "device": case.device, "provider": provider,
        "median_ms": seconds * 1e3, "rate": value, "rate_unit": unit,
        "eager_ms": eager_seconds * 1e3, "speedup_vs_eager": eager_seconds / seconds,
        "floor_kind": "GEMM" if C.flop_count(case) else "bandwidth",
        "gemm_floor_ms": None if floor is None else floor * 1e3,
        "over_gemm_floor": None if floor is None else seconds / floor,
        "peak_memory_bytes": peak,
        "memory_vs_eager": None if not (peak and eager_peak) else peak / eager_peak,
        "compile_seconds": inputs.extra.get("compile_seconds"),
        "rounds": rounds,
    }
    benchmark.extra_info.update(info)
    RESULTS.append(info)
    assert seconds > 0
