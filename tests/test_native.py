"""cpu tier: the torch path's native row kernel (fasthydra/ops/csrc) against the float64 reference,
and its fallback to torch ops. The numerical tests run each build the `isa` fixture (conftest.py) gives: this
host's, and those of the other x86 levels it can run (baseline x86-64, AVX2 + FMA)."""

import math
import os
import platform
import re
import shutil
import subprocess

import pytest
import torch
from helpers import assert_close_to, params_of, reference_loss_and_grads, teacher_logits

import fasthydra.ops.native as native
from fasthydra import HydraHead, hydra_kl_loss
from fasthydra import reference as R

pytestmark = pytest.mark.cpu

needs_native = pytest.mark.skipif(native.status() != "ok", reason=f"native kernel: {native.status()}")


@pytest.fixture
def threads_set():
    """set(n) sets torch's thread count for the rest of the test; the count before is restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("rows,c", [(7, 1), (5, 13), (200, 10), (300, 1000), (64, 4097), (0, 10)])
@pytest.mark.parametrize("temperature", [0.5, 2.0, 20.0])
def test_kernel_matches_reference(isa, rows, c, temperature):
    s = torch.randn(rows, c) * 4
    t = torch.randn(rows, c) * 4
    if rows > 2 and c > 2:
        t[1, : c // 2] = float("-inf")  # a long masked stretch
        t[2, -1] = float("-inf")
    loss, grad, _ = native.kl_rows(s / temperature, t, temperature, True)
    ref = R.kl_rows_ref(s.double(), t.double(), temperature)
    q = torch.softmax(s.double() / temperature, -1)
    p = torch.softmax(t.double() / temperature, -1)
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-6, what="loss")
    assert_close_to(grad, q - p, rtol=2e-6, atol=1e-7, what="grad")
    loss_only, none, _ = native.kl_rows(s / temperature, t, temperature, False)  # its own two-sweep form
    assert none is None
    assert_close_to(loss_only, ref, rtol=2e-6, atol=1e-6, what="loss alone")


@needs_native
@pytest.mark.parametrize("rows,c", [(7, 1), (5, 13), (70, 20), (9, 40), (64, 1000), (0, 10)])
@pytest.mark.parametrize("scale", [4.0, 1e3])
def test_kernel_teacher_gradient_matches_float64_autograd(isa, rows, c, scale):
    """p * ((log p - log q) - KL) from the C kernel, masked classes 0, extreme logits included: rows on their side
    (13 classes: float sums; 20, in two blocks, and 40: double sums) and whole (1000 classes)."""
    s = torch.randn(rows, c) * scale
    t = torch.randn(rows, c) * scale
    if rows > 2 and c > 2:
        t[1, : c // 2] = float("-inf")
    loss, grad, tgrad = native.kl_rows(s / 2.0, t, 2.0, True, True)
    t64 = t.double().requires_grad_()
    ref = R.kl_rows_ref(s.double(), t64, 2.0)
    (expected,) = torch.autograd.grad(ref.sum(), t64)  # dL/dt = T * p * (...): the kernel's term is unscaled
    assert_close_to(tgrad * 2.0, expected, rtol=2e-5, atol=1e-7, what="teacher grad")
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-6 * scale, what="loss")
    _, none, _ = native.kl_rows(s / 2.0, t, 2.0, False, True)  # the teacher's gradient alone
    assert none is None
    # each gradient under its own scale (the heads' path: q - p unscaled, the teacher's times T * coefficient)
    _, grad3, tgrad5 = native.kl_rows(s / 2.0, t, 2.0, True, True, out_scale=3.0, tgrad_scale=10.0)
    assert_close_to(grad3, grad * 3.0, rtol=1e-6, atol=0.0, what="q - p times out_scale")
    assert_close_to(tgrad5, expected * 5.0, rtol=2e-5, atol=1e-6, what="teacher grad times tgrad_scale")


@needs_native
@pytest.mark.parametrize("want_grad,want_tgrad", [(True, False), (False, False), (True, True), (False, True)],
                         ids=["short-rows", "loss-alone", "teacher-grad", "teacher-grad-alone"])
@pytest.mark.parametrize("temperature", [0.3, 3.0])
def test_one_class_rows_give_zero_loss_and_gradients(isa, want_grad, want_tgrad, temperature):
    """C = 1: KL and both gradients are 0 whatever the logits. Each kernel shifts a row by its maximum before it
    scales it by 1 / T, so the shift is exactly 0 whether or not the compiler contracts a product and a
    difference into one FMA (gcc does under -march=native on FMA hosts; scaled first, the row with a teacher
    gradient came out at 1e-7 there, past the random sweep's absolute tolerance)."""
    s = torch.randn(40, 3, 1) * 10
    t = torch.randn(40, 3, 1) * 10
    zero = torch.zeros(40, 3, 1, dtype=torch.float64)
    for s_scale, student in ((1.0 / temperature, s), (1.0, s / temperature)):  # raw (the heads' path) or tempered
        loss, grad, tgrad = native.kl_rows(student.clone(), t, temperature, want_grad, want_tgrad, s_scale=s_scale)
        what = f"s_scale={s_scale:.3g}"
        assert_close_to(loss, zero[..., 0], rtol=0.0, atol=1e-12, what=f"{what} loss")
        for name, g, wanted in (("grad", grad, want_grad), ("teacher grad", tgrad, want_tgrad)):
            assert (g is not None) == wanted, name
            if wanted:
                assert_close_to(g, zero, rtol=0.0, atol=1e-12, what=f"{what} {name}")


@needs_native
@pytest.mark.parametrize("c", [50, 33, 9], ids=["long-rows", "short-rows-past-16", "short-rows"])
def test_kernel_extreme_logits_and_strided_rows_written_in_place(isa, c):
    """q - p is written over the student rows the caller gives up (no second chunk-sized buffer), also
    through a row stride that is not C; every row's logits are read before its gradient lands there."""
    base = torch.randn(40, 2, c) * 1e4
    s = base[:, 0]  # row stride 2C: not contiguous rows
    t = torch.randn(40, c) * 1e4
    expected_loss = R.kl_rows_ref(s.double(), t.double(), 1.0)
    expected_grad = torch.softmax(s.double(), -1) - torch.softmax(t.double(), -1)
    other_rows = base[:, 1].clone()
    loss_only, _, _ = native.kl_rows(s.clone(), t, 1.0, False)
    assert_close_to(loss_only, expected_loss, rtol=1e-6, what="extreme, loss alone")
    loss, grad, _ = native.kl_rows(s, t, 1.0, True)
    assert grad.data_ptr() == s.data_ptr() and grad.stride() == s.stride()
    assert torch.equal(base[:, 1], other_rows)  # the rows between stay untouched
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close_to(loss, expected_loss, rtol=1e-6, what="extreme")
    assert_close_to(grad, expected_grad, rtol=1e-6, atol=1e-7, what="q - p in place")


@needs_native
@pytest.mark.parametrize("c", [50, 33, 9], ids=["long-rows", "short-rows-past-16", "short-rows"])
@pytest.mark.parametrize("want_grad", [False, True], ids=["loss-alone", "with-gradient"])
def test_kernel_rows_with_a_student_at_the_lowest_value(isa, c, want_grad):
    """Rows where the student sits at float32's lowest value on classes the teacher keeps (one below its maximum
    on every row, and on two rows a second class at its maximum): differences near 3.4e38, loss rows near 1e37 to
    1e38. Each row within 1e-5 of float64 and q - p close to it, on the long rows' lanes (scaled sums), on rows of
    33 classes on their side (double sums) and of 9 (float chains, scaled). 130 rows: the side path's blocks of
    64 and a block of 2."""
    lowest = torch.finfo(torch.float32).min
    g = torch.Generator().manual_seed(46)
    s = torch.randn(130, c, generator=g) * 3
    t = torch.randn(130, c, generator=g) * 2
    top = t.amax(-1)
    t[:, 2], s[:, 2] = top - 1.0, lowest
    t[:2, 4], s[:2, 4] = top[:2], lowest
    ref = R.kl_rows_ref(s.double(), t.double(), 1.0)
    assert ((ref > 1e35) & (ref < 3e38)).all()
    loss, grad, _ = native.kl_rows(s.clone(), t, 1.0, want_grad)
    assert torch.isfinite(loss).all()
    assert ((loss.double() - ref).abs() / ref).max().item() <= 1e-5
    if want_grad:
        expected = torch.softmax(s.double(), -1) - torch.softmax(t.double(), -1)
        assert_close_to(grad, expected, rtol=1e-6, atol=1e-7, what="q - p")


@needs_native
@pytest.mark.parametrize("c", [50, 33, 9], ids=["long-rows", "short-rows-past-16", "short-rows"])
@pytest.mark.parametrize("want_tgrad", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_reads_a_head_major_chunk_as_it_lies(isa, threads_set, c, want_tgrad, threads):
    """A (rows, heads, C) chunk laid out head-major (what a batched GEMM over heads gives, seen through a
    transpose) and a row-major teacher: no copy of either, q - p written in place, every (row, head)
    against float64. 303 rows: the short-row kernel's blocks of 64 and the parts of 3 threads begin inside a
    row's heads."""
    threads_set(threads)
    o, i = 101, 3
    s = (torch.randn(i, o, c) * 3).transpose(0, 1)  # (O, I, C) with strides (C, O*C, 1)
    t = torch.randn(o, i, c) * 3
    t[4, 2, : c // 2] = float("-inf")
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    ref = R.kl_rows_ref(s64.reshape(-1, c), t64.reshape(-1, c), 1.0).view(o, i)
    (expected_tgrad,) = torch.autograd.grad(ref.sum(), t64)
    expected_grad = (torch.softmax(s64, -1) - torch.softmax(t64, -1)).detach()
    loss, grad, tgrad = native.kl_rows(s, t, 1.0, True, want_tgrad)
    assert loss.shape == (o, i) and grad.data_ptr() == s.data_ptr() and grad.stride() == s.stride()
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-6, what="loss")
    assert_close_to(grad, expected_grad, rtol=2e-6, atol=1e-7, what="q - p")
    if want_tgrad:
        assert_close_to(tgrad, expected_tgrad, rtol=2e-5, atol=1e-7, what="teacher grad")
    else:
        assert tgrad is None


@needs_native
def test_module_fp32_native_and_fallback_agree_with_reference(monkeypatch):
    head = HydraHead(45, 13, 5, impl="torch")
    x = torch.randn(37, 45, requires_grad=True)
    t = teacher_logits(37, 5, 13)
    loss_ref, grads_ref = reference_loss_and_grads(head, x, t, 2.0)
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FASTHYDRA_NATIVE", flag)
        loss = head.distill_loss(x, t, 2.0)
        grads = torch.autograd.grad(loss, [x, *params_of(head)])
        assert_close_to(loss, loss_ref, rtol=2e-6, what=f"native={flag}")
        for g, g_ref in zip(grads, grads_ref):
            assert_close_to(g, g_ref, rtol=1e-5, atol=1e-8, what=f"native={flag}")
        results[flag] = loss.item()
    assert results["1"] == pytest.approx(results["0"], rel=1e-6)


@needs_native
@pytest.mark.parametrize("b,m,c", [(9, 4, 1), (7, 3, 13), (150, 3, 10), (90, 3, 20), (5, 1, 40), (6, 8, 1000),
                                   (3, 2, 4097), (0, 3, 5)])
@pytest.mark.parametrize("scale", [3.0, 1e3])
def test_uncertainty_kernel_matches_float64(isa, monkeypatch, b, m, c, scale):
    """fp32 uncertainty on the CPU runs the C kernel (spied): against float64 with masked classes, a
    masked stretch longer than the vector width, extreme logits, C = 1, M = 1; the same values as the
    torch ops it replaces (FASTHYDRA_NATIVE=0); a row that is -inf everywhere gives NaN there as well."""
    from fasthydra import uncertainty

    z = torch.randn(b, m, c) * scale
    if b > 2 and c > 2:
        z[1, 0, : c // 2] = float("-inf")
        z[2, -1, -1] = float("-inf")
    calls = []
    real = native.uncertainty_rows
    monkeypatch.setattr(native, "uncertainty_rows", lambda *a: calls.append(1) or real(*a))
    got = uncertainty(z, 1.7, impl="torch")
    assert calls == [1]
    ref = R.uncertainty_ref(z.double(), 1.7)
    for name in ("probs", "total", "aleatoric", "epistemic"):
        assert_close_to(getattr(got, name), getattr(ref, name), rtol=2e-5, atol=2e-6, what=name)
    assert (got.epistemic >= 0).all()
    monkeypatch.setenv("FASTHYDRA_NATIVE", "0")
    ops = uncertainty(z, 1.7, impl="torch")
    for name in ("probs", "total", "aleatoric", "epistemic"):  # (the torch ops' own error is the larger one)
        assert_close_to(getattr(got, name), getattr(ops, name).double(), rtol=2e-5, atol=5e-5, what=name)
    if b > 0 and c > 1:
        z[0, -1] = float("-inf")  # one head of row 0 masked everywhere
        monkeypatch.delenv("FASTHYDRA_NATIVE")
        nan_c = uncertainty(z, 1.7, impl="torch")
        monkeypatch.setenv("FASTHYDRA_NATIVE", "0")
        nan_ops = uncertainty(z, 1.7, impl="torch")
        assert torch.isnan(nan_c.total[0]) and torch.isnan(nan_ops.total[0])
        assert torch.isfinite(nan_c.total[1:]).all()


@needs_native
@pytest.mark.parametrize("b,m,c", [(9, 4, 1), (7, 3, 13), (150, 3, 10), (6, 8, 1000), (3, 2, 4097), (0, 3, 5),
                                   (90, 3, 33)])
@pytest.mark.parametrize("scale", [3.0, 1e3])
def test_hinton_target_kernel_matches_float64(isa, monkeypatch, b, m, c, scale):
    """The Hinton loss of fp32 CPU members (frozen) forms its target T log mean_m softmax(t_m / T) with the C kernel
    (spied; 90 rows over two threads; members read through a layout with a non-unit class stride, copied): the
    target against float64 where P lies in fp32's normal range, and where it is subnormal there (1e-42 to 1e-38: a
    finite logarithm, which a student at torch.finfo's min makes a term of the loss; -inf until the sixtieth
    session), -inf where every member masks the class or P is below fp32's range (1e-50); the loss and the
    student's gradient against the float64 reference; the same values from the torch ops it replaces
    (FASTHYDRA_NATIVE=0)."""
    from fasthydra import hinton_kl_loss
    from fasthydra.functional import ensemble_log_mean_probs

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # (the row split; the kernel's threads are its own)
    gen = torch.Generator().manual_seed(b * 7 + c)
    t = (torch.randn(b, m, c, generator=gen) * scale).transpose(1, 2).contiguous().transpose(1, 2)
    if b > 2 and c > 2:
        t[1, 0, : c // 2] = float("-inf")  # a masked stretch longer than the vector width
        t[2, :, -1] = float("-inf")  # a class every member masks
    z = (torch.randn(b, c, generator=gen) * scale).requires_grad_()
    got_target = native.log_mean_rows(t.contiguous(), 1.7)
    want_target = 1.7 * ensemble_log_mean_probs(t.double(), 1.7)  # (-inf where every member masks)
    normal = want_target > 1.7 * math.log(1e-36)
    subnormal = (want_target > 1.7 * math.log(1e-42)) & (want_target < 1.7 * math.log(1e-38))
    none = want_target < 1.7 * math.log(1e-50)
    assert_close_to(got_target[normal], want_target[normal], rtol=1e-6, atol=1e-6, what="T log P")
    # (a subnormal P of 1e-42 holds about 700 units of the smallest one: log P within 1e-3 of it, times T)
    assert_close_to(got_target[subnormal], want_target[subnormal], rtol=0.0, atol=1.7e-3, what="T log P, P subnormal")
    assert torch.isneginf(got_target[none]).all()
    calls, loss = _hinton_through_the_target_kernel(monkeypatch, z, t)
    monkeypatch.setenv("FASTHYDRA_NATIVE", "0")
    ops_loss = hinton_kl_loss(z, t, 1.7, impl="torch")
    assert calls == [1]
    assert_close_to(loss, ops_loss.double(), rtol=1e-5, atol=1e-6, what="loss against the torch ops")


def _hinton_through_the_target_kernel(monkeypatch, z, t):
    """(the target kernel's calls, the loss) of one Hinton step at T = 1.7 whose target the C kernel formed once
    (spied), the loss and the student's gradient held against float64 of the same members."""
    from fasthydra import hinton_kl_loss

    calls = []
    real = native.log_mean_rows
    monkeypatch.setattr(native, "log_mean_rows", lambda *a: calls.append(1) or real(*a))
    loss = hinton_kl_loss(z, t, 1.7, impl="torch")
    (grad,) = torch.autograd.grad(loss, z)
    assert calls == [1]
    z64 = z.detach().double().requires_grad_()
    ref = R.hinton_kl_loss_ref(z64, torch.where(t.isneginf(), -1e4, t.double()), 1.7)  # (-inf: NaN in autograd)
    (ref_grad,) = torch.autograd.grad(ref, z64)
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-6, what="loss")
    assert_close_to(grad, ref_grad, rtol=1e-5, atol=1e-7, what="grad")
    return calls, loss


def _flushes() -> bool:
    """Whether this thread flushes subnormal float32 results to zero (FTZ)."""
    return (torch.tensor([2e-38]) * 0.25).item() == 0.0


@needs_native
@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="torch sets no flush-to-zero mode on this CPU")
@pytest.mark.parametrize("threads", [1, 3])
def test_kernels_keep_subnormals_when_the_calling_thread_flushes_them(monkeypatch, threads):
    """A caller whose thread flushes subnormals (FTZ and DAZ, as torch.set_flush_denormal(True) and, in torch 2.4,
    the first torch.compile'd CPU kernel's crtfastmath.o leave it): the C kernel's rows keep them all the same, on
    the calling thread's part as on the others (until the sixty-first session only the parts on other threads
    did). 96 rows whose teacher probability at class 2 is subnormal in float32 (exp(-88.7) to exp(-96) times the
    row's other terms): the KL rows with the student at float32's lowest value there (a term of 1e-4 to 0.3 of
    each row: within 1e-5 of float64) and the Hinton target T log P (finite, within 1.7e-3 of float64); the
    thread flushes again afterwards (the kernel puts the caller's mode back)."""
    from fasthydra.functional import ensemble_log_mean_probs

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(61)
    t = torch.randn(96, 33, generator=gen) * 2
    t[:, 2] = t.amax(-1) - torch.linspace(88.7, 96.0, 96)
    z = torch.randn(96, 33, generator=gen) * 3
    z[:, 2] = torch.finfo(torch.float32).min
    other = torch.randn(96, 33, generator=gen)
    other[:, 2] = other.amax(-1) - torch.linspace(96.0, 89.0, 96)
    members = torch.stack([t, other], 1)  # (96, 2, 33): P at class 2 subnormal too
    p64 = torch.softmax(t.double(), -1)
    log_q64 = torch.log_softmax(z.double(), -1)
    want_loss = (p64 * (p64.log() - log_q64)).sum(-1)
    dropped = (p64 * (p64.log() - log_q64))[:, [c for c in range(33) if c != 2]].sum(-1)
    assert ((want_loss - dropped) > 1e-4).all() and (p64[:, 2] < torch.finfo(torch.float32).tiny).all()
    want_target = ensemble_log_mean_probs(members.double(), 1.0)[:, 2]
    assert (want_target > math.log(1e-44)).all() and (want_target < math.log(torch.finfo(torch.float32).tiny)).all()
    torch.set_flush_denormal(True)
    try:
        assert _flushes()
        loss, _, _ = native.kl_rows(z.clone(), t, 1.0, want_grad=True)
        target = native.log_mean_rows(members, 1.0)[:, 2]
        assert _flushes(), "the caller's mode was not put back"
    finally:
        torch.set_flush_denormal(False)
    assert_close_to(loss, want_loss, rtol=1e-5, atol=0.0, what="KL rows")
    assert_close_to(target, want_target, rtol=0.0, atol=1.7e-3, what="T log P, P subnormal")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hinton_target_kernel_reads_sixteen_bit_members(monkeypatch, dtype):
    """16-bit CPU members (a model run under CPU autocast) take the C kernel too, read into fp32 as the torch ops
    read them: the loss and the student's gradient against float64 of the same (rounded) members."""
    gen = torch.Generator().manual_seed(3)
    t = (torch.randn(40, 4, 300, generator=gen) * 3).to(dtype)
    t[2, :, 7] = float("-inf")  # a class every member masks
    _hinton_through_the_target_kernel(monkeypatch, (torch.randn(40, 300, generator=gen) * 3).requires_grad_(), t)


@needs_native
@pytest.mark.parametrize("b,m,c", [(9, 4, 1), (7, 3, 13), (150, 3, 10), (70, 33, 5), (90, 4, 20), (5, 1, 40),
                                   (6, 8, 1000), (3, 2, 4097), (0, 3, 5)])
@pytest.mark.parametrize("scale", [3.0, 1e3])
def test_uncertainty_gradient_kernel_matches_float64(isa, monkeypatch, b, m, c, scale):
    """uncertainty's backward for fp32 CPU logits runs the C kernel (spied): against float64 autograd, every
    output with a random upstream, masked classes (a stretch longer than the vector width), extreme logits,
    C = 1, M = 1, head-major (strided) logits; close to the torch ops it replaces (FASTHYDRA_NATIVE=0)."""
    from fasthydra import uncertainty

    g = torch.Generator().manual_seed(b * 100 + c)
    z = torch.randn(m, b, c, generator=g).transpose(0, 1) * scale  # (b, m, c), heads outermost in memory
    if b > 2 and c > 2:
        z[1, 0, : c // 2] = float("-inf")
        z[2, -1, -1] = float("-inf")
    ups = [torch.randn(b, c, generator=g, dtype=torch.float64)] + [torch.randn(b, generator=g, dtype=torch.float64)
                                                                    for _ in range(3)]

    def grad(values, reference=False):
        leaf = values.detach().clone().requires_grad_(True)
        u = R.uncertainty_ref(leaf, 1.7) if reference else uncertainty(leaf, 1.7, impl="torch")
        loss = sum((out.double() * up).sum() for out, up in zip(u, ups))
        return torch.autograd.grad(loss, leaf)[0] if b else torch.zeros_like(values)

    calls = []
    real = native.uncertainty_grad_rows
    monkeypatch.setattr(native, "uncertainty_grad_rows", lambda *a: calls.append(1) or real(*a))
    got = grad(z)
    assert calls == ([1] if b else [])
    want = grad(z.double(), reference=True)
    assert_close_to(got, want, rtol=2e-5, atol=2e-6, what="gradient")
    assert not torch.isnan(got).any()
    monkeypatch.setenv("FASTHYDRA_NATIVE", "0")
    assert_close_to(got, grad(z).double(), rtol=2e-5, atol=5e-5, what="against the torch ops")


@needs_native
def test_uncertainty_kernel_nan_logit_gives_nan_everywhere_in_its_row(monkeypatch):
    """A NaN logit: NaN probs, total, aleatoric and epistemic for its row (the clamp at 0 keeps NaN, as torch's
    clamp_min does), as the torch ops give; other rows untouched."""
    from fasthydra import uncertainty

    z = torch.randn(3, 2, 6)
    z[1, 1, 3] = float("nan")
    for flag in ("1", "0"):
        monkeypatch.setenv("FASTHYDRA_NATIVE", flag)
        u = uncertainty(z, impl="torch")
        for name, v in zip(u._fields, u):
            assert torch.isnan(v[1]).all(), f"{name} (FASTHYDRA_NATIVE={flag})"
            assert torch.isfinite(v[[0, 2]]).all(), f"{name} (FASTHYDRA_NATIVE={flag})"


@needs_native
def test_uncertainty_kernel_identical_heads_have_no_epistemic_part(isa):
    """Identical heads: total and aleatoric agree to rounding, and the epistemic part (their difference,
    which rounding may push below 0) is clamped at 0."""
    from fasthydra import uncertainty

    z = (torch.randn(64, 1, 37) * 4).expand(64, 5, 37)
    got = uncertainty(z, 1.3, impl="torch")
    assert_close_to(got.total, got.aleatoric.double(), rtol=1e-5, atol=1e-6, what="total")
    assert (got.epistemic >= 0).all() and got.epistemic.max() < 1e-5


def test_no_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTHYDRA_NATIVE", raising=False)  # the compiler is what is missing here
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", "not built yet")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FASTHYDRA_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="native CPU kernel unavailable"):
        assert not native.usable(torch.zeros(1))
    assert native.status() != "ok"
    z = torch.randn(4, 2, 6, requires_grad=True)
    t = torch.randn(4, 2, 6)
    assert_close_to(hydra_kl_loss(z, t, 1.0, impl="torch"), R.hydra_kl_loss_ref(z.double(), t.double(), 1.0),
                    rtol=1e-6)


def _picky_compiler(tmp_path, rejects):
    """A compiler (CC) that fails, as clang 14 does on ARM, when given any flag in `rejects`, and otherwise runs the
    host's compiler, less -mcpu=native (which only ARM compilers need to know); every call's arguments go to the
    returned log."""
    real = native._compiler()
    log = tmp_path / "calls.log"
    stub = tmp_path / "picky-cc"
    cases = "|".join(rejects)
    stub.write_text(f"""#!/bin/sh
echo "$*" >> '{log}'
for a in "$@"; do
  case "$a" in {cases}) echo "picky-cc: error: the compiler does not support '$a'" >&2; exit 1;; esac
done
for a in "$@"; do shift; [ "$a" = "-mcpu=native" ] || set -- "$@" "$a"; done
exec '{real}' "$@"
""")
    stub.chmod(0o755)
    return stub, log


def _builds(log) -> list:
    """The flag sets the log shows a build with (its --version calls left out), as tuples of the tried flags."""
    calls = [line.split() for line in log.read_text().splitlines() if line.strip() != "--version"]
    return [tuple(f for f in call if f.startswith(("-march", "-mcpu", "-fopenmp"))) for call in calls]


@needs_native
@pytest.mark.parametrize("rejects,expected", [
    (["-march=native"], ("-mcpu=native", "-fopenmp")),  # clang < 15 on ARM: the host's CPU by -mcpu
    (["-march=native", "-mcpu=native", "-fopenmp"], ()),  # the target's baseline, no OpenMP (Apple's clang 14)
], ids=["no-march-native", "baseline-only"])
def test_a_compiler_that_rejects_the_host_arch_flag_builds_with_the_next_spelling(monkeypatch, tmp_path, rejects,
                                                                                    expected):
    """A compiler that does not take -march=native (clang before 15 on ARM, Apple's clang 14 on an M1: the library
    used to fall back to the torch ops there) builds the library with the next spelling of the host's CPU, else for
    the target's baseline; the rows it computes are the library in use's, to rounding. A second process takes the
    cached build at once: it compiles nothing, rejected sets included."""
    if "-fopenmp" in expected and not native._library().hydra_openmp():  # (a host compiler without OpenMP)
        expected = expected[:-1]
    stub, log = _picky_compiler(tmp_path, rejects)
    monkeypatch.setenv("CC", str(stub))
    monkeypatch.setenv("FASTHYDRA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_built_with", native._built_with)  # (restored after the test)
    s, t = torch.randn(37, 300) * 3, torch.randn(37, 300) * 3
    want = native.kl_rows(s.clone(), t, 1.7, True)
    lib = native._build()
    tried = _builds(log)
    assert tried[-1] == expected, tried
    every = [tuple(f for f in flags if f.startswith(("-march", "-mcpu", "-fopenmp"))) for flags in native._flag_sets()]
    assert tried == every[: every.index(expected) + 1]  # best first, each once
    assert lib.hydra_openmp() == ("-fopenmp" in expected)
    monkeypatch.setattr(native, "_lib", lib)
    monkeypatch.setattr(native, "_team", False)
    got = native.kl_rows(s.clone(), t, 1.7, True)
    assert_close_to(got[0], want[0].double(), rtol=1e-5, atol=1e-6, what="loss rows")
    assert_close_to(got[1], want[1].double(), rtol=1e-5, atol=1e-7, what="q - p")
    log.write_text("")
    native._build()
    assert _builds(log) == []


def test_a_compiler_that_rejects_every_flag_set_names_each_one(monkeypatch, tmp_path):
    """When no flag set builds, the error (which `status()` then reports, the torch ops running) names every set
    tried and what the compiler said."""
    stub, log = _picky_compiler(tmp_path, ["-O3"])
    monkeypatch.setenv("CC", str(stub))
    monkeypatch.setenv("FASTHYDRA_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError) as info:
        native._build()
    message = str(info.value)
    assert len(_builds(log)) == len(native._flag_sets()) == 6
    for flags in native._flag_sets():
        assert f"with {' '.join(flags)} failed" in message
    assert message.count("does not support '-O3'") == 6

def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("FASTHYDRA_NATIVE", "0")
    assert native.status() == "disabled by FASTHYDRA_NATIVE=0"
    assert not native.usable(torch.zeros(1))


@needs_native
def test_works_in_a_forked_child_after_the_parent_used_it():
    """The row kernel's thread pool does not survive fork; the child must build a new one, not hang."""
    import multiprocessing as mp

    s = torch.randn(256, 50)
    t = torch.randn(256, 50)
    native.kl_rows(s, t, 1.0, True)  # the parent's pool now exists
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        child = pool.apply_async(_child_loss_sum, (s, t)).get(timeout=60)
    assert child == pytest.approx(float(native.kl_rows(s, t, 1.0, False)[0].sum()), rel=1e-6)


def _child_loss_sum(s, t):
    return float(native.kl_rows(s, t, 1.0, False)[0].sum())



def _every_kernel(seed: int = 0) -> list:
    """The outputs of every native kernel on one set of inputs with masked classes (enough rows for several
    parts): KL rows short and long, with the teacher's gradient, the class-tiled passes, uncertainty, its
    gradient and the Hinton target (mixtures of short rows and long)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen) * 3

    out = []
    for c in (10, 20, 33, 70):  # on their side (float sums; double; double without the teacher's gradient), long
        s, t = randn(203, c), randn(203, c)
        t[5, : c // 2] = float("-inf")
        loss, grad, tgrad = native.kl_rows(s.clone(), t, 1.7, True, True)
        out += [loss, grad, tgrad, native.kl_rows(s.clone(), t, 1.7, False)[0]]
        out.append(native.kl_rows(s.clone(), t, 1.7, True)[1])  # q - p alone (on NEON it once moved with the split)
    s, t = randn(3, 67, 40), randn(3, 67, 40)  # (M, rows, w) tiles of two passes
    t[1, 2, :30] = float("-inf")
    stats = native.tile_stats_init(3 * 67)
    native.tile_stats(s, t, stats, 1.7)
    m_s, d_s, m_t, d_u, _ = stats
    out += list(stats) + [native.tile_grad(s.clone(), t, m_s, d_s.log(), m_t, d_u.log(), 1.7)]
    for c in (20, 37):  # the gradient's on their side, and at 37 whole on AVX-512 hosts; the forward's on their side
        z = randn(131, 4, c)
        z[3, 1, :c // 2] = float("-inf")
        out += list(native.uncertainty_rows(z, 1.3)) + [native.log_mean_rows(z, 1.3)]
        out.append(native.uncertainty_grad_rows(z, 1.3, randn(131, c), randn(131), randn(131)))
    z = randn(203, 3, 10)  # short rows: blocks of 64 rows on their side
    z[70, 1, :6] = float("-inf")
    z[100, :, 2] = float("-inf")
    out += list(native.uncertainty_rows(z, 1.3)) + [native.log_mean_rows(z, 1.3)]
    return out + [native.uncertainty_grad_rows(z, 1.3, randn(203, 10), randn(203), randn(203))]


@needs_native
@pytest.mark.parametrize("team", [True, False])
@pytest.mark.parametrize("threads", [2, 3])
def test_every_kernel_gives_the_same_rows_on_any_split(monkeypatch, threads_set, team, threads):
    """Rows split over 2 or 3 parts, on the OpenMP team or on the Python pool, give exactly the values of one
    thread: each row is computed by the same code whichever part holds it (same shapes; no sum crosses rows).
    The team is taken only where the library was built with OpenMP."""
    if team and not native._library().hydra_openmp():
        pytest.skip("library built without OpenMP here")
    threads_set(1)
    one = _every_kernel()
    monkeypatch.setattr(native, "_team", team)
    threads_set(threads)
    split = _every_kernel()
    assert len(one) == len(split) == 44
    for i, (a, b) in enumerate(zip(one, split)):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num()), i


@pytest.mark.parametrize("team", [True, False])
@pytest.mark.parametrize("floats", [1, 10, 20, 33, 2000])
def test_parts_scratch_lies_in_cache_lines_of_its_own(monkeypatch, threads_set, team, floats):
    """Each part's scratch starts on a 64-byte boundary, holds the floats asked for and ends at least 128 bytes
    (a cache line and its prefetch pair) before the next part's: parts that wrote into one line took 1.5x one
    thread's time (false sharing), on the team (one call, parts at base + part * stride) or the pool."""
    monkeypatch.setattr(native, "_team", team)
    calls = []
    threads_set(3)
    native._over_rows(lambda base, ld, r0, r1, threads: calls.append((base, ld, r0, r1, threads)), 300,
                      scratch=floats)
    # (in address order: the pool's parts append their calls in whatever order its threads run them)
    starts = sorted(base + 4 * ld * part for base, ld, r0, r1, threads in calls for part in range(threads))
    assert len(starts) == 3 and sorted(r0 for _, _, r0, _, _ in calls)[0] == 0
    assert all(start % 64 == 0 for start in starts), starts
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(gap >= 4 * floats and gap % 128 == 0 for gap in gaps), (floats, gaps)


@needs_native
def test_build_flags_name_the_library_in_use(monkeypatch):
    """build_flags() gives the flags of the library this process loaded: one of the flag sets, whose cache path is
    the file loaded; None where the torch ops run."""
    flags = native.build_flags()
    assert flags in native._flag_sets(), flags
    path = native._library_paths(native._compiler_version(native._compiler()), [flags])[0]
    assert native._library()._name == str(path)
    monkeypatch.setenv("FASTHYDRA_NATIVE", "0")
    assert native.build_flags() is None


@needs_native
def test_library_without_openmp_splits_rows_on_the_pool(monkeypatch, tmp_path):
    """A compiler without OpenMP builds the library without it (the Python pool then splits the rows): same
    values as the library in use."""
    compiler = native._compiler()
    monkeypatch.setenv("FASTHYDRA_CACHE_DIR", str(tmp_path))
    flags = [f for f in native.build_flags() if f not in native.OPENMP]  # the library in use's, less OpenMP
    plain = native.ctypes.CDLL(str(native._compiled(compiler, flags)))
    assert plain.hydra_openmp() == 0
    expected = _every_kernel()
    built = native._library()
    for name in ("hydra_kl_rows", "hydra_kl_tile_stats", "hydra_kl_tile_grad", "hydra_uncertainty_rows",
                 "hydra_log_mean_rows", "hydra_uncertainty_grad_rows"):
        getattr(plain, name).argtypes = getattr(built, name).argtypes
        getattr(plain, name).restype = None
    monkeypatch.setattr(native, "_lib", plain)
    monkeypatch.setattr(native, "_team", False)
    for i, (a, b) in enumerate(zip(expected, _every_kernel())):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), i


@needs_native
def test_torch_team_only_where_bound_to_torchs_runtime():
    """The team is taken where the library has OpenMP and is bound to the runtime torch's libraries resolve (the
    same address of omp_get_num_threads); bound to another, or built without OpenMP, the pool. In this process,
    with scikit-learn's own libgomp mapped too: the team exactly where the two addresses lie in one mapped file
    (torch's recent Linux wheels: torch/lib/libgomp.so.1, which the loader shares by its name; torch 2.4's is
    renamed, so the library loads the system's and keeps the pool)."""
    lib = native._library()

    class Lib:
        def __init__(self, openmp, entry):
            self.hydra_openmp = lambda: openmp
            self.hydra_openmp_entry = lambda: entry

    assert native._on_torch_team(Lib(1, 0x7F0010), torch_entry=0x7F0010)
    assert not native._on_torch_team(Lib(1, 0x7F0010), torch_entry=0x7F9990)  # another runtime than torch's
    assert not native._on_torch_team(Lib(0, None), torch_entry=0x7F0010)
    if not lib.hydra_openmp() or native._torch_openmp_entry() is None:
        pytest.skip("the library or torch without OpenMP here: the pool is right")
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc/self/maps to read the runtimes' files from")
    pytest.importorskip("sklearn.linear_model")  # (its wheels carry a renamed libgomp, mapped from here on)

    def mapped_file(address):
        with open("/proc/self/maps") as f:
            for line in f:
                span, *rest = line.split()
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= address < hi and len(rest) >= 5:
                    return os.path.realpath(rest[-1])
        return None

    ours, theirs = mapped_file(lib.hydra_openmp_entry()), mapped_file(native._torch_openmp_entry())
    assert ours is not None and theirs is not None
    assert native._on_torch_team(lib) == (ours == theirs), (ours, theirs)


@needs_native
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="counts threads in /proc")
def test_rows_run_on_torchs_threads(monkeypatch, threads_set):
    """On the team, a kernel after a torch op adds no thread to the process: its parts run on the threads of
    torch's own intra-op team (the pool would add its own, which contend with torch's spinning ones)."""
    pytest.importorskip("sklearn.linear_model")  # a second libgomp mapped (scikit-learn's): still torch's team
    if not native._team:
        pytest.skip(f"not on torch's team here (OpenMP: {native._library().hydra_openmp()})")
    threads_set(2)
    z = torch.randn(512, 4, 200)
    z.amax(dim=-1)  # torch's team exists and has just worked
    native.log_mean_rows(z, 1.0)
    # (thread ids, not a count: a thread of an earlier test's pool may end meanwhile, which adds none)
    threads = set(os.listdir("/proc/self/task"))
    for _ in range(3):
        z.amax(dim=-1)
        native.log_mean_rows(z, 1.0)
        native.uncertainty_rows(z, 1.0)
    assert set(os.listdir("/proc/self/task")) - threads == set()
    monkeypatch.setattr(native, "_pool", None)
    monkeypatch.setattr(native, "_team", False)  # the pool, for contrast: it does add threads
    native.log_mean_rows(z, 1.0)
    assert set(os.listdir("/proc/self/task")) - threads


# A masked vector load in the assembly: AVX2's vmaskmov, or an AVX-512 move from memory (not a constant at %rip)
# under a mask register.
_MASKED_LOAD = re.compile(r"vmaskmov|vmov\w*\s+[^,]*\((?!%rip\))[^)]*\),\s*%[xyz]mm\d+\{%k[0-7]\}")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("gcc") is None,
                    reason="gcc for x86-64 needed to read the kernels' vector code")
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64-v4"])  # AVX2, AVX-512
def test_no_vector_load_is_masked(arch):
    """gcc 12 turned loads under a condition (`e > 0 ? e * x : 0`) into masked vector loads and, for AVX2, gave
    half of them the wrong mask (wrong entropies with masked classes on AVX2 hosts, right ones on AVX-512 hosts).
    The kernels select products by kept() instead: compiled for either instruction set with the library's flags,
    no load is masked, whatever the host this runs on."""
    flags = [f for f in native.FLAGS + native.OPENMP if f not in ("-shared", "-fPIC")]
    out = subprocess.run(["gcc", *flags, f"-march={arch}", "-S", "-o", "-", str(native.SOURCE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "vsubps" in out.stdout  # (vector code was produced at all)
    masked = [line.strip() for line in out.stdout.splitlines() if _MASKED_LOAD.search(line)]
    assert masked == [], masked[:5]


@needs_native
@pytest.mark.parametrize("want_grad", [False, True], ids=["loss-alone", "with-gradient"])
@pytest.mark.parametrize("c,temperature", [(20, 5.0), (40, 5.0), (1000, 5.0), (200, 20.0)])
def test_row_sums_keep_more_digits_than_eager(want_grad, c, temperature):
    """The row kernel's normalisers and cross term are summed in 16 float lanes (blocks of 256 classes), the lanes
    then in double; rows of 16 to 47 classes, taken on their side, in double: the loss rows' median relative error
    against float64 is at most 0.6x eager float32's (measured: 0.1x to 0.4x).
    With the lanes (and a row's tail past the last full block) summed in float, a chain of up to 31 float
    additions, it was 0.7x to 0.9x, and one sweep case (T = 5, C = 40, KL ~ 2e-2) came out at 2.6x eager's error:
    log(d_s / d_u) passes the sums' relative rounding on to the KL whole."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(2000, 2, c, generator=g, dtype=torch.float64) * 0.6 * temperature / 5
    t = torch.randn(2000, 2, c, generator=g, dtype=torch.float64) * 0.6 * temperature / 5
    exact = R.hydra_kl_loss_ref(z, t, temperature, reduction="none")
    z32 = z.float().requires_grad_(want_grad)
    loss = hydra_kl_loss(z32, t.float(), temperature, reduction="none", impl="torch")
    eager = R.hydra_kl_loss_ref(z.float(), t.float(), temperature, reduction="none")
    err = ((loss.detach().double() - exact).abs() / exact).median().item()
    eager_err = ((eager.double() - exact).abs() / exact).median().item()
    assert err <= 0.6 * eager_err, f"median relative error {err:.2e} against eager's {eager_err:.2e}"


_EPS32 = torch.finfo(torch.float32).eps


def _spy(monkeypatch, name: str) -> list:
    """Record each call of native.<name> (the test then knows the C kernel ran, not the torch ops)."""
    calls, real = [], getattr(native, name)
    monkeypatch.setattr(native, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# Rows of 32000 classes of spread logits: a float lane chained over a whole row drops each term under half an ulp
# of its running sum, so such sums came out 5e-7 low (eager's softmax has that bias too). The kernels sum blocks
# of 256 classes in float lanes and the blocks in double. Bounds in float32 epsilons, not against eager's own error
# (which depends on the host's torch build), for each x86 level the host runs (`isa`); the old kernel's figures are
# in each docstring.
@needs_native
@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("want_grad", [False, True], ids=["loss-alone", "with-gradient"])
@pytest.mark.parametrize("loss_fn", ["hydra", "hinton"])
def test_long_rows_loss_keeps_its_digits(isa, monkeypatch, loss_fn, scale, want_grad):
    """Loss rows at C = 32000: median relative error at most 1 epsilon (measured 0.4 to 0.55; the old kernel's
    chained lanes 2.0 and 8.6 for `hydra_kl_loss` at T = 1, 3.1 for `hinton_kl_loss` over 4 members at T = 2)."""
    from fasthydra import hinton_kl_loss

    g = torch.Generator().manual_seed(3)
    z = torch.randn(100, 2, 32000, generator=g, dtype=torch.float64) * scale
    t = torch.randn(100, 2, 32000, generator=g, dtype=torch.float64) * scale
    if loss_fn == "hinton":  # one student row against the mixture of two members (log_mean_rows), T = 2
        z, temperature, fn, ref_fn = z[:, 0], 2.0, hinton_kl_loss, R.hinton_kl_loss_ref
    else:
        temperature, fn, ref_fn = 1.0, hydra_kl_loss, R.hydra_kl_loss_ref
    exact = ref_fn(z, t, temperature, reduction="none")
    calls = _spy(monkeypatch, "kl_rows")
    loss = fn(z.float().requires_grad_(want_grad), t.float(), temperature, reduction="none", impl="torch")
    assert calls == [1]
    err = ((loss.detach().double() - exact).abs() / exact).median().item() / _EPS32
    assert err <= 1.0, f"median relative error {err:.2f} epsilons"


@needs_native
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_long_rows_uncertainty_keeps_its_digits(isa, monkeypatch, scale):
    """`uncertainty` at C = 32000: the median error of total, aleatoric and epistemic at most 0.6 epsilon of the
    row's total (measured 0.16 to 0.29; the old kernel 1.1 to 3.0 for total and epistemic), and the gradient of a
    weighted epistemic sum within 300 epsilons of each row's largest component (measured 52; the old kernel 2011,
    twice eager float32's 959)."""
    from fasthydra import uncertainty

    g = torch.Generator().manual_seed(3)
    z = torch.randn(100, 4, 32000, generator=g, dtype=torch.float64) * scale
    w = torch.randn(100, generator=g, dtype=torch.float64)
    z64 = z.clone().requires_grad_(True)
    ref = R.uncertainty_ref(z64, 1.0)
    (ref.epistemic * w).sum().backward()
    forward, backward = _spy(monkeypatch, "uncertainty_rows"), _spy(monkeypatch, "uncertainty_grad_rows")
    z32 = z.float().requires_grad_(True)
    got = uncertainty(z32, 1.0, impl="torch")
    (got.epistemic * w.float()).sum().backward()
    assert forward == [1] and backward == [1]
    scale_rows = ref.total.detach()
    for name in ("total", "aleatoric", "epistemic"):
        err = ((getattr(got, name).detach().double() - getattr(ref, name).detach()).abs() / scale_rows).median()
        assert err.item() / _EPS32 <= 0.6, f"{name}: median error {err.item() / _EPS32:.2f} epsilons of the total"
    grad_err = (z32.grad.double() - z64.grad).abs() / z64.grad.abs().amax(-1, keepdim=True)
    assert grad_err.max().item() / _EPS32 <= 300, f"gradient: {grad_err.max().item() / _EPS32:.0f} epsilons"
