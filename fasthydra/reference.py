"""The plain eager implementation of every op: the ground truth of tests, benchmarks and docs.

Everything here is written the way a user would write it without fasthydra: a Python loop over
heads, ``F.linear``, ``F.log_softmax`` and ``F.kl_div``. It is slow and memory hungry on purpose
(it keeps every intermediate for autograd) and runs in any floating dtype, float64 included.
No input validation happens here; the public API validates before it dispatches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Uncertainty(NamedTuple):
    """Uncertainty of a multi-head prediction.

    probs: (B, C) mixture probabilities ``mean_m softmax(z_m)``.
    total: (B,) entropy of the mixture ``H[probs]``.
    aleatoric: (B,) mean entropy of the heads ``mean_m H[softmax(z_m)]``.
    epistemic: (B,) ``total - aleatoric`` (the mutual information), never negative.
    """

    probs: torch.Tensor
    total: torch.Tensor
    aleatoric: torch.Tensor
    epistemic: torch.Tensor


class TopKTeacher(NamedTuple):
    """A sparse teacher: member m keeps k classes per row.

    values: (B, M, k) raw teacher logits at the kept classes (any float dtype; -inf pads an entry).
    indices: (B, M, k) int32/int64 class ids in [0, C), distinct per row (padding entries excepted).
    The distribution of head m's teacher is the renormalised tempered softmax over its kept classes,
    ``p~ = softmax(values / T)`` on ``indices``, zero elsewhere.
    """

    values: torch.Tensor
    indices: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def device(self) -> torch.device:
        return self.values.device

    def densify(self, num_classes: int) -> torch.Tensor:
        """The equivalent dense teacher logits (B, M, C): the values at their indices, -inf elsewhere
        (the reference's way; the library's kernels never build it)."""
        dense = self.values.new_full((*self.values.shape[:-1], num_classes), float("-inf"))
        # amax: a padding entry (-inf) that repeats a kept class's index never overwrites it
        return dense.scatter_reduce(-1, self.indices.long(), self.values, reduce="amax", include_self=True)


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    # An empty batch gives a zero loss for "mean" (it contributes nothing to training).
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if per_row.numel() == 0:
        return per_row.sum()
    return per_row.mean()


def _tempered(logits: torch.Tensor, temperature) -> torch.Tensor:
    """logits / T, where a masked class (-inf) has no path to T: with T a tensor that requires grad (learned),
    -inf / T's share of dL/dT would be (its gradient) * inf, NaN where that gradient is 0. The logits' own
    gradient is the plain division's."""
    if not (isinstance(temperature, torch.Tensor) and temperature.requires_grad):
        return logits / temperature  # (the eager baseline of the benchmarks: as a user would write it)
    masked = torch.isneginf(logits)
    return torch.where(masked, logits / temperature.detach(), torch.where(masked, 0.0, logits) / temperature)


def kl_rows_ref(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(z/T))`` over the last dim, for 2-D inputs (rows, C)."""
    log_q = F.log_softmax(_tempered(student_logits, temperature), dim=-1)
    log_p = F.log_softmax(_tempered(teacher_logits, temperature), dim=-1)
    # kl_div(input=log q, target=log p, log_target=True) = p * (log p - log q), 0 where p = 0. A class with
    # p = 0 (a -inf teacher logit, or a finite one so far below the row's maximum that exp underflows, such as
    # the torch.finfo(dtype).min a masked_fill writes) would give 0 * -inf there: it enters as the dtype's lowest
    # finite value, whose probability is exactly 0, and log q as 0 (a student that masks the class too has log q
    # = -inf, and 0 * (lowest + inf) is NaN as well), so value and gradients (the teacher's too) stay finite.
    masked = log_p.exp() == 0
    kl = F.kl_div(torch.where(masked, 0.0, log_q), torch.where(masked, torch.finfo(log_p.dtype).min, log_p),
                  reduction="none", log_target=True)
    return kl.sum(-1) * temperature**2


def hydra_kl_loss_ref(student_logits, teacher_logits, temperature: float = 1.0, reduction: str = "mean"):
    """Per-head tempered KL, one head at a time. Shapes: (B, M, C) and (B, M, C)."""
    per_head = [
        kl_rows_ref(student_logits[:, m], teacher_logits[:, m], temperature)
        for m in range(student_logits.shape[1])
    ]
    per_row = torch.stack(per_head, dim=1) if per_head else student_logits.new_zeros(student_logits.shape[0], 0)
    return _reduce(per_row, reduction)


def ensemble_mean_probs_ref(teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``pbar = mean_m softmax(t_m / T)``: (B, M, C) -> (B, C)."""
    probs = [F.softmax(_tempered(teacher_logits[:, m], temperature), dim=-1) for m in range(teacher_logits.shape[1])]
    return torch.stack(probs, dim=1).mean(dim=1)


def hinton_kl_loss_ref(student_logits, teacher_logits, temperature: float = 1.0, reduction: str = "mean"):
    """Hinton (mean) head: ``T^2 * KL(pbar || softmax(z / T))`` with pbar the ensemble mean.

    student_logits: (B, C) or (B, 1, C); teacher_logits: (B, M, C). Returns a scalar or (B,).
    """
    if student_logits.dim() == 3:
        student_logits = student_logits[:, 0]
    pbar = ensemble_mean_probs_ref(teacher_logits.to(student_logits.dtype), temperature)
    log_q = F.log_softmax(_tempered(student_logits, temperature), dim=-1)
    # kl_div(log q, pbar) = pbar * (log pbar - log q), 0 where pbar = 0 (a class every member masks). Its
    # gradient there is not: log pbar = -inf reaches the teacher's softmax as 0 * -inf = NaN, and a student
    # that masks the class too gives 0 * (0 + inf) in the value. There pbar enters as 1 and log q as 0: a term
    # of 1 * (log 1 - 0) = 0, with no gradient to either.
    kept = pbar > 0
    kl = F.kl_div(torch.where(kept, log_q, 0.0), torch.where(kept, pbar, 1.0), reduction="none")
    per_row = kl.sum(-1) * temperature**2
    return _reduce(per_row, reduction)


def linear_heads_ref(x, weight, bias=None):
    """M linear heads, one ``F.linear`` each: x (B, D), weight (M, C, D), bias (M, C) -> (B, M, C)."""
    outs = [F.linear(x, weight[m], None if bias is None else bias[m]) for m in range(weight.shape[0])]
    return torch.stack(outs, dim=1)


def mlp_heads_ref(x, hidden_weight, hidden_bias, weight, bias):
    """M two-layer ReLU heads: ``z_m = relu(x W1[m]^T + b1[m]) W2[m]^T + b2[m]`` -> (B, M, C)."""
    outs = []
    for m in range(weight.shape[0]):
        u = F.relu(F.linear(x, hidden_weight[m], None if hidden_bias is None else hidden_bias[m]))
        outs.append(F.linear(u, weight[m], None if bias is None else bias[m]))
    return torch.stack(outs, dim=1)


def uncertainty_ref(logits: torch.Tensor, temperature: float = 1.0) -> Uncertainty:
    """Entropy decomposition of a (B, M, C) multi-head prediction, head by head."""
    tempered = [_tempered(logits[:, m], temperature) for m in range(logits.shape[1])]
    probs_per_head = [F.softmax(s, dim=-1) for s in tempered]
    log_probs_per_head = [F.log_softmax(s, dim=-1) for s in tempered]
    entropies = [-(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum(-1)
                 for p, lp in zip(probs_per_head, log_probs_per_head)]
    probs = torch.stack(probs_per_head, dim=1).mean(dim=1)
    # log of 1 where a class is masked everywhere (P = 0): its term is 0, and so is its gradient (log 0's would
    # be 0 * inf = NaN)
    log_probs = torch.log(torch.where(probs > 0, probs, torch.ones_like(probs)))
    total = -(probs * log_probs).sum(-1)
    aleatoric = torch.stack(entropies, dim=1).mean(dim=1)
    epistemic = (total - aleatoric).clamp_min(0.0)
    return Uncertainty(probs, total, aleatoric, epistemic)


def kl_grad_ref(student_logits, teacher_logits, temperature: float):
    """Closed-form gradient of the mean Hydra loss: ``T / (B*M) * (q - p)``."""
    b, m = student_logits.shape[:2]
    q = F.softmax(student_logits / temperature, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return temperature / max(b * m, 1) * (q - p)


__all__ = [
    "Uncertainty",
    "kl_rows_ref",
    "hydra_kl_loss_ref",
    "hinton_kl_loss_ref",
    "ensemble_mean_probs_ref",
    "linear_heads_ref",
    "mlp_heads_ref",
    "uncertainty_ref",
    "kl_grad_ref",
]
