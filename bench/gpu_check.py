"""One-shot GPU check for a lent machine: the gpu test tier, then the benchmarks, a short table and JSON.

    python bench/gpu_check.py [--out bench/gpu_results.json] [--budget-s 360]

On a lent H200 (its image has torch, Triton, setuptools, pytest, hypothesis, pytest-benchmark), as one
`run` with timeout_s 480:
    python3 -m pip install -q --no-deps --no-build-isolation -e . && PYTHONUNBUFFERED=1 \
        python3 bench/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

Built to finish within 8 minutes on an H200 (run it with a 480 s timeout): the gpu tests get at most 200 s, in four
pytest processes side by side (before them, the host's CPU and its cost per small torch call, for reading host
times); then the latency checks at small shapes (host and GPU time per step: the default small-step path, the cuBLAS
path and the torch path), the small step's host time in pieces (host_breakdown, about 10 s), the copy floor and the
loss with dense and top-k teachers, kernel and host profiles (about a minute); then the cases the targets name
first, the variants and knobs, the rest; torch.compile only where a target names it; no new case starts after 360 s
(the table says which were left out; the longest case, the big bf16 one with its compile, takes about a minute).
Then each figure bench/predictions.json predicted, against this run's (inside, below, above or missing; the log
lists those outside their range, `python bench/predictions.py RECORD.json` all of them). Last, where ncu works and
time is left before 450 s (--deadline-s), Nsight Compute profiles one step of the small cases and of the loss on
logits (clocks left alone; our kernels only). The SM and memory clocks are sampled with nvidia-smi through the
latency rows, the profiles and the cases. The JSON is written after every phase and case ("phase" says how far it
got), so a run cut short keeps what it measured; past 470 s (--hard-deadline-s) the script prints every thread's
stack, to show where a hang was, and exits.
The gpu tests' whole output is written beside the record (RECORD.tests.log: the reason for any failure).
A short confirming run after a change: --cases op:shape,... (those cases, their knobs, the gpu tests; no latency
rows, profiles, torch.compile or Nsight Compute) with --workers 8: about 140 s on the H200 (2026-12-04).
Timing is triton.testing.do_bench (warm-up, L2 flushed between runs, median); peak memory is
torch.cuda.max_memory_allocated above what was live before the step.
Without CUDA it refuses with exit code 2 and changes nothing.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import faulthandler
import glob
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common as C  # noqa: E402

# The GPU targets of issues 8 and 9: (op, shape name, what, bound)
GEMM_BOUND = [(op, shape) for op in ("linear_fwd", "linear_fwdbwd", "mlp_fwdbwd")
              for shape in ("mid", "large-C", "gpu-large", "gpu-large-fp16", "large-C-tf32")]
TARGETS = [
    ("linear_fwdbwd", "gpu-large", "over_gemm_floor", ("<=", 1.15)),
    ("linear_fwdbwd", "gpu-large", "speedup_vs_compile", (">=", 1.6)),
    ("linear_fwdbwd", "gpu-large", "speedup_vs_eager", (">=", 3.0)),
    ("linear_fwdbwd", "gpu-large", "memory_vs_eager", ("<=", 0.08)),
    *[(op, shape, "over_gemm_floor", ("<=", 1.3)) for op, shape in GEMM_BOUND
      if (op, shape) != ("linear_fwdbwd", "gpu-large")],
    *[(op, shape, "speedup_vs_eager", (">=", 1.0)) for op, shape in GEMM_BOUND],
    ("linear_fwdbwd", "small-C", "speedup_vs_eager", (">=", 10.0)),
    ("linear_fwdbwd", "gpu-small", "speedup_vs_eager", (">=", 10.0)),
    ("kl_fwdbwd", "gpu-large", "of_copy_bandwidth", (">=", 0.75)),
    ("uncertainty", "gpu-large", "of_copy_bandwidth", (">=", 0.75)),
]
# Latency targets (issue 9), per step: GPU time from CUDA events, host time from issuing 100 steps
# without synchronising. (op, shape, key, bound)
LATENCY_TARGETS = [
    ("linear_fwdbwd", "small-C", "gpu_us", 60.0), ("linear_fwdbwd", "small-C", "host_us", 150.0),
    ("linear_fwdbwd", "gpu-small", "gpu_us", 60.0), ("linear_fwdbwd", "gpu-small", "host_us", 150.0),
    ("mlp_fwdbwd", "gpu-small", "gpu_us", 100.0), ("mlp_fwdbwd", "gpu-small", "host_us", 150.0),
]
# Small steps timed once more with a row mask (latency provider MASKED; bench/RESULTS.md predicts them)
MASKED = "fasthydra-row-mask"
MASKED_LATENCY_CASES = [("linear_fwdbwd", "gpu-small"), ("mlp_fwdbwd", "gpu-small")]
# The same small steps with the temperature a device tensor (an annealed T: the kernels read it from memory,
# op_temperature runs per call); against the plain rows above
TENSOR_T = "fasthydra-tensor-T"
# ... and with it learned (requires grad: the teacher's gradient formed, dL/dT's reduction in the backward); also
# a provider of the large cases below, for its time and peak memory against the default's (variant rows)
LEARNED_T = C.LEARNED_T
# The latency targets' steps with the heads + loss graphed by torch.cuda.make_graphed_callables (partial-network
# capture: one forward and one backward replay a step, the new features and teacher copied into its static inputs),
# the route README's "Host-bound small steps" gives where a step's host time outweighs its GPU time
GRAPHED = "fasthydra-graphed-heads"
LEARNED_T_CASES = [("linear_fwdbwd", "gpu-large"), ("kl_fwdbwd", "gpu-large")]
# torch.compile costs tens of seconds per case on a GPU: only where a target compares against it.
COMPILE_CASES = {("linear_fwdbwd", "gpu-large")}
# The design decision still open at small shapes (issue 9), side by side: the default dispatch
# ("fasthydra": the two-launch small-step kernels where a problem is small, else cuBLAS GEMMs around
# the loss kernel) and the cuBLAS path forced there. (The fused Triton GEMM kernels, timed here on an
# H200 on 2026-11-28 at 1.9x to 11x the cuBLAS path's time, were removed.)
VARIANTS = {"fasthydra/cublas": {"FASTHYDRA_SMALL_STEP": "0"},
            # what impl="auto" gives CUDA tensors where it leaves them to the torch path (GPUs below compute
            # capability 8.0, ROCm, Triton before 3.6), timed here on the H200 as a stand-in
            "fasthydra/torch-path": {"FASTHYDRA_IMPL": "torch"}}
# Tuning knobs: module constants set for the calls inside, (module, name, value), and where each is
# timed: "latency" (the latency rows) or a list of benchmark cases.
KNOBS = {
    # the small-step path's first launch with 32-row programs (half the weight re-reads, half the programs)
    "fasthydra/small-32-rows": {"set": [("fasthydra.ops._common", "SMALL_BLOCK_B", 32)], "cases": "latency"},
    # the small step with both launches in the forward and the stored gradients scaled in the backward (one
    # more launch: the device-side skip at upstream 1) instead of launch 2 in the backward
    "fasthydra/small-grads-in-forward": {"set": [("fasthydra.ops._common", "SMALL_DEFERRED", False)],
                                         "cases": "latency"},
    # fp32 small steps: the default sums the logits tile's and dW's products as outer products in registers
    # (fifty-third session); this times tl.dot's FMA loop, whose operand reads held the shared-memory pipe at 95%
    "fasthydra/small-dot": {"set": [("fasthydra.ops._common", "SMALL_OUTER_FMA", False)], "cases": "latency"},
    # ... and tl.dot for launch 2's dW walk alone (its outer products run 128 short steps at small-C)
    "fasthydra/small-dw-dot": {"set": [("fasthydra.ops._common", "SMALL_OUTER_DW", False)], "cases": "latency"},
    # every launch through Triton's kernel[grid](...) (its binder and specialisation each call) instead of the
    # direct launch of a compiled kernel met before (fasthydra/ops/launch.py, the fifty-fifth session)
    "fasthydra/jit-launch": {"set": [("fasthydra.ops.launch", "FAST_LAUNCH", False)], "cases": "latency"},
    # the cuBLAS path's head groups at gpu-large: 2 heads per group (512 MiB of logits) and 1 (the default)
    "fasthydra/groups-512MiB": {"set": [("fasthydra.ops.linear_hydra_kl", "CUBLAS_GROUP_ELEMENTS", 1 << 28)],
                                "cases": [("linear_fwdbwd", "gpu-large")]},
    # the loss kernel's long-row tiles (one 16-byte slice per thread and tensor): 2048 in 8 warps is
    # the default (the H200 runs of 2026-11-28, before the per-thread statistics); 1024 puts more rows
    # in flight, 4096 and 8192 fewer (the second read from L2: 8192 in 32 warps is one row an SM, 17 MB of
    # rows in flight), now that wide tiles cost no barriers; the two wide ones also at linear gpu-large
    **{f"fasthydra/kl-tile-{w}": {"set": [("fasthydra.ops._common", "MAX_BLOCK_C", w)],
                                  "cases": [("kl_fwdbwd", "gpu-large"), ("mlp_fwdbwd", "gpu-large"),
                                            *([("linear_fwdbwd", "gpu-large")] if w > 2048 else [])]}
       for w in (1024, 4096, 8192)},
    # L2 eviction priorities on the loss kernel's long-row walks (_common.KL_L2_HINTS, off by default): the first
    # walk's loads evict_last, the second walk's loads and dz stores evict_first, so that the rows still to be
    # read again are the last to leave L2 (the sixty-third session; PTX createpolicy, checked in the kernel
    # report); alone at the three long-row cases, and with wider tiles, which keep fewer rows in flight (4096 in
    # 16 warps: 0.94x to 0.97x in runs 3 and 4; 8192 in 32 warps: one program an SM, 17 MB of rows)
    "fasthydra/kl-l2-hints": {"set": [("fasthydra.ops._common", "KL_L2_HINTS", True)],
                              "cases": [("kl_fwdbwd", "gpu-large"), ("mlp_fwdbwd", "gpu-large"),
                                        ("linear_fwdbwd", "gpu-large")]},
    **{f"fasthydra/kl-l2-hints-tile-{w}": {"set": [("fasthydra.ops._common", "KL_L2_HINTS", True),
                                                   ("fasthydra.ops._common", "MAX_BLOCK_C", w)],
                                           "cases": [("kl_fwdbwd", "gpu-large")]}
       for w in (4096, 8192)},
    # heads with a bias, long rows: the default is the one-kernel loss pass, then a column sum that reads dz
    # again; the alternative forms dz and db in the loss pass's second launch (SPLIT_BIAS_PASS; the default
    # until the H200 run of 2026-12-04, where it took 1.22x the one-kernel pass's time at MLP gpu-large)
    "fasthydra/bias-split-pass": {"set": [("fasthydra.ops._common", "SPLIT_BIAS_PASS", True)],
                                  "cases": [("linear_fwdbwd", "gpu-large"), ("mlp_fwdbwd", "gpu-large"),
                                            ("linear_fwdbwd", "large-C")]},
    # both together at linear gpu-large: run 3 (2026-12-04) timed 21.87 ms (0.985x today's default) in 557 MiB
    # (7.7% of eager's peak; 2 heads a group with the one-kernel pass took 673 MiB, past the 8% target)
    "fasthydra/groups-512MiB-split": {"set": [("fasthydra.ops.linear_hydra_kl", "CUBLAS_GROUP_ELEMENTS", 1 << 28),
                                              ("fasthydra.ops._common", "SPLIT_BIAS_PASS", True)],
                                      "cases": [("linear_fwdbwd", "gpu-large")]},
    # rows of 50257 classes (no 16-byte load aligned): spread per-thread slices are the default since the
    # fifty-second session (sm_90 SASS: the loss kernel's pass 1 242 instructions a tile, 639 and 120 shuffles in
    # the contiguous slices, one class a lane); this times the contiguous slices
    "fasthydra/no-spread": {"set": [("fasthydra.ops._common", "SPREAD_SLICES", False)],
                            "cases": [("kl_fwdbwd", "gpt2-vocab"), ("uncertainty", "gpt2-vocab")]},
    "fasthydra/dx-add": {"set": [("fasthydra.ops._common", "FP32_OUT_GEMM", False)],
                         "cases": [("linear_fwdbwd", "gpu-large")]},
    # the loss on logits with a frozen teacher: the default forms dz in the forward (long rows read twice
    # there, the second read partly from L2) and the backward hands it over, untouched at upstream 1;
    # "deferred" forms it in the backward (one read of z and t in each pass; the default until 2026-12-04,
    # 1.10x the stored form's time at gpu-large bf16 and 1.31x at large-C fp32 on the H200)
    "fasthydra/kl-deferred": {"set": [("fasthydra.ops._common", "DEFER_KL_GRAD", True)],
                              "cases": [("kl_fwdbwd", "gpu-large"), ("kl_fwdbwd", "large-C")]},
    # uncertainty's long-row tiles (4 warps at gpu-large): 8192 elements is the default; 16384 took 0.91x its time
    # on 2026-12-04 but spills in its loops (kernel report); 4096 took 1.41x, 16 and 32 warps a program 4x and 7x
    "fasthydra/unc-tile-16384": {"set": [("fasthydra.ops._common", "UNCERTAINTY_LONG_TILE", 16384)],
                                 "cases": [("uncertainty", "gpu-large")]},
    # ... and in 8 warps at 4096 rows (FILL_WARPS: as many elements a thread as 8192 in 4, so no spills expected)
    "fasthydra/unc-tile-16384-8-warps": {"set": [("fasthydra.ops._common", "UNCERTAINTY_LONG_TILE", 16384),
                                                 ("fasthydra.ops._common", "FILL_WARPS", 4096 * 8)],
                                         "cases": [("uncertainty", "gpu-large")]},
    # `uncertainty`'s long rows in two launches (_common.UNCERTAINTY_SPLIT, the sixty-third session): each (batch,
    # head) row's statistics, then the mixture by (row, class block) programs; the one-kernel form's programs each
    # walk a whole (M, C) row twice (1.59 ms at gpu-large in run 4, about 0.46 of copy speed)
    "fasthydra/unc-split": {"set": [("fasthydra.ops._common", "UNCERTAINTY_SPLIT", True)],
                            "cases": [("uncertainty", "gpu-large"), ("uncertainty", "large-C")]},
}
# Mid-size cases whose eager steps run host-bound on the device machine's CPU: their GPU time alone
# (CUDA-graph replay) beside the wall time, fasthydra only, to tell the GPU work from the host's.
GRAPH_CASES = [("linear_fwdbwd", "mid"), ("linear_fwdbwd", "large-C"), ("linear_fwdbwd", "large-C-tf32"),
               ("mlp_fwdbwd", "mid")]
# profiled once (kernels by device time per step) before the cases run; a third element: a KNOBS provider
# whose settings the profile runs under (the split bias pass's kernels against the default's)
PROFILE_CASES = [("linear_fwdbwd", "gpu-large"), ("mlp_fwdbwd", "gpu-large"), ("kl_fwdbwd", "gpu-large"),
                 ("linear_fwdbwd", "gpu-small"), ("linear_fwdbwd", "small-C"),
                 ("linear_fwdbwd", "small-C", "fasthydra/small-dot"),
                 ("mlp_fwdbwd", "gpu-large", "fasthydra/bias-split-pass")]
# host time per step under cProfile (functions by own time): the small step, and a host-bound GEMM case on the cuBLAS
# path (its GEMMs' host calls, cuBLASLt's bias epilogue among them, beside the Python around them)
HOST_PROFILE_CASES = [("linear_fwdbwd", "gpu-small"), ("linear_fwdbwd", "mid")]
SMALL_CASES = [("linear_fwdbwd", "small-C"), ("linear_fwdbwd", "gpu-small"), ("mlp_fwdbwd", "gpu-small"),
               ("linear_fwd", "small-C")]
# Cases run early (after the targets' own): the variants' and knobs' cases
VARIANT_CASES = list(dict.fromkeys([*SMALL_CASES, *(case for knob in KNOBS.values() if knob["cases"] != "latency"
                                                    for case in knob["cases"])]))


def variants_for(op: str, shape: str) -> list[str]:
    """The extra providers a case runs: the cuBLAS path forced at the small shapes (where the default is
    the small-step path), and the knobs timed at that case."""
    knobs = [name for name, knob in KNOBS.items() if knob["cases"] != "latency" and (op, shape) in knob["cases"]]
    return (list(VARIANTS) if (op, shape) in SMALL_CASES else []) + knobs


def latency_sets(keys) -> list[tuple[str, str, tuple[str, ...]]]:
    """(op, shape, providers) of the latency rows, for the cases in `keys` ((op, shape) pairs; the target
    cases always): the targets' small steps with eager, the variants, the latency knobs and the heads graphed
    (GRAPHED); the host-bound mid-size cases' GPU time; the small steps again with a row mask and with T a device
    tensor, fixed or learned (against the plain rows)."""
    sets = [(op, shape, ("fasthydra", "eager", *VARIANTS, *(k for k, v in KNOBS.items() if v["cases"] == "latency"),
                         GRAPHED))
            for op, shape in dict.fromkeys((op, shape) for op, shape, _, _ in LATENCY_TARGETS)]
    sets += [(op, shape, ("fasthydra",)) for op, shape in GRAPH_CASES if (op, shape) in keys]
    sets += [(op, shape, (MASKED, TENSOR_T, LEARNED_T)) for op, shape in MASKED_LATENCY_CASES if (op, shape) in keys]
    return sets


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, counted as read + write: the floor of the memory-bound ops."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = _do_bench(lambda: dst.copy_(src))
    src = dst = None  # noqa: F841 (the 2 GiB go back before the cases run)
    torch.cuda.empty_cache()
    return 2 * 2**30 / seconds


# Seconds of CUDA-graph replays (or of large matrix products) that bring the SM clock up before a
# small step's GPU time or a kernel profile is taken.
WARM_S = 0.3


def sm_clock() -> int | None:
    """The SM clock now, in MHz (NVML through torch; None where it cannot be read)."""
    try:
        return int(torch.cuda.clock_rate())
    except Exception:
        return None


def warm_clocks(seconds: float = WARM_S) -> None:
    """Keeps the GPU busy with large bf16 matrix products for `seconds`, so that what is timed next runs at
    the clock a busy GPU runs at, not at the idle one."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


class _HeadsLoss(torch.nn.Module):
    """head.distill_loss(features, teacher, T) as a module of its own: what make_graphed_callables graphs."""

    def __init__(self, head, temperature):
        super().__init__()
        self.head, self.temperature = head, temperature

    def forward(self, features, teacher):
        return self.head.distill_loss(features, teacher, self.temperature)


def latency(case: C.Case, provider: str, steps: int = 200, masked: bool = False, tensor_t: bool = False,
            learned_t: bool = False, graphed: bool = False) -> dict:
    """GPU and host time per step (small shapes, and the host-bound GRAPH_CASES): CUDA events around
    `steps` steps issued without any synchronisation, the wall time of issuing them (the host cost the
    GPU waits on if larger), and CUDA-graph replay (the GPU work alone), timed after WARM_S of replays
    (an idle H200 sits at 345 MHz and a host-bound loop keeps it mostly idle: without the warm-up a
    graph of tens of microseconds is timed at whatever clock the last idle spell left), with the SM
    clock read right after; replay_host_us: the wall time of issuing those replays (a whole step captured, as
    torch.cuda.graphs' whole-network capture runs it). masked: fasthydra's step with a row mask keeping 3 rows
    of 4 (padding); tensor_t: with the temperature a one-element tensor on the device; learned_t: that tensor
    requiring grad; graphed: the heads + loss graphed by torch.cuda.make_graphed_callables (GRAPHED; no
    whole-step graph of it is taken: gpu_us None, stream_us its GPU time)."""
    C.case_settings(case)  # TF32 for the "-tf32" cases, as their timed rows run
    inputs = C.make_inputs(case)
    head = inputs.head
    x, t, _ = inputs.next()
    keep = (torch.arange(x.shape[0], device=x.device) % 4 != 0) if masked else None
    temperature = torch.tensor(C.TEMPERATURE, device=x.device, requires_grad=learned_t) if tensor_t or learned_t \
        else C.TEMPERATURE
    params = list(head.parameters()) + ([temperature] if learned_t else [])
    if provider == "fasthydra" and graphed:
        # static inputs of their own, so that each call copies the step's features and teacher in, as a training
        # loop's new batch would be
        sample = (x.detach().clone().requires_grad_(x.requires_grad), t.clone())
        heads_loss = torch.cuda.make_graphed_callables(_HeadsLoss(head, temperature), sample)
        from fasthydra.ops.checks import raise_pending_errors

        def loss_fn():  # (with the README recipe's reading of the error word, once a step, never waiting)
            raise_pending_errors(sync=False)
            return heads_loss(x, t)
    elif provider == "fasthydra":
        def loss_fn():
            return head.distill_loss(x, t, temperature, row_mask=keep)
    else:
        def loss_fn():
            return C._eager_loss(head, x, t)

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        loss_fn().backward()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    host = (time.perf_counter() - t0) / steps
    end.record()
    torch.cuda.synchronize()
    wall_gpu = start.elapsed_time(end) / 1e3 / steps  # includes idle gaps when the host is slower
    # GPU time alone: the same steps captured in a CUDA graph where they can be (no host in the way)
    gpu = replay_host = None
    if not graphed:
        try:
            gpu, replay_host = _replayed(loss_fn, params, steps, start, end)
        except Exception as exc:  # the table says it could not be captured
            print(f"  graph capture failed for {case.key} {provider}: {type(exc).__name__}: {exc}"[:300])
    return {"op": case.op, "shape": case.name, "provider": provider, "host_us": host * 1e6,
            "stream_us": wall_gpu * 1e6, "gpu_us": None if gpu is None else gpu * 1e6,
            "replay_host_us": None if replay_host is None else replay_host * 1e6, "sm_mhz": sm_clock()}


def _replayed(loss_fn, params, steps: int, start, end) -> tuple[float, float]:
    """A step (loss_fn() backward, the parameters' gradients unset first) captured in a CUDA graph after a warm-up
    step on a side stream, replayed for WARM_S, then `steps` replays timed: (GPU seconds, host seconds) a replay."""
    def step():
        for p in params:
            p.grad = None
        loss_fn().backward()

    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        step()
    warm_until = time.perf_counter() + WARM_S
    while time.perf_counter() < warm_until:
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
    start.record()
    t1 = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    replay_host = (time.perf_counter() - t1) / steps
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / steps, replay_host


def topk_rows(copy_bps: float, b: int = 4096, m: int = 8, c: int = 32000, ks=(32, 128)) -> list[dict]:
    """The loss on given logits, forward + backward, bf16, dense teacher vs top-k teachers: time and the
    bytes each must move (z read, dz write, and the teacher: M*C*2 or M*k*(2 + 4) bytes per row)."""
    from fasthydra import TopKTeacher, hydra_kl_loss

    gen = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(b, m, c, device="cuda", generator=gen) * 3).bfloat16().requires_grad_()
    dense = (torch.randn(b, m, c, device="cuda", generator=gen) * 3).bfloat16()
    teachers = [("dense", dense, b * m * c * 2)]
    for k in ks:
        values, indices = dense.float().topk(k, dim=-1)
        teachers.append((f"top-{k}", TopKTeacher(values.bfloat16(), indices.int()), b * m * k * 6))
    rows = []
    for name, teacher, teacher_bytes in teachers:
        def step(teacher=teacher):
            z.grad = None
            hydra_kl_loss(z, teacher, 2.0).backward()

        seconds = _do_bench(step)
        moved = 2 * b * m * c * 2 + teacher_bytes
        rows.append({"teacher": name, "seconds": seconds, "teacher_bytes": teacher_bytes,
                     "bytes_moved": moved, "of_copy_bandwidth": moved / seconds / copy_bps})
    return rows


def masked_rows(b: int = 4096, d: int = 2048, m: int = 8, c: int = 32000, kept: float = 0.75,
                device: str = "cuda") -> list[dict]:
    """Linear heads + loss, forward + backward, bf16 at gpu-large, without and with a row mask keeping `kept`
    of the rows (padding): what the mask costs (the cuBLAS path: x's rows left out zeroed, one (B, D) pass; the
    loss pass, both of its launches with a bias at long rows, reads the mask and writes loss 0 and dz 0 there,
    folds "mean" over the kept rows into dz, so the backward rescales nothing, and forms db as unmasked). Then
    hydra_kl_loss on (B, M, C) logits, dense (frozen: the gradient formed in the backward) and top-32 teachers,
    without and with the mask (the loss kernels read it; before the twenty-second session eight torch ops
    masked and reduced the rows after the kernel, and a top-k teacher's stored gradient took one more pass)."""
    from fasthydra import HydraHead, TopKTeacher, hydra_kl_loss

    gen = torch.Generator(device=device).manual_seed(0)
    head = HydraHead(d, c, m, device=device, dtype=torch.bfloat16)
    x = torch.randn(b, d, device=device, generator=gen).bfloat16().requires_grad_()
    t = (torch.randn(b, m, c, device=device, generator=gen) * 3).bfloat16()
    z = (torch.randn(b, m, c, device=device, generator=gen) * 3).bfloat16().requires_grad_()
    keep = torch.rand(b, device=device, generator=gen) < kept
    values, indices = t.float().topk(min(32, c), dim=-1)
    topk = TopKTeacher(values.bfloat16(), indices.int())

    def heads_step(mask):
        x.grad = None
        head.zero_grad(set_to_none=True)
        head.distill_loss(x, t, 2.0, row_mask=mask).backward()

    def logits_step(mask, teacher):
        z.grad = None
        hydra_kl_loss(z, teacher, 2.0, row_mask=mask).backward()

    rows = []
    for op, step in (("linear heads", heads_step), ("loss on logits, dense", lambda mk: logits_step(mk, t)),
                     ("loss on logits, top-32", lambda mk: logits_step(mk, topk))):
        first = len(rows)
        for name, mask in (("none", None), (f"{kept:.0%} of rows kept", keep)):
            rows.append({"op": op, "mask": name, "seconds": _do_bench(lambda mask=mask: step(mask))})
        for r in rows[first:]:
            r["vs_no_mask"] = r["seconds"] / rows[first]["seconds"]
    return rows


def timeline_row(intervals, steps: int, wall_s: float, top: int = 4) -> dict:
    """The profiled steps' GPU timeline in one profile row: how long the GPU was busy (the union of every
    kernel's, copy's and fill's interval: (start us, end us, name)), how long it sat idle between the first
    and the last of them, the steps' wall time (each step ends in a synchronize, as the timed ones do), all
    per step, and the `top` longest idle gaps with what ran before and after each. This tells a step's
    time over the sum of its kernels apart: GPU idle (the host, a sync or an allocation held it up) or kernels
    that run slower than when profiled (clocks). Its "kernel" is "(timeline)", which no kernel pattern of
    bench/predictions.json matches, and its "ms_per_step" is 0, as the SM clock's row (a sum over every row
    counts the kernels once)."""
    spans = sorted(intervals)
    busy = 0.0
    gaps = []
    if spans:
        start, end, last = spans[0]
        for s, e, name in spans[1:]:
            if s > end:
                busy += end - start
                gaps.append({"ms": (s - end) / 1e3, "after": last[:60], "before": name[:60]})
                start, end, last = s, e, name
            elif e > end:
                end, last = e, name
        busy += end - start
    idle = sum(g["ms"] for g in gaps)
    gaps.sort(key=lambda g: -g["ms"])
    return {"kernel": "(timeline)", "ms_per_step": 0.0, "calls_per_step": 0.0,
            "busy_ms_per_step": busy / 1e3 / steps, "idle_ms_per_step": idle / steps,
            "gaps_per_step": len(gaps) / steps, "wall_ms_per_step": wall_s * 1e3 / steps,
            "longest_gaps": gaps[:top]}


def profiled_intervals(prof, device_type) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every event a torch.profiler run recorded on `device_type`, less the device-side
    copies of user annotations (record_function ranges, which span other events: no work of their own)."""
    return [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
            if e.device_type == device_type and not getattr(e, "is_user_annotation", False)]


def _profile_line(r: dict) -> str:
    if r.get("kernel") != "(timeline)":
        return f"{r['ms_per_step']:8.3f} ms {r['calls_per_step']:5.1f}x {r['kernel']}"
    gaps = "; ".join(f"{g['ms']:.3f} ms after {g['after'][:30]}" for g in r["longest_gaps"][:2])
    return (f"timeline per step: GPU busy {r['busy_ms_per_step']:.3f} ms, idle {r['idle_ms_per_step']:.3f} ms in "
            f"{r['gaps_per_step']:.0f} gaps, wall {r['wall_ms_per_step']:.3f} ms"
            + (f"; longest: {gaps}" if gaps else ""))


def profile_step(case: C.Case, provider: str = "fasthydra", steps: int = 3, top: int = 12) -> list[dict]:
    """Where a step's GPU time goes: the kernels of `steps` steps under torch.profiler, the `top` ones
    by device time, per step (what a missed target's note needs), then the steps' timeline (timeline_row)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    inputs = C.make_inputs(case)
    step = C.make_callable(case, provider, inputs)
    for _ in range(3):
        step()
    warm_clocks()  # (small steps leave the GPU mostly idle, at a low clock)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()  # (each ends in a synchronize)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    rows = []
    for ev in prof.key_averages():
        device_us = getattr(ev, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(ev, "self_cuda_time_total", 0.0)
        if device_us > 0:
            rows.append({"kernel": ev.key[:90], "ms_per_step": device_us / 1e3 / steps,
                         "calls_per_step": ev.count / steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    try:
        timeline = [timeline_row(profiled_intervals(prof, DeviceType.CUDA), steps, wall)]
    except Exception as exc:  # (diagnostics only: the kernels' rows stand without it)
        timeline = [{"kernel": "(timeline)", "error": f"{type(exc).__name__}: {exc}"[:200]}]
    return rows[:top] + [{"kernel": f"(the SM clock after these steps: {sm_clock()} MHz)", "ms_per_step": 0.0,
                          "calls_per_step": 0.0}] + timeline


def host_profile(case: C.Case, steps: int = 200, top: int = 15) -> list[dict]:
    """Where a small step's host time goes: cProfile over `steps` steps issued without synchronising,
    the `top` functions by own time (microseconds per step)."""
    import cProfile
    import pstats

    inputs = C.make_inputs(case)
    step = C.make_callable(case, "fasthydra", inputs)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats
    rows = [{"function": f"{os.path.basename(f)}:{line} {name}"[:90], "own_us_per_step": tt / steps * 1e6,
             "cum_us_per_step": ct / steps * 1e6, "calls_per_step": nc / steps}
            for (f, line, name), (_, nc, tt, ct, _) in stats.items()]
    rows.sort(key=lambda r: -r["own_us_per_step"])
    return rows[:top]


# The small step whose host time host_breakdown takes apart, and the host_overhead.py cases timed beside it
BREAKDOWN_CASE = ("linear_fwdbwd", "gpu-small")
BREAKDOWN_PYTHON_CASES = {"python_step_us": "linear heads fwd+bwd", "python_autograd_floor_us": "autograd floor"}
# host_breakdown's pieces (us per call); the last two only on CUDA
BREAKDOWN_KEYS = ("launch1_us", "launch2_us", "launch1_jit_us", "launch2_jit_us", "bare_launch_us",
                  "bare_launch_30_args_us", "bare_launch_30_args_direct_us", "autograd_floor_us",
                  *BREAKDOWN_PYTHON_CASES, "capturing_query_us", "event_query_us")


def _per_call_us(fn, calls: int) -> float:
    """Microseconds per call of fn, issued back to back (nothing synchronised), after a short warm-up."""
    for _ in range(max(10, calls // 10)):
        fn()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) / calls * 1e6


def _bare_kernels():
    """Two Triton kernels that do nothing: one pointer argument; and launch 1's argument list in kind (13
    pointers, 12 integers, 5 floats), what Triton's launch path costs before any work."""
    import triton

    @triton.jit
    def one_argument(p0):
        pass

    @triton.jit
    def launch_1_arguments(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, i0, i1, i2, i3, i4, i5, i6, i7,
                           i8, i9, i10, i11, f0, f1, f2, f3, f4):
        pass

    return one_argument, launch_1_arguments


def host_breakdown(case: C.Case, calls: int = 300, python_steps: int = 300) -> dict:
    """What a small step's host time (the latency rows' host_us: forward + backward of distill_loss on the
    small-step path, issued without synchronising) is made of on this host, each piece timed alone, us per call:
    - ``launch1_us``: the forward's launch 1 (``small_heads_forward``: its four allocations, the launch, the
      error word's bookkeeping), no autograd around it; ``launch2_us``: the backward's launch 2
      (``launch_small_grads``, the gradients' allocations); both by the direct path of fasthydra.ops.launch (the
      default), and ``launch1_jit_us`` / ``launch2_jit_us`` through Triton's ``kernel[grid](...)`` instead;
    - ``bare_launch_us`` / ``bare_launch_30_args_us``: a Triton kernel that does nothing, with one argument and
      with launch 1's count (Triton's launch path and the driver's launch alone); ``bare_launch_30_args_direct_us``
      the second one by fasthydra's direct path;
    - ``autograd_floor_us``: an autograd.Function on the case's parameters that does nothing (as
      bench/host_overhead.py's floor), forward + backward on the device;
    - ``capturing_query_us``, ``event_query_us``: the two CUDA queries of the error word's bookkeeping;
    - ``python_step_us``, ``python_autograd_floor_us``: bench/host_overhead.py's stubbed mode on this host's
      CPU (the same step on CPU tensors with every launch a no-op: this project's Python and autograd's), in a
      child process.
    The step's own host time minus the pieces is what none of them explains (autograd's hand-over to the device's
    thread, the allocator on the device)."""
    from fasthydra.ops import _common, checks
    from fasthydra.ops import small_heads as S
    from fasthydra.ops.launch import launch

    device = case.device
    inputs = C.make_inputs(case)
    head = inputs.head
    x, t = inputs.x[0].detach(), inputs.t[0]
    weight, bias = head.weight.detach(), head.bias.detach()
    m, c, k = weight.shape
    cfg = _common.small_heads_config(case.B, m, c, k, x.element_size())
    if cfg is None:
        raise ValueError(f"host_breakdown: {case.key} does not take the small step")
    one = torch.ones((), device=device)
    stash = S.small_heads_forward(x, weight, bias, t, C.TEMPERATURE, "mean", True, True, cfg)[1]
    out = {"case": case.key}
    for suffix, direct in (("", True), ("_jit", False)):
        with C.settings({}, [("fasthydra.ops.launch", "FAST_LAUNCH", direct)]):
            out[f"launch1{suffix}_us"] = _per_call_us(
                lambda: S.small_heads_forward(x, weight, bias, t, C.TEMPERATURE, "mean", True, True, cfg), calls)
            out[f"launch2{suffix}_us"] = _per_call_us(
                lambda: S.launch_small_grads(x, weight, bias, stash, cfg, True, False, True, True, upstream=one),
                calls)
    bare, many = _bare_kernels()  # (on CPU tensors they run under the interpreter: the tests' tier)
    ptrs = [one] * 13
    many_args = (*ptrs, *range(1, 13), 0.5, 0.25, 1.5, 2.0, 3.0)
    out["bare_launch_us"] = _per_call_us(lambda: bare[(1,)](one), calls)
    out["bare_launch_30_args_us"] = _per_call_us(lambda: many[(1,)](*many_args), calls)
    out["bare_launch_30_args_direct_us"] = _per_call_us(lambda: launch(many, (1,), *many_args), calls)
    if device == "cuda":
        out["capturing_query_us"] = _per_call_us(torch.cuda.is_current_stream_capturing, calls)
        event = checks._flags_of(torch.device(device)).event
        out["event_query_us"] = _per_call_us(event.query, calls)

    params = [head.weight, head.bias]

    def floor_step():
        for p in params:
            p.grad = None
        C.AutogradFloor.apply(x, head.weight, head.bias).backward()

    out["autograd_floor_us"] = _per_call_us(floor_step, calls)
    if device == "cuda":
        torch.cuda.synchronize()
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "host_overhead.py")
    names = [a for name in BREAKDOWN_PYTHON_CASES.values() for a in ("--case", name)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, "--child", "stubbed", "--steps", str(python_steps), *names],
                          capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode != 0:
        out["python_error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return out
    timed = dict(line.split("\t")[:2] for line in proc.stdout.splitlines() if line.count("\t") == 2)
    for key, name in BREAKDOWN_PYTHON_CASES.items():
        if name in timed:
            out[key] = float(timed[name])
    return out


def host_facts(device: str = "cuda", calls: int = 2000) -> dict:
    """The host that drives the device: CPU model and count, and what one small torch call costs there
    (microseconds per call: an allocation and a 16-element add, on the CPU and, issued without waiting,
    on the device). Host-time rows read against these: run 2's host took about 50 us per small eager op
    where the development machine takes a few."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass

    def per_call_us(fn) -> float:
        for _ in range(100):
            fn()
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - begin) / calls * 1e6

    facts = {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version()}
    for dev in ("cpu", "cuda") if device == "cuda" else ("cpu",):
        a = torch.ones(16, device=dev)
        facts[f"{dev}_empty_us"] = per_call_us(lambda: torch.empty(16, device=dev))
        facts[f"{dev}_add_us"] = per_call_us(lambda: a + a)
        if dev == "cuda":
            torch.cuda.synchronize()
    return facts


# ----------------------------------------------------------------------------------------------
# What the clocks did, and hardware counters of the small and memory-bound kernels (where ncu works)
# ----------------------------------------------------------------------------------------------

CLOCK_QUERY = "clocks.sm,clocks.mem,power.draw,utilization.gpu"


class ClockSampler:
    """nvidia-smi reading the SM and memory clocks, power and load every 100 ms while a phase runs (a small
    kernel that takes four times what its instructions explain may simply run at a low clock). Summary in
    .summary after the block; None where nvidia-smi is absent or says nothing."""

    def __init__(self):
        self.proc, self.summary = None, None

    def __enter__(self):
        exe = shutil.which("nvidia-smi")
        if exe:
            try:
                self.proc = subprocess.Popen([exe, f"--query-gpu={CLOCK_QUERY}", "--format=csv,noheader,nounits",
                                              "-lms", "100", "-i", "0"], stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, text=True)
            except OSError:
                self.proc = None
        return self

    def __exit__(self, *exc):
        if self.proc is None:
            return False
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.summary = summarize_clock_samples(out.splitlines())
        return False


def summarize_clock_samples(lines) -> dict | None:
    """{"samples", "sm_mhz": [min, median, max], "mem_mhz": median, "power_w": [median, max], "util_pct":
    median} from nvidia-smi's CSV lines (fields that read "[N/A]" or do not parse are skipped)."""
    cols = {"sm": [], "mem": [], "power": [], "util": []}
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        for key, text in zip(cols, parts):
            try:
                cols[key].append(float(text))
            except ValueError:
                pass
    if not cols["sm"]:
        return None

    def med(v):
        return statistics.median(v) if v else None

    return {"samples": len(cols["sm"]), "sm_mhz": [min(cols["sm"]), med(cols["sm"]), max(cols["sm"])],
            "mem_mhz": med(cols["mem"]), "power_w": [med(cols["power"]), max(cols["power"], default=None)],
            "util_pct": med(cols["util"])}


# One step of each case profiled by Nsight Compute (clocks left alone), our kernels only: where the small
# steps' GPU time goes (issue rate, stalls, occupancy, the clock they ran at) and what the loss kernels
# reach of DRAM bandwidth and L2 hits. ncu needs a runtime that exposes the counters (on gVisor it
# fails at once: the record says so).
# (op, shape[, knob]): the MLP heads' loss pass at gpu-large too, how near DRAM bandwidth it runs; the loss pass
# with L2 eviction priorities, how many of its second reads L2 then serves.
NCU_CASES = [("linear_fwdbwd", "small-C"), ("linear_fwdbwd", "gpu-small"), ("kl_fwdbwd", "gpu-large"),
             ("mlp_fwdbwd", "gpu-large"), ("kl_fwdbwd", "gpu-large", "fasthydra/kl-l2-hints")]
NCU_KERNELS = "regex:_small_heads|_hydra_kl|_scale_unless"
NCU_SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "WarpStateStats", "SchedulerStats",
                "ComputeWorkloadAnalysis", "InstructionStats", "MemoryWorkloadAnalysis")
# printed per kernel (all metrics go to the JSON)
NCU_SHOWN = ("Duration", "SM Frequency", "Compute (SM) Throughput", "DRAM Throughput", "L2 Hit Rate",
             "Achieved Occupancy", "Registers Per Thread", "Executed Ipc Active", "Warp Cycles Per Issued Instruction",
             "No Eligible", "Executed Instructions")


def _ncu_path() -> str | None:
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda*/bin/ncu"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def ncu_child(spec: str) -> int:
    """Inside ncu (--profile-from-start off): warm each case up, then one step between cudaProfilerStart
    and Stop, so that only that step's kernels are profiled."""
    by_key = {(c.op, c.name): c for c in C.cases("cuda")}
    for item in spec.split(","):
        op, shape, *knob = item.split(":")
        case = by_key[(op, shape)]
        with with_variant(knob[0] if knob else "fasthydra"):
            step = C.make_callable(case, "fasthydra", C.make_inputs(case))
            for _ in range(3):
                step()
            warm_clocks()
            torch.cuda.profiler.start()
            step()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
    return 0


def ncu_profile(cases, timeout: float, workdir: str) -> dict:
    """Runs ncu over one step of each case (ncu_child in a subprocess) and reads its report back as rows:
    {"kernels": [{"case", "kernel", "grid", "block", "metrics": {name: "value unit"}}], "seconds"} or
    {"error": ...}."""
    exe = _ncu_path()
    if exe is None:
        return {"error": "ncu not found"}
    if timeout < 20:
        return {"error": f"no time left for ncu ({timeout:.0f} s)"}
    start = time.perf_counter()
    report = os.path.join(workdir, "gpu_check_ncu")
    spec = ",".join(":".join(case) for case in cases)
    cmd = [exe, "--clock-control", "none", "--profile-from-start", "off", "--target-processes", "all",
           "-k", NCU_KERNELS, "-f", "-o", report, *[a for s in NCU_SECTIONS for a in ("--section", s)],
           sys.executable, os.path.abspath(__file__), "--ncu-child", spec]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"ncu timed out after {timeout:.0f} s", "seconds": time.perf_counter() - start}
    if run.returncode != 0 or not os.path.exists(report + ".ncu-rep"):
        tail = (run.stdout + run.stderr).strip().splitlines()[-4:]
        return {"error": f"ncu exit {run.returncode}: " + " | ".join(tail)[:400],
                "seconds": time.perf_counter() - start}
    csv_text = subprocess.run([exe, "--import", report + ".ncu-rep", "--csv", "--page", "details"],
                              capture_output=True, text=True, timeout=60).stdout
    return {"cases": [" ".join(case) for case in cases], "kernels": parse_ncu_details(csv_text),
            "seconds": time.perf_counter() - start}


def print_ncu(result: dict) -> None:
    if "error" in result or "skipped" in result:
        print(f"ncu: {result.get('error') or 'skipped (' + result['skipped'] + ')'}", flush=True)
        return
    print(f"ncu ({', '.join(result['cases'])}; {result['seconds']:.0f} s), one step each:", flush=True)
    for k in result["kernels"]:
        shown = "; ".join(f"{name} {k['metrics'][name]}" for name in NCU_SHOWN if name in k["metrics"])
        print(f"  {k['kernel'][:34]:34} grid {k['grid']} block {k['block']}: {shown}", flush=True)


def parse_ncu_details(csv_text: str) -> list[dict]:
    """ncu's `--page details --csv` rows (one per metric) grouped per profiled kernel launch, in launch
    order (the cases' steps ran one after another; grid sizes tell their kernels apart)."""
    start = csv_text.find('"ID"')
    rows = csv.DictReader(io.StringIO(csv_text[start:] if start >= 0 else csv_text))
    kernels: dict[str, dict] = {}
    for r in rows:
        if not r.get("ID") or not r.get("Metric Name"):
            continue
        k = kernels.setdefault(r["ID"], {"kernel": (r.get("Kernel Name") or "")[:80], "grid": r.get("Grid Size"),
                                         "block": r.get("Block Size"), "metrics": {}})
        unit = (r.get("Metric Unit") or "").strip()
        k["metrics"][r["Metric Name"]] = f"{r.get('Metric Value', '')} {unit}".strip()
    return [kernels[i] for i in sorted(kernels, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else v))]


def with_variant(provider: str):
    """Context: the environment settings of a VARIANTS provider (read at every call) or the constants
    of a KNOBS one for the calls inside; nothing for plain "fasthydra"."""
    return C.settings(VARIANTS.get(provider, {}), KNOBS.get(provider, {}).get("set", []))


# pytest processes the gpu tier runs in, side by side: it is bound by Triton's compiles on the host's CPUs (16 on
# the lent machine; at 82867bd one process ran 76 tests in 80 s; the tier has 344 now: about 90 s at that rate).
GPU_TEST_WORKERS = 4
# The gpu tests the issues' acceptance names, run first (in this order, dealt over the processes) so that a tier
# cut short at its deadline has run them: no host sync in a step, CUDA-graph capture, reduce-overhead compile,
# every heads path and the kernels against float64 (odd shapes, M = 1, C = 50257), the deferred teacher error,
# the same bits again and with poisoned allocations (tests/test_determinism.py).
FIRST_GPU_TESTS = ("test_training_step_issues_no_host_sync", "test_training_step_replays_in_a_cuda_graph",
                   "test_reduce_overhead_compile_runs_a_training_step", "test_heads_paths_tolerance_rule",
                   "test_fused_heads_tolerance_rule", "test_logits_kernel_tolerance_rule",
                   "test_uncertainty_tolerance_rule", "test_bad_teacher_on_cuda_is_reported_by_a_later_call",
                   "test_every_op_gives_the_same_bits_again_and_with_poisoned_allocations")


def first_tests_first(ids: list[str], first=FIRST_GPU_TESTS) -> list[str]:
    """Test ids with those of the functions named in `first` ahead, in its order; the rest as collected."""
    def rank(test_id):
        name = test_id.split("::")[-1].split("[")[0]
        return first.index(name) if name in first else len(first)

    return sorted(ids, key=rank)  # stable: collection order within a rank


def run_gpu_tests(timeout: float, workers: int = GPU_TEST_WORKERS, marker: str = "gpu", tests: str = "tests",
                  root: str | None = None, log_path: str | None = None) -> dict:
    """The gpu tier (pytest -m marker over `tests`, under `root`) in `workers` pytest processes side by side: one
    collection pass, then its tests dealt out in turn. Each process runs verbose into a file, so that a run cut
    short by the timeout (counted from the start, collection included) still says which tests passed and failed
    before it (parsed from the partial output). One process where collection fails or workers is 1. The
    processes' whole output (tracebacks: the reason a test failed) goes to log_path where one is given."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    start = time.perf_counter()
    base = [sys.executable, "-m", "pytest", "-m", marker, "-p", "no:cacheprovider"]
    ids = []
    if workers > 1:
        try:
            listed = subprocess.run(base + ["--collect-only", "-q", tests], cwd=root, env=env, capture_output=True,
                                    text=True, timeout=timeout)
            ids = [ln.strip() for ln in listed.stdout.splitlines() if "::" in ln and listed.returncode == 0]
        except subprocess.TimeoutExpired:
            pass
    ids = first_tests_first(ids)
    groups = [g for g in (ids[i::workers] for i in range(workers)) if g] if ids else [[tests]]
    parts = []
    with tempfile.TemporaryDirectory() as logs:
        running = []
        for i, group in enumerate(groups):
            log = open(os.path.join(logs, f"{i}.txt"), "w+")
            running.append((subprocess.Popen(base + ["-v", *group], cwd=root, env=env, stdout=log,
                                             stderr=subprocess.STDOUT, text=True), log))
        for proc, log in running:
            try:
                returncode = proc.wait(timeout=max(0.0, timeout - (time.perf_counter() - start)))
                tail = None
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                returncode, tail = None, f"timed out after {timeout:.0f}s"
            log.seek(0)
            stdout = log.read()
            log.close()
            if log_path:
                with open(log_path, "a") as whole:
                    whole.write(stdout)
            lines = stdout.strip().splitlines()
            tail = tail or (lines[-1] if lines else "no output")
            parts.append(summarize_test_output(stdout, returncode, tail, time.perf_counter() - start))
    return merge_test_summaries(parts, time.perf_counter() - start)


def merge_test_summaries(parts: list[dict], seconds: float) -> dict:
    """One summary of the gpu tier's processes: counts added, failures in order (the first 20), the return code
    None where any process was cut short, else the largest."""
    if len(parts) == 1:
        return parts[0]
    passed = sum(p["passed"] for p in parts)
    failed = sum(p["failed"] for p in parts)
    failures = [name for p in parts for name in p["failures"]][:20]
    codes = [p["returncode"] for p in parts]
    returncode = None if None in codes else max(codes)
    cut = "" if returncode is not None else f", {codes.count(None)} of them cut short"
    summary = f"{passed} passed, {failed} failed in {seconds:.1f}s over {len(parts)} processes{cut}"
    return {"returncode": returncode, "summary": summary, "seconds": seconds, "passed": passed, "failed": failed,
            "failures": failures, "processes": [p["summary"] for p in parts]}


def summarize_test_output(stdout: str, returncode, tail: str, seconds: float) -> dict:
    """Counts and failures from `pytest -v` output (whole or cut short)."""
    lines = stdout.splitlines()
    passed = sum(1 for ln in lines if " PASSED" in ln)
    failed = [ln.split(f" {word}")[0].strip() for ln in lines for word in ("FAILED", "ERROR")
              if f" {word}" in ln and "::" in ln and not ln.startswith(word)]
    failed += [ln.split(" ", 1)[1].split(" - ")[0].strip() for ln in lines
               if ln.startswith(("FAILED ", "ERROR ")) and "::" in ln]
    failed = list(dict.fromkeys(failed))
    if returncode is None:
        tail = f"{tail}: {passed} passed, {len(failed)} failed before the cut"
    return {"returncode": returncode, "summary": tail, "seconds": seconds, "passed": passed, "failed": len(failed),
            "failures": failed[:20]}


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


def variant_ratios(rows: list[dict]) -> list[dict]:
    """Each variant or knob row against the default dispatch ("fasthydra") of its case: time and peak
    memory ratios (below 1: the variant is faster / smaller), what the open design decisions need."""
    default = {(r["op"], r["shape"]): r for r in rows if r["provider"] == "fasthydra"}
    out = []
    for r in rows:
        base = default.get((r["op"], r["shape"]))
        if base is None or not (r["provider"] in VARIANTS or r["provider"] in KNOBS or r["provider"] == LEARNED_T):
            continue
        mem = (r["peak_memory_bytes"] / base["peak_memory_bytes"]) if r.get("peak_memory_bytes") and \
            base.get("peak_memory_bytes") else None
        out.append({"op": r["op"], "shape": r["shape"], "provider": r["provider"],
                    "time_vs_default": r["seconds"] / base["seconds"], "memory_vs_default": mem})
    return out


def design_bounds(rows: list[dict], by_key: dict, copy_bps: float) -> list[dict]:
    """Per heads case with a floor: the least time over the floor that the default GPU design can take, its
    GEMMs at the floor and its loss pass's bytes (common.loss_pass_bytes) at the measured copy speed, beside
    the measured ratio: a target below the bound needs another design, not tuning."""
    out = []
    for r in rows:
        extra = C.loss_pass_bytes(by_key[(r["op"], r["shape"])]) if (r["op"], r["shape"]) in by_key else 0.0
        floor = r.get("gemm_floor_seconds")
        if r["provider"] != "fasthydra" or not floor or not extra:
            continue
        out.append({"op": r["op"], "shape": r["shape"], "floor_s": floor, "loss_pass_bytes": extra,
                    "bound_over_floor": (floor + extra / copy_bps) / floor,
                    "measured_over_floor": r["seconds"] / floor})
    return out


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
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="start no new case after this many seconds (the gpu tests get at most 200 s of it)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--deadline-s", type=float, default=450.0,
                        help="Nsight Compute runs last, only within this many seconds of the start")
    parser.add_argument("--hard-deadline-s", type=float, default=None,
                        help="past this many seconds (default: 20 past the later of --budget-s and --deadline-s), "
                             "print every thread's stack and exit (a hang's diagnosis)")
    parser.add_argument("--cases", default=None,
                        help="a short confirming run: only these cases (op:shape, comma-separated), no latency rows, "
                             "profiles or Nsight Compute, torch.compile left out")
    parser.add_argument("--workers", type=int, default=GPU_TEST_WORKERS, help="pytest processes for the gpu tests")
    parser.add_argument("--ncu-child", default=None, help=argparse.SUPPRESS)  # the step ncu profiles
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU; none is visible here (nothing was run)", file=sys.stderr)
        return 2
    if args.ncu_child:
        return ncu_child(args.ncu_child)
    # A run that hangs (a kernel that never ends, a capture that deadlocks) prints every thread's stack and exits
    # before the lent machine's own timeout kills it silently; the record written so far stays on disk. (The
    # process's own stderr: the watchdog writes to a file descriptor, which a captured sys.stderr may not have.)
    hard_deadline = args.hard_deadline_s or max(args.budget_s, args.deadline_s) + 20.0
    faulthandler.dump_traceback_later(hard_deadline, exit=True, file=sys.__stderr__)
    try:
        return _measure(args)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _measure(args) -> int:
    """main's work on a CUDA device: the record, written after every phase; the exit code."""
    clocks = {}
    start = time.perf_counter()
    device = torch.cuda.get_device_name(0)
    host_info = host_facts("cuda")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    # Written after every phase and every case ("phase" says how far it got), so that a run cut short keeps what
    # it measured.
    record = {"device": device, "host": host_info, "date": datetime.date.today().isoformat(), "commit": commit,
              "torch": torch.__version__, "triton": __import__("triton").__version__, "phase": "host"}
    print("host: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in host_info.items()),
          flush=True)
    tests = {"summary": "skipped"} if args.skip_tests else run_gpu_tests(
        timeout=min(200.0, args.budget_s * 0.55), workers=args.workers, log_path=args.out + ".tests.log")
    print(f"gpu tests: {tests['summary']}", flush=True)
    for name in tests.get("failures", []):
        print(f"  FAILED {name}", flush=True)
    record.update(tests=tests, phase="tests")
    _write(args.out, record, start, quiet=True)

    all_cases = C.cases("cuda")
    by_key = {(c.op, c.name): c for c in all_cases}
    if args.cases:
        wanted = [tuple(item.split(":", 1)) for item in args.cases.split(",") if item]
        unknown = [":".join(w) for w in wanted if w not in by_key]
        if unknown:
            print(f"gpu_check: no such case {', '.join(unknown)}", file=sys.stderr)
            return 2
        all_cases = [by_key[w] for w in wanted]
    short = bool(args.cases)

    lat_rows = []
    with ClockSampler() as sampler:
        for op, shape, providers in ([] if short else latency_sets(by_key)):
            for provider in providers:
                try:
                    with with_variant(provider):
                        row = latency(by_key[(op, shape)], "eager" if provider == "eager" else "fasthydra",
                                      masked=provider == MASKED, tensor_t=provider == TENSOR_T,
                                      learned_t=provider == LEARNED_T, graphed=provider == GRAPHED)
                    lat_rows.append({**row, "provider": provider})
                except Exception as exc:
                    lat_rows.append({"op": op, "shape": shape, "provider": provider,
                                     "error": f"{type(exc).__name__}: {exc}"[:300]})
    clocks["latency"] = sampler.summary
    record.update(latency=lat_rows, clocks=clocks, phase="latency")
    _write(args.out, record, start, quiet=True)
    print("latency per step (us): host = issuing without syncs, stream = events around unsynced steps, "
          "gpu = CUDA-graph replay, replay host = issuing those replays", flush=True)
    for r in lat_rows:
        if "error" in r:
            print(f"  {r['op']:14} {r['shape']:10} {r['provider']:22} ERROR {r['error']}")
        else:
            gpu, replay = (None if r.get(k) is None else round(r[k], 1) for k in ("gpu_us", "replay_host_us"))
            print(f"  {r['op']:14} {r['shape']:10} {r['provider']:22} host {r['host_us']:9.1f} "
                  f"stream {r['stream_us']:9.1f} gpu {gpu} replay host {replay} (SM {r.get('sm_mhz')} MHz)")
    if not short:
        try:
            breakdown = host_breakdown(by_key[BREAKDOWN_CASE])
        except Exception as exc:
            breakdown = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        record.update(host_breakdown=breakdown)
        print("host time of its pieces (us per call): " + ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in breakdown.items()), flush=True)
    copy_bps = copy_bandwidth()
    print(f"device copy: {copy_bps / 1e9:.0f} GB/s (read + write)", flush=True)
    try:
        topk = [] if short else topk_rows(copy_bps)
    except Exception as exc:
        topk = [{"error": f"{type(exc).__name__}: {exc}"[:300]}]
    for r in topk:
        print("  loss on logits, gpu-large bf16, " + (f"{r['teacher']:24} {r['seconds'] * 1e3:8.3f} ms, teacher "
              f"{r['teacher_bytes'] / 1e6:8.1f} MB, {r['of_copy_bandwidth']:.2f} of copy" if "error" not in r
              else f"ERROR {r['error']}"), flush=True)
    try:
        masked = [] if short else masked_rows()
    except Exception as exc:
        masked = [{"error": f"{type(exc).__name__}: {exc}"[:300]}]
    for r in masked:
        print(f"  {r.get('op', 'linear heads')} fwd+bwd, gpu-large bf16, row mask " + (
            f"{r['mask']:20} {r['seconds'] * 1e3:8.3f} ms, {r['vs_no_mask']:.3f}x no mask" if "error" not in r
            else f"ERROR {r['error']}"), flush=True)

    record.update(copy_bytes_per_s=copy_bps, topk=topk, masked=masked, phase="copy, top-k and masks")
    _write(args.out, record, start, quiet=True)

    with ClockSampler() as sampler:
        profiles = _profiles([] if short else PROFILE_CASES, by_key, profile_step,
                             "profile {} (fasthydra, ms per step):", _profile_line)
    clocks["profiles"] = sampler.summary
    host = _profiles([] if short else HOST_PROFILE_CASES, by_key, host_profile,
                     "host profile {} (fasthydra, us per step: own, cumulative):",
                     lambda r: f"{r['own_us_per_step']:8.1f} {r['cum_us_per_step']:8.1f} {r['calls_per_step']:5.1f}x "
                               f"{r['function']}")
    record.update(profiles=profiles, host_profiles=host, phase="profiles")
    _write(args.out, record, start, quiet=True)

    priority = [c for c in all_cases if (c.op, c.name) in {(t[0], t[1]) for t in TARGETS[:4]}]
    priority += [by_key[k] for k in VARIANT_CASES if k in by_key and by_key[k] in all_cases
                 and by_key[k] not in priority]
    priority += [c for c in all_cases if (c.op, c.name) in {(t[0], t[1]) for t in TARGETS} and c not in priority]
    order = priority + [c for c in all_cases if c not in priority]
    rows, left_out, floors = [], [], {}
    record.update(rows=rows, floors={}, left_out=left_out)
    with ClockSampler() as sampler:
        for case in order:
            if time.perf_counter() - start > args.budget_s:
                left_out.append(case.key)
                continue
            floors[(case.op, case.name)] = _do_bench(C.gemm_floor_callable(case))
            providers = [p for p in C.PROVIDERS if not C.provider_available(p, "cuda")]
            providers += variants_for(case.op, case.name) + [LEARNED_T] * ((case.op, case.name) in LEARNED_T_CASES)
            for provider in providers:
                if provider == "compile" and (short or (case.op, case.name) not in COMPILE_CASES):
                    continue
                try:
                    if provider in VARIANTS or provider in KNOBS:
                        with with_variant(provider):
                            rows.append({**bench_case(case, "fasthydra"), "provider": provider})
                    else:
                        rows.append(bench_case(case, provider))
                except Exception as exc:  # keep going: the table says what failed
                    rows.append({"op": case.op, "shape": case.name, "dtype": str(case.dtype).replace("torch.", ""),
                                 "provider": provider, "error": f"{type(exc).__name__}: {exc}"[:300]})
                torch.cuda.empty_cache()
            record.update(floors={f"{op} {shape}": v for (op, shape), v in floors.items()}, phase=f"case {case.key}")
            _write(args.out, record, start, quiet=True)
            print(f"  done {case.key} ({time.perf_counter() - start:.0f}s)", flush=True)
    clocks["cases"] = sampler.summary
    record.update(
        phase="cases",
        # False when this torch refused addmm's fp32 output with an fp32 addend (dx then adds per group)
        fp32_out_gemm=__import__("fasthydra.ops._common", fromlist=["_"]).FP32_OUT_GEMM,
        # False when it refused writing such a GEMM into a given tensor (fp16's fp32 dW: then a copy)
        fp32_out_into=__import__("fasthydra.ops.linear_hydra_kl", fromlist=["_"])._FP32_OUT_INTO)
    print(f"fp32-output GEMMs for dx over head groups: {record['fp32_out_gemm']}; written in place (fp16's dW): "
          f"{record['fp32_out_into']}", flush=True)
    _write(args.out, record, start)  # the measurements are safe before any analysis runs
    try:
        targets = _analyse(record, rows, lat_rows, floors, by_key, copy_bps, device)
    except Exception:  # a reporting bug must not cost the run: the raw record is written already
        import traceback

        traceback.print_exc()
        return 1
    record["predictions"] = _against_predictions(record)
    if left_out:
        print(f"left out (time budget): {', '.join(left_out)}")
    for phase, summary in clocks.items():
        print(f"clocks during {phase}: {summary}")
    _write(args.out, record, start)
    try:  # diagnostics only: whatever goes wrong here must not cost the record
        record["ncu"] = {"skipped": "--cases"} if short else ncu_profile(
            NCU_CASES, min(150.0, args.deadline_s - (time.perf_counter() - start)),
            os.path.dirname(os.path.abspath(args.out)))
    except Exception as exc:
        record["ncu"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print_ncu(record["ncu"])
    record["phase"] = "done"
    _write(args.out, record, start)
    return 0 if tests.get("returncode") in (0, None) and all(v != "FAIL" for _, v, _ in targets) else 1


def _profiles(cases, by_key, measure, title: str, line) -> dict:
    """{"op shape [knob]": rows} from measure(case) for each (op, shape[, knob]) case, under the knob's
    settings (an error row where it fails), printed."""
    out = {}
    for op, shape, *knob in cases:
        key = " ".join([op, shape, *knob])
        try:
            with with_variant(knob[0] if knob else "fasthydra"):
                out[key] = measure(by_key[(op, shape)])
        except Exception as exc:
            out[key] = [{"error": f"{type(exc).__name__}: {exc}"[:300]}]
        print(title.format(key), flush=True)
        for r in out[key]:
            print("  " + (line(r) if "error" not in r else f"ERROR {r['error']}"), flush=True)
    return out


def _against_predictions(record: dict):
    """The figures bench/predictions.json predicted, against this run's (printed; for the record). Diagnostics
    only: a bad predictions file costs this comparison, not the run."""
    try:
        import predictions

        expected = predictions.load()
        results = predictions.compare(record, expected)
    except Exception as exc:
        print(f"predictions: not compared ({type(exc).__name__}: {exc})", flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print(predictions.format_comparison(results, expected, brief=True, device=record.get("device")), flush=True)
    return results


def _write(path: str, record: dict, start: float, quiet: bool = False) -> None:
    """The record as JSON, replaced whole (written beside and renamed: a run killed while writing keeps the last
    complete one)."""
    record["seconds"] = time.perf_counter() - start
    with open(path + ".part", "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(path + ".part", path)
    if not quiet:
        print(f"wrote {path} ({record['seconds']:.0f}s)", flush=True)


def _analyse(record, rows, lat_rows, floors, by_key, copy_bps, device) -> list:
    """Ratios, the table, the variant comparison and the target verdicts (added to record); returns the
    verdicts."""
    for r in rows:
        if "error" not in r and r["op"] in C.LOGITS_OPS:
            case = by_key[(r["op"], r["shape"])]
            r["of_copy_bandwidth"] = C.bytes_moved(case) / r["seconds"] / copy_bps
    good = add_ratios([r for r in rows if "error" not in r], floors)
    print(format_table(good, device))
    for r in rows:
        if "error" in r:
            print(f"ERROR {r['op']} {r['shape']} {r['provider']}: {r['error']}")
    decisions = variant_ratios(good)
    for d in decisions:
        mem = "-" if d["memory_vs_default"] is None else f"{d['memory_vs_default']:.2f}"
        print(f"variant {d['op']:14} {d['shape']:10} {d['provider']:24} time x{d['time_vs_default']:.2f} "
              f"memory x{mem} of the default")
    record["bounds"] = design_bounds(good, by_key, copy_bps)
    for b in record["bounds"]:
        print(f"bound {b['op']:14} {b['shape']:15} floor {b['floor_s'] * 1e3:8.3f} ms + loss pass "
              f"{b['loss_pass_bytes'] / 1e9:6.2f} GB at copy speed: at least x{b['bound_over_floor']:.2f} the floor "
              f"(measured x{b['measured_over_floor']:.2f})")
    targets = check_targets(good)
    for op, shape, key, bound in LATENCY_TARGETS:
        row = next((r for r in lat_rows if r["op"] == op and r["shape"] == shape and r["provider"] == "fasthydra"
                    and "error" not in r), None)
        value = None if row is None else row.get(key)
        verdict = "MISSING" if value is None else ("PASS" if value <= bound else "FAIL")
        targets.append((f"{op} {shape}: {key} <= {bound}", verdict, value))
    for label, verdict, value in targets:
        print(f"target {verdict:7} {label} (measured {value if value is None else round(value, 3)})")
    record["variants"], record["targets"] = decisions, targets
    return targets


if __name__ == "__main__":
    sys.exit(main())
