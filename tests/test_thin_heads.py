"""interpret tier: the thin-heads kernel (kernels/thin_heads.py), MLP heads' second layer fused with the
Hydra loss on the cuBLAS path (the logits formed per class tile inside the loss kernel), against the
float64 reference under TRITON_INTERPRET=1."""

import pytest
import torch
from helpers import assert_close_to, params_of, teacher_logits, tolerance_rule, use_heads_path

import fasthydra.ops.linear_hydra_kl as lk
from fasthydra import HydraHead
from fasthydra import reference as R
from fasthydra.ops import _common

pytestmark = pytest.mark.interpret


@pytest.fixture
def thin(monkeypatch, request):
    """The thin-heads path on (the cuBLAS path, THIN_HEADS), its launches recorded; the row-kernel loss
    pass must not run beside it."""
    use_heads_path(monkeypatch, "cublas")
    monkeypatch.setattr(_common, "THIN_HEADS", True)
    # fp32 takes the path with TF32 dots allowed only (the interpreter's dots are exact fp32 either way)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    request.addfinalizer(lambda: torch.set_float32_matmul_precision(precision))
    launches = []
    real = lk.launch_thin_heads_kl

    def spy(x3, *args, **kwargs):
        launches.append((tuple(x3.shape), args[4] is not None, kwargs.get("reduce_to") is not None))
        return real(x3, *args, **kwargs)

    def no_row_kernel(*args, **kwargs):
        raise AssertionError("the row kernel's loss pass ran on the thin-heads path")

    monkeypatch.setattr(lk, "launch_thin_heads_kl", spy)
    monkeypatch.setattr(lk, "launch_kl_rows", no_row_kernel)
    return launches


def _heads_case(b, c, m, hidden, bias, dtype=torch.float32, d=12):
    torch.manual_seed(0)
    head = HydraHead(d, c, m, hidden_features=hidden, bias=bias, impl="triton")
    if bias:
        with torch.no_grad():
            head.bias.copy_(torch.randn_like(head.bias) * 3)  # a bias that matters
    head = head.to(dtype)
    x = torch.randn(b, d, dtype=dtype, requires_grad=True)
    t = teacher_logits(b, m, c, dtype=dtype)
    if b > 3:
        t[3, m - 1, : (2 * c) // 3] = float("-inf")  # masked classes spanning whole class tiles
        t[1, 0, 2:] = float("-inf")  # a row with two live classes
    return head, x, t


def _reference(head, x, t, temperature, reduction, upstream, dtype=torch.float64):
    """Loss and gradients of upstream * loss (x and the parameters) from the eager reference in dtype:
    float64 (the truth), or the inputs' own dtype (eager's error, the tolerance rule's budget)."""
    x64 = x.detach().to(dtype).requires_grad_()
    p64 = {k: v.detach().to(dtype).requires_grad_() for k, v in head.named_parameters()}
    if head.is_mlp:
        z = R.mlp_heads_ref(x64, p64["hidden_weight"], p64.get("hidden_bias"), p64["weight"], p64.get("bias"))
    else:
        z = R.linear_heads_ref(x64, p64["weight"], p64.get("bias"))
    loss = R.hydra_kl_loss_ref(z, t.to(dtype), temperature, reduction=reduction)
    up = upstream if reduction != "none" else upstream.to(dtype)
    return loss, torch.autograd.grad((loss * up).sum(), [x64, *p64.values()])


def _assert_like_float64(head, x, t, loss, grads, temperature=1.5, reduction="mean", upstream=0.7):
    """The thin path's fp32 loss and gradients (of upstream * loss) against the float64 reference."""
    loss_ref, grads_ref = _reference(head, x, t, temperature, reduction, upstream)
    assert_close_to(loss, loss_ref, rtol=2e-6, atol=1e-7, what="loss")
    for name, g, g_ref in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_ref):
        assert_close_to(g, g_ref, rtol=1e-5, atol=1e-8, what=name)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("b,c,m,hidden", [(70, 70, 3, 6), (37, 13, 1, 6), (5, 150, 2, 6), (20, 40, 2, 40),
                                          (70, 70, 3, None), (20, 40, 2, None), (70, 96, 2, 6)],
                         ids=["2-row-blocks", "odd", "3-tiles", "wider", "linear", "linear-wider", "whole-tiles"])
def test_thin_heads_against_float64(thin, bias, b, c, m, hidden):
    """Loss and every gradient (upstream 0.7) of heads whose narrow GEMM and loss run as one kernel: MLP
    heads' second layer, and linear heads over a 12-wide input shared by the heads (seen with a head
    stride of 0); rows across two row blocks (the second short), C below one tile, C across three class
    tiles (the last short), C in whole tiles (EVEN_C: no class mask), M = 1, masked classes; the loss
    alone the same, with no gradient buffer and one launch. (Widths above 128, read again per tile in K
    steps: test_thin_heads_in_k_steps.)"""
    head, x, t = _heads_case(b, c, m, hidden, bias, d=40 if hidden is None and c == 40 else 12)
    assert (c % _common.thin_heads_config(6, c, 4)["BLOCK_C"] == 0) == (c == 96)
    k = x.shape[1] if hidden is None else hidden
    loss = head.distill_loss(x, t, temperature=1.5)
    grads = torch.autograd.grad(loss * 0.7, [x, *params_of(head)])
    assert thin == [((b, m, k), True, True)]  # one launch, dz written, the loss reduced by its last program
    _assert_like_float64(head, x, t, loss, grads)
    loss_ref = _reference(head, x, t, 1.5, "mean", 1.0)[0]
    with torch.no_grad():
        assert_close_to(head.distill_loss(x, t, temperature=1.5), loss_ref, rtol=2e-6, atol=1e-7)
    assert thin[1] == ((b, m, k), False, True)


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("hidden", [None, 5])
def test_thin_heads_tiles_loaded_ahead_or_not(thin, monkeypatch, prefetch, hidden):
    """The teacher and bias tiles loaded a tile ahead (PREFETCH, 16-bit inputs on a GPU) or in their own
    iteration, forced either way on fp32 (tight tolerance): five class tiles, the last short, masked classes."""
    config = lk._common.thin_heads_config
    monkeypatch.setattr(_common, "thin_heads_config", lambda *a, **k: {**config(*a, **k), "PREFETCH": prefetch})
    head, x, t = _heads_case(70, 150, 2, hidden, True)
    loss = head.distill_loss(x, t, temperature=1.5)
    grads = torch.autograd.grad(loss * 0.7, [x, *params_of(head)])
    assert len(thin) == 1
    _assert_like_float64(head, x, t, loss, grads)


@pytest.mark.parametrize("hidden", [None, 150])
def test_thin_heads_in_k_steps(thin, hidden):
    """Inputs wider than one dot step (150 > 128: K steps of 64, the inputs read again per class tile), MLP
    heads' hidden width and linear heads' feature width, against float64."""
    head, x, t = _heads_case(20, 40, 2, hidden, True, d=12 if hidden else 150)
    assert not _common.thin_heads_config(150, 40, 4)["ONE_K_STEP"]
    loss = head.distill_loss(x, t, temperature=1.5)
    grads = torch.autograd.grad(loss * 0.7, [x, *params_of(head)])
    assert thin == [((20, 2, 150), True, True)]
    _assert_like_float64(head, x, t, loss, grads)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_thin_heads_reductions_and_row_upstream(thin, reduction):
    """"sum" (one thin launch, reduced by its last program) and "none" with a random upstream gradient per
    (row, head) (not fused: head(x) then the loss on logits, as documented): against float64."""
    head, x, t = _heads_case(40, 30, 3, 5, True)
    loss = head.distill_loss(x, t, temperature=0.8, reduction=reduction)
    up = torch.rand(40, 3) if reduction == "none" else torch.tensor(1.3)
    grads = torch.autograd.grad((loss * up).sum(), [x, *params_of(head)])
    assert thin == ([] if reduction == "none" else [((40, 3, 5), True, True)])
    _assert_like_float64(head, x, t, loss, grads, 0.8, reduction, up)


def test_thin_heads_in_head_groups_and_row_chunks(thin, monkeypatch):
    """With the logits budget of the cuBLAS path below one head's block: one head per group and row chunks
    of 20 (dz, dW in the group's fp32 accumulator, db's column sums accumulated over chunks), each chunk
    one thin launch, the rows reduced at the end."""
    monkeypatch.setattr(lk, "CUBLAS_GROUP_ELEMENTS", 20 * 30)
    head, x, t = _heads_case(50, 30, 3, 5, True)
    loss = head.distill_loss(x, t, temperature=1.5)
    grads = torch.autograd.grad(loss * 0.7, [x, *params_of(head)])
    assert thin == [((n, 1, 5), True, False) for _ in range(3) for n in (20, 20, 10)]
    _assert_like_float64(head, x, t, loss, grads)


@pytest.mark.parametrize("hidden", [None, 6])
def test_thin_heads_precision_near_saturated_rows(thin, hidden):
    """Large logits at T = 0.7 (rows where a probability is near 1, so dz = T (q - p) cancels): each
    exponent is formed as (x - max) log2(e) / T, exact near the maximum; scaling first (x log2(e) / T -
    max) rounds every term to the ulp of its size, about ten times eager's error here. The gradients of
    the summed loss held to the tolerance rule against eager fp32, with an atol far below that error.
    (Not the bias gradient: the kernel sums its rows in blocks of 64, which the interpreter adds one row
    after another, several ulp apart from eager's sum; test_thin_heads_column_sums_are_the_stored_gradient_
    summed holds those sums. The loss itself does not depend on this: the same maxima and sums.)"""
    head, x, t = _heads_case(70, 13, 3, hidden, True)
    with torch.no_grad():
        head.bias.mul_(4.0)
    t = t * 4.0
    loss = head.distill_loss(x, t, temperature=0.7, reduction="sum")
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    _, grads_ref = _reference(head, x, t, 0.7, "sum", 1.0)
    _, grads_eager = _reference(head, x, t, 0.7, "sum", 1.0, dtype=torch.float32)
    assert thin
    for name, g, ge, g_ref in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_eager, grads_ref):
        if name != "bias":
            tolerance_rule(g, ge, g_ref, 1e-9, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_thin_heads_column_sums_are_the_stored_gradient_summed(dtype):
    """The bias gradient's partial sums (per row block) are the written dz summed over rows, to fp32
    rounding: for 16-bit inputs the stored (rounded) values, as a sum of the gradient tensor would give
    and as dW = dz^T u sees them; two row blocks, the second short, a row past B adding nothing."""
    from fasthydra.ops.thin_heads import launch_thin_heads_kl

    torch.manual_seed(0)
    b, m, c, k = 70, 2, 96, 8
    x3 = torch.randn(b, m, k).to(dtype)
    w3 = torch.randn(m, c, k).to(dtype)
    bias2 = torch.randn(m, c).to(dtype)
    t3 = teacher_logits(b, m, c, dtype=dtype)
    loss2 = torch.empty(b, m)
    g3 = torch.empty(b, m, c, dtype=dtype)
    cfg = _common.thin_heads_config(k, c, g3.element_size())
    sums = launch_thin_heads_kl(x3, w3, bias2, t3, loss2, g3, 1.5, 0.3, cfg, colsum=True)
    assert sums.shape == (m, 2, c) and sums.dtype == torch.float32
    expected = g3.double().sum(0)
    assert expected.abs().max() > 1e-3  # (a gradient that is not all zeros)
    assert_close_to(sums.sum(1), expected, rtol=1e-6, atol=0.0, what="column sums")


def test_thin_heads_fp16(thin):
    """16-bit inputs (dz written in fp16, the bias gradient the written values summed): within fp16's
    rounding of the float64 reference."""
    head, x, t = _heads_case(40, 150, 2, 8, True, torch.float16)
    loss = head.distill_loss(x, t, temperature=1.5)
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    loss_ref, grads_ref = _reference(head, x, t, 1.5, "mean", 1.0)
    assert thin and loss.dtype == torch.float16
    assert_close_to(loss, loss_ref, rtol=2e-3, atol=1e-4, what="loss")
    for name, g, g_ref in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_ref):
        assert_close_to(g, g_ref, rtol=2e-2, atol=1e-3 * g_ref.abs().max().item(), what=name)


@pytest.mark.parametrize("value,match", [(float("nan"), "NaN"), (float("inf"), r"\+Inf"), (None, "-Inf for every")])
def test_thin_heads_check_the_teacher(thin, value, match):
    """Teacher values checked on the thin kernel's own loads (a bad row in the second row block, in the
    second class tile): a clear ValueError; a lone masked class is fine."""
    head, x, t = _heads_case(70, 100, 2, 4, True)
    if value is None:
        t[66, 1, :] = float("-inf")
    else:
        t[66, 1, 90] = value
    with pytest.raises(ValueError, match=match):
        head.distill_loss(x, t)
    assert thin


def test_thin_heads_not_taken_where_they_do_not_apply(monkeypatch):
    """A hidden width above THIN_MAX_K, fp32 at torch's default "highest" precision (IEEE dots), or the
    setting off: the GEMM and the row kernel's loss pass."""
    use_heads_path(monkeypatch, "cublas")
    assert torch.get_float32_matmul_precision() == "highest"
    ran = []
    monkeypatch.setattr(lk, "launch_thin_heads_kl", lambda *a, **k: ran.append(1))
    for on, hidden in ((True, _common.THIN_MAX_K + 1), (True, 6), (False, 6)):
        monkeypatch.setattr(_common, "THIN_HEADS", on)
        head, x, t = _heads_case(6, 20, 2, hidden, True)
        assert torch.isfinite(head.distill_loss(x, t))
    assert ran == []
    cfg = _common.thin_heads_config
    assert cfg(6, 20, 4, ieee=True) is None
    assert cfg(6, 20, 2, ieee=True) is not None  # 16-bit inputs: tensor cores whatever the fp32 setting
    assert cfg(_common.THIN_MAX_K + 1, 32000, 2) is None
    assert cfg(128, 32000, 2)["ONE_K_STEP"] and cfg(128, 32000, 2)["BLOCK_C"] == 64
    assert cfg(128, 1000, 2)["BLOCK_C"] == 32  # a C that is not a multiple of 16
    assert not cfg(_common.THIN_MAX_K, 32000, 2)["ONE_K_STEP"] and cfg(_common.THIN_MAX_K, 32000, 2)["BLOCK_K"] == 64
    assert cfg(128, 1000, 4)["ONE_K_STEP"] and cfg(128, 1000, 4)["PREFETCH"] is False


def test_thin_heads_environment_setting():
    """FASTHYDRA_THIN_HEADS=1 turns the path on at import; unset, it is off."""
    import os
    import subprocess
    import sys

    code = "from fasthydra.ops import _common; print(_common.THIN_HEADS)"
    env = {k: v for k, v in os.environ.items() if k != "FASTHYDRA_THIN_HEADS"}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    on = subprocess.run([sys.executable, "-c", code], env={**env, "FASTHYDRA_THIN_HEADS": "1"}, capture_output=True,
                        text=True, check=True)
    assert (off.stdout.strip(), on.stdout.strip()) == ("False", "True")


@pytest.mark.parametrize("capability, hip, expected", [((9, 0), None, True), ((8, 0), None, False),
                                                       ((8, 9), None, False), ((10, 0), None, False),
                                                       ((12, 0), None, False), ((9, 0), "6.2", False)])
def test_hopper_configurations_only_on_sm90(monkeypatch, capability, hip, expected):
    """The 4-warp thin-heads configuration (one warpgroup, wgmma) is chosen on sm_90 alone: Blackwell
    (sm_100, sm_120) has no wgmma and takes the 8-warp one compiled for sm_80, as Ada does; ROCm devices
    (device type "cuda" there too) are not Hopper whatever their version numbers say."""
    monkeypatch.setattr(_common, "_capability", lambda index: capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert _common.hopper(torch.device("cuda", 0)) is expected
    assert not _common.hopper(torch.device("cpu"))
    warps = _common.thin_heads_config(128, 32000, 2, hopper=_common.hopper(torch.device("cuda", 0)))["num_warps"]
    assert warps == (_common.THIN_HOPPER_WARPS if expected else 8)


def test_inline_ptx_only_on_nvidia_launches(monkeypatch):
    """Inline PTX (the thin-heads kernel's layout pin and fast exponentials) goes to NVIDIA launches only:
    not under the interpreter, not on ROCm."""
    for interp, hip, expected in ((False, None, True), (True, None, False), (False, "6.2", False)):
        monkeypatch.setattr(_common, "interpreting", lambda interp=interp: interp)
        monkeypatch.setattr(torch.version, "hip", hip)
        assert _common.runs_ptx() is expected


@pytest.mark.parametrize("hidden", [None, 5])
def test_thin_heads_empty_batch(thin, hidden):
    """No rows: "mean" is 0, "sum" is 0, every gradient is zero (nothing launched for the empty block)."""
    head = HydraHead(12, 30, 3, hidden_features=hidden, impl="triton")
    x = torch.randn(0, 12, requires_grad=True)
    t = torch.randn(0, 3, 30)
    for reduction in ("mean", "sum"):
        loss = head.distill_loss(x, t, 2.0, reduction=reduction)
        grads = torch.autograd.grad(loss, [x, *params_of(head)])
        assert loss.item() == 0.0 and x.grad is None
        assert grads[0].shape == (0, 12) and all(torch.count_nonzero(g) == 0 for g in grads[1:])
