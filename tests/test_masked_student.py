"""Classes the student masks too (a -inf student logit: a vocabulary padded to a tile multiple, tokens ruled out by
a grammar, the same mask applied to teacher and student), on every path and tier, on both row walks of the Triton
kernels, for the Hydra and the Hinton loss with dense and top-k teachers.

KL(p || q) sums p (log p - log q) over the classes with p > 0: a class the teacher gives probability 0 adds nothing,
whatever the student's logit, -inf included; a class the teacher keeps and the student masks makes its row's KL
+inf. The eager reference (``fasthydra.reference``) gave NaN for a class masked on both sides (0 * (-inf + inf) in
kl_div) and a NaN teacher gradient for the Hinton loss wherever a class had pbar = 0, until the thirty-seventh
session; the tests used to stand -700 in for -inf there.

cpu tier: the reference against the loss over the classes left, and the torch path (the native C kernel where it is
built); interpret tier: the Triton kernels under TRITON_INTERPRET=1; gpu tier: the same kernels compiled. The
`classes` fixture (conftest.py) sets C and the row walk. tests/test_lowest_mask.py holds classes masked by the
dtype's lowest finite value instead of -inf.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to, params_of, reference_loss_and_grads, use_heads_path, with_heads_paths

from fasthydra import HydraHead, TopKTeacher, hinton_kl_loss, hydra_kl_loss
from fasthydra import reference as R

T = 1.7
B, M = 6, 3
TARGETS = [pytest.param("torch", "cpu", marks=pytest.mark.cpu, id="torch-cpu"),
           pytest.param("triton", "cpu", marks=pytest.mark.interpret, id="triton-interpret"),
           pytest.param("triton", "cuda", marks=pytest.mark.gpu, id="triton-gpu")]
NEG_INF = float("-inf")


def _logits(c):
    """(B, M, c) float64 student and teacher logits, masked on both sides: class 7 everywhere; classes 2c/5 on in
    every head of row 1 (at C = 50, more than one whole 16-class tile); class 9 in head 1 of row 3. The teacher
    alone masks class 3 in head 2 of row 2 (the student keeps a finite logit there). Every class the student
    masks has p = 0 in every member of its row where the student is the Hinton head (head 0)."""
    g = torch.Generator().manual_seed(37)
    z = torch.randn(B, M, c, generator=g, dtype=torch.float64) * 3
    t = torch.randn(B, M, c, generator=g, dtype=torch.float64) * 3
    for x in (z, t):
        x[:, :, 7] = NEG_INF
        x[1, :, c * 2 // 5:] = NEG_INF
        x[3, 1, 9] = NEG_INF
    t[2, 2, 3] = NEG_INF
    return z, t


def _kl_over_classes_left(z, t, T):
    """float64 T^2 KL per (row, head), each row's masked classes dropped before the softmaxes (no -inf anywhere)."""
    rows = []
    for zr, tr in zip(z.reshape(-1, z.shape[-1]), t.reshape(-1, t.shape[-1])):
        left = ~torch.isneginf(tr)
        log_p = F.log_softmax(tr[left] / T, -1)
        log_q = F.log_softmax(zr[left] / T, -1)
        rows.append((log_p.exp() * (log_p - log_q)).sum() * T * T)
    return torch.stack(rows).reshape(z.shape[:-1])


def _hinton_over_classes_left(z1, t, T):
    rows = []
    for zr, tr in zip(z1, t):
        left = ~torch.isneginf(tr).all(0)  # classes some member keeps (another may mask them: no path to T there)
        kept = tr[:, left]
        scaled = torch.where(torch.isneginf(kept), NEG_INF, kept.nan_to_num(neginf=0.0) / T)
        pbar = F.softmax(scaled, -1).mean(0)
        log_q = F.log_softmax(zr[left] / T, -1)
        rows.append((pbar * (pbar.log() - log_q)).sum() * T * T)
    return torch.stack(rows)


@pytest.mark.cpu
@pytest.mark.parametrize("hinton", [False, True], ids=["hydra", "hinton"])
def test_reference_is_the_loss_over_the_classes_left(hinton, classes):
    """The eager reference on masked classes: the value and the student's, teacher's and a learned temperature's
    gradients of the loss with the masked classes dropped (float64 autograd), and a gradient of exactly 0 at a
    masked class on either side."""
    z, t = _logits(classes)
    # (the loss over the classes left drops a class from both sides: here the student masks every class its member
    # does; the teacher's own masked classes are older tests' matter)
    z = z[:, 0] if hinton else torch.where(torch.isneginf(t), NEG_INF, z)
    leaves = [z.clone().requires_grad_(), t.clone().requires_grad_(), torch.tensor(T, dtype=torch.float64)]
    leaves[2].requires_grad_()
    got = (R.hinton_kl_loss_ref if hinton else R.hydra_kl_loss_ref)(*leaves, reduction="none")
    plain = [z.clone().requires_grad_(), t.clone().requires_grad_(), torch.tensor(T, dtype=torch.float64)]
    plain[2].requires_grad_()
    want = (_hinton_over_classes_left if hinton else _kl_over_classes_left)(*plain)
    assert torch.isfinite(got).all()
    assert_close_to(got, want, rtol=1e-12, atol=1e-14, what="loss")
    weight = torch.rand(got.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    grads = torch.autograd.grad((got * weight).sum(), leaves)
    grads_left = torch.autograd.grad((want * weight).sum(), plain)
    for name, leaf, g, g_left in zip(("student", "teacher", "T"), leaves, grads, grads_left):
        masked = torch.isneginf(leaf.detach())
        assert torch.isfinite(g).all(), name
        assert (g[masked] == 0).all(), f"{name}: a masked class gets 0"
        assert_close_to(g[~masked], g_left[~masked], rtol=1e-10, atol=1e-14, what=f"{name} grad")


def _teacher(t, top_k):
    if not top_k:
        return t, t
    k = 12 if t.shape[-1] > 16 else 3
    values, indices = t.topk(k, dim=-1)  # no masked class is among the k largest of any row
    assert torch.isfinite(values).all()
    values = values.detach().requires_grad_()
    return TopKTeacher(values, indices), values


@pytest.mark.parametrize("impl,device", TARGETS)
@pytest.mark.parametrize("top_k", [False, True], ids=["dense", "top-k"])
@pytest.mark.parametrize("hinton", [False, True], ids=["hydra", "hinton"])
def test_ops_match_the_reference_on_classes_masked_on_both_sides(impl, device, top_k, hinton, classes):
    """Loss per row and the student's and teacher's gradients (a random upstream per row) in float32 against the
    float64 reference, finite everywhere, 0 at every masked class."""
    z64, t64 = _logits(classes)
    if hinton:
        z64 = z64[:, 0]
    z = z64.float().to(device).requires_grad_()
    teacher, t_leaf = _teacher(t64.float().to(device).requires_grad_(), top_k)
    loss_fn = hinton_kl_loss if hinton else hydra_kl_loss
    loss = loss_fn(z, teacher, T, reduction="none", impl=impl)
    weight = torch.rand(loss.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    got = torch.autograd.grad((loss.double() * weight.to(device)).sum(), [z, t_leaf])

    ref_z = z64.clone().requires_grad_()
    ref_teacher, ref_leaf = _teacher(t64.clone().requires_grad_(), top_k)
    dense = ref_teacher.densify(classes) if top_k else ref_teacher
    ref_fn = R.hinton_kl_loss_ref if hinton else R.hydra_kl_loss_ref
    ref = ref_fn(ref_z, dense, T, reduction="none")
    want = torch.autograd.grad((ref * weight).sum(), [ref_z, ref_leaf])
    assert torch.isfinite(loss).all()
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-6, what="loss")
    for name, leaf, g, w in zip(("student", "teacher"), (z, t_leaf), got, want):
        assert torch.isfinite(g).all(), f"{name} grad"
        assert (g[torch.isneginf(leaf.detach())] == 0).all(), f"{name}: a masked class gets 0"
        assert_close_to(g, w, rtol=1e-5, atol=1e-7, what=f"{name} grad")


@pytest.mark.parametrize("impl,device", TARGETS)
def test_a_class_only_the_student_masks_makes_its_row_infinite(impl, device, classes):
    """The student rules out a class its member keeps: KL is +inf for that (row, head) and finite for the others
    (a mean over them is +inf, never NaN); the student's gradient stays T (q - p) scaled, q = 0 there (finite,
    eager's)."""
    z64, t64 = _logits(classes)
    z64[4, 2, classes - 1] = NEG_INF  # a class the teacher keeps in row 4, head 2
    z = z64.float().to(device).requires_grad_()
    t = t64.float().to(device)
    loss = hydra_kl_loss(z, t, T, reduction="none", impl=impl)
    infinite = torch.zeros(B, M, dtype=torch.bool)
    infinite[4, 2] = True
    assert torch.equal(torch.isposinf(loss).cpu(), infinite) and torch.isfinite(loss.cpu()[~infinite]).all()
    assert torch.isposinf(hydra_kl_loss(z, t, T, impl=impl))
    (g,) = torch.autograd.grad(hydra_kl_loss(z, t, T, impl=impl), z)
    ref_z = z64.clone().requires_grad_()
    (want,) = torch.autograd.grad(R.hydra_kl_loss_ref(ref_z, t64, T), ref_z)
    assert torch.isfinite(g).all() and torch.isfinite(want).all()
    assert_close_to(g, want, rtol=1e-5, atol=1e-8, what="student grad")


@pytest.mark.parametrize("impl,device,path", with_heads_paths(TARGETS))
@pytest.mark.parametrize("hidden", [None, 5], ids=["linear", "mlp"])
def test_heads_masked_by_their_bias(monkeypatch, impl, device, hidden, path, classes):
    """A head stack whose bias is -inf at the classes the members mask (a padded vocabulary): distill_loss's value
    and every gradient are the float64 reference's, finite, and the masked classes' bias gets 0."""
    use_heads_path(monkeypatch, path)
    torch.manual_seed(7)
    head = HydraHead(12, classes, M, hidden_features=hidden, impl=impl, device=device)
    with torch.no_grad():
        head.bias[:, classes - 3:] = NEG_INF
    x = torch.randn(9, 12, device=device)
    t = torch.randn(9, M, classes, device=device) * 3
    t[:, :, classes - 3:] = NEG_INF
    t[2, 1, 0] = NEG_INF  # and one the teacher alone masks
    loss = head.distill_loss(x.requires_grad_(), t, T)
    grads = torch.autograd.grad(loss * 1.3, [x, *params_of(head)])
    want, want_grads = reference_loss_and_grads(head, x, t, T, upstream=1.3)
    assert torch.isfinite(loss)
    assert_close_to(loss, want, rtol=2e-6, atol=1e-7, what="loss")
    for (name, _), g, w in zip([("x", None), *head.named_parameters()], grads, want_grads):
        assert torch.isfinite(g).all(), name
        assert_close_to(g, w, rtol=1e-5, atol=1e-7, what=f"{name} grad")
    assert (grads[-1][:, classes - 3:] == 0).all(), "a masked class's bias gets 0"
