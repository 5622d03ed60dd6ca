"""Launch plumbing shared by the ops: interpreter detection, tl.dot precision, block configurations.

The block-configuration functions are the single source of truth for what gets launched: the
launchers call them, and ``fasthydra.kernel_report`` compiles exactly what they return.
"""

from __future__ import annotations

import functools
import os
import sys
import threading

import torch
from torch.autograd import forward_ad as _forward_ad

# C tile of the row-wise loss kernels when a row does not fit one tile; tests shrink it (and
# ROW_TILE_MAX) to exercise many tiles on small C. Measured on an H200 (2026-11-28, bench/RESULTS.md)
# at (4096, 8, 32000) bf16, forward + backward: 2048-wide tiles in 8 warps took 0.83x and 0.88x the
# time of 8192-wide ones in 32 warps (two runs; 4096 in 16 warps: 1.03x), although the wide programs
# keep fewer rows in flight (inside L2) for the second read: more loads in flight matter more.
MAX_BLOCK_C = 2048
# L2 eviction priorities on the loss kernel's long-row walks (_hydra_kl_fwd_kernel's L2_HINTS): the first
# walk's loads kept in L2 (evict_last) for the second, whose loads and gradient stores go first (evict_first).
# A row's second read comes from L2 only if the bytes every program streamed since its first read did not push
# it out: at (4096, 8, 32000) bf16 a row of z and t is 125 KiB, and with several 8-warp programs on each of
# 132 SMs the rows in flight pass the H200's 50 MB of L2 (the loss pass reached 0.52 of copy speed there, run
# 4). Off until an H200 run shows it wins (bench/gpu_check.py: fasthydra/kl-l2-hints).
KL_L2_HINTS = False
# Longest row kept whole in registers by the row-wise loss kernels: 32 warps x 8 elements per thread
# and tensor compile without spills on sm_80/sm_90; 16384 fp32 (16 per thread, at most 64 registers
# with 1024 threads) spills 56 to 136 bytes, 32768 600+ (kernel report). 16-bit rows are kept in
# their storage dtype (the kernel recomputes the fp32 values in each pass): twice as long, 16384 in
# 16 warps (32 elements per thread and tensor, 128 registers) without spills.
ROW_TILE_MAX = 8192
# Elements of one row chunk's (rows, M, C) logits on the torch path (32 MiB in fp32; the chunk holds
# the logits and the gradient). Bigger chunks keep the three GEMMs near full-size efficiency; a batch
# whose rows would not fit 128 to a chunk takes one head at a time, and past that class tiles
# (linear_hydra_kl.py).
TORCH_CHUNK_ELEMENTS = 1 << 23


# Elements of one head group's logits on the cuBLAS path (256 MiB in bf16): all heads form one group
# unless their (B, M, C) logits would pass this, then fewer heads per group, and rows are chunked only
# when one head's (B, C) block alone is bigger.
CUBLAS_GROUP_ELEMENTS = 1 << 27


# The two-launch small-step path (kernels/small_heads.py): a head's row fits one class tile, and every
# program's serial chain stays short (launch 1: K / BLOCK_K steps per head it owns; launch 2: B / 256
# steps for dW, M steps for dx).
SMALL_MAX_CLASSES = 64
SMALL_MAX_ROWS = 8192
SMALL_MAX_WEIGHT = 1 << 20  # M * C * K elements
# Every row block of launch 1 reads the whole weight once (from L2): row blocks * M*C*K at most this.
SMALL_MAX_REREAD = 1 << 25
SMALL_BLOCK_B = 16  # rows per program of launch 1
# Launch 1 gives each program several heads only when (row blocks x heads) would pass this many
# programs (about 8 per SM on an H200): fewer re-reads of x, chains still short.
SMALL_TARGET_PROGRAMS = 1024
# Launch 2's input-gradient programs (shared input): flattened (head, class) rows per dot step (128 and
# 64 spill with fp32 IEEE dots on sm_80, and 16 by 8 bytes with bf16; 32 does not: kernel report).
SMALL_DX_BLOCK_J = 32
# The Hydra heads on the small-step path: launch 1 in the forward (the loss reduced by its last program),
# launch 2 in the backward reading the upstream gradient on the device, so that a training step is two
# launches (library._small_deferred). False: both launches in the forward and the stored gradients
# scaled in the backward (one more launch; bench/gpu_check.py times both).
SMALL_DEFERRED = True


def triton_device(device: torch.device) -> bool:
    """Where impl="auto" takes the Triton kernels: an NVIDIA GPU of compute capability 8.0 or later (Triton's
    supported range; the kernel report tunes for sm_80 and sm_90 and CI compiles sm_100 too). Older NVIDIA GPUs
    (Volta, Turing: sm_75's compile of the small-step gradient kernel keeps kilobytes of registers in local
    memory inside its loops) and ROCm devices, where these kernels were never run, take the torch path
    unless impl="triton" asks for the kernels."""
    major = _nvidia_major(device)
    return major is not None and major >= 8


# The oldest Triton the kernels are checked on (CI runs the interpret tier and the kernel report under it and
# under the newest pip gives; the lent H200 machines carry it). Older ones take the torch path under "auto".
MIN_TRITON = (3, 6)


def auto_fallback_reason(device: torch.device) -> str | None:
    """Why impl="auto" leaves CUDA tensors on `device` to the torch path although Triton imports: a GPU
    outside ``triton_device``, or a Triton older than MIN_TRITON; None where the kernels run."""
    if not triton_device(device):
        if torch.version.hip is not None:
            return "a ROCm device (the kernels are checked on NVIDIA GPUs only)"
        major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
        return f"compute capability {major}.{minor} (the kernels need 8.0 or later)"
    if _triton_version() < MIN_TRITON:
        return (f"Triton {'.'.join(map(str, _triton_version()))} (the kernels are checked on "
                f"{'.'.join(map(str, MIN_TRITON))} and later)")
    return None


def helper_kernels_run_on(t: torch.Tensor) -> bool:
    """The torch path's small Triton helpers (the error word's row check, the in-place scale of stored gradients)
    launch on t only where the kernels are supported: a CUDA tensor on a GPU, with a Triton, that impl="auto"
    takes the kernels on, or a CPU tensor under the interpreter of a supported Triton. Elsewhere torch ops do
    their work: on an older or ROCm GPU, or with an older Triton, the torch path launches no Triton kernel."""
    if not triton_available():
        return False
    if t.is_cuda:
        return auto_fallback_reason(t.device) is None
    return interpreting() and _triton_version() >= MIN_TRITON


@functools.lru_cache(maxsize=None)
def _triton_version() -> tuple[int, int]:
    import triton

    major, minor = (triton.__version__.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _nvidia_major(device: torch.device) -> int | None:
    """The compute capability's major number of an NVIDIA GPU; None for any other device (ROCm too)."""
    if device.type != "cuda" or torch.version.hip is not None:
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())[0]


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def small_step_mode() -> str:
    """FASTHYDRA_SMALL_STEP: "auto" (the default: the two-launch path wherever small_heads_config fits)
    or "0" (never: the cuBLAS path then, kept for side-by-side timing)."""
    value = os.environ.get("FASTHYDRA_SMALL_STEP", "auto").strip().lower() or "auto"
    if value not in ("auto", "0"):
        raise ValueError(f"FASTHYDRA_SMALL_STEP must be 'auto' or '0', got {value!r}")
    return value


def small_heads_config(n_rows: int, n_heads: int, n_cols: int, k: int, elem_size: int) -> dict | None:
    """Block sizes of the small-step kernels, or None where the problem is not small (see the limits)."""
    weight = n_heads * n_cols * k
    row_blocks = cdiv(n_rows, SMALL_BLOCK_B)
    if not (0 < n_rows <= SMALL_MAX_ROWS and n_cols <= SMALL_MAX_CLASSES and weight <= SMALL_MAX_WEIGHT
            and row_blocks * weight <= SMALL_MAX_REREAD):
        return None
    heads = max(1, min(n_heads, row_blocks * n_heads // SMALL_TARGET_PROGRAMS))
    # tl.dot wants every tile dim >= 16 (C padded with masks); K tiles of 128 bytes.
    # Launch 2: dx in row blocks of 128 for 16-bit inputs, 64 for fp32 (128 spills on sm_80 with IEEE
    # fp32 dots); dW programs 16 wide in K (M * K / 16 of them) walking the batch 256 rows a step
    # (512 spills). No spills on sm_80/sm_90 (kernel report).
    # dx of a shared input: the heads' classes flattened, SMALL_DX_BLOCK_J of them per dot.
    return dict(BLOCK_B=SMALL_BLOCK_B, HEADS=heads, BLOCK_R=128 if elem_size <= 2 else 64,
                BLOCK_C=max(16, next_pow2(n_cols)), BLOCK_K=64 if elem_size <= 2 else 32, BLOCK_RW=256,
                BLOCK_KW=16, BLOCK_J=SMALL_DX_BLOCK_J, num_warps=4)


# fp32 products at IEEE precision in the small step's logits tile: summed as outer products in registers
# (kernels/small_heads._outer_fma_tile) instead of tl.dot, whose FMA loop over a 16 x 16 tile in 4 warps
# reads both operands from shared memory for every product or two, the weights' reads 16-way bank-conflicted
# (sm_90 SASS per K step of 32: 24 LDS.128 + 6 LDS for 64 FFMA; the outer products: 5 LDSM + 6 LDS, their
# rows read along K without conflicts). The H200 profiled the small-C step's first kernel at 95% of the
# shared-memory pipe and 0.5 instructions a cycle (2026-12-04). False: tl.dot (bench/gpu_check.py's
# knob small-dot times it). Only where the (BLOCK_B, BLOCK_C, BLOCK_K) products fit OUTER_PER_THREAD
# registers a thread (C up to 16 in 4 warps); wider tiles keep tl.dot, whose threads then own more outputs.
SMALL_OUTER_FMA = True
OUTER_PER_THREAD = 64
# Launch 2's dW walk alone (SMALL_OUTER_FMA on): its outer products keep 2 programs of 4 warps an SM busy at
# small-C (M * K / 16 = 256 programs walking 128 steps of OUTER_ROWS rows) where tl.dot's smem-bound walk took
# 16 steps of 256; False times tl.dot's walk beside the logits' outer products (gpu_check knob small-dw-dot).
SMALL_OUTER_DW = True
# Rows a step of launch 2's dW walk in outer products (lanes along the rows).
OUTER_ROWS = 32


def _outer_fits(products: int, cfg: dict, precision: str) -> bool:
    """fp32 IEEE products (precision: the launch's PRECISION, "ieee" only for fp32 operands at torch's
    "highest") that fit OUTER_PER_THREAD registers a thread of the config's warps, the form switched on."""
    return SMALL_OUTER_FMA and precision == "ieee" and products <= OUTER_PER_THREAD * 32 * cfg["num_warps"]


def small_outer_fma(cfg: dict, precision: str) -> bool:
    """Whether the small-step logits tile of this small_heads_config sums its products as outer products."""
    return _outer_fits(cfg["BLOCK_B"] * cfg["BLOCK_C"] * cfg["BLOCK_K"], cfg, precision)


def small_grads_outer(cfg: dict, precision: str) -> bool:
    """The same for launch 2's dW walk (small_grads_config's blocks): (BLOCK_C, BLOCK_KW, OUTER_ROWS) products."""
    return SMALL_OUTER_DW and _outer_fits(cfg["BLOCK_C"] * cfg["BLOCK_KW"] * OUTER_ROWS, cfg, precision)


def empty_stored_grad(t: torch.Tensor) -> torch.Tensor:
    """An empty gradient of t formed in the forward and scaled in the backward: t's shape, contiguous, in
    stored_grad_dtype (also under fake tensors: empty_like follows the mode). (empty_like: half the host time of
    ``torch.empty(t.shape, ...)``, whose shape argument torch parses as a sequence.)"""
    return torch.empty_like(t, dtype=stored_grad_dtype(t.dtype), memory_format=torch.contiguous_format)


def small_grads_config(n_rows: int, n_heads: int, n_cols: int, k: int, elem_size: int,
                       stash_elem_size: int) -> dict | None:
    """Blocks of launch 2 (the small-step gradient kernel) for inputs of elem_size bytes and a stash of dL/dz of
    stash_elem_size: small_heads_config's for the wider of the two; an fp32 stash of 16-bit inputs (fp16's:
    stored_grad_dtype) in 8 warps (4 spilled 24 bytes on sm_80 under Triton 3.6; kernel report)."""
    cfg = small_heads_config(n_rows, n_heads, n_cols, k, max(elem_size, stash_elem_size))
    if cfg is not None and stash_elem_size > elem_size:
        cfg = {**cfg, "num_warps": 8}
    return cfg


def triton_available() -> bool:
    """Triton imports here (it may not on some platforms)."""
    try:
        import triton
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return triton is not None  # (a plain import statement: dynamo traces it, not importlib.import_module)


def no_values(t: torch.Tensor) -> bool:
    """t has a shape and a dtype but no data here: a meta tensor, or any tensor while a FakeTensorMode is active
    (memory planning, shape propagation; a kernel handed a fake tensor's pointer would write anywhere). The ops
    then run their custom ops' fake forms, and no value is checked."""
    return t.is_meta or (not torch.compiler.is_compiling() and _fake_mode_active())


def _fake_mode_active() -> bool:
    return (torch._C._len_torch_dispatch_stack() > 0
            and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None)


def forward_ad_active() -> bool:
    """A forward-mode AD level is entered (``torch.autograd.forward_ad.dual_level``): dual tensors may come in.
    The kernels read a tensor's primal storage and never see its tangent."""
    return _forward_ad._current_level >= 0


def has_tangent(tensors) -> bool:
    """Whether any of `tensors` (other values are skipped) is a dual tensor with a tangent at the current level."""
    return any(isinstance(t, torch.Tensor) and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)


def batched_backward(*grads) -> bool:
    """A backward run over a batch of upstream gradients: under torch.func's vmap, or by
    ``torch.autograd.grad(..., is_grads_batched=True)`` (jacobian and hessian with vectorize=True), whose legacy
    vmap hands the backward batched tensors without storage that no kernel can read."""
    if torch._C._are_functorch_transforms_active():
        return True
    return _legacy_batched is not None and any([g is not None and _legacy_batched(g) for g in grads])


def inference_tensor(t) -> bool:
    """t is a tensor made under ``torch.inference_mode()``; False while torch.compile traces (Dynamo cannot trace
    ``is_inference()``: a graph break; the compiled program takes its inputs as graph inputs instead)."""
    return isinstance(t, torch.Tensor) and not torch.compiler.is_compiling() and t.is_inference()


def save_inputs(ctx, *tensors) -> None:
    """``ctx.save_for_backward(*tensors)``, except that a tensor made under ``torch.inference_mode()`` (a teacher's
    logits computed there: the usual way to run a frozen teacher) is kept as an attribute of ctx instead; read
    them back with ``saved_inputs``. Autograd refuses to save such a tensor (it has no version counter), while
    eager torch on the same inputs never saves one (its softmaxes keep their own outputs). An inference tensor
    cannot be changed in place outside inference mode; a change made to it inside one between the forward and the
    backward goes unseen, as torch's own ops would not see it either."""
    inference = [inference_tensor(t) for t in tensors]
    if any(inference):
        ctx.inference_inputs = {i: t for i, (t, held) in enumerate(zip(tensors, inference)) if held}
        tensors = tuple(None if held else t for t, held in zip(tensors, inference))
    ctx.save_for_backward(*tensors)


def saved_inputs(ctx) -> tuple:
    """The tensors ``save_inputs`` kept, in their order."""
    saved = ctx.saved_tensors
    held = getattr(ctx, "inference_inputs", None)
    return saved if held is None else tuple(held.get(i, t) for i, t in enumerate(saved))


def op_form(t: torch.Tensor) -> bool:
    """An eager call that goes through the custom op rather than straight to its implementation: while
    torch.compile traces, on a meta tensor, under a FakeTensorMode (the op's fake form), or under torch's FLOP
    counter (which counts the op by its formula, ops/library.py, as in a compiled program). Other dispatch modes
    see the eager calls inside, as before."""
    if torch.compiler.is_compiling() or t.is_meta:
        return True
    if torch._C._len_torch_dispatch_stack() == 0:
        return False
    if _fake_mode_active():
        return True
    counter = sys.modules.get("torch.utils.flop_counter")  # (in use only if imported)
    if counter is None:
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    # the mode on the stack: FlopCounterMode itself up to torch 2.4, its inner _FlopCounterMode later
    kinds = tuple(k for k in (getattr(counter, "FlopCounterMode", None), getattr(counter, "_FlopCounterMode", None))
                  if isinstance(k, type))
    return any(isinstance(mode, kinds) for mode in _get_current_dispatch_mode_stack())


def device_to_enter(t: torch.Tensor) -> int | None:
    """The index of t's CUDA device where another one is current, else None. Triton launches on the current
    device (and its current stream), and CUDA events and graph-capture queries follow it too; in a model split
    across GPUs (``device_map="auto"``, pipeline stages) the tensors an op gets need not live there, and a
    kernel launched on the wrong device fails ("cannot be accessed from Triton") or reads another device's
    memory. CPU and meta tensors: None, without touching CUDA."""
    device = t.device
    if device.type != "cuda" or device.index is None:
        return None
    return None if device.index == torch.cuda.current_device() else device.index


def on_tensor_device(fn, prepare=None):
    """fn run with its first argument's CUDA device current (``device_to_enter``), as torch's own ops
    are; nothing is entered where that device is current already (the usual case: one check per call), nor
    while torch.compile traces (the custom ops' bodies, which run at run time, check for themselves).
    prepare: None, or a function of (args, kwargs) that returns the (args, kwargs) fn is called with (not while
    torch.compile traces)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if prepare is not None:
            args, kwargs = prepare(args, kwargs)
        first = args[0] if args else None  # (the public functions' first argument is their main tensor)
        index = device_to_enter(first) if isinstance(first, torch.Tensor) else None
        if index is None:
            return fn(*args, **kwargs)
        with torch.cuda.device(index):
            return fn(*args, **kwargs)

    return wrapper


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def stored_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient formed in the forward pass is kept in until the backward scales it: fp32 for fp16
    tensors, the tensor's own dtype otherwise. The upstream gradient is unknown in the forward, and with a
    mean over B*M rows an fp16 gradient is mostly below fp16's normal range (6.1e-5), where GradScaler's
    loss scale cannot reach it once it is rounded: at (2048, 64, 4, 2000) its relative error was 4e-2, eager's
    with a GradScaler 3e-4 (bench/RESULTS.md). bf16 has fp32's exponent range and keeps its own dtype."""
    return torch.float32 if dtype == torch.float16 else dtype


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# Long rows Triton cannot prove 16-byte aligned walk in spread per-thread slices (spread_slices). False: the
# contiguous slices everywhere, as until the fifty-second session (bench/gpu_check.py times both on rows of 50257).
SPREAD_SLICES = True


def spread_slices(cfg: dict, vec: int, n_cols: int, *rows) -> bool:
    """Whether a long-row walk with this configuration (BLOCK_C, num_warps, ROW_IN_REGISTERS) takes spread
    per-thread slices of vec classes (kernels/softmax_kl._thread_slices): where Triton cannot prove a thread's
    contiguous classes 16-byte aligned, so that they would load one class at a time. Triton knows an integer
    argument a multiple of 16 and a pointer 16-byte aligned only from its specialisation of the launch's values:
    C, each row stride of `rows` (tensors with unit stride along C; None skipped) and their addresses must all be.
    Only where every thread of the program lies along the slices (BLOCK_C / vec of them): more threads would put
    a thread's classes in several warps."""
    if not SPREAD_SLICES or cfg.get("ROW_IN_REGISTERS", False) or 32 * cfg["num_warps"] > cfg["BLOCK_C"] // vec:
        return False
    if n_cols % 16:
        return True
    return any(t is not None and (t.data_ptr() % 16 or any(s % 16 for s in t.stride()[:-1])) for t in rows)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 operands, following torch's own fp32 matmul setting."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot on 16-bit operands is not trustworthy: feed it fp32 there.
    return dtype != torch.float32 and interpreting()  # (in this order: fp32 reads no environment variable)


def rows_per_chunk(total_rows: int, row_elements: int, budget: int) -> int:
    """Rows of one chunk so that rows * row_elements stays within budget (at least one row)."""
    return max(1, min(max(total_rows, 1), budget // max(row_elements, 1)))


def kl_rows_config(n_cols: int, elem_size: int = 4, extra_row: bool = False) -> dict:
    """Row-wise KL kernels. A row of up to ROW_TILE_MAX classes (twice that for 16-bit inputs, unless
    extra_row: a teacher gradient or a student bias, whose registers make 16384 spill on sm_90) is one
    tile held in registers (read once: the op is memory-bound, and a second read of a long row comes from DRAM);
    longer rows go in MAX_BLOCK_C tiles, read twice. Several rows per program when C is small (~1k
    lanes of work)."""
    whole = max(16, next_pow2(n_cols))
    in_registers = ROW_TILE_MAX * (2 if elem_size <= 2 and not extra_row else 1)
    block_c = whole if whole <= max(in_registers, MAX_BLOCK_C) else MAX_BLOCK_C
    block_r = max(1, min(16, 1024 // block_c))
    # up to 8 elements per thread and tensor in 32 warps; a 16-bit row of 16384: 32 per thread in 16
    # warps (128 registers). No spills either way (kernel report).
    lanes = block_r * block_c
    warps = 4 if lanes <= 1024 else (min(32, lanes // 256) if lanes <= 8192 else 16)
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps, ROW_IN_REGISTERS=block_c >= n_cols)


def kl_rows_reduces_in_launch(cfg: dict, write_grad: bool) -> bool:
    """Whether the row kernel with this kl_rows_config sums the loss in its own launch (REDUCE): not a
    16-bit row wider than ROW_TILE_MAX held in registers with the gradient written (the last program's
    sum on top spilled 24 to 32 bytes under Triton 3.6, kernel report); the caller's reduction then."""
    return not (write_grad and cfg["ROW_IN_REGISTERS"] and cfg["BLOCK_C"] > ROW_TILE_MAX)


# Programs the streaming gradient passes aim for (kl_grad_config, kl_grad_cols_config): a few per SM on
# a large GPU, each walking several tiles (its row's normalisers loaded once; the column-sum pass's
# partial sums stay small beside dz).
STREAM_PROGRAMS = 2048


def kl_grad_config(n_rows: int, n_cols: int) -> dict:
    """The backward's streaming gradient kernel: (rows, classes) tiles of ~1k to 2k lanes; each program
    walks cols_per_prog classes of its rows (the whole row when there are rows enough for about
    STREAM_PROGRAMS programs, else the row in col_blocks blocks)."""
    block_c = max(16, min(next_pow2(n_cols), MAX_BLOCK_C))
    block_r = max(1, min(16, 1024 // block_c))
    tiles = cdiv(max(n_cols, 1), block_c)
    blocks = max(1, min(tiles, cdiv(STREAM_PROGRAMS, cdiv(max(n_rows, 1), block_r))))
    cols_per_prog = cdiv(tiles, blocks) * block_c
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4 if block_r * block_c <= 1024 else 8,
                cols_per_prog=cols_per_prog, col_blocks=cdiv(max(n_cols, 1), cols_per_prog))


# Heads with a bias on the cuBLAS path, rows too long for registers: the loss kernel writes the loss and
# row normalisers only, and _hydra_kl_grad_cols_kernel writes dz and its column sums (db) in one more
# read of z and t: the same bytes as the two-pass loss kernel writing dz, without db's extra read of dz
# (0.62 ms of a 24.5 ms step at gpu-large on an H200). False: the one-kernel loss pass and a column
# sum of dz (bench/gpu_check.py measures both). Off: on the H200 (2026-12-04, bench/RESULTS.md) the split pass
# was slower everywhere, its column-sum kernel 2.1 ms against the loss kernel's 1.45 at MLP gpu-large: the
# one-kernel pass took 0.82x the split pass's step there, 0.98x at linear gpu-large, 1.00x at large-C fp32.
SPLIT_BIAS_PASS = False
# Linear heads in several head groups (cuBLAS path, 16-bit, CUDA): dx accumulates in fp32 through
# addmm(acc, dz, W, out_dtype=float32), one GEMM per group, instead of a 16-bit product and an fp32
# add (run 2's profile: 0.25 ms at gpu-large). Turned off at the first call where torch refuses it.
FP32_OUT_GEMM = True
# hydra_kl_loss / hinton_kl_loss on the Triton path with a frozen dense teacher: the forward writes loss rows
# and row normalisers only (one read of z and t) and the backward forms dz in one streaming pass that
# reads the upstream gradient on the device (library._deferred). False: the forward forms dz too (its
# long rows read twice, the second read partly from L2) and the backward hands it over, untouched when
# the upstream gradient is 1: fewer bytes if that second read hits L2, a (B, M, C) gradient held
# between the passes (bench/gpu_check.py measures both). Off: on the H200 (2026-12-04) the gradient formed in
# the forward took 0.91x the deferred form's time at gpu-large bf16 (2.79 against 3.08 ms) and 0.76x at
# large-C fp32 (0.76 against 0.99 ms), no more peak memory.
DEFER_KL_GRAD = False
# Its class blocks: 512 classes (1 KiB of a 16-bit row per tile row, coalesced).
GRAD_COLS_BLOCK_C = 512


def kl_grad_cols_config(n_out: int, n_in: int, n_cols: int) -> dict:
    """_hydra_kl_grad_cols_kernel over an (O, I, C) head-major view: (BLOCK_R, BLOCK_C) tiles of 2048
    elements in 8 warps (8 per thread: in 4 warps an odd C, whose loads do not vectorise, spilled with a
    bias on sm_80/sm_90), GRAD_COLS_BLOCK_C classes wide at most; each program walks
    rows_per_prog rows of one head for one class block, with n_groups programs per head and class
    block, so that about STREAM_PROGRAMS programs run (never more row groups than row tiles)."""
    block_c = max(16, min(next_pow2(n_cols), GRAD_COLS_BLOCK_C))
    block_r = 2048 // block_c
    col_blocks = cdiv(max(n_cols, 1), block_c)
    groups = max(1, min(cdiv(max(n_in, 1), block_r), cdiv(STREAM_PROGRAMS, max(n_out, 1) * col_blocks)))
    rows_per_prog = cdiv(cdiv(max(n_in, 1), groups), block_r) * block_r
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8, n_groups=cdiv(max(n_in, 1), rows_per_prog),
                rows_per_prog=rows_per_prog, col_blocks=col_blocks)


# The top-k Hinton target kernel (kernels/uncertainty.py, _topk_log_mean_kernel): its fill of the (C,) output row
# in tiles of this many classes (8 per thread in 4 warps: 32-byte stores).
TOPK_TARGET_FILL = 1024


def topk_target_config(k: int, n_cols: int) -> dict:
    """The top-k Hinton target kernel's blocks: a member's k entries in one tile, the output row's fill in tiles of
    up to TOPK_TARGET_FILL classes; 4 warps (a program per row: B programs, each a few stores per thread and M
    member steps of k entries)."""
    return dict(BLOCK_K=next_pow2(max(k, 1)), BLOCK_C=min(TOPK_TARGET_FILL, next_pow2(max(n_cols, 1))), num_warps=4)


def topk_check_config(k: int) -> dict:
    """The top-k teacher check kernel's blocks (kernels/checks.py, _flag_topk_kernel): a row's k ids in one tile,
    compared with BLOCK_J of them at a time, so that a step holds at most 4096 pairs (32 a thread in 4 warps); as
    many rows a program as fit that, up to 64."""
    block_k = next_pow2(max(k, 1))
    block_r = max(1, min(64, 4096 // (block_k * block_k)))
    return dict(BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_J=min(block_k, max(1, 4096 // (block_r * block_k))),
                num_warps=4)


# Elements of one (heads, classes) tile of the uncertainty kernel: a whole row of M*C up to this many
# is read once and kept in registers for the mixture pass (8 per thread at 32 warps: no spills).
UNCERTAINTY_TILE_MAX = 8192
# Longer rows are walked twice in (heads, classes) tiles of this many elements, one row per program,
# in as many warps as it takes to put about FILL_WARPS warps on the GPU (4 to 32). On an H200
# (2026-11-28): at (4096, 8, 32000) bf16 these tiles took 2.71 ms in 4 warps and 12.5 ms in 32 (each
# tile's per-head reductions cross all warps of a program; 4096-element tiles: 3.29 ms, 2048: 5.60);
# at (256, 4, 32000) fp32, 256 programs, 32 warps took 0.188 ms and 4096-element 4-warp tiles 0.310.
# 2026-12-04 at gpu-large bf16: 16384-element tiles 1.47 ms, 8192 1.62, 4096 2.28; but 16384 in 4 warps
# spills 24 bytes inside its loops on sm_80/sm_90 (kernel report), so 8192 stays until a form without spills wins.
UNCERTAINTY_LONG_TILE = 8192
FILL_WARPS = 8192


def uncertainty_config(n_heads: int, n_cols: int, n_rows: int | None = None, hinton_target: bool = False,
                       elem_size: int = 4) -> dict:
    """(heads, classes) tiles of the uncertainty kernel for n_rows rows (None: many), and of the Hinton
    target's kernel (the same row walk; its long rows in `head_slices_config`'s tiles, as the backward's, for
    members of elem_size bytes)."""
    block_m = max(2, next_pow2(n_heads))
    whole = max(16, next_pow2(n_cols))
    if block_m * whole > UNCERTAINTY_TILE_MAX and hinton_target:
        return head_slices_config(block_m, elem_size)
    if block_m * whole > UNCERTAINTY_TILE_MAX:
        block_c = max(16, UNCERTAINTY_LONG_TILE // block_m)
        # (32 warps only for up to 4 heads: 8 heads' tiles in 32 warps, 1024 threads at most 64 registers each,
        #  spilled 16 to 24 bytes under Triton 3.9, the kernel report at rows of 5000 and 50257 classes)
        most = 32 if block_m <= 4 else 16
        warps = 4 if n_rows is None else min(most, max(4, next_pow2(cdiv(FILL_WARPS, max(n_rows, 1)))))
        return dict(BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps, ROW_IN_REGISTERS=block_c >= n_cols)
    lanes = block_m * whole
    return dict(BLOCK_M=block_m, BLOCK_C=whole, num_warps=4 if lanes <= 1024 else min(32, lanes // 256),
                ROW_IN_REGISTERS=True)


# `uncertainty`'s long rows (those uncertainty_config does not hold whole) in two launches instead of one
# (uncertainty_split_config; kernels/uncertainty.py's _head_entropy_kernel and _mixture_kernel): the one-kernel
# form walks a whole (M, C) row per program twice, 512 KiB of bf16 at (4096, 8, 32000), with hundreds of MB of
# rows in flight (4-warp programs of 72 registers under Triton 3.6, 110 under 3.8, sm_90), so its second read
# comes from DRAM, as the split form's does; 1.59 ms there on the H200 (2026-12-04), where two reads at the loss
# kernel's rate take about 1.15. Off until an H200 run shows it wins (bench/gpu_check.py: fasthydra/unc-split).
UNCERTAINTY_SPLIT = False


def uncertainty_split_config(n_heads: int, n_cols: int, n_rows: int) -> dict:
    """The split form's two launches over n_rows (B) rows of n_heads x n_cols: the statistics one (STATS_*) walks
    one (batch, head) row a program in tiles of up to MAX_BLOCK_C classes (one 16-byte slice a thread and tile, as
    the loss kernel's long rows: 8 warps at 2048); the mixture one walks (heads, classes) tiles as the one-kernel
    form's pass 2 (uncertainty_config, 4 warps), each program over cols_per_prog classes of one row: the whole row
    where there are rows enough for about STREAM_PROGRAMS programs, else col_blocks blocks of it."""
    stats_c = max(16, min(next_pow2(n_cols), MAX_BLOCK_C))
    mix = uncertainty_config(n_heads, n_cols)
    tiles = cdiv(max(n_cols, 1), mix["BLOCK_C"])
    blocks = max(1, min(tiles, cdiv(STREAM_PROGRAMS, max(n_rows, 1))))
    cols_per_prog = cdiv(tiles, blocks) * mix["BLOCK_C"]
    return dict(STATS_BLOCK_C=stats_c, STATS_WARPS=max(1, min(8, stats_c // 256)), BLOCK_M=mix["BLOCK_M"],
                BLOCK_C=mix["BLOCK_C"], num_warps=mix["num_warps"], cols_per_prog=cols_per_prog,
                col_blocks=cdiv(max(n_cols, 1), cols_per_prog))


# Elements of one (heads, classes) tile of uncertainty's backward kernel: a row of up to UNCERTAINTY_GRAD_ROW_MAX
# is read once and held (four fp32 values per element live: logits, p, V and the product); longer rows walk tiles
# of up to UNCERTAINTY_GRAD_TILE elements three times, in `head_slices_config`'s layout (so does the Hinton target's
# kernel, twice). Until the fifty-first session those long-row tiles were (heads, classes) blocks whose classes
# filled fewer threads than the program had (2048 elements in 8 warps; the target's 8192 in 32): the heads went
# across warps and every tile's sums over heads and over classes crossed warps through shared memory, 8 and 18
# barriers a tile in the sm_90 SASS, 124 instructions per element in the backward. On the H200 (2026-12-04, run 3)
# they took 21.0 ms (uncertainty forward + backward) and 21.6 ms (Hinton loss, 0.45x eager's speed) at
# (4096, 8, 32000) bf16, where the forward alone, whose tiles keep the heads inside a thread, took 1.6 ms.
UNCERTAINTY_GRAD_ROW_MAX = 4096
UNCERTAINTY_GRAD_TILE = 8192


def head_slices_config(block_m: int, elem_size: int, aligned: bool = True) -> dict:
    """Long (heads, classes) rows walked in (BLOCK_M, BLOCK_C) tiles whose classes fill the threads of the
    program (up to 4 warps): each thread holds VEC contiguous classes (one 16-byte load) of every head, so that sums
    over heads (the mixture, the log-mean target) never leave a thread, and a per-head sum over classes is kept per
    thread (its VEC classes reduced in place) until the row ends (kernels/uncertainty.py). Tiles of up to
    UNCERTAINTY_GRAD_TILE elements: 8 heads of 16-bit logits take 1024 classes in 4 warps (64 values a thread),
    of fp32 ones 512."""
    vec = max(1, 16 // elem_size)
    block_c = min(32 * 4 * vec, max(16, UNCERTAINTY_GRAD_TILE // block_m))
    warps = max(1, min(4, block_c // (32 * vec)))
    if not aligned:  # rows of C not a multiple of 16 load one class at a time and sum VEC classes by shuffles: half
        #              the tile (the backward at (8, 1000) fp32 spilled 16 bytes in its loops on sm_80, Triton 3.6).
        #              Its first pass stays out of spread slices (spread_slices: more threads than slices): with
        #              VEC halved to fill them, 3.6 spilled 8 bytes in the loops again on sm_80 (bf16 and fp32)
        block_c = max(16, block_c // 2)
    return dict(BLOCK_M=block_m, BLOCK_C=block_c, VEC=min(vec, block_c), num_warps=warps, ROW_IN_REGISTERS=False)


def uncertainty_grad_config(n_heads: int, n_cols: int, elem_size: int = 4) -> dict:
    """Tiles and warps of uncertainty's backward kernel for logits of elem_size bytes: a short row whole (about
    8 elements per thread), a long one in `head_slices_config`'s tiles."""
    block_m = max(2, next_pow2(n_heads))
    whole = max(16, next_pow2(n_cols))
    if block_m * whole <= UNCERTAINTY_GRAD_ROW_MAX:
        return dict(BLOCK_M=block_m, BLOCK_C=whole, num_warps=max(1, min(16, block_m * whole // 256)),
                    ROW_IN_REGISTERS=True)
    return head_slices_config(block_m, elem_size, n_cols % 16 == 0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 maths for fp16/bf16/fp32 inputs; float64 stays float64 (the torch path's reference mode)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Kernels that reduce a loss in their last program (kernels/reduce.py) find it by a count of finished
# programs that every launch leaves at 0. No two launches that can run at once may share a count: one per
# CUDA stream that launches them eagerly (launches on one stream never overlap), and one per launch
# captured into a CUDA graph (a graph replays on whatever stream is current at replay time, and replays of
# two graphs may overlap). Counts come from a per-device block of COUNT_SLOTS made outside any capture.
COUNT_SLOTS = 1024
# Partial sums that last program reads per step, at most (tests shrink it to make it loop): its loop is a
# chain of dependent loads (each ~1 us from L2), so few long steps: 32768 partials (the loss kernel at
# gpu-large, 8 warps) in 8 steps of 4096 rather than 256 of 128; no more than the partials there are,
# and at most 16 per thread (32 per thread spilled 16 bytes in a 4-warp loss kernel on sm_80).
REDUCE_BLOCK = 4096


def reduce_block(n_parts: int, num_warps: int) -> int:
    """BLOCK_P of a launch of num_warps warps whose last program sums n_parts partials."""
    return min(REDUCE_BLOCK, 16 * 32 * num_warps, max(16, next_pow2(n_parts)))


_counts: dict = {}  # device -> int32 (COUNT_SLOTS,), zeros
_slots_used: dict = {}  # device -> how many of its slots have been handed out
_count_views: dict = {}  # (device, stream handle) -> the (1,) view of its slot
_count_lock = threading.Lock()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _take_slot(device: torch.device) -> torch.Tensor | None:
    """A slot of the device's block that nobody else has, or None once all are taken (lock held)."""
    used = _slots_used.get(device, 0)
    if device not in _counts or used >= COUNT_SLOTS:
        return None
    _slots_used[device] = used + 1
    return _counts[device][used:used + 1]


def finished_count(device: torch.device) -> torch.Tensor:
    """A (1,) int32 count at 0 for a launch's last-program reduction (kernels/reduce.py): the current
    stream's on `device`, or, inside a CUDA-graph capture, one for this launch alone."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if _capturing(device):
        with _count_lock:
            view = _take_slot(device)
        # with no slot left (or no block yet: it is made outside captures), a count zeroed inside the
        # graph, before each replay of this launch
        return view if view is not None else torch.zeros(1, dtype=torch.int32, device=device)
    # the current stream's handle, as torch.cuda.current_stream(device).cuda_stream (without the Stream object it
    # builds, several microseconds a call)
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    view = _count_views.get((device, stream))
    if view is not None:
        return view
    with _count_lock:  # a stream's first call: two threads must not take one slot
        view = _count_views.get((device, stream))
        if view is not None:
            return view
        if device not in _counts:
            _counts[device] = torch.zeros(COUNT_SLOTS, dtype=torch.int32, device=device)
        view = _take_slot(device)
        if view is None:  # more streams than slots: a fresh count each call (one small fill launch)
            return torch.zeros(1, dtype=torch.int32, device=device)
        _count_views[(device, stream)] = view
        return view


# ----------------------------------------------------------------------------------------------
# The temperature: a number, or a one-element tensor that the kernels read on the device (an annealed T
# under torch.compile or in a CUDA graph changes without a recompile or a new capture).
# ----------------------------------------------------------------------------------------------

# Temperatures whose square and inverse float32 holds with room to spare (past them a step raised a
# RuntimeError from a float32 scalar, or returned NaN: T^2 * KL with T^2 = inf).
TEMPERATURE_RANGE = (2.0**-64, 2.0**63)
# Tests set this to keep a CPU temperature tensor a tensor, as a CUDA one is kept (the kernels then read it
# from memory under the interpreter, and the torch paths compute with it as a tensor), instead of reading
# its value at the call (which costs nothing on the CPU).
KEEP_CPU_TEMPERATURE_TENSOR = False


def temperature_error(value: float) -> ValueError | None:
    """The ValueError of a temperature outside TEMPERATURE_RANGE (NaN and T <= 0 included), else None."""
    # One chained comparison, false for NaN, infinities and T <= 0 too: under torch.compile a temperature can be
    # symbolic, where a comparison is a guard and math.isfinite would break the graph (error path only).
    if TEMPERATURE_RANGE[0] <= value <= TEMPERATURE_RANGE[1]:
        return None
    if value != value or value in (float("inf"), float("-inf")) or value <= 0:
        return ValueError(f"temperature must be finite and > 0, got {value}")
    return ValueError(f"temperature must lie in [2^-64, 2^63] (its square and inverse are float32 factors of the "
                      f"loss and gradient), got {value}")


def op_temperature(temperature: float, temperature_t: torch.Tensor | None, impl: str = "triton"):
    """What an op computes with: the number `temperature` when no tensor came (temperature_t None); a CPU
    tensor's value (read at no cost, checked: ValueError); else a 0-dim tensor on the logits' device (fp32, or
    fp64 as given), never read on the host. Such a tensor's value is checked on the device: the Triton kernels
    (and, for the torch ops, a select made here) turn a temperature outside TEMPERATURE_RANGE into NaN, so
    the loss is NaN and nothing passes silently; FASTHYDRA_STRICT=1 checks it at the call instead (a sync)."""
    if temperature_t is None:
        return temperature
    t = temperature_t.detach().reshape(())
    traced = torch.compiler.is_compiling() or type(t) is not torch.Tensor  # (a traced backward: no value to read)
    if t.device.type == "cpu" and not KEEP_CPU_TEMPERATURE_TENSOR and not traced:
        value = float(t)
        err = temperature_error(value)
        if err is not None:
            raise err
        return value
    from fasthydra.ops.checks import strict  # (checks imports this module)

    if strict() and not traced:
        err = temperature_error(float(t))
        if err is not None:
            raise err
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    if impl != "triton":
        lo, hi = TEMPERATURE_RANGE
        t = torch.where((t >= lo) & (t <= hi), t, float("nan"))
    return t


def temperature_scalars(temperature) -> tuple:
    """A launch's view of the temperature: (factor, temp, T_PTR). A number: factor = T (the launcher folds it
    into its scalar arguments: 1 / factor, factor^2, factor * coefficient), temp = T (unused), T_PTR False. A
    device tensor: factor 1.0, temp the tensor, T_PTR True (the kernel reads T and applies it itself,
    ``kernels.softmax_kl._device_temperature``)."""
    if isinstance(temperature, torch.Tensor):
        return 1.0, temperature, True
    return temperature, temperature, False


def temperature_factor(temperature) -> float:
    """T where the launch folds it into its scalars, 1.0 where the kernel reads it from memory."""
    return temperature_scalars(temperature)[0]
