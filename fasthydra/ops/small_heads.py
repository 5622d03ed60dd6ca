"""The small-step path's launchers (kernels/small_heads.py): a heads + loss step in two launches when a
head's row fits one class tile. Launch 1 is op-specific (the Hydra loss here; the Gaussian heads use
their own fused kernel, ops/gaussian_kl.py); launch 2, ``launch_small_grads``, is shared: it turns the
stash of dL/dz into dx, dW, db.

The Hydra heads run launch 1 in the forward and, where autograd wants gradients, launch 2 in the
backward (``small_heads_forward``, ``small_heads_backward``): launch 2 reads the upstream gradient on
the device, so a training step is these two launches and nothing else, whatever the upstream gradient.
"""

from __future__ import annotations

import torch

from . import _common
from ._common import (cdiv, dot_precision, empty_stored_grad, finished_count, small_grads_config, stored_grad_dtype,
                      temperature_scalars,
                      upcast_dot)
from .checks import after_launch, error_word
from .launch import launch
from .hydra_kl import reduction_coefficient


def small_heads_forward(inp, weight, bias, teacher, temperature: float, reduction: str, shared: bool, want_grad: bool,
                        cfg: dict, row_mask=None, want_tgrad: bool = False):
    """Launch 1: per (row block, head group) the logits, loss rows and (want_grad) dz, stashed (B, M, C)
    in the input dtype (fp32 for fp16 inputs, whose range dz = T (q - p) / (B M) leaves: stored_grad_dtype);
    for "mean"/"sum" the last program reduces the loss. row_mask (B,) bool: the rows left out get loss 0 and
    dz 0, their inputs not read, and "mean" is over the kept rows' B_kept * M entries (the count summed on the
    device first: one small launch). want_tgrad: the teacher's gradient too (B, M, C) contiguous, in its stored
    dtype, scaled by the reduction (a teacher that requires grad, a learned temperature). Returns (loss, stash
    or None, teacher gradient or None)."""
    from fasthydra.kernels.small_heads import _small_heads_kl_kernel

    m, c, k = weight.shape
    b = inp.shape[0]
    dev, dt = inp.device, inp.dtype
    inp = inp.contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    grid1 = (cdiv(b, cfg["BLOCK_B"]), cdiv(m, cfg["HEADS"]))
    rows = torch.empty(b, m, dtype=torch.float32, device=dev)
    parts = torch.empty(grid1, dtype=torch.float32, device=dev)
    stash = torch.empty(b, m, c, dtype=stored_grad_dtype(dt), device=dev) if want_grad else None
    tgrad = torch.empty(b, m, c, dtype=stored_grad_dtype(teacher.dtype), device=dev) if want_tgrad else None
    reduce = reduction != "none"
    out = torch.empty((), dtype=torch.float32, device=dev) if reduce else rows
    coef = reduction_coefficient(reduction, b * m)
    mean_kept = row_mask is not None and reduction == "mean"
    tf, temp, t_ptr = temperature_scalars(temperature)
    precision = dot_precision(dt)
    launch(_small_heads_kl_kernel, grid1,
        inp, weight, bias if bias is not None else weight, teacher, rows, parts, rows if stash is None else stash,
        rows if tgrad is None else tgrad, error_word(dev, "distill_loss"), out,
        finished_count(dev) if reduce else parts, _keep_arg(row_mask, parts),
        row_mask.sum() if mean_kept else parts, b, m, c, k, cfg["HEADS"],
        inp.stride(0), 0 if shared else inp.stride(1), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0, teacher.stride(0), teacher.stride(1), 1.0 / tf, tf * tf, tf * coef,
        coef, temp, T_PTR=t_ptr, HAS_BIAS=bias is not None, WRITE_GRAD=want_grad, WRITE_TGRAD=want_tgrad,
        REDUCE=reduce, HAS_KEEP=row_mask is not None, MEAN_KEPT=mean_kept, UPCAST_DOT=upcast_dot(dt),
        PRECISION=precision, OUTER=_common.small_outer_fma(cfg, precision),
        BLOCK_B=cfg["BLOCK_B"], BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_P=_common.reduce_block(grid1[0] * grid1[1], cfg["num_warps"]), num_warps=cfg["num_warps"])
    after_launch(dev, "distill_loss", teacher.shape)
    return out, stash, tgrad


def small_heads_backward(inp, weight, bias, stash, grad_loss, shared: bool, need_in: bool, need_w: bool,
                         need_b: bool, row_mask=None):
    """Launch 2 from the backward: dx, dW, db from launch 1's stash, times the upstream gradient grad_loss
    (a scalar tensor, read on the device); row_mask as launch 1 had it. Returns (grad_in, grad_weight,
    grad_bias), None where not asked."""
    m, c, k = weight.shape
    cfg = small_grads_config(inp.shape[0], m, c, k, inp.element_size(), stash.element_size())
    if grad_loss.dim() != 0 or grad_loss.dtype != torch.float32:  # (autograd's usual ones: as they are)
        grad_loss = grad_loss.reshape(()).to(torch.float32)
    return launch_small_grads(inp.contiguous(), weight.contiguous(), bias, stash, cfg, shared, need_in, need_w,
                              need_b and bias is not None, upstream=grad_loss, row_mask=row_mask)


def _keep_arg(row_mask, placeholder):
    """A row mask as the kernels read it, B consecutive uint8 (the bool tensor's bytes: no copy unless the
    mask is a strided view), or a placeholder pointer where there is none."""
    return placeholder if row_mask is None else row_mask.contiguous().view(torch.uint8)


def linear_hydra_kl_forward_small(inp, weight, bias, teacher, temperature: float, reduction: str, shared: bool,
                                  need_in: bool, need_w: bool, need_b: bool, cfg: dict, row_mask=None,
                                  need_t: bool = False):
    """Heads + Hydra loss with the gradients formed in the forward (the path's knob SMALL_DEFERRED off, and
    reduction "none"): launch 1, then launch 2 at once. Returns (loss, grad_in, grad_weight, grad_bias,
    grad_teacher), None where not asked."""
    want_grad = need_in or need_w or need_b
    loss, stash, tgrad = small_heads_forward(inp, weight, bias, teacher, temperature, reduction, shared, want_grad,
                                             cfg, row_mask, need_t)
    if not want_grad:
        return loss, None, None, None, tgrad
    return (loss, *launch_small_grads(inp.contiguous(), weight.contiguous(), bias, stash, cfg, shared, need_in,
                                      need_w, need_b, row_mask=row_mask), tgrad)


def launch_small_grads(inp, weight, bias, stash, cfg: dict, shared: bool, need_in: bool, need_w: bool, need_b: bool,
                       upstream: torch.Tensor | None = None, row_mask: torch.Tensor | None = None):
    """Launch 2 of the small-step path (``_small_heads_grad_kernel``), after any first launch that left a
    (B, M, C) stash of dL/dz (contiguous, the input dtype; fp32 for fp16 inputs): dW and db per (head, K block)
    over all rows, dx per (row block, K block). upstream: a scalar tensor the gradients are multiplied by on the device
    (the backward's upstream gradient). Returns (grad_in, grad_weight, grad_bias), None where not asked: in
    the tensors' dtypes when scaled by upstream, else kept for a later scaling (stored_grad_dtype). An fp32
    stash of 16-bit inputs takes its own blocks (small_grads_config, as the kernel report compiles them).
    row_mask (B,) bool: the rows left out are read as 0 for dW (their dz rows are 0 already)."""
    from fasthydra.kernels.small_heads import _small_heads_grad_kernel

    m, c, k = weight.shape
    b = inp.shape[0]
    dt = inp.dtype
    if stash.element_size() > inp.element_size():
        cfg = small_grads_config(b, m, c, k, inp.element_size(), stash.element_size())

    def out_like(t):  # scaled now: the tensor's dtype; else kept for the backward's scaling. Contiguous whatever
        #               t's layout (the kernel writes dense rows; empty_like's default would keep a permuted bias's
        #               strides)
        return (torch.empty_like(t, memory_format=torch.contiguous_format) if upstream is not None
                else empty_stored_grad(t))

    grad_in = out_like(inp) if need_in else None
    grad_w = out_like(weight) if need_w else None
    grad_b = out_like(bias) if need_b else None
    n_kb = cdiv(k, cfg["BLOCK_K"])
    kb_w = cdiv(k, cfg["BLOCK_KW"]) if need_w else 1
    n_w = m * kb_w if (need_w or need_b) else 0
    n_x = (cdiv(b, cfg["BLOCK_R"]) * n_kb * (1 if shared else m)) if need_in else 0
    if n_w or n_x:
        precision = dot_precision(dt)
        outer = _common.small_grads_outer(cfg, precision)
        unused = stash  # a placeholder pointer for the outputs and inputs not in use
        launch(_small_heads_grad_kernel, (n_w + n_x,),
            inp, weight, stash, unused if grad_in is None else grad_in, unused if grad_w is None else grad_w,
            unused if grad_b is None else grad_b, unused if upstream is None else upstream,
            _keep_arg(row_mask, unused), b, m, c, k,
            inp.stride(0), 0 if shared else inp.stride(1), n_w, kb_w, n_x, n_kb, SHARED=shared, NEED_W=need_w,
            NEED_B=need_b, SCALE_BY_UP=upstream is not None, HAS_KEEP=row_mask is not None,
            UPCAST_DOT=upcast_dot(dt), PRECISION=precision, OUTER=outer,
            BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"], BLOCK_J=cfg["BLOCK_J"],
            BLOCK_RW=_common.OUTER_ROWS if outer else cfg["BLOCK_RW"], BLOCK_KW=cfg["BLOCK_KW"],
            num_warps=cfg["num_warps"])
    return grad_in, grad_w, grad_b
