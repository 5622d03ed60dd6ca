"""Value checks that need to look at tensor data (run inside the custom ops, where the data is)."""

from __future__ import annotations

import torch


def check_teacher_values(teacher: torch.Tensor, name: str = "teacher_logits") -> None:
    """NaN or +Inf anywhere, or a row that is -Inf everywhere, is an error; a lone -Inf masks a class.

    One reduction pass (the row maximum) answers all three questions: the max is NaN when a NaN is
    present, +Inf when a +Inf is, and -Inf exactly when the whole row is -Inf.
    """
    if teacher.numel() == 0:
        return
    row_max = teacher.detach().amax(dim=-1)
    if bool(torch.isnan(row_max).any()):
        raise ValueError(f"{name} contains NaN (shape {tuple(teacher.shape)})")
    if bool(torch.isposinf(row_max).any()):
        raise ValueError(f"{name} contains +Inf (shape {tuple(teacher.shape)})")
    if bool(torch.isneginf(row_max).any()):
        where = tuple(torch.nonzero(torch.isneginf(row_max))[0].tolist())
        raise ValueError(f"{name} has a row that is -Inf for every class (at index {where}, "
                         f"shape {tuple(teacher.shape)}): its softmax is undefined")


def check_teacher_status(status: torch.Tensor, shape, name: str = "teacher_logits") -> None:
    """The same verdicts from the per-row status the Triton loss kernels write while they read the
    teacher anyway (max(t)/T per row, NaN where a NaN was seen): no extra pass over (B, M, C)."""
    if status.numel() == 0:
        return
    if bool(torch.isnan(status).any()):
        raise ValueError(f"{name} contains NaN (shape {tuple(shape)})")
    if bool(torch.isposinf(status).any()):
        raise ValueError(f"{name} contains +Inf (shape {tuple(shape)})")
    if bool(torch.isneginf(status).any()):
        raise ValueError(f"{name} has a row that is -Inf for every class (shape {tuple(shape)}): "
                         "its softmax is undefined")
