"""One-class rows: KL is 0 and every gradient is 0 whatever the logits (both softmaxes are 1), on every path;
so are the entropies of `uncertainty` (and its mixture is 1).

Each kernel takes a row's difference from its maximum before it scales it by 1 / T, so the shift is exactly 0 at
the maximum however the compiler contracts a product and the subtraction after it into one FMA (gcc does on FMA
CPUs under -march=native; ptxas does on GPUs: a form that scaled first kept the product's rounding, ~1e-7, where
eager float32 and float64 give 0). T = 3: 1 / T is not a power of two, so scaling rounds.

cpu tier: the torch path (the native row kernel); interpret tier: the Triton kernels under TRITON_INTERPRET=1
(numpy does not contract, so there these hold the maths; the gpu tier is where contraction is checked).
"""

import pytest
import torch
from helpers import HEADS_PATHS, assert_close_to, use_heads_path

from fasthydra import HydraHead, TopKTeacher, hinton_kl_loss, hydra_kl_loss, uncertainty

T = 3.0
TARGETS = [pytest.param("torch", "cpu", marks=pytest.mark.cpu, id="torch-cpu"),
           pytest.param("triton", "cpu", marks=pytest.mark.interpret, id="triton-interpret"),
           pytest.param("triton", "cuda", marks=pytest.mark.gpu, id="triton-gpu")]


def _assert_zero(tensors: dict):
    for what, v in tensors.items():
        assert v is not None, f"{what}: no gradient"
        assert_close_to(v, torch.zeros(v.shape, dtype=torch.float64), rtol=0.0, atol=1e-12, what=what)


@pytest.mark.parametrize("impl,device", TARGETS)
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["frozen-teacher", "teacher-grad"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_on_logits(impl, device, teacher_grad, reduction):
    z = (torch.randn(40, 3, 1, device=device) * 10).requires_grad_()
    t = (torch.randn(40, 3, 1, device=device) * 10).requires_grad_(teacher_grad)
    loss = hydra_kl_loss(z, t, T, reduction=reduction, impl=impl)
    inputs = [z, t] if teacher_grad else [z]
    grads = torch.autograd.grad(loss, inputs, torch.ones_like(loss))
    _assert_zero({"loss": loss, "student grad": grads[0], **({"teacher grad": grads[1]} if teacher_grad else {})})


@pytest.mark.parametrize("impl,device", TARGETS)
@pytest.mark.parametrize("path", HEADS_PATHS)
@pytest.mark.parametrize("hidden", [None, 8], ids=["linear", "mlp"])
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["frozen-teacher", "teacher-grad"])
def test_heads(monkeypatch, impl, device, path, hidden, teacher_grad):
    use_heads_path(monkeypatch, path)
    head = HydraHead(16, 1, 4, hidden_features=hidden, impl=impl, device=device)
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(20.0)  # logits of ~10 and more
    x = torch.randn(37, 16, device=device).requires_grad_()
    t = (torch.randn(37, 4, 1, device=device) * 10).requires_grad_(teacher_grad)
    loss = head.distill_loss(x, t, temperature=T)
    params = [x] + list(head.parameters()) + ([t] if teacher_grad else [])
    grads = torch.autograd.grad(loss, params)
    names = ["x"] + [n for n, _ in head.named_parameters()] + (["teacher"] if teacher_grad else [])
    _assert_zero({"loss": loss, **{f"grad {n}": g for n, g in zip(names, grads)}})


@pytest.mark.parametrize("impl,device", TARGETS)
def test_hinton_and_topk_teachers(impl, device):
    z = (torch.randn(40, 1, device=device) * 10).requires_grad_()
    t = (torch.randn(40, 3, 1, device=device) * 10).requires_grad_()
    loss = hinton_kl_loss(z, t, T, impl=impl)
    gz, gt = torch.autograd.grad(loss, [z, t])
    _assert_zero({"hinton loss": loss, "hinton student grad": gz, "hinton teacher grad": gt})
    zs = (torch.randn(40, 3, 1, device=device) * 10).requires_grad_()
    values = (torch.randn(40, 3, 1, device=device) * 10).requires_grad_()
    teacher = TopKTeacher(values, torch.zeros(40, 3, 1, dtype=torch.int64, device=device))
    loss = hydra_kl_loss(zs, teacher, T, impl=impl)
    gz, gv = torch.autograd.grad(loss, [zs, values])
    _assert_zero({"top-k loss": loss, "top-k student grad": gz, "top-k values grad": gv})


@pytest.mark.parametrize("impl,device", TARGETS)
def test_uncertainty(impl, device):
    z = (torch.randn(40, 3, 1, device=device) * 10).requires_grad_()
    u = uncertainty(z, T, impl=impl)
    assert_close_to(u.probs, torch.ones(40, 1, dtype=torch.float64), rtol=0.0, atol=1e-12, what="mixture")
    g = torch.randn(40, 1, device=device)
    (gz,) = torch.autograd.grad(u.total.sum() + 2 * u.aleatoric.sum() - u.epistemic.sum() + (u.probs * g).sum(), z)
    _assert_zero({"total": u.total, "aleatoric": u.aleatoric, "epistemic": u.epistemic, "grad": gz})
