"""Sparse (top-k) teachers: TopKTeacher(values, indices) wherever teacher logits are accepted.

cpu tier: the torch path (row chunks and class tiles); interpret tier: the Triton top-k row kernel
on given logits and inside the heads' cuBLAS path. The reference is the dense teacher with -inf at
the classes a member did not keep (``TopKTeacher.densify``), in float64.
"""

import re

import pytest
import torch
from helpers import as_float64_copy, assert_close_to, params_of

from fasthydra import HydraHead, TopKTeacher, hinton_kl_loss, hydra_kl_loss
from fasthydra import reference as R
from fasthydra.ops import _common

IMPLS = [pytest.param("torch", marks=pytest.mark.cpu), pytest.param("triton", marks=pytest.mark.interpret)]


def topk_of(t: torch.Tensor, k: int, pad: int = 0, dtype=torch.int64) -> TopKTeacher:
    """The k largest logits of each row of a dense teacher; the last `pad` entries padded with -inf."""
    values, indices = t.topk(k, dim=-1)
    values = values.clone()
    if pad:
        values[..., k - pad:] = float("-inf")
    return TopKTeacher(values, indices.to(dtype))


def _grads_ref(z, teacher: TopKTeacher, temperature, reduction, up, c):
    z64 = z.detach().double().requires_grad_()
    v64 = teacher.values.detach().double().requires_grad_()
    ref = R.hydra_kl_loss_ref(z64, TopKTeacher(v64, teacher.indices).densify(c), temperature, reduction=reduction)
    gz, gv = torch.autograd.grad(ref, [z64, v64], up.double())
    return ref, gz, gv


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,m,c,k,pad", [(37, 5, 13, 4, 0), (6, 1, 10, 1, 0), (9, 3, 40, 8, 3), (4, 2, 200, 32, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_topk_loss_matches_the_densified_reference(impl, b, m, c, k, pad, reduction, monkeypatch):
    monkeypatch.setattr(_common, "MAX_BLOCK_C", 16)  # several class tiles even at small C
    g = torch.Generator().manual_seed(b + c + k)
    z = (torch.randn(b, m, c, generator=g) * 3).requires_grad_()
    teacher = topk_of(torch.randn(b, m, c, generator=g) * 3, k, pad, torch.int32)
    teacher = TopKTeacher(teacher.values.requires_grad_(), teacher.indices)
    loss = hydra_kl_loss(z, teacher, 2.0, reduction=reduction, impl=impl)
    up = torch.rand(loss.shape, generator=g) + 0.5
    gz, gv = torch.autograd.grad(loss, [z, teacher.values], up)
    ref, gz_ref, gv_ref = _grads_ref(z, teacher, 2.0, reduction, up, c)
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-7, what="loss")
    assert_close_to(gz, gz_ref, rtol=1e-5, atol=1e-8, what="student grad")
    assert_close_to(gv, gv_ref, rtol=1e-5, atol=1e-8, what="values grad")
    if pad:
        assert bool((gv[..., k - pad:] == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_k_equal_to_c_is_the_dense_loss(impl):
    """All classes kept, in a shuffled order: values and gradients equal the dense loss's (rel 1e-5)."""
    b, m, c = 37, 5, 13
    z = (torch.randn(b, m, c) * 3).requires_grad_()
    t = (torch.randn(b, m, c) * 3).requires_grad_()
    perm = torch.stack([torch.randperm(c) for _ in range(b * m)]).view(b, m, c)
    values = t.detach().gather(-1, perm).requires_grad_()
    sparse = hydra_kl_loss(z, TopKTeacher(values, perm), 1.5, impl=impl)
    gz_s, gv = torch.autograd.grad(sparse, [z, values])
    dense = hydra_kl_loss(z, t, 1.5, impl=impl)
    gz_d, gt = torch.autograd.grad(dense, [z, t])
    assert_close_to(sparse, dense.double(), rtol=1e-5, what="loss")
    assert_close_to(gz_s, gz_d.double(), rtol=1e-5, what="student grad")
    assert_close_to(gv, gt.gather(-1, perm).double(), rtol=1e-5, what="teacher grad")


def _head_ref(head, x, teacher: TopKTeacher, temperature):
    p64 = as_float64_copy(head)
    x64 = x.detach().double().requires_grad_()
    v64 = teacher.values.detach().double().requires_grad_()
    if head.is_mlp:
        z = R.mlp_heads_ref(x64, p64["hidden_weight"], p64.get("hidden_bias"), p64["weight"], p64.get("bias"))
    else:
        z = R.linear_heads_ref(x64, p64["weight"], p64.get("bias"))
    ref = R.hydra_kl_loss_ref(z, TopKTeacher(v64, teacher.indices).densify(head.num_classes), temperature)
    return ref, torch.autograd.grad(ref, [x64, v64, *p64.values()])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hidden", [None, 5])
@pytest.mark.parametrize("k,pad", [(1, 0), (6, 2), (70, 0)])
def test_distill_loss_with_a_topk_teacher(monkeypatch, impl, hidden, k, pad):
    monkeypatch.setattr(_common, "MAX_BLOCK_C", 16)  # the in-place gradient over several class tiles
    head = HydraHead(12, 70, 3, hidden_features=hidden, impl=impl)
    x = torch.randn(11, 12, requires_grad=True)
    teacher = topk_of(torch.randn(11, 3, 70) * 3, k, pad)
    teacher = TopKTeacher(teacher.values.requires_grad_(), teacher.indices)
    loss = head.distill_loss(x, teacher, 2.0)
    grads = torch.autograd.grad(loss, [x, teacher.values, *params_of(head)])
    ref, grads_ref = _head_ref(head, x, teacher, 2.0)
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-7, what="loss")
    for name, a, e in zip(["x", "values", *[n for n, _ in head.named_parameters()]], grads, grads_ref):
        assert_close_to(a, e, rtol=1e-5, atol=1e-8, what=name)
    with torch.no_grad():
        assert_close_to(head.distill_loss(x, teacher, 2.0), ref, rtol=2e-6, atol=1e-7, what="loss only")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lead", [(), (2, 3)], ids=["x (D,)", "x (2, 3, D)"])
def test_distill_loss_with_a_topk_teacher_takes_the_leading_shape_of_x(impl, lead):
    """A head takes x (*, D) with a top-k teacher (*, M, k) as with a dense one: x (D,) is one row (the
    teacher then (M, k)), more leading dimensions are rows; both against the flattened float64 reference."""
    head = HydraHead(6, 20, 3, hidden_features=4, impl=impl)
    x = torch.randn(*lead, 6, requires_grad=True)
    teacher = topk_of(torch.randn(*lead, 3, 20) * 3, 5, 1)
    teacher = TopKTeacher(teacher.values.requires_grad_(), teacher.indices)
    loss = head.distill_loss(x, teacher, 1.5)
    grads = torch.autograd.grad(loss, [x, teacher.values, *params_of(head)])
    flat = TopKTeacher(teacher.values.reshape(-1, 3, 5), teacher.indices.reshape(-1, 3, 5))
    ref, grads_ref = _head_ref(head, x.reshape(-1, 6), flat, 1.5)
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-7, what="loss")
    assert grads[0].shape == x.shape and grads[1].shape == teacher.values.shape
    for name, a, e in zip(["x", "values", *[n for n, _ in head.named_parameters()]], grads, grads_ref):
        assert_close_to(a.reshape(e.shape), e, rtol=1e-5, atol=1e-8, what=name)
    with pytest.raises(ValueError, match=re.escape(f"must have shape {(*lead, 3)} + (k,) for x {tuple(x.shape)}")):
        head.distill_loss(x, TopKTeacher(teacher.values[..., :2, :], teacher.indices[..., :2, :]))


@pytest.mark.cpu
@pytest.mark.parametrize("hidden", [None, 5])
@pytest.mark.parametrize("budget", [3 * 70, 1000], ids=["class-tiles", "head-chunks"])
def test_torch_large_c_modes_with_a_topk_teacher(monkeypatch, hidden, budget):
    import fasthydra.ops.linear_hydra_kl as lk

    monkeypatch.setattr(lk, "TORCH_CHUNK_ELEMENTS", budget)
    if budget == 1000:  # one head's 11 rows fit, all heads' do not: the head-chunk mode, never class tiles
        monkeypatch.setattr(lk, "_class_tiled_block_topk", lambda *a: pytest.fail("the class-tiled mode ran"))
    monkeypatch.setattr(lk, "TILE_ELEMENTS", 3 * 11 * 16)
    head = HydraHead(12, 70, 3, hidden_features=hidden, impl="torch")
    x = torch.randn(11, 12, requires_grad=True)
    teacher = topk_of(torch.randn(11, 3, 70) * 3, 9, 2)
    teacher = TopKTeacher(teacher.values.requires_grad_(), teacher.indices)
    loss = head.distill_loss(x, teacher, 2.0)
    grads = torch.autograd.grad(loss, [x, teacher.values, *params_of(head)])
    ref, grads_ref = _head_ref(head, x, teacher, 2.0)
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-7, what="loss")
    for a, e in zip(grads, grads_ref):
        assert_close_to(a, e, rtol=1e-5, atol=1e-8)


@pytest.mark.interpret
def test_cublas_head_groups_with_a_topk_teacher(monkeypatch):
    import fasthydra.ops.linear_hydra_kl as lk

    monkeypatch.setattr(lk, "CUBLAS_GROUP_ELEMENTS", 4 * 70)  # one head per group, rows in chunks of 4
    head = HydraHead(12, 70, 3, impl="triton")
    x = torch.randn(11, 12, requires_grad=True)
    teacher = topk_of(torch.randn(11, 3, 70) * 3, 5)
    loss = head.distill_loss(x, teacher, 2.0)
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    ref, grads_ref = _head_ref(head, x, teacher, 2.0)
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-7)
    for a, e in zip(grads, (grads_ref[0], *grads_ref[2:])):
        assert_close_to(a, e, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("impl", IMPLS)
def test_hinton_with_a_topk_teacher_targets_the_mean_of_the_sparse_members(impl):
    b, m, c, k = 9, 4, 30, 5
    z = torch.randn(b, c, requires_grad=True)
    teacher = topk_of(torch.randn(b, m, c) * 3, k, 1)
    teacher = TopKTeacher(teacher.values.requires_grad_(), teacher.indices)
    loss = hinton_kl_loss(z, teacher, 2.0, impl=impl)
    gz, gv = torch.autograd.grad(loss, [z, teacher.values])
    z64 = z.detach().double().requires_grad_()
    v64 = teacher.values.detach().double().requires_grad_()
    dense = TopKTeacher(v64, teacher.indices).densify(c)
    ref = R.hinton_kl_loss_ref(z64, dense, 2.0)
    gz_ref, gv_ref = torch.autograd.grad(ref, [z64, v64])
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-7, what="loss")
    assert_close_to(gz, gz_ref, rtol=1e-5, atol=1e-8, what="student grad")
    assert_close_to(gv, gv_ref, rtol=1e-5, atol=1e-8, what="values grad")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_with_a_topk_teacher(impl, reduction):
    """B = 0 with a top-k teacher (the Hinton loss used to fail here: its (B, M*k) reshape was written
    (B, -1), which a zero B leaves undetermined): a zero loss for "mean"/"sum", (0, ...) rows for "none",
    gradients of the inputs' shapes, for the loss on logits, the Hinton loss and the fused heads."""
    b, m, c, k = 0, 3, 10, 4
    teacher = TopKTeacher(torch.randn(b, m, k, requires_grad=True), torch.zeros(b, m, k, dtype=torch.int64))
    z = torch.randn(b, m, c, requires_grad=True)
    head = HydraHead(6, c, m, impl=impl)
    x = torch.randn(b, 6, requires_grad=True)
    cases = {"hydra_kl_loss": (hydra_kl_loss(z, teacher, 2.0, reduction, impl=impl), (b, m), [z, teacher.values]),
             "hinton_kl_loss": (hinton_kl_loss(z[:, 0], teacher, 2.0, reduction, impl=impl), (b,),
                                [z, teacher.values]),
             "distill_loss": (head.distill_loss(x, teacher, 2.0, reduction), (b, m), [x, *params_of(head)])}
    for name, (loss, rows, inputs) in cases.items():
        assert loss.shape == (rows if reduction == "none" else ()), name
        if reduction != "none":
            assert loss.item() == 0.0, name
        grads = torch.autograd.grad(loss.sum(), inputs, allow_unused=True)
        for inp, g in zip(inputs, grads):
            assert g is None or (g.shape == inp.shape and not g.any()), name


@pytest.mark.parametrize("impl", IMPLS)
def test_the_library_never_makes_the_teacher_dense(monkeypatch, impl):
    def refuse(self, num_classes):
        raise AssertionError("a dense teacher was built")

    monkeypatch.setattr(TopKTeacher, "densify", refuse)
    head = HydraHead(8, 50, 3, hidden_features=4, impl=impl)
    x = torch.randn(6, 8, requires_grad=True)
    teacher = topk_of(torch.randn(6, 3, 50), 4)
    head.distill_loss(x, teacher, 2.0).backward()
    hydra_kl_loss(head(x), teacher, 2.0, impl=impl).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


BAD = {
    "index out of range": (lambda v, i: (v, i.index_fill(-1, torch.tensor([0]), 50)), ValueError, r"outside \[0, C\)"),
    "repeated index": (lambda v, i: (v, torch.cat([i[..., :1], i[..., :-1]], -1)), ValueError, "kept twice"),
    "NaN value": (lambda v, i: (v.index_fill(-1, torch.tensor([1]), float("nan")), i), ValueError, "NaN"),
    "+inf value": (lambda v, i: (v.index_fill(-1, torch.tensor([1]), float("inf")), i), ValueError, r"\+Inf"),
    "row of -inf": (lambda v, i: (torch.full_like(v, float("-inf")), i), ValueError, "-Inf for every class"),
    "float indices": (lambda v, i: (v, i.float()), TypeError, "int32 or int64"),
    "shape mismatch": (lambda v, i: (v, i[..., :2]), ValueError, "one shape"),
    "k above C": (lambda v, i: (torch.randn(4, 3, 60), torch.arange(60).expand(4, 3, 60)), ValueError, "k <= C"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_topk_teachers_get_a_clear_error(impl, case):
    make, exc, match = BAD[case]
    base = topk_of(torch.randn(4, 3, 50), 5)
    v, i = make(base.values, base.indices)
    z = torch.randn(4, 3, 50, requires_grad=True)
    with pytest.raises(exc, match=match):
        hydra_kl_loss(z, TopKTeacher(v, i), impl=impl)
    with pytest.raises(exc, match=match):
        HydraHead(6, 50, 3, impl=impl).distill_loss(torch.randn(4, 6), TopKTeacher(v, i))
    with pytest.raises(exc, match=match):  # (three members: on the Triton path, the target kernel checks the values)
        hinton_kl_loss(z[:, 0], TopKTeacher(v, i), impl=impl)


@pytest.mark.cpu
def test_padding_entries_may_repeat_an_index():
    t = topk_of(torch.randn(4, 3, 20), 6, 2)
    indices = t.indices.clone()
    indices[..., 4:] = indices[..., :1]  # the padded entries point at a kept class
    z = torch.randn(4, 3, 20, requires_grad=True)
    loss = hydra_kl_loss(z, TopKTeacher(t.values, indices), 1.0, impl="torch")
    ref = R.hydra_kl_loss_ref(z.double(), TopKTeacher(t.values.double(), indices).densify(20), 1.0)
    assert_close_to(loss, ref, rtol=2e-6)


@pytest.mark.cpu
def test_malformed_topk_containers_get_type_errors():
    idx = torch.zeros(4, 3, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="values"):
        hinton_kl_loss(torch.randn(4, 10), TopKTeacher([[0.0]], idx))
    with pytest.raises(TypeError, match="indices"):
        hydra_kl_loss(torch.randn(4, 3, 10), TopKTeacher(torch.randn(4, 3, 2), [[0]]))
    with pytest.raises(ValueError, match=r"must have shape \(4, 3\) \+ \(k,\); got \(4, 2, 2\)"):
        hydra_kl_loss(torch.randn(4, 3, 10), TopKTeacher(torch.randn(4, 2, 2), idx[:, :2]))


@pytest.mark.parametrize("impl", IMPLS)
def test_stored_gradients_handed_over_and_recomputed_for_a_retained_graph(impl, monkeypatch):
    """hydra_kl_loss with a top-k teacher forms its gradients in the forward: the backward scales them in
    place and returns those tensors (no copy); a second backward through the retained graph recomputes
    them, equal to the first (up to rounding) for the same upstream gradient."""
    import fasthydra.ops.hydra_kl as hk

    handed = []
    real = hk.scale_grads_
    monkeypatch.setattr(hk, "scale_grads_", lambda stored, g: handed.extend(x.data_ptr() for x in stored)
                        or real(stored, g))
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(7, 3, 30, generator=g) * 3).requires_grad_()
    teacher = topk_of(torch.randn(7, 3, 30, generator=g) * 3, 5)
    teacher = TopKTeacher(teacher.values.requires_grad_(), teacher.indices)
    loss = hydra_kl_loss(z, teacher, 2.0, impl=impl)
    gz, gv = torch.autograd.grad(loss * 0.7, [z, teacher.values], retain_graph=True)
    assert {gz.data_ptr(), gv.data_ptr()} <= set(handed)
    gz2, gv2 = torch.autograd.grad(loss * 0.7, [z, teacher.values])
    assert_close_to(gz2, gz, rtol=1e-6, atol=1e-12, what="recomputed student grad")
    assert_close_to(gv2, gv, rtol=1e-6, atol=1e-12, what="recomputed values grad")
    _, gz_ref, gv_ref = _grads_ref(z, teacher, 2.0, "mean", torch.tensor(0.7), 30)
    assert_close_to(gz, gz_ref, rtol=1e-5, atol=1e-8, what="student grad")
    assert_close_to(gv, gv_ref, rtol=1e-5, atol=1e-8, what="values grad")
