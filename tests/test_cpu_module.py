"""cpu tier: HydraHead on the torch path against the float64 reference, and the module contract."""

import pytest
import torch
from helpers import (
    SHAPES,
    assert_close_to,
    assert_same_products,
    params_of,
    reference_logits,
    reference_loss_and_grads,
    teacher_logits,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fasthydra import HydraHead, hydra_kl_loss
from fasthydra.functional import linear_hydra_kl_loss

pytestmark = pytest.mark.cpu

HEAD_KINDS = [dict(hidden_features=None), dict(hidden_features=7), dict(hidden_features=None, bias=False),
              dict(hidden_features=6, bias=False)]


@pytest.mark.parametrize("b,d,m,c", SHAPES)
@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_distill_loss_float64_matches_reference(b, d, m, c, kind):
    head = HydraHead(d, c, m, impl="torch", dtype=torch.float64, **kind)
    x = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    t = teacher_logits(b, m, c, dtype=torch.float64)
    up = 0.37  # an upstream gradient other than 1
    loss = head.distill_loss(x, t, temperature=2.5)
    grads = torch.autograd.grad(loss * up, [x, *params_of(head)])
    loss_ref, grads_ref = reference_loss_and_grads(head, x, t, 2.5, upstream=up)
    assert_close_to(loss, loss_ref, rtol=1e-12, what="loss")
    names = ["x"] + [n for n, _ in head.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close_to(g, g_ref, rtol=1e-11, atol=1e-15, what=name)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_forward_matches_reference(kind):
    head = HydraHead(45, 13, 5, impl="torch", dtype=torch.float64, **kind)
    x = torch.randn(37, 45, dtype=torch.float64)
    z = head(x)
    assert z.shape == (37, 5, 13)
    assert_close_to(z, reference_logits(head, x), rtol=1e-12, what="logits")
    up = torch.randn_like(z)
    got = torch.autograd.grad(z, params_of(head), up)
    want = torch.autograd.grad(reference_logits(head, x), params_of(head), up)
    for g, w in zip(got, want):
        assert_close_to(g, w, rtol=1e-12)


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_equals_unfused_fp32(kind, reduction):
    """The contract: distill_loss(x, t, T) == hydra_kl_loss(head(x), t, T) in value (rel 1e-5) and grads."""
    head = HydraHead(45, 13, 5, impl="torch", **kind)
    x = torch.randn(37, 45, requires_grad=True)
    t = teacher_logits(37, 5, 13)
    t_before = t.clone()
    fused = head.distill_loss(x, t, temperature=3.0, reduction=reduction)
    assert torch.equal(t, t_before)
    g_fused = torch.autograd.grad(fused, [x, *params_of(head)])
    plain = hydra_kl_loss(head(x), t, temperature=3.0, reduction=reduction)
    g_plain = torch.autograd.grad(plain, [x, *params_of(head)])
    assert abs(fused.item() - plain.item()) <= 1e-5 * abs(plain.item())
    for a, b in zip(g_fused, g_plain):
        assert_close_to(a, b, rtol=1e-5, atol=1e-8)


def test_reduction_none_and_leading_dims():
    head = HydraHead(8, 6, 3, impl="torch", dtype=torch.float64)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    t = torch.randn(2, 5, 3, 6, dtype=torch.float64)
    assert head(x).shape == (2, 5, 3, 6)
    per = head.distill_loss(x, t, 2.0, reduction="none")
    assert per.shape == (2, 5, 3)
    mean = head.distill_loss(x, t, 2.0)
    assert_close_to(per.mean(), mean, rtol=1e-12)


def test_empty_batch():
    head = HydraHead(8, 6, 3, impl="torch")
    x = torch.randn(0, 8, requires_grad=True)
    loss = head.distill_loss(x, torch.randn(0, 3, 6), 2.0)
    assert loss.item() == 0.0
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().max().item() == 0.0
    assert head(x).shape == (0, 3, 6)


def test_non_contiguous_input_and_teacher():
    head = HydraHead(12, 5, 3, impl="torch", dtype=torch.float64)
    x = torch.randn(12, 9, dtype=torch.float64).T  # (9, 12), not contiguous
    t = torch.randn(5, 3, 9, dtype=torch.float64).permute(2, 1, 0)
    loss_ref, _ = reference_loss_and_grads(head, x.contiguous(), t.contiguous(), 1.5)
    assert_close_to(head.distill_loss(x, t, 1.5), loss_ref, rtol=1e-12)


def test_gradcheck_fused_linear_heads():
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: linear_hydra_kl_loss(*a, t, 2.0, impl="torch"), (x, w, b))


def test_gradcheck_fused_mlp_heads():
    head = HydraHead(4, 5, 2, hidden_features=3, impl="torch", dtype=torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 2, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: head.distill_loss(v, t, 1.5), (x,))


def test_expand_copies_the_single_head():
    head = HydraHead(10, 4, 1, hidden_features=6, impl="torch", dtype=torch.float64)
    big = head.expand(5)
    assert big.num_heads == 5 and big.weight.shape == (5, 4, 6) and big.hidden_weight.shape == (5, 6, 10)
    x = torch.randn(7, 10, dtype=torch.float64)
    z1, z5 = head(x), big(x)
    for m in range(5):  # one GEMM over 5 stacked heads vs one over 1 head: BLAS may block them differently
        assert_same_products(z5[:, m], z1[:, 0], inner=10 + 6, what=f"head {m}")
    noisy = head.expand(3, noise_std=0.1, generator=torch.Generator().manual_seed(0))
    diff = (noisy.weight - head.weight).std().item()
    assert 0.05 < diff < 0.2  # the noise has roughly the asked size
    assert not torch.equal(noisy.weight[0], noisy.weight[1])
    assert head.num_heads == 1  # the original is untouched


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("hidden", [None, 6])
def test_from_linear_copies_a_trained_classifier(bias, hidden):
    """HydraHead.from_linear(nn.Linear or Linear-ReLU-Linear): every head computes the layer's logits, in its
    dtype; the parameters are copies (training the heads leaves the layer as it was); noise as expand's."""
    from torch import nn

    torch.manual_seed(2)
    layer = nn.Linear(10, 4, bias=bias, dtype=torch.float64) if hidden is None else nn.Sequential(
        nn.Linear(10, hidden, bias=bias, dtype=torch.float64), nn.ReLU(),
        nn.Linear(hidden, 4, bias=bias, dtype=torch.float64))
    head = HydraHead.from_linear(layer, num_heads=3, impl="torch")
    assert head.num_heads == 3 and head.hidden_features == hidden and (head.bias is not None) == bias
    assert head.weight.dtype == torch.float64
    x = torch.randn(7, 10, dtype=torch.float64)
    want = layer(x)
    for m in range(3):  # one GEMM over the stacked heads vs the layer's own: BLAS may block them differently
        assert_same_products(head(x)[:, m], want, inner=10 + (hidden or 0), what=f"head {m}")
    before = [p.clone() for p in layer.parameters()]
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), before))
    noisy = HydraHead.from_linear(layer, 2, noise_std=0.1, generator=torch.Generator().manual_seed(0))
    last = layer if hidden is None else layer[2]
    assert 0.05 < (noisy.weight - last.weight).std().item() < 0.2
    assert not torch.equal(noisy.weight[0], noisy.weight[1])


def test_from_linear_refuses_what_it_cannot_copy():
    from torch import nn

    from fasthydra import GaussianHydraHead

    with pytest.raises(TypeError, match="nn.Linear or an nn.Sequential.*got Conv1d"):
        HydraHead.from_linear(nn.Conv1d(3, 4, 1))
    with pytest.raises(TypeError, match=r"got nn.Sequential of \['Linear', 'GELU', 'Linear'\]"):
        HydraHead.from_linear(nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 3)))
    with pytest.raises(ValueError, match="both Linear layers need a bias, or neither"):
        HydraHead.from_linear(nn.Sequential(nn.Linear(5, 6, bias=False), nn.ReLU(), nn.Linear(6, 3)))
    with pytest.raises(ValueError, match="first Linear gives 6 features, the second takes 7"):
        HydraHead.from_linear(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(7, 3)))
    with pytest.raises(ValueError, match="num_heads"):
        HydraHead.from_linear(nn.Linear(5, 3), num_heads=0)
    with pytest.raises(TypeError, match="builds a HydraHead"):
        GaussianHydraHead.from_linear(nn.Linear(5, 2))


def test_expand_needs_one_head():
    with pytest.raises(ValueError, match="one-head"):
        HydraHead(4, 3, 2).expand(4)
    with pytest.raises(ValueError, match="noise_std"):
        HydraHead(4, 3, 1).expand(4, noise_std=-1.0)


def test_parameters_follow_nn_linear_conventions():
    head = HydraHead(50, 7, 4, device="cpu", dtype=torch.float64)
    assert head.weight.shape == (4, 7, 50) and head.bias.shape == (4, 7)
    assert head.weight.dtype == torch.float64
    bound = 1 / 50**0.5
    assert head.weight.abs().max().item() <= bound and head.bias.abs().max().item() <= bound
    assert head.weight.std().item() > bound / 3  # kaiming-uniform(a=sqrt 5) has std bound/sqrt(3)
    old = head.weight.detach().clone()
    head.reset_parameters()
    assert not torch.equal(old, head.weight)
    text = repr(head)
    for part in ("in_features=50", "num_classes=7", "num_heads=4", "bias=True", "impl='auto'"):
        assert part in text
    assert HydraHead(5, 3, 2, bias=False).bias is None
    assert "hidden_features=9" in repr(HydraHead(5, 3, 2, hidden_features=9))


def test_state_dict_round_trip():
    head = HydraHead(6, 4, 3, hidden_features=5)
    other = HydraHead(6, 4, 3, hidden_features=5)
    other.load_state_dict(head.state_dict())
    x = torch.randn(3, 6)
    assert torch.equal(head(x), other(x))
    assert set(head.state_dict()) == {"hidden_weight", "hidden_bias", "weight", "bias"}


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    head = HydraHead(16, 5, 4, impl="torch")
    x = torch.randn(64, 16)
    with torch.no_grad():  # a teacher the heads can represent exactly: the loss can reach 0
        t = HydraHead(16, 5, 4, impl="torch")(x) * 4
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = head.distill_loss(x, t, temperature=2.0)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.05 * first


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(0, 12), d=st.integers(1, 20), m=st.integers(1, 5), c=st.integers(1, 30),
       hidden=st.sampled_from([None, 3]), temperature=st.floats(0.5, 20.0))
def test_hypothesis_module_shapes(b, d, m, c, hidden, temperature):
    head = HydraHead(d, c, m, hidden_features=hidden, impl="torch", dtype=torch.float64)
    x = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, m, c, dtype=torch.float64) * 3
    loss = head.distill_loss(x, t, temperature)
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    loss_ref, grads_ref = reference_loss_and_grads(head, x, t, temperature)
    assert_close_to(loss, loss_ref, rtol=1e-10, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        assert_close_to(g, g_ref, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("hidden", [None, 5])
@pytest.mark.parametrize("tile_elements,block_rows", [(64, 1024), (40, 8), (10**6, 1024)])
def test_class_tiled_mode_matches_reference(monkeypatch, hidden, tile_elements, block_rows):
    """Large-C mode of the torch path (classes in tiles, online statistics, two passes), forced on a
    small case: several class tiles, several row blocks, a masked stretch wider than a tile."""
    import fasthydra.ops.linear_hydra_kl as lk

    monkeypatch.setattr(lk, "TORCH_CHUNK_ELEMENTS", 1)  # any row block would be "thin": tiled mode
    monkeypatch.setattr(lk, "TILE_ELEMENTS", tile_elements)
    monkeypatch.setattr(lk, "TILED_BLOCK_ROWS", block_rows)
    head = HydraHead(9, 37, 3, hidden_features=hidden, impl="torch", dtype=torch.float64)
    x = torch.randn(21, 9, dtype=torch.float64, requires_grad=True)
    t = teacher_logits(21, 3, 37, dtype=torch.float64)
    t[2, 1, :30] = float("-inf")
    t_before, x_before = t.clone(), x.detach().clone()
    loss = head.distill_loss(x, t, temperature=1.7)
    assert torch.equal(t, t_before) and torch.equal(x.detach(), x_before)  # inputs are never written
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    loss_ref, grads_ref = reference_loss_and_grads(head, x, t, 1.7)
    assert_close_to(loss, loss_ref, rtol=1e-12, what="loss")
    for name, g, g_ref in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_ref):
        assert_close_to(g, g_ref, rtol=1e-11, atol=1e-15, what=name)
    with torch.no_grad():  # the loss-only pass of the tiled mode
        assert_close_to(head.distill_loss(x, t, temperature=1.7), loss_ref, rtol=1e-12)


@pytest.mark.parametrize("hidden,bias", [(None, True), (5, True), (None, False), (5, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64-torch-ops", "fp32-native"])
def test_head_chunk_mode_matches_reference(monkeypatch, hidden, bias, dtype):
    """Large C where a row block of all heads would be thin but one head's is not: the torch path takes
    one head at a time in row chunks of at least MIN_CHUNK_ROWS (three GEMMs per chunk, no class tiles),
    forced on a small case: 300 rows, 3 heads of 13 classes, a budget that gives all heads 76-row blocks
    and one head 128-row chunks (128, 128, 44 rows for each head); a masked stretch, an upstream gradient."""
    import fasthydra.ops.hydra_kl as hk
    import fasthydra.ops.linear_hydra_kl as lk

    monkeypatch.setattr(lk, "TORCH_CHUNK_ELEMENTS", 3000)
    real_tiled = lk._class_tiled_block
    monkeypatch.setattr(lk, "_class_tiled_block", lambda *a: pytest.fail("the class-tiled mode ran"))
    chunks = []
    real = hk.kl_chunk_torch
    monkeypatch.setattr(lk, "kl_chunk_torch", lambda s, t, *a: chunks.append(tuple(s.shape)) or real(s, t, *a))
    head = HydraHead(9, 13, 3, hidden_features=hidden, bias=bias, impl="torch", dtype=dtype)
    x = torch.randn(300, 9, dtype=dtype, requires_grad=True)
    t = teacher_logits(300, 3, 13, dtype=dtype)
    t[2, 1, :9] = float("-inf")
    loss = head.distill_loss(x, t, temperature=1.7)
    grads = torch.autograd.grad(loss * 0.6, [x, *params_of(head)])
    assert sorted(chunks) == sorted([(128, 1, 13)] * 6 + [(44, 1, 13)] * 3)
    head64 = HydraHead(9, 13, 3, hidden_features=hidden, bias=bias, impl="torch", dtype=torch.float64)
    head64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    loss_ref, grads_ref = reference_loss_and_grads(head64, x64, t.double(), 1.7, upstream=0.6)
    exact = dtype == torch.float64
    assert_close_to(loss, loss_ref, rtol=1e-12 if exact else 2e-6, what="loss")
    for name, g, g_ref in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_ref):
        assert_close_to(g, g_ref, rtol=1e-11 if exact else 2e-5, atol=1e-15 if exact else 1e-7, what=name)
    tiled = []
    monkeypatch.setattr(lk, "_class_tiled_block", lambda *a: tiled.append(1) or real_tiled(*a))
    with torch.no_grad():  # the loss alone keeps the class tiles (one GEMM per logit either way, one sweep there)
        assert_close_to(head.distill_loss(x, t, temperature=1.7), loss_ref, rtol=1e-12 if exact else 2e-6)
    assert tiled


@pytest.mark.parametrize("hidden", [None, 5])
@pytest.mark.parametrize("tile_elements", [3 * 21 * 16, 10**6], ids=["tiles-of-16", "one-tile"])
def test_class_tiled_mode_in_c_matches_float64(isa, monkeypatch, hidden, tile_elements):
    """The class-tiled mode in fp32 runs its two passes in the C tile kernels (native.tile_stats,
    native.tile_grad): against float64, with maxima that move from tile to tile (a rising teacher ramp
    and a falling student one), a row whose first tiles are all masked, a masked stretch, logits of
    1e3; and the same values as the torch ops it replaces (FASTHYDRA_NATIVE=0)."""
    import fasthydra.ops.linear_hydra_kl as lk
    from fasthydra.ops import native

    if native.status() != "ok":
        pytest.skip(f"native kernel unavailable here: {native.status()}")
    monkeypatch.setattr(lk, "TORCH_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(lk, "TILE_ELEMENTS", tile_elements)
    b, d, m, c = 21, 9, 3, 70
    head = HydraHead(d, c, m, hidden_features=hidden, impl="torch")
    with torch.no_grad():
        head.weight.mul_(3.0)
    x = torch.randn(b, d, requires_grad=True)
    t = teacher_logits(b, m, c) * 2
    t[0, 0] = torch.linspace(-20, 40, c)  # the teacher's maximum rises tile after tile
    t[3, 2, :40] = float("-inf")  # the first tiles of a row carry no teacher mass
    t[5, 1, 10:50] = float("-inf")
    t[7] = t[7] * 300  # logits of about 1e3
    calls = []
    real = native.tile_stats
    monkeypatch.setattr(native, "tile_stats", lambda *a: calls.append(1) or real(*a))
    loss = head.distill_loss(x, t, temperature=1.7)
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    assert calls, "the C tile kernels did not run"
    head64 = HydraHead(d, c, m, hidden_features=hidden, impl="torch", dtype=torch.float64)
    head64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    loss_ref, grads_ref = reference_loss_and_grads(head64, x64, t.double(), 1.7)
    assert_close_to(loss, loss_ref, rtol=2e-5, what="loss")
    for name, g, g_ref in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_ref):
        assert_close_to(g, g_ref, rtol=2e-4, atol=1e-6 * g_ref.abs().max().item(), what=name)
    monkeypatch.setenv("FASTHYDRA_NATIVE", "0")
    calls.clear()
    loss_ops = head.distill_loss(x, t, temperature=1.7)
    grads_ops = torch.autograd.grad(loss_ops, [x, *params_of(head)])
    assert not calls
    assert_close_to(loss, loss_ops.double(), rtol=1e-5, what="loss (torch ops)")
    for g, g_ops in zip(grads, grads_ops):
        assert_close_to(g, g_ops.double(), rtol=1e-4, atol=1e-6 * g_ops.abs().max().item(), what="grad (torch ops)")


def test_no_grad_takes_the_loss_only_path(monkeypatch):
    """Under torch.no_grad() nothing gradient-sized is computed (autograd's needs_input_grad would still
    say True there), and the value is unchanged."""
    import fasthydra.ops.linear_hydra_kl as lk

    seen = []
    real = lk.kl_chunk_torch

    def spy(s, t, temperature, want_grad, want_tgrad=False, *rest):
        seen.append(want_grad or want_tgrad)
        return real(s, t, temperature, want_grad, want_tgrad, *rest)

    monkeypatch.setattr(lk, "kl_chunk_torch", spy)
    head = HydraHead(8, 6, 3, impl="torch")
    x = torch.randn(5, 8, requires_grad=True)
    t = torch.randn(5, 3, 6)
    with torch.no_grad():
        quiet = head.distill_loss(x, t, 2.0)
    assert seen == [False] and not quiet.requires_grad
    loud = head.distill_loss(x, t, 2.0)
    assert seen == [False, True] and loud.requires_grad
    assert quiet.item() == pytest.approx(loud.item(), rel=1e-6)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("hidden", [None, 6], ids=["linear", "mlp"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing(impl, hidden, reentrant):
    """torch.utils.checkpoint over body + distill_loss (the forward runs again in the backward, and the fused
    op forms its gradients in the forward): the same gradients as the plain step, an upstream 0.5 applied."""
    from torch.utils.checkpoint import checkpoint

    body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU())
    head = HydraHead(16, 7, 3, hidden_features=hidden, impl=impl)
    params = [*body.parameters(), *head.parameters()]
    x, t = torch.randn(5, 8), torch.randn(5, 3, 7) * 2

    def step(inp):
        return head.distill_loss(body(inp), t, 2.0)

    plain = step(x)
    plain.backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    checked = checkpoint(step, x.clone().requires_grad_(True), use_reentrant=reentrant)
    (checked * 0.5).backward()
    assert checked.item() == pytest.approx(plain.item(), rel=1e-6)
    for e, p in zip(expected, params):
        torch.testing.assert_close(p.grad, 0.5 * e, rtol=1e-5, atol=1e-7)


def test_evaluation_calls_make_no_autograd_node(monkeypatch):
    """Under torch.no_grad(), or with nothing that requires grad, the ops run without an autograd.Function
    (its bookkeeping and the gradient hand-over's setup would be thrown away: host time per evaluation step),
    and give the same values as a call that builds the graph."""
    applied = []
    real_apply = torch.autograd.Function.__dict__["apply"]  # a classmethod (a C one in recent torch)

    def counting_apply(cls, *args, **kwargs):
        applied.append(cls.__name__)
        return real_apply.__get__(None, cls)(*args, **kwargs)

    monkeypatch.setattr(torch.autograd.Function, "apply", classmethod(counting_apply))
    head = HydraHead(8, 6, 3, impl="torch")
    x, t = torch.randn(5, 8), torch.randn(5, 3, 6)
    z = torch.randn(5, 3, 6, requires_grad=True)
    loud = head.distill_loss(x, t, 2.0)
    loud_kl = hydra_kl_loss(z, t, 2.0)
    assert len(applied) == 2 and loud.requires_grad and loud_kl.requires_grad
    applied.clear()
    with torch.no_grad():
        quiet = head.distill_loss(x, t, 2.0)
        quiet_kl = hydra_kl_loss(z, t, 2.0)
    head.requires_grad_(False)
    frozen = head.distill_loss(x, t, 2.0)
    frozen_kl = hydra_kl_loss(z.detach(), t, 2.0)
    assert applied == []
    for value in (quiet, frozen):
        assert not value.requires_grad
        assert value.item() == pytest.approx(loud.item(), rel=1e-6)
    for value in (quiet_kl, frozen_kl):
        assert not value.requires_grad
        assert value.item() == pytest.approx(loud_kl.item(), rel=1e-6)


@pytest.mark.parametrize("kind", [dict(hidden_features=None), dict(hidden_features=5)], ids=["linear", "mlp"])
def test_backward_hands_over_the_stored_gradients(monkeypatch, kind):
    """The fused heads compute their gradients in the forward; the backward scales those tensors in place
    and hands them to autograd, which keeps them as the parameters' .grad (no copy, no second
    weight-sized tensor): the upstream 1 leaves them as computed, 0.7 scales them, both against float64."""
    import fasthydra.ops.hydra_kl as hk

    handed = []
    real = hk.scale_grads_
    # the spy keeps addresses only: a reference of its own would make autograd copy the tensors
    monkeypatch.setattr(hk, "scale_grads_", lambda stored, g: handed.extend(x.data_ptr() for x in stored)
                        or real(stored, g))
    head = HydraHead(6, 9, 3, impl="torch", **kind)
    x, t = torch.randn(11, 6, requires_grad=True), teacher_logits(11, 3, 9)
    for upstream in (1.0, 0.7):
        head.zero_grad(set_to_none=True)
        x.grad, handed[:] = None, []
        (head.distill_loss(x, t, 1.5) * upstream).backward()
        # every parameter's and the input's gradient (MLP heads: both layers form one node)
        assert {g.data_ptr() for g in (x.grad, *[p.grad for p in params_of(head)])} <= set(handed)
        _, grads_ref = reference_loss_and_grads(head, x, t, 1.5, upstream=upstream)
        names = ["x"] + [n for n, _ in head.named_parameters()]
        for name, g, g_ref in zip(names, [x.grad, *[p.grad for p in params_of(head)]], grads_ref):
            assert_close_to(g, g_ref, rtol=1e-5, atol=1e-8, what=f"{name} (upstream {upstream})")


@pytest.mark.parametrize("hidden", [None, 5], ids=["linear", "mlp"])
def test_second_backward_recomputes_and_refuses_changed_inputs(hidden):
    """retain_graph=True: the first backward gave the stored gradients away, so a second one recomputes
    them from the forward's inputs (gradients accumulate: twice the first, also with another upstream
    and after the caller zeroed .grad in place); a weight changed in place in between is refused."""
    head = HydraHead(6, 9, 3, impl="torch", hidden_features=hidden)
    x, t = torch.randn(11, 6, requires_grad=True), teacher_logits(11, 3, 9)
    loss = head.distill_loss(x, t, 1.5)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in params_of(head)]
    first_x = x.grad.clone()
    for p in params_of(head):
        p.grad.zero_()  # what optimizer.zero_grad(set_to_none=False) does to the handed-over tensors
    (loss * 0.5).backward(retain_graph=True)
    for p, g in zip(params_of(head), first):
        assert_close_to(p.grad, 0.5 * g, rtol=1e-6, atol=1e-9, what="second backward")
    assert_close_to(x.grad, 1.5 * first_x, rtol=1e-6, atol=1e-9, what="input gradient, accumulated")
    with torch.no_grad():
        (head.weight if hidden is None else head.hidden_weight).add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_op_does_not_keep_a_temporary_teacher_alive():
    """The teacher is held weakly for the retained-graph recompute: a temporary teacher (computed inline)
    is freed after the forward, as before; a second backward then says so; a teacher changed in place
    is refused; a teacher the caller keeps, of which the op sees a strided view, recomputes exactly."""
    import gc
    import weakref

    head = HydraHead(6, 9, 3, impl="torch")
    x, t = torch.randn(11, 6), teacher_logits(11, 3, 9)
    tmp = t * 1.0
    alive = weakref.ref(tmp)
    loss = head.distill_loss(x, tmp, 1.5)
    del tmp
    gc.collect()
    assert alive() is None
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="no longer exists"):
        loss.backward()
    t_kept = t.clone()
    loss = head.distill_loss(x, t_kept, 1.5)
    with torch.no_grad():
        t_kept[0, 0, 0] += 1.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    head.zero_grad(set_to_none=True)
    big = teacher_logits(22, 3, 9)
    loss = head.distill_loss(x, big[1::2], 1.5)  # a strided view with an offset reaches the op
    loss.backward(retain_graph=True)
    first = head.weight.grad.clone()
    loss.backward()
    assert_close_to(head.weight.grad, 2 * first, rtol=1e-6, atol=1e-12, what="recomputed through views")
