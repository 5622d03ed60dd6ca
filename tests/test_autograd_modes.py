"""Derivatives other than a plain backward, on every path and tier: second-order gradients (``create_graph=True``)
and forward-mode AD (``torch.autograd.forward_ad``) through the heads' logits and ``uncertainty``; the fused
losses refuse both with a message (the Gaussian heads' torch path, plain torch ops, takes them).

Second order. A gradient penalty on the inputs, a Hessian-vector product for a second-order optimiser or an
influence function differentiate the heads' first-order gradients: ``torch.autograd.grad(..., create_graph=True)``,
then a second backward. The heads' logits on the Triton path run their GEMMs as a custom op whose backward writes
into preallocated outputs (``out=``), which autograd cannot differentiate; such a backward failed with torch's
"functions with out=... arguments don't support automatic differentiation" until the sixty-sixth session, while
the torch path worked. It now takes differentiable torch ops when a graph is recorded
(``grouped_linear_backward_graph``). The fused losses still refuse create_graph=True with their own message
(tests/test_robustness.py): their gradients are formed in the forward pass.

Checked against float64 (the reference ops) under the tolerance rule, with the eager reference in the same dtype
as the error budget: for linear heads (the shared-input GEMM), MLP heads (ReLU, then the per-head GEMM) and
Gaussian heads (the linear heads and a softplus), a Hessian-vector product of a nonlinear function of the logits
with respect to the input and every parameter; and the same through ``uncertainty`` (whose backward takes torch
ops when a graph is recorded, its kernels otherwise).

Forward mode. The kernels (and the torch path's native rows) read a dual tensor's primal values and never its
tangent. Until the sixty-sixth session the heads' logits on the Triton path raised autograd's NotImplementedError,
and ``uncertainty`` and the fused losses, given dual inputs that did not also require grad, returned outputs with
no tangent: a directional derivative of 0, silently. Now the heads' logits and ``uncertainty`` run as plain torch
ops while a dual level is entered (as under torch.func transforms), and the fused losses refuse dual inputs.

cpu tier: the torch path; interpret tier: the Triton path under TRITON_INTERPRET=1 (the heads' GEMMs are torch's,
``uncertainty``'s kernels interpreted); gpu tier: the same on CUDA, in fp32 and bf16.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import params_of, tolerance_rule

from fasthydra import GaussianHydraHead, HydraHead
from fasthydra import reference as R
from fasthydra.ops.gaussian_kl import split_gaussian

TARGETS = [pytest.param("torch", "cpu", torch.float32, marks=pytest.mark.cpu, id="torch-cpu"),
           pytest.param("triton", "cpu", torch.float32, marks=pytest.mark.interpret, id="triton-interpret"),
           pytest.param("triton", "cuda", torch.float32, marks=pytest.mark.gpu, id="triton-gpu-fp32"),
           pytest.param("triton", "cuda", torch.bfloat16, marks=pytest.mark.gpu, id="triton-gpu-bf16")]
# (kind, B, D, M, C, hidden): the odd shape; M = 1; MLP heads; Gaussian heads (C outputs: 2C columns)
CASES = [("linear", 37, 45, 5, 13, None), ("linear", 8, 16, 1, 10, None), ("mlp", 37, 45, 5, 13, 16),
         ("gaussian", 21, 12, 3, 2, None)]


def _module(kind, d, m, c, hidden, impl, device, dtype, bias):
    if kind == "gaussian":
        return GaussianHydraHead(d, c, m, bias=bias, impl=impl, device=device, dtype=dtype)
    return HydraHead(d, c, m, hidden_features=hidden, bias=bias, impl=impl, device=device, dtype=dtype)


def _outputs(module, x, params):
    """The module's outputs from the reference ops over `params` (named like named_parameters)."""
    if module.is_mlp:
        return (R.mlp_heads_ref(x, params["hidden_weight"], params.get("hidden_bias"), params["weight"],
                                params.get("bias")),)
    z = R.linear_heads_ref(x, params["weight"], params.get("bias"))
    return split_gaussian(z, module.min_var) if isinstance(module, GaussianHydraHead) else (z,)


def _hvp(outputs, inputs, probes, vectors):
    """The gradient, with respect to `inputs`, of <d f / d inputs, vectors> for f = sum of tanh(out) * probe:
    a Hessian-vector product of a nonlinear function of the outputs (tanh: its second derivative is not 0)."""
    f = sum((o.float().tanh() * p).sum() for o, p in zip(outputs, probes))
    first = torch.autograd.grad(f, inputs, create_graph=True)
    inner = sum((g.float() * v).sum() for g, v in zip(first, vectors))
    return torch.autograd.grad(inner, inputs)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind,b,d,m,c,hidden", CASES)
@pytest.mark.parametrize("impl,device,dtype", TARGETS)
def test_hessian_vector_product_through_the_heads(impl, device, dtype, kind, b, d, m, c, hidden, bias):
    torch.manual_seed(66)
    module = _module(kind, d, m, c, hidden, impl, device, dtype, bias)
    if kind == "mlp" and bias:  # biases away from 0: some hidden units off, some on (ReLU's mask matters)
        with torch.no_grad():
            module.hidden_bias.copy_(torch.randn_like(module.hidden_bias))
    x = torch.randn(b, d, device=device, dtype=dtype, requires_grad=True)
    params = params_of(module)
    outputs = module(x)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    probes = [torch.randn(o.shape, device=device, dtype=torch.float64) for o in outputs]
    vectors = [torch.randn(t.shape, device=device, dtype=torch.float64) for t in (x, *params)]
    got = _hvp(outputs, [x, *params], [p.float() for p in probes], [v.float() for v in vectors])

    named = dict(module.named_parameters())
    eager = _hvp(_outputs(module, x, named), [x, *params], [p.float() for p in probes],
                 [v.float() for v in vectors])
    x64 = x.detach().double().requires_grad_()
    p64 = {k: v.detach().double().requires_grad_() for k, v in named.items()}
    exact = _hvp(_outputs(module, x64, p64), [x64, *p64.values()], probes, vectors)

    atol = 1e-5 if dtype == torch.float32 else 1e-3
    for name, g, ge, gx in zip(["x", *named], got, eager, exact):
        assert g.shape == gx.shape and g.dtype == ge.dtype, name
        assert gx.abs().max() > 0, f"{name}: the case tests nothing (its second-order gradient is 0)"
        tolerance_rule(g, ge, gx, atol * gx.abs().max().item(), what=f"{kind} {name}")


@pytest.mark.parametrize("impl,device,dtype", TARGETS[:2])
def test_first_order_gradients_unchanged_when_a_graph_is_recorded(impl, device, dtype):
    """create_graph=True gives the same first-order gradients as a plain backward (the differentiable backward
    and the GEMMs into preallocated outputs compute the same sums) and leaves them differentiable."""
    torch.manual_seed(7)
    module = HydraHead(45, 13, 5, hidden_features=16, impl=impl, device=device, dtype=dtype)
    x = torch.randn(37, 45, device=device, dtype=dtype, requires_grad=True)
    upstream = torch.randn(37, 5, 13, device=device, dtype=dtype)
    plain = torch.autograd.grad(module(x), [x, *params_of(module)], upstream)
    graph = torch.autograd.grad(module(x), [x, *params_of(module)], upstream, create_graph=True)
    assert graph[0].requires_grad and not graph[-1].requires_grad
    for a, g in zip(plain, graph):
        assert g.dtype == a.dtype and g.shape == a.shape
        torch.testing.assert_close(g.detach(), a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("impl,device,dtype", TARGETS)
def test_hessian_vector_product_through_uncertainty(impl, device, dtype):
    """``uncertainty``'s backward runs as torch ops when a graph is recorded (its kernels otherwise): the second
    order of all four outputs, with masked classes (-inf) in the logits, against float64."""
    from fasthydra import uncertainty

    torch.manual_seed(3)
    z = (torch.randn(19, 4, 11, device=device, dtype=torch.float64) * 2)
    z[0, 1, 3] = z[5, 0, 0] = float("-inf")
    probes = [torch.randn(s, device=device, dtype=torch.float64) for s in ((19, 11), (19,), (19,), (19,))]
    vector = torch.randn(z.shape, device=device, dtype=torch.float64).masked_fill(z.isinf(), 0)

    def hvp(fn, logits, cast):
        first, = torch.autograd.grad(sum((o.float().tanh() * cast(p)).sum() for o, p in zip(fn(logits), probes)),
                                     logits, create_graph=True)
        return torch.autograd.grad((first.float() * cast(vector)).sum(), logits)[0]

    zk = z.to(dtype).requires_grad_()
    got = hvp(lambda a: uncertainty(a, 1.5, impl=impl), zk, lambda p: p.float())
    eager = hvp(lambda a: R.uncertainty_ref(a, 1.5), zk, lambda p: p.float())
    exact = hvp(lambda a: R.uncertainty_ref(a, 1.5), z.clone().requires_grad_(), lambda p: p)
    assert torch.isfinite(exact).all() and exact.abs().max() > 0
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    tolerance_rule(got, eager, exact, atol * exact.abs().max().item(), what="uncertainty")


def _tangents(fn, primals, tangents):
    """The tangents of fn's outputs (a tuple) at `primals` along `tangents`, by forward-mode AD."""
    with fwAD.dual_level():
        outputs = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        return tuple(fwAD.unpack_dual(o).tangent for o in outputs)


@pytest.mark.parametrize("kind,b,d,m,c,hidden", CASES)
@pytest.mark.parametrize("impl,device,dtype", TARGETS)
def test_forward_mode_tangents_of_the_heads(impl, device, dtype, kind, b, d, m, c, hidden):
    """head(x)'s outputs' tangents along a direction in the input and every parameter (the module called over dual
    parameters with torch.func.functional_call, which swaps them in without a transform), against float64."""
    torch.manual_seed(67)
    module = _module(kind, d, m, c, hidden, impl, device, dtype, True)
    named = dict(module.named_parameters())
    x = torch.randn(b, d, device=device, dtype=dtype)
    primals = [x, *(p.detach() for p in named.values())]
    directions = [torch.randn(t.shape, device=device, dtype=torch.float64) for t in primals]

    def call(inp, *params):
        out = torch.func.functional_call(module, dict(zip(named, params)), (inp,))
        return out if isinstance(out, tuple) else (out,)

    def reference(inp, *params):
        return _outputs(module, inp, dict(zip(named, params)))

    got = _tangents(call, primals, [t.to(dtype) for t in directions])
    eager = _tangents(reference, primals, [t.to(dtype) for t in directions])
    exact = _tangents(reference, [t.double() for t in primals], directions)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    for i, (g, ge, gx) in enumerate(zip(got, eager, exact)):
        assert g is not None, f"{kind}: output {i} lost its tangent"
        assert g.shape == gx.shape and gx.abs().max() > 0
        tolerance_rule(g, ge, gx, atol * gx.abs().max().item(), what=f"{kind} output {i}")


@pytest.mark.parametrize("impl,device,dtype", TARGETS)
def test_forward_mode_tangents_of_uncertainty(impl, device, dtype):
    """All four outputs' tangents, with masked classes (a tangent there is multiplied by a probability of 0)."""
    from fasthydra import uncertainty

    torch.manual_seed(4)
    z = torch.randn(19, 4, 11, device=device, dtype=torch.float64) * 2
    z[0, 1, 3] = z[5, 0, 0] = float("-inf")
    direction = torch.randn(z.shape, device=device, dtype=torch.float64).masked_fill(z.isinf(), 0)
    got = _tangents(lambda a: tuple(uncertainty(a, 1.5, impl=impl)), [z.to(dtype)], [direction.to(dtype)])
    eager = _tangents(lambda a: tuple(R.uncertainty_ref(a, 1.5)), [z.to(dtype)], [direction.to(dtype)])
    exact = _tangents(lambda a: tuple(R.uncertainty_ref(a, 1.5)), [z], [direction])
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    for name, g, ge, gx in zip(("probs", "total", "aleatoric", "epistemic"), got, eager, exact):
        assert g is not None, f"{name} lost its tangent"
        assert torch.isfinite(gx).all() and gx.abs().max() > 0
        tolerance_rule(g, ge, gx, atol * gx.abs().max().item(), what=name)


@pytest.mark.parametrize("impl,device", [pytest.param(*t.values[:2], marks=t.marks, id=t.id) for t in TARGETS[:3]])
def test_fused_losses_refuse_dual_inputs(impl, device):
    """Each fused loss given a dual tensor (the student's side or the teacher's alone, which the Hinton target's
    launch would drop before the loss op) raises; the same calls without a dual input work inside a dual level."""
    from fasthydra import hinton_kl_loss, hydra_kl_loss

    torch.manual_seed(5)
    head = HydraHead(6, 5, 3, hidden_features=None, impl=impl, device=device)
    mlp = HydraHead(6, 5, 3, hidden_features=4, impl=impl, device=device)
    x, t, z, z1 = (torch.randn(s, device=device) for s in ((4, 6), (4, 3, 5), (4, 3, 5), (4, 5)))

    def dual(a):
        return fwAD.make_dual(a, torch.randn_like(a))

    calls = {"distill_loss, dual x": lambda: head.distill_loss(dual(x), t, temperature=2.0),
             "distill_loss, dual teacher": lambda: head.distill_loss(x, dual(t), temperature=2.0),
             "MLP distill_loss, dual x": lambda: mlp.distill_loss(dual(x), t, temperature=2.0),
             "hydra_kl_loss, dual logits": lambda: hydra_kl_loss(dual(z), t, 2.0, impl=impl),
             "hinton_kl_loss, dual teacher": lambda: hinton_kl_loss(z1, dual(t), 2.0, impl=impl)}
    if impl == "triton":  # (the Gaussian heads' torch path is plain torch ops: it takes dual tensors)
        gauss = GaussianHydraHead(6, 2, 3, impl=impl, device=device)
        tm, tv = torch.randn(4, 3, 2, device=device), torch.rand(4, 3, 2, device=device) + 0.1
        calls["Gaussian distill_loss, dual x"] = lambda: gauss.distill_loss(dual(x), tm, tv)
    with fwAD.dual_level():
        for what, call in calls.items():
            with pytest.raises(RuntimeError, match="forward-mode AD"):
                call()
        plain = [head.distill_loss(x, t, temperature=2.0), hydra_kl_loss(z, t, 2.0, impl=impl),
                 hinton_kl_loss(z1, t, 2.0, impl=impl)]
    for loss in plain:
        assert torch.isfinite(loss) and fwAD.unpack_dual(loss).tangent is None


@pytest.mark.parametrize("kind,b,d,m,c,hidden", CASES)
@pytest.mark.parametrize("impl,device,dtype", TARGETS)
def test_batched_upstream_gradients_through_the_heads(impl, device, dtype, kind, b, d, m, c, hidden):
    """``torch.autograd.grad(..., is_grads_batched=True)`` (what jacobian and hessian with vectorize=True run):
    the heads' backward under vmap, one result per upstream gradient, against float64."""
    torch.manual_seed(68)
    module = _module(kind, d, m, c, hidden, impl, device, dtype, True)
    named = dict(module.named_parameters())
    x = torch.randn(b, d, device=device, dtype=dtype, requires_grad=True)
    outputs = module(x)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    upstream = [torch.randn(3, *o.shape, device=device, dtype=torch.float64) for o in outputs]
    got = torch.autograd.grad(outputs, [x, *named.values()], [u.to(dtype) for u in upstream], is_grads_batched=True)

    def looped(inputs, params, cast):
        outs = _outputs(module, inputs, params)
        return [torch.stack(g) for g in zip(*(torch.autograd.grad(outs, [inputs, *params.values()],
                                                                  [cast(u[i]) for u in upstream], retain_graph=True)
                                              for i in range(3)))]

    eager = looped(x, named, lambda u: u.to(dtype))
    x64 = x.detach().double().requires_grad_()
    exact = looped(x64, {k: v.detach().double().requires_grad_() for k, v in named.items()}, lambda u: u)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    for name, g, ge, gx in zip(["x", *named], got, eager, exact):
        assert g.shape == gx.shape == (3, *(x if name == "x" else named[name]).shape), name
        tolerance_rule(g, ge, gx, atol * gx.abs().max().item(), what=f"{kind} {name}")


@pytest.mark.parametrize("impl,device,dtype", TARGETS)
def test_batched_upstream_gradients_through_uncertainty(impl, device, dtype):
    """``uncertainty``'s backward under is_grads_batched=True (its kernels and the native rows cannot read batched
    gradients: torch ops then), and ``torch.autograd.functional.jacobian`` with vectorize=True, against float64."""
    from fasthydra import uncertainty

    torch.manual_seed(6)
    z = torch.randn(9, 3, 7, device=device, dtype=torch.float64) * 2
    z[0, 1, 3] = float("-inf")
    shapes = ((9, 7), (9,), (9,), (9,))
    upstream = [torch.randn(4, *s, device=device, dtype=torch.float64) for s in shapes]
    zk = z.to(dtype).requires_grad_()
    got, = torch.autograd.grad(tuple(uncertainty(zk, 1.5, impl=impl)), zk, [u.to(dtype) for u in upstream],
                               is_grads_batched=True)

    def looped(logits, cast):
        outs = tuple(R.uncertainty_ref(logits, 1.5))
        return torch.stack([torch.autograd.grad(outs, logits, [cast(u[i]) for u in upstream], retain_graph=True)[0]
                            for i in range(4)])

    exact = looped(z.clone().requires_grad_(), lambda u: u)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    tolerance_rule(got, looped(zk, lambda u: u.to(dtype)), exact, atol * exact.abs().max().item(), what="batched")
    jac = torch.autograd.functional.jacobian(lambda a: uncertainty(a, 1.5, impl=impl).epistemic, zk.detach(),
                                             vectorize=True)
    jac64 = torch.autograd.functional.jacobian(lambda a: R.uncertainty_ref(a, 1.5).epistemic, z)
    jac_eager = torch.autograd.functional.jacobian(lambda a: R.uncertainty_ref(a, 1.5).epistemic, zk.detach())
    tolerance_rule(jac, jac_eager, jac64, atol * jac64.abs().max().item(), what="jacobian")


@pytest.mark.parametrize("impl,device", [pytest.param(*t.values[:2], marks=t.marks, id=t.id) for t in TARGETS[:3]])
def test_fused_losses_refuse_batched_upstream_gradients(impl, device):
    """The fused losses scale their stored gradients by one upstream gradient: a batch of them raises."""
    from fasthydra import hinton_kl_loss, hydra_kl_loss

    torch.manual_seed(8)
    head = HydraHead(6, 5, 3, impl=impl, device=device)
    x = torch.randn(4, 6, device=device, requires_grad=True)
    z = torch.randn(4, 3, 5, device=device, requires_grad=True)
    t = torch.randn(4, 3, 5, device=device)
    for what, loss, wrt in (("distill_loss", head.distill_loss(x, t, temperature=2.0), x),
                            ("hydra_kl_loss", hydra_kl_loss(z, t, 2.0, impl=impl), z),
                            ("hydra_kl_loss none", hydra_kl_loss(z, t, 2.0, reduction="none", impl=impl), z),
                            ("hinton_kl_loss", hinton_kl_loss(z[:, 0], t, 2.0, impl=impl), z)):
        with pytest.raises(RuntimeError, match="batched upstream gradients"):
            torch.autograd.grad(loss, wrt, torch.ones(2, *loss.shape, device=device), is_grads_batched=True)
