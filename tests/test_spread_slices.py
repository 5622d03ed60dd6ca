"""Spread per-thread slices (kernels/softmax_kl._thread_slices): the long-row walks of the loss kernels, of
`uncertainty` and of the Hinton target on rows Triton cannot prove 16-byte aligned (C not a multiple of 16, a
row stride that is not, a pointer off 16 bytes: a vocabulary of 50257 classes). There a thread's VEC contiguous
classes loaded one class a lane and every tile's sums over VEC took shuffles (sm_90 SASS: 120 shuffles and 639
instructions a tile in the loss kernel's first pass at C = 50257 bf16); spread slices hold VEC classes THREADS apart
in each thread, loaded coalesced across the lanes and summed inside the thread (242 instructions, no shuffle).

cpu tier: the rule (ops/_common.spread_slices) and the configurations the launchers pick at GPU sizes; interpret
tier: every walk that takes spread slices against the float64 reference, at the launchers' own configurations (rows
of 1100 to 16512 classes in tiles of 512 to 2048, the last one partial); gpu tier: the compiled spread walks at
C = 50257 against eager and float64 (DESIGN's tolerance rule).
The tests of masked classes run spread walks too (conftest's `classes`, test_uncertainty_rows' `walk`).
"""

import pytest
import torch
from helpers import assert_close_to, teacher_logits, tolerance_rule

from fasthydra import TopKTeacher, hinton_kl_loss, hydra_kl_loss, uncertainty
from fasthydra import reference as R
from fasthydra.ops import _common
from fasthydra.ops.hydra_kl import topk_config

T = 2.0


def _cfg(block_c=2048, warps=8, in_registers=False):
    return {"BLOCK_C": block_c, "num_warps": warps, "ROW_IN_REGISTERS": in_registers}


@pytest.mark.cpu
def test_the_rule_follows_what_triton_can_prove_aligned():
    rows = torch.empty(4, 3, 64)
    assert not _common.spread_slices(_cfg(), 8, 64, rows, rows)  # aligned everywhere: contiguous 16-byte loads
    assert _common.spread_slices(_cfg(), 8, 50257)  # C
    assert _common.spread_slices(_cfg(), 8, 64, rows, torch.empty(4, 3, 72)[..., :64])  # a row stride of 72
    assert _common.spread_slices(_cfg(), 8, 64, rows, torch.empty(4 * 3 * 64 + 1)[1:].view(4, 3, 64))  # 4 bytes off
    assert not _common.spread_slices(_cfg(), 8, 64, rows, None)  # an absent tensor
    assert not _common.spread_slices(_cfg(), 8, 64, torch.empty(4, 1, 64).expand(4, 3, 64))  # a broadcast (stride 0)
    # never for a row held in registers (no walk), nor where the program has more threads than slices (a thread's
    # classes would span warps)
    assert not _common.spread_slices(_cfg(in_registers=True), 8, 50257)
    assert not _common.spread_slices(_cfg(block_c=1024, warps=8), 8, 50257)
    assert _common.spread_slices(_cfg(block_c=1024, warps=4), 8, 50257)


@pytest.mark.cpu
@pytest.mark.parametrize("elem_size", [2, 4])
def test_long_unaligned_rows_take_spread_slices_at_gpu_sizes(elem_size):
    """The configurations the launchers pick for a (4096, 8, 50257) problem (and `uncertainty`'s forward at 4096
    rows) allow spread slices: the loss kernels' walks, `uncertainty`'s forward and the Hinton target's. Not
    `uncertainty`'s forward in 32 warps (few rows: warps would hold a thread's classes), nor its backward, whose
    half tiles on unaligned rows (ops/_common.head_slices_config) have more threads than slices."""
    vec = 16 // elem_size
    c = 50257
    kl = _common.kl_rows_config(c, elem_size)
    assert not kl["ROW_IN_REGISTERS"] and _common.spread_slices(kl, vec, c)
    for extra in (True, False):  # a teacher that requires grad or a student bias; neither
        assert _common.spread_slices(_common.kl_rows_config(c, elem_size, extra), vec, c)
    tk = topk_config(c, 128)
    assert _common.spread_slices(tk, min(tk["BLOCK_C"], vec), c)
    fwd = _common.uncertainty_config(8, c, 4096)
    assert _common.spread_slices(fwd, min(fwd["BLOCK_C"], vec), c)
    assert not _common.spread_slices(_common.uncertainty_config(8, c, 64), vec, c)  # 32 warps
    target = _common.uncertainty_config(8, c, hinton_target=True, elem_size=elem_size)
    assert _common.spread_slices(target, target["VEC"], c)
    grad = _common.uncertainty_grad_config(8, c, elem_size)
    assert not _common.spread_slices(grad, grad["VEC"], c)


@pytest.fixture
def spy(monkeypatch):
    """The verdicts of spread_slices at the launches that follow."""
    seen = []
    rule = _common.spread_slices

    def recording(*args):
        seen.append(rule(*args))
        return seen[-1]

    monkeypatch.setattr(_common, "spread_slices", recording)
    return seen


def _logits(b, m, c, dtype, seed, scale=4.0, masked=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, m, c, generator=g, dtype=torch.float64) * scale
    if masked:
        z[0, 0, c // 3] = float("-inf")  # a masked class (the student's and the teacher's: the same class)
    return z.to(dtype)


def _tolerances(dtype):
    return (2e-5, 1e-7) if dtype == torch.float32 else (2e-2, 1e-4)


def _assert_loss_and_student_gradient(loss, grad, x0, reference, dtype):
    """loss and its gradient against reference(x0 in float64) and its gradient, at _tolerances(dtype)."""
    x64 = x0.double().requires_grad_()
    ref = reference(x64)
    (grad_ref,) = torch.autograd.grad(ref, [x64])
    rtol, atol = _tolerances(dtype)
    assert_close_to(loss, ref, rtol=rtol, atol=atol, what="loss")
    assert_close_to(grad, grad_ref, rtol=rtol, atol=atol * 1e-2, what="student gradient")


def _misaligned_copy(t):
    """t's values in a tensor whose rows start 4 bytes off a 16-byte boundary (a view into a larger buffer)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("c,misaligned", [(16500, False), (16512, True)], ids=["C=16500", "C=16512-pointer-off"])
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["frozen-teacher", "teacher-requires-grad"])
def test_hydra_loss_on_spread_rows(dtype, c, misaligned, teacher_grad, spy):
    """hydra_kl_loss forward and backward on rows too long for registers (past 16384 classes) that are not 16-byte
    aligned, at the launcher's own configuration (2048-class tiles in 8 warps), against float64."""
    b, m = 3, 2
    z0, t0 = _logits(b, m, c, dtype, 1), _logits(b, m, c, dtype, 2)
    z = (_misaligned_copy(z0) if misaligned else z0.clone()).requires_grad_()
    t = t0.clone().requires_grad_(teacher_grad)
    loss = hydra_kl_loss(z, t, T, impl="triton")
    grads = torch.autograd.grad(loss, [z, t] if teacher_grad else [z])
    assert spy and all(spy), spy
    z64, t64 = z0.double().requires_grad_(), t0.double().requires_grad_(teacher_grad)
    ref = R.hydra_kl_loss_ref(z64, t64, T)
    refs = torch.autograd.grad(ref, [z64, t64] if teacher_grad else [z64])
    rtol, atol = _tolerances(dtype)
    assert_close_to(loss, ref, rtol=rtol, atol=atol, what="loss")
    for got, want, name in zip(grads, refs, ("student", "teacher")):
        assert_close_to(got, want, rtol=rtol, atol=atol * 1e-2, what=f"{name} gradient")


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_topk_loss_on_spread_rows(dtype, spy):
    b, m, c, k = 3, 2, 2100, 32
    z0 = _logits(b, m, c, dtype, 3)
    values, indices = (_logits(b, m, c, torch.float32, 4) + 1).topk(k, dim=-1)
    teacher = TopKTeacher(values.to(dtype), indices)
    z = z0.clone().requires_grad_()
    loss = hydra_kl_loss(z, teacher, T, impl="triton")
    (gz,) = torch.autograd.grad(loss, [z])
    assert spy and all(spy), spy
    dense = TopKTeacher(teacher.values.double(), indices).densify(c)
    _assert_loss_and_student_gradient(loss, gz, z0, lambda z64: R.hydra_kl_loss_ref(z64, dense, T), dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_uncertainty_and_its_gradient_on_spread_rows(dtype, spy, monkeypatch):
    """`uncertainty`'s forward in spread slices (its per-thread pass 1 at 4096 rows' configuration: 4 warps) on rows
    of 8 heads x 1100 classes, past the forward's registers, and its backward there (contiguous slices: see above;
    the forced spread walks of test_uncertainty_rows run its pass 1 spread)."""
    monkeypatch.setattr(_common, "FILL_WARPS", 4 * 4)  # the warps of a many-row launch, for these 4 rows
    b, m, c = 4, 8, 1100
    z0 = _logits(b, m, c, dtype, 5)
    z = z0.clone().requires_grad_()
    out = uncertainty(z, T, impl="triton")
    g = torch.Generator().manual_seed(6)
    ups = [torch.rand(o.shape, generator=g, dtype=torch.float64) for o in out]
    (gz,) = torch.autograd.grad([o for o in out], [z], [u.to(dtype) for u in ups])
    assert spy == [True, False], spy
    z64 = z0.double().requires_grad_()
    ref = R.uncertainty_ref(z64, T)
    (gz_ref,) = torch.autograd.grad(list(ref), [z64], ups)
    rtol, atol = _tolerances(dtype)
    for got, want, name in zip(out, ref, ("probs", "total", "aleatoric", "epistemic")):
        assert_close_to(got, want, rtol=rtol, atol=atol * 10, what=name)
    assert_close_to(gz, gz_ref, rtol=rtol * 10, atol=atol, what="logits gradient")


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hinton_loss_on_spread_rows(dtype, spy):
    """The Hinton target's kernel (pass 1 per thread over 8 members) and the loss on it (rows past 16384 classes)."""
    b, m, c = 2, 8, 16500
    s0, t0 = _logits(b, 1, c, dtype, 7, masked=False)[:, 0], _logits(b, m, c, dtype, 8)
    s = s0.clone().requires_grad_()
    loss = hinton_kl_loss(s, t0, T, impl="triton")
    (gs,) = torch.autograd.grad(loss, [s])
    assert spy and all(spy), spy
    _assert_loss_and_student_gradient(loss, gs, s0, lambda s64: R.hinton_kl_loss_ref(s64, t0.double(), T), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_spread_walks_on_the_gpu(dtype, spy, monkeypatch):
    """The loss on logits (frozen teacher: both passes of the walk) and `uncertainty`'s forward (in a large
    batch's 4 warps) compiled for the GPU at C = 50257, within the tolerance rule of eager in the dtype and float64."""
    b, m, c = 16, 2, 50257
    z = (torch.randn(b, m, c, device="cuda") * 3).to(dtype).requires_grad_()
    t = teacher_logits(b, m, c, device="cuda", dtype=dtype)
    loss = hydra_kl_loss(z, t, 1.5, impl="triton")
    (g,) = torch.autograd.grad(loss, z)
    assert spy == [True], spy
    eager = R.hydra_kl_loss_ref(z, t, 1.5)
    (ge,) = torch.autograd.grad(eager, z)
    z64 = z.detach().double().requires_grad_()
    exact = R.hydra_kl_loss_ref(z64, t.double(), 1.5)
    (gx,) = torch.autograd.grad(exact, z64)
    tolerance_rule(loss, eager, exact, 1e-6 * max(1.0, exact.abs().item()), what="loss")
    tolerance_rule(g, ge, gx, 1e-3 * gx.abs().max().item(), what="grad")

    monkeypatch.setattr(_common, "FILL_WARPS", 4 * 64)  # 4 warps for these 64 rows, as for 2048 and more
    x = torch.randn(64, 8, c, device="cuda").to(dtype)
    got = uncertainty(x, impl="triton")
    assert spy == [True, True], spy
    eager_u, exact_u = R.uncertainty_ref(x), R.uncertainty_ref(x.double())
    for name in ("probs", "total", "aleatoric", "epistemic"):
        tolerance_rule(getattr(got, name), getattr(eager_u, name), getattr(exact_u, name), 3e-6, what=name)
