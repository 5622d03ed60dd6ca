"""Gaussian regression heads + per-head Gaussian KL: the fused Triton forward and the torch path.

The autograd wiring of the Triton path is the custom op ``fasthydra::gaussian_heads_kl`` (library.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _common
from ._common import cdiv, dot_precision, finished_count, next_pow2, small_heads_config, stored_grad_dtype, upcast_dot
from .checks import after_launch, error_word
from .launch import launch
from .grouped_linear import heads_backward
from .small_heads import launch_small_grads


def gaussian_kl_torch(mean, var, teacher_mean, teacher_var):
    """Elementwise ``KL(N(mu_t, var_t) || N(mu, var))``; autograd does the rest (K is small)."""
    if var.requires_grad and torch.is_grad_enabled() and _common.inference_tensor(teacher_var):
        teacher_var = teacher_var.clone()  # (made under torch.inference_mode(): var / teacher_var could not save it)
    diff = teacher_mean - mean
    return 0.5 * (torch.log(var / teacher_var) + (teacher_var + diff * diff) / var - 1.0)


def split_gaussian(z: torch.Tensor, min_var: float):
    """(..., M, 2K) head outputs -> mean (..., M, K) and var = softplus(raw) + min_var."""
    k = z.shape[-1] // 2
    return z[..., :k], F.softplus(z[..., k:]) + min_var


def gaussian_config(k: int, d: int, elem_size: int = 2) -> dict:
    # 64 rows: the smallest tile for which sm_90 issues warp-group MMA (wgmma); 128-byte D tiles
    # (64 for 16-bit inputs, 32 for fp32) and 8 warps keep the two accumulators, their operands and the
    # teacher checks spill-free (4 warps spill 8 bytes for fp32 on sm_80: kernel report).
    return dict(BLOCK_B=64, BLOCK_K=max(16, next_pow2(k)), BLOCK_D=max(16, min(next_pow2(d), 128 // elem_size)),
                num_warps=8)


def gaussian_heads_kl_forward_triton(x, weight, bias, teacher_mean, teacher_var, min_var: float, reduction: str,
                                     need_in: bool, need_w: bool, need_b: bool, deferred: bool = False):
    """Fused Gaussian heads + KL on Triton. Launch 1 computes the head GEMM, the KL per (row, head), the
    gradient w.r.t. (mu, raw var), checks the teacher and (its last program) reduces the loss. deferred
    (the batch fits the small-step kernels, see gaussian_deferred): returns (loss, stash), and the
    backward's launch 2 forms the gradients. Else the gradients now, with the small-step gradient kernel
    or (a larger batch) GEMMs: returns (loss in fp32, grad_x, grad_weight, grad_bias), None where not
    asked for."""
    from fasthydra.kernels.gaussian_kl import _gaussian_heads_kl_fwd_kernel

    m, two_k, d = weight.shape
    k = two_k // 2
    b = x.shape[0]
    dev = x.device
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    teacher_mean, teacher_var = teacher_mean.contiguous(), teacher_var.contiguous()
    want_grad = need_in or need_w or need_b
    if b == 0:  # nothing to launch: a zero loss and zero gradients
        zeros = [torch.zeros(t.shape, dtype=stored_grad_dtype(t.dtype), device=dev) if need else None
                 for t, need in ((x, need_in), (weight, need_w), (bias, need_b))]
        return (torch.zeros((), dtype=torch.float32, device=dev), *zeros)
    cfg = gaussian_config(k, d, x.element_size())
    grid = (cdiv(b, cfg["BLOCK_B"]), m)
    loss = torch.empty(b, m, dtype=torch.float32, device=dev)
    parts = torch.empty(grid, dtype=torch.float32, device=dev)
    out = torch.empty((), dtype=torch.float32, device=dev)
    # dL/d(mean, raw var): fp32 for fp16 inputs (the 1/(B M K) coefficient leaves fp16's range: stored_grad_dtype)
    stash = torch.empty(b, m, two_k, dtype=stored_grad_dtype(x.dtype), device=dev) if want_grad else loss
    coef = 1.0 / (b * m * k) if reduction == "mean" else 1.0  # of the loss and of each gradient term
    launch(_gaussian_heads_kl_fwd_kernel, grid,
        x, weight, bias if bias is not None else weight, teacher_mean, teacher_var, loss, parts, stash,
        error_word(dev, "gaussian_kl_loss"), out, finished_count(dev), b, k, d, x.stride(0), min_var, coef,
        HAS_BIAS=bias is not None, WRITE_GRAD=want_grad, UPCAST_DOT=upcast_dot(x.dtype),
        PRECISION=dot_precision(x.dtype), BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_D=cfg["BLOCK_D"], BLOCK_P=_common.reduce_block(grid[0] * grid[1], cfg["num_warps"]),
        num_warps=cfg["num_warps"])
    after_launch(dev, "gaussian_kl_loss", teacher_mean.shape)
    if deferred:
        return out, stash
    grad_x = grad_w = grad_b = None
    small = small_heads_config(b, m, two_k, d, x.element_size())
    if small is not None and want_grad:
        grad_x, grad_w, grad_b = launch_small_grads(x, weight, bias, stash, small, True, need_in, need_w, need_b)
    elif want_grad:  # (an fp32 stash of fp16 inputs: the GEMMs in fp32, the gradients kept in fp32)
        grad_x, grad_w = heads_backward(stash, x.to(stash.dtype), weight.to(stash.dtype), True, need_in, need_w)
        if need_b:
            grad_b = stash.sum(0, dtype=torch.float32).to(stored_grad_dtype(bias.dtype))
    return out, grad_x, grad_w, grad_b


def gaussian_deferred(x, weight, bias, need_in: bool, need_w: bool, need_b: bool) -> bool:
    """The Gaussian heads op defers its gradients to the backward's launch 2 (as the Hydra heads' small
    step does): a batch the small-step gradient kernel takes, and some gradient wanted."""
    m, two_k, d = weight.shape
    return (_common.SMALL_DEFERRED and x.shape[0] > 0 and (need_in or need_w or (need_b and bias is not None))
            and small_heads_config(x.shape[0], m, two_k, d, x.element_size()) is not None)
