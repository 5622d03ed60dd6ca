"""gpu tier: the Triton kernels on CUDA in bf16/fp16/fp32 against a float64 reference.

Tolerance rule (DESIGN section 5, flash-attention's): the kernel's error against float64 is at most
twice the error of the eager reference run in the same low precision, plus a small atol.
Skipped without CUDA.
"""

import pytest
import torch
from helpers import params_of, teacher_logits, tolerance_rule

from fasthydra import HydraHead, hydra_kl_loss, uncertainty
from fasthydra import reference as R

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, D, M, C, hidden): the odd shape, small C, a C of several tiles, M = 1, MLP heads, a large C.
CASES = [(37, 45, 5, 13, None), (512, 512, 10, 10, None), (256, 128, 4, 1000, None), (64, 64, 1, 100, None),
         (128, 96, 4, 50, 32), (64, 256, 2, 32000, None)]


def _eager(head, x, t, temperature):
    """The eager per-head reference in the head's own dtype: the error budget of the rule."""
    p = dict(head.named_parameters())
    if head.is_mlp:
        z = R.mlp_heads_ref(x, p["hidden_weight"], p.get("hidden_bias"), p["weight"], p.get("bias"))
    else:
        z = R.linear_heads_ref(x, p["weight"], p.get("bias"))
    return R.hydra_kl_loss_ref(z, t.to(z.dtype), temperature)


@pytest.mark.parametrize("b,d,m,c,hidden", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_heads_tolerance_rule(b, d, m, c, hidden, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    head = HydraHead(d, c, m, hidden_features=hidden, impl="triton", device="cuda", dtype=dtype)
    x = torch.randn(b, d, device="cuda", dtype=dtype, requires_grad=True)
    t = teacher_logits(b, m, c, device="cuda", dtype=dtype)
    loss = head.distill_loss(x, t, temperature=2.0)
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    eager = _eager(head, x, t, 2.0)
    grads_eager = torch.autograd.grad(eager, [x, *params_of(head)])
    head64 = HydraHead(d, c, m, hidden_features=hidden, impl="torch", device="cuda", dtype=torch.float64)
    head64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    exact = _eager(head64, x64, t.double(), 2.0)
    grads_exact = torch.autograd.grad(exact, [x64, *params_of(head64)])
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    tolerance_rule(loss, eager, exact, atol * max(1.0, exact.abs().item()), what="loss")
    for name, g, ge, gx in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_eager, grads_exact):
        tolerance_rule(g, ge, gx, atol * gx.abs().max().item(), what=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,c", [(300, 8, 10), (64, 4, 5000), (16, 2, 70000)])
def test_logits_kernel_tolerance_rule(b, m, c, dtype):
    z = (torch.randn(b, m, c, device="cuda") * 3).to(dtype).requires_grad_()
    t = teacher_logits(b, m, c, device="cuda", dtype=dtype)
    loss = hydra_kl_loss(z, t, 1.5, impl="triton")
    (g,) = torch.autograd.grad(loss, z)
    eager = R.hydra_kl_loss_ref(z, t, 1.5)
    (ge,) = torch.autograd.grad(eager, z)
    z64 = z.detach().double().requires_grad_()
    exact = R.hydra_kl_loss_ref(z64, t.double(), 1.5)
    (gx,) = torch.autograd.grad(exact, z64)
    tolerance_rule(loss, eager, exact, 1e-6 * max(1.0, exact.abs().item()), what="loss")
    tolerance_rule(g, ge, gx, 1e-3 * gx.abs().max().item(), what="grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_uncertainty_tolerance_rule(dtype):
    z = (torch.randn(500, 8, 1000, device="cuda") * 3).to(dtype)
    got = uncertainty(z, impl="triton")
    eager = R.uncertainty_ref(z)
    exact = R.uncertainty_ref(z.double())
    for name in ("probs", "total", "aleatoric", "epistemic"):
        tolerance_rule(getattr(got, name), getattr(eager, name), getattr(exact, name), 1e-5, what=name)


def test_auto_picks_triton_on_cuda():
    from fasthydra.functional import resolve_impl

    assert resolve_impl("auto", torch.zeros(1, device="cuda")) == "triton"
