"""cpu and interpret tiers: Gaussian heads and the Gaussian KL against the float64 formula."""

import math

import pytest
import torch
from helpers import assert_close_to, assert_same_products, params_of

from fasthydra import GaussianHydraHead, gaussian_kl_loss


def _reference(head, x, tm, tv):
    """float64 per-head loop: mean of KL(N(mu_t, var_t) || N(mu, var)) over (B, M, K)."""
    p = {k: v.detach().double().requires_grad_() for k, v in head.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    k = head.out_features
    kls = []
    for m in range(head.num_heads):
        z = x64 @ p["weight"][m].T + (p["bias"][m] if "bias" in p else 0)
        mu, var = z[:, :k], torch.nn.functional.softplus(z[:, k:]) + head.min_var
        d = tm[:, m].double() - mu
        kls.append(0.5 * (torch.log(var / tv[:, m].double()) + (tv[:, m].double() + d * d) / var - 1))
    loss = torch.stack(kls, 1).mean()
    return loss, torch.autograd.grad(loss, [x64, *p.values()])


def _case(b=23, d=7, m=3, k=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g).to(dtype).requires_grad_()
    tm = torch.randn(b, m, k, generator=g).to(dtype)
    tv = (torch.rand(b, m, k, generator=g) + 0.2).to(dtype)
    return x, tm, tv


@pytest.mark.cpu
def test_gaussian_kl_formula_and_gradcheck():
    mu = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(4, 3, 2, dtype=torch.float64) + 0.5).requires_grad_()
    tm, tv = torch.randn(4, 3, 2, dtype=torch.float64), torch.rand(4, 3, 2, dtype=torch.float64) + 0.5
    got = gaussian_kl_loss(mu, var, tm, tv, reduction="none")
    closed = torch.distributions.kl_divergence(torch.distributions.Normal(tm, tv.sqrt()),
                                               torch.distributions.Normal(mu, var.sqrt()))
    assert_close_to(got, closed, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: gaussian_kl_loss(a, b, tm, tv), (mu, var))
    assert gaussian_kl_loss(tm, tv, tm, tv).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.cpu
def test_gaussian_kl_errors():
    a = torch.rand(2, 3, 1) + 0.1
    with pytest.raises(ValueError, match="teacher_var must be finite and > 0"):
        gaussian_kl_loss(a, a, a, -a)
    with pytest.raises(ValueError, match="share one shape"):
        gaussian_kl_loss(a, a, a, a[:1])


@pytest.mark.cpu
@pytest.mark.parametrize("which,value", [("var", 0.0), ("var", -1.0), ("var", math.inf), ("var", math.nan),
                                         ("mean", math.nan), ("mean", math.inf), ("mean", -math.inf)])
def test_one_bad_teacher_entry_is_refused(which, value):
    """One entry of a teacher's variance that is not finite and > 0, or of its mean that is not finite, among good
    ones: a ValueError naming it (the teacher's check is two reductions, each extreme tested)."""
    mu, var = torch.randn(5, 3, 4), torch.rand(5, 3, 4) + 0.1
    tm, tv = torch.randn(5, 3, 4), torch.rand(5, 3, 4) + 0.1
    gaussian_kl_loss(mu, var, tm, tv)  # the good teacher passes
    bad = (tv if which == "var" else tm).clone()
    bad[3, 1, 2] = value
    match = "teacher_var must be finite and > 0" if which == "var" else "teacher_mean contains NaN or Inf"
    with pytest.raises(ValueError, match=match):
        gaussian_kl_loss(mu, var, *((tm, bad) if which == "var" else (bad, tv)))


@pytest.mark.parametrize("impl", [pytest.param("torch", marks=pytest.mark.cpu),
                                  pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("bias", [True, False])
def test_gaussian_head_distill_matches_reference(impl, bias):
    head = GaussianHydraHead(7, 2, 3, bias=bias, impl=impl)
    x, tm, tv = _case()
    loss = head.distill_loss(x, tm, tv)
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    loss_ref, grads_ref = _reference(head, x, tm, tv)
    assert_close_to(loss, loss_ref, rtol=2e-6, what="loss")
    for g, r in zip(grads, grads_ref):
        assert_close_to(g, r, rtol=2e-5, atol=1e-8)
    mean, var = head(x)
    unfused = gaussian_kl_loss(mean, var, tm, tv)
    assert abs(unfused.item() - loss.item()) <= 1e-5 * abs(loss.item())
    assert (var > 0).all()


@pytest.mark.interpret
def test_gaussian_head_kernel_empty_and_no_grad():
    head = GaussianHydraHead(5, 1, 2, impl="triton")
    x, tm, tv = _case(b=9, d=5, m=2, k=1)
    with torch.no_grad():
        quiet = head.distill_loss(x, tm, tv)
    ref, _ = _reference(head, x, tm, tv)
    assert_close_to(quiet, ref, rtol=2e-6)
    empty = head.distill_loss(torch.randn(0, 5, requires_grad=True), torch.zeros(0, 2, 1), torch.ones(0, 2, 1))
    assert empty.item() == 0.0


@pytest.mark.cpu
def test_gaussian_head_expand_and_shapes():
    head = GaussianHydraHead(4, 3, 1, impl="torch")
    big = head.expand(5, noise_std=0.0)
    assert isinstance(big, GaussianHydraHead) and big.num_heads == 5 and big.out_features == 3
    x = torch.randn(6, 4)
    m1, v1 = head(x)
    m5, v5 = big(x)
    assert m5.shape == (6, 5, 3) and v5.shape == (6, 5, 3)
    # one GEMM over 5 stacked heads vs one over 1 head: BLAS may block them differently
    assert_same_products(m5[:, 2], m1[:, 0], inner=4, what="mean")
    assert_same_products(v5[:, 4], v1[:, 0], inner=4, what="variance")
    assert "out_features=3" in repr(big)


@pytest.mark.interpret
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("second", ["small-step-in-backward", "small-step-in-forward", "gemms"])
def test_gaussian_heads_both_second_launches(monkeypatch, bias, reduction, second):
    """Several 64-row programs, D across two tiles, an upstream gradient of 0.7; the reduced loss from
    the fused kernel's last program; the gradients from the small-step gradient kernel run from the
    backward (reading the upstream gradient; again for a retained graph's second backward) or in the
    forward (SMALL_DEFERRED off), and from GEMMs (a batch past its limit)."""
    from fasthydra.ops import _common

    if second == "gemms":
        monkeypatch.setattr(_common, "SMALL_MAX_ROWS", 100)
    monkeypatch.setattr(_common, "SMALL_DEFERRED", second == "small-step-in-backward")
    head = GaussianHydraHead(40, 3, 4, bias=bias, impl="triton")
    x, tm, tv = _case(b=150, d=40, m=4, k=3)
    loss = head.distill_loss(x, tm, tv, reduction=reduction)
    grads = torch.autograd.grad(loss * 0.7, [x, *params_of(head)], retain_graph=True)
    loss_ref, grads_ref = _reference(head, x, tm, tv)
    n = 150 * 4 * 3 if reduction == "sum" else 1
    assert_close_to(loss, loss_ref * n, rtol=2e-6, what="loss")
    for g, r in zip(grads, grads_ref):
        assert_close_to(g, r * n * 0.7, rtol=2e-5, atol=1e-8)
    for g, again in zip(grads, torch.autograd.grad(loss * 0.7, [x, *params_of(head)])):
        assert torch.equal(g, again)


@pytest.mark.interpret
@pytest.mark.parametrize("which,value,match", [("var", 0.0, "teacher_var"), ("var", float("inf"), "teacher_var"),
                                               ("var", float("nan"), "teacher_var"),
                                               ("mean", float("nan"), "teacher_mean"),
                                               ("mean", float("-inf"), "teacher_mean")])
def test_gaussian_heads_kernel_checks_the_teacher(which, value, match):
    """The fused kernel checks the teacher on its own loads (no separate pass); on the CPU the error
    comes from the same call."""
    head = GaussianHydraHead(6, 2, 3, impl="triton")
    x, tm, tv = _case(b=70, d=6, m=3, k=2)
    (tv if which == "var" else tm)[66, 2, 1] = value
    with pytest.raises(ValueError, match=match):
        head.distill_loss(x, tm, tv)
    head.distill_loss(x, *_case(b=70, d=6, m=3, k=2)[1:])  # reported once: the next call is clean


@pytest.mark.interpret
def test_gaussian_heads_fp16_io():
    head = GaussianHydraHead(16, 2, 3, impl="triton").half()
    x, tm, tv = _case(b=40, d=16, m=3, k=2, dtype=torch.float16)
    loss = head.distill_loss(x, tm, tv)
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    assert all(g.dtype == torch.float16 for g in grads)
    loss_ref, grads_ref = _reference(head, x, tm, tv)
    assert_close_to(loss, loss_ref, rtol=2e-3, what="loss")
    for g, r in zip(grads, grads_ref):
        assert_close_to(g, r, rtol=1e-2, atol=1e-5)
