"""Gradients through `uncertainty`: every output (probs, total, aleatoric, epistemic) differentiates to the
logits, held to the float64 reference's autograd gradient on the same values (masked classes, one head, leading
dimensions, 16-bit logits), gradcheck and gradgradcheck in float64, row chunks of the eager backward, nothing
saved where nothing is differentiated, torch.compile, and a step of gradient ascent on the epistemic part.

cpu tier: the torch path; interpret tier: the Triton forward. The backward is the same on both: fp32 CPU logits in
the native C kernel where it is built, else torch ops (each test that can tell runs both).
"""

import pytest
import torch
from helpers import assert_close_to

from fasthydra import uncertainty
from fasthydra import reference as R

IMPLS = [pytest.param("torch", marks=pytest.mark.cpu), pytest.param("triton", marks=pytest.mark.interpret)]
OUTPUTS = ("probs", "total", "aleatoric", "epistemic")


@pytest.fixture(params=["native", "torch-ops"])
def backward(request, monkeypatch):
    """The backward's two CPU forms for fp32 logits: the native C kernel (where it is built) and the torch ops
    (FASTHYDRA_NATIVE=0; what 16-bit and fp64 logits and GPUs take)."""
    import fasthydra.ops.native as native

    if request.param == "native":
        monkeypatch.delenv("FASTHYDRA_NATIVE", raising=False)
        if native.status() != "ok":
            pytest.skip(f"native kernel: {native.status()}")
    else:
        monkeypatch.setenv("FASTHYDRA_NATIVE", "0")
    return request.param


def _logits(shape, seed, dtype=torch.float32, masked=True, scale=2.5):
    """Random logits; masked: class 2 is -inf in every head of row 0 and class 4 in head 0 of row 1."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if masked:
        flat = z.view(-1, *shape[-2:])
        flat[0, :, 2] = float("-inf")
        if flat.shape[0] > 1:
            flat[1, 0, 4 % shape[-1]] = float("-inf")
    return z.to(dtype)


def _upstream(u, seed, which):
    """Random upstream gradients for the outputs named in `which` (the others unused)."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(getattr(u, name).shape, generator=g, dtype=torch.float64) for name in which}


def _grad(z, temperature, impl, ups):
    """dL/dz for L = sum over the chosen outputs of <output, upstream>, from fasthydra (impl) or the reference
    (impl None, in float64 on the same values)."""
    leaf = z.detach().clone().requires_grad_(True)
    if impl is None:
        flat = leaf.double().reshape(-1, *z.shape[-2:])
        u = R.uncertainty_ref(flat, temperature)
        u = type(u)(u.probs.reshape(*z.shape[:-2], z.shape[-1]), *(v.reshape(z.shape[:-2]) for v in u[1:]))
    else:
        u = uncertainty(leaf, temperature, impl=impl)
    loss = sum((getattr(u, name).double() * up).sum() for name, up in ups.items())
    return torch.autograd.grad(loss, leaf)[0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", [("probs",), ("total",), ("aleatoric",), ("epistemic",), OUTPUTS],
                         ids=["probs", "total", "aleatoric", "epistemic", "all"])
@pytest.mark.parametrize("shape, temperature", [((6, 3, 9), 1.0), ((5, 4, 40), 2.5), ((2, 3, 4, 7), 0.7),
                                                ((3, 3, 5000), 1.3)],
                         ids=["B,M,C", "long-T", "B,T,M,C", "long-rows"])
def test_gradient_of_each_output_matches_float64(impl, which, shape, temperature, backward):
    z = _logits(shape, seed=len(which) * 7 + shape[-1])
    ups = _upstream(uncertainty(z), seed=3, which=which)
    got = _grad(z, temperature, impl, ups)
    want = _grad(z, temperature, None, ups)
    assert got.dtype == z.dtype and got.shape == z.shape
    assert not torch.isnan(want).any()
    assert_close_to(got, want, rtol=2e-5, atol=1e-7, what=f"d/dz of {'+'.join(which)}")
    masked = torch.isneginf(z)
    assert bool((got[masked] == 0).all()), "a masked class must get a zero gradient"
    assert got.abs().max() > 0
    # an upstream gradient as large as a loss scaler's makes no inf * 0 on the masked classes
    big = _grad(z, temperature, impl, {name: up * 1e12 for name, up in ups.items()})
    assert_close_to(big, want * 1e12, rtol=2e-5, atol=1e-7 * 1e12, what="scaled by 1e12")


@pytest.mark.parametrize("impl", IMPLS)
def test_one_head_epistemic_has_no_gradient(impl, backward):
    """One head: epistemic is 0 identically, so its gradient is ~0, and total's equals aleatoric's."""
    z = _logits((7, 1, 11), seed=5)
    g_epi = _grad(z, 1.5, impl, {"epistemic": torch.ones(7, dtype=torch.float64)})
    assert g_epi.abs().max() <= 1e-6
    g_tot = _grad(z, 1.5, impl, {"total": torch.ones(7, dtype=torch.float64)})
    g_ale = _grad(z, 1.5, impl, {"aleatoric": torch.ones(7, dtype=torch.float64)})
    assert_close_to(g_tot, g_ale.double(), rtol=1e-5, atol=1e-7, what="total vs aleatoric, one head")
    assert g_tot.abs().max() > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_logits(impl, dtype):
    """Gradients in the logits' dtype, computed in fp32: within a 16-bit rounding of the float64 gradient."""
    z = _logits((8, 3, 17), seed=11, dtype=dtype)
    ups = _upstream(uncertainty(z.float()), seed=4, which=OUTPUTS)
    got = _grad(z, 1.0, impl, ups)
    assert got.dtype == dtype
    assert_close_to(got, _grad(z, 1.0, None, ups), rtol=1e-2, atol=1e-4, what=f"{dtype} gradient")


@pytest.mark.cpu
def test_gradcheck_and_gradgradcheck_float64():
    """torch.autograd.gradcheck of all four outputs (finite differences), and the second order: the backward is
    differentiable torch ops."""
    z = _logits((4, 3, 6), seed=2, dtype=torch.float64, masked=False).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: tuple(uncertainty(a, 1.3, impl="torch")), (z,))
    assert torch.autograd.gradgradcheck(lambda a: tuple(uncertainty(a, 1.3, impl="torch")), (z,))


@pytest.mark.cpu
def test_backward_in_row_chunks(monkeypatch):
    """The eager backward's torch ops in chunks of a few rows give the one-chunk result."""
    import fasthydra.ops.uncertainty as unc

    monkeypatch.setenv("FASTHYDRA_NATIVE", "0")

    z = _logits((13, 3, 10), seed=8)
    ups = _upstream(uncertainty(z), seed=6, which=OUTPUTS)
    whole = _grad(z, 2.0, "torch", ups)
    monkeypatch.setattr(unc, "TORCH_CHUNK_ELEMENTS", 3 * 3 * 10)  # 3 rows a chunk: 5 chunks
    chunked = _grad(z, 2.0, "torch", ups)
    assert_close_to(chunked, whole.double(), rtol=1e-6, atol=1e-9, what="chunked backward")


@pytest.mark.parametrize("impl", IMPLS)
def test_nothing_kept_without_a_gradient(impl):
    """Evaluation (no_grad, or logits that do not require grad): outputs without a graph. With a gradient wanted,
    every output requires grad."""
    z = _logits((4, 2, 5), seed=1)
    assert not any(v.requires_grad for v in uncertainty(z, impl=impl))
    leaf = z.clone().requires_grad_(True)
    with torch.no_grad():
        assert not any(v.requires_grad for v in uncertainty(leaf, impl=impl))
    assert all(v.requires_grad for v in uncertainty(leaf, impl=impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_gradient_matches_eager(impl):
    """torch.compile(fullgraph=True) of a penalty on the epistemic part and the mixture: the custom op's
    registered backward (on the Triton path a custom op of its own), the same gradient as eager."""
    z = _logits((6, 3, 8), seed=9)
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))

    def penalty(a):
        u = uncertainty(a, 1.5, impl=impl)
        return u.epistemic.mean() - (u.probs * w).sum()

    eager_leaf, compiled_leaf = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    penalty(eager_leaf).backward()
    torch.compile(penalty, fullgraph=True, backend="aot_eager")(compiled_leaf).backward()
    assert_close_to(compiled_leaf.grad, eager_leaf.grad.double(), rtol=1e-5, atol=1e-8, what="compiled gradient")


@pytest.mark.parametrize("impl", IMPLS)
def test_ascent_on_epistemic_makes_the_heads_disagree(impl):
    """A few steps of gradient ascent on the mean epistemic uncertainty (an outlier-exposure style term) raise
    it several fold from nearly agreeing heads: the gradient has the right sign and size."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(16, 1, 10, generator=g) + 0.05 * torch.randn(16, 4, 10, generator=g)).requires_grad_(True)
    start = uncertainty(z.detach(), impl=impl).epistemic.mean().item()
    opt = torch.optim.SGD([z], lr=20.0)
    for _ in range(20):
        opt.zero_grad()
        (-uncertainty(z, impl=impl).epistemic.mean()).backward()
        opt.step()
    end = uncertainty(z.detach(), impl=impl).epistemic.mean().item()
    assert end > 5 * start, f"epistemic {start:.4g} -> {end:.4g}"


@pytest.mark.cpu
def test_torch_func_grad_matches_autograd():
    """Under torch.func the op runs as the reference's torch ops: torch.func.grad of a loss of uncertainty gives
    the autograd gradient of the op (masked classes included: 0, not NaN)."""
    z = _logits((5, 3, 9), seed=12)

    def loss(a):
        u = uncertainty(a, 1.2)
        return u.epistemic.sum() + 0.3 * u.aleatoric.sum() - u.probs[:, 0].sum()

    leaf = z.clone().requires_grad_(True)
    loss(leaf).backward()
    transformed = torch.func.grad(loss)(z)
    assert not torch.isnan(transformed).any()
    assert_close_to(transformed, leaf.grad.double(), rtol=1e-5, atol=1e-7, what="torch.func.grad")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 4, 13), (3, 2, 9000)], ids=["odd", "long-rows"])
def test_gradient_on_cuda(dtype, shape):
    """The Triton forward on a GPU, the backward's torch ops there, under sync-debug "error" (no host sync):
    against the float64 reference on the CPU."""
    z = _logits(shape, seed=21, dtype=dtype)
    ups = _upstream(uncertainty(z.float()), seed=22, which=OUTPUTS)
    leaf = z.cuda().requires_grad_(True)
    on_device = {n: up.cuda() for n, up in ups.items()}  # (copies from the host synchronise: before the mode)
    torch.cuda.set_sync_debug_mode("error")
    try:
        u = uncertainty(leaf, 1.5, impl="triton")
        loss = sum((getattr(u, n).double() * up).sum() for n, up in on_device.items())
        (got,) = torch.autograd.grad(loss, leaf)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rtol, atol = (2e-5, 1e-7) if dtype == torch.float32 else (1e-2, 1e-4)
    assert_close_to(got, _grad(z, 1.5, None, ups), rtol=rtol, atol=atol, what=f"{dtype} on cuda")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("c", [6, 9000], ids=["row-in-registers", "row-in-tiles"])
def test_a_nan_logit_poisons_only_its_row(impl, backward, c):
    """NaN logits give NaN outputs and NaN gradients in their row, as eager's; the other rows keep theirs."""
    z = _logits((4, 3, c), seed=13, masked=False)
    bad = z.clone()
    bad[2, 1, 3] = float("nan")
    u = uncertainty(bad, impl=impl)
    for name, v in zip(u._fields, u):  # (a clamp at 0 that dropped NaN would give epistemic 0 here)
        assert torch.isnan(v[2]).all() and not torch.isnan(v[[0, 1, 3]]).any(), name
    ups = _upstream(uncertainty(z), seed=2, which=OUTPUTS)
    got = _grad(bad, 1.0, impl, ups)
    assert torch.isnan(got[2]).all()
    keep = [0, 1, 3]
    assert_close_to(got[keep], _grad(z, 1.0, None, ups)[keep], rtol=2e-5, atol=1e-7, what="rows without NaN")


@pytest.mark.parametrize("impl", IMPLS)
def test_confident_heads_keep_eager_precision(impl, backward):
    """|z / T| ~ 100 (logits of scale 30 at T = 0.3): the gradient within DESIGN's rule of eager float32's error
    against float64 (log p formed as (s - max) - log d; as max + log d subtracted from s it was 30x eager's)."""
    from helpers import tolerance_rule

    z = _logits((3, 4, 100), seed=31, masked=False, scale=30.0)
    ups = _upstream(uncertainty(z), seed=7, which=("total", "aleatoric", "epistemic"))
    want = _grad(z, 0.3, None, ups)
    eager_leaf = z.clone().requires_grad_(True)
    u = R.uncertainty_ref(eager_leaf, 0.3)
    (eager,) = torch.autograd.grad(sum((getattr(u, n).double() * up).sum() for n, up in ups.items()), eager_leaf)
    tolerance_rule(_grad(z, 0.3, impl, ups), eager, want, atol=2e-6, what="confident heads")
