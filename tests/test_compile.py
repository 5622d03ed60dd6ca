"""torch.compile: body + HydraHead + distill_loss compiles with fullgraph=True, without graph breaks,
and matches eager in values and gradients (torch path on CPU; the Triton path under the interpreter);
torch.export of a model with heads gives the reference with a symbolic batch."""

import copy

import pytest
import torch
from helpers import assert_close_to, public_calls, reference_logits
from torch import nn

from fasthydra import HydraHead, hydra_kl_loss, uncertainty
from fasthydra import reference as R

CASES = [pytest.param("torch", None, marks=pytest.mark.cpu), pytest.param("torch", 8, marks=pytest.mark.cpu),
         pytest.param("triton", None, marks=pytest.mark.interpret),
         pytest.param("triton", 8, marks=pytest.mark.interpret)]


def _model(impl, hidden):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
    head = HydraHead(32, 10, 4, hidden_features=hidden, impl=impl)
    return body, head


@pytest.mark.parametrize("impl,hidden", CASES)
def test_fullgraph_compile_matches_eager(impl, hidden):
    body, head = _model(impl, hidden)
    params = [*body.parameters(), *head.parameters()]
    x = torch.randn(12, 16)
    t = torch.randn(12, 4, 10)
    t[0, 1, 3] = float("-inf")

    def step(x, t):
        return head.distill_loss(body(x), t, temperature=2.0)

    explained = torch._dynamo.explain(step)(x, t)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(x, t)
    grads_c = torch.autograd.grad(loss_c, params)
    loss_e = step(x, t)
    grads_e = torch.autograd.grad(loss_e, params)
    assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=0)
    for a, b in zip(grads_c, grads_e):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("impl", [pytest.param("torch", marks=pytest.mark.cpu),
                                  pytest.param("triton", marks=pytest.mark.interpret)])
def test_fullgraph_compile_with_a_teacher_that_requires_grad(impl):
    """Online distillation under torch.compile(fullgraph=True): the teacher's gradient flows through
    the custom ops' autograd and fake implementations, no graph break, eager values."""
    body, head = _model(impl, None)
    teacher = nn.Linear(16, 40)
    x = torch.randn(12, 16)
    params = [*body.parameters(), *head.parameters(), *teacher.parameters()]

    def step(x):
        t = teacher(x).view(12, 4, 10)
        return head.distill_loss(body(x), t, temperature=2.0) + hydra_kl_loss(head(body(x)), t, 2.0, impl=impl)

    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    loss_c = torch.compile(step, fullgraph=True)(x)
    grads_c = torch.autograd.grad(loss_c, params)
    loss_e = step(x)
    grads_e = torch.autograd.grad(loss_e, params)
    assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=0)
    for a, b in zip(grads_c, grads_e):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
    assert grads_e[-1].abs().sum() > 0  # the teacher really got a gradient


@pytest.mark.cpu
def test_losses_and_uncertainty_compile_without_breaks():
    def f(z, t):
        return hydra_kl_loss(z, t, 2.0, reduction="sum") + uncertainty(z).epistemic.sum()

    z = torch.randn(5, 3, 7, requires_grad=True)
    t = torch.randn(5, 3, 7)
    explained = torch._dynamo.explain(f)(z, t)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(z, t)
    assert torch.allclose(got, f(z, t))


@pytest.mark.parametrize("impl", [pytest.param("torch", marks=pytest.mark.cpu),
                                  pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "topk"])
def test_hinton_loss_compiles_without_breaks(impl, sparse):
    """hinton_kl_loss under torch.compile(fullgraph=True), dense and top-k teachers: no graph break (the dense
    teacher's path asked torch._C._is_tracing(), which dynamo cannot trace, from the eighteenth session until
    this test), eager's loss and gradient."""
    from fasthydra import TopKTeacher, hinton_kl_loss

    z = torch.randn(6, 7, requires_grad=True)
    t = torch.randn(6, 3, 7)
    teacher = TopKTeacher(*t.topk(4, dim=-1)) if sparse else t

    def f(z):
        return hinton_kl_loss(z, teacher, 2.0, impl=impl)

    explained = torch._dynamo.explain(f)(z)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(z)
    (g_c,) = torch.autograd.grad(got, [z])
    want = f(z)
    (g_e,) = torch.autograd.grad(want, [z])
    assert_close_to(got, want, rtol=1e-6, what="loss")
    assert_close_to(g_c, g_e, rtol=1e-6, atol=1e-9, what="grad")


@pytest.mark.parametrize("impl", [pytest.param("torch", marks=pytest.mark.cpu),
                                  pytest.param("triton", marks=pytest.mark.interpret)])
def test_every_public_loss_compiles_without_breaks(impl):
    """Every public loss and op, with and without a row mask, dense and top-k teachers, under
    torch.compile(fullgraph=True): no graph break, eager's value and gradients (a sweep for breaks such as
    hinton_kl_loss's, which no single-op test had caught)."""
    for name, inputs, fn in public_calls(impl):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*inputs)
        assert explained.graph_break_count == 0, (name, explained.break_reasons)
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*inputs)
        got_grads = torch.autograd.grad(got, inputs)
        want = fn(*inputs)
        want_grads = torch.autograd.grad(want, inputs)
        assert_close_to(got, want, rtol=1e-6, what=f"{name} loss")
        for i, (a, e) in enumerate(zip(got_grads, want_grads)):
            assert_close_to(a, e, rtol=1e-5, atol=1e-8, what=f"{name} grad {i}")


@pytest.mark.parametrize("impl", [pytest.param("torch", marks=pytest.mark.cpu),
                                  pytest.param("triton", marks=pytest.mark.interpret)])
def test_every_public_loss_compiles_without_breaks_with_a_symbolic_temperature(impl):
    """dynamic=True makes a float read from a variable or a default symbolic (as automatic dynamic does to a
    temperature that changed between calls, an annealed T): the temperature's validation is comparisons, which
    are guards there, not a graph break (math.isfinite on it was one, in every public op). Eager's values."""
    for name, inputs, fn in public_calls(impl, temperature=3.0):
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")(*inputs)
        want = fn(*inputs)
        assert_close_to(got, want, rtol=1e-6, what=f"{name} loss")
        for i, (a, e) in enumerate(zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs))):
            assert_close_to(a, e, rtol=1e-5, atol=1e-8, what=f"{name} grad {i}")


@pytest.mark.parametrize("impl", [pytest.param("torch", marks=pytest.mark.cpu),
                                  pytest.param("triton", marks=pytest.mark.interpret)])
def test_sequence_batches_of_any_length_compile_once(impl):
    """A training step over (B, T, D) sequence batches with their (B, T) attention mask, compiled with
    dynamic=True and fullgraph=True: batches of four lengths run what the first compiled, with eager's values and
    gradients (the fused loss, the loss on the module's (B, T, M, C) logits, and uncertainty per token)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    body, head = _model(impl, None)
    params = [*body.parameters(), *head.parameters()]

    def step(x, t, mask):
        features = body(x)
        return (head.distill_loss(features, t, 2.0, row_mask=mask)
                + hydra_kl_loss(head(features), t, 2.0, "none", impl=impl, row_mask=mask).sum()
                + uncertainty(head(features), impl=impl).epistemic.sum())

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(5)
    compiles = []
    for length in (5, 7, 11, 6):
        x, t = torch.randn(3, length, 16, generator=g), torch.randn(3, length, 4, 10, generator=g) * 3
        mask = torch.rand(3, length, generator=g) > 0.3
        got, want = compiled(x, t, mask), step(x, t, mask)
        assert_close_to(got, want, rtol=1e-6, what=f"length {length}")
        for a, e in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
            assert_close_to(a, e, rtol=1e-5, atol=1e-8, what=f"length {length} grad")
        compiles.append(counter.frame_count)
    assert compiles[0] >= 1 and compiles == compiles[:1] * 4, compiles  # nothing compiled after the first batch


@pytest.mark.cpu
def test_bad_teacher_values_still_raise_when_compiled():
    head = HydraHead(8, 5, 2, impl="torch")
    compiled = torch.compile(lambda x, t: head.distill_loss(x, t), fullgraph=True)
    t = torch.randn(3, 2, 5)
    t[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compiled(torch.randn(3, 8), t)


@pytest.mark.parametrize("impl", [pytest.param("torch", marks=pytest.mark.cpu),
                                  pytest.param("triton", marks=pytest.mark.interpret)])
def test_gaussian_heads_compile_without_breaks(impl):
    from fasthydra import GaussianHydraHead

    torch.manual_seed(0)
    head = GaussianHydraHead(8, 2, 3, impl=impl)
    x, tm, tv = torch.randn(10, 8), torch.randn(10, 3, 2), torch.rand(10, 3, 2) + 0.5

    def step(x, tm, tv):
        return head.distill_loss(x, tm, tv)

    explained = torch._dynamo.explain(step)(x, tm, tv)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(x, tm, tv)
    (g_c,) = torch.autograd.grad(got, head.weight)
    want = step(x, tm, tv)
    (g_e,) = torch.autograd.grad(want, head.weight)
    assert torch.allclose(got, want, rtol=1e-6) and torch.allclose(g_c, g_e, rtol=1e-5, atol=1e-8)


def _opcheck_cases(impl):
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=False):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    z, t, tg = r(4, 3, 7, grad=True), r(4, 3, 7), r(4, 3, 7, grad=True)
    x, w, b, u = r(4, 5, grad=True), r(3, 7, 5, grad=True), r(3, 7, grad=True), r(4, 3, 5, grad=True)
    ops = torch.ops.fasthydra
    v, vg = r(4, 3, 3), r(4, 3, 3, grad=True)
    idx = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(12)]).view(4, 3, 3)
    keep = torch.tensor([True, False, True, True])
    cases = [(ops.hydra_kl, (z, t, 2.0, "mean", True, False, impl, None)),
             (ops.hydra_kl, (z, t, 2.0, "none", True, False, impl, None)),
             (ops.hydra_kl, (z, tg, 2.0, "none", True, True, impl, None)),  # a teacher that requires grad
             (ops.hydra_kl, (z, vg, 2.0, "mean", True, True, impl, idx)),  # a top-k teacher
             (ops.hydra_kl, (z, t, 2.0, "mean", True, False, impl, None, keep)),  # a row mask
             (ops.hydra_kl, (z, tg, 2.0, "none", True, True, impl, None, keep)),
             (ops.hydra_kl, (z, vg, 2.0, "sum", True, True, impl, idx, keep)),
             (ops.linear_hydra_kl, (x, w, b, t, 2.0, "mean", True, True, True, True, False, impl, None, False)),
             (ops.linear_hydra_kl, (u, w, None, t, 2.0, "sum", False, True, True, False, False, impl, None, False)),
             (ops.linear_hydra_kl, (x, w, b, tg, 2.0, "sum", True, True, True, True, True, impl, None, False)),
             (ops.linear_hydra_kl, (x, w, b, v, 2.0, "mean", True, True, True, True, False, impl, idx.int(), False)),
             (ops.uncertainty, (z.detach(), 1.0, impl))]
    temperature = torch.tensor(1.5)  # a tensor temperature: the ops' last argument (their float one then 1)
    cases += [(ops.hydra_kl, (z, t, 1.0, "mean", True, False, impl, None, None, temperature)),
              (ops.hydra_kl, (z, tg, 1.0, "none", True, True, impl, None, keep, temperature)),
              (ops.linear_hydra_kl, (x, w, b, t, 1.0, "mean", True, True, True, True, False, impl, None, False, None,
                                     temperature)),
              (ops.uncertainty, (z, 1.0, impl, temperature))]
    if impl == "triton":
        _, norms, _ = ops.hydra_kl(z, t, 2.0, "none", True, False, impl, None)  # the deferred gradient's input
        cases += [(ops.hydra_kl_grad, (z.detach(), t, norms.detach(), r(4, 3), 2.0, "none")),
                  (ops.hydra_kl_grad, (z.detach(), t, norms.detach(), torch.tensor(0.7), 2.0, "mean")),
                  (ops.hydra_kl_grad, (z.detach(), t, norms.detach(), torch.tensor(0.7), 2.0, "mean", keep)),
                  (ops.hydra_kl_grad, (z.detach(), t, norms.detach(), r(4, 3), 1.0, "none", None, temperature)),
                  (ops.uncertainty_grad, (z.detach(), 1.0, r(4, 7), r(4), None, r(4), temperature))]
        # the small step with its gradients deferred: launch 1 returning the stash, launch 2 from the backward
        cases += [(ops.linear_hydra_kl, (x, w, b, t, 2.0, "mean", True, True, True, True, False, impl, None, True)),
                  (ops.linear_hydra_kl, (u, w, None, t, 2.0, "sum", False, True, True, False, False, impl, None, True))]
        _, stash, *_ = ops.linear_hydra_kl(x, w, b, t, 2.0, "mean", True, True, True, True, False, impl, None, True)
        cases += [(ops.small_heads_grads, (x.detach(), w.detach(), b.detach(), stash.detach(), torch.tensor(0.7),
                                           True, True, True, True)),
                  (ops.small_heads_grads, (x.detach(), w.detach(), None, stash.detach(), torch.tensor(1.0),
                                           True, False, True, False))]
        cases += [(ops.grouped_linear, (x, w, b, True, True)), (ops.grouped_linear, (u, w, None, False, False)),
                  (ops.gaussian_heads_kl, (x, r(3, 4, 5, grad=True), None, r(4, 3, 2),
                                           torch.rand(4, 3, 2, generator=g) + 0.5, 1e-6, "mean", True, True, False,
                                           False)),
                  (ops.gaussian_heads_kl, (x, r(3, 4, 5, grad=True), b[:, :4].detach().requires_grad_(),
                                           r(4, 3, 2), torch.rand(4, 3, 2, generator=g) + 0.5, 1e-6, "sum", True,
                                           True, True, True))]  # its gradients deferred to the backward
    return cases


@pytest.mark.parametrize("impl", [pytest.param("torch", marks=pytest.mark.cpu),
                                  pytest.param("triton", marks=pytest.mark.interpret)])
def test_custom_ops_pass_opcheck(impl):
    """torch.library.opcheck: schema, autograd registration, fake (meta) kernels against the real ones,
    and AOT dispatch with dynamic shapes, for every custom op."""
    for op, args in _opcheck_cases(impl):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("impl,hidden", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_heads_compile_matches_eager(impl, hidden, dtype):
    """16-bit heads under torch.compile: the custom ops' fake outputs must match what the implementations
    return (the first layer's fp32 bias gradient of MLP heads, fp16's fp32 stored gradients: inductor
    asserts every output's dtype), and the gradients come back in the parameters' dtype."""
    _, head = _model(impl, hidden)
    head = head.to(dtype)
    x = torch.randn(12, 32, dtype=dtype, requires_grad=True)
    t = torch.randn(12, 4, 10)
    params = [x, *head.parameters()]

    def step(x, t):
        return head.distill_loss(x, t, temperature=2.0).float() * 256.0  # a loss scale, as GradScaler's

    grads_c = torch.autograd.grad(torch.compile(step, fullgraph=True)(x, t), params)
    grads_e = torch.autograd.grad(step(x, t), params)
    for a, b in zip(grads_c, grads_e):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3 * b.float().abs().max().item())


class _Deployed(nn.Module):
    """What a user ships: body + heads, returning the heads' logits and the uncertainty split."""

    def __init__(self, hidden):
        super().__init__()
        self.body, self.head = _model("torch", hidden)

    def forward(self, x):
        z = self.head(self.body(x))
        return (z, *uncertainty(z, temperature=2.0))


@pytest.mark.cpu
@pytest.mark.parametrize("hidden", [None, 8], ids=["linear", "mlp"])
def test_torch_export_with_a_dynamic_batch_matches_the_reference(hidden):
    """torch.export of a model with a HydraHead (the deployment path: no Python at inference): one export with
    a symbolic batch, run at other batch sizes, gives the float64 reference's logits and uncertainty."""
    model = _Deployed(hidden)
    model64 = copy.deepcopy(model).double()
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, (torch.randn(4, 16),), dynamic_shapes=({0: batch},)).module()
    for b in (3, 17):
        x = torch.randn(b, 16)
        got = exported(x)
        with torch.no_grad():
            z64 = reference_logits(model64.head, model64.body(x.double()))
        want = (z64, *R.uncertainty_ref(z64, 2.0))
        assert len(got) == len(want)
        for name, a, e in zip(("logits", "probs", "total", "aleatoric", "epistemic"), got, want):
            assert a.dtype == torch.float32, name
            assert_close_to(a, e, rtol=1e-5, atol=1e-6, what=f"b={b} {name}")


@pytest.mark.cpu
def test_torch_export_of_gaussian_heads_matches_the_reference():
    from fasthydra import GaussianHydraHead

    torch.manual_seed(0)
    head = GaussianHydraHead(8, 2, 3, min_var=1e-3)
    exported = torch.export.export(head, (torch.randn(4, 8),),
                                   dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    x = torch.randn(11, 8)
    mean, var = exported(x)
    w, b = head.weight.detach().double(), head.bias.detach().double()
    z = torch.einsum("bd,mkd->bmk", x.double(), w) + b
    assert_close_to(mean, z[..., :2], what="mean")
    assert_close_to(var, torch.nn.functional.softplus(z[..., 2:]) + 1e-3, what="var")
