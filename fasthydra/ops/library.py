"""The loss and uncertainty ops as torch custom ops (``torch.ops.fasthydra.*``), with fake (meta)
implementations and autograd, so that torch.compile(fullgraph=True) sees each op whole: no graph
break, whichever path (torch or Triton) runs inside.

The value checks that must read the data (NaN/+Inf teacher logits, rows that are -Inf everywhere)
run inside the ops, where the data is; shape, dtype and argument checks stay on the host, in
``fasthydra.functional``, before any op runs.

Every op returns the loss together with the gradients its forward already computed (empty tensors
where none were asked for); the registered backward only scales them by the upstream gradient. The
one exception: ``hydra_kl`` on the Triton path with a frozen dense teacher returns the rows'
normalisers instead and forms the gradient in the backward (``hydra_kl_grad``), see ``_deferred``.
Eager calls of the heads ops scale their stored gradients in place and hand them over without a copy
(on a GPU nothing is touched when the upstream gradient is 1), see ``_eager_heads_backward``.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch.library import custom_op, register_autograd, register_fake

from . import _common
from . import gaussian_kl as _gauss
from . import grouped_linear as _gl
from . import hydra_kl as _kl
from . import linear_hydra_kl as _lin
from . import small_heads as _small
from . import uncertainty as _unc
from ._common import op_form, op_temperature, save_inputs, saved_inputs
from .checks import calling_op, flag_teacher_rows, flag_topk_teacher, poll

_EMPTY = (0,)


def _op_body(fn):
    """Op bodies run with autocast off: they already compute in fp32 (or fp64) on purpose, and the
    caller (fasthydra.functional) has cast the inputs the way autocast would for the GEMM. And on their
    tensors' CUDA device (``_common.on_tensor_device``), which a compiled program, calling the bodies without
    the functional layer around them, needs too."""
    import functools

    @functools.wraps(fn)
    def autocast_off(*args, **kwargs):
        device = args[0].device.type  # (every body's first argument is a tensor)
        if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):  # (meta: no autocast state)
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return _common.on_tensor_device(autocast_off)


def _custom_op(name: str, fn):
    """``torch.library.custom_op(name)`` over fn with its annotations evaluated: this module's are strings
    (``from __future__ import annotations``), which torch before 2.5 cannot read into a schema."""
    import inspect
    import typing

    inner = inspect.unwrap(fn)  # the signature torch reads is the wrapped function's
    inner.__annotations__ = typing.get_type_hints(inner)
    return custom_op(name, mutates_args=())(fn)


def _none_to_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(_EMPTY) if t is None else t


def _loss_shape(student_rows: tuple, reduction: str) -> tuple:
    return tuple(student_rows) if reduction == "none" else ()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Losses leave the ops in the dtype they were computed in (fp32, fp64 for fp64 input)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# hydra_kl: the loss on given logits
# ----------------------------------------------------------------------------------------------


@_op_body
def _hydra_kl_impl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str, want_grad: bool,
                   want_tgrad: bool, impl: str, teacher_indices: torch.Tensor | None,
                   row_mask: torch.Tensor | None = None, temperature_t: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """teacher: dense logits (B, M, C), or the values (B, M, k) of a top-k teacher whose class ids are
    teacher_indices (B, M, k); the third output is the teacher's (the values') gradient. row_mask (B,) bool:
    the rows that count (the others' loss rows and gradients 0, "mean" over the kept rows), read by the Triton
    kernels themselves; the torch path masks its "none" rows and per-row gradients (_kl.mask_rows_torch).
    temperature_t: a one-element tensor temperature (then `temperature` is 1.0 and unused; see
    _common.op_temperature), as every op here takes it."""
    temperature = op_temperature(temperature, temperature_t, impl)
    poll(student.device)
    op = calling_op("hydra_kl_loss")
    if teacher_indices is not None:  # top-k: the index checks need a pass of their own (one sort along k)
        flag_topk_teacher(teacher, teacher_indices, student.shape[-1], op, values_too=impl != "triton")
        if impl == "triton":
            loss, grad, tgrad = _kl.hydra_kl_topk_forward_triton(student, teacher, teacher_indices, temperature,
                                                                 reduction, want_grad, want_tgrad, op, row_mask)
        else:
            loss, grad, tgrad = _kl.mask_rows_torch(row_mask, reduction, _kl.hydra_kl_forward_torch, student, teacher,
                                                    temperature, want_grad, want_tgrad, teacher_indices)
        return loss, _none_to_empty(grad, student), _none_to_empty(tgrad, teacher)
    if impl != "triton":  # the Triton kernel checks the teacher while it reads it (no extra pass)
        flag_teacher_rows(teacher, op)
    if _deferred(want_grad, want_tgrad, impl, teacher_indices):
        loss, norms, _ = _kl.hydra_kl_forward_triton(student, teacher, temperature, reduction, want_grad, op=op,
                                                     deferred=True, row_mask=row_mask)
        return loss, norms, teacher.new_empty(_EMPTY)
    if impl == "triton":
        loss, grad, tgrad = _kl.hydra_kl_forward_triton(student, teacher, temperature, reduction, want_grad,
                                                        want_tgrad, op, row_mask=row_mask)
    else:
        loss, grad, tgrad = _kl.mask_rows_torch(row_mask, reduction, _kl.hydra_kl_forward_torch, student, teacher,
                                                temperature, want_grad, want_tgrad)
    return loss, _none_to_empty(grad, student), _none_to_empty(tgrad, teacher)


def _deferred(want_grad: bool, want_tgrad: bool, impl: str, teacher_indices) -> bool:
    """With DEFER_KL_GRAD on (off by default: slower on the H200), the Triton path with a dense, frozen teacher
    forms the student's gradient in the backward: the forward reads each row once and returns the rows'
    normalisers (B, M, 4) in the gradient's place; the backward makes one streaming pass that multiplies by
    the upstream gradient on the device (no stored (B, M, C) gradient, no separate scaling pass). Elsewhere
    the forward computes the gradients."""
    return (impl == "triton" and want_grad and not want_tgrad and teacher_indices is None
            and _common.DEFER_KL_GRAD)


hydra_kl = _custom_op("fasthydra::hydra_kl", _hydra_kl_impl)


@register_fake("fasthydra::hydra_kl")
def _hydra_kl_fake(student, teacher, temperature, reduction, want_grad, want_tgrad, impl, teacher_indices,
                   row_mask=None, temperature_t=None):
    loss = student.new_empty(_loss_shape(student.shape[:2], reduction), dtype=_compute_dtype(student))
    if _deferred(want_grad, want_tgrad, impl, teacher_indices):
        return (loss, student.new_empty((*student.shape[:2], 4), dtype=torch.float32), teacher.new_empty(_EMPTY))
    return (loss, _common.empty_stored_grad(student) if want_grad else student.new_empty(_EMPTY),
            _common.empty_stored_grad(teacher) if want_tgrad else teacher.new_empty(_EMPTY))


@_op_body
def _hydra_kl_grad_impl(student: torch.Tensor, teacher: torch.Tensor, norms: torch.Tensor, grad_loss: torch.Tensor,
                        temperature: float, reduction: str, row_mask: torch.Tensor | None = None,
                        temperature_t: torch.Tensor | None = None) -> torch.Tensor:
    return _kl.hydra_kl_backward_triton(student, teacher, norms, grad_loss, op_temperature(temperature, temperature_t),
                                        reduction, row_mask)


hydra_kl_grad = _custom_op("fasthydra::hydra_kl_grad", _hydra_kl_grad_impl)


@register_fake("fasthydra::hydra_kl_grad")
def _hydra_kl_grad_fake(student, teacher, norms, grad_loss, temperature, reduction, row_mask=None, temperature_t=None):
    return student.new_empty(student.shape)  # contiguous, as the launcher's (not student's layout)


def _absent(stored: torch.Tensor) -> bool:
    """The empty 1-D placeholder an op returns for a gradient it was not asked for."""
    return stored.numel() == 0 and stored.dim() == 1


def _stored_gradients(ctx, grads) -> None:
    """The gradients an op's forward computed: saved for backward, outside autograd themselves. Without
    set_materialize_grads(False), autograd would build a zero upstream gradient for each of these
    outputs at backward time (a weight-sized zeros at large C)."""
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*grads)


def _hydra_kl_setup(ctx, inputs, output):
    student, teacher, temperature, reduction, want_grad, want_tgrad, impl, teacher_indices, *rest = inputs
    ctx.reduction = reduction
    ctx.deferred = _deferred(want_grad, want_tgrad, impl, teacher_indices)
    if not ctx.deferred:
        ctx.grad_dtypes = _grad_dtypes(inputs)
        _stored_gradients(ctx, output[1:])
        return
    ctx.temperature = temperature
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    row_mask, temperature_t = (*rest, None, None)[:2]
    save_inputs(ctx, student, teacher, output[1], row_mask, temperature_t)


def _traced(*tensors) -> bool:
    """A backward that must call the custom op, not its implementation: traced (compile, AOT: fake or functional
    tensors), or where the forward took the op (``op_form``)."""
    return any([type(t) is not torch.Tensor or op_form(t) for t in tensors])


def _hydra_kl_backward(ctx, grad_loss, *_grad_of_grads):
    _no_double_backward(grad_loss)
    if grad_loss is None:
        return (None,) * 10
    if ctx.deferred:
        student, teacher, norms, row_mask, temperature_t = saved_inputs(ctx)
        args = (student.detach(), teacher.detach(), norms, grad_loss, ctx.temperature, ctx.reduction, row_mask,
                temperature_t)
        # a traced backward (compile, AOT: fake or functional tensors) sees the custom op; eager calls the
        # implementation (no dispatcher)
        grad = hydra_kl_grad(*args) if _traced(*args[:4]) else _hydra_kl_grad_impl(*args)
        return grad, *(None,) * 9
    student, teacher = (None if _absent(g) else _in_dtype(_kl.scale_grad(g, grad_loss, ctx.reduction), dt)
                        for g, dt in zip(ctx.saved_tensors, ctx.grad_dtypes))
    return student, teacher, *(None,) * 8


register_autograd("fasthydra::hydra_kl", _hydra_kl_backward, setup_context=_hydra_kl_setup)


# ----------------------------------------------------------------------------------------------
# linear_hydra_kl: heads GEMM fused with the loss
# ----------------------------------------------------------------------------------------------


@_op_body
def _linear_hydra_kl_impl(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, teacher: torch.Tensor,
                          temperature: float, reduction: str, shared: bool, need_in: bool, need_w: bool, need_b: bool,
                          need_t: bool, impl: str, teacher_indices: torch.Tensor | None, small_deferred: bool,
                          row_mask: torch.Tensor | None = None, temperature_t: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """small_deferred (decided by the caller with small_deferred_config): the small-step path's launch 1
    alone, returning the stash of dL/dz (B, M, C) in the input gradient's place; launch 2 runs in the
    backward (_small_backward). row_mask (B,) bool: the rows that count; the others' loss rows and
    gradients are zero whatever a shared input holds there, NaN included. "mean" with a row mask: the Triton
    path averages over the kept rows' B_kept * M entries itself (the count read on the device by its kernels,
    so the backward sees an upstream gradient of 1 and scales nothing); the torch path keeps the coefficient
    1/(B*M) and the caller rescales (functional._fused)."""
    temperature = op_temperature(temperature, temperature_t, impl)
    poll(inp.device)
    if teacher_indices is not None:
        flag_topk_teacher(teacher, teacher_indices, weight.shape[1], "distill_loss", values_too=impl != "triton")
    elif impl != "triton":  # the Triton kernels check the teacher while they read it (no extra pass)
        flag_teacher_rows(teacher, "distill_loss")
    if small_deferred:
        cfg = small_deferred_config(inp, weight, bias, reduction, need_in, need_w, need_b, impl,
                                    teacher_indices)
        if cfg is None:
            raise ValueError("linear_hydra_kl: small_deferred=True is for the calls small_deferred_config "
                             "accepts (the Triton path's small-step kernels, a reduced loss, a gradient wanted)")
        loss, stash, tgrad = _small.small_heads_forward(inp, weight, bias, teacher, temperature, reduction, shared,
                                                           True, cfg, row_mask, need_t)
        return (loss, stash, weight.new_empty(_EMPTY), weight.new_empty(_EMPTY),
                _none_to_empty(tgrad, teacher))
    fwd = _lin.linear_hydra_kl_forward_triton if impl == "triton" else _lin.linear_hydra_kl_forward_torch
    loss, g_in, g_w, g_b, g_t = fwd(inp, weight, bias, teacher, temperature, reduction, shared, need_in, need_w,
                                    need_b and bias is not None, need_t, teacher_indices, row_mask)
    return (loss, _none_to_empty(g_in, inp), _none_to_empty(g_w, weight), _none_to_empty(g_b, weight),
            _none_to_empty(g_t, teacher))


def small_deferred_config(inp, weight, bias, reduction, need_in, need_w, need_b, impl, teacher_indices):
    """The small-step path's blocks where the heads op defers its gradients to the backward: the Triton
    path taking the small-step kernels, a reduced loss, some gradient wanted. The forward then returns
    the stash of dL/dz (B, M, C) in the input gradient's place, and the backward runs launch 2 with the
    upstream gradient read on the device (no stored gradients, no scaling launch, but for a teacher's gradient
    where the teacher requires grad: launch 1 forms it, the backward scales it). Else None. The caller
    (functional._fused) passes the verdict as the op's small_deferred argument: it is part of the
    traced graph, so the fake implementation never has to decide it again."""
    if impl != "triton" or not _common.SMALL_DEFERRED or reduction == "none":
        return None
    if not (need_in or need_w or (need_b and bias is not None)):
        return None
    return _lin.small_step_config(inp, weight, teacher_indices)


linear_hydra_kl = _custom_op("fasthydra::linear_hydra_kl", _linear_hydra_kl_impl)


@register_fake("fasthydra::linear_hydra_kl")
def _linear_hydra_kl_fake(inp, weight, bias, teacher, temperature, reduction, shared, need_in, need_w, need_b, need_t,
                          impl, teacher_indices, small_deferred, row_mask=None, temperature_t=None):
    m = weight.shape[0]
    loss = inp.new_empty((inp.shape[0], m) if reduction == "none" else (), dtype=_compute_dtype(inp))
    if small_deferred:
        return (loss, inp.new_empty((inp.shape[0], m, weight.shape[1]), dtype=_common.stored_grad_dtype(inp.dtype)),
                weight.new_empty(_EMPTY), weight.new_empty(_EMPTY),
                _common.empty_stored_grad(teacher) if need_t else teacher.new_empty(_EMPTY))
    g_in, g_w, g_b = _stored_fake(inp, weight, need_in, need_w, bias if need_b else None)
    g_t = teacher.new_empty(teacher.shape) if need_t else teacher.new_empty(_EMPTY)
    return loss, g_in, g_w, g_b, g_t


def _stored_fake(inp, weight, need_in: bool, need_w: bool, bias) -> tuple:
    """Fake (input, weight, bias) gradients of an op that stores them for the backward: in stored_grad_dtype
    (fp32 for fp16 tensors), the empty placeholder where not asked for (bias None: not asked)."""
    like = _common.empty_stored_grad
    return (like(inp) if need_in else inp.new_empty(_EMPTY), like(weight) if need_w else weight.new_empty(_EMPTY),
            like(bias) if bias is not None else weight.new_empty(_EMPTY))


def _heads_setup(ctx, inputs, output):
    """setup_context of the heads ops that store their gradients (input, weight, bias first)."""
    ctx.has_bias = inputs[2] is not None
    ctx.grad_dtypes = _grad_dtypes(inputs)
    _stored_gradients(ctx, output[1:])


def _grad_dtypes(inputs) -> list:
    """Each input's dtype (None for non-tensors): a stored gradient kept wider (stored_grad_dtype) goes back in
    it once the backward has scaled it."""
    return [a.dtype if isinstance(a, torch.Tensor) else None for a in inputs]


def _in_dtype(g: torch.Tensor, dtype) -> torch.Tensor:
    return g if dtype is None or g.dtype == dtype else g.to(dtype)


def _linear_setup(ctx, inputs, output):
    if not _small_setup(ctx, inputs, output):
        _heads_setup(ctx, inputs, output)


def _small_setup(ctx, inputs, output) -> bool:
    """The heads op's deferred small step (small_deferred_config): see _keep_for_launch2; False (ctx.small
    None) where the op stored its gradients instead."""
    ctx.small = None
    if not inputs[13]:  # small_deferred
        return False
    inp, weight, bias, teacher, _, _, shared, need_in, need_w, need_b, need_t = inputs[:11]
    _keep_for_launch2(ctx, inp, weight, bias, output, shared, need_in, need_w, need_b,
                      inputs[14] if len(inputs) > 14 else None,  # (the row mask, where given)
                      output[4] if need_t else None, teacher.dtype)
    return True


def _keep_for_launch2(ctx, inp, weight, bias, output, shared, need_in, need_w, need_b, row_mask=None, tgrad=None,
                      teacher_dtype=None) -> None:
    """A deferred small step's setup: input, weight, bias, the stash of dL/dz (output[1]) and a row mask kept
    for the small-step gradient kernel in the backward (_small_backward); a teacher's gradient that launch 1
    formed (tgrad: a teacher that requires grad, a learned temperature), scaled there."""
    ctx.small = (shared, need_in, need_w, need_b and bias is not None)
    ctx.has_bias = bias is not None
    ctx.teacher_dtype = teacher_dtype
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    save_inputs(ctx, inp, weight, bias, output[1], row_mask, tgrad)


@_op_body
def _small_heads_grads_impl(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stash: torch.Tensor,
                            grad_loss: torch.Tensor, shared: bool, need_in: bool, need_w: bool,
                            need_b: bool, row_mask: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _grads_out(*_small.small_heads_backward(inp, weight, bias, stash, grad_loss, shared, need_in, need_w,
                                                   need_b, row_mask), inp, weight)


small_heads_grads = _custom_op("fasthydra::small_heads_grads", _small_heads_grads_impl)


@register_fake("fasthydra::small_heads_grads")
def _small_heads_grads_fake(inp, weight, bias, stash, grad_loss, shared, need_in, need_w, need_b, row_mask=None):
    return _grads_fake(inp, weight, need_in, need_w, bias.shape if need_b else None)


def _grads_out(g_in, g_w, g_b, inp, weight):
    """A backward op's (input, weight, bias) gradients, the empty placeholder for each one not asked for."""
    return _none_to_empty(g_in, inp), _none_to_empty(g_w, weight), _none_to_empty(g_b, weight)


def _grads_fake(inp, weight, need_in: bool, need_w: bool, bias_shape):
    """Fake outputs of such an op: input- and weight-shaped gradients, a bias_shape one (None: not asked)."""
    return (inp.new_empty(inp.shape) if need_in else inp.new_empty(_EMPTY),  # contiguous, as the kernels write them
            weight.new_empty(weight.shape) if need_w else weight.new_empty(_EMPTY),
            weight.new_empty(bias_shape) if bias_shape is not None else weight.new_empty(_EMPTY))


def _small_backward(ctx, grad_loss, n_inputs: int) -> tuple:
    """Backward of the deferred small step: launch 2 with the upstream gradient (a traced backward sees
    the custom op, an eager one calls its implementation)."""
    _no_double_backward(grad_loss)
    out = [None] * n_inputs
    if grad_loss is None:
        return tuple(out)
    inp, weight, bias, stash, row_mask, tgrad = saved_inputs(ctx)
    shared, need_in, need_w, need_b = ctx.small
    rest = (stash, grad_loss, shared, need_in, need_w, need_b, row_mask)
    if _traced(inp, stash, grad_loss):
        g_in, g_w, g_b = small_heads_grads(inp.detach(), weight.detach(), None if bias is None else bias.detach(),
                                           *rest)
    else:  # eager: the launcher itself (no placeholders for the gradients not asked for; autocast leaves it alone;
        # grad mode is off here, _no_double_backward: no detach needed)
        g_in, g_w, g_b = _small.small_heads_backward(inp, weight, bias, *rest)
    out[0], out[1], out[2] = (g_in if need_in else None), (g_w if need_w else None), (g_b if need_b else None)
    if tgrad is not None:  # (not in place: a second backward through a retained graph finds it as launch 1 wrote it)
        out[3] = _in_dtype(_kl.scale_grads([tgrad], grad_loss)[0], ctx.teacher_dtype)
    return tuple(out)


def _no_double_backward(grad_loss) -> None:
    """The stored gradients are constants to autograd: a second-order gradient through them would be
    silently wrong, so create_graph=True is refused. So are batched upstream gradients (is_grads_batched=True,
    which runs this backward under vmap): the stored gradients are scaled in place, by one upstream gradient."""
    if torch.compiler.is_compiling():
        return
    if torch.is_grad_enabled():
        raise RuntimeError("fasthydra's fused losses do not support higher-order gradients (backward with "
                           "create_graph=True): their gradient is computed in the forward pass. Use the "
                           "reference ops in fasthydra.reference for double backward.")
    if _common.batched_backward(grad_loss):
        raise RuntimeError("fasthydra's fused losses do not support batched upstream gradients (torch.autograd.grad "
                           "with is_grads_batched=True; jacobian or hessian with vectorize=True): their gradient is "
                           "computed in the forward pass and scaled by one upstream gradient. Call backward once "
                           "per upstream gradient, or use the reference ops in fasthydra.reference.")


def _heads_backward(n_inputs: int):
    """Backward of a fused heads op whose first inputs are (input, weight, bias[, teacher]) and whose
    outputs are (loss, their stored gradients): scale those by the upstream gradient (one foreach
    launch on a GPU; nothing on the CPU when the upstream gradient is 1)."""

    def backward(ctx, grad_loss, *_):
        _no_double_backward(grad_loss)
        saved = list(ctx.saved_tensors)
        out = [None] * n_inputs
        if grad_loss is None:
            return tuple(out)
        if not ctx.has_bias:
            saved[2] = saved[2].new_empty(_EMPTY)
        present = [i for i, g in enumerate(saved) if not _absent(g)]
        for i, g in zip(present, _kl.scale_grads([saved[i] for i in present], grad_loss)):
            out[i] = _in_dtype(g, ctx.grad_dtypes[i])
        return tuple(out)

    return backward


def _deferrable_backward(stored, n_inputs: int):
    """A heads op's backward: launch 2 for a deferred small step, else `stored` (the stored gradients'
    scaling)."""

    def backward(ctx, grad_loss, *rest):
        if getattr(ctx, "small", None) is not None:
            return _small_backward(ctx, grad_loss, n_inputs)
        return stored(ctx, grad_loss, *rest)

    return backward


register_autograd("fasthydra::linear_hydra_kl", _deferrable_backward(_heads_backward(16), 16),
                  setup_context=_linear_setup)


# ----------------------------------------------------------------------------------------------
# uncertainty (its backward recomputes the heads' softmax from the logits: _unc.uncertainty_backward)
# ----------------------------------------------------------------------------------------------


@_op_body
def _uncertainty_impl(logits: torch.Tensor, temperature: float, impl: str, temperature_t: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = _unc.uncertainty_triton if impl == "triton" else _unc.uncertainty_torch
    out = fn(logits, op_temperature(temperature, temperature_t, impl))
    if logits.shape[1] == 1:  # one head: the decomposition is exact, no rounding residue in epistemic
        out.epistemic.zero_()
        out.total.copy_(out.aleatoric)
    return tuple(out)


uncertainty = _custom_op("fasthydra::uncertainty", _uncertainty_impl)


@register_fake("fasthydra::uncertainty")
def _uncertainty_fake(logits, temperature, impl, temperature_t=None):
    b, _, c = logits.shape
    return (logits.new_empty(b, c), logits.new_empty(b), logits.new_empty(b), logits.new_empty(b))


def _uncertainty_setup(ctx, inputs, output):
    logits, ctx.temperature, ctx.impl, *rest = inputs
    ctx.set_materialize_grads(False)  # an output nobody differentiates contributes nothing (None)
    save_inputs(ctx, logits, rest[0] if rest else None)


def _uncertainty_backward(ctx, g_probs, g_total, g_aleatoric, g_epistemic):
    logits, temperature_t = saved_inputs(ctx)
    grads = (g_probs, g_total, g_aleatoric, g_epistemic)
    if all(g is None for g in grads):
        return None, None, None, None
    # (create_graph=True, or batched upstream gradients under vmap (is_grads_batched=True): the torch ops)
    if ctx.impl == "triton" and not torch.is_grad_enabled() and (torch.compiler.is_compiling()
                                                                 or not _common.batched_backward(*grads)):
        args = (logits.detach(), ctx.temperature, *grads, temperature_t)
        # a traced backward sees the custom op; eager calls the launcher
        return (uncertainty_grad(*args) if _traced(logits, *(g for g in grads if g is not None))
                else _uncertainty_grad_impl(*args)), None, None, None
    # torch path: the native C kernel for fp32 CPU logits, else plain torch ops, differentiable themselves
    # (create_graph=True works) and traced as they are by compile
    temperature = op_temperature(ctx.temperature, temperature_t, ctx.impl)
    return _unc.uncertainty_backward(logits, temperature, *grads), None, None, None


@_op_body
def _uncertainty_grad_impl(logits: torch.Tensor, temperature: float, g_probs: torch.Tensor | None,
                           g_total: torch.Tensor | None, g_aleatoric: torch.Tensor | None,
                           g_epistemic: torch.Tensor | None, temperature_t: torch.Tensor | None = None) -> torch.Tensor:
    return _unc.uncertainty_backward_triton(logits, op_temperature(temperature, temperature_t), g_probs, g_total,
                                            g_aleatoric, g_epistemic)


uncertainty_grad = _custom_op("fasthydra::uncertainty_grad", _uncertainty_grad_impl)


@register_fake("fasthydra::uncertainty_grad")
def _uncertainty_grad_fake(logits, temperature, g_probs, g_total, g_aleatoric, g_epistemic, temperature_t=None):
    return logits.new_empty(logits.shape)  # contiguous, as the launcher's


register_autograd("fasthydra::uncertainty", _uncertainty_backward, setup_context=_uncertainty_setup)


# ----------------------------------------------------------------------------------------------
# grouped_linear: the heads' GEMM on the Triton path (head(x), the MLP heads' first layer)
# ----------------------------------------------------------------------------------------------


@_op_body
def _grouped_linear_impl(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shared: bool,
                   relu: bool) -> torch.Tensor:
    return _gl.grouped_linear_forward(inp, weight, bias, shared, relu)


grouped_linear = _custom_op("fasthydra::grouped_linear", _grouped_linear_impl)


@register_fake("fasthydra::grouped_linear")
def _grouped_linear_fake(inp, weight, bias, shared, relu):
    return inp.new_empty(inp.shape[0], weight.shape[0], weight.shape[1])


@_op_body
def _grouped_linear_backward_impl(grad_out: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                            shared: bool, relu: bool, need_in: bool, need_w: bool,
                            need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _grads_out(*_gl.grouped_linear_backward(grad_out, inp, weight, out if relu else None, shared, need_in,
                                                   need_w, need_b), inp, weight)


grouped_linear_backward = _custom_op("fasthydra::grouped_linear_backward", _grouped_linear_backward_impl)


@register_fake("fasthydra::grouped_linear_backward")
def _grouped_linear_backward_fake(grad_out, inp, weight, out, shared, relu, need_in, need_w, need_b):
    g_in, g_w, g_b = _grads_fake(inp, weight, need_in, need_w, weight.shape[:2] if need_b else None)
    return g_in, g_w, g_b.to(torch.float32) if need_b else g_b  # db as the impl makes it: an fp32 column sum


def _grouped_linear_setup(ctx, inputs, output):
    inp, weight, bias, shared, relu = inputs
    ctx.shared, ctx.relu, ctx.has_bias = shared, relu, bias is not None
    save_inputs(ctx, inp, weight, output if relu else None)


def _grouped_linear_bwd(ctx, grad_out):
    inp, weight, out = saved_inputs(ctx)
    need_in, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
    if not torch.compiler.is_compiling() and (torch.is_grad_enabled() or _common.batched_backward(grad_out)):
        # create_graph=True, or batched upstream gradients (is_grads_batched=True: vmap over this backward, which
        # cannot write into preallocated outputs): plain torch ops
        return (*_gl.grouped_linear_backward_graph(grad_out, inp, weight, out if ctx.relu else None, ctx.shared,
                                                   need_in, need_w, need_b), None, None)
    backward_op = grouped_linear_backward if torch.compiler.is_compiling() else _grouped_linear_backward_impl
    g_in, g_w, g_b = backward_op(
        grad_out.contiguous(), inp, weight, out if out is not None else weight.new_empty(_EMPTY), ctx.shared,
        ctx.relu, need_in, need_w, need_b)
    return (g_in if need_in else None, g_w if need_w else None, g_b.to(weight.dtype) if need_b else None, None, None)


register_autograd("fasthydra::grouped_linear", _grouped_linear_bwd, setup_context=_grouped_linear_setup)


# ----------------------------------------------------------------------------------------------
# gaussian_heads_kl: Gaussian regression heads fused with their KL (the Triton path; the torch path is
# plain differentiable torch ops, which torch.compile traces as they are)
# ----------------------------------------------------------------------------------------------


@_op_body
def _gaussian_heads_kl_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            teacher_mean: torch.Tensor, teacher_var: torch.Tensor, min_var: float, reduction: str,
                            need_in: bool, need_w: bool, need_b: bool,
                            small_deferred: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """small_deferred (decided by the caller with gaussian_deferred): the fused kernel alone, returning
    the (B, M, 2K) stash of the gradient w.r.t. (mu, raw var) in the input gradient's place; the
    small-step gradient kernel runs in the backward (as for the Hydra heads)."""
    poll(x.device)  # the kernel checks the teacher while it reads it (error word bits 8 and 16)
    if small_deferred:
        if not _gauss.gaussian_deferred(x, weight, bias, need_in, need_w, need_b):
            raise ValueError("gaussian_heads_kl: small_deferred=True is for the calls gaussian_deferred accepts "
                             "(a batch the small-step gradient kernel takes, a gradient wanted)")
        loss, stash = _gauss.gaussian_heads_kl_forward_triton(x, weight, bias, teacher_mean, teacher_var, min_var,
                                                              reduction, need_in, need_w,
                                                              need_b and bias is not None, deferred=True)
        return loss, stash, weight.new_empty(_EMPTY), weight.new_empty(_EMPTY)
    loss, g_x, g_w, g_b = _gauss.gaussian_heads_kl_forward_triton(x, weight, bias, teacher_mean, teacher_var, min_var,
                                                                  reduction, need_in, need_w,
                                                                  need_b and bias is not None)
    return loss, _none_to_empty(g_x, x), _none_to_empty(g_w, weight), _none_to_empty(g_b, weight)


gaussian_heads_kl = _custom_op("fasthydra::gaussian_heads_kl", _gaussian_heads_kl_impl)
gaussian_deferred = _gauss.gaussian_deferred


@register_fake("fasthydra::gaussian_heads_kl")
def _gaussian_heads_kl_fake(x, weight, bias, teacher_mean, teacher_var, min_var, reduction, need_in, need_w, need_b,
                            small_deferred):
    if small_deferred:
        return (x.new_empty((), dtype=torch.float32),
                x.new_empty(teacher_mean.shape[:2] + (weight.shape[1],), dtype=_common.stored_grad_dtype(x.dtype)),
                weight.new_empty(_EMPTY), weight.new_empty(_EMPTY))
    return (x.new_empty((), dtype=torch.float32), *_stored_fake(x, weight, need_in, need_w, bias if need_b else None))


def _gaussian_setup(ctx, inputs, output):
    ctx.small = None
    if inputs[10]:  # small_deferred
        x, weight, bias = inputs[:3]
        _keep_for_launch2(ctx, x, weight, bias, output, True, *inputs[7:10])
        return
    _heads_setup(ctx, inputs, output)


register_autograd("fasthydra::gaussian_heads_kl", _deferrable_backward(_heads_backward(11), 11),
                  setup_context=_gaussian_setup)


# ----------------------------------------------------------------------------------------------
# Eager calls: the same implementations, setup and backward as the custom ops, as autograd.Functions.
# The custom-op dispatcher costs tens of microseconds of Python per call and imports torch._dynamo
# (and sympy: about a second and 150 MiB) on the first call; only a traced program needs it.
# ----------------------------------------------------------------------------------------------


def _eager_function(name: str, impl, setup, backward, loss_only: bool = False) -> type:
    """`impl` as an autograd.Function with the given setup_context and backward. loss_only: the Function's one
    output is impl's first (the loss); the others (stored gradients, placeholders: non-differentiable, held by
    the setup where it keeps them) go to the setup alone, and autograd tracks one output where the op has up to
    seven (about 1 us each on the host per step). Its callers read the loss alone (``loss, *_ = call(...)``)."""

    def forward(ctx, *args):  # the classic form: a separate setup_context costs a signature bind per call
        out = impl(*args)
        setup(ctx, args, out)
        return out[0] if loss_only else out

    return type(f"{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
        "loss_only": loss_only,
    })


def refuse_torch_func(name: str):
    """The error of a fused loss called under torch.func transforms: they need a setup_context form and vmap
    rules these ops do not have (the gradient is formed in the forward pass, the kernels read raw storage)."""
    raise RuntimeError(f"fasthydra ({name}): torch.func transforms (grad, vmap, jacrev, functionalize, ...) "
                       "are not supported by the fused ops, which form the gradient in the forward pass; use "
                       "torch.autograd (loss.backward(), torch.autograd.grad), or the reference ops in "
                       "fasthydra.reference, which torch.func can transform")


def refuse_jit_trace(name: str):
    """The error of a fused loss called under torch.jit.trace, which would record a wrong program: it sees
    neither the kernels' writes nor the gradients formed in the forward, and would freeze which gradients
    are formed (decided from requires_grad at trace time)."""
    raise RuntimeError(f"fasthydra ({name}): torch.jit.trace cannot record the fused losses (it does not see "
                       "their kernels' writes, and would freeze which gradients they form); trace the model's "
                       "forward (the heads' logits and uncertainty run as plain torch ops under the tracer), and "
                       "use torch.compile or torch.export for a training step")


def refuse_forward_ad(name: str, args) -> None:
    """The error of a fused loss given dual tensors (forward-mode AD, ``torch.autograd.forward_ad``): its kernels
    read the primal values only, so the output's tangent would be silently 0 (or autograd's NotImplementedError
    where an input also requires grad). Its callers ask _common.forward_ad_active() first (one attribute read on
    every call); this asks only whether one of args carries a tangent."""
    if _common.has_tangent(args):
        raise RuntimeError(f"fasthydra ({name}): forward-mode AD (dual tensors of torch.autograd.forward_ad) is not "
                           "supported by the fused losses, which form the gradient in the forward pass; the heads' "
                           "logits (head(x)) and uncertainty take dual tensors (as plain torch ops), and the "
                           "reference ops in fasthydra.reference give a loss's forward-mode derivative")


def _eager_call(name: str, fn: type, impl):
    """An eager call of the autograd.Function fn over `impl`: refused under torch.func transforms (which need a
    setup_context form and vmap rules these ops do not have) with a message that says what to use instead; without
    the Function where nothing will be differentiated (under no_grad, or no input requires grad: autograd's
    bookkeeping and the setup would be thrown away, host time per evaluation step)."""

    def call(*args):
        if torch._C._are_functorch_transforms_active():
            refuse_torch_func(name)
        if torch._C._is_tracing():
            refuse_jit_trace(name)
        if _common.forward_ad_active():
            refuse_forward_ad(name, args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return (fn.apply(*args),) if fn.loss_only else fn.apply(*args)
        return impl(*args)

    return call


def _eager_entry(op, impl, setup=None, backward=None, loss_only: bool = False):
    """A callable that runs `op` (the custom op) where ``op_form`` says so (torch.compile/export tracing, meta
    tensors, FakeTensorMode, the FLOP counter), and otherwise `impl` directly, wrapped in an autograd.Function
    with the op's own setup_context and backward."""
    if setup is None:
        def call(*args):
            return op(*args) if op_form(args[0]) else impl(*args)
        return call

    eager = _eager_call(op._name, _eager_function(op._name, impl, setup, backward, loss_only), impl)

    def call(*args):
        return op(*args) if op_form(args[0]) else eager(*args)

    call.op = op
    return call


def _hand_over_setup(ctx, inputs, output, strong: int) -> None:
    """Eager calls of the ops that compute their gradients in the forward: the stored gradients are held as
    plain attributes, so that the first backward can hand them to autograd and scale them in place
    (nothing else holds them: autograd takes them as the parameters' .grad without a copy, and no new
    gradient-sized tensor is made). For a second backward through a retained graph, which recomputes
    the gradients (_take_stored), the inputs are kept with their versions: the first `strong` ones by
    reference (the heads' input, weight and bias, as nn.Linear keeps them), the others weakly (logits and
    teachers, often temporaries as large as the logits, which would otherwise live until the backward),
    through the tensor a view of them was taken from."""
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.stored = list(output[1:])
    ctx.inputs = [_Kept(a, weak=i >= strong and a.dtype != torch.bool and a.dim() > 0)
                  if isinstance(a, torch.Tensor) else a
                  for i, a in enumerate(inputs)]  # (a row mask and a tensor temperature by reference too: temporaries)


class _Kept:
    """An op input kept for a recomputation: the tensor itself, or a weak reference to the tensor it views
    and the view's geometry; with the version it had. A tensor made under torch.inference_mode() has no version
    counter (see _common.save_inputs), and a view of it taken outside that mode no base to hold weakly (a reshaped
    teacher would be gone by the backward): it is kept by reference, unversioned."""

    __slots__ = ("ref", "weak", "geometry", "version")

    def __init__(self, t: torch.Tensor, weak: bool):
        inference = t.is_inference()
        self.version = None if inference else t._version
        self.weak = weak = weak and not inference
        if weak:
            root = t if t._base is None else t._base
            self.ref = weakref.ref(root)
            self.geometry = None if root is t else (t.shape, t.stride(), t.storage_offset())
        else:
            self.ref, self.geometry = t, None

    def get(self) -> torch.Tensor:
        t = self.ref() if self.weak else self.ref
        if t is None:
            raise RuntimeError("a second backward through a fasthydra loss (retain_graph=True) recomputes its "
                               "gradients from the forward's inputs, but one of them (logits or teacher) no longer "
                               "exists: keep a reference to it until the last backward")
        if self.version is not None and t._version != self.version:
            raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                               "inplace operation: a second backward through a fasthydra loss (retain_graph=True) "
                               "recomputes its gradients from the forward's inputs")
        if self.geometry is not None:
            t = t.as_strided(*self.geometry)
        return t.detach()


def _take_stored(ctx, impl) -> list:
    """The stored gradients, handed over once; a second backward (retain_graph=True) finds them given away
    and runs the forward once more on the same inputs, refused if one was changed in place or freed."""
    stored, ctx.stored = ctx.stored, None
    if stored is not None:
        return stored
    args = [a.get() if isinstance(a, _Kept) else a for a in ctx.inputs]
    with torch.no_grad():
        return list(impl(*args)[1:])


def _eager_heads_setup(ctx, inputs, output, strong: int = 3):
    """Eager form of _heads_setup (see _hand_over_setup)."""
    ctx.has_bias = inputs[2] is not None
    ctx.grad_dtypes = _grad_dtypes(inputs)
    _hand_over_setup(ctx, inputs, output, strong=strong)


def _eager_heads_backward(n_inputs: int, impl):
    """Eager form of _heads_backward: the stored gradients scaled in place by the upstream gradient (on a
    GPU one launch that reads it on the device and does nothing when it is 1) and handed over."""

    def backward(ctx, grad_loss, *_):
        _no_double_backward(grad_loss)
        out = [None] * n_inputs
        if grad_loss is None:
            return tuple(out)
        stored = _take_stored(ctx, impl)
        if not ctx.has_bias:
            stored[2] = stored[2].new_empty(_EMPTY)
        present = [i for i, g in enumerate(stored) if not _absent(g)]
        _kl.scale_grads_([stored[i] for i in present], grad_loss)
        for i in present:  # (fp32 gradients of fp16 tensors go back to fp16 now that they are scaled)
            out[i] = _in_dtype(stored[i], ctx.grad_dtypes[i])
        return tuple(out)

    return backward


def _eager_hydra_kl_setup(ctx, inputs, output):
    """Eager form of _hydra_kl_setup: a gradient formed in the backward as there; gradients formed in the
    forward (a teacher that requires grad, a top-k teacher) handed over as the heads' are (in place, on
    a GPU untouched when the upstream gradient is 1: no (B, M, C) multiply)."""
    if _deferred(*inputs[4:8]):
        _hydra_kl_setup(ctx, inputs, output)
        return
    ctx.deferred, ctx.reduction = False, inputs[3]
    ctx.grad_dtypes = _grad_dtypes(inputs)
    # all by reference: the logits and teacher a caller usually holds anyway, and the Hinton loss's target,
    # a temporary (1/M of the teacher) that gradcheck's repeated backwards need
    _hand_over_setup(ctx, inputs, output, strong=len(inputs))


def _eager_hydra_kl_backward(ctx, grad_loss, *_grad_of_grads):
    if ctx.deferred:
        return _hydra_kl_backward(ctx, grad_loss)
    _no_double_backward(grad_loss)
    if grad_loss is None:
        return (None,) * 10
    student, teacher = (None if _absent(g) else g for g in _take_stored(ctx, _hydra_kl_impl))
    _kl.scale_grads_([g for g in (student, teacher) if g is not None], grad_loss)
    student, teacher = (None if g is None else _in_dtype(g, dt) for g, dt in zip((student, teacher), ctx.grad_dtypes))
    return student, teacher, *(None,) * 8


hydra_kl_call = _eager_entry(hydra_kl, _hydra_kl_impl, _eager_hydra_kl_setup, _eager_hydra_kl_backward, True)
def _eager_linear_setup(ctx, inputs, output):
    """Eager form of _linear_setup: the deferred small step as there, else the hand-over of stored gradients."""
    if not _small_setup(ctx, inputs, output):
        _eager_heads_setup(ctx, inputs, output)


linear_hydra_kl_call = _eager_entry(linear_hydra_kl, _linear_hydra_kl_impl, _eager_linear_setup,
                                    _deferrable_backward(_eager_heads_backward(16, _linear_hydra_kl_impl), 16), True)
uncertainty_call = _eager_entry(uncertainty, _uncertainty_impl, _uncertainty_setup, _uncertainty_backward)
grouped_linear_call = _eager_entry(grouped_linear, _grouped_linear_impl, _grouped_linear_setup, _grouped_linear_bwd)
def _eager_gaussian_setup(ctx, inputs, output):
    """Eager form of _gaussian_setup: the deferred small step as there, else the hand-over of stored
    gradients, every input held by reference (the teacher's mean and variance are small, and the caller
    passes detached copies that nothing else would keep alive for a second backward)."""
    ctx.small = None
    if inputs[10]:
        _gaussian_setup(ctx, inputs, output)
        return
    ctx.has_bias = inputs[2] is not None
    ctx.grad_dtypes = _grad_dtypes(inputs)
    _hand_over_setup(ctx, inputs, output, strong=len(inputs))


gaussian_heads_kl_call = _eager_entry(gaussian_heads_kl, _gaussian_heads_kl_impl, _eager_gaussian_setup,
                                      _deferrable_backward(_eager_heads_backward(11, _gaussian_heads_kl_impl), 11),
                                      True)


# ----------------------------------------------------------------------------------------------
# MLP heads on the torch path (eager calls): both layers in one autograd node
# ----------------------------------------------------------------------------------------------


@_op_body
def _mlp_hydra_kl_impl(x: torch.Tensor, hidden_weight: torch.Tensor, hidden_bias: torch.Tensor | None,
                       weight: torch.Tensor, bias: torch.Tensor | None, teacher: torch.Tensor, temperature: float,
                       reduction: str, need_x: bool, need_hw: bool, need_hb: bool, need_w: bool, need_b: bool,
                       need_t: bool, teacher_indices: torch.Tensor | None, row_mask: torch.Tensor | None = None,
                       temperature_t: torch.Tensor | None = None) -> tuple:
    """MLP heads fused with the loss on the torch path, every gradient formed in the forward: the first
    layer (one GEMM, ReLU in place), the second layer and the loss (the heads op's torch path, which
    stores the hidden activations' gradient du), then ReLU's backward in place on du and the first
    layer's gradients from it. Returns (loss, dx, dW1, db1, dW2, db2, dteacher), placeholders where not
    asked for.

    Why one node: as two autograd nodes (relu(linear) feeding the heads op) the hidden activations u
    (B, M, H) stayed alive for ReLU's backward, which then allocated a new (B, M, H) gradient beside the
    stored du: three (B, M, H) tensors at the backward's peak, 1.47x eager's memory at small C. Here u
    becomes ReLU's mask in place once du exists and is freed with the forward: at most two at a time."""
    m, h, d = hidden_weight.shape
    w1 = hidden_weight.reshape(m * h, d)
    u = torch.nn.functional.linear(x, w1, None if hidden_bias is None else hidden_bias.reshape(m * h)).relu_()
    need_u = need_x or need_hw or (need_hb and hidden_bias is not None)
    loss, du, g_w, g_b, g_t = _linear_hydra_kl_impl(u.view(x.shape[0], m, h), weight, bias, teacher, temperature,
                                                   reduction, False, need_u, need_w, need_b, need_t, "torch",
                                                   teacher_indices, False, row_mask, temperature_t)
    g_x = g_hw = g_hb = None
    if need_u:
        du = du.view(x.shape[0], m * h)
        du.mul_(u.sign_())  # ReLU's backward: u = relu(a) >= 0, so sign(u) is 1 where a > 0 and 0 elsewhere
        del u
        cdt = du.dtype  # the heads op returns du in stored_grad_dtype(u.dtype)
        if need_x:
            g_x = du @ w1.to(cdt)
        if need_hw:
            g_hw = (du.T @ x.to(cdt)).view(m, h, d).to(_common.stored_grad_dtype(hidden_weight.dtype))
        if need_hb and hidden_bias is not None:
            g_hb = du.sum(0).view(m, h).to(_common.stored_grad_dtype(hidden_bias.dtype))
    return (loss, _none_to_empty(g_x, x), _none_to_empty(g_hw, hidden_weight), _none_to_empty(g_hb, hidden_weight),
            g_w, g_b, g_t)


def _eager_mlp_setup(ctx, inputs, output):
    """Both layers' weights and biases by reference, the teacher weakly (see _hand_over_setup)."""
    _eager_heads_setup(ctx, inputs, output, strong=5)


mlp_hydra_kl_eager = _eager_call("mlp_hydra_kl", _eager_function("mlp_hydra_kl", _mlp_hydra_kl_impl, _eager_mlp_setup,
                                                                 _eager_heads_backward(17, _mlp_hydra_kl_impl), True),
                                  _mlp_hydra_kl_impl)


# ----------------------------------------------------------------------------------------------
# FLOP counts: torch.utils.flop_counter.FlopCounterMode sees the custom ops themselves (op_form), so it is
# told the matrix products inside each, as it knows aten.mm's. Softmax, KL and the other elementwise work
# count nothing, as in eager torch.
# ----------------------------------------------------------------------------------------------


def _products(rows: int, weight_shape, count: int) -> int:
    """FLOPs of `count` products of a (rows, K) input with each of M (N, K) weights: 2 * rows * M * N * K each."""
    m, n, k = weight_shape
    return 2 * rows * m * n * k * count


def _linear_hydra_kl_flops(inp, weight, bias, teacher, temperature, reduction, shared, need_in, need_w, need_b, need_t,
                           impl, teacher_indices, small_deferred, row_mask=None, temperature_t=None, out_shape=None,
                           **_):
    # the logits, and the gradients' products where the forward forms them (a deferred small step: in the backward)
    return _products(inp[0], weight, 1 + (0 if small_deferred else int(need_in) + int(need_w)))


def _gaussian_heads_kl_flops(x, weight, bias, teacher_mean, teacher_var, min_var, reduction, need_in, need_w, need_b,
                             small_deferred, out_shape=None, **_):
    return _products(x[0], weight, 1 + (0 if small_deferred else int(need_in) + int(need_w)))


def _small_heads_grads_flops(inp, weight, bias, stash, grad_loss, shared, need_in, need_w, need_b, row_mask=None,
                             out_shape=None, **_):
    return _products(inp[0], weight, int(need_in) + int(need_w))


def _grouped_linear_flops(inp, weight, bias, shared, relu, out_shape=None, **_):
    return _products(inp[0], weight, 1)


def _grouped_linear_backward_flops(grad_out, inp, weight, out, shared, relu, need_in, need_w, need_b, out_shape=None,
                                   **_):
    return _products(inp[0], weight, int(need_in) + int(need_w))


def register_flop_formulas() -> None:
    """Teaches ``torch.utils.flop_counter.FlopCounterMode`` the matrix products inside fasthydra's fused ops
    (otherwise it counts none of them). FlopCounterMode copies its table when it is made: call this first. Done
    at import when torch.utils.flop_counter is already imported; calling it again changes nothing."""
    from torch.utils import flop_counter

    ops = torch.ops.fasthydra
    for packet, formula in ((ops.linear_hydra_kl, _linear_hydra_kl_flops),
                            (ops.gaussian_heads_kl, _gaussian_heads_kl_flops),
                            (ops.small_heads_grads, _small_heads_grads_flops),
                            (ops.grouped_linear, _grouped_linear_flops),
                            (ops.grouped_linear_backward, _grouped_linear_backward_flops)):
        # keyed by the packet, as the counter looks ops up (register_flop_formula keyed torch 2.4's table by
        # overload, where the counter never found them; it also refuses a second registration)
        flop_counter.flop_registry[packet] = flop_counter.shape_wrapper(formula)


if "torch.utils.flop_counter" in sys.modules:  # (importing it costs about 0.2 s: not done for everyone)
    register_flop_formulas()
