"""Leading dimensions: the losses on given outputs and `uncertainty` take (*, M, C) as the modules return it
((B, T, M, C) for a (B, T, D) batch of sequences), with row_mask shaped (*) and "none" shaped (*, M); at least
one leading dimension (a (B, C) tensor where (B, M, C) was meant stays an error). Each is held to the float64
reference over the same rows flattened to (rows, M, C), in value and in every gradient, on leading dimensions
that are not contiguous too (a transposed (T, B) batch).

cpu tier: the torch path; interpret tier: the Triton kernels.
"""

import math

import pytest
import torch
from helpers import assert_close_to

from fasthydra import HydraHead, TopKTeacher, hinton_kl_loss, hydra_kl_loss, uncertainty
from fasthydra import reference as R
from fasthydra.functional import gaussian_kl_loss

IMPLS = [pytest.param("torch", marks=pytest.mark.cpu), pytest.param("triton", marks=pytest.mark.interpret)]
M, C, K, T = 3, 13, 5, 2.0
# (leading shape, whether the tensors are transposed views): a sequence batch, three leading dimensions,
# one row of one sequence, an empty batch, and a (T, B)-major batch seen as (B, T)
LEADS = [((3, 5), False), ((2, 1, 4), False), ((1, 1), False), ((0, 3), False), ((3, 5), True)]
LEAD_IDS = ["B,T", "3-dims", "one-row", "empty", "B,T-transposed"]


def _draw(lead, tail, transposed, seed, scale=3.0):
    """A float32 tensor of shape lead + tail; transposed: a view whose first two dimensions are swapped."""
    g = torch.Generator().manual_seed(seed)
    if transposed:
        return (torch.randn(lead[1], lead[0], *tail, generator=g) * scale).transpose(0, 1)
    return torch.randn(*lead, *tail, generator=g) * scale


def _mask(lead, seed, transposed=False):
    """A row mask of shape lead (transposed: a view of a (T, B) mask), its first entry kept, its last not."""
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(lead[1], lead[0], generator=g) > 0.4).T if transposed else torch.rand(lead, generator=g) > 0.4
    if keep.numel():
        keep[(0,) * len(lead)], keep[tuple(d - 1 for d in lead)] = True, False
    return keep


def _masked_reference(rows, keep, reduction, per_row_entries):
    """rows (N, ...) float64 loss rows, keep (N,) or None: the op's reduction over the kept rows."""
    if keep is not None:
        rows = torch.where(keep.view(-1, *(1,) * (rows.dim() - 1)), rows, 0.0)
    if reduction == "none":
        return rows
    kept = rows.shape[0] if keep is None else int(keep.sum())
    return rows.sum() / max(kept * per_row_entries, 1)


def _grads(loss, leaves, reduction, seed):
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=loss.dtype) \
        if reduction == "none" else torch.tensor(0.7, dtype=loss.dtype)
    return torch.autograd.grad(loss, leaves, up, allow_unused=True), up


def _check_grads(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_to(g, w, rtol=1e-5, atol=1e-7, what=f"{what}: gradient {i}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["frozen", "grad", "topk"])
@pytest.mark.parametrize("lead,transposed", LEADS, ids=LEAD_IDS)
def test_hydra_loss_on_leading_dims(impl, kind, lead, transposed):
    z = _draw(lead, (M, C), transposed, 1).requires_grad_()
    dense = _draw(lead, (M, C), transposed, 2)
    if kind == "topk":
        values, indices = dense.topk(4, dim=-1)
        teacher, leaf = TopKTeacher(values.requires_grad_(), indices), values
        dense64 = TopKTeacher(values.detach().double(), indices)
    else:
        teacher = leaf = dense.requires_grad_(kind == "grad")
    n = math.prod(lead)
    for reduction in ("mean", "none"):
        for masked in (False, True):
            keep = _mask(lead, 3, transposed) if masked else None
            loss = hydra_kl_loss(z, teacher, T, reduction, impl=impl, row_mask=keep)
            assert loss.shape == ((*lead, M) if reduction == "none" else ())
            wants = [z] + ([leaf] if kind != "frozen" else [])
            got, up = _grads(loss, wants, reduction, 4)
            # the reference: the same rows flattened, in float64
            z64 = z.detach().double().reshape(n, M, C).requires_grad_()
            t_src = dense64.values if kind == "topk" else leaf.detach().double()
            t_leaf = t_src.reshape(n, M, t_src.shape[-1])
            t_leaf.requires_grad_(kind != "frozen")
            t64 = TopKTeacher(t_leaf, indices.reshape(t_leaf.shape)).densify(C) if kind == "topk" else t_leaf
            rows = R.hydra_kl_loss_ref(z64, t64, T, reduction="none")
            ref = _masked_reference(rows, None if keep is None else keep.reshape(n), reduction, M)
            what = f"{impl} {kind} {lead} {reduction} masked={masked}"
            assert_close_to(loss, ref.reshape(loss.shape), rtol=1e-5, atol=1e-6, what=what)
            ref_grads = torch.autograd.grad(ref, [z64] + ([t_leaf] if kind != "frozen" else []),
                                            up.double().reshape(ref.shape), allow_unused=True)
            _check_grads(got, [r.reshape(g.shape) for r, g in zip(ref_grads, got)], what)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("form", ["(*, C)", "(*, 1, C)"])
@pytest.mark.parametrize("kind", ["frozen", "topk"])
@pytest.mark.parametrize("lead,transposed", LEADS, ids=LEAD_IDS)
def test_hinton_loss_on_leading_dims(impl, form, kind, lead, transposed):
    z = _draw(lead, (C,) if form == "(*, C)" else (1, C), transposed, 5).requires_grad_()
    dense = _draw(lead, (M, C), transposed, 6)
    teacher = TopKTeacher(*dense.topk(4, dim=-1)) if kind == "topk" else dense
    t64 = (teacher.densify(C) if kind == "topk" else dense).double().reshape(math.prod(lead), M, C)
    n = math.prod(lead)
    for reduction in ("mean", "none"):
        for masked in (False, True):
            keep = _mask(lead, 7, transposed) if masked else None
            loss = hinton_kl_loss(z, teacher, T, reduction, impl=impl, row_mask=keep)
            assert loss.shape == (lead if reduction == "none" else ())
            (got,), up = _grads(loss, [z], reduction, 8)
            z64 = z.detach().double().reshape(n, C).requires_grad_()
            rows = R.hinton_kl_loss_ref(z64, t64, T, reduction="none")
            ref = _masked_reference(rows, None if keep is None else keep.reshape(n), reduction, 1)
            what = f"{impl} {form} {kind} {lead} {reduction} masked={masked}"
            assert_close_to(loss, ref.reshape(loss.shape), rtol=1e-5, atol=1e-6, what=what)
            (want,) = torch.autograd.grad(ref, [z64], up.double().reshape(ref.shape))
            _check_grads([got], [want.reshape(got.shape)], what)


@pytest.mark.cpu
@pytest.mark.parametrize("lead,transposed", LEADS, ids=LEAD_IDS)
def test_gaussian_loss_on_leading_dims(lead, transposed):
    mean = _draw(lead, (M, K), transposed, 9, 1.0).requires_grad_()
    var = (_draw(lead, (M, K), transposed, 10, 1.0).exp() + 0.1).requires_grad_()
    t_mean, t_var = _draw(lead, (M, K), transposed, 11, 1.0), _draw(lead, (M, K), transposed, 12, 1.0).exp() + 0.1
    n = math.prod(lead)
    for reduction in ("mean", "none"):
        for masked in (False, True):
            keep = _mask(lead, 13, transposed) if masked else None
            loss = gaussian_kl_loss(mean, var, t_mean, t_var, reduction, row_mask=keep)
            assert loss.shape == ((*lead, M, K) if reduction == "none" else ())
            got, up = _grads(loss, [mean, var], reduction, 14)
            m64, v64 = (t.detach().double().reshape(n, M, K).requires_grad_() for t in (mean, var))
            tm, tv = (t.double().reshape(n, M, K) for t in (t_mean, t_var))
            rows = 0.5 * (torch.log(v64 / tv) + (tv + (tm - m64) ** 2) / v64 - 1)
            ref = _masked_reference(rows, None if keep is None else keep.reshape(n), reduction, M * K)
            what = f"gaussian {lead} {reduction} masked={masked}"
            assert_close_to(loss, ref.reshape(loss.shape), rtol=1e-5, atol=1e-6, what=what)
            want = torch.autograd.grad(ref, [m64, v64], up.double().reshape(ref.shape))
            _check_grads(got, [w.reshape(g.shape) for w, g in zip(want, got)], what)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lead,transposed", LEADS, ids=LEAD_IDS)
def test_uncertainty_on_leading_dims(impl, lead, transposed):
    z = _draw(lead, (M, C), transposed, 15)
    u = uncertainty(z, impl=impl)
    ref = R.uncertainty_ref(z.double().reshape(math.prod(lead), M, C))
    assert u.probs.shape == (*lead, C)
    for name, got, want in zip(u._fields, u, ref):
        assert_close_to(got, want.reshape(got.shape), rtol=1e-5, atol=1e-6, what=f"{impl} {lead} {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hidden", [None, 6])
def test_distill_loss_equals_the_loss_on_the_modules_output_for_sequences(impl, hidden):
    """The documented equality ``head.distill_loss(x, t) == hydra_kl_loss(head(x), t)`` for x (B, T, D),
    masked and "none" too, in value and in the gradients of x and every parameter."""
    torch.manual_seed(16)
    head = HydraHead(7, C, M, hidden_features=hidden, impl=impl)
    x = torch.randn(3, 5, 7, requires_grad=True)
    t = torch.randn(3, 5, M, C) * 3
    keep = _mask((3, 5), 17)
    leaves = [x, *head.parameters()]
    for reduction in ("mean", "sum", "none"):
        fused = head.distill_loss(x, t, T, reduction, row_mask=keep)
        plain = hydra_kl_loss(head(x), t, T, reduction, impl=impl, row_mask=keep)
        assert fused.shape == plain.shape == ((3, 5, M) if reduction == "none" else ())
        assert_close_to(fused, plain, rtol=1e-5, atol=1e-6, what=f"{reduction} loss")
        up = torch.rand(fused.shape)
        _check_grads(torch.autograd.grad(fused, leaves, up), torch.autograd.grad(plain, leaves, up), reduction)


@pytest.mark.cpu
def test_leading_shapes_must_agree():
    z, t = torch.randn(3, 5, M, C), torch.randn(3, 5, M, C)
    with pytest.raises(ValueError, match=r"row_mask must have shape \(3, 5\), student_logits's leading shape"):
        hydra_kl_loss(z, t, row_mask=torch.ones(15, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(3, 5, 3, 13\) and \(5, 3, 3, 13\) \(batch \(leading dimensions\)"):
        hydra_kl_loss(z, t.transpose(0, 1))
    with pytest.raises(ValueError, match=r"must have shape \(3, 5, 3\) \+ \(k,\); got \(15, 3, 4\)"):
        hydra_kl_loss(z, TopKTeacher(*t.reshape(15, M, C).topk(4, dim=-1)))
    with pytest.raises(ValueError, match=r"with \* = \(3, 5\)"):
        hinton_kl_loss(torch.randn(15, C), t)
    with pytest.raises(ValueError, match=r"row_mask must have shape \(3, 5\)"):
        hinton_kl_loss(torch.randn(3, 5, C), t, row_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"share one shape \(\*, M, K\)"):
        gaussian_kl_loss(z, z.exp(), z.reshape(15, M, C), z.exp())
    with pytest.raises(ValueError, match=r"logits must have shape \(\*, M, C\) with at least one leading"):
        uncertainty(torch.randn(M, C))  # (B, C) logits of one head, say: not one row of B heads


@pytest.mark.cpu
def test_a_tensor_without_its_heads_axis_stays_an_error():
    """(B, C) where (B, M, C) was meant would read as one row of B heads: refused, naming the argument."""
    z, t = torch.randn(6, C), torch.randn(6, C)
    with pytest.raises(ValueError, match=r"student_logits must have shape \(\*, M, C\) with at least one"):
        hydra_kl_loss(z, t)
    with pytest.raises(ValueError, match=r"teacher_logits must have shape \(\*, M, C\) with at least one"):
        hinton_kl_loss(z, t)
    with pytest.raises(ValueError, match=r"teacher_logits.values must have shape \(\*, M, k\) with at least"):
        hinton_kl_loss(z, TopKTeacher(*t.topk(3, dim=-1)))
    with pytest.raises(ValueError, match=r"mean must have shape \(\*, M, K\) with at least one"):
        gaussian_kl_loss(z, z.exp(), t, t.exp())
    with pytest.raises(ValueError, match=r"logits must have shape \(\*, M, C\) with at least one"):
        uncertainty(z)


def _bad_teachers(lead):
    """Teacher logits of shape lead + (M, C): one with a NaN, one with a row that is -inf everywhere, both in
    the last leading index and head 1 (so that a flattened row index would differ from the caller's)."""
    where = tuple(d - 1 for d in lead)
    nan, dead = torch.randn(*lead, M, C) * 3, torch.randn(*lead, M, C) * 3
    nan[(*where, 1, 4)] = float("nan")
    dead[(*where, 1)] = float("-inf")
    return nan, dead, (*where, 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("deferred", [False, True], ids=["at-once", "deferred"])
@pytest.mark.parametrize("op", ["hydra", "hydra-topk", "hinton", "hinton-topk", "distill", "distill-mlp",
                                "distill-none", "gaussian-head"])
def test_value_errors_name_the_shape_the_caller_passed(monkeypatch, impl, deferred, op):
    """A bad teacher of a sequence batch is reported with the caller's shape (B, T, M, C) and index (b, t, m),
    not the (B*T, M, C) rows the ops run on; at once (CPU) and through the deferred error word (the GPU's)."""
    from fasthydra.ops import checks

    if deferred:
        monkeypatch.setattr(checks, "_DEFER_ON_CPU", True)
        monkeypatch.setattr(checks, "COPY_INTERVAL_S", 0.0)
    checks._flags.clear()
    lead = (2, 3)
    nan, dead, index = _bad_teachers(lead)
    head = HydraHead(7, C, M, hidden_features=6 if op == "distill-mlp" else None, impl=impl)
    x = torch.randn(*lead, 7)
    topk = lambda t: TopKTeacher(*t.topk(4, dim=-1))  # noqa: E731
    run = {"hydra": lambda t: hydra_kl_loss(torch.randn(*lead, M, C), t, T, impl=impl),
           "hydra-topk": lambda t: hydra_kl_loss(torch.randn(*lead, M, C), topk(t), T, impl=impl),
           "hinton": lambda t: hinton_kl_loss(torch.randn(*lead, C), t, T, impl=impl),
           "hinton-topk": lambda t: hinton_kl_loss(torch.randn(*lead, C), topk(t), T, impl=impl),
           "distill": lambda t: head.distill_loss(x, t, T),
           "distill-mlp": lambda t: head.distill_loss(x, t, T),
           "distill-none": lambda t: head.distill_loss(x, t, T, reduction="none")}.get(op)
    shape = (*lead, M, 4 if op.endswith("topk") else C)
    if op == "gaussian-head":
        from fasthydra import GaussianHydraHead

        gauss, shape = GaussianHydraHead(7, 2, M, impl=impl), (*lead, M, 2)
        var = torch.rand(shape) + 0.1
        var[1, 2, 1, 0] = -1.0
        bad = [lambda: gauss.distill_loss(x, torch.randn(shape), var)]
    else:
        bad = [lambda: run(nan), lambda: run(dead)]
    for call in bad:
        with pytest.raises(ValueError) as err:
            call()
            checks.raise_pending_errors(sync=True)  # deferred: the word's verdict, read on demand
        message = str(err.value)
        assert str(shape) in message and f"({2 * 3}, " not in message, message
        if "at index" in message:
            assert f"at index {index}" in message, message
    if not deferred and op == "hydra" and impl == "torch":
        assert f"at index {index}" in message  # the torch path's immediate check names the row
    checks._flags.clear()
