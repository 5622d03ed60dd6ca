"""Gaussian regression heads + per-head Gaussian KL: the fused Triton forward and the torch path.

The autograd wiring of the Triton path is the custom op ``fasthydra::gaussian_heads_kl`` (library.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import cdiv, dot_precision, next_pow2, upcast_dot
from .grouped_linear import heads_backward
from .hydra_kl import reduce_rows


def gaussian_kl_torch(mean, var, teacher_mean, teacher_var):
    """Elementwise ``KL(N(mu_t, var_t) || N(mu, var))``; autograd does the rest (K is small)."""
    diff = teacher_mean - mean
    return 0.5 * (torch.log(var / teacher_var) + (teacher_var + diff * diff) / var - 1.0)


def split_gaussian(z: torch.Tensor, min_var: float):
    """(..., M, 2K) head outputs -> mean (..., M, K) and var = softplus(raw) + min_var."""
    k = z.shape[-1] // 2
    return z[..., :k], F.softplus(z[..., k:]) + min_var


def gaussian_config(k: int, d: int, elem_size: int = 2) -> dict:
    # 64 rows: the smallest tile for which sm_90 issues warp-group MMA (wgmma); 128-byte D tiles
    # (64 for 16-bit inputs, 32 for fp32) keep the two accumulators and their operands spill-free.
    return dict(BLOCK_B=64, BLOCK_K=max(16, next_pow2(k)), BLOCK_D=max(16, min(next_pow2(d), 128 // elem_size)),
                num_warps=4)


def gaussian_heads_kl_forward_triton(x, weight, bias, teacher_mean, teacher_var, min_var: float, reduction: str,
                                     need_in: bool, need_w: bool, need_b: bool):
    """Fused Gaussian heads + KL on Triton: one launch computes the head GEMM, the KL per (row, head)
    and the gradient w.r.t. (mu, raw var); grouped GEMMs turn it into dx and dW.
    Returns (loss in fp32, grad_x, grad_weight, grad_bias), None where not asked for."""
    from fasthydra.kernels.gaussian_kl import _gaussian_heads_kl_fwd_kernel

    m, two_k, d = weight.shape
    k = two_k // 2
    b = x.shape[0]
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    teacher_mean, teacher_var = teacher_mean.contiguous(), teacher_var.contiguous()
    want_grad = need_in or need_w or need_b
    loss = torch.empty(b, m, dtype=torch.float32, device=x.device)
    stash = torch.empty(b, m, two_k, dtype=x.dtype, device=x.device) if want_grad else None
    coef = 1.0 / max(b * m * k, 1) if reduction == "mean" else 1.0
    if b > 0:
        cfg = gaussian_config(k, d, x.element_size())
        _gaussian_heads_kl_fwd_kernel[(cdiv(b, cfg["BLOCK_B"]), m)](
            x, weight, bias if bias is not None else weight, teacher_mean, teacher_var, loss,
            stash if want_grad else loss, b, k, d, x.stride(0), min_var, coef,
            HAS_BIAS=bias is not None, WRITE_GRAD=want_grad, UPCAST_DOT=upcast_dot(x.dtype),
            PRECISION=dot_precision(x.dtype), BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"],
            BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    grad_x = grad_w = grad_b = None
    if want_grad:
        if b == 0:
            grad_x, grad_w = torch.zeros_like(x), torch.zeros_like(weight)
        else:
            grad_x, grad_w = heads_backward(stash, x, weight, True, need_in, need_w)
        if need_b:
            grad_b = stash.sum(0, dtype=torch.float32).to(bias.dtype)
    rows = loss if reduction != "mean" else loss * (1.0 / max(k, 1))  # mean over (B, M, K)
    return reduce_rows(rows, reduction, torch.float32), grad_x, grad_w, grad_b
