"""cpu tier: mixed precision. Under torch.autocast (bf16 on CPU) the heads take low-precision
features, compute in fp32 inside, return the loss in fp32 and fp32 gradients for fp32 parameters,
within DESIGN section 5's tolerance rule against a float64 reference."""

import pytest
import torch
from helpers import teacher_logits, tolerance_rule
from torch import nn

from fasthydra import HydraHead, hydra_kl_loss
from fasthydra import reference as R

pytestmark = pytest.mark.cpu


def _setup(hidden):
    torch.manual_seed(0)
    body = nn.Linear(24, 32)
    head = HydraHead(32, 13, 4, hidden_features=hidden, impl="torch")
    x = torch.randn(40, 24)
    t = teacher_logits(40, 4, 13)
    return body, head, x, t


def _eager(body, head, x, t):
    p = dict(head.named_parameters())
    f = body(x)
    if head.is_mlp:
        z = R.mlp_heads_ref(f, p["hidden_weight"], p["hidden_bias"], p["weight"], p["bias"])
    else:
        z = R.linear_heads_ref(f, p["weight"], p["bias"])
    return R.hydra_kl_loss_ref(z, t, 2.0)


@pytest.mark.parametrize("hidden", [None, 16])
def test_autocast_bf16_loss_and_grads(hidden):
    body, head, x, t = _setup(hidden)
    params = [*body.parameters(), *head.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = body(x)
        assert features.dtype == torch.bfloat16  # the body really runs in low precision
        loss = head.distill_loss(features, t, temperature=2.0)
        logits = head(features)
        eager = _eager(body, head, x, t)
    assert loss.dtype == torch.float32 and logits.dtype == torch.bfloat16
    grads = torch.autograd.grad(loss, params)
    assert all(g.dtype == torch.float32 for g in grads)
    grads_eager = torch.autograd.grad(eager, params)
    body64, head64 = [m.double() for m in (_setup(hidden)[0], _setup(hidden)[1])]
    body64.load_state_dict({k: v.double() for k, v in body.state_dict().items()})
    head64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    exact = _eager(body64, head64, x.double(), t.double())
    grads_exact = torch.autograd.grad(exact, [*body64.parameters(), *head64.parameters()])
    tolerance_rule(loss, eager, exact, 1e-3 * exact.abs().item(), what="loss")
    for g, ge, gx in zip(grads, grads_eager, grads_exact):
        tolerance_rule(g, ge, gx, 1e-3 * gx.abs().max().item(), what="grad")


def test_autocast_loss_on_given_logits_is_fp32():
    z = torch.randn(6, 3, 9, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(6, 3, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hydra_kl_loss(z, t, 1.0)
    assert loss.dtype == torch.float32
    (g,) = torch.autograd.grad(loss, z)
    assert g.dtype == torch.bfloat16
    ref = R.hydra_kl_loss_ref(z.detach().double(), t.double(), 1.0)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())  # fp32 inside, on the bf16 logits given


def test_autocast_gaussian_heads():
    from fasthydra import GaussianHydraHead

    torch.manual_seed(0)
    head = GaussianHydraHead(16, 2, 3, impl="torch")
    x = torch.randn(20, 16)
    tm, tv = torch.randn(20, 3, 2), torch.rand(20, 3, 2) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head.distill_loss(x.bfloat16(), tm, tv)
    assert loss.dtype == torch.float32
    (g,) = torch.autograd.grad(loss, head.weight)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    exact = head.distill_loss(x, tm, tv)  # fp32, no autocast
    assert abs(loss.item() - exact.item()) <= 0.05 * abs(exact.item())  # bf16 GEMM operands
