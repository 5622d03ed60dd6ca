"""Value checks that need to look at tensor data, without stalling the GPU.

On the CPU a check costs no stall, so errors are raised at once. On CUDA the kernels (or, on the
torch path, a few device-side reductions) OR error bits into a per-device int32 word, one slot per
op; the host never waits for it. After a launch the word is copied without blocking into pinned
host memory behind a CUDA event (at most one copy in flight: the word is sticky, so a later copy
sees anything an earlier one missed), and every later call of any op polls that event with
``event.query()`` (which does not synchronise). Once the copy has landed and shows a bit, the call
raises the ValueError, naming the op and how many calls ago it ran, and clears the word. Copies are
issued at most every COPY_INTERVAL_S (10 ms): in a loop of fast steps the copy, its event and the
query that waits for it would otherwise be three CUDA calls per step (tens of microseconds each on a
slow host), and a bad call between two copies is reported by the next one. Meanwhile
the loss of a bad step is NaN, so nothing passes silently. ``FASTHYDRA_STRICT=1`` (or
``strict_checks(True)``) checks synchronously after every launch instead, as on the CPU.
Under CUDA-graph capture no copy is issued (the word is still written at each replay);
``raise_pending_errors(sync=True)`` reads it on demand, and ``raise_pending_errors(sync=False)``, once a step
of a graphed loop, starts the copies the replays do not and raises what a landed one shows, without waiting.

Bits: 1 a NaN teacher logit, 2 a +inf teacher logit, 4 a teacher row that is -inf for every class;
8 a Gaussian teacher variance not finite and > 0, 16 a Gaussian teacher mean not finite.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
import time

import torch

from ._common import cdiv, helper_kernels_run_on, no_values, topk_check_config
from .launch import launch

NAN, POSINF, ALL_NEGINF = 1, 2, 4
BAD_VAR, BAD_MEAN = 8, 16  # Gaussian teachers: a variance not finite and > 0, a mean not finite
BAD_INDEX, REPEATED_INDEX = 64, 128  # top-k teachers: a class index outside [0, C), one kept twice in a row
# One slot per op that reads teacher values (so the error names the op that saw them).
OPS = ("hydra_kl_loss", "hinton_kl_loss", "distill_loss", "gaussian_kl_loss")

_strict_override: bool | None = None
# The leading shape * of the caller's tensors while a public call runs on them flattened to rows (a sequence
# batch (B, T, M, C) as (B*T, M, C)), so that error messages name the shapes and indices the caller passed.
_caller_lead: contextvars.ContextVar = contextvars.ContextVar("fasthydra_caller_lead", default=None)
_NO_LEAD = contextlib.nullcontext()
# The public op a call runs for where it runs another op's implementation (hinton_kl_loss with one member runs
# hydra_kl's on the member itself), so that its value errors name the op the caller called.
_caller_op: contextvars.ContextVar = contextvars.ContextVar("fasthydra_caller_op", default=None)


@contextlib.contextmanager
def _set_within(var: contextvars.ContextVar, value):
    """var = value inside the block, its earlier value after it."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def caller_lead(lead: tuple):
    """Context of a public call that flattens the leading shape `lead` of its tensors into rows: inside it the
    value checks' messages show `lead` in place of the row count (an outer call's lead wins: a module's call
    on (B, T, ...) stays so named through the functional call it makes on rows). A no-op for one leading
    dimension, and under torch.compile (the ops then name the rows)."""
    if len(lead) == 1 or torch.compiler.is_compiling() or _caller_lead.get() is not None:
        return _NO_LEAD
    return _set_within(_caller_lead, tuple(lead))


def caller_op(op: str):
    """Context of a public call `op` that runs another op's implementation: inside it that op's value checks
    write and name `op`'s error slot (calling_op). A no-op under torch.compile (the ops then name themselves)."""
    if torch.compiler.is_compiling():
        return _NO_LEAD
    return _set_within(_caller_op, op)


def calling_op(default: str) -> str:
    """The op whose name a value check inside an op's implementation reports: the public call's (caller_op), else
    `default`, the op's own."""
    return _caller_op.get() or default


def _shown(shape) -> tuple:
    """`shape` as the caller passed it: rows of a flattened call shown as its leading shape."""
    shape, lead = tuple(shape), _caller_lead.get()
    if lead is None or not shape or shape[0] != math.prod(lead):
        return shape
    return (*lead, *shape[1:])


def _shown_index(index: tuple, shape) -> tuple:
    """An index into a tensor of `shape` (rows first) as an index into the caller's tensor (see _shown)."""
    lead = _caller_lead.get()
    if lead is None or not shape or tuple(shape)[0] != math.prod(lead):
        return tuple(index)
    return (*(int(i) for i in torch.unravel_index(torch.tensor(index[0]), lead)), *index[1:])
# Tests only: treat CPU tensors like CUDA ones (deferred reporting through a copy and an "event" that
# has always landed), so the no-sync machinery is exercised where no GPU is.
_DEFER_ON_CPU = False
# Seconds between two copies of the error word to the host (at most one in flight at any time).
COPY_INTERVAL_S = 0.01
_clock = time.perf_counter  # tests replace it


class _LandedEvent:
    def record(self):
        pass

    def query(self):
        return True


def strict_checks(enabled: bool | None) -> None:
    """Force synchronous value checks on (True) or off (False); None defers to FASTHYDRA_STRICT."""
    global _strict_override
    _strict_override = enabled


def strict() -> bool:
    if _strict_override is not None:
        return _strict_override
    return os.environ.get("FASTHYDRA_STRICT", "0") not in ("", "0")


_BIT_TEXT = ((NAN, "NaN"), (POSINF, "+Inf"),
             (ALL_NEGINF, "a row that is -Inf for every class (its softmax is undefined)"),
             (BAD_VAR, "a teacher_var that is not finite and > 0"), (BAD_MEAN, "a teacher_mean with NaN or Inf"),
             (BAD_INDEX, "a top-k class index outside [0, C)"),
             (REPEATED_INDEX, "a top-k class index kept twice in one row (indices must be distinct)"))


def _message(op: str, bits: int, shape, when: str) -> str:
    what = " and ".join(text for bit, text in _BIT_TEXT if bits & bit)
    shape_txt = f" (shape {tuple(shape)})" if shape is not None else ""
    return f"{op}: the teacher contained {what}{shape_txt}{when}"


class _DeviceFlags:
    """The error word of one CUDA device, its pinned copy and the event that says the copy landed."""

    def __init__(self, device: torch.device):
        self.word = torch.zeros(len(OPS), dtype=torch.int32, device=device)
        self.slots = {op: self.word[i:i + 1] for i, op in enumerate(OPS)}  # made once: a view costs a few us
        self.host = torch.zeros(len(OPS), dtype=torch.int32, pin_memory=device.type == "cuda")
        self.event = torch.cuda.Event() if device.type == "cuda" else _LandedEvent()
        self.in_flight = False
        self.calls = 0  # op calls that touched the word
        self.copied_at = 0  # self.calls when the copy in flight was issued
        self.copy_time = float("-inf")  # _clock() when the last copy was issued
        self.clean_at = 0  # self.calls when a landed copy last showed no error
        self.shapes: dict[str, tuple] = {}
        self.on_cuda = device.type == "cuda"


_flags: dict[torch.device, _DeviceFlags] = {}
_flags_lock = threading.Lock()


def _lookup(device) -> tuple[torch.device, _DeviceFlags | None]:
    """The device's error word, if made: a tensor's device (as the ops pass it) is found without making a
    torch.device; any other spelling ("cuda", "cuda:0", a bare torch.device("cuda")) is normalised first."""
    f = _flags.get(device)
    if f is not None:
        return device, f
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device, _flags.get(device)


def _flags_of(device: torch.device) -> _DeviceFlags:
    device, f = _lookup(device)
    if f is None:
        # made once per device, under a lock: two threads' first calls (a data-parallel step per GPU thread) would
        # otherwise each make a word, and the kernels of the call whose word was replaced would write one that no
        # poll ever reads
        with _flags_lock:
            f = _flags.get(device)
            if f is None:
                f = _flags[device] = _DeviceFlags(device)
    return f


def error_word(device: torch.device, op: str) -> torch.Tensor:
    """The (1,) int32 slot that the kernels of `op` OR their error bits into."""
    return _flags_of(device).slots[op]


def _raise_from(f: _DeviceFlags, values, calls_seen: int, deferred: bool) -> None:
    bad = [(op, int(v)) for op, v in zip(OPS, values) if int(v)]
    if not bad:
        f.clean_at = calls_seen
        return
    f.word.zero_()  # reported once; the stream orders this after the kernels that set it
    f.in_flight = False
    when = ""
    if deferred:
        # The bad call lies after the last clean reading and at or before the reading that saw it;
        # counted back from the call now running (calls + 1). (A reading taken by raise_pending_errors counts
        # the calls before it.)
        lo, hi = max(1, f.calls + 1 - calls_seen), f.calls - f.clean_at
        if hi < lo:  # no op call between the two readings: the kernels of a CUDA-graph replay set it
            when = ("; seen in the error word after the last fasthydra call that ran its Python (a CUDA-graph "
                    "replay's kernels write it too) and reported now")
        else:
            ago = f"{lo}" if lo == hi else f"{lo} to {hi}"
            when = (f"; seen by a fasthydra call {ago} call(s) ago and reported now, without stalling the GPU "
                    f"(FASTHYDRA_STRICT=1 raises at the call itself)")
    # Every op that saw something (a NaN teacher of hinton_kl_loss also NaNs the target its inner
    # hydra_kl_loss kernel reads, so both may speak), the words' order otherwise.
    raise ValueError("; ".join(_message(op, bits, f.shapes.get(op), "") for op, bits in bad) + when)


def poll(device: torch.device) -> None:
    """Raises the ValueError of a landed copy that shows an error; never waits for the GPU."""
    if torch.compiler.is_compiling():
        return
    f = _lookup(device)[1]
    if f is None or not f.in_flight or (not f.on_cuda and not _DEFER_ON_CPU):
        return  # nothing in flight (a CPU word never is, unless _DEFER_ON_CPU)
    if f.on_cuda and torch.cuda.is_current_stream_capturing():
        return  # capturing a graph (where even an event query is not allowed)
    if not f.event.query():
        return
    f.in_flight = False
    _raise_from(f, f.host.numpy(), f.copied_at, deferred=True)


def after_launch(device: torch.device, op: str, shape) -> None:
    """Called right after the launches of `op` that wrote the error word."""
    if torch.compiler.is_compiling():
        return
    f = _flags_of(device)
    f.calls += 1
    f.shapes[op] = _shown(shape)
    if not f.on_cuda and not _DEFER_ON_CPU:  # CPU tensors: no stall, raise at once
        _raise_from(f, f.word.numpy(), f.calls, deferred=False)
        return
    if strict():
        if f.word.is_cuda:
            torch.cuda.current_stream(f.word.device).synchronize()
        _raise_from(f, f.word.cpu().numpy(), f.calls, deferred=False)
        return
    _copy_word(f)


def _copy_word(f: _DeviceFlags) -> None:
    """Starts the word's non-blocking copy to the host behind an event, on the current stream (after the launches
    that wrote it), unless one is in flight, one was started less than COPY_INTERVAL_S ago, or a graph is being
    captured."""
    if f.in_flight:
        return
    now = _clock()
    if now - f.copy_time < COPY_INTERVAL_S:
        return  # a later call copies the word (sticky: this call's bits are still in it)
    # (on the word's device: the ops run there already, raise_pending_errors may not; its event records on it)
    with torch.cuda.device(f.word.device) if f.on_cuda else contextlib.nullcontext():
        if f.on_cuda and torch.cuda.is_current_stream_capturing():
            return  # (asked last: a CUDA query, where the clock above usually answers first)
        f.host.copy_(f.word, non_blocking=True)
        f.event.record()
    f.in_flight = True
    f.copied_at = f.calls
    f.copy_time = now


def raise_pending_errors(sync: bool = True) -> None:
    """Reports teacher value errors the GPU has flagged but no call has raised yet: after CUDA-graph replays (their
    kernels write the word, but none of the Python that copies it runs), or at the end of training.
    sync=True waits for the device, reads the word and raises. sync=False never waits: it raises what a landed copy
    of the word shows, and starts a copy where none is in flight (at most one every COPY_INTERVAL_S, as the ops do),
    so that a graphed training loop calling it once a step hears of a bad teacher a step or so after the replay that
    saw it, without a host synchronisation."""
    for f in list(_flags.values()):
        if f.word.device.type != "cuda" and not _DEFER_ON_CPU:
            continue  # CPU errors were raised at their call
        if sync:
            if f.word.is_cuda:
                torch.cuda.synchronize(f.word.device)
            f.in_flight = False
            _raise_from(f, f.word.cpu().numpy(), f.calls + 1, deferred=True)
            continue
        poll(f.word.device)
        _copy_word(f)


def flag_teacher_rows(teacher: torch.Tensor, op: str) -> None:
    """The torch path: one row-max reduction answers all three questions (max is NaN with a NaN, +inf
    with a +inf, -inf exactly when the whole row is -inf); on CUDA its verdict goes to the error word
    through one small Triton launch (no host read), on the CPU the error is raised at once."""
    if teacher.numel() == 0 or no_values(teacher):
        return
    if teacher.device.type != "cuda" and not _DEFER_ON_CPU:
        check_teacher_values(teacher)
        return
    _flag_row_values(teacher.detach().amax(dim=-1), op)
    after_launch(teacher.device, op, teacher.shape)


# Values per launch of the row-check kernel's programs.
FLAG_BLOCK = 1024


def _flag_row_values(values: torch.Tensor, op: str) -> None:
    """NaN (bit 1), +inf (2) and -inf (4) among one value per row into `op`'s error word: one Triton
    launch where Triton runs on these tensors, else device-side torch ops (several small launches)."""
    values = values.reshape(-1)
    word = error_word(values.device, op)
    if helper_kernels_run_on(values):
        from fasthydra.kernels.checks import _flag_rows_kernel

        n = values.numel()
        launch(_flag_rows_kernel, ((n + FLAG_BLOCK - 1) // FLAG_BLOCK,), values, n, word, BLOCK=FLAG_BLOCK)
        return
    bits = (torch.isnan(values).any().int() * NAN + torch.isposinf(values).any().int() * POSINF
            + torch.isneginf(values).any().int() * ALL_NEGINF)
    word.bitwise_or_(bits)


def topk_index_bits(indices: torch.Tensor, values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """0-dim int32 on the device: BAD_INDEX if an index is outside [0, C), REPEATED_INDEX if a row keeps
    a class twice (padding entries, value -inf, may repeat one). One sort along k."""
    idx = indices.long()
    live = ~torch.isneginf(values)
    out_of_range = ((idx < 0) | (idx >= num_classes)).any()
    k = idx.shape[-1]
    # padding entries get distinct negative stand-ins, so that only live duplicates compare equal
    stand_in = -1 - torch.arange(k, device=idx.device)
    ranked = torch.where(live, idx, stand_in).sort(dim=-1).values
    repeated = (ranked[..., 1:] == ranked[..., :-1]).any() if k > 1 else torch.zeros((), dtype=torch.bool,
                                                                                         device=idx.device)
    return out_of_range.int() * BAD_INDEX + repeated.int() * REPEATED_INDEX


def flag_topk_teacher(values: torch.Tensor, indices: torch.Tensor, num_classes: int, op: str,
                      values_too: bool = True) -> None:
    """Value checks of a top-k teacher: indices in range and distinct, values finite or -inf and not -inf
    in a whole row (values_too=False when the kernel checks the values while it reads them). On the
    CPU the error comes at once; on CUDA through the error word, with device-side ops only."""
    if values.numel() == 0 or no_values(values):
        return
    if (values.device.type == "cuda" or _DEFER_ON_CPU) and values.shape[-1] <= TOPK_CHECK_KERNEL_MAX_K \
            and helper_kernels_run_on(values):
        _flag_topk_triton(values, indices, num_classes, op, values_too)
        after_launch(values.device, op, values.shape)
        return
    bits = topk_index_bits(indices, values, num_classes)
    if values_too:
        row_max = values.detach().amax(dim=-1)
        bits = bits + (torch.isnan(row_max).any().int() * NAN + torch.isposinf(row_max).any().int() * POSINF
                       + torch.isneginf(row_max).any().int() * ALL_NEGINF)
    if values.device.type != "cuda" and not _DEFER_ON_CPU:
        word = int(bits)
        if word:
            raise ValueError(_message(op, word, _shown(values.shape), ""))
        return
    error_word(values.device, op).bitwise_or_(bits)
    after_launch(values.device, op, values.shape)


# Top-k teachers of up to this many entries a row are checked by one launch of _flag_topk_kernel (every pair of a
# row's ids compared: k^2 / 2 comparisons a row, 32768 at this k); wider ones by torch ops (a sort along k, about 17
# small launches).
TOPK_CHECK_KERNEL_MAX_K = 256


def _flag_topk_triton(values: torch.Tensor, indices: torch.Tensor, num_classes: int, op: str,
                      values_too: bool) -> None:
    """flag_topk_teacher's checks as one launch of kernels.checks._flag_topk_kernel into op's error word."""
    from fasthydra.kernels.checks import _flag_topk_kernel

    k = values.shape[-1]
    values = values.reshape(-1, values.shape[-2], k)  # (rows, M, k): a view where it can be
    indices = indices.reshape(-1, indices.shape[-2], k)
    values = values if values.stride(-1) == 1 else values.contiguous()
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    rows = values.shape[0] * values.shape[1]
    cfg = topk_check_config(k)
    launch(_flag_topk_kernel, (cdiv(rows, cfg["BLOCK_R"]),), values, indices, error_word(values.device, op),
           rows, values.shape[1], k, num_classes, values.stride(0), values.stride(1), indices.stride(0),
           indices.stride(1), BAD_INDEX=BAD_INDEX, REPEATED_INDEX=REPEATED_INDEX, VALUES=values_too, **cfg)


def flag_gaussian_teacher(var_ok: torch.Tensor, mean_ok: torch.Tensor, shape) -> None:
    """Device-side verdicts of the Gaussian teacher checks (0-dim bool tensors) into the error word."""
    bits = (~var_ok).int() * BAD_VAR + (~mean_ok).int() * BAD_MEAN
    error_word(var_ok.device, "gaussian_kl_loss").bitwise_or_(bits)
    after_launch(var_ok.device, "gaussian_kl_loss", shape)


def check_teacher_values(teacher: torch.Tensor, name: str = "teacher_logits") -> None:
    """Immediate check, CPU tensors only (reading the verdict is a host read; CUDA tensors go through
    flag_teacher_rows and the error word): NaN or +Inf anywhere, or a row that is -Inf everywhere, is
    an error; a lone -Inf masks a class."""
    if teacher.numel() == 0:
        return
    if teacher.shape[-1] <= SHORT_ROWS and _all_finite(teacher.detach()):
        return
    row_max, shape = teacher.detach().amax(dim=-1), _shown(teacher.shape)
    if bool(torch.isnan(row_max).any()):
        raise ValueError(f"{name} contains NaN (shape {shape})")
    if bool(torch.isposinf(row_max).any()):
        raise ValueError(f"{name} contains +Inf (shape {shape})")
    if bool(torch.isneginf(row_max).any()):
        where = _shown_index(tuple(torch.nonzero(torch.isneginf(row_max))[0].tolist()), teacher.shape)
        raise ValueError(f"{name} has a row that is -Inf for every class (at index {where}, "
                         f"shape {shape}): its softmax is undefined")


# Rows up to this many classes are checked by one reduction over the whole tensor first: torch's reduction
# along a short last dimension is slow on the CPU (at (4096, 8, 10) a row max took 390 us, aminmax 42 us); at 128
# classes and more the row max is as fast, and gives every verdict in one pass.
SHORT_ROWS = 64


def _all_finite(t: torch.Tensor) -> bool:
    """One aminmax over the whole tensor (a NaN makes both extremes NaN): no NaN and no infinity anywhere. Where it
    says no (a masked class, -inf, is allowed), the row max tells which error, if any."""
    low, high = torch.aminmax(t)
    return bool((low > -math.inf) & (high < math.inf))
