"""Teacher logits that require grad get their exact gradient (online distillation, mutual learning),
on every path, against float64 autograd through the eager reference; a frozen teacher costs nothing.

cpu tier: the torch path (row chunks, class tiles, the native kernel bypassed only when needed);
interpret tier: the Triton kernels under TRITON_INTERPRET=1 (loss on logits, heads on both GEMM backends).
"""

import pytest
import torch
from helpers import (HEADS_PATHS, as_float64_copy, assert_close_to, params_of, teacher_logits, tolerance_rule,
                     use_heads_path)

from fasthydra import GaussianHydraHead, HydraHead, gaussian_kl_loss, hinton_kl_loss, hydra_kl_loss
from fasthydra import reference as R

CPU = pytest.mark.cpu
INTERP = pytest.mark.interpret
IMPLS = [pytest.param("torch", marks=CPU), pytest.param("triton", marks=INTERP)]
# (B, M, C): the odd shape, M = 1, C below 16
SHAPES = [(37, 5, 13), (6, 1, 10), (4, 3, 40)]


def _upstream(loss, generator):
    return torch.rand(loss.shape, generator=generator, dtype=torch.float64).to(loss.dtype) + 0.5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,m,c", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tile", [None, 16], ids=["row-whole", "tiles-of-16"])
def test_logits_loss_gives_the_teacher_its_gradient(impl, b, m, c, reduction, tile, monkeypatch):
    if tile is not None:  # the Triton kernel's multi-tile passes (pivot tracked across tiles)
        from fasthydra.ops import _common

        monkeypatch.setattr(_common, "MAX_BLOCK_C", tile)
        monkeypatch.setattr(_common, "ROW_TILE_MAX", tile)
    g = torch.Generator().manual_seed(b * 100 + c)
    z = (torch.randn(b, m, c, generator=g) * 3).requires_grad_()
    t = teacher_logits(b, m, c, scale=3.0).requires_grad_()  # with masked classes
    loss = hydra_kl_loss(z, t, 2.0, reduction=reduction, impl=impl)
    up = _upstream(loss, g)
    gz, gt = torch.autograd.grad(loss, [z, t], up)  # both in one backward
    z64, t64 = z.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    ref = R.hydra_kl_loss_ref(z64, t64, 2.0, reduction=reduction)
    gz_ref, gt_ref = torch.autograd.grad(ref, [z64, t64], up.double())
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-7, what="loss")
    assert_close_to(gz, gz_ref, rtol=1e-5, atol=1e-8, what="student grad")
    assert_close_to(gt, gt_ref, rtol=1e-5, atol=1e-8, what="teacher grad")
    assert bool((gt[t.detach().isneginf()] == 0).all())  # a masked class gets 0


def _teacher_grad_without_cancellation(z, t, temperature):
    """dL/dt of the "mean" Hydra loss in float64, in a form that does not cancel: with a = t - z (raw logits),
    (log p_c - log q_c) - KL = sum_k p_k (a_c - a_k) / T, whose k = c term is 0 and whose other terms are
    small where p_c is near 1, so dL/dt_c = coef p_c sum_k p_k (a_c - a_k) (T^2 / T / T = 1). Autograd
    through the eager formula forms log p - log q and KL apart, each about |logits| / T, and their difference
    loses everything below |logits| * 1e-16: with logits of 1e3 a gradient of 1e-28 at the teacher's top
    class came out exactly 0 in float64, where 80-digit arithmetic (mpmath, checked once) gave -1.1827075e-28
    and the kernels -1.1827074e-28 (FASTHYDRA_TEST_SEED=2)."""
    z, t = z.detach().double(), t.detach().double()
    p = torch.softmax(t / temperature, dim=-1)
    a = t - z
    kept = (p[..., :, None] > 0) & (p[..., None, :] > 0)  # (a masked class's a is -inf: its terms are 0)
    pair = torch.where(kept, p[..., None, :] * (a[..., :, None] - a[..., None, :]), 0.0)
    return p * pair.sum(-1) / (t.shape[0] * t.shape[1])


@CPU
def test_teacher_grad_without_cancellation_is_autograds_at_moderate_logits():
    z, t = torch.randn(4, 3, 11, dtype=torch.float64) * 2, teacher_logits(4, 3, 11).double().requires_grad_()
    ref = torch.autograd.grad(R.hydra_kl_loss_ref(z, t, 1.7), t)[0]
    assert_close_to(_teacher_grad_without_cancellation(z, t, 1.7), ref, rtol=1e-12, atol=1e-15, what="teacher grad")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tile", [None, 8], ids=["row-whole", "tiles-of-8"])
def test_teacher_gradient_with_extreme_logits(impl, tile, monkeypatch):
    """|logits| ~ 1e3: log p - log q and KL are both large and cancel in fp32 (and in float64: the reference is
    formed without that cancellation); held to DESIGN's tolerance rule (at most twice the error of eager fp32).
    In tiles too: the Triton kernel's long-row walk, whose pivot (the student's logit at the teacher's largest)
    is found per thread and merged once per row; without it the sum measured from 0 cancels 1e4-sized terms."""
    if tile is not None:
        from fasthydra.ops import _common

        monkeypatch.setattr(_common, "MAX_BLOCK_C", tile)
        monkeypatch.setattr(_common, "ROW_TILE_MAX", tile)
        assert not _common.kl_rows_config(30)["ROW_IN_REGISTERS"]
    # (the student's rows shifted by 1e4, which changes nothing but what a form without the pivot cancels)
    z = (torch.randn(5, 3, 30) * 1e3 + 1e4).requires_grad_()
    t = (torch.randn(5, 3, 30) * 1e3).requires_grad_()
    gt = torch.autograd.grad(hydra_kl_loss(z, t, 1.0, impl=impl), t)[0]
    gt_ref = _teacher_grad_without_cancellation(z, t, 1.0)
    t32 = t.detach().clone().requires_grad_()
    gt_eager = torch.autograd.grad(R.hydra_kl_loss_ref(z.detach(), t32, 1.0), t32)[0]
    assert torch.isfinite(gt).all()
    tolerance_rule(gt, gt_eager, gt_ref, 1e-6 * gt_ref.abs().max().item(), what="teacher grad")
    # eager's own error here is as large as the gradients, so the rule above cannot see a lost pivot: every entry
    # fp32 can hold within 1e-4 of its value (the pivoted form's are within 4e-6; measured from 0 instead, 1.0)
    held = gt_ref.abs() > 1e-30
    worst = ((gt.double() - gt_ref).abs() / gt_ref.abs())[held].max().item()
    assert worst < 1e-4, f"teacher grad: relative error {worst:.3g} on entries above 1e-30"


@CPU
def test_gradcheck_student_and_teacher_float64():
    z = torch.randn(4, 2, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 2, 6, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(lambda a, b: hydra_kl_loss(a, b, 1.5, reduction=reduction), (z, t))
    assert torch.autograd.gradcheck(lambda b: hinton_kl_loss(z[:, 0], b, 1.5), (t,))


@pytest.mark.parametrize("impl", IMPLS)
def test_hinton_teacher_gradient_through_the_ensemble_mean(impl):
    z = torch.randn(9, 17, requires_grad=True)
    t = teacher_logits(9, 4, 17).requires_grad_()
    t.data[2, :, 5] = float("-inf")  # a class every member masks
    loss = hinton_kl_loss(z, t, 3.0, impl=impl)
    gz, gt = torch.autograd.grad(loss * 1.7, [z, t])
    t64 = t.detach().double().requires_grad_()
    z64 = z.detach().double().requires_grad_()
    ref = R.hinton_kl_loss_ref(z64, t64, 3.0)
    gz_ref, gt_ref = torch.autograd.grad(ref * 1.7, [z64, t64])
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-7, what="loss")
    assert_close_to(gz, gz_ref, rtol=1e-5, atol=1e-8, what="student grad")
    assert torch.isfinite(gt).all() and bool((gt[t.detach().isneginf()] == 0).all())
    assert_close_to(gt, gt_ref, rtol=1e-5, atol=1e-8, what="teacher grad")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_k", [False, True], ids=["dense", "top-k"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_hinton_with_one_member_reads_the_member_itself(impl, top_k, reduction, monkeypatch):
    """Knowledge distillation from one teacher (M = 1): pbar is the member's own softmax, so the loss op reads the
    member (dense logits with masked classes, or top-k values) and no (B, C) target is formed (the target's code
    refuses here). A (B, S) batch with a row mask, a teacher and a temperature that require grad, an upstream
    weight per row: the loss and the student's, teacher's and T's gradients are float64 autograd's through the
    eager reference, which forms pbar in full."""
    import fasthydra.functional as functional
    from fasthydra import TopKTeacher

    def refuse(*args, **kwargs):
        raise AssertionError("a Hinton target was formed for one member")

    monkeypatch.setattr(functional, "_target_temperature", refuse)
    g = torch.Generator().manual_seed(11)
    b, s, c, k = 3, 4, 23, 6
    z = (torch.randn(b, s, c, generator=g) * 2).requires_grad_()
    keep = torch.rand(b, s, generator=g) > 0.3
    T = torch.tensor(1.6, requires_grad=True)
    if top_k:
        leaf = (torch.randn(b, s, 1, k, generator=g) * 3).requires_grad_()
        indices = torch.rand(b, s, 1, c, generator=g).argsort(-1)[..., :k]
        teacher = TopKTeacher(leaf, indices)
        dense64 = TopKTeacher(leaf.detach().double(), indices).densify(c)
    else:
        leaf = teacher = teacher_logits(b * s, 1, c).reshape(b, s, 1, c).requires_grad_()
        dense64 = leaf.detach().double()
    loss = hinton_kl_loss(z, teacher, T, reduction, impl=impl, row_mask=keep)
    weight = torch.rand(b, s, generator=g) + 0.5 if reduction == "none" else torch.tensor(1.3)
    got = torch.autograd.grad((loss * weight).sum(), [z, leaf, T])

    z64, t64 = z.detach().double().requires_grad_(), dense64.requires_grad_()
    T64 = T.detach().double().requires_grad_()
    rows = R.hinton_kl_loss_ref(z64.reshape(b * s, c), t64.reshape(b * s, 1, c), T64, "none").reshape(b, s) * keep
    want_loss = rows if reduction == "none" else rows.sum() / keep.sum()
    want = list(torch.autograd.grad((want_loss * weight.double()).sum(), [z64, t64, T64]))
    if top_k:  # the values' gradient: the dense one at the kept classes
        want[1] = want[1].gather(-1, indices)
    assert_close_to(loss, want_loss, rtol=2e-6, atol=1e-7, what="loss")
    for name, a, e in zip(("student", "teacher", "T"), got, want):
        assert torch.isfinite(a).all(), name
        assert_close_to(a, e, rtol=1e-5, atol=1e-7, what=f"{name} grad")
    if not top_k:  # a masked class of the member: gradient exactly 0
        assert bool((got[1][leaf.detach().isneginf()] == 0).all())


def _head_case(hidden, impl, b=11, d=12, m=3, c=20):
    head = HydraHead(d, c, m, hidden_features=hidden, impl=impl)
    x = torch.randn(b, d, requires_grad=True)
    t = teacher_logits(b, m, c).requires_grad_()
    return head, x, t


def _check_head_grads(head, x, t, reduction="mean"):
    loss = head.distill_loss(x, t, 2.0, reduction=reduction)
    grads = torch.autograd.grad(loss * 0.9, [x, t, *params_of(head)])
    p64 = as_float64_copy(head)
    x64, t64 = x.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    if head.is_mlp:
        z = R.mlp_heads_ref(x64, p64["hidden_weight"], p64.get("hidden_bias"), p64["weight"], p64.get("bias"))
    else:
        z = R.linear_heads_ref(x64, p64["weight"], p64.get("bias"))
    ref = R.hydra_kl_loss_ref(z, t64, 2.0, reduction=reduction)
    grads_ref = torch.autograd.grad(ref * 0.9, [x64, t64, *p64.values()])
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-7, what="loss")
    for name, a, e in zip(["x", "teacher", *p64], grads, grads_ref):
        assert_close_to(a, e, rtol=1e-5, atol=1e-8, what=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hidden", [None, 5])
@pytest.mark.parametrize("gemm", HEADS_PATHS)
def test_fused_heads_give_the_teacher_its_gradient(monkeypatch, impl, hidden, gemm):
    use_heads_path(monkeypatch, gemm)  # triton "small": the small step's first launch forms the teacher's gradient
    head, x, t = _head_case(hidden, impl)
    _check_head_grads(head, x, t, "mean")
    _check_head_grads(head, x, t, "sum")


@pytest.mark.interpret
@pytest.mark.parametrize("hidden", [None, 5])
def test_the_small_step_forms_the_teacher_gradient(monkeypatch, hidden):
    """A teacher that requires grad keeps the two-launch small step (its first launch writes the teacher's
    gradient): rows a row mask leaves out get 0 and the kept ones the gradient of the same rows alone; a second
    backward through the retained graph gives the same gradient again (times its upstream) after the first was
    zeroed in place; an fp16 teacher of
    fp32 heads gets an fp16 gradient; a frozen body (the weight's gradient alone) as well."""
    import fasthydra.ops.small_heads as sh

    use_heads_path(monkeypatch, "small")
    taken = []
    real = sh.small_heads_forward
    monkeypatch.setattr(sh, "small_heads_forward",
                        lambda *a, **k: taken.append(k.get("want_tgrad", a[10] if len(a) > 10 else False))
                        or real(*a, **k))
    head, x, t = _head_case(hidden, "triton")
    keep = torch.tensor([True, False, True, True, False, True, True, True, False, True, True])
    loss = head.distill_loss(x, t, 2.0, "sum", row_mask=keep)
    loss.backward(0.5 * torch.ones(()), retain_graph=True)
    assert taken == [True]
    half_of_it = t.grad.clone()
    t.grad.zero_()  # (an optimizer's zero_grad(set_to_none=False))
    loss.backward()
    once = t.grad.clone()
    assert_close_to(once, 2 * half_of_it, rtol=1e-6, atol=0.0, what="second backward")
    assert bool((once[~keep] == 0).all())
    t_kept = t.detach()[keep].clone().requires_grad_()
    head.distill_loss(x.detach()[keep], t_kept, 2.0, "sum").backward()
    assert_close_to(once[keep], t_kept.grad, rtol=1e-5, atol=1e-8, what="kept rows")
    half = t.detach().half().requires_grad_()
    frozen_x = x.detach()
    head.zero_grad()
    head.distill_loss(frozen_x, half, 2.0).backward()
    assert half.grad.dtype == torch.float16 and head.weight.grad is not None and taken[-1] is True
    t32 = half.detach().float().requires_grad_()
    head.distill_loss(frozen_x, t32, 2.0).backward()
    assert_close_to(half.grad, t32.grad, rtol=2e-3, atol=1e-6, what="fp16 teacher")


@CPU
@pytest.mark.parametrize("hidden", [None, 5])
@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["plain", "extreme"])
def test_torch_path_class_tiles_give_the_teacher_its_gradient(monkeypatch, hidden, scale):
    """Large C on the torch path: rows in blocks, classes in tiles (forced on a small case); with
    logits in the hundreds too (the pivoted form of the teacher gradient)."""
    import fasthydra.ops.linear_hydra_kl as lk

    monkeypatch.setattr(lk, "TORCH_CHUNK_ELEMENTS", 3 * 70)
    monkeypatch.setattr(lk, "TILE_ELEMENTS", 3 * 11 * 16)
    head, x, t = _head_case(hidden, "torch", b=11, c=70)
    with torch.no_grad():
        head.weight.mul_(scale)
        t.mul_(scale)
    _check_head_grads(head, x, t)


@CPU
@pytest.mark.parametrize("top_k", [False, True], ids=["dense", "top-k"])
def test_torch_path_class_tiles_with_a_frozen_student(monkeypatch, top_k):
    """Large C on the torch path (classes in tiles, forced on a small case) with nothing of the student
    requiring grad: a teacher that does gets its gradient alone (the tiles' second pass writes it, no student
    gradient formed), and with a frozen teacher too the loss alone (the loss-only return of the tiles)."""
    import fasthydra.ops.linear_hydra_kl as lk
    from fasthydra import TopKTeacher

    monkeypatch.setattr(lk, "TORCH_CHUNK_ELEMENTS", 3 * 70)
    monkeypatch.setattr(lk, "TILE_ELEMENTS", 3 * 11 * 16)
    tiled = []
    real = lk._class_tiled_block_topk if top_k else lk._class_tiled_block
    at = 6 if top_k else 5  # where want_grad stands among the arguments
    monkeypatch.setattr(lk, real.__name__, lambda *a: tiled.append(a[at]) or real(*a))
    head, x, t = _head_case(None, "torch", b=11, c=70)
    head.requires_grad_(False)
    x = x.detach()
    leaf = t
    if top_k:  # 9 of the 70 classes per row, distinct, one row's last two padded with -inf
        idx = torch.rand(11, 3, 70).argsort(-1)[..., :9]
        leaf = t.detach()[..., :9].clone().requires_grad_()
        values = leaf.clone()
        with torch.no_grad():
            values[4, 1, 7:] = float("-inf")
        t = TopKTeacher(values, idx)
        dense = torch.full((11, 3, 70), float("-inf"), dtype=torch.float64).scatter(-1, idx, values.detach().double())
    else:
        dense = t.detach().double()
    z = R.linear_heads_ref(x.double(), head.weight.double(), head.bias.double())
    t64 = dense.clone().requires_grad_()
    ref = R.hydra_kl_loss_ref(z, t64, 2.0)
    (want,) = torch.autograd.grad(ref * 0.9, [t64])
    if top_k:
        want = want.gather(-1, idx)
        want[4, 1, 7:] = 0.0
    loss = head.distill_loss(x, t, 2.0)
    (got,) = torch.autograd.grad(loss * 0.9, [leaf])
    assert tiled and not any(tiled), "the class tiles ran without a student gradient"
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-7, what="loss")
    assert_close_to(got, want, rtol=1e-5, atol=1e-8, what="teacher grad")
    frozen = TopKTeacher(t.values.detach(), t.indices) if top_k else t.detach()
    assert_close_to(head.distill_loss(x, frozen, 2.0), ref, rtol=2e-6, atol=1e-7, what="loss, all frozen")


@CPU
@pytest.mark.parametrize("hidden", [None, 5])
def test_torch_path_head_chunks_give_the_teacher_its_gradient(monkeypatch, hidden):
    """Large C on the torch path, one head at a time (a budget too small for a row block of all heads,
    enough for one head's 11 rows; forced on a small case)."""
    import fasthydra.ops.linear_hydra_kl as lk

    monkeypatch.setattr(lk, "TORCH_CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(lk, "_class_tiled_block", lambda *a: pytest.fail("the class-tiled mode ran"))
    head, x, t = _head_case(hidden, "torch", b=11, c=70)
    _check_head_grads(head, x, t)


@INTERP
@pytest.mark.parametrize("budget", [2 * 11 * 20, 4 * 20], ids=["head-groups", "row-chunks"])
def test_cublas_groups_give_the_teacher_its_gradient(monkeypatch, budget):
    import fasthydra.ops.linear_hydra_kl as lk

    monkeypatch.setattr(lk, "CUBLAS_GROUP_ELEMENTS", budget)
    head, x, t = _head_case(None, "triton")
    _check_head_grads(head, x, t)


@pytest.mark.parametrize("impl", IMPLS)
def test_gaussian_teacher_gets_mean_and_variance_gradients(impl):
    head = GaussianHydraHead(6, 2, 3, impl=impl)
    x = torch.randn(7, 6, requires_grad=True)
    tm = torch.randn(7, 3, 2, requires_grad=True)
    tv = (torch.rand(7, 3, 2) + 0.2).requires_grad_()
    loss = head.distill_loss(x, tm, tv)
    grads = torch.autograd.grad(loss, [x, tm, tv])
    mu, var = head(x)
    tm64, tv64 = tm.detach().double().requires_grad_(), tv.detach().double().requires_grad_()
    mu64, var64 = mu.detach().double(), var.detach().double()
    kl = 0.5 * (torch.log(var64 / tv64) + (tv64 + (tm64 - mu64) ** 2) / var64 - 1)
    g_ref = torch.autograd.grad(kl.mean(), [tm64, tv64])
    assert_close_to(grads[1], g_ref[0], rtol=1e-5, atol=1e-8, what="teacher mean")
    assert_close_to(grads[2], g_ref[1], rtol=1e-5, atol=1e-8, what="teacher var")
    # gaussian_kl_loss on given moments, every reduction
    m_ = torch.randn(7, 3, 2, requires_grad=True)
    v_ = (torch.rand(7, 3, 2) + 0.2).requires_grad_()
    for reduction in ("mean", "sum", "none"):
        out = gaussian_kl_loss(m_, v_, tm, tv, reduction=reduction)
        up = torch.rand(out.shape, dtype=out.dtype) + 0.5
        g_tm, g_tv = torch.autograd.grad(out, [tm, tv], up)
        kl = 0.5 * (torch.log(v_.detach().double() / tv64) + (tv64 + (tm64 - m_.detach().double()) ** 2)
                    / v_.detach().double() - 1)
        red = {"mean": kl.mean(), "sum": kl.sum(), "none": kl}[reduction]
        e_tm, e_tv = torch.autograd.grad(red, [tm64, tv64], up.double())
        assert_close_to(g_tm, e_tm, rtol=1e-5, atol=1e-8, what=f"{reduction} mean")
        assert_close_to(g_tv, e_tv, rtol=1e-5, atol=1e-8, what=f"{reduction} var")


@pytest.mark.parametrize("impl", IMPLS)
def test_a_frozen_teacher_costs_nothing_extra(monkeypatch, impl):
    """No teacher gradient is formed when the teacher does not require grad, or under no_grad (the loss kernels,
    the small step's first launch and the torch path's chunks are asked)."""
    import fasthydra.ops.hydra_kl as hk
    import fasthydra.ops.linear_hydra_kl as lk
    import fasthydra.ops.small_heads as sh

    asked = []
    real_rows, real_chunk, real_small = hk.launch_kl_rows, hk.kl_chunk_torch, sh.small_heads_forward

    def spy_small(*args, **kwargs):
        asked.append(bool(kwargs.get("want_tgrad", args[10] if len(args) > 10 else False)))
        return real_small(*args, **kwargs)

    def spy_rows(*args, **kwargs):
        asked.append(kwargs.get("tgrad3", args[7] if len(args) > 7 else None) is not None)
        return real_rows(*args, **kwargs)

    def spy_chunk(s, t, temperature, want_grad, want_tgrad=False, *rest):
        asked.append(want_tgrad)
        return real_chunk(s, t, temperature, want_grad, want_tgrad, *rest)

    for mod in (hk, lk):
        monkeypatch.setattr(mod, "launch_kl_rows", spy_rows, raising=False)
        monkeypatch.setattr(mod, "kl_chunk_torch", spy_chunk, raising=False)
    monkeypatch.setattr(sh, "small_heads_forward", spy_small)
    head, x, t = _head_case(None, impl)
    frozen = t.detach()
    head.distill_loss(x, frozen, 2.0).backward()
    hydra_kl_loss(head(x), frozen, 2.0, impl=impl).backward()
    with torch.no_grad():
        head.distill_loss(x, t, 2.0)
    assert asked and not any(asked)
    assert frozen.grad is None
    head.distill_loss(x, t, 2.0).backward()
    assert asked[-1] and t.grad is not None
