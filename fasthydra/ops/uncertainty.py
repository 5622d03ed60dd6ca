"""Entropy decomposition of a multi-head prediction: the Triton launcher and the torch path.

An evaluation op: no gradient flows through it (outputs never require grad).
"""

from __future__ import annotations

import torch

from fasthydra.reference import Uncertainty

from . import native
from ._common import TORCH_CHUNK_ELEMENTS, compute_dtype, rows_per_chunk, uncertainty_config


def _empty_outputs(b: int, c: int, dtype, device):
    probs = torch.empty(b, c, dtype=dtype, device=device)
    return probs, *(torch.empty(b, dtype=dtype, device=device) for _ in range(3))


@torch.no_grad()
def uncertainty_torch(logits: torch.Tensor, temperature: float) -> Uncertainty:
    """(B, M, C) logits -> Uncertainty, row chunk by row chunk in fp32 (fp64 for fp64 input); fp32 rows
    in the native C kernel where it is built (one exponential per element, rows hot in cache)."""
    if native.usable(logits) and logits.shape[1] > 0:
        return Uncertainty(*native.uncertainty_rows(logits if logits.stride(-1) == 1 else logits.contiguous(),
                                                    temperature))
    b, m, c = logits.shape
    cdt = compute_dtype(logits.dtype)
    probs, total, aleatoric, epistemic = _empty_outputs(b, c, logits.dtype, logits.device)
    step = rows_per_chunk(b, m * c, TORCH_CHUNK_ELEMENTS)
    for r0 in range(0, b, step):
        z = logits[r0:r0 + step].to(cdt) * (1.0 / temperature)
        q = torch.softmax(z, dim=-1)  # the only exponential per element
        # H[q_m] = lse_m - sum_c q_c z_c = sum_c q_c (max z - z_c) - log max q (lse from the softmax's most
        # probable class: no second exp). Measured from the row's maximum: no cancellation between two numbers
        # as large as the logits (lse - sum q z lost |z / T| * eps, 8% of a confident head's entropy at
        # |z / T| ~ 100); q (max - z) is 0 * inf = NaN on masked (-inf) logits, whose true contribution is 0.
        below_max = z.sub_(z.amax(dim=-1, keepdim=True)).neg_()  # max z - z, in place of z
        head_entropy = below_max.mul_(q).nan_to_num_(0.0).sum(-1).sub_(q.amax(dim=-1).log_())  # (bc, M)
        del z
        mix = q.mean(1)  # (bc, C)
        del q
        mix_entropy = -torch.special.xlogy(mix, mix).sum(-1)
        ale = head_entropy.mean(1)
        probs[r0:r0 + step] = mix
        total[r0:r0 + step] = mix_entropy
        aleatoric[r0:r0 + step] = ale
        epistemic[r0:r0 + step] = (mix_entropy - ale).clamp_min_(0.0)
    return Uncertainty(probs, total, aleatoric, epistemic)


@torch.no_grad()
def uncertainty_triton(logits: torch.Tensor, temperature: float) -> Uncertainty:
    from fasthydra.kernels.uncertainty import _uncertainty_fwd_kernel

    b, m, c = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    probs, total, aleatoric, epistemic = _empty_outputs(b, c, logits.dtype, logits.device)
    if b > 0:
        cfg = uncertainty_config(m, c, b)
        _uncertainty_fwd_kernel[(b,)](
            logits, probs, total, aleatoric, epistemic,
            m, c, logits.stride(0), logits.stride(1), probs.stride(0), 1.0 / temperature,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], ROW_IN_REGISTERS=cfg["ROW_IN_REGISTERS"],
            VEC=max(1, min(cfg["BLOCK_C"], 16 // logits.element_size())), num_warps=cfg["num_warps"],
        )
    return Uncertainty(probs, total, aleatoric, epistemic)


def ensemble_log_mean_triton(teacher: torch.Tensor, temperature: float, op: str) -> torch.Tensor:
    """T * log mean_m softmax(t_m / T), (B, M, C) -> (B, C) fp32, in one launch that also checks the
    teacher (bits 1, 2, 4 of op's error word, as the loss kernels do): the Hinton loss's target for a
    teacher that does not require grad. A class every member masks gets -inf (masked in the loss)."""
    import math

    from fasthydra.kernels.uncertainty import _ensemble_log_mean_kernel

    from .checks import after_launch, error_word

    b, m, c = teacher.shape
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    out = torch.empty(b, c, dtype=torch.float32, device=teacher.device)
    if b > 0:
        cfg = uncertainty_config(m, c, hinton_target=True)
        _ensemble_log_mean_kernel[(b,)](
            teacher, out, error_word(teacher.device, op), m, c, teacher.stride(0), teacher.stride(1), out.stride(0),
            1.0 / temperature, temperature, math.log(m), BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
            ROW_IN_REGISTERS=cfg["ROW_IN_REGISTERS"], num_warps=cfg["num_warps"])
        after_launch(teacher.device, op, teacher.shape)
    return out
