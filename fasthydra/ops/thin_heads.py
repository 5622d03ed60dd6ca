"""Launcher of kernels/thin_heads.py: heads with a narrow per-head input (MLP heads' second layer) fused
with the Hydra loss, each logits tile formed inside the loss kernel, so the (B, M, C) logits never reach
memory. Called per head group / row chunk by the cuBLAS path (linear_hydra_kl.py), which keeps the
gradient GEMMs (dW = dz^T u, du = dz W) on cuBLAS."""

from __future__ import annotations

import torch

from . import _common
from ._common import cdiv, dot_precision, finished_count, temperature_scalars, upcast_dot
from .checks import error_word


def launch_thin_heads_kl(x3, w3, bias2, t3, loss2, g3, temperature: float, grad_scale: float, cfg: dict,
                         reduce_to=None, colsum: bool = False):
    """One launch over a (rows, heads) block: x3 (rows, heads, K) inputs with unit stride along K; w3 the
    heads' weights (heads, C, K) contiguous; bias2 (heads, C) or None; t3 the teacher (rows, heads, C),
    unit stride along C; loss2 (rows, heads) fp32, written; g3 (rows, heads, C) with unit stride along C,
    receives dz = grad_scale * (q - p) when given; reduce_to = (out, coefficient): the loss rows' sum
    times the coefficient written into the 0-dim fp32 out by the last program. Returns, with colsum, the
    fp32 column sums of dz per row block (heads, row blocks, C): summed over axis 1, the bias gradient."""
    from fasthydra.kernels.thin_heads import _thin_heads_kl_kernel

    b, m, k = x3.shape
    c = w3.shape[1]
    dev, dt = x3.device, x3.dtype
    grid = (cdiv(b, cfg["BLOCK_B"]), m)
    sums = torch.empty(grid[0], m, c, dtype=torch.float32, device=dev) if colsum and g3 is not None else None
    if b == 0:
        return None if sums is None else sums.transpose(0, 1)
    reduce = reduce_to is not None
    out, coef = reduce_to if reduce else (loss2, 0.0)
    parts = torch.empty(grid, dtype=torch.float32, device=dev) if reduce else loss2
    g = g3 if g3 is not None else t3  # placeholders where unused
    tf, temp, t_ptr = temperature_scalars(temperature)
    _thin_heads_kl_kernel[grid](
        x3, w3, bias2 if bias2 is not None else w3, t3, loss2, g, sums if sums is not None else loss2, parts,
        error_word(dev, "distill_loss"), out, finished_count(dev) if reduce else parts, b, m, c, k,
        x3.stride(0), x3.stride(1), w3.stride(0), w3.stride(1), bias2.stride(0) if bias2 is not None else 0,
        t3.stride(0), t3.stride(1), loss2.stride(0), loss2.stride(1), g.stride(0), g.stride(1),
        1.0 / tf, tf * tf, grad_scale, coef, temp, T_PTR=t_ptr, HAS_BIAS=bias2 is not None,
        WRITE_GRAD=g3 is not None, WRITE_COLSUM=sums is not None, REDUCE=reduce, UPCAST_DOT=upcast_dot(dt),
        PRECISION=dot_precision(dt), ONE_K_STEP=cfg["ONE_K_STEP"], PTX=_common.runs_ptx(),
        EVEN_C=c % cfg["BLOCK_C"] == 0, PREFETCH=cfg["PREFETCH"], BLOCK_B=cfg["BLOCK_B"], BLOCK_C=cfg["BLOCK_C"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_P=_common.reduce_block(grid[0] * grid[1], cfg["num_warps"]), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return None if sums is None else sums.transpose(0, 1)
