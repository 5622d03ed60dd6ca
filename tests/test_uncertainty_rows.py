"""`uncertainty`'s rows that test the kernels' arithmetic, on every path and tier, and on both row walks of the
Triton kernels (a row held whole in registers; tiles: the forward's per-thread statistics and the backward's
three passes): masked classes, heads left with one class, a NaN logit beside masked classes, and confident heads
with large logits.

A masked class (-inf) has probability 0 in its head and contributes nothing to any entropy: the kernels' terms
exp(s - max) (s - max) are 0 * -inf there, which must count as 0, not NaN (the Triton forward gave a NaN
aleatoric part for every row with a masked class until the thirty-sixth session). A head left with one class, and
rows where every head is, have entropy 0 exactly: the kernels take each row's difference from its raw maximum
before the 1/T scale, so the shift is exactly 0 however the compiler contracts (T = 3: 1/T rounds). With large
logits that difference is exact near the maximum, so values and gradients keep eager's digits (the forward that
held a row in registers formed log q as s - (max + log d) and carried the rounding of |s|: 4x eager's error in P
and 15x in the epistemic part at |z / T| up to ~440).

cpu tier: the torch path (the native C kernel where it is built); interpret tier: the Triton kernels under
TRITON_INTERPRET=1; gpu tier: the same kernels compiled.
"""

import pytest
import torch
from helpers import assert_close_to, tolerance_rule

from fasthydra import reference as R
from fasthydra import uncertainty
from fasthydra.ops import _common

T = 3.0
TARGETS = [pytest.param("torch", "cpu", marks=pytest.mark.cpu, id="torch-cpu"),
           pytest.param("triton", "cpu", marks=pytest.mark.interpret, id="triton-interpret"),
           pytest.param("triton", "cuda", marks=pytest.mark.gpu, id="triton-gpu")]
OUTPUTS = ("probs", "total", "aleatoric", "epistemic")


@pytest.fixture(params=["row-whole", "tiles-of-64", "tiles-of-64-spread", "tiles-of-64-split",
                        "tiles-of-64-split-one-block"])
def walk(request, monkeypatch):
    """The kernels' two row walks: the defaults (these rows held whole) and 64-element tiles (the forward's
    per-thread statistics over 16-byte slices, the backward's tiled passes), those also in spread slices (forced,
    as test_spread_slices describes), and the forward's long rows in two launches (_common.UNCERTAINTY_SPLIT:
    each (row, head)'s statistics, then the mixture by (row, class block) programs): 4 blocks a row here, whose
    partial sums each row's last program adds, and one block a row (STREAM_PROGRAMS 1)."""
    if "split" in request.param:
        monkeypatch.setattr(_common, "UNCERTAINTY_SPLIT", True)
        if request.param.endswith("one-block"):
            monkeypatch.setattr(_common, "STREAM_PROGRAMS", 1)
    if request.param.endswith("spread"):
        monkeypatch.setattr(_common, "spread_slices", lambda cfg, vec, n_cols, *rows: not cfg.get("ROW_IN_REGISTERS"))
    if request.param != "row-whole":
        for name in ("UNCERTAINTY_TILE_MAX", "UNCERTAINTY_LONG_TILE", "UNCERTAINTY_GRAD_ROW_MAX",
                     "UNCERTAINTY_GRAD_TILE"):
            monkeypatch.setattr(_common, name, 64)
        assert not _common.uncertainty_config(3, 50, 7)["ROW_IN_REGISTERS"]
        assert not _common.uncertainty_grad_config(3, 50)["ROW_IN_REGISTERS"]
    if "split" in request.param:
        assert _common.uncertainty_split_config(3, 50, 7)["col_blocks"] == (1 if "one-block" in request.param else 4)
    return request.param


def _masked_logits(device):
    """(7, 3, 50) fp32 logits of ~10 (so that 1/T's rounding would show) with masked classes: row 0 a class
    every head masks, row 1 one head's class, row 2 one head left with a single class, row 3 every other class
    in every head, row 4 every head left with class 0 only (nothing uncertain), rows 5 and 6 none."""
    g = torch.Generator().manual_seed(36)
    z = torch.randn(7, 3, 50, generator=g, dtype=torch.float64) * 10
    z[0, :, 7] = float("-inf")
    z[1, 0, 3] = float("-inf")
    z[2, 1, 1:] = float("-inf")
    z[3, :, ::2] = float("-inf")
    z[4, :, 1:] = float("-inf")
    return z.float().to(device)


@pytest.mark.parametrize("impl,device", TARGETS)
def test_values_match_float64(impl, device, walk):
    z = _masked_logits(device)
    got = uncertainty(z, T, impl=impl)
    want = R.uncertainty_ref(z.double().cpu(), T)
    for name in OUTPUTS:
        value = getattr(got, name)
        assert not torch.isnan(value).any(), f"{name}: NaN from a masked class"
        assert_close_to(value, getattr(want, name), rtol=1e-5, atol=1e-6, what=name)
    # nothing uncertain in row 4: entropies 0 and P one-hot, exactly (up to 1e-12)
    for name in ("total", "aleatoric", "epistemic"):
        assert_close_to(getattr(got, name)[4], torch.zeros((), dtype=torch.float64), rtol=0.0, atol=1e-12,
                        what=f"{name} of a row with one class left")
    assert_close_to(got.probs[4], torch.nn.functional.one_hot(torch.tensor(0), 50).double(), rtol=0.0, atol=1e-12,
                    what="P of a row with one class left")
    assert (got.probs[torch.isneginf(z).all(dim=1)] == 0).all(), "a class every head masks has P = 0"


def _upstream(b, c, seed):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g, dtype=torch.float64)
            for name, shape in (("probs", (b, c)), ("total", (b,)), ("aleatoric", (b,)), ("epistemic", (b,)))}


def _grad(leaf, run, ups):
    u = run(leaf)
    loss = sum((getattr(u, name).double() * up.to(leaf.device)).sum() for name, up in ups.items())
    return torch.autograd.grad(loss, leaf)[0]


@pytest.mark.parametrize("impl,device", TARGETS)
def test_gradient_matches_float64(impl, device, walk):
    z = _masked_logits(device)
    ups = _upstream(7, 50, seed=7)
    got = _grad(z.clone().requires_grad_(), lambda a: uncertainty(a, T, impl=impl), ups)
    want = _grad(z.double().cpu().requires_grad_(), lambda a: R.uncertainty_ref(a, T), ups)
    assert not torch.isnan(want).any()
    assert_close_to(got, want, rtol=2e-5, atol=1e-7, what="d/dz")
    assert (got[torch.isneginf(z)] == 0).all(), "a masked class gets a zero gradient"
    # row 4 (each head's softmax is 1 at class 0 whatever its logit) and row 2's head 1: no gradient at all
    assert_close_to(got[4], torch.zeros(3, 50, dtype=torch.float64), rtol=0.0, atol=1e-12, what="row 4")
    assert_close_to(got[2, 1], torch.zeros(50, dtype=torch.float64), rtol=0.0, atol=1e-12, what="row 2, head 1")


@pytest.mark.parametrize("impl,device", TARGETS)
def test_confident_heads_with_large_logits_keep_eagers_digits(impl, device, walk):
    """|z / T| up to ~440 at T = 0.3, one class far ahead: values and gradient within twice eager float32's error
    against float64 (plus 2e-7 of their size)."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(16, 4, 100, generator=g, dtype=torch.float64) * 30
    z[:, :, 5] += 60
    temperature = 0.3
    got = uncertainty(z.float().to(device), temperature, impl=impl)
    eager = R.uncertainty_ref(z.float(), temperature)
    exact = R.uncertainty_ref(z, temperature)
    for name in OUTPUTS:
        want = getattr(exact, name)
        tolerance_rule(getattr(got, name), getattr(eager, name), want, 2e-7 * want.abs().max().item(), what=name)
    ups = _upstream(16, 100, seed=4)
    got_g = _grad(z.float().to(device).requires_grad_(), lambda a: uncertainty(a, temperature, impl=impl), ups)
    eager_g = _grad(z.float().requires_grad_(), lambda a: R.uncertainty_ref(a, temperature), ups)
    exact_g = _grad(z.clone().requires_grad_(), lambda a: R.uncertainty_ref(a, temperature), ups)
    tolerance_rule(got_g, eager_g, exact_g, 2e-7 * exact_g.abs().max().item(), what="d/dz")


@pytest.mark.parametrize("impl,device", TARGETS)
def test_a_nan_logit_beside_masked_classes_poisons_only_its_row(impl, device, walk):
    """A NaN logit makes its row's outputs and gradient NaN (as eager's), also where the row has masked classes
    (the masked-class term must not drop it: on a GPU a maximum skips NaN), and leaves the other rows alone."""
    z = _masked_logits(device)
    z[3, 1, 5] = float("nan")  # row 3: every other class masked (class 5 is one of the kept ones)
    z = z.requires_grad_()
    u = uncertainty(z, T, impl=impl)
    for name in OUTPUTS:
        v = getattr(u, name)
        assert torch.isnan(v[3]).all() and not torch.isnan(v[[0, 1, 2, 4, 5, 6]]).any(), name
    (g,) = torch.autograd.grad(sum(getattr(u, name).sum() for name in OUTPUTS), z)
    assert torch.isnan(g[3]).all() and not torch.isnan(g[[0, 1, 2, 4, 5, 6]]).any()
