"""The small-step path's launchers (kernels/small_heads.py): a heads + loss step in two launches when a
head's row fits one class tile. Launch 1 is op-specific (the Hydra loss here; the Gaussian heads use
their own fused kernel, ops/gaussian_kl.py); launch 2, ``launch_small_grads``, is shared: it turns the
stash of dL/dz into dx, dW, db and reduces the partial losses.
"""

from __future__ import annotations

import torch

from ._common import cdiv, dot_precision, upcast_dot
from .checks import after_launch, error_word
from .hydra_kl import reduction_coefficient


# Partial loss sums the reducing program of the small-step path reads per step (tests shrink it).
SMALL_REDUCE_BLOCK = 128


def linear_hydra_kl_forward_small(inp, weight, bias, teacher, temperature: float, reduction: str, shared: bool,
                                  need_in: bool, need_w: bool, need_b: bool, cfg: dict):
    """Heads + Hydra loss in two launches (kernels/small_heads.py), for problems small_heads_config
    accepts: launch 1 forms the logits, loss rows and dz (stashed) per (row block, head group), launch
    2 (``launch_small_grads``) dW and db, dx and the reduced loss. Returns (loss, grad_in, grad_weight,
    grad_bias, None)."""
    from fasthydra.kernels.small_heads import _small_heads_kl_kernel

    m, c, k = weight.shape
    b = inp.shape[0]
    dev, dt = inp.device, inp.dtype
    inp = inp.contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    want_grad = need_in or need_w or need_b
    grid1 = (cdiv(b, cfg["BLOCK_B"]), cdiv(m, cfg["HEADS"]))
    rows = torch.empty(b, m, dtype=torch.float32, device=dev)
    parts = torch.empty(grid1, dtype=torch.float32, device=dev)
    stash = torch.empty(b, m, c, dtype=dt, device=dev) if want_grad else rows
    _small_heads_kl_kernel[grid1](
        inp, weight, bias if bias is not None else weight, teacher, rows, parts, stash,
        error_word(dev, "distill_loss"), b, m, c, k, cfg["HEADS"], inp.stride(0), 0 if shared else inp.stride(1),
        weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0, teacher.stride(0),
        teacher.stride(1), 1.0 / temperature, temperature * temperature,
        temperature * reduction_coefficient(reduction, b * m), HAS_BIAS=bias is not None, WRITE_GRAD=want_grad,
        UPCAST_DOT=upcast_dot(dt), PRECISION=dot_precision(dt), BLOCK_B=cfg["BLOCK_B"], BLOCK_C=cfg["BLOCK_C"],
        BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    after_launch(dev, "distill_loss", teacher.shape)
    if reduction == "none" and not want_grad:
        return rows, None, None, None, None
    loss, grad_in, grad_w, grad_b = launch_small_grads(inp, weight, bias, stash, parts, cfg, shared, need_in, need_w,
                                                       need_b, reduction_coefficient(reduction, b * m),
                                                       reduction != "none")
    return (rows if reduction == "none" else loss), grad_in, grad_w, grad_b, None


def launch_small_grads(inp, weight, bias, stash, parts, cfg: dict, shared: bool, need_in: bool, need_w: bool,
                       need_b: bool, out_scale: float, reduce: bool = True):
    """Launch 2 of the small-step path (``_small_heads_grad_kernel``), after any first launch that left a
    (B, M, C) stash of dL/dz (contiguous, the input dtype) and per-program partial losses: dW and db per
    (head, K block) over all rows, dx per (row block, K block), and the partial losses summed in a fixed
    order times out_scale. Returns (loss or None, grad_in, grad_weight, grad_bias), None where not asked."""
    from fasthydra.kernels.small_heads import _small_heads_grad_kernel

    m, c, k = weight.shape
    b = inp.shape[0]
    dev, dt = inp.device, inp.dtype
    out = torch.empty((), dtype=torch.float32, device=dev) if reduce else None
    grad_in = torch.empty_like(inp) if need_in else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
    n_kb = cdiv(k, cfg["BLOCK_K"])
    kb_w = cdiv(k, cfg["BLOCK_KW"]) if need_w else 1
    n_w = m * kb_w if (need_w or need_b) else 0
    n_x = (cdiv(b, cfg["BLOCK_R"]) * n_kb * (1 if shared else m)) if need_in else 0
    if n_w or n_x or reduce:
        unused = parts  # a placeholder pointer for the outputs not asked for
        _small_heads_grad_kernel[(n_w + n_x + reduce,)](
            inp, weight, stash, unused if grad_in is None else grad_in, unused if grad_w is None else grad_w,
            unused if grad_b is None else grad_b, parts, unused if out is None else out, b, m, c, k, inp.stride(0),
            0 if shared else inp.stride(1), parts.numel(), n_w, kb_w, n_x, n_kb, out_scale, SHARED=shared,
            NEED_W=need_w, NEED_B=need_b, REDUCE=reduce, UPCAST_DOT=upcast_dot(dt), PRECISION=dot_precision(dt),
            BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"], BLOCK_J=cfg["BLOCK_J"],
            BLOCK_RW=cfg["BLOCK_RW"],
            BLOCK_KW=cfg["BLOCK_KW"], BLOCK_P=SMALL_REDUCE_BLOCK, num_warps=cfg["num_warps"])
    return out, grad_in, grad_w, grad_b
