"""Inputs made under ``torch.inference_mode()``, used in a training step outside it: the usual way to run a frozen
teacher (``with torch.inference_mode(): t = teacher(x)``), or a frozen body whose features feed the heads.

Autograd refuses to save such a tensor for the backward (it has no version counter), and until the thirty-ninth
session every fused op saved or version-stamped its teacher (and the heads' input, the row mask, a temperature
tensor): `distill_loss` with a teacher made that way failed with "Inference tensors do not track version counter"
(torch path) or "Inference tensors cannot be saved for backward" (Triton path), where eager torch on the same
inputs trains (its softmaxes save their own outputs). Each case below ran into one of those two errors then.

Every case is held against the float64 reference: the loss and each gradient asked for (the parameters', the
student logits', T's where it is learned), with the teacher dense or top-k, a row mask and T a tensor made there
too, on each heads path.
cpu tier: the torch path with the native kernel and with torch ops; interpret tier: the Triton kernels under
TRITON_INTERPRET=1; gpu tier: the same kernels compiled.
"""

import pytest
import torch
from helpers import assert_close_to, use_heads_path, with_heads_paths

from fasthydra import GaussianHydraHead, HydraHead, TopKTeacher, hinton_kl_loss, hydra_kl_loss, uncertainty
from fasthydra import reference as R

B, D, M, C, K = 9, 12, 3, 40, 6
TARGETS = [pytest.param("torch", "cpu", "1", marks=pytest.mark.cpu, id="torch-cpu-native-C"),
           pytest.param("torch", "cpu", "0", marks=pytest.mark.cpu, id="torch-cpu-torch-ops"),
           pytest.param("triton", "cpu", "1", marks=pytest.mark.interpret, id="triton-interpret"),
           pytest.param("triton", "cuda", "1", marks=pytest.mark.gpu, id="triton-gpu")]


def _made_in_inference_mode(*tensors):
    """Copies of `tensors` (None stays None) made under torch.inference_mode(): inference tensors."""
    with torch.inference_mode():
        out = tuple(None if t is None else t.clone() for t in tensors)
    assert all(t is None or t.is_inference() for t in out)
    return out


def _inputs(device, top_k: bool, masked: bool):
    """float64 features, teacher (dense (B, M, C), or its top-K classes with the rest -inf) and row mask (None or
    (B,) bool, two rows left out), and the teacher as the op takes it (TopKTeacher or dense), all on device."""
    g = torch.Generator().manual_seed(39)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    t = torch.randn(B, M, C, generator=g, dtype=torch.float64) * 3
    t[2, 1, 5] = float("-inf")
    given = t.float().to(device)
    if top_k:
        values, indices = t.topk(K, dim=-1)
        t = TopKTeacher(values, indices).densify(C)
        given = TopKTeacher(values.float().to(device), indices.to(device))
    mask = None
    if masked:
        mask = torch.ones(B, dtype=torch.bool)
        mask[[1, 6]] = False
    return x, t, given, mask


# (row mask, T's form): T a number, a tensor made under inference_mode, or a learned tensor (its gradient checked)
FORMS = [(False, "number"), (True, "inference-tensor"), (False, "learned")]
FORM_IDS = ["plain", "row-mask-T-tensor", "T-learned"]


def _temperature(form: str, value: float, device):
    """T as the op takes it and as the float64 reference takes it (a tensor that requires grad where learned)."""
    if form == "number":
        return value, value
    if form == "inference-tensor":
        return _made_in_inference_mode(torch.tensor(value, device=device))[0], value
    return (torch.tensor(value, device=device, requires_grad=True),
            torch.tensor(value, dtype=torch.float64, requires_grad=True))


def _assert_t_grad(got, want, loss, upstream: float, temperature: float, what: str):
    """dL/dT = (2 L up - sum <g, x>) / T over the logits x and their gradients g (functional._LearnedT): a
    difference of two terms each near 2 L up / T, here 10 to 50 times dL/dT itself. fp32's rounding of L and of the
    dots (a unit in the last place of each) lands on dL/dT magnified by that ratio, so its error is held to 1e-5 of
    those terms, not of itself: on an AMD EPYC host the native C path's Hinton loss, 2.7e-7 off (one ulp), moved
    dL/dT by 1.4e-6, 1.2e-5 of its value, where another host's rounding had stayed inside that."""
    want = float(want)
    scale = abs(want) + 2 * abs(upstream * float(loss)) / temperature
    err = abs(float(got) - want)
    assert err <= 1e-7 + 1e-5 * scale, f"{what}: error {err:.3e} > 1e-7 + 1e-5 * {scale:.3e}"


def _kept(mask, *tensors):
    return tuple(v if mask is None else v[mask.to(v.device)] for v in tensors)


@pytest.mark.parametrize("impl,device,native,path", with_heads_paths(TARGETS))
@pytest.mark.parametrize("hidden", [None, 5], ids=["linear", "mlp"])
@pytest.mark.parametrize("teacher_kind", ["dense", "top-k"])
@pytest.mark.parametrize("masked,t_form", FORMS, ids=FORM_IDS)
def test_heads_train_on_a_teacher_made_in_inference_mode(monkeypatch, impl, device, native, path, hidden,
                                                         teacher_kind, masked, t_form):
    """distill_loss of features, teacher, row mask and T all made under inference_mode (or T learned): loss and
    the heads' gradients (x cannot take one; T's where learned) are the float64 reference's on the kept rows; a
    second backward through the retained graph gives them again."""
    monkeypatch.setenv("FASTHYDRA_NATIVE", native)
    use_heads_path(monkeypatch, path)
    torch.manual_seed(3)
    head = HydraHead(D, C, M, hidden_features=hidden, impl=impl, device=device)
    x64, t64, given, mask = _inputs(device, teacher_kind == "top-k", masked)
    temperature = 1.7
    x, t_given, row_mask = _made_in_inference_mode(
        x64.float().to(device), given.values if teacher_kind == "top-k" else given,
        None if mask is None else mask.to(device))
    if teacher_kind == "top-k":
        t_given = TopKTeacher(t_given, _made_in_inference_mode(given.indices)[0])
    temp, temp64 = _temperature(t_form, temperature, device)
    loss = head.distill_loss(x, t_given, temp, row_mask=row_mask)
    params = [p for _, p in head.named_parameters()] + ([temp] if t_form == "learned" else [])
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    again = torch.autograd.grad(loss, params)

    p64 = {n: p.detach().double().cpu().requires_grad_() for n, p in head.named_parameters()}
    xk, tk = _kept(mask, x64, t64)
    z = (R.mlp_heads_ref(xk, p64["hidden_weight"], p64.get("hidden_bias"), p64["weight"], p64.get("bias"))
         if hidden else R.linear_heads_ref(xk, p64["weight"], p64.get("bias")))
    want = R.hydra_kl_loss_ref(z, tk, temp64)
    want_grads = torch.autograd.grad(want, list(p64.values()) + ([temp64] if t_form == "learned" else []))
    assert_close_to(loss, want, rtol=2e-6, atol=1e-7, what="loss")
    for name, g, g2, w in zip(p64, grads, again, want_grads):
        assert_close_to(g, w, rtol=1e-5, atol=1e-7, what=f"{name} grad")
        assert_close_to(g2, w, rtol=1e-5, atol=1e-7, what=f"{name} grad, second backward")
    if t_form == "learned":
        _assert_t_grad(grads[-1], want_grads[-1], want, 1.0, temperature, "T grad")
        _assert_t_grad(again[-1], want_grads[-1], want, 1.0, temperature, "T grad, second backward")


@pytest.mark.parametrize("impl,device,native", TARGETS)
@pytest.mark.parametrize("loss_name", ["hydra", "hinton"])
@pytest.mark.parametrize("teacher_kind", ["dense", "top-k"])
@pytest.mark.parametrize("masked,t_form", FORMS, ids=FORM_IDS)
def test_losses_on_logits_train_on_a_teacher_made_in_inference_mode(monkeypatch, impl, device, native, loss_name,
                                                                    teacher_kind, masked, t_form):
    """hydra_kl_loss and hinton_kl_loss of student logits that require grad against a teacher (and row mask, T)
    made under inference_mode (or T learned): loss, dL/dz (and dL/dT) are the float64 reference's."""
    monkeypatch.setenv("FASTHYDRA_NATIVE", native)
    x64, t64, given, mask = _inputs(device, teacher_kind == "top-k", masked)
    shape = (B, M, C) if loss_name == "hydra" else (B, C)
    z64 = torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2
    temperature = 2.3
    t_given, row_mask = _made_in_inference_mode(given.values if teacher_kind == "top-k" else given,
                                                None if mask is None else mask.to(device))
    if teacher_kind == "top-k":
        t_given = TopKTeacher(t_given, _made_in_inference_mode(given.indices)[0])
    temp, temp64 = _temperature(t_form, temperature, device)
    z = z64.float().to(device).requires_grad_()
    fn, ref = (hydra_kl_loss, R.hydra_kl_loss_ref) if loss_name == "hydra" else (hinton_kl_loss, R.hinton_kl_loss_ref)
    loss = fn(z, t_given, temp, impl=impl, row_mask=row_mask)
    learned = [temp] if t_form == "learned" else []
    grads = torch.autograd.grad(loss * 1.5, [z, *learned])

    z_ref = z64.clone().requires_grad_()
    zk, tk = _kept(mask, z_ref, t64)
    want = ref(zk, tk, temp64)
    want_grads = torch.autograd.grad(want * 1.5, [z_ref, *([temp64] if learned else [])])
    assert_close_to(loss, want, rtol=2e-6, atol=1e-7, what="loss")
    assert_close_to(grads[0], want_grads[0], rtol=1e-5, atol=1e-7, what="dL/dz")
    if learned:
        _assert_t_grad(grads[1], want_grads[1], want, 1.5, temperature, "dL/dT")


@pytest.mark.parametrize("impl,device,native,path", with_heads_paths(TARGETS))
def test_heads_logits_and_gaussian_heads_on_inputs_made_in_inference_mode(monkeypatch, impl, device, native, path):
    """Features from a body run under inference_mode: the heads' logits (the weight's gradient of a loss on them
    needs the features, which eager nn.Linear cannot save: it refuses) and the Gaussian heads' loss against a
    teacher mean and variance made there too, both against float64; `uncertainty` with T a tensor made there."""
    monkeypatch.setenv("FASTHYDRA_NATIVE", native)
    use_heads_path(monkeypatch, path)
    torch.manual_seed(5)
    x64 = torch.randn(B, D, dtype=torch.float64)
    head = HydraHead(D, C, M, impl=impl, device=device)
    (x,) = _made_in_inference_mode(x64.float().to(device))
    up = torch.randn(B, M, C, dtype=torch.float64)
    (g_w,) = torch.autograd.grad((head(x) * up.float().to(device)).sum(), head.weight)
    w64 = head.weight.detach().double().cpu().requires_grad_()
    (want_w,) = torch.autograd.grad((R.linear_heads_ref(x64, w64, head.bias.detach().double().cpu()) * up).sum(), w64)
    assert_close_to(g_w, want_w, rtol=1e-5, atol=1e-7, what="heads' weight grad")

    gauss = GaussianHydraHead(D, 4, M, impl=impl, device=device)
    mean64, var64 = torch.randn(B, M, 4, dtype=torch.float64), torch.rand(B, M, 4, dtype=torch.float64) + 0.2
    tm, tv = _made_in_inference_mode(mean64.float().to(device), var64.float().to(device))
    loss = gauss.distill_loss(x, tm, tv)
    grads = torch.autograd.grad(loss, [gauss.weight, gauss.bias])
    fresh = [p.detach().clone().requires_grad_() for p in (gauss.weight, gauss.bias)]
    with monkeypatch.context() as m:  # the same head on ordinary copies of the same inputs, float64 on the CPU
        m.setenv("FASTHYDRA_NATIVE", "1")
        twin = GaussianHydraHead(D, 4, M, impl="torch", dtype=torch.float64)
        with torch.no_grad():
            twin.weight.copy_(fresh[0]), twin.bias.copy_(fresh[1])
        want = twin.distill_loss(x64, mean64, var64)
        want_grads = torch.autograd.grad(want, [twin.weight, twin.bias])
    assert_close_to(loss, want, rtol=2e-6, atol=1e-7, what="gaussian loss")
    for name, g, w in zip(("weight", "bias"), grads, want_grads):
        assert_close_to(g, w, rtol=1e-5, atol=1e-7, what=f"gaussian {name} grad")

    z64 = torch.randn(B, M, C, dtype=torch.float64) * 2
    z = z64.float().to(device).requires_grad_()
    (temp,) = _made_in_inference_mode(torch.tensor(1.3))
    got = uncertainty(z, temp, impl=impl)
    (grad,) = torch.autograd.grad(sum(w * v.sum() for w, v in zip((0.5, 1.0, 2.5, -1.5), got)), z)
    z_ref = z64.clone().requires_grad_()
    want = R.uncertainty_ref(z_ref, 1.3)
    (want_grad,) = torch.autograd.grad(sum(w * v.sum() for w, v in zip((0.5, 1.0, 2.5, -1.5), want)), z_ref)
    assert_close_to(grad, want_grad, rtol=1e-5, atol=1e-7, what="uncertainty grad")
