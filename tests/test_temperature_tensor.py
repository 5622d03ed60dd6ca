"""A temperature given as a one-element tensor (an annealed T that must not recompile a graph or be baked into
a CUDA graph): the number's values and gradients on every path, against the float64 reference; one compiled
graph for every value; its checks (a CPU tensor at the call, a device tensor on the device: NaN, or a
ValueError in strict mode). A CPU tensor is read as a number, at no cost; the tests keep it a tensor as a
CUDA one is kept (``device_like``), so that the kernels read it from memory under the interpreter and the
torch ops compute with it as a tensor. A tensor that requires grad is a learned temperature: its gradient against
float64 finite differences, with padding rows and masked classes, compiled, and in float64 by gradcheck."""

import pytest
import torch
from helpers import assert_close_to, public_calls, teacher_logits, tolerance_rule

from fasthydra import HydraHead, TopKTeacher, hinton_kl_loss, hydra_kl_loss, uncertainty
from fasthydra import reference as R
from fasthydra.ops import _common, checks

IMPLS = [pytest.param("torch", marks=pytest.mark.cpu), pytest.param("triton", marks=pytest.mark.interpret)]


@pytest.fixture(params=[False, True], ids=["cpu-tensor", "device-like"])
def device_like(request, monkeypatch):
    monkeypatch.setattr(_common, "KEEP_CPU_TEMPERATURE_TENSOR", request.param)
    return request.param


def _cases(impl):
    """(name, float64 reference of (inputs, T), inputs, fn of (inputs, T)): every op that takes a temperature,
    each returning one scalar that involves all its outputs."""
    b, d, m, c = 7, 6, 3, 37
    x = torch.randn(b, d)
    w, bias = torch.randn(m, c, d) * 0.5, torch.randn(m, c)
    hw, w2 = torch.randn(m, 5, d) * 0.5, torch.randn(m, c, 5) * 0.5
    z, z1 = torch.randn(b, m, c) * 2, torch.randn(b, c) * 2
    t = teacher_logits(b, m, c)
    topk = TopKTeacher(*torch.randn(b, m, c).topk(4, dim=-1))
    keep = torch.tensor([True, False, True, True, True, False, True])

    def unc_sum(u):
        return u.total.sum() + 0.5 * u.aleatoric.sum() + 2 * u.epistemic.sum() + (u.probs ** 2).sum()

    return [
        ("hydra_kl_loss", lambda i, T: R.hydra_kl_loss_ref(i[0], t.double(), T), [z],
         lambda i, T: hydra_kl_loss(i[0], t, T, impl=impl)),
        ("hydra_kl_loss, teacher requires grad", lambda i, T: R.hydra_kl_loss_ref(i[0], i[1], T), [z, t.clone()],
         lambda i, T: hydra_kl_loss(i[0], i[1], T, impl=impl)),
        ("hydra_kl_loss none, row mask",
         lambda i, T: (R.hydra_kl_loss_ref(i[0], t.double(), T, "none") * keep[:, None]).square().sum(), [z],
         lambda i, T: hydra_kl_loss(i[0], t, T, "none", impl, row_mask=keep).square().sum()),
        ("hydra_kl_loss top-k", lambda i, T: R.hydra_kl_loss_ref(i[0], topk.densify(c).double(), T), [z],
         lambda i, T: hydra_kl_loss(i[0], topk, T, impl=impl)),
        ("hinton_kl_loss", lambda i, T: R.hinton_kl_loss_ref(i[0], t.double(), T), [z1],
         lambda i, T: hinton_kl_loss(i[0], t, T, impl=impl)),
        ("hinton_kl_loss top-k", lambda i, T: R.hinton_kl_loss_ref(i[0], topk.densify(c).double(), T), [z1],
         lambda i, T: hinton_kl_loss(i[0], topk, T, impl=impl)),
        ("linear heads", lambda i, T: R.hydra_kl_loss_ref(R.linear_heads_ref(*i), t.double(), T), [x, w, bias],
         lambda i, T: _linear_loss(impl, *i, t, T)),
        ("MLP heads", lambda i, T: R.hydra_kl_loss_ref(R.mlp_heads_ref(i[0], i[1], None, i[2], None), t.double(), T),
         [x, hw, w2], lambda i, T: _mlp_loss(impl, *i, t, T)),
        ("uncertainty", lambda i, T: unc_sum(R.uncertainty_ref(i[0], T)), [z],
         lambda i, T: unc_sum(uncertainty(i[0], T, impl=impl))),
    ]


def _linear_loss(impl, x, w, bias, t, T):
    from fasthydra.functional import linear_hydra_kl_loss

    return linear_hydra_kl_loss(x, w, bias, t, T, impl=impl)


def _mlp_loss(impl, x, hw, w2, t, T):
    from fasthydra.functional import mlp_hydra_kl_loss

    return mlp_hydra_kl_loss(x, hw, None, w2, None, t, T, impl=impl)


def _run(fn, inputs, T):
    inputs = [v.detach().clone().requires_grad_() for v in inputs]
    out = fn(inputs, T)
    return [out.detach(), *torch.autograd.grad(out, inputs)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", [0.37, 4.0])
def test_a_tensor_temperature_gives_the_numbers_values_and_gradients(device_like, impl, value):
    """Loss and every gradient with T as a tensor hold the tolerance rule against float64, with the path's own
    result for T as a number as the eager error (the same maths, T applied on the device instead of folded into
    the launch's scalars)."""
    for name, ref, inputs, fn in _cases(impl):
        exact = _run(ref, [v.double() for v in inputs], value)
        as_number = _run(fn, inputs, value)
        as_tensor = _run(fn, inputs, torch.tensor(value))
        for i, (got, eager, want) in enumerate(zip(as_tensor, as_number, exact)):
            tolerance_rule(got, eager, want, atol=1e-6 * (1 + want.abs().max().item()), what=f"{name} output {i}")


# Settings that send the same problems through each Triton form: the cuBLAS path, rows in tiles (the split bias
# pass's column-sum kernel, or its one-pass form), the gradient formed in the forward (the default) or the
# backward, uncertainty's long rows (forward and backward).
PATHS = {"cublas": {"env": "0"},
         "tiles, split bias pass": {"env": "0", "MAX_BLOCK_C": 16, "ROW_TILE_MAX": 16, "SPLIT_BIAS_PASS": True},
         "tiles, one bias pass": {"env": "0", "MAX_BLOCK_C": 16, "ROW_TILE_MAX": 16, "SPLIT_BIAS_PASS": False},
         "gradient in the forward": {"DEFER_KL_GRAD": False, "SMALL_DEFERRED": False},
         "gradient in the backward": {"DEFER_KL_GRAD": True},
         "long uncertainty rows": {"UNCERTAINTY_TILE_MAX": 16, "UNCERTAINTY_LONG_TILE": 16,
                                   "UNCERTAINTY_GRAD_ROW_MAX": 16, "UNCERTAINTY_GRAD_TILE": 32}}


@pytest.mark.interpret
@pytest.mark.parametrize("path", PATHS)
def test_every_kernel_form_reads_a_device_temperature(monkeypatch, path):
    """The tensor temperature's values and gradients on each Triton form (PATHS), kept as a device one is."""
    import fasthydra.ops.linear_hydra_kl as lk

    monkeypatch.setattr(_common, "KEEP_CPU_TEMPERATURE_TENSOR", True)
    for name, value in PATHS[path].items():
        if name == "env":
            monkeypatch.setenv("FASTHYDRA_SMALL_STEP", value)
        for home in (_common, lk):
            if hasattr(home, name):
                monkeypatch.setattr(home, name, value)
    for name, ref, inputs, fn in _cases("triton"):
        exact = _run(ref, [v.double() for v in inputs], 0.37)
        as_number = _run(fn, inputs, 0.37)
        as_tensor = _run(fn, inputs, torch.tensor(0.37))
        for i, (got, eager, want) in enumerate(zip(as_tensor, as_number, exact)):
            tolerance_rule(got, eager, want, atol=1e-6 * (1 + want.abs().max().item()), what=f"{name} output {i}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_any_one_element_shape_is_a_temperature(device_like, impl, shape):
    """A (1,) or (1, 1) tensor (a schedule's slice, a buffer) is the 0-dim one's temperature."""
    for name, _, inputs, fn in _cases(impl):
        want = _run(fn, inputs, torch.tensor(1.7))
        got = _run(fn, inputs, torch.full(shape, 1.7))
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"{name} output {i}"


@pytest.mark.parametrize("impl", IMPLS)
def test_a_float64_temperature_is_not_rounded_to_float32(device_like, impl):
    """fp64 logits with an fp64 tensor temperature: the float64 reference's values to 1e-12 (a T rounded to
    fp32 on the way, 0.1 -> 0.100000001, would cost 1e-8 relative)."""
    z, t = torch.randn(5, 3, 11, dtype=torch.float64), teacher_logits(5, 3, 11, dtype=torch.float64)
    got = hydra_kl_loss(z, t, torch.tensor(0.1, dtype=torch.float64), impl="torch")
    want = R.hydra_kl_loss_ref(z, t, 0.1)
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())
    u = uncertainty(z, torch.tensor(0.1, dtype=torch.float64), impl="torch")
    assert torch.allclose(u.total, R.uncertainty_ref(z, 0.1).total, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad,error,match", [
    (torch.tensor([1.0, 2.0]), ValueError, "one-element tensor"),
    (torch.tensor(2), TypeError, "floating tensor"),
    (torch.tensor(2.0, device="meta"), ValueError, "on meta but the logits are on cpu"),
])
@pytest.mark.parametrize("impl", IMPLS)
def test_a_bad_temperature_tensor_is_refused_by_every_op(impl, bad, error, match):
    for name, _, inputs, fn in _cases(impl):
        with pytest.raises(error, match=match):
            fn(inputs, bad)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), 2.0**70, 2.0**-70])
@pytest.mark.parametrize("impl", IMPLS)
def test_a_cpu_temperature_tensor_out_of_range_raises_at_the_call(impl, value):
    for name, _, inputs, fn in _cases(impl):
        with pytest.raises(ValueError, match="temperature must"):
            fn(inputs, torch.tensor(value))


@pytest.mark.parametrize("value", [0.0, -2.0, float("nan"), float("inf"), 2.0**70])
@pytest.mark.parametrize("impl", IMPLS)
def test_a_device_temperature_out_of_range_makes_the_loss_nan(monkeypatch, impl, value):
    """A device tensor is never read on the host: a value outside [2^-64, 2^63] makes every loss NaN (nothing
    passes as a number), and strict mode (FASTHYDRA_STRICT=1) raises at the call instead."""
    monkeypatch.setattr(_common, "KEEP_CPU_TEMPERATURE_TENSOR", True)
    for name, _, inputs, fn in _cases(impl):
        out = fn([v.clone().requires_grad_() for v in inputs], torch.tensor(value))
        assert torch.isnan(out), name
    checks.strict_checks(True)
    try:
        for name, _, inputs, fn in _cases(impl):
            with pytest.raises(ValueError, match="temperature must"):
                fn(inputs, torch.tensor(value))
    finally:
        checks.strict_checks(None)


@pytest.mark.parametrize("impl", IMPLS)
def test_an_annealed_tensor_temperature_compiles_once(device_like, impl):
    """Every public op compiled (fullgraph) with T a tensor updated in place between steps: one frame for five
    values, and each step the eager values for that T as a number."""
    from torch._dynamo.testing import CompileCounterWithBackend

    temperature = torch.tensor(1.0)
    for name, inputs, fn in public_calls(impl, temperature=temperature):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(fn, fullgraph=True, backend=counter)
        for value in (1.0, 1.5, 0.7, 3.0, 2.2):
            temperature.fill_(value)
            got = compiled(*inputs)
            got_grads = torch.autograd.grad(got, inputs)
            want = _eager(name, inputs, value, impl)
            assert_close_to(got, want[0], rtol=1e-5, what=f"{name} at T={value}")
            for a, e in zip(got_grads, want[1:]):
                assert_close_to(a, e, rtol=1e-5, atol=1e-8, what=f"{name} grad at T={value}")
        assert counter.frame_count == 1, (name, counter.frame_count)
    torch._dynamo.reset()


def _eager(name, inputs, value, impl):
    """The eager loss and gradients of public call `name` with T = value as a number."""
    fn = dict((n, f) for n, _, f in public_calls(impl, temperature=value))[name]
    out = fn(*inputs)
    return [out.detach(), *torch.autograd.grad(out, inputs)]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_second_backward_recomputes_with_a_temporary_temperature(impl):
    """retain_graph=True then a second backward recomputes the stored gradients from the forward's inputs: a
    temperature tensor made for the call (and dropped by the caller) is kept for it."""
    head = HydraHead(6, 9, 3, impl=impl)
    x, t = torch.randn(5, 6), teacher_logits(5, 3, 9)
    loss = head.distill_loss(x, t, torch.tensor(2.5))
    loss.backward(retain_graph=True)
    first = head.weight.grad.clone()
    loss.backward()
    assert torch.allclose(head.weight.grad, 2 * first, rtol=1e-6, atol=1e-9)
    head.zero_grad()
    head.distill_loss(x, t, 2.5).backward()
    assert torch.allclose(head.weight.grad, first, rtol=1e-5, atol=1e-8)


def _learned(fn, inputs, value, dtype=torch.float32):
    """fn's output and the gradients of its inputs and of a learned temperature T = value."""
    T = torch.tensor(value, dtype=dtype, requires_grad=True)
    inputs = [v.detach().clone().requires_grad_() for v in inputs]
    out = fn(inputs, T)
    return [out.detach(), *torch.autograd.grad(out, [*inputs, T])]


def _finite_difference(ref, inputs, value, rel=1e-5):
    """dL/dT of the float64 reference by central differences (truncation and rounding both below 1e-9
    relative here): the reference's masked classes (-inf) stay out of the way, as autograd's 0 * inf would not."""
    h = rel * value
    return (ref(inputs, value + h) - ref(inputs, value - h)) / (2 * h)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value,t_dtype", [(0.37, torch.float32), (4.0, torch.float64)])
def test_a_learned_temperature_gets_its_gradient(device_like, impl, value, t_dtype):
    """T that requires grad (an nn.Parameter): every op's value and input gradients are the number's (held to
    the tolerance rule against float64, the path's result for T as a number as eager's error; the outputs'
    dtypes the number's, an fp64 T too), and dL/dT is the float64 reference's (finite differences), on teachers
    with masked classes (-inf) and padding rows."""
    for name, ref, inputs, fn in _cases(impl):
        exact64 = [v.double() for v in inputs]
        exact = _run(ref, exact64, value)
        as_number = _run(fn, inputs, value)
        learned = _learned(fn, inputs, value, t_dtype)
        assert [v.dtype for v in learned[:-1]] == [v.dtype for v in as_number], name
        for i, (got, eager, want) in enumerate(zip(learned, as_number, exact)):
            tolerance_rule(got, eager, want, atol=1e-6 * (1 + want.abs().max().item()), what=f"{name} output {i}")
        with torch.no_grad():
            want = _finite_difference(ref, exact64, value).item()
        got = learned[-1].item()
        assert abs(got - want) <= 2e-5 * (1 + abs(want)), f"{name}: dL/dT {got} against {want}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [5, 1 << 22])
def test_dL_dT_in_torch_ops_in_chunks(monkeypatch, impl, chunk):
    """dL/dT's reduction as torch ops (a CPU run without the interpreter, float64 tensors; here the interpreter's
    kernel is switched off), the products formed a chunk of rows at a time (chunk: elements per chunk, fewer
    than one row holds, or all of them): the float64 reference's dL/dT for every op, as the kernel gives it."""
    import fasthydra.ops.hydra_kl as hk

    monkeypatch.setattr(hk, "_dot_kernel_applies", lambda s, pairs: False)
    monkeypatch.setattr(hk, "DOT_CHUNK_ELEMENTS", chunk)
    for name, ref, inputs, fn in _cases(impl):
        got = _learned(fn, inputs, 1.7)[-1].item()
        with torch.no_grad():
            want = _finite_difference(ref, [v.double() for v in inputs], 1.7).item()
        assert abs(got - want) <= 2e-5 * (1 + abs(want)), f"{name}: dL/dT {got} against {want}"


@pytest.mark.parametrize("impl", IMPLS)
def test_a_learned_temperature_ignores_what_padding_rows_hold(impl):
    """Rows a row mask leaves out may hold NaN and infinities (student logits, the heads' features): dL/dT is
    the one of the same call with those rows zeroed, finite."""
    torch.manual_seed(3)
    keep = torch.tensor([True, False, True, True, False, True])
    head = HydraHead(5, 9, 3, hidden_features=4, impl=impl)
    t = teacher_logits(6, 3, 9)
    spoiled_z, spoiled_x = torch.randn(6, 3, 9), torch.randn(6, 5)
    spoiled_z[1, 0, 2], spoiled_z[4] = float("nan"), float("inf")
    spoiled_x[1, 3], spoiled_x[4, 0] = float("nan"), float("-inf")
    clean_z, clean_x = spoiled_z.nan_to_num(0, 0, 0), spoiled_x.nan_to_num(0, 0, 0)

    def grad_T(z, x):
        T = torch.tensor(1.6, requires_grad=True)
        loss = (hydra_kl_loss(z, t, T, impl=impl, row_mask=keep) + head.distill_loss(x, t, T, row_mask=keep)
                + hinton_kl_loss(z[:, 0], t, T, impl=impl, row_mask=keep))
        return torch.autograd.grad(loss, T)[0]

    got, want = grad_T(spoiled_z, spoiled_x), grad_T(clean_z, clean_x)
    assert torch.isfinite(want) and torch.allclose(got, want, rtol=1e-6, atol=0), (got, want)


@pytest.mark.cpu
def test_a_learned_temperature_passes_gradcheck_in_float64():
    """The torch path in float64: dL/dT (and the inputs' gradients beside it) against finite differences of
    the op itself, for the losses on logits, the fused linear and MLP heads and uncertainty."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(4, 3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(4, 3, 7, dtype=torch.float64, generator=g) * 2
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    hw = torch.randn(3, 6, 5, dtype=torch.float64, generator=g)
    w2 = torch.randn(3, 7, 6, dtype=torch.float64, generator=g)
    b = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    T = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    from fasthydra.functional import linear_hydra_kl_loss, mlp_hydra_kl_loss

    calls = {"hydra_kl_loss": (lambda z, T: hydra_kl_loss(z, t, T, impl="torch"), (z, T)),
             "hinton_kl_loss": (lambda z, T: hinton_kl_loss(z[:, 0], t, T, impl="torch"), (z, T)),
             "linear heads": (lambda x, w, T: linear_hydra_kl_loss(x, w, b, t, T, impl="torch"), (x, w, T)),
             "linear heads, frozen body": (lambda w, T: linear_hydra_kl_loss(x.detach(), w, b, t, T, impl="torch"),
                                           (w, T)),
             "MLP heads": (lambda x, b, T: mlp_hydra_kl_loss(x, hw, None, w2, b, t, T, impl="torch"), (x, b, T)),
             "uncertainty": (lambda z, T: uncertainty(z, T, impl="torch").epistemic, (z, T))}
    for name, (fn, args) in calls.items():
        assert torch.autograd.gradcheck(fn, args), name


@pytest.mark.parametrize("impl", IMPLS)
def test_a_learned_temperature_compiles_without_breaks(impl):
    """A step with T an nn.Parameter compiled with fullgraph=True: the eager loss and gradients, T's included."""
    from torch._dynamo.testing import CompileCounterWithBackend

    head = HydraHead(6, 9, 3, impl=impl)
    T = torch.nn.Parameter(torch.tensor(2.0))
    x, t, z = torch.randn(5, 6), teacher_logits(5, 3, 9), torch.randn(5, 3, 9)

    def step(x, t, z):
        return (head.distill_loss(x, t, T) + hydra_kl_loss(z, t, T, impl=impl)
                + uncertainty(head(x), T, impl=impl).epistemic.sum())

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    leaves = [T, *head.parameters()]
    for value in (2.0, 0.8):
        with torch.no_grad():
            T.fill_(value)
        got, want = compiled(x, t, z), step(x, t, z)
        assert_close_to(got, want, rtol=1e-5, what=f"loss at T={value}")
        for a, e in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
            assert_close_to(a, e, rtol=1e-5, atol=1e-8, what=f"grad at T={value}")
    assert counter.frame_count == 1
    torch._dynamo.reset()
