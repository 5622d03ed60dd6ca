"""Tempered per-head KL on given logits: the Triton launcher + Function, and the chunked torch path.

Both compute the loss rows and the gradient T * (q - p) * coefficient in the forward pass; the
backward only scales the stored gradient by the upstream gradient (Liger-Kernel's pattern).
"""

from __future__ import annotations

import torch

from ._common import TORCH_CHUNK_ELEMENTS, cdiv, compute_dtype, kl_rows_config, rows_per_chunk


def reduction_coefficient(reduction: str, n_rows: int) -> float:
    """Gradient coefficient of each row's loss: 1/rows for "mean", 1 for "sum" and "none"."""
    return 1.0 / max(n_rows, 1) if reduction == "mean" else 1.0


def reduce_rows(rows: torch.Tensor, reduction: str, out_dtype: torch.dtype) -> torch.Tensor:
    """Reduces (B, M) fp32 loss rows; "mean" of an empty batch is 0, like the reference."""
    if reduction == "none":
        return rows.to(out_dtype)
    total = rows.sum()
    if reduction == "mean" and rows.numel() > 0:
        total = total / rows.numel()
    return total.to(out_dtype)


def scale_grad(stored: torch.Tensor, grad_output: torch.Tensor, reduction: str) -> torch.Tensor:
    """Chain rule for a gradient stored in the forward: scalar or per-row (B, M) upstream gradient."""
    if reduction == "none":
        return stored * grad_output.unsqueeze(-1).to(stored.dtype)
    if bool(grad_output == 1):  # loss.backward(): no (B, M, C)-sized multiply
        return stored
    return stored * grad_output.to(stored.dtype)


# ----------------------------------------------------------------------------------------------
# torch path
# ----------------------------------------------------------------------------------------------


def kl_chunk_torch(z: torch.Tensor, t: torch.Tensor, temperature: float, grad_scale: float | None):
    """Loss rows T^2 * KL and (optionally) grad_scale * (q - p) for one chunk, in the compute dtype.

    z, t: (..., C) logits of any float dtype. Returns (loss (...), grad (..., C) or None).
    """
    cdt = compute_dtype(z.dtype)
    log_q = torch.log_softmax(z.to(cdt) / temperature, dim=-1)
    log_p = torch.log_softmax(t.to(cdt) / temperature, dim=-1)
    p = log_p.exp()
    # p * (log p - log q), with masked classes (p == 0) adding exactly 0 even where log q = -inf.
    diff = log_p.sub_(log_q)
    diff.mul_(p)
    diff.masked_fill_(p == 0, 0.0)
    loss = diff.sum(-1).mul_(temperature * temperature)
    del diff
    if grad_scale is None:
        return loss, None
    grad = log_q.exp_().sub_(p).mul_(grad_scale)
    return loss, grad


class TorchHydraKLFunction(torch.autograd.Function):
    """Hydra loss on given logits in torch ops, row chunk by row chunk, gradient in the forward."""

    @staticmethod
    def forward(ctx, student, teacher, temperature: float, reduction: str):
        b, m, c = student.shape
        want_grad = ctx.needs_input_grad[0]
        grad_scale = temperature * reduction_coefficient(reduction, b * m) if want_grad else None
        cdt = compute_dtype(student.dtype)
        rows = torch.empty(b, m, dtype=cdt, device=student.device)
        grad = torch.empty_like(student) if want_grad else None
        step = rows_per_chunk(b, m * c, TORCH_CHUNK_ELEMENTS)
        for r0 in range(0, b, step):
            loss, g = kl_chunk_torch(student[r0:r0 + step], teacher[r0:r0 + step], temperature, grad_scale)
            rows[r0:r0 + step] = loss
            if want_grad:
                grad[r0:r0 + step] = g
        ctx.reduction = reduction
        ctx.save_for_backward(grad)
        return reduce_rows(rows, reduction, student.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        return scale_grad(grad, grad_output, ctx.reduction), None, None, None


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------


def launch_hydra_kl(student2d, teacher2d, temperature: float, grad_scale: float | None):
    """Runs the row kernel on (R, C) views with unit stride along C. Returns (loss (R,), grad or None)."""
    from fasthydra.kernels.softmax_kl import _hydra_kl_fwd_kernel

    r, c = student2d.shape
    loss = torch.empty(r, dtype=torch.float32, device=student2d.device)
    grad = torch.empty_like(student2d) if grad_scale is not None else None
    if r == 0:
        return loss, grad
    cfg = kl_rows_config(c)
    grid = (cdiv(r, cfg["BLOCK_R"]),)
    _hydra_kl_fwd_kernel[grid](
        student2d, teacher2d, loss, grad if grad is not None else loss,
        r, c, student2d.stride(0), teacher2d.stride(0), grad.stride(0) if grad is not None else 0,
        1.0 / temperature, temperature * temperature, grad_scale if grad_scale is not None else 0.0,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], WRITE_GRAD=grad is not None,
        num_warps=cfg["num_warps"],
    )
    return loss, grad


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """(B, M, C) -> (B*M, C) with unit stride along C (copies only when it must)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


class HydraKLFunction(torch.autograd.Function):
    """Hydra loss on given logits with the one-launch Triton kernel (loss and gradient together)."""

    @staticmethod
    def forward(ctx, student, teacher, temperature: float, reduction: str):
        b, m, c = student.shape
        want_grad = ctx.needs_input_grad[0]
        grad_scale = temperature * reduction_coefficient(reduction, b * m) if want_grad else None
        loss, grad = launch_hydra_kl(_rows_view(student), _rows_view(teacher), temperature, grad_scale)
        ctx.reduction = reduction
        ctx.save_for_backward(grad.view(b, m, c) if grad is not None else None)
        return reduce_rows(loss.view(b, m), reduction, student.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        return scale_grad(grad, grad_output, ctx.reduction), None, None, None
