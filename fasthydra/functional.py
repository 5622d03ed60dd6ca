"""Functional API: input validation, implementation dispatch and the public loss functions.

Every public function validates its arguments on the host before any kernel runs, and raises a
``ValueError`` (or ``TypeError`` for wrong types; dtype errors are both) naming the argument and
the shapes it saw. Nothing is broadcast: shapes must match exactly.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from numbers import Integral, Real

import torch

from fasthydra.ops._common import (TEMPERATURE_RANGE, auto_fallback_reason, forward_ad_active, inference_tensor,
                                   interpreting, no_values, on_tensor_device, op_form, op_temperature, save_inputs,
                                   saved_inputs, temperature_error, triton_available)
from fasthydra.ops import checks as _checks
from fasthydra.ops.checks import (caller_lead, caller_op, flag_gaussian_teacher, flag_teacher_rows, flag_topk_teacher,
                                  poll)
from fasthydra.ops.gaussian_kl import gaussian_kl_torch, split_gaussian
from fasthydra.ops.hydra_kl import masked_reduction, neg_dots_over, shifted_values
from fasthydra.ops.uncertainty import ensemble_log_mean_triton, topk_log_mean_triton
from fasthydra.ops import library as _ops
from fasthydra.ops import native
from fasthydra.reference import TopKTeacher, Uncertainty, uncertainty_ref

IMPLS = ("auto", "triton", "torch")
REDUCTIONS = ("mean", "sum", "none")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class InputDtypeError(TypeError, ValueError):
    """A tensor of the wrong dtype (an integer tensor, say): both a TypeError and a ValueError."""


class ImplUnavailableError(RuntimeError, ValueError):
    """The requested implementation cannot run here (Triton missing, CPU tensors without the interpreter)."""


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


# The floating dtypes the ops compute in. Not every floating dtype torch has: float8 (e4m3, e5m2, e8m0) and float4
# are storage formats that neither torch's CPU reductions nor the kernels' loads take (a float8 student's loss
# came back rounded to float8, a float8 teacher raised from inside aminmax).
FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_STRIDED = torch.strided


def _negation_resolved(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The public functions' arguments with every tensor whose negative bit is set (a lazily negated view:
    ``z.conj().imag`` of a complex z, ``torch._neg_view``) replaced by its value (``resolve_neg``, a differentiable
    copy): the kernels and the C row kernels read storage, which holds such a tensor's values un-negated (the loss
    of a negated student came back as that of the student itself, on every path). A TopKTeacher's tensors too. One
    ``is_neg`` read per tensor argument; a copy only where one is set. Not while torch.compile traces (dynamo cannot
    trace ``is_neg``): the traced program calls the custom ops through the dispatcher, which resolves such a view
    itself (its Negative fallback)."""
    for group in (args, kwargs.values()):  # (no function call per argument: this runs on every public call)
        for a in group:
            if isinstance(a, torch.Tensor):
                if a.is_neg():
                    return tuple(map(_resolved, args)), {key: _resolved(a) for key, a in kwargs.items()}
            elif isinstance(a, TopKTeacher) and any(isinstance(t, torch.Tensor) and t.is_neg() for t in a):
                return tuple(map(_resolved, args)), {key: _resolved(a) for key, a in kwargs.items()}
    return args, kwargs


def _resolved(a):
    if isinstance(a, TopKTeacher):
        return TopKTeacher(*map(_resolved, a))
    return a.resolve_neg() if isinstance(a, torch.Tensor) and a.is_neg() else a


def _public(fn):
    """A public function: its arguments' negated views resolved (``_negation_resolved``), run on its first
    tensor's CUDA device (``on_tensor_device``)."""
    return on_tensor_device(fn, _negation_resolved)


def _check_tensor(name: str, value, ndims: tuple[int, ...] | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if type(value) is not torch.Tensor and type(value) is not torch.nn.Parameter:  # (a subclass: rare, cheap)
        _refuse_dtensor(name, value)
    if value.layout is not _STRIDED or value.is_nested:
        _check_layout(name, value)
    if value.dtype not in FLOAT_DTYPES:
        low = " (a float8 or float4 tensor: cast it to bfloat16 or float32 first)" if value.dtype.is_floating_point \
            else ""
        raise InputDtypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), "
                              f"got {value.dtype} with shape {tuple(value.shape)}{low}")
    if ndims is not None and value.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    return value


def _check_layout(name: str, value: torch.Tensor) -> None:
    """Dense (strided) tensors only: the kernels, the C row kernels and the views the ops take read memory by
    strides. A sparse, nested or MKL-DNN tensor otherwise failed deep inside with torch's "Could not run ..." (or,
    through head(x), ran on the CPU's sparse GEMM and nowhere else)."""
    if value.layout is _STRIDED and not value.is_nested:
        return
    if value.is_nested:
        raise TypeError(f"{name} is a nested tensor; fasthydra's ops take dense (strided) tensors: pad it "
                        f"(torch.nested.to_padded_tensor) and pass row_mask with the rows that count")
    raise TypeError(f"{name} has layout {value.layout}; fasthydra's ops take dense (strided) tensors: pass "
                    f"{name}.to_dense()")


def _refuse_dtensor(name: str, value: torch.Tensor) -> None:
    """A DTensor (FSDP2's sharded parameters, tensor parallelism) holds a shard, not the tensor: the kernels
    would fail deep inside, and torch's ops on an unevenly sharded head stack with a sharding error."""
    for where in ("torch.distributed.tensor", "torch.distributed._tensor"):  # (torch 2.5+, 2.4)
        dtensor = getattr(sys.modules.get(where), "DTensor", None)
        if isinstance(dtensor, type) and isinstance(value, dtensor):
            raise TypeError(
                f"{name} is a DTensor (a parameter sharded by FSDP's fully_shard, or a tensor-parallel layout); "
                "fasthydra's ops take whole tensors. FSDP gathers a module's parameters around its forward only: "
                "after fully_shard(head), call torch.distributed.fsdp.register_fsdp_forward_method(head, "
                "'distill_loss'), or shard the module whose forward calls distill_loss")


def _check_temperature(temperature, like: torch.Tensor | None = None):
    """A number as a float; a one-element floating tensor (on the CPU or like's device; one that requires grad is
    learned, see _learned_temperature) as it is, its value checked where the op reads it
    (``_common.op_temperature``)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a number or a one-element tensor, got a tensor of shape "
                             f"{tuple(temperature.shape)}")
        _check_layout("temperature", temperature)
        if temperature.dtype not in FLOAT_DTYPES:
            raise TypeError(f"temperature must be a floating tensor (float16, bfloat16, float32 or float64), got "
                            f"{temperature.dtype}")
        if like is not None and temperature.device.type != "cpu" and temperature.device != like.device:
            raise ValueError(f"temperature is on {temperature.device} but the logits are on {like.device}: pass "
                             f"a tensor on the logits' device (or on the CPU, read as a number)")
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a real number or a one-element tensor, got "
                        f"{type(temperature).__name__}")
    temperature = float(temperature)
    err = temperature_error(temperature)
    if err is not None:
        raise err
    return temperature


def _temperature_parts(temperature) -> tuple:
    """The ops' two temperature arguments: (T, None) for a number, (1.0, the tensor) for a tensor."""
    return (1.0, temperature) if isinstance(temperature, torch.Tensor) else (temperature, None)


class _LearnedT(torch.autograd.Function):
    """xs / s for s = T / T.detach(), whose value is 1, with the gradients of the division; T a learned
    temperature (see _learned_temperature). In eager mode the xs themselves (views: no copies, and an op that keeps
    a weak reference to its input for a second backward finds the caller's tensor); compiled, the divisions
    (AOTAutograd of torch 2.4 replays an output that aliases an input as a plain view of it, outside the graph,
    and T's gradient through it was lost). Backward: each x's gradient passes as it is (divided by s = 1); T's is
    -sum <g, x> / T over all of them (``ops.hydra_kl.neg_dots_over``: one launch on a GPU, nothing of the xs' size
    written), a NaN product counted as 0: 0 * inf at a masked class's -inf teacher logit or a padding row's NaN or
    inf, where the division's own backward would make T's gradient NaN. (A NaN gradient there, from a NaN loss or
    upstream gradient, still reaches dL/dT: through _LearnedSquare's 2 L term.) One autograd node for what
    s = T / T0 and the divisions took four. This form (setup_context, a vmap rule) serves torch.func transforms
    and torch.compile; eager calls take the classic form (_classic: a separate setup_context costs a signature
    bind per call, 15 us)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(temperature, *xs):
        if torch.compiler.is_compiling():
            unit = (temperature / temperature).reshape(())  # (exactly 1 for any T in the ops' range)
            return tuple(x / unit for x in xs)
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        save_inputs(ctx, *inputs)  # (a teacher made under torch.inference_mode(): kept, not saved)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads):
        temperature, *xs = saved_inputs(ctx)
        grad_t = None
        if ctx.needs_input_grad[0]:  # d(x / s)/dT = -x / (s^2 T0) = -x / T at s = 1
            pairs = [(g, x) for g, x in zip(grads, xs) if g is not None]
            grad_t = neg_dots_over(temperature, pairs) if pairs else None
        return (grad_t, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:])))


class _LearnedSquare(torch.autograd.Function):
    """loss * s^2 for s = T / T.detach() (value 1; see _LearnedT): the loss as it is (a view in eager mode, a
    product compiled, as there), its gradient passed on, and T's gradient 2 <g, loss> / T. With _LearnedT it
    makes the loss homogeneous of degree 2 in (z, t, T) hold for T's gradient: one node for the square and the
    product."""

    generate_vmap_rule = True

    @staticmethod
    def forward(loss, temperature):
        if torch.compiler.is_compiling():
            return loss * (temperature / temperature).reshape(()).to(loss.dtype)
        return loss.view_as(loss)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None
        loss, temperature = ctx.saved_tensors
        grad_t = None
        if ctx.needs_input_grad[1]:  # (a CPU T of CUDA losses: one copy)
            dot = (grad.to(temperature.dtype) * loss.to(temperature.dtype)).sum()
            grad_t = dot.to(temperature.device).mul_(2.0) / temperature
        return grad if ctx.needs_input_grad[0] else None, grad_t


def _classic(function: type) -> type:
    """The classic form (forward takes ctx) of an autograd.Function written with setup_context, for eager calls
    outside torch.func transforms (whose setup_context costs an inspect.signature bind per call)."""

    def forward(ctx, *inputs):
        function.setup_context(ctx, inputs, None)
        return function.forward(*inputs)

    return type(function.__name__ + "Eager", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(function.backward),
                 "__doc__": f"{function.__name__} in the classic form (see _classic)."})


_LearnedTEager, _LearnedSquareEager = _classic(_LearnedT), _classic(_LearnedSquare)


def _functional_form() -> bool:
    """Whether a Function must take its setup_context form (compiled, or under a torch.func transform). (Dynamo of
    torch 2.4 cannot trace the second call: asked only outside compilation.)"""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def _learned_temperature(temperature) -> bool:
    """A temperature tensor that requires grad, with grad enabled: a learned T. The losses are homogeneous of
    degree 2 in (student logits, teacher logits, T) (``T^2 KL(softmax(t/T) || softmax(z/T))``; `uncertainty` of
    degree 0), so ``L(z, t, T) = s^2 L(z/s, t/s, T0)`` for T0 = T.detach() and s = T / T0, whose value is 1: the
    ops run on the same values with T0 (the kernels unchanged, fp32 inside), and autograd carries
    ``dL/dT = (2 L - <z, dL/dz> - <t, dL/dt>) / T`` (_LearnedT, _LearnedSquare; the teacher's gradient is formed
    for it)."""
    return isinstance(temperature, torch.Tensor) and temperature.requires_grad and torch.is_grad_enabled()


def _learned_square(loss: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """loss * s^2 (see _LearnedSquare) for the learned temperature `learned`."""
    return (_LearnedSquare if _functional_form() else _LearnedSquareEager).apply(loss, learned)


def _learned_scaled(learned: torch.Tensor, *items) -> list:
    """Each item / s (see _LearnedT) for the learned temperature `learned`: tensors, a TopKTeacher (its values),
    None (as it is)."""
    tensors = [item.values if isinstance(item, TopKTeacher) else item for item in items if item is not None]
    scaled = iter((_LearnedT if _functional_form() else _LearnedTEager).apply(learned, *tensors))
    return [None if item is None else TopKTeacher(next(scaled), item.indices) if isinstance(item, TopKTeacher)
            else next(scaled) for item in items]


def _check_int(name: str, value, minimum: int | None = None) -> int:
    """value as an int (bool refused), at least minimum: TypeError / ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_number(name: str, value, positive: bool = False) -> float:
    """A finite real number, > 0 (positive) or >= 0: TypeError / ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_same_device(**tensors) -> None:
    first = None
    for v in tensors.values():  # (a plain loop: a third of the host time of sets and comprehensions)
        if v is None:
            continue
        if first is None:
            first = v.device
        elif v.device != first:
            break
    else:
        return
    seen = ", ".join(f"{k} on {v.device}" for k, v in tensors.items() if v is not None)
    raise ValueError(f"all tensors must be on one device, got {seen}")


def _check_row_mask(row_mask, lead: tuple, against: str, like: torch.Tensor) -> torch.Tensor | None:
    """row_mask: None, or one entry per row, shaped as the leading dimensions `lead` of `against` (a tokenizer's
    (B, T) attention mask for (B, T, ...) inputs), True (or a nonzero integer) for the rows that count.
    Returned flat, (rows,) bool; no value is read (nothing to check: every value is a valid mask)."""
    if row_mask is None:
        return None
    if not isinstance(row_mask, torch.Tensor):
        raise TypeError(f"row_mask must be a torch.Tensor or None, got {type(row_mask).__name__}")
    _check_layout("row_mask", row_mask)
    if row_mask.dtype.is_floating_point or row_mask.dtype.is_complex:
        raise TypeError(f"row_mask must be a bool tensor (or an integer one, nonzero = the row counts), got "
                        f"{row_mask.dtype}; for per-row weights use reduction='none' and weight the rows")
    lead = tuple(lead)
    if tuple(row_mask.shape) != lead:
        raise ValueError(f"row_mask must have shape {lead}, {against}'s leading shape (one entry per row of "
                         f"{against} {tuple(like.shape)}); got {tuple(row_mask.shape)}")
    _check_same_device(**{against: like, "row_mask": row_mask})
    if len(lead) != 1:
        row_mask = row_mask.reshape(-1)
    return row_mask if row_mask.dtype == torch.bool else row_mask != 0


def _rows(t: torch.Tensor, tail: int) -> torch.Tensor:
    """t (*, <tail dims>) as (rows, <tail dims>), the leading dimensions flattened: t itself when it has one
    (a no-op reshape still costs a view), else a reshape (a view where the strides allow; differentiable)."""
    if t.dim() == tail + 1:
        return t
    return t.reshape(math.prod(t.shape[:t.dim() - tail]), *t.shape[t.dim() - tail:])


def _check_min_dim(name: str, t: torch.Tensor, dims: int, form: str) -> None:
    """At least one leading dimension (*: B, or (B, T) for sequences): a (B, C) tensor passed where (B, M, C) was
    meant is an error, not one row of B heads."""
    if t.dim() < dims:
        raise ValueError(f"{name} must have shape {form} with at least one leading dimension * (B, or (B, T) for "
                         f"sequences), got {tuple(t.shape)}")


def _kept_input(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The heads' input with the rows a row mask leaves out set to 0 (a (B, D) pass, nothing next to the
    GEMMs): a NaN or Inf feature there (a body's output at a padding position) then reaches no gradient, where
    a zeroed logits gradient times it would still be NaN in the weight gradient."""
    return x if keep is None else torch.where(keep.view(-1, *(1,) * (x.dim() - 1)), x, 0.0)


def _mean_over_kept(loss: torch.Tensor, keep: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """A fused op's loss reduced with coefficient 1/(B*M) over rows some of which a row mask zeroed (the torch
    path): rescaled by B / (rows kept) for "mean" (autograd takes the factor into the stored gradients). The
    Triton path's kernels form the mean over the kept rows themselves."""
    if keep is None or reduction != "mean":
        return loss
    return loss * (keep.shape[0] / keep.sum(dtype=loss.dtype).clamp_min_(1))


def _check_topk(teacher, rows_shape: tuple, classes: int, device_of: dict, name="teacher_logits", context=None):
    """A TopKTeacher's shapes, dtypes and device (its values are checked inside the ops): values and indices
    of shape rows_shape + (k,), rows_shape = (*, M). Returns them as (rows, M, k). context: what rows_shape
    comes from, said in the shape error (a callable, called only then)."""
    values, indices = teacher.values, teacher.indices
    _check_tensor(f"{name}.values", values)
    _check_min_dim(f"{name}.values", values, min(3, len(rows_shape) + 1), "(*, M, k)")  # (x (D,) in a module: 2)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name}.indices must be a torch.Tensor, got {type(indices).__name__}")
    _check_layout(f"{name}.indices", indices)
    if indices.dtype not in (torch.int32, torch.int64):
        raise InputDtypeError(f"{name}.indices must be int32 or int64, got {indices.dtype}")
    if indices.shape != values.shape:
        raise ValueError(f"{name}.indices {tuple(indices.shape)} and {name}.values {tuple(values.shape)} must "
                         "have one shape (*, M, k)")
    rows_shape = tuple(rows_shape)
    if tuple(values.shape[:-1]) != rows_shape:
        where = context() if context else ""
        raise ValueError(f"{name} (top-k) must have shape {rows_shape} + (k,){where}; got {tuple(values.shape)}")
    k = values.shape[-1]
    if not 1 <= k <= classes:
        raise ValueError(f"{name} (top-k) must keep 1 <= k <= C = {classes} classes per row, got k = {k}")
    _check_same_device(**device_of, **{f"{name}.values": values, f"{name}.indices": indices})
    return _rows(values, 2), _rows(indices, 2)


def _teacher_parts(teacher):
    """(tensor the op reads as the teacher, its indices or None): a top-k teacher's values, or the logits."""
    return (teacher.values, teacher.indices) if isinstance(teacher, TopKTeacher) else (teacher, None)


def _check_extent(name: str, tensor: torch.Tensor, dim: int, what: str) -> None:
    """A softmax over no classes (or a mean over no members) is undefined: a ValueError, not NaN rows."""
    if tensor.shape[dim] == 0:
        raise ValueError(f"{name} must have at least one {what}, got shape {tuple(tensor.shape)}")


def _check_logit_pair(student, teacher, student_name="student_logits", teacher_name="teacher_logits"):
    """Student logits (*, M, C) and teacher logits of the same shape (or a TopKTeacher, (*, M, k)): checked,
    and returned as (rows, M, C) and (rows, M, C) (or a TopKTeacher of (rows, M, k)) with the leading shape *."""
    _check_tensor(student_name, student)
    _check_min_dim(student_name, student, 3, "(*, M, C)")
    _check_extent(student_name, student, -1, "class (C >= 1)")
    lead = tuple(student.shape[:-2])
    if isinstance(teacher, TopKTeacher):
        values, indices = _check_topk(teacher, student.shape[:-1], student.shape[-1], {student_name: student},
                                      teacher_name)
        return _rows(student, 2), TopKTeacher(values, indices), lead
    _check_tensor(teacher_name, teacher)
    if student.shape != teacher.shape:
        what = [f"{student.dim()} and {teacher.dim()} dimensions"] if student.dim() != teacher.dim() else []
        if student.dim() == teacher.dim() and student.shape[:-2] != teacher.shape[:-2]:
            what.append("batch (leading dimensions)")
        if teacher.dim() < 2 or student.shape[-2] != teacher.shape[-2]:
            what.append("heads M")
        if teacher.dim() < 1 or student.shape[-1] != teacher.shape[-1]:
            what.append("classes C")
        raise ValueError(f"{student_name} and {teacher_name} must have the same shape (*, M, C); got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)} ({', '.join(what)} differ)")
    _check_same_device(**{student_name: student, teacher_name: teacher})
    return _rows(student, 2), _rows(teacher, 2), lead


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------


_FALLBACKS_WARNED: set = set()


def _warn_fallback_once(why: str) -> None:
    if why not in _FALLBACKS_WARNED:
        _FALLBACKS_WARNED.add(why)
        warnings.warn(f"fasthydra: impl='auto' runs the torch path on CUDA tensors here: {why}. "
                      "impl='triton' (or FASTHYDRA_IMPL=triton) runs the Triton kernels anyway.", stacklevel=3)


def _forced_impl() -> str:
    """FASTHYDRA_IMPL as set now; to torch.compile a constant of the traced program (dynamo before torch 2.5
    broke the graph at a read of os.environ)."""
    return os.environ.get("FASTHYDRA_IMPL", "").strip().lower()


# What torch.compiler.assume_constant_result sets (torch 2.4 to 2.14 read it), set by hand: that decorator imports
# torch._dynamo, about a second and 150 MiB, which an eager program must not pay. A torch that drops the attribute
# traces the read itself, as 2.5 and later can.
_forced_impl._dynamo_marked_constant = True


def resolve_impl(impl: str, *tensors: torch.Tensor | None) -> str:
    """"auto" -> "triton" for CUDA tensors on an NVIDIA GPU of compute capability 8.0 or later with Triton
    3.6 or later (``_common.auto_fallback_reason``), else "torch" (with a warning, once per reason, where
    Triton imports but the GPU or its version is outside that range).

    FASTHYDRA_IMPL=torch|triton forces the choice wherever impl is "auto". An explicit "triton"
    needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1, and fp16/bf16/fp32 data.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    present = [t for t in tensors if t is not None]
    if impl == "auto":
        forced = _forced_impl()
        if forced in ("torch", "triton"):
            impl = forced
        elif forced not in ("", "auto"):
            raise ValueError(f"FASTHYDRA_IMPL must be one of {IMPLS}, got {forced!r}")
        else:
            # lists, not generators, and len, not bool(list): dynamo before torch 2.5 broke the graph on those
            on_cuda = len(present) > 0 and all([t.is_cuda for t in present])
            ok_dtype = all([t.dtype in _TRITON_DTYPES for t in present])
            if not (on_cuda and ok_dtype and triton_available()):
                return "torch"
            if torch.compiler.is_compiling():  # (a traced program skips the device query)
                return "triton"
            why = auto_fallback_reason(present[0].device)
            if why is not None:
                _warn_fallback_once(why)
            return "torch" if why else "triton"
    if impl == "triton":
        if not triton_available():
            raise ImplUnavailableError("impl='triton' needs the triton package, which does not import here")
        if any([not (t.is_cuda or t.is_meta) for t in present]) and not interpreting():
            raise ImplUnavailableError("impl='triton' on CPU tensors runs only under TRITON_INTERPRET=1 "
                                       "(set before triton is imported); use impl='torch' or CUDA tensors")
        bad = [t.dtype for t in present if t.dtype not in _TRITON_DTYPES]
        if bad:
            raise InputDtypeError(f"impl='triton' supports float16, bfloat16 and float32, got {bad[0]}; "
                                  "use impl='torch' for float64")
    return impl


def _under_torch_func() -> bool:
    """torch.func transforms (grad, vmap, jacrev, ...) are active around this eager call. The kernels cannot
    run under them (they read the tensors' storage, which the transforms' wrapped tensors do not expose): the
    ops without a gradient of their own (the heads' logits, uncertainty) then run as plain torch ops, which the
    transforms map, and the fused losses refuse with a message (``library.refuse_torch_func``)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _plain_torch_ops() -> bool:
    """The ops without a gradient of their own (the heads' logits, uncertainty) run as plain torch ops: under
    torch.func transforms (``_under_torch_func``) and under torch.jit.trace, which records only the torch ops it
    sees. A kernel's writes are invisible to it (the trace would replay an empty tensor, or a native row loop's
    output as a constant), and a custom op would make the saved trace need fasthydra to load; plain ops give a
    trace that generalises over the batch and loads anywhere. The fused losses refuse the tracer
    (``library.refuse_jit_trace``). Also while a forward-mode AD level is entered: the kernels (and the torch path's
    native rows) read primal values only, so a dual input's tangent would be lost; torch's ops carry it. The fused
    losses refuse dual inputs (``library.refuse_forward_ad``)."""
    return not torch.compiler.is_compiling() and (torch._C._are_functorch_transforms_active()
                                                      or torch._C._is_tracing() or forward_ad_active())


# ----------------------------------------------------------------------------------------------
# autocast
# ----------------------------------------------------------------------------------------------


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    device = t.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _autocast_gemm_inputs(*tensors):
    """Under autocast, the heads' GEMM operands go to the autocast dtype, as F.linear's would (the
    casts are differentiable: fp32 parameters get fp32 gradients). Outside autocast: unchanged."""
    ref = next(t for t in tensors if t is not None)
    dtype = _autocast_dtype(ref)
    if dtype is None:
        return tensors
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _autocast_loss(loss: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The ops return losses in their compute dtype; users get the input's dtype, or fp32 under
    autocast (torch's policy for softmax, log_softmax and kl_div)."""
    dtype = torch.float32 if _autocast_dtype(ref) is not None else ref.dtype
    return loss if loss.dtype == dtype else loss.to(dtype)  # (to() of its own dtype: a microsecond for nothing)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


@_public
def hydra_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float | torch.Tensor = 1.0,
                  reduction: str = "mean", impl: str = "auto", *, row_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Tempered per-head KL between teacher members and student heads (the Hydra loss).

    ``L = T^2 * mean over (b, m) of KL(softmax(t[b, m] / T) || softmax(z[b, m] / T))``. A -Inf teacher
    logit masks its class. Gradients (formed in the forward pass, as the loss is):
    ``dL/dz_c = T * coef * (q_c - p_c)`` and, when the teacher requires grad (online distillation,
    mutual learning), ``dL/dt_c = T * coef * p_c * ((log p_c - log q_c) - KL)``, 0 on masked classes,
    with coef = 1/(B*M) for "mean" and 1 otherwise. Derivation: with u = t/T, dp_k/dt_c =
    p_k (delta_kc - p_c) / T, so d/dt_c sum_k p_k (log p_k - log q_k) = (1/T) [p_c (log p_c - log q_c)
    - p_c KL] + sum_k p_k d(log p_k)/dt_c, and the last sum is (1/T)(p_c - p_c) = 0; times T^2.
    A teacher that does not require grad costs nothing extra: compute frozen members' logits under
    ``torch.no_grad()``.

    Args:
        student_logits: head logits z, (*, M, C), floating: one row per leading index, e.g. (B, M, C), or
            (B, T, M, C) for a batch of sequences (what ``HydraHead`` returns for (B, T, D) features).
        teacher_logits: member logits t, the same shape, floating, same device; NaN/+Inf not allowed. Or a
            ``TopKTeacher`` of (*, M, k) values and indices.
        temperature: T > 0, at most 2^63 and at least 2^-64 (else a ValueError). The T^2 factor keeps
            gradient size independent of T. A number, or a one-element floating tensor on the logits' device
            or the CPU, for a T that changes between steps under torch.compile or in a CUDA graph (update it in
            place: no recompile, no new capture). A CPU tensor is read as a number and checked; a device one
            is read by the kernels, never on the host: out of range, the loss is NaN (FASTHYDRA_STRICT=1:
            a ValueError). One that requires grad (an ``nn.Parameter``) is learned: dL/dT by autograd (see
            ``_learned_temperature``: the same kernels, plus the teacher's gradient formed for it). Past T of about 1e3
            the loss value (KL of order 1 / T^2) loses its digits to float32 rounding, as eager's does (fewer:
            about half eager's error on nearly uniform rows); the gradient keeps them.
        reduction: "mean" (over all rows and heads; 0 for an empty batch), "sum", or "none" -> (*, M).
        impl: "auto" | "triton" | "torch".
        row_mask: optional (*) bool (or integer, nonzero = kept), the logits' leading shape: the rows that
            count, e.g. the non-padding positions of a sequence batch (its (B, T) attention mask). Rows
            left out add nothing and get zero gradients; "mean" averages over the kept rows' B_kept*M
            entries (0 if none), "none" gives 0 on them. No host sync; on the GPU the loss kernel reads the
            mask itself (loss and gradient 0 on those rows, the mean over the kept ones formed there).
            Their teacher values are still checked (fill a teacher's padding rows with zeros if it makes
            NaN there); their student logits may be anything, NaN and infinities included (a model's
            output at padding): loss and gradients are exactly 0 there.
    Shapes: (*, M, C), (*, M, C) -> () or (*, M).
    Returns: the loss in the student's dtype (computed in fp32, fp64 for fp64 input).
    Memory: on the Triton path with a frozen dense teacher the gradient is formed in the backward
        from the saved student and teacher logits (no (B, M, C) tensor is kept besides them): change
        either in place before ``backward()`` and autograd raises; otherwise the gradient is formed
        in the forward and kept.
    Raises: ValueError for NaN/+Inf teacher logits or a teacher row that is -Inf everywhere: at once on
        CPU tensors; on CUDA without a host sync (the loss is NaN, and a later fasthydra call raises,
        naming this op; FASTHYDRA_STRICT=1 raises here). See README, "What runs where".

    Example:
        >>> z, t = torch.randn(8, 4, 10, requires_grad=True), torch.randn(8, 4, 10)
        >>> hydra_kl_loss(z, t, temperature=2.0).backward()
    """
    student, teacher_rows, lead = _check_logit_pair(student_logits, teacher_logits)
    temperature = _check_temperature(temperature, student)
    learned = None
    if _learned_temperature(temperature):  # (the arguments checked once: the scaled ones are views of them)
        temperature, learned = temperature.detach(), temperature
        student, teacher_rows = _learned_scaled(learned, student, teacher_rows)
    reduction = _check_reduction(reduction)
    teacher, indices = _teacher_parts(teacher_rows)
    keep = _check_row_mask(row_mask, lead, "student_logits", student_logits)
    impl = resolve_impl(impl, student, teacher)
    # The teacher's values are checked inside the op, where the data is read anyway.
    on = torch.is_grad_enabled()
    t_number, t_tensor = _temperature_parts(temperature)
    with caller_lead(lead):  # (value errors name the caller's shape, not its rows)
        loss, *_ = _ops.hydra_kl_call(student, teacher, t_number, reduction, on and student.requires_grad,
                                      on and teacher.requires_grad, impl, indices, keep, t_tensor)
    if reduction == "none" and len(lead) != 1:
        loss = loss.reshape(*lead, student.shape[1])
    loss = _autocast_loss(loss, student_logits)
    return loss if learned is None else _learned_square(loss, learned)


def ensemble_log_mean_probs(teacher_logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """log of the ensemble mean ``log mean_m softmax(t_m / T)``, (B, M, C) -> (B, C) in fp32/fp64.

    Differentiable (a teacher that requires grad gets its gradient through it). A class every member gives
    probability 0 (masked, -inf) is -inf, as the target kernels give it: a masked class for the loss, which a
    student may mask too (a finite stand-in there made the Triton loss NaN: 0 * (finite + inf)). Inside, a
    masked member's log p is held at -1e30 (probability still exactly 0), so that the logsumexp's gradient at
    such a class is 0 * finite, not NaN; a log mean that low (every member's p is 0) is read on the (B, C)
    result, with no pass over the members."""
    cdt = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    log_p = torch.log_softmax(teacher_logits.to(cdt) / temperature, dim=-1).clamp_min(-1e30)
    lse, members = torch.logsumexp(log_p, dim=1), teacher_logits.shape[1]
    lse = torch.where(lse < -1e29, float("-inf"), lse)
    if torch.compiler.is_compiling():  # (M may be symbolic there, dynamic=True: dynamo 2.4 cannot take its math.log)
        return lse - torch.full((), members, dtype=lse.dtype, device=lse.device).log()
    return lse - math.log(members)


@_public
def hinton_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float | torch.Tensor = 1.0,
                   reduction: str = "mean", impl: str = "auto", *, row_mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Hinton (mean-teacher) loss of a single head: ``T^2 * mean_b KL(pbar || softmax(z / T))``.

    pbar = mean_m softmax(t_m / T) is the ensemble's averaged prediction (stage 1 of Hydra, and plain KD). With one
    member (M = 1: KD from one teacher) pbar is its softmax, and the loss kernel reads the member itself (no (B, C)
    target formed; a teacher that requires grad gets its gradient from the kernel, as in ``hydra_kl_loss``).

    Args:
        student_logits: (*, C) or (*, 1, C), * the teacher's leading shape (B, or (B, T) for sequences).
        teacher_logits: (*, M, C) member logits, or a ``TopKTeacher`` of (*, M, k) values and indices.
        temperature, reduction, impl, row_mask: as in :func:`hydra_kl_loss` (row_mask: shape (*)); "none"
            gives (*), "mean" averages over the kept rows.
    Returns: the loss in the student's dtype.

    Example:
        >>> z, t = torch.randn(8, 10, requires_grad=True), torch.randn(8, 5, 10)
        >>> hinton_kl_loss(z, t, temperature=4.0).backward()
    """
    _check_tensor("student_logits", student_logits)
    _check_min_dim("student_logits", student_logits, 2, "(*, C) or (*, 1, C)")
    _check_extent("student_logits", student_logits, -1, "class (C >= 1)")
    top_k = isinstance(teacher_logits, TopKTeacher)
    name = "teacher_logits.values" if top_k else "teacher_logits"
    members = teacher_logits.values if top_k else teacher_logits
    _check_tensor(name, members)  # (before its M is read)
    _check_min_dim(name, members, 3, "(*, M, k)" if top_k else "(*, M, C)")
    _check_extent(name, members, -2, "member (M >= 1) to average")
    lead, c = tuple(members.shape[:-2]), student_logits.shape[-1]
    if student_logits.shape[:-1] not in (lead, (*lead, 1)) or (not top_k and members.shape[-1] != c):
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and {name} {tuple(members.shape)} must "
                         f"agree in the leading shape (batch) and classes C: student_logits must be (*, C) or "
                         f"(*, 1, C) with * = {lead} for the Hinton loss")
    temperature = _check_temperature(temperature, student_logits)  # (once: the helpers below take it checked)
    learned = None
    if _learned_temperature(temperature):
        temperature, learned = temperature.detach(), temperature
        student_logits, teacher_logits = _learned_scaled(learned, student_logits, teacher_logits)
    z = student_logits if student_logits.dim() == 3 and len(lead) == 1 else \
        student_logits.reshape(math.prod(lead), 1, c)
    keep = _check_row_mask(row_mask, lead, "student_logits", student_logits)
    with caller_lead(lead):
        if top_k:
            loss = _hinton_topk(z, student_logits, teacher_logits, lead, temperature, reduction, impl, keep)
        else:
            loss = _hinton_dense(z, student_logits, teacher_logits, temperature, reduction, impl, keep)
    loss = loss.reshape(lead) if reduction == "none" and len(lead) != 1 else loss
    return loss if learned is None else _learned_square(loss, learned)


def _hinton_dense(z, student_logits, teacher_logits, temperature, reduction, impl, keep):
    """Hinton loss of z (rows, 1, C) against M members' logits (*, M, C), the rows of the student's."""
    teacher_logits = _rows(teacher_logits, 2)
    _check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    reduction = _check_reduction(reduction)
    impl = resolve_impl(impl, student_logits, teacher_logits)
    if _under_torch_func():  # (before the teacher's launch or checks below, which read its storage)
        _ops.refuse_torch_func("hinton_kl_loss")
    if forward_ad_active():  # (a tangent of the teacher alone would be lost in the target's launch)
        _ops.refuse_forward_ad("hinton_kl_loss", (student_logits, teacher_logits))
    compiling = torch.compiler.is_compiling()
    if not compiling and torch._C._is_tracing():  # (torch.compile cannot trace the question: asked in eager only)
        _ops.refuse_jit_trace("hinton_kl_loss")
    if not compiling:  # compiled: the op's own check sees NaN in log pbar instead
        poll(teacher_logits.device)
    if teacher_logits.shape[1] == 1:  # one member (knowledge distillation from one teacher): pbar is its own
        # softmax, so the loss kernel reads the member itself: no (B, C) target, and a teacher that requires grad
        # (a learned T too) gets its gradient from the kernel
        with caller_op("hinton_kl_loss"):
            return _hinton_on_target(z, teacher_logits, temperature, reduction, impl, keep)
    # softmax(T * log pbar / T) = pbar exactly, so the per-head kernel does the rest (masks included).
    in_kernel = _target_in_kernel(impl, teacher_logits)
    target_t = _target_temperature(temperature, impl, substitute=not in_kernel)
    if in_kernel:
        # one launch forms T * log pbar and checks the teacher on the same loads
        mean_teacher = ensemble_log_mean_triton(teacher_logits.detach(), target_t, "hinton_kl_loss")
    else:
        if not compiling:
            flag_teacher_rows(teacher_logits, "hinton_kl_loss")
        if _native_target(teacher_logits, target_t):  # on the CPU, a frozen teacher: one C sweep set per row
            mean_teacher = native.log_mean_rows(teacher_logits, target_t)
        else:
            mean_teacher = target_t * ensemble_log_mean_probs(teacher_logits, target_t)
    return _hinton_on_target(z, mean_teacher.unsqueeze(1), temperature, reduction, impl, keep)


def _target_in_kernel(impl: str, teacher: torch.Tensor) -> bool:
    """The Hinton target of M members (dense logits or top-k values) formed by its one Triton launch, which also
    checks the teacher on the same loads: on the Triton path, in eager mode, on a frozen teacher with values (no
    gradient to carry through the launch), outside torch.func, forward AD and tracing (which the dense path has
    refused before asking, and the top-k path leaves to torch ops and the loss op's own refusal)."""
    return (impl == "triton" and not torch.compiler.is_compiling() and not no_values(teacher)
            and not (torch.is_grad_enabled() and teacher.requires_grad) and not _under_torch_func()
            and not forward_ad_active() and not torch._C._is_tracing())


def _native_target(teacher_logits: torch.Tensor, target_t) -> bool:
    """The Hinton target from the native row kernel (native.log_mean_rows): 32- or 16-bit CPU members that need no
    gradient, a temperature known as a number, outside compilation and fake tensors; elsewhere torch ops."""
    return (isinstance(target_t, float) and not torch.compiler.is_compiling() and native.usable_members(teacher_logits)
            and not (torch.is_grad_enabled() and teacher_logits.requires_grad) and not no_values(teacher_logits))


def _target_temperature(temperature, impl: str, substitute: bool):
    """The temperature the Hinton target (formed outside the loss op) is made with. A tensor one is resolved as
    the op resolves it (a CPU tensor read as a number and checked, ValueError; a device one kept, never read),
    and a device value out of range is replaced by 1 for the target only (substitute: torch ops form the
    target; the Triton target kernel does the same itself): the loss op NaNs the loss itself, and a NaN
    target would be reported as a NaN teacher. Compiled, the tensor as it came, so replaced."""
    if not isinstance(temperature, torch.Tensor):
        return temperature
    if not torch.compiler.is_compiling():
        temperature = op_temperature(1.0, temperature, impl="triton")  # (no NaN select: done below)
        if not isinstance(temperature, torch.Tensor) or not substitute:
            return temperature
    lo, hi = TEMPERATURE_RANGE
    return torch.where((temperature >= lo) & (temperature <= hi), temperature, 1.0)


def _hinton_on_target(z, mean_teacher, temperature, reduction, impl, keep=None, indices=None):
    """The Hinton loss of z (B, 1, C) against mean_teacher = T * log pbar, (B, 1, C), or against one member whose
    softmax is pbar (its logits, or the values (B, 1, k) of a top-k member whose class ids are `indices`); keep:
    the row mask."""
    on = torch.is_grad_enabled()
    t_number, t_tensor = _temperature_parts(temperature)
    loss, *_ = _ops.hydra_kl_call(z, mean_teacher, t_number, reduction, on and z.requires_grad,
                                  on and mean_teacher.requires_grad, impl, indices, keep, t_tensor)
    loss = _autocast_loss(loss, z)
    return loss.squeeze(1) if reduction == "none" else loss


def _hinton_topk(z, student_logits, teacher: TopKTeacher, lead: tuple, temperature, reduction, impl, keep=None):
    """Hinton loss against the mean of M sparse members: pbar = mean_m scatter(p~_m), supported on up
    to M*k classes. pbar is formed as one (B, C) row per example (the student's own size, no factor
    M), then the dense single-head kernel runs; the values get their gradient through it."""
    b, _, c = z.shape
    values, indices = _check_topk(teacher, (*lead, teacher.values.shape[-2]), c, {"student_logits": student_logits})
    reduction = _check_reduction(reduction)
    if values.shape[1] == 1:  # one member: its sparse distribution is pbar (see _hinton_dense), the op checks it
        with caller_op("hinton_kl_loss"):
            return _hinton_on_target(z, values, temperature, reduction, resolve_impl(impl, student_logits, values),
                                     keep, indices)
    impl = resolve_impl(impl, student_logits, values)
    # One launch forms T * log pbar and checks the values on the same loads (_target_in_kernel); torch ops otherwise
    # (traced, under torch.func or forward AD: the loss op below refuses what it cannot take)
    in_kernel = _target_in_kernel(impl, values)
    if not torch.compiler.is_compiling():
        poll(values.device)
        flag_topk_teacher(values, indices, c, "hinton_kl_loss", values_too=not in_kernel)
    target_t = _target_temperature(temperature, impl, substitute=not in_kernel)
    if in_kernel:
        target = topk_log_mean_triton(values.detach(), indices, c, target_t, "hinton_kl_loss")
        return _hinton_on_target(z, target.unsqueeze(1), temperature, reduction, impl, keep)
    cdt = torch.float64 if values.dtype == torch.float64 else torch.float32
    m, k = values.shape[1:]
    # (each member's values less their maximum first: shifted_values; B may be 0, hence the explicit sizes)
    p = torch.softmax(shifted_values(values.to(cdt)) / target_t, dim=-1) / m
    index = indices.long()
    if p.requires_grad and inference_tensor(index):  # (made under inference_mode: scatter_add could not save it)
        index = index.clone()
    # One member at a time, in order: a member keeps each class once (its padding repeats one only with p = 0), so
    # no launch adds twice into a class, and the sum over members that share one is the same bits every run. (One
    # scatter_add of all M k entries adds them in whatever order a GPU's atomics take them.)
    # (the first out of place: torch.func's transforms take no in-place op on a tensor they do not batch; the rest in
    # place, no (B, C) copy per member)
    pbar = torch.zeros(b, c, dtype=cdt, device=values.device).scatter_add(1, index[:, 0], p[:, 0])
    for j in range(1, m):
        pbar.scatter_add_(1, index[:, j], p[:, j])
    kept = pbar > 0  # log only where pbar > 0: the other branch's gradient would be 0 * inf
    log_pbar = torch.where(kept, torch.log(torch.where(kept, pbar, 1.0)), float("-inf"))
    return _hinton_on_target(z, (target_t * log_pbar).unsqueeze(1), temperature, reduction, impl, keep)


def _check_head_params(weight, bias, weight_name="weight", bias_name="bias") -> tuple[int, int, int]:
    """A stack of M heads' parameters: weight (M, N, K) and bias (M, N) or None, one floating dtype."""
    _check_tensor(weight_name, weight, (3,))
    if bias is not None:
        _check_tensor(bias_name, bias)
        if tuple(bias.shape) != tuple(weight.shape[:2]):
            raise ValueError(f"{bias_name} must have shape (M, N) = {tuple(weight.shape[:2])} to match {weight_name} "
                             f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise InputDtypeError(f"{bias_name} has dtype {bias.dtype} but {weight_name} is {weight.dtype}; "
                                  "cast one of them (or use torch.autocast)")
    return tuple(weight.shape)


def _check_heads_input(x, weight, bias, name="x", per_head=False, weight_name="weight", bias_name="bias"):
    _check_tensor(name, x)
    m, n, k = _check_head_params(weight, bias, weight_name, bias_name)
    want = (m, k) if per_head else (k,)
    if x.dim() != len(want) + 1 or tuple(x.shape[1:]) != want:
        raise ValueError(f"{name} must have shape (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise InputDtypeError(f"{name} has dtype {x.dtype} but the head weights are {weight.dtype}; "
                              "cast one of them (or use torch.autocast)")
    _check_same_device(**{name: x, weight_name: weight, bias_name: bias})


def _check_mlp_params(x, hidden_weight, hidden_bias, weight, bias) -> None:
    """MLP heads: the first layer (M, H, D) over x (B, D), the second (M, C, H) after it."""
    _check_heads_input(x, hidden_weight, hidden_bias, weight_name="hidden_weight", bias_name="hidden_bias")
    m, h, _ = hidden_weight.shape
    _, c, k = _check_head_params(weight, bias)
    if weight.shape[0] != m or k != h:
        raise ValueError(f"weight must have shape (M, C, H) = ({m}, C, {h}) to follow hidden_weight "
                         f"{tuple(hidden_weight.shape)}, got {tuple(weight.shape)}")
    if weight.dtype != hidden_weight.dtype:
        raise InputDtypeError(f"weight has dtype {weight.dtype} but hidden_weight is {hidden_weight.dtype}; "
                              "cast one of them (or use torch.autocast)")
    _check_same_device(x=x, weight=weight, bias=bias)


@_public
def linear_heads(x, weight, bias=None, impl: str = "auto"):
    """Logits of M linear heads over a shared input, one GEMM over the stacked (M*C, D) weight:
    ``z[:, m] = x @ W[m].T + bias[m]``.

    Args:
        x: (B, D) shared features.
        weight: (M, C, D) the heads' weights; bias: (M, C) or None, in the weight's dtype.
        impl: "auto" | "triton" | "torch" (see ``resolve_impl``).
    Returns: (B, M, C) logits in x's dtype.

    Example:
        >>> linear_heads(torch.randn(4, 16), torch.randn(3, 10, 16), torch.zeros(3, 10)).shape
        torch.Size([4, 3, 10])
    """
    x, weight, bias = _autocast_gemm_inputs(x, weight, bias)
    _check_heads_input(x, weight, bias)
    impl = resolve_impl(impl, x, weight, bias)
    if impl == "triton" and not _plain_torch_ops():
        return _ops.grouped_linear_call(x, weight, bias, True, False)
    return _stacked_linear(x, weight, bias)


def _stacked_linear(x, weight, bias):
    """linear_heads' torch path on checked arguments: one F.linear over the stacked (M*C, D) weight, (B, M, C)."""
    m, c, d = weight.shape
    if weight.requires_grad and torch.is_grad_enabled() and inference_tensor(x):
        # features made under torch.inference_mode() (a frozen body run there): F.linear would refuse to save them
        # for the weight's gradient; a copy (B x D, small beside the GEMM) trains as the Triton path's GEMM does
        x = x.clone()
    z = torch.nn.functional.linear(x, weight.reshape(m * c, d), None if bias is None else bias.reshape(m * c))
    return z.view(x.shape[0], m, c)


@_public
def mlp_hidden(x, hidden_weight, hidden_bias=None, impl: str = "auto"):
    """First layer of M MLP heads, one GEMM over the stacked (M*H, D) weight:
    ``u[:, m] = relu(x @ W1[m].T + b1[m])``.

    Args:
        x: (B, D) shared features.
        hidden_weight: (M, H, D); hidden_bias: (M, H) or None, in the weight's dtype.
        impl: "auto" | "triton" | "torch" (see ``resolve_impl``).
    Returns: (B, M, H) hidden activations in x's dtype.

    Example:
        >>> mlp_hidden(torch.randn(4, 16), torch.randn(3, 8, 16)).shape
        torch.Size([4, 3, 8])
    """
    x, hidden_weight, hidden_bias = _autocast_gemm_inputs(x, hidden_weight, hidden_bias)
    _check_heads_input(x, hidden_weight, hidden_bias, weight_name="hidden_weight", bias_name="hidden_bias")
    impl = resolve_impl(impl, x, hidden_weight, hidden_bias)
    if impl == "triton" and not _plain_torch_ops():
        return _ops.grouped_linear_call(x, hidden_weight, hidden_bias, True, True)
    return torch.relu(_stacked_linear(x, hidden_weight, hidden_bias))


@_public
def grouped_heads(u, weight, bias=None, impl: str = "auto"):
    """Per-head GEMM (the grouped GEMM): ``z[:, m] = u[:, m] @ W[m].T + bias[m]``.

    Args:
        u: (B, M, H) per-head inputs (MLP heads' hidden activations).
        weight: (M, C, H); bias: (M, C) or None, in the weight's dtype.
        impl: "auto" | "triton" | "torch" (see ``resolve_impl``).
    Returns: (B, M, C) logits in u's dtype.

    Example:
        >>> grouped_heads(torch.randn(4, 3, 8), torch.randn(3, 10, 8)).shape
        torch.Size([4, 3, 10])
    """
    u, weight, bias = _autocast_gemm_inputs(u, weight, bias)
    _check_heads_input(u, weight, bias, name="u", per_head=True)
    impl = resolve_impl(impl, u, weight, bias)
    if impl == "triton" and not _plain_torch_ops():
        return _ops.grouped_linear_call(u, weight, bias, False, False)
    z = torch.bmm(u.transpose(0, 1), weight.transpose(1, 2))
    if bias is not None:
        z = z + bias.unsqueeze(1)
    return z.transpose(0, 1)


def _check_fused_loss_args(inp, teacher, weight, temperature, reduction, name, row_mask=None):
    m, c, _ = weight.shape
    if isinstance(teacher, TopKTeacher):
        _check_topk(teacher, (inp.shape[0], m), c, {name: inp})
    else:
        _check_tensor("teacher_logits", teacher, (3,))
    if not isinstance(teacher, TopKTeacher) and teacher.shape != (inp.shape[0], m, c):
        raise ValueError(f"teacher_logits must have shape (B, M, C) = ({inp.shape[0]}, {m}, {c}) to match "
                         f"{name} {tuple(inp.shape)} and the heads; got {tuple(teacher.shape)}")
    _check_same_device(**{name: inp, "teacher_logits": _teacher_parts(teacher)[0]})
    temperature = _check_temperature(temperature, inp)
    reduction = _check_reduction(reduction)
    if reduction == "none":
        raise ValueError("reduction='none' is not fused (the gradient needs the per-row upstream "
                         "gradient); compute the logits and call hydra_kl_loss instead")
    keep = _check_row_mask(row_mask, inp.shape[:1], name, inp)
    return temperature, reduction, keep  # the teacher's values are checked inside the op


@_public
def linear_hydra_kl_loss(x, weight, bias, teacher_logits, temperature: float | torch.Tensor = 1.0,
                         reduction: str = "mean", impl: str = "auto", *, row_mask=None):
    """Linear heads fused with the Hydra loss; equals ``hydra_kl_loss(linear_heads(x, W, b), t, T)``
    in value and gradients (what ``HydraHead.distill_loss`` calls).

    The (B, M, C) logits are never materialised whole; gradients for x, weight, bias (and a teacher
    that requires grad) are formed in the forward pass chunk by chunk, and the backward only scales them.

    Args:
        x: (B, D) shared features.
        weight: (M, C, D); bias: (M, C) or None, in the weight's dtype.
        teacher_logits: (B, M, C) the members' logits (any float dtype), or a ``TopKTeacher``.
        temperature: T > 0, a number or a one-element tensor (as in ``hydra_kl_loss``). reduction: "mean" or
            "sum" ("none" is not fused: use ``hydra_kl_loss``).
        impl: "auto" | "triton" | "torch" (see ``resolve_impl``).
        row_mask: optional (B,) bool, the rows that count (as in ``hydra_kl_loss``); x's rows left out may
            hold anything, NaN included (never read, or set to 0 first). On the GPU the kernels read the
            mask themselves (dense or top-k teacher): no (B, M, C) pass is added, and "mean" over the kept
            rows is formed there too (the count read on the device: the backward rescales nothing).
    Returns: the scalar loss, in x's dtype (fp32 under autocast).

    Example:
        >>> x, w, t = torch.randn(4, 16), torch.randn(3, 10, 16), torch.randn(4, 3, 10)
        >>> bool(linear_hydra_kl_loss(x, w, None, t, 2.0) >= 0)
        True
    """
    x, weight, bias = _autocast_gemm_inputs(x, weight, bias)
    _check_heads_input(x, weight, bias)
    temperature, reduction, keep = _check_fused_loss_args(x, teacher_logits, weight, temperature, reduction, "x",
                                                          row_mask)
    learned = None
    if _learned_temperature(temperature):
        # z / s = (x / s) W^T + b / s = x (W / s)^T + b / s: x scaled where its gradient is formed anyway (a (B, D)
        # reduction, not a weight-sized one), else the weight (no dx GEMM added for a frozen body)
        temperature, learned = temperature.detach(), temperature
        scale_x = x.requires_grad or not weight.requires_grad
        xs, ws, bias, teacher_logits = _learned_scaled(learned, x if scale_x else None, None if scale_x else weight,
                                                       bias, teacher_logits)
        x, weight = x if xs is None else xs, weight if ws is None else ws
    impl = resolve_impl(impl, x, weight, bias, _teacher_parts(teacher_logits)[0])
    # (x's rows left out are set to 0 inside the op: no (B, D) copy kept for a second backward)
    loss = _fused(x, weight, bias, teacher_logits, temperature, reduction, True, impl, keep)
    return loss if learned is None else _learned_square(loss, learned)


@_public
def mlp_hydra_kl_loss(x, hidden_weight, hidden_bias, weight, bias, teacher_logits,
                      temperature: float | torch.Tensor = 1.0, reduction: str = "mean", impl: str = "auto", *,
                      row_mask=None):
    """MLP heads fused with the Hydra loss: first layer one GEMM, second layer the grouped GEMM fused with
    softmax/KL; equals ``hydra_kl_loss(grouped_heads(mlp_hidden(x, W1, b1), W, b), t, T)``. On the torch
    path (eager calls) both layers' gradients are formed in the forward, in one autograd node, so no
    (B, M, H) activation is kept for the backward.

    Args:
        x: (B, D) shared features.
        hidden_weight: (M, H, D); hidden_bias: (M, H) or None.
        weight: (M, C, H); bias: (M, C) or None (all in one dtype).
        teacher_logits: (B, M, C) the members' logits (any float dtype), or a ``TopKTeacher``.
        temperature: T > 0, a number or a one-element tensor (as in ``hydra_kl_loss``). reduction: "mean" or
            "sum".
        impl: "auto" | "triton" | "torch" (see ``resolve_impl``).
        row_mask: optional (B,) bool, the rows that count (as in ``linear_hydra_kl_loss``).
    Returns: the scalar loss, in x's dtype (fp32 under autocast).

    Example:
        >>> x, t = torch.randn(4, 16), torch.randn(4, 3, 10)
        >>> bool(mlp_hydra_kl_loss(x, torch.randn(3, 8, 16), None, torch.randn(3, 10, 8), None, t) >= 0)
        True
    """
    x, hidden_weight, hidden_bias, weight, bias = _autocast_gemm_inputs(x, hidden_weight, hidden_bias, weight, bias)
    _check_mlp_params(x, hidden_weight, hidden_bias, weight, bias)
    temperature, reduction, keep = _check_fused_loss_args(x, teacher_logits, weight, temperature, reduction, "x",
                                                          row_mask)
    learned = None
    if _learned_temperature(temperature):  # (z linear in the second layer's (weight, bias): those scaled)
        temperature, learned = temperature.detach(), temperature
        weight, bias, teacher_logits = _learned_scaled(learned, weight, bias, teacher_logits)
    loss = _mlp_loss(x, hidden_weight, hidden_bias, weight, bias, teacher_logits, temperature, reduction, impl, keep)
    return loss if learned is None else _learned_square(loss, learned)


def _mlp_loss(x, hidden_weight, hidden_bias, weight, bias, teacher_logits, temperature, reduction, impl, keep):
    """mlp_hydra_kl_loss on checked arguments."""
    impl = resolve_impl(impl, x, hidden_weight, weight, _teacher_parts(teacher_logits)[0])
    x = _kept_input(x, keep)
    if impl == "triton" or op_form(x):  # (traced, meta, a dispatch mode: the custom ops themselves)
        u = mlp_hidden(x, hidden_weight, hidden_bias, impl=impl)
        return _fused(u, weight, bias, teacher_logits, temperature, reduction, False, impl, keep)
    # eager torch path: both layers in one autograd node (no (B, M, H) activations kept for the backward)
    teacher, indices = _teacher_parts(teacher_logits)
    on = torch.is_grad_enabled()
    needs = [on and t is not None and t.requires_grad for t in (x, hidden_weight, hidden_bias, weight, bias, teacher)]
    t_number, t_tensor = _temperature_parts(temperature)
    loss, *_ = _ops.mlp_hydra_kl_eager(x, hidden_weight, hidden_bias, weight, bias, teacher, t_number, reduction,
                                       *needs, indices, keep, t_tensor)
    return _autocast_loss(_mean_over_kept(loss, keep, reduction), x)


def _fused(inp, weight, bias, teacher, temperature, reduction, shared, impl, keep=None):
    """The fused op, told which gradients to form (autograd's own flags ignore torch.no_grad())."""
    on = torch.is_grad_enabled()
    teacher, indices = _teacher_parts(teacher)
    needs = [on and t is not None and t.requires_grad for t in (inp, weight, bias, teacher)]
    defer = _ops.small_deferred_config(inp, weight, bias, reduction, *needs[:3], impl, indices) is not None
    t_number, t_tensor = _temperature_parts(temperature)
    loss, *_ = _ops.linear_hydra_kl_call(inp, weight, bias, teacher, t_number, reduction, shared, *needs, impl,
                                         indices, defer, keep, t_tensor)
    if impl != "triton":  # (the Triton path's "mean" is over the kept rows already, in its kernels)
        loss = _mean_over_kept(loss, keep, reduction)
    return _autocast_loss(loss, inp)


@_public
def uncertainty(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, impl: str = "auto") -> Uncertainty:
    """Total, aleatoric and epistemic uncertainty of a multi-head prediction, differentiable.

    ``P = mean_m softmax(z_m / T)``; total = H[P]; aleatoric = mean_m H[softmax(z_m / T)];
    epistemic = total - aleatoric (the mutual information, clamped at 0 against rounding).

    Gradients flow to ``logits`` from every output (e.g. a penalty on ``epistemic`` that makes the heads
    disagree on outliers): the backward recomputes each head's softmax in fp32 from the saved logits (the
    Triton path: one kernel launch; the torch path: the native C kernel for fp32 CPU logits, else torch ops
    in row chunks) and differentiates the mutual information itself, not its clamp. A masked class (logit
    -inf) has probability 0 in its head, adds nothing to any entropy and gets a zero gradient (a head masked
    everywhere gives NaN). Under ``torch.no_grad()`` (evaluation) nothing is saved.

    Args:
        logits: (*, M, C) head logits, e.g. (B, M, C), or (B, T, M, C) for a batch of sequences.
        temperature: T > 0 (1 by default, as in the paper's evaluation), a number or a one-element tensor (as
            in ``hydra_kl_loss``).
        impl: "auto" | "triton" | "torch".
    Returns: ``Uncertainty(probs (*, C), total (*), aleatoric (*), epistemic (*))`` in the logits' dtype.

    Example:
        >>> u = uncertainty(torch.randn(16, 8, 10))
        >>> u.epistemic.shape
        torch.Size([16])
        >>> uncertainty(torch.randn(4, 7, 8, 10)).epistemic.shape  # (B, T, M, C): one value per token
        torch.Size([4, 7])
    """
    _check_tensor("logits", logits)
    _check_min_dim("logits", logits, 3, "(*, M, C)")
    temperature = _check_temperature(temperature, logits)
    _check_extent("logits", logits, -2, "head")
    _check_extent("logits", logits, -1, "class (C >= 1)")
    if _learned_temperature(temperature):  # (degree 0: uncertainty(z, T) = uncertainty(z / s, T0))
        temperature, learned = temperature.detach(), temperature
        logits, = _learned_scaled(learned, logits)
    impl = resolve_impl(impl, logits)
    lead, z = logits.shape[:-2], _rows(logits, 2)
    if _plain_torch_ops():  # (vmap over a batch of predictions, a trace) the reference's torch ops, fp32 or wider
        wide = z.float() if z.element_size() < 4 else z
        parts = [v.to(logits.dtype) for v in uncertainty_ref(wide, temperature)]
    else:
        t_number, t_tensor = _temperature_parts(temperature)
        parts = list(_ops.uncertainty_call(z, t_number, impl, t_tensor))
    if len(lead) != 1:
        parts = [parts[0].reshape(*lead, logits.shape[-1])] + [v.reshape(lead) for v in parts[1:]]
    return Uncertainty(*parts)


# ----------------------------------------------------------------------------------------------
# Gaussian (regression) heads
# ----------------------------------------------------------------------------------------------


def _value_check(ok: torch.Tensor, message: str) -> None:
    """A check on tensor values: a ValueError in eager mode; under torch.compile an in-graph assertion
    (torch._assert_async, which raises at run time) so that the check costs no graph break."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message)


def _check_gaussian_teacher(teacher_mean: torch.Tensor, teacher_var: torch.Tensor) -> None:
    """teacher_var finite and > 0, teacher_mean finite: at once on the CPU (and under torch.compile, as an
    in-graph assertion); on CUDA in eager mode through the device's error word, with no host sync."""
    if not teacher_var.numel() or no_values(teacher_var):
        return
    # one reduction per tensor (a NaN anywhere makes both extremes NaN, and both comparisons False): a third of
    # the passes of elementwise tests and an all(), which cost as much as the KL itself on the CPU
    low, high = torch.aminmax(teacher_var)
    var_ok = (low > 0) & (high < math.inf)
    low, high = torch.aminmax(teacher_mean)
    mean_ok = (low > -math.inf) & (high < math.inf)
    if (teacher_var.is_cuda or _checks._DEFER_ON_CPU) and not torch.compiler.is_compiling():
        poll(teacher_var.device)
        flag_gaussian_teacher(var_ok, mean_ok, teacher_var.shape)
        return
    # (traced with symbolic sizes the shape is no constant a compiled assertion's message can hold)
    shape = "" if torch.compiler.is_compiling() else f" (shape {_checks._shown(teacher_var.shape)})"
    _value_check(var_ok, f"teacher_var must be finite and > 0 everywhere{shape}")
    _value_check(mean_ok, "teacher_mean contains NaN or Inf")


@_public
def gaussian_kl_loss(mean: torch.Tensor, var: torch.Tensor, teacher_mean: torch.Tensor, teacher_var: torch.Tensor,
                     reduction: str = "mean", *, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head Gaussian KL ``KL(N(mu_t, var_t) || N(mu_m, var_m))`` (member m's prediction against head m's).

    ``0.5 * (log(var_m / var_t) + (var_t + (mu_t - mu_m)^2) / var_m - 1)``, elementwise.

    Args:
        mean, var: head outputs (*, M, K), var > 0 (e.g. (B, M, K), or (B, T, M, K) for sequences).
        teacher_mean, teacher_var: member outputs of the same shape, teacher_var > 0; they get their
            gradients when they require grad.
        reduction: "mean" (over all entries), "sum", or "none" -> (*, M, K).
        row_mask: optional (*) bool (or integer, nonzero = kept), the leading shape: the rows that count, as in
            ``hydra_kl_loss`` ("mean" over the kept rows' B_kept*M*K entries); the head outputs on the rows
            left out may be anything (NaN, var <= 0): loss and gradients 0 there.
    Returns: the loss in mean's dtype.

    Example:
        >>> mu, var = torch.randn(8, 4, 1, requires_grad=True), torch.rand(8, 4, 1) + 0.1
        >>> gaussian_kl_loss(mu, var, torch.randn(8, 4, 1), torch.rand(8, 4, 1) + 0.1).backward()
    """
    names = ("mean", "var", "teacher_mean", "teacher_var")
    tensors = (mean, var, teacher_mean, teacher_var)
    for name, value in zip(names, tensors):
        _check_tensor(name, value)
        _check_min_dim(name, value, 3, "(*, M, K)")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError("mean, var, teacher_mean and teacher_var must share one shape (*, M, K); got "
                         + ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, tensors)))
    _check_same_device(**dict(zip(names, tensors)))
    reduction = _check_reduction(reduction)
    keep = _check_row_mask(row_mask, mean.shape[:-2], "mean", mean)
    _check_gaussian_teacher(teacher_mean, teacher_var)
    if keep is not None:
        # A row left out may hold anything (NaN, a zero variance: a model's output at padding): it enters as
        # N(0, 1), selected, so its gradient is exactly 0 whatever it held.
        shape = mean.shape
        mean, var, teacher_mean, teacher_var = (_rows(t, 2) for t in (mean, var, teacher_mean, teacher_var))
        rows = keep.view(-1, 1, 1)
        mean, var = torch.where(rows, mean, 0.0), torch.where(rows, var, 1.0)
        kl = masked_reduction(gaussian_kl_torch(mean, var, teacher_mean, teacher_var), keep, reduction)
        return kl.reshape(shape) if reduction == "none" else kl
    kl = gaussian_kl_torch(mean, var, teacher_mean, teacher_var)
    if reduction == "none":
        return kl
    return kl.sum() if reduction == "sum" or kl.numel() == 0 else kl.mean()


@_public
def gaussian_heads_kl_loss(x, weight, bias, teacher_mean, teacher_var, min_var: float = 1e-6,
                           reduction: str = "mean", impl: str = "auto", *, row_mask=None):
    """Gaussian heads fused with their KL: equals ``gaussian_kl_loss(*split(linear_heads(x, W, b)), t_mu, t_var)``
    (what ``GaussianHydraHead.distill_loss`` calls).

    Args:
        x: (B, D) shared features.
        weight: (M, 2K, D), rows 0..K-1 the means, K..2K-1 the raw variances; bias: (M, 2K) or None.
        teacher_mean, teacher_var: (B, M, K) the members' predictive means and variances (var > 0).
        min_var: the variance floor of ``split_gaussian``. reduction: "mean" or "sum".
        impl: "auto" | "triton" | "torch" (see ``resolve_impl``).
        row_mask: optional (B,) bool, the rows that count (as in ``gaussian_kl_loss``); x's rows left out may
            hold anything (set to 0 first). Runs unfused (the heads' GEMM, then the KL in torch ops).
    Returns: the scalar loss, in x's dtype (fp32 under autocast).

    Example:
        >>> x, w = torch.randn(4, 16), torch.randn(3, 2, 16)
        >>> bool(gaussian_heads_kl_loss(x, w, None, torch.randn(4, 3, 1), torch.ones(4, 3, 1)) >= 0)
        True
    """
    x, weight, bias = _autocast_gemm_inputs(x, weight, bias)
    _check_heads_input(x, weight, bias)
    m, two_k, _ = weight.shape
    if two_k % 2:
        raise ValueError(f"weight must have an even number of rows per head (K means, then K raw variances), "
                         f"got shape {tuple(weight.shape)}")
    want = (x.shape[0], m, two_k // 2)
    for name, value in (("teacher_mean", teacher_mean), ("teacher_var", teacher_var)):
        _check_tensor(name, value, (3,))
        if tuple(value.shape) != want:
            raise ValueError(f"{name} must have shape {want} for x {tuple(x.shape)}, got {tuple(value.shape)}")
    _check_same_device(x=x, teacher_mean=teacher_mean, teacher_var=teacher_var)
    reduction = _check_reduction(reduction)
    if reduction == "none":
        raise ValueError("reduction='none' is not fused; use gaussian_kl_loss on the head outputs")
    keep = _check_row_mask(row_mask, x.shape[:1], "x", x)
    impl = resolve_impl(impl, x, weight, bias, teacher_mean, teacher_var)
    teacher_grad = torch.is_grad_enabled() and (teacher_mean.requires_grad or teacher_var.requires_grad)
    fused = impl == "triton" and not teacher_grad and keep is None  # (no teacher gradient, no mask: unfused)
    if not fused:  # the fused kernel checks the teacher while it reads it
        _check_gaussian_teacher(teacher_mean, teacher_var)
    if fused:
        on = torch.is_grad_enabled()
        needs = [on and t is not None and t.requires_grad for t in (x, weight, bias)]
        loss, *_ = _ops.gaussian_heads_kl_call(x, weight, bias, teacher_mean.detach(), teacher_var.detach(),
                                               float(min_var), reduction, *needs,
                                               _ops.gaussian_deferred(x, weight, bias, *needs))
        return _autocast_loss(loss, x)
    x = _kept_input(x, keep)
    z = _stacked_linear(x, weight, bias)
    z = z.float() if _autocast_dtype(x) is not None else z
    mean, var = split_gaussian(z, min_var)
    kl = gaussian_kl_torch(mean, var, teacher_mean.to(z.dtype), teacher_var.to(z.dtype))
    if keep is not None:
        return masked_reduction(kl, keep, reduction)
    return kl.sum() if reduction == "sum" or kl.numel() == 0 else kl.mean()
