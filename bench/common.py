"""Benchmark cases, providers, GEMM floors, rates and peak memory: shared by the pytest-benchmark
suite (bench/test_bench.py) and the one-shot GPU script (bench/gpu_check.py).

Providers: ``eager`` (what a user writes today: the per-head reference, an F.linear per head, stack,
log_softmax, kl_div), ``compile`` (torch.compile of that eager code; compile time kept apart),
``fasthydra`` (impl="auto": the torch path on CPU, Triton on CUDA) and ``liger`` (CUDA only, when
liger-kernel imports: its fused linear-JSD is not a per-head KL, so Liger's KL-divergence loss is
looped over heads on eager logits).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import importlib.util
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from fasthydra import HydraHead, hinton_kl_loss, hydra_kl_loss, uncertainty
from fasthydra import reference as R

# uncertainty_fwdbwd: a penalty on the mean epistemic uncertainty, forward + backward to the logits; hinton_fwdbwd:
# one head's (B, C) logits against the M members' mean (Hydra's stage 1, KD from an ensemble)
OPS = ("linear_fwd", "linear_fwdbwd", "mlp_fwdbwd", "kl_fwdbwd", "uncertainty", "uncertainty_fwdbwd",
       "hinton_fwdbwd")
LOGITS_OPS = ("kl_fwdbwd", "uncertainty", "uncertainty_fwdbwd", "hinton_fwdbwd")  # ops on given logits (memory-bound)
PROVIDERS = ("eager", "compile", "fasthydra", "liger")
# fasthydra's losses with a learned temperature (a tensor that requires grad): bench/gpu_check.py's extra provider
LEARNED_T = "fasthydra-learned-T"
TEMPERATURE = 2.0

# (name, B, D, M, C, dtype)
CPU_SHAPES = [("small-C", 4096, 512, 8, 10, torch.float32), ("mid", 1024, 512, 8, 1000, torch.float32),
              ("large-C", 256, 256, 4, 32000, torch.float32)]
# A name ending in "-tf32" runs its fp32 GEMMs with torch.backends.cuda.matmul.allow_tf32 on (see
# case_settings); every other fp32 case with it off.
GPU_SHAPES = CPU_SHAPES + [("gpu-large", 4096, 2048, 8, 32000, torch.bfloat16),
                           ("gpu-small", 512, 512, 10, 10, torch.float32),
                           ("gpu-large-fp16", 4096, 2048, 8, 32000, torch.float16),
                           ("large-C-tf32", 256, 256, 4, 32000, torch.float32)]
# The memory-bound ops also on a vocabulary of 50257 classes (GPT-2's): rows that no 16-byte load can align, which
# the loss and `uncertainty` kernels walk in spread slices (ops/_common.spread_slices)
GPU_ODD_SHAPES = [("gpt2-vocab", 2048, 1024, 8, 50257, torch.bfloat16)]
GPU_ODD_OPS = ("kl_fwdbwd", "uncertainty")
MLP_HIDDEN = 128


class AutogradFloor(torch.autograd.Function):
    """apply(input, weight, bias): a scalar 0, and in the backward new (uninitialised) weight and bias gradients:
    what autograd itself costs a heads step on the host, the floor its host time is read against
    (bench/host_overhead.py, bench/gpu_check.host_breakdown)."""

    @staticmethod
    def forward(ctx, inp, weight, bias):
        ctx.save_for_backward(inp, weight, bias)
        return inp.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        _, weight, bias = ctx.saved_tensors
        return None, torch.empty_like(weight), torch.empty_like(bias)


@dataclass(frozen=True)
class Case:
    op: str
    name: str
    B: int
    D: int
    M: int
    C: int
    dtype: torch.dtype
    device: str

    @property
    def key(self) -> str:
        return f"{self.op}/{self.name}/{str(self.dtype).replace('torch.', '')}/{self.device}"

    @property
    def backward(self) -> bool:
        return self.op.endswith("fwdbwd")


@contextlib.contextmanager
def settings(env: dict | None = None, constants=()):
    """Environment variables (read by fasthydra at every call) and module constants, given as (module
    name, attribute, value), set for the calls inside and restored afterwards."""
    env = env or {}
    constants = [(importlib.import_module(mod), name, value) for mod, name, value in constants]
    old_env = {k: os.environ.get(k) for k in env}
    old_constants = [(mod, name, getattr(mod, name)) for mod, name, _ in constants]
    os.environ.update(env)
    for mod, name, value in constants:
        setattr(mod, name, value)
    try:
        yield
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for mod, name, value in old_constants:
            setattr(mod, name, value)


def quick_mode() -> bool:
    """CI's short mode: FASTHYDRA_BENCH_QUICK=1 keeps every case but runs few rounds."""
    return os.environ.get("FASTHYDRA_BENCH_QUICK", "0") == "1"


def cases(device: str) -> list[Case]:
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    odd = GPU_ODD_SHAPES if device == "cuda" else []
    return ([Case(op, name, b, d, m, c, dtype, device) for op in OPS for (name, b, d, m, c, dtype) in shapes]
            + [Case(op, name, b, d, m, c, dtype, device) for op in GPU_ODD_OPS for (name, b, d, m, c, dtype) in odd])


def provider_available(provider: str, device: str) -> str | None:
    """None when the provider can run here, else the reason it cannot."""
    if provider == "liger":
        if device != "cuda":
            return "liger-kernel runs on CUDA only"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed"
    return None


def case_settings(case: "Case") -> None:
    """Global settings a case runs under: TF32 GEMMs only for the "-tf32" cases."""
    if case.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = case.name.endswith("-tf32")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# inputs and the callables under test
# ----------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    head: HydraHead
    x: list  # rotated copies of the body features (B, D)
    t: list  # rotated copies of the teacher logits (B, M, C)
    z: list  # rotated copies of student logits (B, M, C), for the logits-only ops
    i: int = 0
    extra: dict = field(default_factory=dict)

    def next(self):
        k = self.i % len(self.x)
        self.i += 1
        return self.x[k], self.t[k], self.z[k]


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Inputs, with several copies when one set would sit in the GPU's L2 cache between rounds."""
    gen = torch.Generator(device=case.device).manual_seed(seed)  # made on the device: no host copies
    hidden = MLP_HIDDEN if case.op == "mlp_fwdbwd" else None
    head = HydraHead(case.D, case.C, case.M, hidden_features=hidden, impl="auto", device=case.device,
                     dtype=case.dtype)
    per_set = (case.B * case.D + 2 * case.B * case.M * case.C) * torch.finfo(case.dtype).bits // 8
    copies = 1 if case.device != "cuda" or per_set > 64 * 2**20 else 4

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=case.device) * scale).to(case.dtype)

    xs, ts, zs = [], [], []
    for _ in range(copies):
        xs.append(randn(case.B, case.D).requires_grad_())
        ts.append(randn(case.B, case.M, case.C, scale=3.0))
        z = randn(*_student_shape(case), scale=3.0) if case.op in LOGITS_OPS else \
            torch.empty(0, device=case.device, dtype=case.dtype)
        zs.append(z.requires_grad_(case.op in LOGITS_OPS and case.backward))
    return Inputs(head, xs, ts, zs)


def _student_shape(case: Case) -> tuple:
    """The student logits of the ops on given logits: one head (B, C) for the Hinton loss, else (B, M, C)."""
    return (case.B, case.C) if case.op == "hinton_fwdbwd" else (case.B, case.M, case.C)


def _eager_logits(head: HydraHead, x):
    p = dict(head.named_parameters())
    if head.is_mlp:
        return R.mlp_heads_ref(x, p["hidden_weight"], p["hidden_bias"], p["weight"], p["bias"])
    return R.linear_heads_ref(x, p["weight"], p["bias"])


def _eager_loss(head, x, t):
    return R.hydra_kl_loss_ref(_eager_logits(head, x), t, TEMPERATURE)


def _liger_kl(student, log_target):
    """Liger's KL-divergence loss ("batchmean", log target) of the student logits' tempered log-softmax."""
    from liger_kernel.transformers import LigerKLDIVLoss

    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    return kl(torch.log_softmax(student.float() / TEMPERATURE, dim=-1), log_target)


def _liger_heads_kl(z, t):
    """Liger's KL looped over the heads of (B, M, C) logits (summed, unscaled)."""
    return sum(_liger_kl(z[:, m], torch.log_softmax(t[:, m].float() / TEMPERATURE, dim=-1)) for m in range(z.shape[1]))


def _liger_loss(head, x, t):
    z = _eager_logits(head, x)
    return _liger_heads_kl(z, t) * TEMPERATURE**2 / z.shape[1]


def make_callable(case: Case, provider: str, inputs: Inputs):
    """A zero-argument callable that runs one step of the op with the provider (synchronised on GPU).

    For ``compile`` the first call (the compilation) happens here and its seconds land in
    ``inputs.extra["compile_seconds"]``, outside every timing.
    """
    case_settings(case)
    head = inputs.head
    params = list(head.parameters())
    temperature = TEMPERATURE
    if provider == LEARNED_T:  # fasthydra with the temperature a parameter (its gradient formed too)
        temperature = torch.tensor(TEMPERATURE, device=case.device, requires_grad=True)
        params.append(temperature)
        provider = "fasthydra"

    if case.op == "uncertainty":
        if provider == "fasthydra":
            def body(x, t, z):
                return uncertainty(z)
        else:
            def body(x, t, z):
                with torch.no_grad():
                    return R.uncertainty_ref(z)
    elif case.op == "uncertainty_fwdbwd":
        if provider == "fasthydra":
            def body(x, t, z):
                return uncertainty(z).epistemic.mean()
        else:
            def body(x, t, z):
                return R.uncertainty_ref(z).epistemic.mean()
    elif case.op == "hinton_fwdbwd":
        if provider == "fasthydra":
            def body(x, t, z):
                return hinton_kl_loss(z, t, temperature)
        elif provider == "liger":
            def body(x, t, z):
                return _liger_kl(z, torch.log(R.ensemble_mean_probs_ref(t.float(), TEMPERATURE))) * TEMPERATURE**2
        else:
            def body(x, t, z):
                return R.hinton_kl_loss_ref(z, t, TEMPERATURE)
    elif case.op == "kl_fwdbwd":
        if provider == "fasthydra":
            def body(x, t, z):
                return hydra_kl_loss(z, t, temperature)
        elif provider == "liger":
            def body(x, t, z):
                return _liger_heads_kl(z, t)
        else:
            def body(x, t, z):
                return R.hydra_kl_loss_ref(z, t, TEMPERATURE)
    else:
        if provider == "fasthydra":
            def body(x, t, z):
                return head.distill_loss(x, t, temperature)
        elif provider == "liger":
            def body(x, t, z):
                return _liger_loss(head, x, t)
        else:
            def body(x, t, z):
                return _eager_loss(head, x, t)

    if provider == "compile":
        body = torch.compile(body)

    def step():
        x, t, z = inputs.next()
        if case.backward:
            for p in params:
                p.grad = None
            x.grad = None
            if z.requires_grad:
                z.grad = None
            body(x, t, z).backward()
        else:  # uncertainty, and the loss forward as in evaluation (no autograd)
            with torch.no_grad():
                body(x, t, z)
        sync(case.device)

    if provider == "compile":
        start = time.perf_counter()
        step()
        inputs.extra["compile_seconds"] = time.perf_counter() - start
    return step


# ----------------------------------------------------------------------------------------------
# floors and rates
# ----------------------------------------------------------------------------------------------


def gemm_floor_callable(case: Case):
    """The floor each op is held against, measured with torch at the same shapes in the same run.

    GEMM ops: the GEMMs they cannot avoid (logits, input gradient and weight gradient; forward only:
    the logits GEMM). Memory-bound ops: one elementwise sweep that moves the bytes they must move
    (kl: read z and t, write dz; uncertainty: read z, write the (B, C) mixture; uncertainty fwd+bwd: read z in
    the forward, read it again and write dz in the backward, the same three tensor sweeps as kl's; Hinton: read
    the (B, M, C) members, write a (B, C) row, the mixture's reduction, which leaves out the (B, C) student's read
    and its gradient's write, 2/M of the bytes).
    """
    case_settings(case)
    dev, dt = case.device, case.dtype
    b, d, m, c = case.B, case.D, case.M, case.C
    if case.op in ("kl_fwdbwd", "uncertainty_fwdbwd"):
        z, t, out = (torch.randn(b, m, c, device=dev, dtype=dt) for _ in range(3))

        def sweep():
            torch.sub(z, t, out=out)
            sync(dev)

        return sweep
    if case.op in ("uncertainty", "hinton_fwdbwd"):
        z = torch.randn(b, m, c, device=dev, dtype=dt)
        out = torch.empty(b, c, device=dev, dtype=dt)

        def sweep():
            torch.sum(z, dim=1, out=out)
            sync(dev)

        return sweep
    layers = [(1, d, m * c)] if case.op != "mlp_fwdbwd" else [(1, d, m * MLP_HIDDEN), (m, MLP_HIDDEN, c)]
    mats = []
    for groups, k, n in layers:
        a = torch.randn(groups, b, k, device=dev, dtype=dt)
        w = torch.randn(groups, k, n, device=dev, dtype=dt)
        g = torch.randn(groups, b, n, device=dev, dtype=dt)
        mats.append((a, w, g))

    def floor():
        for a, w, g in mats:
            torch.bmm(a, w)
            if case.backward:
                torch.bmm(g, w.transpose(1, 2))
                torch.bmm(a.transpose(1, 2), g)
        sync(dev)

    return floor


def flop_count(case: Case) -> float:
    b, d, m, c = case.B, case.D, case.M, case.C
    mult = 3 if case.backward else 1
    if case.op in ("linear_fwd", "linear_fwdbwd"):
        return 2.0 * b * d * m * c * mult
    if case.op == "mlp_fwdbwd":
        return 2.0 * b * m * MLP_HIDDEN * (d + c) * mult
    return 0.0


def logits_bytes(case: Case) -> int:
    """Bytes of one (B, M, C) tensor of the case's dtype (the logits, the teacher, dz)."""
    return case.B * case.M * case.C * torch.finfo(case.dtype).bits // 8


def bytes_moved(case: Case) -> float:
    """Bytes the logits-only ops must move at least: read z and t (+ write dz), read z (+ write probs), read z
    twice (forward, backward) and write dz, or (Hinton) read the members and the student and write its gradient."""
    size = logits_bytes(case)
    if case.op in ("kl_fwdbwd", "uncertainty_fwdbwd"):
        return 3.0 * size
    if case.op == "hinton_fwdbwd":
        return size + 2.0 * case.B * case.C * torch.finfo(case.dtype).bits // 8
    if case.op == "uncertainty":
        return size + case.B * case.C * torch.finfo(case.dtype).bits // 8
    return 0.0


def loss_pass_bytes(case: Case) -> float:
    """Bytes a heads op's loss pass moves beyond its GEMM floor's, at least, on the GPU path that writes the logits
    with cuBLAS (the floor's logits GEMM writes them): forward only, one read of z and t; forward + backward, that
    and the write of dz, plus a second read of z and t where a row is too long for the loss kernel to hold
    (kl_rows_config: the split bias pass and the two-pass loss read it twice). 0 for the other ops, and where the
    small-step kernels take the step (their logits never reach memory)."""
    from fasthydra.ops._common import kl_rows_config, small_heads_config

    if case.op not in ("linear_fwd", "linear_fwdbwd", "mlp_fwdbwd"):
        return 0.0
    elem = torch.finfo(case.dtype).bits // 8
    if small_heads_config(case.B, case.M, case.C, MLP_HIDDEN if case.op == "mlp_fwdbwd" else case.D, elem):
        return 0.0
    size = logits_bytes(case)
    if case.op == "linear_fwd":
        return 2.0 * size
    # MLP heads' bias is added by the loss kernel (a per-head input): an extra row in its registers
    held = kl_rows_config(case.C, elem, extra_row=case.op == "mlp_fwdbwd")["ROW_IN_REGISTERS"]
    return (3.0 if held else 5.0) * size


def rate(case: Case, seconds: float) -> tuple[float, str]:
    """(value, unit): GFLOP/s for the GEMM ops, GB/s for the memory-bound ones."""
    flops = flop_count(case)
    if flops:
        return flops / seconds / 1e9, "GFLOP/s"
    return bytes_moved(case) / seconds / 1e9, "GB/s"


def median_seconds(fn, rounds: int = 7, warmup: int = 2, min_time: float = 0.0) -> float:
    """Median wall time of fn (which synchronises itself on GPU) after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < rounds or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# peak memory
# ----------------------------------------------------------------------------------------------

_M_MMAP_THRESHOLD = -3
_MALLOC_READY = False


def _prepare_malloc() -> None:
    """Make freed CPU tensors leave the resident set at once: glibc then serves every allocation
    above 64 KiB with its own mmap (no dynamic threshold, no reuse of freed heap), so the peak
    resident set follows the peak of live tensors."""
    global _MALLOC_READY
    if not _MALLOC_READY:
        try:
            ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        except OSError:  # pragma: no cover - not glibc
            pass
        _MALLOC_READY = True


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} missing from /proc/self/status")


def peak_memory_bytes(step, device: str) -> int | None:
    """Peak memory one call of step adds on top of what was live before it.

    GPU: torch.cuda.max_memory_allocated around the call. CPU: the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs) minus the resident set before the call.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() - base
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    _prepare_malloc()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return max(0, _status_kib("VmHWM") - before) * 1024


def peak_memory_fresh_process(case: Case, provider: str, timeout: float = 900) -> int | None:
    """CPU: peak memory of one step measured in a fresh interpreter (see ``peak_memory_bytes``), so that
    neither the allocator's cached memory nor another case's allocations blur the figure. The step runs
    twice there (the first call warms up, compiles for ``compile``), the second is measured."""
    import json
    import subprocess
    import sys

    args = [sys.executable, os.path.abspath(__file__), "--memory", case.op, case.name, str(case.B), str(case.D),
            str(case.M), str(case.C), str(case.dtype).replace("torch.", ""), case.device, provider]
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed for {case.key} {provider}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def _memory_child(argv) -> None:
    import json

    _prepare_malloc()  # before any tensor exists
    op, name, b, d, m, c, dtype, device, provider = argv
    case = Case(op, name, int(b), int(d), int(m), int(c), getattr(torch, dtype), device)
    torch.set_num_threads(1)  # per-thread BLAS scratch would differ between providers
    inputs = make_inputs(case)
    step = make_callable(case, provider, inputs)
    step()  # warm-up (and compilation); then drop its gradients so the measured step allocates its own
    for t in [*inputs.head.parameters(), *inputs.x, *inputs.z]:
        t.grad = None
    print(json.dumps({"peak_bytes": peak_memory_bytes(step, device)}))


def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    return f"{n / 2**20:.1f} MiB"


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--memory":
        _memory_child(sys.argv[2:])
