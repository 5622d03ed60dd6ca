"""gpu tier: the Triton kernels on CUDA in bf16/fp16/fp32 against a float64 reference.

Tolerance rule (DESIGN section 5, flash-attention's): the kernel's error against float64 is at most
twice the error of the eager reference run in the same low precision, plus a small atol.
Skipped without CUDA.
"""

import pytest
import torch
from helpers import HEADS_PATHS, params_of, teacher_logits, tolerance_rule, use_heads_path

from fasthydra import HydraHead, hydra_kl_loss, uncertainty
from fasthydra import reference as R
from fasthydra.reference import TopKTeacher

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, D, M, C, hidden): the odd shape, small C, a C of several tiles, M = 1, MLP heads, a large C.
CASES = [(37, 45, 5, 13, None), (512, 512, 10, 10, None), (256, 128, 4, 1000, None), (64, 64, 1, 100, None),
         (128, 96, 4, 50, 32), (64, 256, 2, 32000, None)]


def _eager(head, x, t, temperature):
    """The eager per-head reference in the head's own dtype: the error budget of the rule."""
    p = dict(head.named_parameters())
    if head.is_mlp:
        z = R.mlp_heads_ref(x, p["hidden_weight"], p.get("hidden_bias"), p["weight"], p.get("bias"))
    else:
        z = R.linear_heads_ref(x, p["weight"], p.get("bias"))
    return R.hydra_kl_loss_ref(z, t.to(z.dtype), temperature)


def _check_heads_against_float64(b, d, m, c, hidden, dtype, keep=None):
    """distill_loss and its gradients in `dtype` on CUDA, held to the tolerance rule against float64. With a
    row mask `keep` (B,): x is NaN on the rows left out, the references run on the kept rows alone, and the
    rows left out must get input gradients of exactly 0."""
    head = HydraHead(d, c, m, hidden_features=hidden, impl="triton", device="cuda", dtype=dtype)
    x = torch.randn(b, d, device="cuda", dtype=dtype)
    if keep is not None:
        x[~keep] = float("nan")
    x.requires_grad_()
    t = teacher_logits(b, m, c, device="cuda", dtype=dtype)
    loss = head.distill_loss(x, t, temperature=2.0, row_mask=keep)
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    if keep is not None:
        assert torch.equal(grads[0][~keep], torch.zeros_like(grads[0][~keep]))
        grads = (grads[0][keep], *grads[1:])
        x, t = x.detach()[keep].requires_grad_(), t[keep]
    eager = _eager(head, x, t, 2.0)
    grads_eager = torch.autograd.grad(eager, [x, *params_of(head)])
    head64 = HydraHead(d, c, m, hidden_features=hidden, impl="torch", device="cuda", dtype=torch.float64)
    head64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    exact = _eager(head64, x64, t.double(), 2.0)
    grads_exact = torch.autograd.grad(exact, [x64, *params_of(head64)])
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    tolerance_rule(loss, eager, exact, atol * max(1.0, exact.abs().item()), what="loss")
    for name, g, ge, gx in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_eager, grads_exact):
        tolerance_rule(g, ge, gx, atol * gx.abs().max().item(), what=name)


@pytest.mark.parametrize("b,d,m,c,hidden", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_heads_tolerance_rule(b, d, m, c, hidden, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_heads_against_float64(b, d, m, c, hidden, dtype)


@pytest.mark.parametrize("b,d,m,c,hidden", [(37, 45, 5, 13, None), (256, 128, 4, 1000, None), (128, 96, 4, 50, 32),
                                            (64, 256, 2, 32000, None)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_mask_tolerance_rule(b, d, m, c, hidden, dtype):
    """A masked distill_loss (the cuBLAS path, the rows left out zeroed in dz) against the loss over the kept rows
    alone."""
    torch.backends.cuda.matmul.allow_tf32 = False
    keep = torch.rand(b, device="cuda", generator=torch.Generator(device="cuda").manual_seed(b)) < 0.7
    keep[0] = True
    _check_heads_against_float64(b, d, m, c, hidden, dtype, keep)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,c", [(300, 8, 10), (64, 4, 5000), (16, 2, 70000)])
def test_logits_kernel_tolerance_rule(b, m, c, dtype):
    z = (torch.randn(b, m, c, device="cuda") * 3).to(dtype).requires_grad_()
    t = teacher_logits(b, m, c, device="cuda", dtype=dtype)
    _check_logits_loss(z, t, t, 1e-6)


def _check_masked_logits(b, m, c, dtype, kind, device="cuda"):
    """hydra_kl_loss (kind "dense": a frozen teacher, the gradient formed in the backward; "topk") and
    hinton_kl_loss with a row mask, the kernels reading it: the rows left out (NaN, as a model's output at
    fully masked positions) get gradient exactly 0, the rest within the tolerance rule of the loss over the
    kept rows alone."""
    from fasthydra import hinton_kl_loss

    gen = torch.Generator(device=device).manual_seed(b + c)
    keep = torch.rand(b, device=device, generator=gen) < 0.7
    keep[0] = True
    t = teacher_logits(b, m, c, device=device, dtype=dtype)
    if kind == "topk":
        values, indices = t.float().nan_to_num(neginf=-1e4).topk(min(16, c), dim=-1)
        teacher = TopKTeacher(values.to(dtype), indices.int())
        t = teacher.densify(c)
    else:
        teacher = t
    for fn, ref, zshape in ((hydra_kl_loss, R.hydra_kl_loss_ref, (b, m, c)),
                            (hinton_kl_loss, R.hinton_kl_loss_ref, (b, c))):
        z = (torch.randn(zshape, device=device, generator=gen) * 3).to(dtype)
        z[~keep] = float("nan")
        z.requires_grad_()
        loss = fn(z, teacher, 1.5, impl="triton", row_mask=keep)
        (g,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.equal(g[~keep], torch.zeros_like(g[~keep])), fn.__name__
        zk = z.detach()[keep].requires_grad_()
        eager = ref(zk, t[keep], 1.5)
        (ge,) = torch.autograd.grad(eager, zk)
        z64 = zk.detach().double().requires_grad_()
        exact = ref(z64, t[keep].double(), 1.5)
        (gx,) = torch.autograd.grad(exact, z64)
        tolerance_rule(loss, eager, exact, 1e-5 * max(1.0, exact.abs().item()), what=f"{fn.__name__} loss")
        tolerance_rule(g[keep], ge, gx, 1e-3 * gx.abs().max().item(), what=f"{fn.__name__} grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,c", [(300, 8, 10), (64, 4, 5000), (16, 2, 70000)])
@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_masked_logits_kernels_tolerance_rule(b, m, c, dtype, kind):
    _check_masked_logits(b, m, c, dtype, kind)


def _check_logits_loss(z, teacher, dense_teacher, loss_atol):
    """hydra_kl_loss on the GPU against eager in z's dtype and float64 (the tolerance rule), for a
    dense or top-k teacher whose dense form is dense_teacher."""
    _check_loss_on_logits(z, lambda zz: hydra_kl_loss(zz, teacher, 1.5, impl="triton"),
                          lambda zz, t64: R.hydra_kl_loss_ref(zz, t64, 1.5), dense_teacher, loss_atol, 1e-3)


def _check_loss_on_logits(z, kernel_loss, reference_loss, dense_teacher, loss_atol, grad_atol):
    """kernel_loss(z) and its gradient against reference_loss(z, teacher) run eagerly in z's dtype and
    in float64: the tolerance rule, atols relative to the float64 values."""
    loss = kernel_loss(z)
    (g,) = torch.autograd.grad(loss, z)
    eager = reference_loss(z, dense_teacher)
    (ge,) = torch.autograd.grad(eager, z)
    z64 = z.detach().double().requires_grad_()
    exact = reference_loss(z64, dense_teacher.double())
    (gx,) = torch.autograd.grad(exact, z64)
    tolerance_rule(loss, eager, exact, loss_atol * max(1.0, exact.abs().item()), what="loss")
    tolerance_rule(g, ge, gx, grad_atol * gx.abs().max().item(), what="grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,c,scale,atol,split", [(500, 8, 1000, 3.0, 1e-5, False), (64, 4, 32000, 1.0, 3e-6, False),
                                                    (64, 4, 32000, 1.0, 3e-6, True), (2048, 3, 20000, 1.0, 3e-6, True)])
def test_uncertainty_tolerance_rule(monkeypatch, dtype, b, m, c, scale, atol, split):
    """The rule at rows held in registers and at long rows (32000 classes: per-thread running sums over tiles,
    where the CPU kernel's float lanes, chained over a row, were 2x to 4x eager's error; atol 3e-6 against entropies
    of about 10 there, 2.5 float32 ulps: interpreted, the Triton kernel's largest errors are 0.15x to 1.05x eager
    float32's, about 2e-6, and the chip's approximate exp2 adds its own). split: long rows in two launches
    (_common.UNCERTAINTY_SPLIT), with 16 class blocks a row (64 rows) and with one (2048 rows)."""
    from fasthydra.ops import _common

    monkeypatch.setattr(_common, "UNCERTAINTY_SPLIT", split)
    if split:
        assert _common.uncertainty_split_config(m, c, b)["col_blocks"] == (16 if b == 64 else 1)
    z = (torch.randn(b, m, c, device="cuda") * scale).to(dtype)
    got = uncertainty(z, impl="triton")
    eager = R.uncertainty_ref(z)
    exact = R.uncertainty_ref(z.double())
    for name in ("probs", "total", "aleatoric", "epistemic"):
        tolerance_rule(getattr(got, name), getattr(eager, name), getattr(exact, name), atol, what=name)


def test_auto_picks_triton_on_cuda():
    from fasthydra.functional import resolve_impl

    assert resolve_impl("auto", torch.zeros(1, device="cuda")) == "triton"


@pytest.mark.parametrize("gemm", HEADS_PATHS)
@pytest.mark.parametrize("b,d,m,c,hidden", [(37, 45, 5, 13, None), (64, 64, 1, 50257, None), (128, 96, 4, 50, 32)])
def test_heads_paths_tolerance_rule(monkeypatch, gemm, b, d, m, c, hidden):
    """The small-step path (where it fits) and the cuBLAS + loss-kernel path, bf16, odd and
    vocabulary-sized C."""
    use_heads_path(monkeypatch, gemm)
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_heads_against_float64(b, d, m, c, hidden, torch.bfloat16)


@pytest.mark.parametrize("gemm", HEADS_PATHS)
@pytest.mark.parametrize("upstream", [1.0, 0.7])
@pytest.mark.parametrize("b,d,m,c", [(37, 45, 5, 13), (64, 256, 2, 32000)])
def test_backward_scales_stored_gradients_on_the_device(monkeypatch, gemm, upstream, b, d, m, c):
    """loss.backward() into .grad, upstream 1 and 0.7: on the cuBLAS path the stored gradients pass
    _scale_unless_one_kernel (untouched for 1, scaled in place for 0.7) and become the parameters' .grad;
    on the small-step path launch 2 runs in the backward and reads the upstream gradient; a second
    backward through the retained graph gives them again (gradients accumulate to twice the first).
    bf16 against float64."""
    use_heads_path(monkeypatch, gemm)
    torch.backends.cuda.matmul.allow_tf32 = False
    head = HydraHead(d, c, m, impl="triton", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(b, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = teacher_logits(b, m, c, device="cuda", dtype=torch.bfloat16)
    loss = head.distill_loss(x, t, temperature=2.0) * upstream
    loss.backward(retain_graph=True)
    got = [x.grad.clone()] + [p.grad.clone() for p in params_of(head)]
    eager = _eager(head, x, t, 2.0) * upstream
    grads_eager = torch.autograd.grad(eager, [x, *params_of(head)])
    head64 = HydraHead(d, c, m, impl="torch", device="cuda", dtype=torch.float64)
    head64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    grads_exact = torch.autograd.grad(_eager(head64, x64, t.double(), 2.0) * upstream, [x64, *params_of(head64)])
    for name, g, ge, gx in zip(["x"] + [n for n, _ in head.named_parameters()], got, grads_eager, grads_exact):
        tolerance_rule(g, ge, gx, 1e-3 * gx.abs().max().item(), what=name)
    loss.backward()
    for name, g, p in zip(["x"] + [n for n, _ in head.named_parameters()], got, [x, *params_of(head)]):
        err = (p.grad.double() - 2 * g.double()).abs().max().item()  # bf16 sums of two equal gradients
        assert err <= 2e-2 * g.double().abs().max().item(), f"{name} after a second backward: error {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_head_groups_accumulate_dx_in_fp32(monkeypatch, dtype):
    """The cuBLAS path with heads in groups (a small group budget): dx summed over groups in fp32, through
    addmm's fp32 output for 16-bit inputs where this torch has it, held to the tolerance rule."""
    import fasthydra.ops.linear_hydra_kl as lk

    use_heads_path(monkeypatch, "cublas")
    monkeypatch.setattr(lk, "CUBLAS_GROUP_ELEMENTS", 96 * 1000)  # one head per group
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_heads_against_float64(96, 64, 4, 1000, None, dtype)


@pytest.mark.parametrize("defer", [True, False], ids=["grad-in-backward", "grad-in-forward"])
@pytest.mark.parametrize("c", [300, 20000], ids=["row-in-registers", "row-in-tiles"])
def test_precision_near_saturated_rows_at_a_temperature_not_a_power_of_two(monkeypatch, c, defer):
    """fp32, large logits with a dominant class at T = 0.7 (probabilities near 1, where dz = T (q - p)
    cancels; 1/T not exact in binary): the loss on logits (frozen teacher, its gradient formed in the
    backward from the forward's norms, or in the forward; a top-k teacher) and the heads + loss op, held
    to the tolerance rule against eager fp32 with a tight atol. Exponents must come from differences
    taken before the temperature's scaling; a GPU build that contracts z / T - max into one FMA, with
    max itself rounded, shows here (the interpreter has no FMA)."""
    from fasthydra.ops import _common

    monkeypatch.setattr(_common, "DEFER_KL_GRAD", defer)
    torch.backends.cuda.matmul.allow_tf32 = False
    for seed in range(3):
        torch.manual_seed(seed)
        t = torch.randn(24, 2, c, device="cuda") * 8.0
        t[..., 0] += 40.0
        z = (t + torch.randn(24, 2, c, device="cuda") * 2.4).requires_grad_()
        (g,) = torch.autograd.grad(hydra_kl_loss(z, t, 0.7, reduction="sum", impl="triton"), z)
        z64 = z.detach().double().requires_grad_()
        (g_ref,) = torch.autograd.grad(R.hydra_kl_loss_ref(z64, t.double(), 0.7, reduction="sum"), z64)
        z32 = z.detach().requires_grad_()
        (g_eager,) = torch.autograd.grad(R.hydra_kl_loss_ref(z32, t, 0.7, reduction="sum"), z32)
        tolerance_rule(g, g_eager, g_ref, 1e-7 * g_ref.abs().max().item(), f"loss on logits, draw {seed}")
    # a top-k teacher (its 20 largest classes): the dense reference masks the others with -inf
    vals, idx = t.topk(20, dim=-1)
    dense = torch.full_like(t, float("-inf")).scatter(-1, idx, vals)
    (g,) = torch.autograd.grad(hydra_kl_loss(z, TopKTeacher(vals, idx), 0.7, reduction="sum", impl="triton"), z)
    (g_ref,) = torch.autograd.grad(R.hydra_kl_loss_ref(z64, dense.double(), 0.7, reduction="sum"), z64)
    (g_eager,) = torch.autograd.grad(R.hydra_kl_loss_ref(z32, dense, 0.7, reduction="sum"), z32)
    tolerance_rule(g, g_eager, g_ref, 1e-7 * g_ref.abs().max().item(), "top-k teacher")
    head = HydraHead(32, c, 2, impl="triton", device="cuda")
    with torch.no_grad():
        head.bias.copy_(torch.randn_like(head.bias) * 8.0)
        head.bias[:, 0] += 40.0
    x = torch.randn(24, 32, device="cuda", requires_grad=True)
    with torch.no_grad():
        t = head(x) + torch.randn(24, 2, c, device="cuda") * 2.4
    loss = head.distill_loss(x, t, 0.7)
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    grads_eager = torch.autograd.grad(_eager(head, x, t, 0.7), [x, *params_of(head)])
    head64 = HydraHead(32, c, 2, impl="torch", device="cuda", dtype=torch.float64)
    head64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    grads_exact = torch.autograd.grad(_eager(head64, x64, t.double(), 0.7), [x64, *params_of(head64)])
    for name, g, ge, gx in zip(["x", "weight", "bias"], grads, grads_eager, grads_exact):
        tolerance_rule(g, ge, gx, 1e-7 * gx.abs().max().item(), what=f"heads {name}")


def _training_step_parts(hidden, impl, dtype=torch.float32):
    from fasthydra import GaussianHydraHead

    body = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU()).to("cuda", dtype)
    head = HydraHead(64, 10, 4, hidden_features=hidden, impl=impl, device="cuda", dtype=dtype)
    ghead = GaussianHydraHead(64, 2, 4, impl=impl, device="cuda", dtype=dtype)
    params = [*body.parameters(), *head.parameters(), *ghead.parameters()]
    return body, head, ghead, torch.optim.SGD(params, lr=0.1)


@pytest.mark.parametrize("impl,path", [("torch", "cublas")] + [("triton", p) for p in HEADS_PATHS])
@pytest.mark.parametrize("hidden", [None, 16])
def test_training_step_issues_no_host_sync(monkeypatch, impl, path, hidden):
    """Every op of a training step under torch.cuda.set_sync_debug_mode("error"): a sync raises."""
    from fasthydra import gaussian_kl_loss, hinton_kl_loss

    use_heads_path(monkeypatch, path)

    body, head, ghead, opt = _training_step_parts(hidden, impl)
    x = torch.randn(48, 32, device="cuda")
    t = teacher_logits(48, 4, 10, device="cuda")
    tm, tv = torch.randn(48, 4, 2, device="cuda"), torch.rand(48, 4, 2, device="cuda") + 0.1
    z = torch.randn(48, 4, 10, device="cuda", requires_grad=True)
    keep = torch.arange(48, device="cuda") % 3 != 0

    def step():
        opt.zero_grad(set_to_none=True)
        f = body(x)
        loss = head.distill_loss(f, t, 2.0) + ghead.distill_loss(f, tm, tv)
        loss = loss + hydra_kl_loss(z, t, 2.0, impl=impl) + hinton_kl_loss(z[:, 0], t, 2.0, impl=impl)
        loss = loss + head.distill_loss(f, t, 2.0, row_mask=keep) + hydra_kl_loss(z, t, 2.0, impl=impl,
                                                                                  row_mask=keep)
        mu, var = ghead(f)
        loss = loss + gaussian_kl_loss(mu, var, tm, tv)
        loss.backward()
        opt.step()
        uncertainty(head(f).detach(), impl=impl)
        return loss

    step()  # warm: kernel compilation, the error word and its pinned copy are made once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("path", HEADS_PATHS)
def test_bad_teacher_on_cuda_is_reported_by_a_later_call(monkeypatch, path):
    """On CUDA a NaN teacher gives a NaN loss at once and a ValueError from a later call once the error
    word's copy has landed; with copies spaced COPY_INTERVAL_S apart, a bad call between two copies is
    reported after the next one (a range of calls), and the word is clear afterwards."""
    import time

    from fasthydra.ops import checks

    use_heads_path(monkeypatch, path)
    head = HydraHead(32, 10, 4, impl="triton", device="cuda")
    x = torch.randn(48, 32, device="cuda")
    good = teacher_logits(48, 4, 10, device="cuda")
    bad = good.clone()
    bad[3, 1, 4] = float("nan")
    head.distill_loss(x, good)  # a copy lands clean
    torch.cuda.synchronize()
    head.distill_loss(x, good)
    torch.cuda.synchronize()
    assert torch.isnan(head.distill_loss(x, bad))  # the step carries NaN (this read synchronises)
    time.sleep(2 * checks.COPY_INTERVAL_S)
    with pytest.raises(ValueError, match=r"distill_loss: the teacher contained NaN.*call\(s\) ago"):
        for _ in range(3):  # the first copies the word (if the bad call did not), a later one raises
            head.distill_loss(x, good)
            torch.cuda.synchronize()
    head.distill_loss(x, good)
    torch.cuda.synchronize()
    checks.raise_pending_errors(sync=True)  # reported once, cleared


def _graph_against_eager(monkeypatch, path, hidden, loss_fn, values, tensor: bool):
    """A step (loss_fn(body, head, features, teacher, T) backward, SGD step) on two copies of one body + heads:
    the first captured in a CUDA graph (T a device tensor where `tensor`, else the number values[0]), the second
    run eagerly with T a number. For each value: T.fill_(value), one replay, one eager step; both must give the
    same loss, then the same parameters."""
    import copy

    use_heads_path(monkeypatch, path)
    torch.manual_seed(0)
    body, head, _, _ = _training_step_parts(hidden, "triton")
    twins = [(body, head), (copy.deepcopy(body), copy.deepcopy(head))]
    opts = [torch.optim.SGD([*b.parameters(), *h.parameters()], lr=0.05) for b, h in twins]
    x = torch.randn(64, 32, device="cuda")
    t = teacher_logits(64, 4, 10, device="cuda", masked=False)
    temperature = torch.tensor(float(values[0]), device="cuda") if tensor else values[0]
    eager_t = [values[0]]

    def step(i):
        (b, h), o = twins[i], opts[i]
        o.zero_grad(set_to_none=False)
        loss = loss_fn(b, h, b(x), t, temperature if i == 0 else eager_t[0])
        loss.backward()
        o.step()
        return loss

    def before_replay(r):
        eager_t[0] = values[r]
        if tensor:
            temperature.fill_(values[r])

    _replay_against_eager(step, len(values), before_replay, twins)


def _replay_against_eager(step, rounds: int, before_replay, twins) -> None:
    """step(0) captured in a CUDA graph after a warm-up of both twins on a side stream (as torch.cuda.graphs
    asks); each round: before_replay(round), a replay and an eager step(1), which must give the same loss; then
    the twins' modules (pairs of (body, head)) must hold the same parameters."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(0)
            step(1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(0)
    for r in range(rounds):
        before_replay(r)
        graph.replay()
        eager_loss = step(1)
        torch.cuda.synchronize()
        assert torch.allclose(static_loss, eager_loss, rtol=1e-4, atol=1e-6), (r, static_loss, eager_loss)
    for p, q in zip([p for m in twins[0] for p in m.parameters()], [q for m in twins[1] for q in m.parameters()]):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", HEADS_PATHS)
@pytest.mark.parametrize("hidden", [None, 16])
def test_training_step_replays_in_a_cuda_graph(monkeypatch, path, hidden):
    """body + HydraHead.distill_loss + optimizer step captured once, replayed: the same parameters as
    the same steps run eagerly from the same start."""
    _graph_against_eager(monkeypatch, path, hidden, lambda b, h, f, t, T: h.distill_loss(f, t, T), [2.0] * 5,
                         tensor=False)


@pytest.mark.parametrize("path", HEADS_PATHS)
@pytest.mark.parametrize("hidden", [None, 16])
def test_an_annealed_tensor_temperature_replays_in_a_cuda_graph(monkeypatch, path, hidden):
    """A step captured once with T a device tensor; T.fill_ before each replay (an annealing schedule): each
    replay gives the loss and parameters of the same step run eagerly with that T as a number (the heads' loss,
    the loss on their logits and uncertainty's epistemic part)."""

    def loss_fn(b, h, f, t, T):
        return h.distill_loss(f, t, T) + hydra_kl_loss(h(f), t, T) + uncertainty(h(f), T).epistemic.mean()

    _graph_against_eager(monkeypatch, path, hidden, loss_fn, [2.0, 1.0, 3.5, 0.6, 8.0], tensor=True)


@pytest.mark.parametrize("hidden", [None, 16])
def test_a_learned_temperature_step_replays_in_a_cuda_graph(hidden):
    """T learned (a device parameter the optimizer steps): the step captured once (the teacher's gradient formed,
    dL/dT's reduction kernel with a finished count of its own inside the capture) and replayed gives the loss, the
    parameters and T of the same steps run eagerly on a copy."""
    import copy

    torch.manual_seed(0)
    body, head, _, _ = _training_step_parts(hidden, "triton")
    twins = [(body, head), (copy.deepcopy(body), copy.deepcopy(head))]
    temps = [torch.tensor(2.0, device="cuda", requires_grad=True) for _ in twins]
    opts = [torch.optim.SGD([*b.parameters(), *h.parameters(), T], lr=0.05) for (b, h), T in zip(twins, temps)]
    x = torch.randn(64, 32, device="cuda")
    t = teacher_logits(64, 4, 10, device="cuda", masked=False)

    def step(i):
        (b, h), o, T = twins[i], opts[i], temps[i]
        o.zero_grad(set_to_none=False)
        f = b(x)
        loss = h.distill_loss(f, t, T) + hydra_kl_loss(h(f), t, T) + uncertainty(h(f), T).epistemic.mean()
        loss.backward()
        o.step()
        return loss

    _replay_against_eager(step, 4, lambda r: None, twins)
    assert temps[0].item() != 2.0 and torch.allclose(temps[0], temps[1], rtol=1e-4, atol=1e-6), temps


class _HeadLoss(torch.nn.Module):
    """The heads and their loss as one callable of (features, teacher): what torch.cuda.make_graphed_callables
    graphs in a training loop whose body stays eager (README, "Host-bound small steps")."""

    def __init__(self, head, temperature):
        super().__init__()
        self.head, self.temperature = head, temperature

    def forward(self, features, teacher):
        return self.head.distill_loss(features, teacher, self.temperature)


@pytest.mark.parametrize("path", HEADS_PATHS)
@pytest.mark.parametrize("hidden", [None, 16])
def test_heads_and_loss_graphed_by_make_graphed_callables(monkeypatch, path, hidden):
    """Partial-network capture: the heads + loss graphed once by torch.cuda.make_graphed_callables (forward and
    backward each one replay), the body and the optimizer eager, new features and teachers every step. Each step
    gives the loss of the same step run eagerly on a twin, then the same parameters; a NaN teacher on a replay
    gives a NaN loss, and raise_pending_errors names it: without waiting, from the copy its previous call started
    (sync=False, once a step), and synchronising (nothing is read back during the replays)."""
    import copy

    from fasthydra.ops import checks
    from fasthydra.ops.checks import raise_pending_errors

    use_heads_path(monkeypatch, path)
    torch.manual_seed(0)
    body, head, _, _ = _training_step_parts(hidden, "triton")
    twins = [(body, head), (copy.deepcopy(body), copy.deepcopy(head))]
    opts = [torch.optim.SGD([*b.parameters(), *h.parameters()], lr=0.05) for b, h in twins]
    sample = (torch.randn(64, 64, device="cuda", requires_grad=True), teacher_logits(64, 4, 10, device="cuda"))
    losses = [torch.cuda.make_graphed_callables(_HeadLoss(head, 2.0), sample), _HeadLoss(twins[1][1], 2.0)]
    raise_pending_errors()  # (clean so far: the warm-up and the captures saw a good teacher)
    for r in range(4):
        x = torch.randn(64, 32, device="cuda")
        t = teacher_logits(64, 4, 10, device="cuda", masked=r % 2 == 1)
        out = []
        for (b, _), opt, loss_fn in zip(twins, opts, losses):
            opt.zero_grad(set_to_none=True)  # (the graphed backward hands autograd its static gradient buffers)
            loss = loss_fn(b(x), t)
            loss.backward()
            opt.step()
            out.append(loss.detach().clone())
        torch.cuda.synchronize()
        assert torch.isfinite(out[1]) and torch.allclose(out[0], out[1], rtol=1e-4, atol=1e-6), (r, out)
    for p, q in zip([p for m in twins[0] for p in m.parameters()], [q for m in twins[1] for q in m.parameters()]):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)
    bad = teacher_logits(64, 4, 10, device="cuda")
    bad[5, 2, 3] = float("nan")
    monkeypatch.setattr(checks, "COPY_INTERVAL_S", 0.0)  # (a copy at every call: none skipped for being too soon)
    for sync in (False, True):
        raise_pending_errors()  # (clean, and no copy left in flight)
        loss = losses[0](body(torch.randn(64, 32, device="cuda")), bad)
        if not sync:  # as a graphed loop calls it once a step: it starts a copy of the word, never waiting
            raise_pending_errors(sync=False)
            torch.cuda.synchronize()  # (the next step's time, in a loop)
        assert torch.isnan(loss)
        with pytest.raises(ValueError, match="distill_loss: the teacher contained NaN"):
            raise_pending_errors(sync=sync)
    raise_pending_errors()  # reported once: the word is clear again


@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned"])
def test_a_tensor_temperature_issues_no_host_sync(learned):
    """Every op that takes a temperature, given a device tensor, under torch.cuda.set_sync_debug_mode("error");
    learned (requires grad, stepped by the optimizer) too."""
    from fasthydra import hinton_kl_loss

    body, head, _, opt = _training_step_parts(16, "triton")
    x = torch.randn(48, 32, device="cuda")
    t = teacher_logits(48, 4, 10, device="cuda")
    z = torch.randn(48, 4, 10, device="cuda", requires_grad=True)
    temperature = torch.tensor(2.0, device="cuda", requires_grad=learned)
    if learned:
        opt.add_param_group({"params": [temperature], "lr": 1e-3})

    def step():
        opt.zero_grad(set_to_none=True)
        f = body(x)
        loss = head.distill_loss(f, t, temperature) + hydra_kl_loss(z, t, temperature)
        loss = loss + hinton_kl_loss(z[:, 0], t, temperature) + uncertainty(head(f), temperature).epistemic.mean()
        loss.backward()
        opt.step()
        return loss

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for value in (1.5, 3.0):
            with torch.no_grad():
                temperature.fill_(value)
            loss = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(loss).all()
    assert (temperature.grad is not None and bool(torch.isfinite(temperature.grad))) == learned


@pytest.mark.parametrize("hidden", [None, 16])
def test_a_learned_temperature_gets_the_float64_gradient(hidden):
    """dL/dT of the fused heads' loss, the loss on their logits and uncertainty on CUDA (Triton path) against
    the float64 torch path on the CPU: the same step's T gradient."""
    torch.manual_seed(5)
    head = HydraHead(32, 37, 4, hidden_features=hidden, impl="triton").cuda()
    x, t = torch.randn(48, 32, device="cuda"), teacher_logits(48, 4, 37, device="cuda")

    def grad_T(head, x, t, device, dtype):
        T = torch.tensor(1.7, device=device, dtype=dtype, requires_grad=True)
        loss = head.distill_loss(x, t, T) + hydra_kl_loss(head(x), t, T) + uncertainty(head(x), T).epistemic.mean()
        return torch.autograd.grad(loss, T)[0]

    ref = HydraHead(32, 37, 4, hidden_features=hidden, impl="torch", dtype=torch.float64)
    ref.load_state_dict({k: v.double().cpu() for k, v in head.state_dict().items()})
    got = grad_T(head, x, t, "cuda", torch.float32).item()
    want = grad_T(ref, x.double().cpu(), t.double().cpu(), "cpu", torch.float64).item()
    assert abs(got - want) <= 1e-4 * (1 + abs(want)), (got, want)


def test_reduce_overhead_compile_with_an_annealed_tensor_temperature():
    """torch.compile(mode="reduce-overhead", fullgraph=True) with T a device tensor updated in place: no
    recompile for new values (set_stance "fail_on_recompile" after the first calls), eager's values at each."""
    body, head, _, _ = _training_step_parts(None, "triton")
    x = torch.randn(64, 32, device="cuda")
    t = teacher_logits(64, 4, 10, device="cuda")
    temperature = torch.tensor(2.0, device="cuda")

    def loss_fn(inp, teacher, T):
        return head.distill_loss(body(inp), teacher, T)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, mode="reduce-overhead", fullgraph=True)
    params = [*body.parameters(), *head.parameters()]
    for _ in range(3):  # compile, record, replay
        torch.autograd.grad(compiled(x, t, temperature), params)
    with torch.compiler.set_stance("fail_on_recompile"):
        for value in (0.7, 4.0, 1.3):
            temperature.fill_(value)
            got = compiled(x, t, temperature)
            grads = torch.autograd.grad(got, params)
            want = loss_fn(x, t, value)
            want_grads = torch.autograd.grad(want, params)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), value
            for g, w in zip(grads, want_grads):
                assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), value


def _losses_on_two_streams(monkeypatch, capture: bool):
    """Small-step losses (1024 programs per launch) of two batches, issued 20 times each on two streams at
    once, eagerly or as replays of one CUDA graph per batch (captured one after the other, on torch's one
    capture stream); each must equal the torch path's loss of its batch."""
    use_heads_path(monkeypatch, "small")
    head = HydraHead(256, 10, 8, impl="triton", device="cuda")
    xs = [torch.randn(4096, 256, device="cuda") for _ in range(2)]
    ts = [teacher_logits(4096, 8, 10, device="cuda") for _ in range(2)]
    with torch.no_grad():
        expected = [hydra_kl_loss(head(x), t, 2.0, impl="torch") for x, t in zip(xs, ts)]
        steps = [lambda i=i: head.distill_loss(xs[i], ts[i], 2.0) for i in range(2)]
        if capture:
            for step in steps:  # compiled, and the count block made, before any capture
                step()
            torch.cuda.synchronize()
            graphs, outs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()], []
            for g, step in zip(graphs, steps):
                with torch.cuda.graph(g):
                    outs.append(step())
            steps = [lambda i=i: graphs[i].replay() or outs[i].clone() for i in range(2)]
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        for s in streams:
            s.wait_stream(torch.cuda.current_stream())
        got = [[], []]
        for _ in range(20):
            for i, s in enumerate(streams):
                with torch.cuda.stream(s):
                    got[i].append(steps[i]())
    torch.cuda.synchronize()
    for i in range(2):
        for v in got[i]:
            assert torch.allclose(v, expected[i], rtol=1e-4, atol=1e-6), (i, v.item(), expected[i].item())


def test_small_step_losses_on_two_streams_at_once(monkeypatch):
    """The small step's loss is summed by launch 1's last program, found through a count of finished
    programs that each stream has to itself: two streams issuing steps at once get the torch path's losses,
    every time."""
    _losses_on_two_streams(monkeypatch, capture=False)


def test_small_step_graphs_replayed_at_once_on_two_streams(monkeypatch):
    """Two CUDA graphs replayed at once on two streams: each captured launch has a count of its own (the
    graphs were captured on one stream), so every replay gives the torch path's loss."""
    _losses_on_two_streams(monkeypatch, capture=True)


def test_reduce_overhead_compile_runs_a_training_step():
    """torch.compile(mode="reduce-overhead", fullgraph=True) (CUDA graphs inside): no graph break, and
    the compiled loss and gradients equal the eager ones."""
    body, head, _, _ = _training_step_parts(None, "triton")
    x = torch.randn(64, 32, device="cuda")
    t = teacher_logits(64, 4, 10, device="cuda")

    def loss_fn(inp, teacher):
        return head.distill_loss(body(inp), teacher, 2.0)

    compiled = torch.compile(loss_fn, mode="reduce-overhead", fullgraph=True)
    params = [*body.parameters(), *head.parameters()]
    for _ in range(4):  # record, then replay
        got = compiled(x, t)
        grads = torch.autograd.grad(got, params)
    want = loss_fn(x, t)
    want_grads = torch.autograd.grad(want, params)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    for g, w in zip(grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,c,k", [(37, 5, 13, 4), (64, 4, 50257, 32), (300, 8, 1000, 128)])
def test_topk_teacher_tolerance_rule(dtype, b, m, c, k):
    """The top-k kernel on a GPU (its barrier between the dense and the scattered stores is only
    exercised here), on given logits and in the heads' in-place path, against float64."""
    from fasthydra import TopKTeacher

    z = (torch.randn(b, m, c, device="cuda") * 3).to(dtype).requires_grad_()
    values, indices = (torch.randn(b, m, c, device="cuda") * 3).topk(k, dim=-1)
    teacher = TopKTeacher(values.to(dtype), indices.int())
    _check_logits_loss(z, teacher, teacher.densify(c), 1e-5)
    head = HydraHead(64, c, m, impl="triton", device="cuda", dtype=dtype)
    x = torch.randn(b, 64, device="cuda", dtype=dtype)
    fused = head.distill_loss(x, teacher, 1.5)
    plain = hydra_kl_loss(head(x), teacher, 1.5, impl="triton")
    assert torch.allclose(fused.float(), plain.float(), rtol=2e-2 if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", [37, 9000], ids=["two-launches", "gemms"])
def test_gaussian_heads_tolerance_rule(dtype, b):
    """Gaussian heads on CUDA (the fused kernel, then the small-step gradient kernel, or GEMMs past its
    batch limit) against float64, held to twice eager's error."""
    from fasthydra import GaussianHydraHead, gaussian_kl_loss

    torch.backends.cuda.matmul.allow_tf32 = False
    head = GaussianHydraHead(48, 3, 4, impl="triton", device="cuda", dtype=dtype)
    x = torch.randn(b, 48, device="cuda", dtype=dtype, requires_grad=True)
    tm = torch.randn(b, 4, 3, device="cuda", dtype=dtype)
    tv = (torch.rand(b, 4, 3, device="cuda") + 0.2).to(dtype)
    params = [x, *params_of(head)]
    grads = torch.autograd.grad(loss := head.distill_loss(x, tm, tv), params)
    eager = gaussian_kl_loss(*head(x), tm, tv)  # the torch path: unfused
    grads_eager = torch.autograd.grad(eager, params)
    head64 = GaussianHydraHead(48, 3, 4, impl="torch", device="cuda", dtype=torch.float64)
    head64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    exact = gaussian_kl_loss(*head64(x64), tm.double(), tv.double())
    grads_exact = torch.autograd.grad(exact, [x64, *params_of(head64)])
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    tolerance_rule(loss, eager, exact, atol * max(1.0, exact.abs().item()), what="loss")
    for g, ge, gx in zip(grads, grads_eager, grads_exact):
        tolerance_rule(g, ge, gx, atol * gx.abs().max().item(), what="grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,c", [(37, 5, 13), (64, 8, 50257)])
def test_hinton_target_kernel_tolerance_rule(dtype, b, m, c):
    """The Hinton loss with its target from one launch (rows whole in registers, and 50257 classes in
    tiles), held to twice eager's error against float64."""
    from fasthydra import hinton_kl_loss

    z = (torch.randn(b, c, device="cuda") * 3).to(dtype).requires_grad_()
    t = teacher_logits(b, m, c, device="cuda", dtype=dtype)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    _check_loss_on_logits(z, lambda zz: hinton_kl_loss(zz, t, 2.0, impl="triton"),
                          lambda zz, tt: R.hinton_kl_loss_ref(zz, tt, 2.0), t, atol, atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,c,k", [(37, 5, 13, 4), (64, 8, 50257, 32), (300, 4, 1000, 128)])
def test_hinton_topk_target_kernel_tolerance_rule(dtype, b, m, c, k):
    """The Hinton loss against several top-k members, its target from one launch (_topk_log_mean_kernel): the
    members share most of their classes (each is one base row plus a little noise), so that each member's stores
    land on the classes the next one reads, which only the kernel's barrier orders on a chip (the interpreter runs
    a program's lanes in step). The rule against float64 on the dense form, twice, with the same bits."""
    from fasthydra import hinton_kl_loss

    z = (torch.randn(b, c, device="cuda") * 3).to(dtype).requires_grad_()
    base = torch.randn(b, 1, c, device="cuda") * 3
    values, indices = (base + 0.3 * torch.randn(b, m, c, device="cuda")).topk(k, dim=-1)
    teacher = TopKTeacher(values.to(dtype), indices)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    _check_loss_on_logits(z, lambda zz: hinton_kl_loss(zz, teacher, 2.0, impl="triton"),
                          lambda zz, tt: R.hinton_kl_loss_ref(zz, tt, 2.0), teacher.densify(c), atol, atol)
    from fasthydra.ops.uncertainty import topk_log_mean_triton

    first = topk_log_mean_triton(teacher.values, indices, c, 2.0, "hinton_kl_loss")
    assert torch.equal(topk_log_mean_triton(teacher.values, indices, c, 2.0, "hinton_kl_loss"), first)


@pytest.mark.parametrize("k", [1, 7, 64, 256])
def test_topk_checks_on_cuda_match_torch(k):
    """A top-k teacher's checks on the device (_flag_topk_kernel) against the torch ops' verdict, read from the error
    word: ids out of range, a live id repeated, padding that repeats a kept class (allowed), NaN, +inf, a member row
    of -inf; each a teacher of its own."""
    from fasthydra.ops import checks

    dev, c = torch.device("cuda"), 500
    base = torch.randn(40, 3, k, device="cuda")
    ids = torch.stack([torch.randperm(c, device="cuda")[:k] for _ in range(120)]).view(40, 3, k)
    cases = {"clean": (base, ids)}
    bad = ids.clone()
    bad[5, 1, k // 2] = c
    cases["out of range"] = (base, bad)
    if k > 1:
        rep = ids.clone()
        rep[7, 2, -1] = rep[7, 2, 0]
        cases["repeated"] = (base, rep)
        pad_v, pad_i = base.clone(), ids.clone()
        pad_v[3, 0, 1:], pad_i[3, 0, 1:] = float("-inf"), pad_i[3, 0, :1]
        cases["padding"] = (pad_v, pad_i)
    for what, value in (("NaN", float("nan")), ("+inf", float("inf"))):
        v = base.clone()
        v[9, 0, k - 1] = value
        cases[what] = (v, ids)
    v = base.clone()
    v[11, 2] = float("-inf")
    cases["row of -inf"] = (v, ids)
    word = checks.error_word(dev, "hydra_kl_loss")
    for what, (v, i) in cases.items():
        want = int(checks.topk_index_bits(i, v, c)) | (checks.NAN * bool(torch.isnan(v).any())
                                                       | checks.POSINF * bool(torch.isposinf(v).any())
                                                       | checks.ALL_NEGINF * bool(torch.isneginf(v).all(-1).any()))
        word.zero_()
        checks.flag_topk_teacher(v, i.int() if k % 2 else i, c, "hydra_kl_loss")
        torch.cuda.synchronize()
        got = int(word)
        word.zero_()
        checks._flags_of(dev).in_flight = False
        assert got == want, (what, got, want)


# Rows of (rows, 2, 32000) tensors whose last BIG_TAIL rows start past element 2^31 (4.3 GB in bf16 each):
# a kernel that forms any offset in 32-bit integers reads or writes the wrong place there.
BIG_M, BIG_C, BIG_TAIL = 2, 32000, 48
BIG_B = 2**31 // (BIG_M * BIG_C) + BIG_TAIL


def _past_2_31_ok(got_rows, ref, what):
    """got_rows: (first BIG_TAIL rows, last BIG_TAIL rows) of a kernel output; ref(rows slice, dtype) the
    reference on the same rows: the tolerance rule at both ends (the rows are independent of each other),
    with an atol of 1% of the values (what is checked is where the values were read and written: a wrong
    offset gives errors of the values' own size, not of their last bf16 bits)."""
    for got, rows in zip(got_rows, (slice(0, BIG_TAIL), slice(BIG_B - BIG_TAIL, BIG_B))):
        eager, exact = ref(rows, torch.bfloat16), ref(rows, torch.float64)
        tolerance_rule(got, eager, exact, 1e-2 * exact.abs().max().item(), what=f"{what} rows {rows}")


def test_tensors_past_2_31_elements():
    """The loss on logits (loss rows and gradient) and uncertainty over (B, M, C) bf16 tensors of more than
    2^31 elements: the rows at the end against float64 references of those rows (and the first rows)."""
    torch.cuda.empty_cache()
    assert BIG_B * BIG_M * BIG_C > 2**31 + (BIG_TAIL - 1) * BIG_M * BIG_C
    z = (torch.randn(BIG_B, BIG_M, BIG_C, device="cuda", dtype=torch.bfloat16) * 3).requires_grad_()
    t = torch.randn(BIG_B, BIG_M, BIG_C, device="cuda", dtype=torch.bfloat16) * 3
    ends = lambda x: (x[:BIG_TAIL], x[-BIG_TAIL:])  # noqa: E731
    rows = hydra_kl_loss(z, t, 1.5, reduction="none", impl="triton")
    _past_2_31_ok(ends(rows), lambda r, dt: R.hydra_kl_loss_ref(z[r].detach().to(dt), t[r].to(dt), 1.5, "none"),
                  "loss")
    (g,) = torch.autograd.grad(hydra_kl_loss(z, t, 1.5, reduction="sum", impl="triton"), z)

    def grad_ref(r, dt):
        zz = z[r].detach().to(dt).requires_grad_()
        return torch.autograd.grad(R.hydra_kl_loss_ref(zz, t[r].to(dt), 1.5, "sum"), zz)[0]

    _past_2_31_ok(ends(g), grad_ref, "grad")
    del g
    got = uncertainty(z.detach(), impl="triton")
    for name in ("probs", "total", "epistemic"):
        _past_2_31_ok(ends(getattr(got, name)),
                      lambda r, dt: getattr(R.uncertainty_ref(z[r].detach().to(dt)), name), name)


@pytest.mark.parametrize("hidden", [None, 64], ids=["linear", "mlp"])
def test_heads_with_a_teacher_past_2_31_elements(hidden):
    """Heads over a (B, 2, 32000) bf16 teacher of more than 2^31 elements (the logits of one head stay
    below it: the teacher's row offsets are what overflow 32 bits): loss rows and dx of the last rows
    against float64 references of those rows."""
    torch.cuda.empty_cache()
    head = HydraHead(64, BIG_C, BIG_M, hidden_features=hidden, impl="triton", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(BIG_B, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(BIG_B, BIG_M, BIG_C, device="cuda", dtype=torch.bfloat16) * 3
    ends = lambda v: (v[:BIG_TAIL], v[-BIG_TAIL:])  # noqa: E731
    rows = head.distill_loss(x, t, 1.5, reduction="none")
    p = dict(head.named_parameters())

    def heads(xx, dt):
        if hidden is None:
            return R.linear_heads_ref(xx, p["weight"].detach().to(dt), p["bias"].detach().to(dt))
        return R.mlp_heads_ref(xx, *(p[k].detach().to(dt) for k in ("hidden_weight", "hidden_bias", "weight", "bias")))

    _past_2_31_ok(ends(rows), lambda r, dt: R.hydra_kl_loss_ref(heads(x[r].detach().to(dt), dt), t[r].to(dt), 1.5,
                                                                "none"), "loss")
    del rows
    (dx,) = torch.autograd.grad(head.distill_loss(x, t, 1.5, reduction="sum"), x)

    def dx_ref(r, dt):
        xx = x[r].detach().to(dt).requires_grad_()
        return torch.autograd.grad(R.hydra_kl_loss_ref(heads(xx, dt), t[r].to(dt), 1.5, "sum"), xx)[0]

    _past_2_31_ok(ends(dx), dx_ref, "dx")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("hidden", [None, 16])
def test_ops_on_a_device_that_is_not_current(hidden):
    """A head on cuda:1 while cuda:0 is current (a model split across GPUs): every op launches on the tensors'
    device, and a step's loss and gradients equal the same step's with cuda:1 current."""
    torch.cuda.set_device(0)
    head = HydraHead(32, 50, 4, hidden_features=hidden, impl="triton", device="cuda:1")
    x = torch.randn(37, 32, device="cuda:1", requires_grad=True)
    t = teacher_logits(37, 4, 50, device="cuda:1")
    keep = torch.rand(37, device="cuda:1") > 0.3

    def step():
        loss = (head.distill_loss(x, t, 2.0, row_mask=keep) + hydra_kl_loss(head(x), t, 2.0)
                + uncertainty(head(x).detach()).epistemic.mean())
        return [loss, *torch.autograd.grad(loss, [x, *params_of(head)])]

    away = step()
    with torch.cuda.device(1):
        home = step()
    torch.cuda.synchronize(1)
    for a, b in zip(away, home):
        assert a.device == torch.device("cuda", 1)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
