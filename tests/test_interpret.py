"""interpret tier: every Triton kernel against the float64 reference, under TRITON_INTERPRET=1 on CPU.

Small cases only (the interpreter runs programs one after another in numpy): fp32 and fp16 I/O,
C below 16, C not a multiple of the tile, C spanning several tiles, M = 1, empty batch.
"""

import itertools
import math

import pytest
import torch
from helpers import (HEADS_PATHS, assert_close_to, params_of, reference_loss_and_grads, teacher_logits,
                     tolerance_rule, use_heads_path)

import fasthydra.ops.hydra_kl as hk
from fasthydra import HydraHead, TopKTeacher, hinton_kl_loss, hydra_kl_loss, uncertainty
from fasthydra import reference as R
from fasthydra.functional import linear_heads
from fasthydra.ops import _common
from fasthydra.ops.grouped_linear import grouped_linear_forward, grouped_mm, heads_backward

pytestmark = pytest.mark.interpret

# (B, M, C): C < 16, C not a multiple of 16, C across several tiles (with the tile shrunk), M = 1.
KL_SHAPES = [(6, 3, 10), (5, 2, 37), (4, 1, 13), (3, 4, 200)]


@pytest.fixture(params=HEADS_PATHS)
def gemm(request, monkeypatch):
    """The heads through the two-launch small-step kernels and through torch GEMMs (cuBLAS on a GPU)
    around the loss kernel."""
    return use_heads_path(monkeypatch, request.param)


@pytest.fixture(params=[2048, 16], ids=["tile-2048", "tile-16"])
def max_block_c(request, monkeypatch):
    """Run with the real configuration (rows up to 8192 classes held whole in registers) and with
    16-wide tiles (no row held whole), so that C = 37 and 200 need many tiles."""
    monkeypatch.setattr(_common, "MAX_BLOCK_C", request.param)
    if request.param < 2048:
        monkeypatch.setattr(_common, "ROW_TILE_MAX", request.param)
    return request.param


@pytest.mark.parametrize("b,m,c", KL_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_hydra_kl_kernel_fp32(b, m, c, reduction, max_block_c):
    z = (torch.randn(b, m, c) * 3).requires_grad_()
    t = teacher_logits(b, m, c)
    up = torch.rand(b, m) if reduction == "none" else torch.tensor(1.3)
    loss = hydra_kl_loss(z, t, 2.0, reduction=reduction, impl="triton")
    (g,) = torch.autograd.grad(loss, z, up)
    z64 = z.detach().double().requires_grad_()
    loss_ref = R.hydra_kl_loss_ref(z64, t.double(), 2.0, reduction=reduction)
    (g_ref,) = torch.autograd.grad(loss_ref, z64, up.double())
    assert_close_to(loss, loss_ref, rtol=2e-6, atol=1e-7, what="loss")
    assert_close_to(g, g_ref, rtol=2e-6, atol=1e-9, what="grad")


@pytest.mark.parametrize("b,m,c", KL_SHAPES[:2])
def test_hydra_kl_kernel_fp16_io(b, m, c):
    z = (torch.randn(b, m, c) * 3).half().requires_grad_()
    t = teacher_logits(b, m, c, dtype=torch.float16)
    loss = hydra_kl_loss(z, t, 1.0, impl="triton")
    assert loss.dtype == torch.float16
    (g,) = torch.autograd.grad(loss, z)
    assert g.dtype == torch.float16
    z64 = z.detach().double().requires_grad_()
    (g_ref,) = torch.autograd.grad(R.hydra_kl_loss_ref(z64, t.double(), 1.0), z64)
    # fp32 maths inside: only the fp16 rounding of the output remains
    assert_close_to(loss, R.hydra_kl_loss_ref(z64.detach(), t.double(), 1.0), rtol=1e-3, what="fp16 loss")
    assert_close_to(g, g_ref, rtol=2e-3, atol=1e-6, what="fp16 grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_rows_twice_as_long_stay_in_registers(monkeypatch, dtype):
    """16-bit rows are held in their storage dtype, so rows up to twice ROW_TILE_MAX are read once (not
    with a teacher gradient, which needs more registers); shrunk limits make C = 20 such a row here.
    Its loss and both gradients against float64."""
    monkeypatch.setattr(_common, "MAX_BLOCK_C", 16)
    monkeypatch.setattr(_common, "ROW_TILE_MAX", 16)
    assert _common.kl_rows_config(20, 2)["ROW_IN_REGISTERS"]
    assert not _common.kl_rows_config(20, 4)["ROW_IN_REGISTERS"]
    assert not _common.kl_rows_config(20, 2, extra_row=True)["ROW_IN_REGISTERS"]
    z = (torch.randn(7, 3, 20) * 3).to(dtype).requires_grad_()
    t = teacher_logits(7, 3, 20, dtype=dtype)
    loss = hydra_kl_loss(z, t, 1.5, impl="triton")
    (g,) = torch.autograd.grad(loss, z)
    z64 = z.detach().double().requires_grad_()
    loss_ref = R.hydra_kl_loss_ref(z64, t.double(), 1.5)
    (g_ref,) = torch.autograd.grad(loss_ref, z64)
    # fp32 maths inside on the same 16-bit inputs: only the rounding of the outputs remains
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert_close_to(loss, loss_ref, rtol=rtol, what="loss")
    assert_close_to(g, g_ref, rtol=2 * rtol, atol=1e-6, what="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_l2_hints_on_every_long_row_walk(monkeypatch, dtype):
    """_common.KL_L2_HINTS: L2 eviction priorities on the loss kernel's long-row walks (bench/gpu_check.py times
    them on the H200; the interpreter ignores them, sm_90 compiles them: kernel report). Each launch that takes
    them, with 16-wide tiles, against float64: the loss on logits with a frozen teacher (its gradient formed in
    the second walk), with a teacher that requires grad (three walks), without a gradient (one walk), and the MLP
    heads' loss pass (the student bias added on the loads). Every one of the loss kernel's launches took them."""
    monkeypatch.setattr(_common, "MAX_BLOCK_C", 16)
    monkeypatch.setattr(_common, "ROW_TILE_MAX", 16)
    monkeypatch.setattr(_common, "KL_L2_HINTS", True)
    monkeypatch.setattr(_common, "DEFER_KL_GRAD", False)
    use_heads_path(monkeypatch, "cublas")
    hinted = []
    real_launch = hk.launch

    def spy(kernel, grid, *args, **kwargs):
        if kernel.__name__ == "_hydra_kl_fwd_kernel":
            hinted.append(kwargs["L2_HINTS"])
        return real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(hk, "launch", spy)
    torch.manual_seed(3)
    rtol = 1e-2 if dtype == torch.bfloat16 else 2e-6  # (16-bit: the outputs' rounding; fp32 maths inside)
    b, m, c = 5, 3, 40
    z = (torch.randn(b, m, c) * 3).to(dtype).requires_grad_()
    t = teacher_logits(b, m, c, dtype=dtype).requires_grad_()
    z64 = z.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_()
    loss_ref = R.hydra_kl_loss_ref(z64, t64, 1.5)
    gz_ref, gt_ref = torch.autograd.grad(loss_ref, [z64, t64])
    (gz,) = torch.autograd.grad(hydra_kl_loss(z, t.detach(), 1.5, impl="triton"), z)
    assert_close_to(gz, gz_ref, rtol=2 * rtol, atol=1e-6, what="frozen teacher: grad")
    loss = hydra_kl_loss(z, t, 1.5, impl="triton")
    gz, gt = torch.autograd.grad(loss, [z, t])
    assert_close_to(loss, loss_ref, rtol=rtol, what="trainable teacher: loss")
    assert_close_to(gz, gz_ref, rtol=2 * rtol, atol=1e-6, what="trainable teacher: student grad")
    assert_close_to(gt, gt_ref, rtol=2 * rtol, atol=1e-6, what="trainable teacher: teacher grad")
    with torch.no_grad():
        assert_close_to(hydra_kl_loss(z, t, 1.5, impl="triton"), loss_ref, rtol=rtol, what="no gradient: loss")
    head = HydraHead(12, c, m, hidden_features=8, impl="triton", dtype=dtype)
    x = torch.randn(b, 12, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        head.bias.normal_(0.0, 2.0)
    loss = head.distill_loss(x, t.detach(), 1.5)
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    ref, grads_ref = reference_loss_and_grads(head, x, t.detach(), 1.5)
    assert_close_to(loss, ref, rtol=rtol, what="MLP heads: loss")
    for (name, _), g, g_ref in zip([("x", None), *head.named_parameters()], grads, grads_ref):
        assert_close_to(g, g_ref, rtol=4 * rtol, atol=1e-5, what=f"MLP heads: grad {name}")
    assert len(hinted) >= 4 and all(hinted), hinted


def test_hydra_kl_kernel_extreme_logits_and_masks(max_block_c):
    b, m, c = 4, 2, 40
    z = (torch.randn(b, m, c) * 1e4).requires_grad_()
    t = torch.randn(b, m, c) * 1e4
    t[0, 0, :17] = float("-inf")  # a whole 16-wide tile of masked classes, then more
    loss = hydra_kl_loss(z, t, 1.0, reduction="none", impl="triton")
    (g,) = torch.autograd.grad(loss.sum(), z)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    ref = R.hydra_kl_loss_ref(z.detach().double(), t.double(), 1.0, reduction="none")
    assert_close_to(loss, ref, rtol=1e-5, what="extreme")
    g_ref = R.kl_grad_ref(z.detach().double(), t.double(), 1.0) * b * m
    assert_close_to(g, g_ref, rtol=1e-5, atol=1e-7, what="extreme grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("order", ["rising", "falling"])
def test_long_rows_online_statistics(monkeypatch, order, dtype):
    """Long rows with a frozen teacher: per-thread running maxima and sums over 16-byte slices, merged
    once per row (several rows per program, a partial last tile, rows beyond the batch masked).
    Logits that rise (or fall) along the row move the max at every tile (or never after the first):
    loss and gradient against float64 on the same rounded inputs, 1e3-sized logits, a masked stretch
    longer than a tile; then a NaN in the student (its row's loss and gradient NaN, the other rows
    untouched) and the teacher errors (NaN, +inf, a row that is -inf everywhere) raised by the op."""
    monkeypatch.setattr(_common, "MAX_BLOCK_C", 32)
    monkeypatch.setattr(_common, "ROW_TILE_MAX", 16)
    b, m, c = 5, 2, 90  # 3 tiles, the last one partial; 10 rows in programs of 16
    cfg = _common.kl_rows_config(c, torch.finfo(dtype).bits // 8)
    assert not cfg["ROW_IN_REGISTERS"] and cfg["BLOCK_R"] > 1
    ramp = torch.linspace(-1e3, 1e3, c) if order == "rising" else torch.linspace(1e3, -1e3, c)
    z = (ramp + torch.randn(b, m, c) * 50).to(dtype).requires_grad_()
    t = (ramp * 0.9 + torch.randn(b, m, c) * 50).to(dtype)
    t[1, 0, 20:70] = float("-inf")
    loss = hydra_kl_loss(z, t, 3.0, reduction="none", impl="triton")
    (g,) = torch.autograd.grad(loss.sum(), z)
    z64 = z.detach().double().requires_grad_()
    ref = R.hydra_kl_loss_ref(z64, t.double(), 3.0, reduction="none")
    (g_ref,) = torch.autograd.grad(ref.sum(), z64)
    # fp32 maths inside on the same inputs: bf16 adds only the rounding of the outputs (2^-8 relative)
    rtol = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert_close_to(loss, ref, rtol=rtol, atol=1e-4, what="tiled loss")
    assert_close_to(g, g_ref, rtol=2 * rtol, atol=1e-7, what="tiled grad")

    z_nan = z.detach().clone().requires_grad_()
    with torch.no_grad():
        z_nan[2, 1, 70] = float("nan")
    loss = hydra_kl_loss(z_nan, t, 3.0, reduction="none", impl="triton")
    (g,) = torch.autograd.grad(loss.sum(), z_nan)
    assert torch.isnan(loss[2, 1]) and torch.isnan(g[2, 1]).all()
    keep = torch.ones(b, m, dtype=torch.bool)
    keep[2, 1] = False
    assert torch.isfinite(loss[keep]).all() and torch.isfinite(g[keep]).all()
    for value, match in [(float("nan"), "NaN"), (float("inf"), r"\+Inf"), (None, "-Inf for every")]:
        bad = t.clone()
        if value is None:
            bad[3, 1] = float("-inf")
        else:
            bad[0, 1, 33] = value
        with pytest.raises(ValueError, match=match):
            hydra_kl_loss(z.detach(), bad, 3.0, impl="triton")


def _logits_case(monkeypatch, tiles: bool):
    """(b, m, c, z, t) at C = 40: one tile per row, or (tiles) 16-wide tiles."""
    if tiles:
        monkeypatch.setattr(_common, "MAX_BLOCK_C", 16)
        monkeypatch.setattr(_common, "ROW_TILE_MAX", 16)
    b, m, c = 5, 3, 40
    return b, m, c, (torch.randn(b, m, c) * 3).requires_grad_(), teacher_logits(b, m, c)


@pytest.mark.parametrize("tiles", [False, True], ids=["row-whole", "tiles-of-16"])
def test_loss_on_logits_forms_its_gradient_in_the_backward(monkeypatch, tiles):
    """hydra_kl_loss with a frozen teacher on the Triton path, DEFER_KL_GRAD on (gpu_check's kl-deferred knob;
    off by default): the forward keeps no (B, M, C) tensor of its own (what autograd saves is z and t themselves
    and (B, M, 4) row normalisers), the backward multiplies by the upstream gradient on the device: scalar, per
    row, and an expanded (stride 0) one; a retained graph gives the same gradient twice; z changed in place after
    the forward is refused by autograd instead of giving a wrong gradient."""
    b, m, c, z, t = _logits_case(monkeypatch, tiles)
    monkeypatch.setattr(_common, "DEFER_KL_GRAD", True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = hydra_kl_loss(z, t, 2.0, reduction="none", impl="triton")
    big = [x for x in saved if x.dim() == 3 and x.shape[-1] == c]
    assert {x.data_ptr() for x in big} <= {z.data_ptr(), t.data_ptr()}
    assert any(x.shape == (b, m, 4) and x.dtype == torch.float32 for x in saved)
    z64 = z.detach().double().requires_grad_()
    ref = R.hydra_kl_loss_ref(z64, t.double(), 2.0, reduction="none")
    for up in (torch.rand(b, m), torch.tensor(0.7).expand(b, m)):
        (g,) = torch.autograd.grad(loss, z, up, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref, z64, up.double(), retain_graph=True)
        assert_close_to(g, g_ref, rtol=2e-6, atol=1e-9, what="per-row upstream")
        (g_again,) = torch.autograd.grad(loss, z, up, retain_graph=True)
        assert torch.equal(g, g_again)
    mean = hydra_kl_loss(z, t, 2.0, impl="triton")
    (g,) = torch.autograd.grad(mean * 1.3, z)
    (g_ref,) = torch.autograd.grad(R.hydra_kl_loss_ref(z64, t.double(), 2.0) * 1.3, z64)
    assert_close_to(g, g_ref, rtol=2e-6, atol=1e-9, what="scalar upstream")
    changed = z.detach().clone().requires_grad_()
    inner = changed * 1.0  # what the op saves; then changed in place
    loss = hydra_kl_loss(inner, t, 2.0, impl="triton")
    with torch.no_grad():
        inner.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("tiles", [False, True], ids=["row-whole", "tiles-of-64"])
def test_gradient_formed_in_the_backward_near_saturated_rows(monkeypatch, tiles):
    """A frozen teacher's gradient formed in the backward from the forward's row normalisers, with large
    logits at T = 0.7 (a dominant class: probabilities near 1, where dz = T (q - p) cancels): the norms
    hold the raw logits' maxima, so each exponent is (z - max z) log2(e) / T, exact near the maximum.
    With tempered maxima (max z / T rounded, then z / T - max) the error reached 2.4x eager's here (4.7x
    at C = 1000). Held
    to the tolerance rule against eager fp32, over several draws, rows whole in registers and in tiles."""
    if tiles:
        monkeypatch.setattr(_common, "ROW_TILE_MAX", 64)
        monkeypatch.setattr(_common, "MAX_BLOCK_C", 64)
    for seed in range(4):
        torch.manual_seed(seed)
        t = torch.randn(24, 2, 300) * 8.0
        t[..., 0] += 40.0
        z = (t + torch.randn(24, 2, 300) * 2.4).requires_grad_()
        (g,) = torch.autograd.grad(hydra_kl_loss(z, t, 0.7, reduction="sum", impl="triton"), z)
        z64 = z.detach().double().requires_grad_()
        (g_ref,) = torch.autograd.grad(R.hydra_kl_loss_ref(z64, t.double(), 0.7, reduction="sum"), z64)
        z32 = z.detach().requires_grad_()
        (g_eager,) = torch.autograd.grad(R.hydra_kl_loss_ref(z32, t, 0.7, reduction="sum"), z32)
        tolerance_rule(g, g_eager, g_ref, 1e-9, f"draw {seed}")


@pytest.mark.parametrize("tiles", [False, True], ids=["row-whole", "tiles-of-16"])
def test_loss_on_logits_with_its_gradient_formed_in_the_forward(monkeypatch, tiles):
    """DEFER_KL_GRAD off (gpu_check's kl-stored knob): a frozen teacher's loss forms dz in the forward,
    the backward hands it over scaled in place; against float64 with a scalar and a per-row upstream
    gradient, and at upstream 1 (loss.backward()) z.grad is the very tensor the forward made."""
    monkeypatch.setattr(_common, "DEFER_KL_GRAD", False)
    b, m, c, z, t = _logits_case(monkeypatch, tiles)
    z64 = z.detach().double().requires_grad_()
    up = torch.rand(b, m)
    (g,) = torch.autograd.grad(hydra_kl_loss(z, t, 2.0, reduction="none", impl="triton"), z, up)
    (g_ref,) = torch.autograd.grad(R.hydra_kl_loss_ref(z64, t.double(), 2.0, reduction="none"), z64, up.double())
    assert_close_to(g, g_ref, rtol=2e-6, atol=1e-9, what="per-row upstream")
    (g,) = torch.autograd.grad(hydra_kl_loss(z, t, 2.0, impl="triton") * 1.3, z)
    (g_ref,) = torch.autograd.grad(R.hydra_kl_loss_ref(z64, t.double(), 2.0) * 1.3, z64)
    assert_close_to(g, g_ref, rtol=2e-6, atol=1e-9, what="scalar upstream")
    made = []
    real = hk.hydra_kl_forward_triton
    monkeypatch.setattr(hk, "hydra_kl_forward_triton",
                        lambda *a, **k: (lambda out: made.append(out[1].data_ptr()) or out)(real(*a, **k)))
    loss = hydra_kl_loss(z, t, 2.0, impl="triton")
    loss.backward()
    assert made == [z.grad.data_ptr()]  # (a reference held here would make autograd copy it)
    (g_ref,) = torch.autograd.grad(R.hydra_kl_loss_ref(z64, t.double(), 2.0), z64)
    assert_close_to(z.grad, g_ref, rtol=2e-6, atol=1e-9, what="upstream 1")


@pytest.mark.parametrize("tiles", [False, True], ids=["row-whole", "tiles-of-16"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("defer", [False, True], ids=["grad-in-forward", "deferred-grad"])
def test_loss_on_logits_reduced_by_the_kernels_last_program(monkeypatch, tiles, reduction, defer):
    """hydra_kl_loss "mean"/"sum": the loss kernel's last program sums the programs' partial losses (the
    partials read two at a time here, so the summing loop runs), the count of finished programs is back
    at 0 afterwards, and a forward + backward is the loss kernel (and with DEFER_KL_GRAD the backward's
    gradient kernel) and no torch op (no reduction launch; an upstream of 1 scales nothing)."""
    b, m, c, z, t = _logits_case(monkeypatch, tiles)
    monkeypatch.setattr(_common, "DEFER_KL_GRAD", defer)
    monkeypatch.setattr(_common, "REDUCE_BLOCK", 2)
    z64 = z.detach().double().requires_grad_()
    loss = hydra_kl_loss(z, t, 1.3, reduction=reduction, impl="triton")
    ref = R.hydra_kl_loss_ref(z64, t.double(), 1.3, reduction=reduction)
    assert_close_to(loss, ref, rtol=2e-6, atol=1e-9, what="loss")
    (g,) = torch.autograd.grad(loss * 0.8, z)
    (g_ref,) = torch.autograd.grad(ref * 0.8, z64)
    assert_close_to(g, g_ref, rtol=2e-6, atol=1e-9, what="gradient")
    assert not _common._counts[torch.device("cpu")].any()

    def step():
        z.grad = None
        hydra_kl_loss(z, t, 1.3, reduction=reduction, impl="triton").backward()

    launches, ops = _launches_and_torch_ops(step)
    assert launches == ["_hydra_kl_fwd_kernel"] + ["_hydra_kl_grad_kernel"] * defer
    assert [op for op in ops if op != "copy_"] == [], ops  # (copy_: the error word's copy, as on CUDA)


@pytest.mark.parametrize("programs,blocks", [(1, 1), (2, 2)])
def test_backward_gradient_walks_class_blocks(monkeypatch, programs, blocks):
    """The backward's gradient kernel with 16-wide tiles at C = 40: one program per row walking all three
    tiles, or each row in two class blocks (two tiles, then one ending mid-tile); a per-row upstream
    gradient; against float64."""
    monkeypatch.setattr(_common, "MAX_BLOCK_C", 16)
    monkeypatch.setattr(_common, "ROW_TILE_MAX", 16)
    monkeypatch.setattr(_common, "STREAM_PROGRAMS", programs)
    b, m, c = 5, 3, 40
    assert _common.kl_grad_config(b * m, c)["col_blocks"] == blocks
    z = (torch.randn(b, m, c) * 3).requires_grad_()
    t = teacher_logits(b, m, c)
    up = torch.rand(b, m)
    (g,) = torch.autograd.grad(hydra_kl_loss(z, t, 1.7, reduction="none", impl="triton"), z, up)
    z64 = z.detach().double().requires_grad_()
    (g_ref,) = torch.autograd.grad(R.hydra_kl_loss_ref(z64, t.double(), 1.7, reduction="none"), z64, up.double())
    assert_close_to(g, g_ref, rtol=2e-6, atol=1e-9, what="gradient")


def test_hydra_kl_kernel_matches_torch_path_and_empty_batch():
    z = torch.randn(7, 3, 21, requires_grad=True)
    t = torch.randn(7, 3, 21)
    a = hydra_kl_loss(z, t, 3.0, impl="triton")
    b = hydra_kl_loss(z, t, 3.0, impl="torch")
    assert abs(a.item() - b.item()) <= 1e-6 * abs(b.item())
    empty = hydra_kl_loss(torch.randn(0, 3, 21, requires_grad=True), torch.randn(0, 3, 21), impl="triton")
    assert empty.item() == 0.0


def test_hinton_through_kernel():
    z = torch.randn(9, 12, requires_grad=True)
    t = teacher_logits(9, 4, 12)
    loss = hinton_kl_loss(z, t, 2.0, impl="triton")
    (g,) = torch.autograd.grad(loss, z)
    z64 = z.detach().double().requires_grad_()
    loss_ref = R.hinton_kl_loss_ref(z64, t.double(), 2.0)
    (g_ref,) = torch.autograd.grad(loss_ref, z64)
    assert_close_to(loss, loss_ref, rtol=2e-6)
    assert_close_to(g, g_ref, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("b,m,c", [(6, 3, 10), (5, 1, 37), (4, 5, 300)])
@pytest.mark.parametrize("tile", [None, 64], ids=["row-whole", "tiles-of-64"])
@pytest.mark.parametrize("scale", [3.0, 1e3], ids=["plain", "extreme"])
def test_ensemble_mean_target_kernel(monkeypatch, b, m, c, tile, scale):
    """The Hinton target T * log mean_m softmax(t_m / T) from one launch, against float64: masked
    classes (one member's, and one every member masks: -inf, a masked class for the loss)."""
    from fasthydra.functional import ensemble_log_mean_probs
    from fasthydra.ops.uncertainty import ensemble_log_mean_triton

    if tile is not None:
        monkeypatch.setattr(_common, "UNCERTAINTY_TILE_MAX", tile)  # tiles, not the row held whole
        monkeypatch.setattr(_common, "UNCERTAINTY_LONG_TILE", tile)
    t = teacher_logits(b, m, c, scale=scale)
    t[1, :, c // 3] = float("-inf")
    got = ensemble_log_mean_triton(t, 1.7, "hinton_kl_loss")
    want = 1.7 * ensemble_log_mean_probs(t.double(), 1.7)
    every = torch.isneginf(t).all(dim=1)  # (1, c // 3), and with M = 1 the helper's masked classes
    assert torch.isneginf(got[every]).all() and torch.isfinite(got[~every]).all()
    assert_close_to(got[~every], want[~every], rtol=1e-6, atol=1e-5 * scale, what="T log pbar")


def _topk_members(b, m, c, k, scale, index_dtype):
    """A top-k teacher (values (b, m, k) fp32, indices) with padding: a member row of 2 live entries whose -inf pads
    all name one class (a class the member also keeps), and its float64 dense form (the rest -inf)."""
    t = teacher_logits(b, m, c, scale=scale, masked=False, dtype=torch.float64)
    values, indices = t.topk(k, dim=-1)
    values[1, m - 1, 2:] = float("-inf")
    indices[1, m - 1, 2:] = indices[1, m - 1, 0]
    dense = torch.full((b, m, c), float("-inf"), dtype=torch.float64).scatter(2, indices, values)
    dense[1, m - 1] = float("-inf")  # (its ids repeat: written again from its live entries alone)
    dense[1, m - 1, indices[1, m - 1, :2]] = values[1, m - 1, :2]
    return values.float(), indices.to(index_dtype), dense


@pytest.mark.parametrize("b,m,c,k", [(6, 3, 10, 4), (5, 4, 300, 16), (3, 2, 2500, 7)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("scale,t_form", [(3.0, "number"), (3.0, "tensor"), (200.0, "number")],
                         ids=["plain", "T-tensor", "extreme"])
def test_topk_mean_target_kernel(b, m, c, k, index_dtype, scale, t_form):
    """The Hinton target of a top-k teacher, T * log mean_m p~_m, from one launch, against float64: padding
    entries that repeat a kept class add nothing, a class no member keeps is -inf (masked for the loss), and
    classes whose probability is below fp32's range (scale 200 at T = 1.7) keep a finite log (formed in log space;
    the torch ops' linear sum gives -inf there). The row's fill walks several tiles where C = 2500."""
    from fasthydra.ops.uncertainty import topk_log_mean_triton

    values, indices, dense = _topk_members(b, m, c, k, scale, index_dtype)
    temperature = torch.tensor(1.7) if t_form == "tensor" else 1.7
    got = topk_log_mean_triton(values, indices, c, temperature, "hinton_kl_loss")
    log_p = torch.log_softmax(dense / 1.7, dim=-1)
    want = 1.7 * (torch.logsumexp(log_p, dim=1) - math.log(m))
    kept = torch.isfinite(want)
    assert torch.equal(torch.isneginf(got), ~kept) and torch.isfinite(got[kept]).all()
    assert (~kept).sum() > 0 and kept.sum() >= k
    assert_close_to(got[kept], want[kept], rtol=1e-6, atol=1e-5 * scale, what="T log pbar")


def test_topk_mean_target_kernel_skips_class_ids_out_of_range():
    """An id outside [0, C) (which the teacher check reports) is never written: the row's other classes keep their
    target, and nothing past the row changes (a GPU kernel that stored there would write another row or past the
    tensor; torch's scatter_add stops the device with an assertion)."""
    from fasthydra.ops.uncertainty import topk_log_mean_triton

    values, indices, _ = _topk_members(4, 3, 20, 5, 3.0, torch.int64)
    good = topk_log_mean_triton(values, indices, 20, 2.0, "hinton_kl_loss")
    bad = indices.clone()
    bad[2, 1, 3], bad[2, 2, 0] = 20, -1
    got = topk_log_mean_triton(values, bad, 20, 2.0, "hinton_kl_loss")
    assert torch.equal(got[[0, 1, 3]], good[[0, 1, 3]])
    touched = torch.zeros(20, dtype=torch.bool)
    touched[indices[2, 1, 3]] = touched[indices[2, 2, 0]] = True
    assert torch.equal(got[2, ~touched] > float("-inf"), good[2, ~touched] > float("-inf"))


def test_hinton_with_a_topk_teacher_of_many_members_is_one_target_launch():
    """Several top-k members: the target is one launch (no torch op per member, no scatter at all) before the
    loss kernel's launches; a one-member teacher launches no target kernel (its values are the target)."""
    z = torch.randn(40, 10, requires_grad=True)
    values, indices = teacher_logits(40, 3, 10, masked=False).topk(4, dim=-1)

    def step(v, i):
        z.grad = None
        hinton_kl_loss(z, TopKTeacher(v, i), 2.0, impl="triton").backward()

    one, _ = _launches_and_torch_ops(lambda: step(values[:, :1], indices[:, :1]))
    many, many_ops = _launches_and_torch_ops(lambda: step(values, indices))
    assert one and "_topk_log_mean_kernel" not in one, one
    assert many[0] == "_topk_log_mean_kernel" and many.count("_topk_log_mean_kernel") == 1, many
    assert not [op for op in many_ops if "scatter" in op or "softmax" in op or op.startswith("aten::log")], many_ops


@pytest.mark.parametrize("value,match", [(float("nan"), "NaN"), (float("inf"), r"\+Inf"), (None, "-Inf for every")])
def test_hinton_on_the_triton_path_checks_the_teacher(value, match):
    t = teacher_logits(5, 3, 12)
    if value is None:
        t[2, 1] = float("-inf")
    else:
        t[2, 1, 4] = value
    with pytest.raises(ValueError, match=match):
        hinton_kl_loss(torch.randn(5, 12), t, 2.0, impl="triton")
    hinton_kl_loss(torch.randn(5, 12), teacher_logits(5, 3, 12), 2.0, impl="triton")  # reported once


def test_hinton_with_one_member_launches_no_target_kernel():
    """KD from one teacher: the loss kernel's launches on the member itself; several members add exactly the
    target's launch before them (counted as bench/launch_counts.py counts)."""
    z = torch.randn(40, 10, requires_grad=True)
    t = teacher_logits(40, 3, 10)

    def step(teacher):
        z.grad = None
        hinton_kl_loss(z, teacher, 2.0, impl="triton").backward()

    one, one_ops = _launches_and_torch_ops(lambda: step(t[:, :1]))
    many, _ = _launches_and_torch_ops(lambda: step(t))
    assert one and "_ensemble_log_mean_kernel" not in one, one
    assert many == ["_ensemble_log_mean_kernel", *one], (many, one)


def test_hinton_teacher_that_requires_grad_keeps_torch_ops():
    """A teacher that requires grad gets its gradient through the torch target (the kernel has none)."""
    z = torch.randn(6, 9, requires_grad=True)
    t = teacher_logits(6, 3, 9, masked=False).requires_grad_()
    gz, gt = torch.autograd.grad(hinton_kl_loss(z, t, 1.5, impl="triton"), [z, t])
    z64, t64 = z.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    gz_ref, gt_ref = torch.autograd.grad(R.hinton_kl_loss_ref(z64, t64, 1.5), [z64, t64])
    assert_close_to(gz, gz_ref, rtol=1e-5, atol=1e-9)
    assert_close_to(gt, gt_ref, rtol=1e-5, atol=1e-9)


# (B, D, M, C, hidden): odd shape, M = 1, C below 16, C across several 16-wide tiles, MLP heads.
HEAD_CASES = [(37, 45, 5, 13, None), (8, 20, 1, 10, None), (10, 24, 2, 40, None), (12, 18, 3, 10, 9),
              (0, 8, 2, 5, None)]


@pytest.mark.parametrize("b,d,m,c,hidden", HEAD_CASES)
def test_fused_heads_kernel_fp32(b, d, m, c, hidden, monkeypatch, gemm):
    head = HydraHead(d, c, m, hidden_features=hidden, impl="triton")
    x = torch.randn(b, d, requires_grad=True)
    t = teacher_logits(b, m, c)
    loss = head.distill_loss(x, t, temperature=2.0)
    grads = torch.autograd.grad(loss * 0.8, [x, *params_of(head)])
    loss_ref, grads_ref = reference_loss_and_grads(head, x, t, 2.0, upstream=0.8)
    assert_close_to(loss, loss_ref, rtol=2e-6, atol=1e-7, what="loss")
    for name, g, g_ref in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_ref):
        assert_close_to(g, g_ref, rtol=1e-5, atol=1e-8, what=name)


@pytest.mark.parametrize("hidden", [None, 9])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_equals_unfused_triton(hidden, reduction, gemm):
    """The contract under the interpreter: distill_loss == hydra_kl_loss(head(x)) (rel 1e-5), same grads."""
    head = HydraHead(45, 13, 5, hidden_features=hidden, impl="triton")
    x = torch.randn(37, 45, requires_grad=True)
    t = teacher_logits(37, 5, 13)
    fused = head.distill_loss(x, t, temperature=3.0, reduction=reduction)
    g_fused = torch.autograd.grad(fused, [x, *params_of(head)])
    plain = hydra_kl_loss(head(x), t, temperature=3.0, reduction=reduction, impl="triton")
    g_plain = torch.autograd.grad(plain, [x, *params_of(head)])
    assert abs(fused.item() - plain.item()) <= 1e-5 * abs(plain.item())
    for a, b in zip(g_fused, g_plain):
        assert_close_to(a, b, rtol=1e-5, atol=1e-8)


def test_fused_heads_loss_only_path(gemm):
    head = HydraHead(16, 10, 3, impl="triton")
    x = torch.randn(9, 16)
    t = teacher_logits(9, 3, 10)
    with torch.no_grad():
        loss = head.distill_loss(x, t, 2.0)
    loss_ref, _ = reference_loss_and_grads(head, x, t, 2.0)
    assert_close_to(loss, loss_ref, rtol=2e-6)


@pytest.mark.parametrize("hidden", [None, 6])
def test_fused_heads_fp16_io(hidden, gemm):
    head = HydraHead(24, 10, 2, hidden_features=hidden, impl="triton", dtype=torch.float16)
    x = torch.randn(12, 24, dtype=torch.float16, requires_grad=True)
    t = teacher_logits(12, 2, 10, dtype=torch.float16)
    loss = head.distill_loss(x, t, 2.0)
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    assert loss.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    loss_ref, grads_ref = reference_loss_and_grads(head, x, t, 2.0)
    assert_close_to(loss, loss_ref, rtol=5e-3, what="fp16 loss")
    for g, g_ref in zip(grads, grads_ref):
        assert_close_to(g, g_ref, rtol=2e-2, atol=1e-5, what="fp16 grad")


@pytest.mark.parametrize("hidden", [None, 7])
def test_head_forward_and_backward_kernel(hidden, gemm):
    head = HydraHead(30, 11, 3, hidden_features=hidden, impl="triton")
    x = torch.randn(19, 30, requires_grad=True)
    z = head(x)
    up = torch.randn_like(z)
    grads = torch.autograd.grad(z, [x, *params_of(head)], up)
    p64 = {k: v.detach().double().requires_grad_() for k, v in head.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    if hidden is None:
        z_ref = R.linear_heads_ref(x64, p64["weight"], p64["bias"])
    else:
        z_ref = R.mlp_heads_ref(x64, p64["hidden_weight"], p64["hidden_bias"], p64["weight"], p64["bias"])
    grads_ref = torch.autograd.grad(z_ref, [x64, *p64.values()], up.double())
    assert_close_to(z, z_ref, rtol=1e-5, what="logits")
    for g, g_ref in zip(grads, grads_ref):
        assert_close_to(g, g_ref, rtol=1e-5, atol=1e-7)


def test_grouped_mm_strided_views():
    """The grouped GEMM on transposed views: several groups with bias + relu, one group written in place
    (bias + relu, bias alone, no bias), and an empty contraction (bias only)."""
    a = torch.randn(3, 20, 17).transpose(1, 2)  # (3, 17, 20), strided
    b = torch.randn(3, 20, 33)
    bias = torch.randn(3, 33)
    out = torch.empty(3, 17, 33)
    grouped_mm(a, b, out, bias, relu=True)
    expected = torch.relu(torch.bmm(a.double(), b.double()) + bias.double()[:, None])
    assert_close_to(out, expected, rtol=1e-6, what="bias+relu")
    for bias1, relu in ((bias[:1], True), (bias[:1], False), (None, False)):
        one = torch.full((1, 17, 33), float("nan"))
        grouped_mm(a[:1], b[:1], one, bias1, relu=relu)
        want = torch.bmm(a[:1].double(), b[:1].double()) + (0 if bias1 is None else bias1.double()[:, None])
        assert_close_to(one, torch.relu(want) if relu else want, rtol=1e-6, what=f"one group relu={relu}")
    empty = torch.full((3, 17, 33), float("nan"))
    grouped_mm(torch.randn(3, 17, 0), torch.randn(3, 0, 33), empty, bias)
    assert torch.equal(empty, bias[:, None].expand(3, 17, 33))


@pytest.mark.parametrize("shared", [True, False], ids=["shared-input", "per-head-input"])
def test_grouped_linear_forward_and_backward_at_edge_shapes(shared):
    """The heads' GEMMs of the cuBLAS path (MLP heads' first layer, the Gaussian heads' backward) against
    einsum in float64: an empty batch, one head, one output, an empty contraction; bias and ReLU each way."""
    for b, m, n, k in itertools.product((0, 3), (1, 3), (1, 4), (0, 5)):
        for has_bias, relu in itertools.product((False, True), repeat=2):
            x = torch.randn((b, k) if shared else (b, m, k), dtype=torch.float64)
            w = torch.randn(m, n, k, dtype=torch.float64)
            bias = torch.randn(m, n, dtype=torch.float64) if has_bias else None
            what = f"(B, M, N, K) = {(b, m, n, k)}, bias={has_bias}, relu={relu}"
            lin = torch.einsum("bk,mnk->bmn" if shared else "bmk,mnk->bmn", x, w) + (0 if bias is None else bias)
            assert_close_to(grouped_linear_forward(x, w, bias, shared, relu), lin.clamp(min=0) if relu else lin,
                            rtol=1e-12, what=what)
            g = torch.randn(b, m, n, dtype=torch.float64)
            g_in, g_w = heads_backward(g, x, w, shared, True, True)
            assert_close_to(g_in, torch.einsum("bmn,mnk->bk" if shared else "bmn,mnk->bmk", g, w), rtol=1e-12,
                            what="input gradient " + what)
            assert_close_to(g_w, torch.einsum("bmn,bk->mnk" if shared else "bmn,bmk->mnk", g, x), rtol=1e-12,
                            what="weight gradient " + what)


def test_linear_heads_bias_free_kernel(gemm):
    x = torch.randn(5, 9)
    w = torch.randn(2, 4, 9)
    assert_close_to(linear_heads(x, w, None, impl="triton"), R.linear_heads_ref(x.double(), w.double()), rtol=1e-6)


def test_uncertainty_long_rows_pick_warps_by_row_count():
    """The two configurations that won on the H200 come out of the rule: many rows (4096 x 8 x 32000)
    in 4-warp programs, few rows (256 x 4 x 32000) in 32-warp ones; each program walks one row in
    tiles of UNCERTAINTY_LONG_TILE elements; the Hinton target walks its rows in the backward's tiles (4 warps
    splitting the classes, a 16-byte load of each of the 8 heads a thread)."""
    many = _common.uncertainty_config(8, 32000, 4096)
    few = _common.uncertainty_config(4, 32000, 256)
    assert (many["BLOCK_C"], many["num_warps"], many["ROW_IN_REGISTERS"]) == (1024, 4, False)
    assert (few["BLOCK_C"], few["num_warps"]) == (2048, 32)
    assert _common.uncertainty_config(8, 32000, 1024)["num_warps"] == 8
    # (8 heads stop at 16 warps: in 32, 64 registers a thread, their tiles spilled under Triton 3.9; 4 heads take 32)
    assert _common.uncertainty_config(8, 32000, 1)["num_warps"] == 16
    assert _common.uncertainty_config(4, 32000, 1)["num_warps"] == 32
    for size, classes, vec in ((4, 512, 4), (2, 1024, 8)):  # fp32 and 16-bit: one 16-byte load of every head a thread
        target = _common.uncertainty_config(8, 32000, 4096, hinton_target=True, elem_size=size)
        assert target == _common.uncertainty_grad_config(8, 32000, size)  # the backward's tiles
        assert (target["BLOCK_C"], target["VEC"], target["num_warps"], target["ROW_IN_REGISTERS"]) == (classes, vec, 4,
                                                                                                       False)
    assert _common.uncertainty_config(8, 1000, 4096)["ROW_IN_REGISTERS"]  # mid C: the row read once


@pytest.mark.parametrize("b,m,c", [(6, 3, 10), (4, 1, 13), (3, 5, 300), (0, 2, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tile", [None, 64], ids=["row-whole", "tiles-of-64"])
def test_uncertainty_kernel(b, m, c, dtype, tile, monkeypatch):
    if tile is not None:  # the tiled passes (a row not held whole)
        monkeypatch.setattr(_common, "UNCERTAINTY_TILE_MAX", tile)
        monkeypatch.setattr(_common, "UNCERTAINTY_LONG_TILE", tile)
        assert c <= 16 or not _common.uncertainty_config(m, c)["ROW_IN_REGISTERS"]
    z = (torch.randn(b, m, c) * 3).to(dtype)
    u = uncertainty(z, impl="triton")
    ref = R.uncertainty_ref(z.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for name in ("probs", "total", "aleatoric", "epistemic"):
        got = getattr(u, name)
        assert got.dtype == dtype
        assert_close_to(got, getattr(ref, name), rtol=tol, atol=tol * 0.1, what=name)
    assert (u.epistemic >= 0).all()


@pytest.mark.parametrize("tiles", [False, True], ids=["row-whole", "tiles-of-32"])
def test_uncertainty_kernel_matches_torch_path_with_extreme_logits(monkeypatch, tiles):
    """1e4-sized logits, and rows whose max rises along the row (it moves at every tile of the per-thread
    statistics) or falls (never after the first), against the float64 reference."""
    if tiles:
        monkeypatch.setattr(_common, "UNCERTAINTY_TILE_MAX", 32)
        monkeypatch.setattr(_common, "UNCERTAINTY_LONG_TILE", 32)
        assert not _common.uncertainty_config(3, 50, 6)["ROW_IN_REGISTERS"]
    z = torch.randn(6, 3, 50) * 1e4
    z[4] = torch.linspace(-300, 300, 50) + torch.randn(3, 50) * 20
    z[5] = torch.linspace(300, -300, 50) + torch.randn(3, 50) * 20
    a = uncertainty(z, impl="triton")
    ref = R.uncertainty_ref(z.double())
    for name in ("probs", "total", "aleatoric", "epistemic"):
        got = getattr(a, name)
        assert torch.isfinite(got).all()
        assert_close_to(got, getattr(ref, name), rtol=1e-5, atol=1e-6, what=name)


def test_kernels_really_ran_in_the_interpreter(monkeypatch):
    """Guard against a silent fallback: the Triton launcher must be what computes impl='triton'."""
    calls = []
    real = hk.launch_kl_rows

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hk, "launch_kl_rows", spy)
    hydra_kl_loss(torch.randn(2, 2, 5), torch.randn(2, 2, 5), impl="triton")
    assert calls


@pytest.mark.parametrize("value,match", [(float("nan"), "NaN"), (float("inf"), r"\+Inf"), (None, "-Inf for every")])
def test_kernels_check_the_teacher_while_reading_it(monkeypatch, value, match, gemm):
    """On the Triton path the value check rides in the kernels (a per-row status they write), not in a
    separate pass over the teacher: the host-side scan must not run, the errors must still come."""
    import fasthydra.ops.library as lib

    def no_scan(*args, **kwargs):
        raise AssertionError("the separate teacher scan ran on the Triton path")

    monkeypatch.setattr(lib, "flag_teacher_rows", no_scan)
    t = torch.randn(4, 3, 20)
    if value is None:
        t[2, 1, :] = float("-inf")
    else:
        t[2, 1, 7] = value
    with pytest.raises(ValueError, match=match):
        hydra_kl_loss(torch.randn(4, 3, 20, requires_grad=True), t, impl="triton")
    head = HydraHead(6, 20, 3, impl="triton")
    with pytest.raises(ValueError, match=match):
        head.distill_loss(torch.randn(4, 6), t)
    t_ok = torch.randn(4, 3, 20)
    t_ok[0, 0, 3] = float("-inf")  # a lone masked class is fine
    assert torch.isfinite(hydra_kl_loss(torch.randn(4, 3, 20), t_ok, impl="triton"))


@pytest.mark.parametrize("hidden", [None, 5])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("budget", [10**9, 2 * 9 * 70, 4 * 70], ids=["one-group", "groups-of-2", "row-chunks"])
def test_cublas_path_head_groups_and_row_chunks(monkeypatch, hidden, bias, budget):
    """The cuBLAS + loss-kernel path: all heads in one GEMM, heads in groups of two (dx summed over
    groups in fp32, each head's dW complete in one GEMM), and row chunks of 4 (dW in an fp32
    accumulator for the group's slice), with masked classes, against the float64 reference."""
    import fasthydra.ops.linear_hydra_kl as lk

    use_heads_path(monkeypatch, "cublas")
    monkeypatch.setattr(lk, "CUBLAS_GROUP_ELEMENTS", budget)
    _check_head_case(*_masked_head_case(hidden, bias))


def _masked_head_case(hidden, bias):
    head = HydraHead(12, 70, 3, hidden_features=hidden, bias=bias, impl="triton")
    t = teacher_logits(9, 3, 70)
    t[3, 2, :40] = float("-inf")  # masked classes spanning a whole split / tile
    return head, torch.randn(9, 12, requires_grad=True), t


@pytest.mark.parametrize("tiles", [False, True], ids=["row-whole", "tiles-of-16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mlp_heads_bias_added_by_the_loss_kernel(monkeypatch, tiles, dtype):
    """MLP heads on the cuBLAS path: the second layer's GEMM has no bias operand; the loss kernel adds
    each head's bias on its loads (rows held whole, and walked in tiles), loss and every gradient
    against float64, a teacher that requires grad too (its gradient from the same kernel)."""
    import fasthydra.ops.linear_hydra_kl as lk

    use_heads_path(monkeypatch, "cublas")
    if tiles:
        monkeypatch.setattr(_common, "MAX_BLOCK_C", 16)
        monkeypatch.setattr(_common, "ROW_TILE_MAX", 16)
    seen = []
    real = lk.launch_kl_rows

    def spy(*args, **kwargs):
        seen.append(args[8] if len(args) > 8 else kwargs.get("bias3"))
        return real(*args, **kwargs)

    monkeypatch.setattr(lk, "launch_kl_rows", spy)
    head, x, t = _masked_head_case(5, True)
    with torch.no_grad():
        head.bias.copy_(torch.randn_like(head.bias) * 4)  # a bias that matters
    head, x = head.to(dtype), x.detach().to(dtype).requires_grad_()
    t = t.to(dtype).requires_grad_()
    loss = head.distill_loss(x, t, temperature=1.5)
    grads = torch.autograd.grad(loss, [x, t, *params_of(head)])
    assert seen and all(b is not None for b in seen)
    x64 = x.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_()
    p64 = {k: v.detach().double().requires_grad_() for k, v in head.named_parameters()}
    z = R.mlp_heads_ref(x64, p64["hidden_weight"], p64["hidden_bias"], p64["weight"], p64["bias"])
    ref = R.hydra_kl_loss_ref(z, t64, 1.5)
    grads_ref = torch.autograd.grad(ref, [x64, t64, *p64.values()])
    rtol, atol = (2e-5, 1e-8) if dtype == torch.float32 else (2e-2, 1e-5)
    assert_close_to(loss, ref, rtol=rtol / 4, atol=atol, what="loss")
    for name, g, g_ref in zip(["x", "teacher", *p64], grads, grads_ref):
        assert_close_to(g, g_ref, rtol=rtol, atol=atol, what=name)


def _check_head_case(head, x, t):
    """distill_loss, its gradients (upstream 0.7) and its loss-only value against the float64 reference."""
    loss = head.distill_loss(x, t, temperature=1.5)
    grads = torch.autograd.grad(loss * 0.7, [x, *params_of(head)])
    loss_ref, grads_ref = reference_loss_and_grads(head, x, t, 1.5, upstream=0.7)
    assert_close_to(loss, loss_ref, rtol=2e-6, atol=1e-7, what="loss")
    for name, g, g_ref in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_ref):
        assert_close_to(g, g_ref, rtol=1e-5, atol=1e-8, what=name)
    with torch.no_grad():
        assert_close_to(head.distill_loss(x, t, temperature=1.5), loss_ref, rtol=2e-6)


def _odd_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in a view with stride 2 along its last dimension (a slice of a wider tensor), or dense
    with its dimensions' order reversed in memory (a transposed bias, a permuted weight)."""
    if layout == "permuted":
        order = list(reversed(range(t.dim())))
        return t.detach().permute(order).contiguous().permute(order).requires_grad_(t.requires_grad)
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    view = wide[..., ::2]
    view.copy_(t)
    return view.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("layout", ["strided", "permuted"])
@pytest.mark.parametrize("hidden", [None, 5], ids=["linear", "mlp"])
@pytest.mark.parametrize("path", ["small", "cublas", "split-bias"])
def test_fused_functionals_take_parameters_in_any_layout(monkeypatch, hidden, path, layout):
    """linear_hydra_kl_loss / mlp_hydra_kl_loss with every tensor in an odd layout (bias, weights, x and the
    teacher with stride 2 along their last dimension, or dense with their dimensions reversed in memory),
    on every heads path, against float64: loss and gradients. Found by a randomized sweep (the module's
    own parameters are contiguous, the functionals' arguments need not be): the MLP heads' bias added by
    the loss kernel (and by the thin-heads kernel, since removed) read with unit stride along C (wrong losses); the
    small step's bias gradient and the first MLP layer's weight gradient were allocated in their
    parameter's layout and written as if contiguous (a transposed db; a view error)."""
    from fasthydra.functional import linear_hydra_kl_loss, mlp_hydra_kl_loss

    import fasthydra.ops.linear_hydra_kl as lk
    import fasthydra.ops.small_heads as small_heads_ops

    use_heads_path(monkeypatch, "small" if path == "small" else "cublas")
    monkeypatch.setattr(_common, "SPLIT_BIAS_PASS", path == "split-bias")
    if path == "split-bias":  # rows walked in tiles: the loss pass forms db with dz
        monkeypatch.setattr(_common, "MAX_BLOCK_C", 16)
        monkeypatch.setattr(_common, "ROW_TILE_MAX", 16)
    ran = []  # the path's own launcher, seen to run
    spied = {"small": "small_heads_forward", "cublas": "launch_kl_rows", "split-bias": "launch_kl_grad_cols"}[path]
    home = small_heads_ops if path == "small" else lk
    real = getattr(home, spied)
    monkeypatch.setattr(home, spied, lambda *a, **k: ran.append(spied) or real(*a, **k))
    b, d, m, c = 9, 12, 3, 40
    gen = torch.Generator().manual_seed(5)
    params = {"hidden_weight": torch.randn(m, hidden or 1, d, generator=gen), "hidden_bias": torch.randn(m, hidden or 1,
                                                                                                       generator=gen),
              "weight": torch.randn(m, c, hidden or d, generator=gen), "bias": torch.randn(m, c, generator=gen) * 3}
    if hidden is None:
        del params["hidden_weight"], params["hidden_bias"]
    x = torch.randn(b, d, generator=gen)
    t = teacher_logits(b, m, c)
    odd = {k: _odd_layout(v.requires_grad_(), layout) for k, v in {"x": x, **params}.items()}
    args = [odd[k] for k in ("x", "hidden_weight", "hidden_bias", "weight", "bias") if k in odd]
    fused = mlp_hydra_kl_loss if hidden else linear_hydra_kl_loss
    loss = fused(*args, _odd_layout(t, layout), 1.5, impl="triton")
    grads = torch.autograd.grad(loss * 0.7, args)
    assert ran, f"{spied} did not run"
    ref = {k: v.detach().double().requires_grad_() for k, v in {"x": x, **params}.items()}
    if hidden:
        z = R.mlp_heads_ref(ref["x"], ref["hidden_weight"], ref["hidden_bias"], ref["weight"], ref["bias"])
    else:
        z = R.linear_heads_ref(ref["x"], ref["weight"], ref["bias"])
    loss_ref = R.hydra_kl_loss_ref(z, t.double(), 1.5)
    names = [k for k in ("x", "hidden_weight", "hidden_bias", "weight", "bias") if k in odd]
    grads_ref = torch.autograd.grad(loss_ref * 0.7, [ref[k] for k in names])
    assert_close_to(loss, loss_ref, rtol=2e-6, atol=1e-7, what="loss")
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close_to(g, g_ref, rtol=1e-5, atol=1e-8, what=name)


def test_cublas_path_groups_of_heads_are_what_runs(monkeypatch):
    """Guard against a silent fallback: with a budget of two heads the loss kernel runs once per group."""
    import fasthydra.ops.linear_hydra_kl as lk

    use_heads_path(monkeypatch, "cublas")
    monkeypatch.setattr(lk, "CUBLAS_GROUP_ELEMENTS", 2 * 6 * 20)
    seen = []
    real = lk.launch_kl_rows

    def spy(z3, *args, **kwargs):
        seen.append(tuple(z3.shape))
        return real(z3, *args, **kwargs)

    monkeypatch.setattr(lk, "launch_kl_rows", spy)
    head = HydraHead(8, 20, 5, impl="triton")
    head.distill_loss(torch.randn(6, 8, requires_grad=True), teacher_logits(6, 5, 20)).backward()
    assert seen == [(6, 2, 20), (6, 2, 20), (6, 1, 20)]


@pytest.mark.parametrize("hidden", [None, 6], ids=["linear", "mlp"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("groups", [False, True], ids=["one-launch", "groups-of-2"])
def test_cublas_path_loss_reduced_by_the_loss_kernel(monkeypatch, hidden, reduction, groups):
    """cuBLAS path: where one launch of the loss kernel covers every row, its last program reduces the
    loss ("mean" and "sum": no reduction launch after it, the finished-program count back at 0); with
    head groups the rows are reduced once at the end. Against float64, at an upstream gradient of 0.6."""
    import fasthydra.ops.linear_hydra_kl as lk

    use_heads_path(monkeypatch, "cublas")
    monkeypatch.setattr(_common, "REDUCE_BLOCK", 4)  # the reducing program loops over the partials
    if groups:
        monkeypatch.setattr(lk, "CUBLAS_GROUP_ELEMENTS", 2 * 37 * 13)
    seen = []
    real = lk.launch_kl_rows
    monkeypatch.setattr(lk, "launch_kl_rows", lambda *a, **k: seen.append(k.get("reduce_to")) or real(*a, **k))
    head = HydraHead(10, 13, 5, hidden_features=hidden, impl="triton")
    x = torch.randn(37, 10, requires_grad=True)
    t = teacher_logits(37, 5, 13)
    loss = head.distill_loss(x, t, temperature=1.7, reduction=reduction)
    grads = torch.autograd.grad(loss * 0.6, [x, *params_of(head)])
    if groups:
        assert len(seen) == 3 and all(r is None for r in seen)
    else:
        assert len(seen) == 1 and seen[0][0] is loss and seen[0][1] == (1 / 185 if reduction == "mean" else 1.0)
    assert not _common._counts[torch.device("cpu")].any()
    loss_ref, grads_ref = reference_loss_and_grads(head, x, t, 1.7, upstream=0.6)
    if reduction == "sum":
        loss_ref, grads_ref = loss_ref * 185, [g * 185 for g in grads_ref]
    assert_close_to(loss, loss_ref, rtol=2e-6, atol=1e-7, what="loss")
    for name, g, g_ref in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_ref):
        assert_close_to(g, g_ref, rtol=1e-5, atol=1e-8, what=name)
    with torch.no_grad():  # the loss alone, the same way
        assert_close_to(head.distill_loss(x, t, temperature=1.7, reduction=reduction), loss_ref, rtol=2e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_reduced_after_the_launch_where_the_kernel_cannot(monkeypatch, reduction):
    """A 16-bit row wider than ROW_TILE_MAX held in registers with the gradient written: the row kernel
    does not sum the loss in its launch there (it spilled under Triton 3.6); launch_kl_rows sums the rows
    after it into the same output. fp16 linear heads on the cuBLAS path (the tile limits shrunk: a 30-class
    row in one 32-wide tile), against float64."""
    import fasthydra.kernels.softmax_kl as sk

    use_heads_path(monkeypatch, "cublas")
    monkeypatch.setattr(_common, "ROW_TILE_MAX", 16)
    monkeypatch.setattr(_common, "MAX_BLOCK_C", 16)
    cfg = _common.kl_rows_config(30, 2)
    assert cfg["ROW_IN_REGISTERS"] and not _common.kl_rows_reduces_in_launch(cfg, True)
    assert _common.kl_rows_reduces_in_launch(cfg, False) and _common.kl_rows_reduces_in_launch(
        _common.kl_rows_config(30, 4), True)
    real = sk._hydra_kl_fwd_kernel
    reduced_in_launch = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                reduced_in_launch.append(kwargs["REDUCE"])
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(sk, "_hydra_kl_fwd_kernel", Spy())
    head = HydraHead(12, 30, 3, impl="triton").half()
    x = torch.randn(20, 12, dtype=torch.float16, requires_grad=True)
    t = teacher_logits(20, 3, 30, dtype=torch.float16)
    loss = head.distill_loss(x, t, temperature=1.5, reduction=reduction)
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    assert reduced_in_launch == [False]
    loss_ref, grads_ref = reference_loss_and_grads(head, x, t, 1.5)
    n = 20 * 3 if reduction == "sum" else 1
    assert_close_to(loss, loss_ref * n, rtol=2e-3, atol=1e-4, what="loss")
    for name, g, g_ref in zip(["x", "weight", "bias"], grads, grads_ref):
        assert_close_to(g, g_ref * n, rtol=2e-2, atol=1e-3 * n * g_ref.abs().max().item(), what=name)
    with torch.no_grad():  # the loss alone: summed in the launch
        head.distill_loss(x, t, temperature=1.5, reduction=reduction)
    assert reduced_in_launch == [False, True]


@pytest.mark.parametrize("hidden", [None, 6], ids=["linear", "mlp"])
@pytest.mark.parametrize("chunks", [False, True], ids=["one-group", "heads-and-rows-chunked"])
@pytest.mark.parametrize("split", [True, False], ids=["db-in-loss-pass", "db-column-sum"])
def test_bias_gradient_formed_by_the_loss_pass(monkeypatch, hidden, chunks, split):
    """Heads with a bias, rows walked in tiles (cuBLAS path, frozen teacher): the loss kernel writes the
    normalisers, _hydra_kl_grad_cols_kernel writes dz and its column sums (db) in several row groups per
    head (the last one short) and class blocks; with heads and rows chunked the partial db accumulate.
    The alternative (SPLIT_BIAS_PASS off: one loss kernel, db summed from dz) likewise. Loss and every
    gradient against float64, with masked classes and a bias that matters."""
    import fasthydra.ops.linear_hydra_kl as lk

    use_heads_path(monkeypatch, "cublas")
    monkeypatch.setattr(_common, "SPLIT_BIAS_PASS", split)
    monkeypatch.setattr(_common, "MAX_BLOCK_C", 16)
    monkeypatch.setattr(_common, "ROW_TILE_MAX", 16)
    monkeypatch.setattr(_common, "GRAD_COLS_BLOCK_C", 16)  # three class blocks at C = 40, 128-row tiles
    b, d, m, c = 300, 12, 3, 40
    if chunks:  # one head per group, 20-row chunks
        monkeypatch.setattr(lk, "CUBLAS_GROUP_ELEMENTS", 20 * c)
    formed = []
    real = lk.launch_kl_grad_cols
    monkeypatch.setattr(lk, "launch_kl_grad_cols", lambda *a: formed.append(a[0].shape) or real(*a))
    head = HydraHead(d, c, m, hidden_features=hidden, impl="triton")
    with torch.no_grad():
        head.bias.copy_(torch.randn_like(head.bias) * 4)
    x = torch.randn(b, d, requires_grad=True)
    t = teacher_logits(b, m, c)
    t[7, 1, :20] = float("-inf")  # masked classes spanning whole class blocks
    loss = head.distill_loss(x, t, temperature=1.5)
    grads = torch.autograd.grad(loss * 0.7, [x, *params_of(head)])
    assert formed == ([] if not split else [(1, 20, c)] * (m * 15) if chunks else [(m, b, c)])
    loss_ref, grads_ref = reference_loss_and_grads(head, x, t, 1.5, upstream=0.7)
    assert_close_to(loss, loss_ref, rtol=2e-6, atol=1e-7, what="loss")
    for name, g, g_ref in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_ref):
        assert_close_to(g, g_ref, rtol=1e-5, atol=1e-8, what=name)


@pytest.mark.parametrize("hidden", [None, 6], ids=["linear", "mlp"])
@pytest.mark.parametrize("b", [1, 41], ids=["one-row", "last-chunk-one-row"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "strided-mask"])
def test_bias_gradient_formed_by_the_loss_pass_over_one_row(monkeypatch, hidden, b, masked):
    """The split bias pass over a chunk of a single row (a batch of one, or rows in chunks of 20 with one left
    over): MLP heads' bias view is then (heads, 1, C), whose stride along its one row is not 0, and a strided
    row mask's one entry keeps its stride through .contiguous() (the random sweeps found both refused with a
    ValueError; linear heads add their bias in the GEMM). Against float64 over the kept rows."""
    import fasthydra.ops.linear_hydra_kl as lk

    use_heads_path(monkeypatch, "cublas")
    monkeypatch.setattr(_common, "SPLIT_BIAS_PASS", True)
    monkeypatch.setattr(_common, "MAX_BLOCK_C", 16)
    monkeypatch.setattr(_common, "ROW_TILE_MAX", 16)  # rows of 40 classes: too long for registers
    monkeypatch.setattr(lk, "CUBLAS_GROUP_ELEMENTS", 20 * 40)  # one head per group, 20-row chunks
    formed = []
    real = lk.launch_kl_grad_cols
    monkeypatch.setattr(lk, "launch_kl_grad_cols", lambda *a: formed.append(a[0].shape) or real(*a))
    head = HydraHead(12, 40, 3, hidden_features=hidden, impl="triton")
    with torch.no_grad():
        head.bias.copy_(torch.randn_like(head.bias) * 4)
    x = torch.randn(b, 12, requires_grad=True)
    t = teacher_logits(b, 3, 40)
    keep = torch.ones(b, dtype=torch.bool)
    if masked and b > 1:
        keep[1::3] = False  # the last row (40) kept
    mask = torch.stack([keep, ~keep], 1)[:, 0] if masked else None  # stride 2
    loss = head.distill_loss(x, t, temperature=1.5, row_mask=mask)
    grads = torch.autograd.grad(loss * 0.7, [x, *params_of(head)])
    assert any(shape[1] == 1 for shape in formed)  # (heads, rows, C): a chunk of one row
    loss_ref, grads_ref = reference_loss_and_grads(head, x[keep], t[keep], 1.5, upstream=0.7)
    assert torch.equal(grads[0][~keep], torch.zeros_like(grads[0][~keep]))
    grads = [grads[0][keep], *grads[1:]]
    assert_close_to(loss, loss_ref, rtol=2e-6, atol=1e-7, what="loss")
    for name, g, g_ref in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_ref):
        assert_close_to(g, g_ref, rtol=1e-5, atol=1e-8, what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("programs,groups", [(10**6, 3), (12, 2), (1, 1)])
def test_grad_cols_kernel_sums_columns_per_head(monkeypatch, dtype, programs, groups):
    """launch_kl_grad_cols on its own: dz (in place of z) and its per-head column sums, over a
    head-major view with a broadcast bias and three class blocks; 300 rows in 128-row tiles as three
    row groups of one tile, two groups (two tiles, then a short one), or one group walking all three;
    a class masked in every teacher row (p = 0 there, q not); against float64."""
    monkeypatch.setattr(_common, "GRAD_COLS_BLOCK_C", 16)
    monkeypatch.setattr(_common, "STREAM_PROGRAMS", programs)
    m, b, c = 3, 300, 37
    z = (torch.randn(m, b, c) * 3).to(dtype)
    t = teacher_logits(m, b, c, dtype=dtype)  # (heads, rows, C): the op's head-major view
    t[:, :, 5] = float("-inf")
    bias = (torch.randn(m, 1, c) * 2).to(dtype)
    loss = torch.empty(m, b)
    norms = torch.empty(m, b, 4)
    hk.launch_kl_rows(z, t, loss, None, 1.3, 0.25, "distill_loss", None, bias.expand(m, b, c), norms=norms)
    zb = z.double() + bias.double()
    db = hk.launch_kl_grad_cols(z, t, norms, z, bias.expand(m, b, c), 1.3, 0.25).sum(1)
    g_ref = R.kl_grad_ref(zb, t.double(), 1.3) * (m * b) / 1.3 * 0.25  # grad_scale * (q - p)
    assert _common.kl_grad_cols_config(m, b, c)["n_groups"] == groups
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close_to(z, g_ref, rtol=rtol, atol=1e-9, what="dz")
    assert_close_to(db, g_ref.sum(1), rtol=rtol, atol=1e-7, what="column sums")


# The two-launch small-step path (kernels/small_heads.py) beyond HEAD_CASES: several row programs,
# K across several K tiles, C at the one-tile limit, per-head inputs, no bias, a sum reduction, the
# reducing program walking many partial sums, and a batch the dW programs walk in several steps.
SMALL_CASES = [(70, 45, 3, 13, None, True), (33, 70, 1, 64, None, False), (40, 16, 4, 17, 40, True),
               (65, 8, 2, 1, None, True), (600, 20, 2, 10, None, True)]  # the last: dW walks 256-row steps


@pytest.mark.parametrize("b,d,m,c,hidden,bias", SMALL_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("heads", [None, 2], ids=["heads-auto", "heads-by-2"])
@pytest.mark.parametrize("deferred", [True, False], ids=["grads-in-backward", "grads-in-forward"])
def test_small_step_path_matches_reference(monkeypatch, b, d, m, c, hidden, bias, reduction, heads, deferred):
    """Against float64 with an upstream gradient of 0.6, both flows (SMALL_DEFERRED: launch 2 in the
    backward reading the upstream gradient, or in the forward with the stored gradients scaled); the
    loss reduced by launch 1's last program, whose count of finished programs is back at 0 after every
    launch (else the next launch would never reduce); a second backward through a retained graph."""
    import fasthydra.ops.linear_hydra_kl as lk
    import fasthydra.ops.small_heads as small_heads_ops

    use_heads_path(monkeypatch, "small")
    monkeypatch.setattr(_common, "SMALL_DEFERRED", deferred)
    monkeypatch.setattr(_common, "REDUCE_BLOCK", 2)  # the reducing program loops over the partials
    if heads is not None:  # launch 1 programs own two heads each (the last group shorter when M is odd)
        config = lk.small_heads_config
        monkeypatch.setattr(lk, "small_heads_config", lambda *a: {**config(*a), "HEADS": heads})
    ran = []
    real = small_heads_ops.small_heads_forward
    monkeypatch.setattr(small_heads_ops, "small_heads_forward", lambda *a: ran.append(a[7]) or real(*a))
    head = HydraHead(d, c, m, hidden_features=hidden, bias=bias, impl="triton")
    x = torch.randn(b, d, requires_grad=True)
    t = teacher_logits(b, m, c)
    loss = head.distill_loss(x, t, temperature=1.7, reduction=reduction)
    grads = torch.autograd.grad(loss * 0.6, [x, *params_of(head)], retain_graph=True)
    assert ran == [True]  # launch 1, with the stash
    loss_ref, grads_ref = reference_loss_and_grads(head, x, t, 1.7, upstream=0.6)
    if reduction == "sum":
        n = b * m
        loss_ref, grads_ref = loss_ref * n, [g * n for g in grads_ref]
    assert_close_to(loss, loss_ref, rtol=2e-6, atol=1e-7, what="loss")
    for name, g, g_ref in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_ref):
        assert_close_to(g, g_ref, rtol=1e-5, atol=1e-8, what=name)
    again = torch.autograd.grad(loss * 0.6, [x, *params_of(head)])
    for g, g2 in zip(grads, again):
        assert torch.equal(g, g2)
    assert not _common._counts[torch.device("cpu")].any()
    with torch.no_grad():  # forward only: launch 1 alone, no stash
        assert_close_to(head.distill_loss(x, t, temperature=1.7, reduction=reduction), loss_ref, rtol=2e-6)
    # (grads in the forward: the second backward ran the forward again, the stored gradients given away)
    assert ran == ([True, False] if deferred else [True, True, False])
    assert not _common._counts[torch.device("cpu")].any()


def test_finished_counts_are_never_shared_by_launches_that_can_overlap(monkeypatch):
    """The last-program count: one per stream for eager launches (the same one on every call), one per launch
    captured into a CUDA graph (graphs replay on the stream current at replay time, so two replays may
    overlap), from a block made outside captures; past the block's slots, or inside a capture before the
    block exists, a fresh zeroed count."""
    dev = torch.device("cpu")
    for name in ("_counts", "_slots_used", "_count_views"):
        monkeypatch.setattr(_common, name, {})
    monkeypatch.setattr(_common, "COUNT_SLOTS", 4)
    capturing = [True]
    monkeypatch.setattr(_common, "_capturing", lambda device: capturing[0])
    early = _common.finished_count(dev)  # captured before any eager launch: no block yet, none made
    assert dev not in _common._counts and early.shape == (1,) and int(early) == 0
    capturing[0] = False
    stream = _common.finished_count(dev)
    block = _common._counts[dev]
    assert _common.finished_count(dev).data_ptr() == stream.data_ptr() == block.data_ptr()
    capturing[0] = True
    captured = [_common.finished_count(dev) for _ in range(4)]
    ptrs = [c.data_ptr() for c in captured]
    in_block = [block.data_ptr() <= p < block.data_ptr() + block.numel() * block.element_size() for p in ptrs]
    assert in_block == [True, True, True, False]  # three slots left after the stream's, then a fresh count
    assert len({stream.data_ptr(), *ptrs}) == 5
    assert all(int(c) == 0 for c in captured)
    capturing[0] = False
    assert _common.finished_count(dev).data_ptr() == stream.data_ptr()  # the stream keeps its own


def test_deferred_flag_is_refused_where_it_does_not_apply():
    """small_deferred is decided by the callers; set by hand where the small step cannot defer (a loss per
    row, no gradient wanted, a batch past the Gaussian limit), the ops say so instead of failing inside."""
    from fasthydra.ops import library as L

    x, w, t = torch.randn(4, 5), torch.randn(3, 7, 5), torch.randn(4, 3, 7)
    with pytest.raises(ValueError, match="small_deferred"):
        L._linear_hydra_kl_impl(x, w, None, t, 2.0, "none", True, True, True, False, False, "triton", None, True)
    with pytest.raises(ValueError, match="small_deferred"):
        L._linear_hydra_kl_impl(x, w, None, t, 2.0, "mean", True, False, False, False, False, "triton", None, True)
    tm, tv = torch.randn(4, 3, 2), torch.rand(4, 3, 2) + 0.5
    with pytest.raises(ValueError, match="small_deferred"):
        L._gaussian_heads_kl_impl(x, torch.randn(3, 4, 5), None, tm, tv, 1e-6, "mean", False, False, False, True)


def test_small_step_loss_rows_and_partial_gradients(monkeypatch):
    """The launcher's other flag combinations: per-row losses (no reduction), only dW, only db."""
    import fasthydra.ops.linear_hydra_kl as lk

    b, d, m, c = 37, 20, 3, 10
    x, w, bias = torch.randn(b, d), torch.randn(m, c, d) * 0.3, torch.randn(m, c)
    t = teacher_logits(b, m, c)
    cfg = _common.small_heads_config(b, m, c, d, 4)
    x64, w64, b64 = (v.double().requires_grad_() for v in (x, w, bias))
    rows_ref = R.hydra_kl_loss_ref(R.linear_heads_ref(x64, w64, b64), t.double(), 2.0, reduction="none")
    rows, gi, gw, gb, _ = lk.linear_hydra_kl_forward_small(x, w, bias, t, 2.0, "none", True, False, False, False, cfg)
    assert gi is None and gw is None and gb is None
    assert_close_to(rows, rows_ref, rtol=2e-6, atol=1e-7, what="rows")
    gw_ref, gb_ref = torch.autograd.grad(rows_ref.mean(), [w64, b64])
    _, _, gw, gb, _ = lk.linear_hydra_kl_forward_small(x, w, bias, t, 2.0, "mean", True, False, True, False, cfg)
    assert gb is None
    assert_close_to(gw, gw_ref, rtol=1e-5, atol=1e-8, what="weight")
    _, _, gw, gb, _ = lk.linear_hydra_kl_forward_small(x, w, bias, t, 2.0, "mean", True, False, False, True, cfg)
    assert gw is None
    assert_close_to(gb, gb_ref, rtol=1e-5, atol=1e-8, what="bias")


@pytest.mark.parametrize("b,m,c,d,small", [(8192, 1, 10, 8, True), (8193, 1, 10, 8, False), (8, 2, 64, 8, True),
                                             (8, 2, 65, 8, False), (8, 16, 64, 1024, True), (8, 16, 64, 1025, False),
                                             (0, 2, 10, 8, False), (8192, 8, 16, 512, True),
                                             (8192, 8, 16, 513, False)])
def test_small_step_dispatch_limits(b, m, c, d, small):
    assert (_common.small_heads_config(b, m, c, d, 4) is not None) == small


def test_small_step_setting_is_validated(monkeypatch):
    monkeypatch.setenv("FASTHYDRA_SMALL_STEP", "always")
    with pytest.raises(ValueError, match="FASTHYDRA_SMALL_STEP"):
        HydraHead(4, 5, 2, impl="triton").distill_loss(torch.randn(3, 4), torch.randn(3, 2, 5))


def _launches_and_torch_ops(step):
    """(Triton kernels launched, torch compute ops) of one call of step() after a warm-up call: the
    counting of bench/launch_counts.py (allocations and views are no launches)."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
    import launch_counts

    return launch_counts.count(step)


def test_small_step_is_two_launches_and_nothing_else(monkeypatch):
    """Issue 9's small-step promise, counted: a forward + backward of linear heads at a small shape is
    two Triton launches and no torch compute op, whatever the upstream gradient; a forward alone is one."""
    use_heads_path(monkeypatch, "small")
    head = HydraHead(16, 10, 4, impl="triton")
    x, t = torch.randn(40, 16), teacher_logits(40, 4, 10)
    def step():
        head.zero_grad(set_to_none=True)  # a fresh .grad is the gradient itself: no accumulation op
        head.distill_loss(x, t, 2.0).backward()

    launches, ops = _launches_and_torch_ops(step)
    assert launches == ["_small_heads_kl_kernel", "_small_heads_grad_kernel"]
    assert ops == []

    def scaled_step():  # an upstream gradient other than 1 (a loss weight, a GradScaler): still nothing more
        head.zero_grad(set_to_none=True)
        (head.distill_loss(x, t, 2.0) * 0.5).backward()

    launches, ops = _launches_and_torch_ops(scaled_step)
    assert launches == ["_small_heads_kl_kernel", "_small_heads_grad_kernel"]
    assert all("mul" in op for op in ops) and len(ops) <= 2, ops  # the * 0.5 and its backward
    with torch.no_grad():  # evaluation: launch 1 alone (its last program reduces the loss)
        launches, ops = _launches_and_torch_ops(lambda: head.distill_loss(x, t, 2.0))
    assert launches == ["_small_heads_kl_kernel"] and ops == []


@pytest.mark.parametrize("hidden", [None, 8])
def test_a_masked_small_step_is_the_same_two_launches(monkeypatch, hidden):
    """A row mask keeps the small step's two launches (launch 1 reads it, launch 2 too): linear heads add only
    the count of kept rows for "mean" (one sum, read by launch 1 on the device: the loss and dz come out
    averaged over the kept rows, so the backward gets an upstream gradient of 1 as unmasked), nothing for
    "sum"; MLP heads also the zeroing of x before their first layer."""
    use_heads_path(monkeypatch, "small")
    head = HydraHead(16, 10, 4, hidden_features=hidden, impl="triton")
    x, t = torch.randn(40, 16), teacher_logits(40, 4, 10)
    keep = torch.arange(40) % 3 != 0
    counted = {}
    for mask, reduction in ((None, "mean"), (keep, "mean"), (keep, "sum")):
        def step(mask=mask, reduction=reduction):
            head.zero_grad(set_to_none=True)
            head.distill_loss(x, t, 2.0, reduction, row_mask=mask).backward()

        launches, ops = _launches_and_torch_ops(step)
        assert launches == ["_small_heads_kl_kernel", "_small_heads_grad_kernel"]
        counted[mask is not None, reduction] = ops
    from collections import Counter

    small_ops = {"sum", "scalar_tensor", "where"}  # (the count; MLP heads: x zeroed)
    for reduction, most in (("mean", 1), ("sum", 0)):  # (the count of kept rows)
        extra = Counter(counted[True, reduction])
        extra.subtract(counted[False, "mean"])
        assert all(n >= 0 for n in extra.values()), (reduction, counted)  # nothing of the unmasked step goes
        assert set(+extra) <= small_ops, (reduction, counted)
        assert sum(extra.values()) <= most + (0 if hidden is None else 2), (reduction, counted)  # (MLP: x zeroed)


def test_gaussian_heads_are_two_launches_and_nothing_else(monkeypatch):
    """The Gaussian heads the same way: the fused kernel (teacher checks included; the loss reduced by its
    last program) in the forward, the small-step gradient kernel in the backward, at any upstream
    gradient; evaluation is the fused kernel alone."""
    from fasthydra import GaussianHydraHead

    head = GaussianHydraHead(16, 2, 3, impl="triton")
    x = torch.randn(70, 16, requires_grad=True)
    tm, tv = torch.randn(70, 3, 2), torch.rand(70, 3, 2) + 0.2
    def step():
        head.zero_grad(set_to_none=True)
        x.grad = None
        head.distill_loss(x, tm, tv).backward()

    launches, ops = _launches_and_torch_ops(step)
    assert launches == ["_gaussian_heads_kl_fwd_kernel", "_small_heads_grad_kernel"]
    assert ops == []

    def scaled_step():  # an upstream gradient other than 1: still nothing more
        head.zero_grad(set_to_none=True)
        x.grad = None
        (head.distill_loss(x, tm, tv) * 0.5).backward()

    launches, ops = _launches_and_torch_ops(scaled_step)
    assert launches == ["_gaussian_heads_kl_fwd_kernel", "_small_heads_grad_kernel"]
    assert all("mul" in op for op in ops) and len(ops) <= 2, ops
    with torch.no_grad():  # evaluation: the fused kernel alone (its last program reduces the loss)
        launches, ops = _launches_and_torch_ops(lambda: head.distill_loss(x, tm, tv))
    assert launches == ["_gaussian_heads_kl_fwd_kernel"] and ops == []


def test_heads_paths_with_extreme_logits_and_masked_rows(gemm):
    """Logits of size ~1e3 out of the heads (large weights) and a teacher row masked except for two
    classes, on every heads path: the fp32 kernels against the float64 reference, held to what eager
    fp32 itself achieves (DESIGN section 5)."""
    from helpers import tolerance_rule

    head = HydraHead(24, 11, 3, impl="triton")
    with torch.no_grad():
        head.weight.mul_(400.0)
    x = torch.randn(21, 24, requires_grad=True)
    t = teacher_logits(21, 3, 11, scale=800.0)
    t[4, 1, 2:] = float("-inf")
    loss = head.distill_loss(x, t, temperature=1.3)
    grads = torch.autograd.grad(loss, [x, *params_of(head)])
    loss_ref, grads_ref = reference_loss_and_grads(head, x, t, 1.3)
    eager_z = R.linear_heads_ref(x, head.weight, head.bias)
    eager = R.hydra_kl_loss_ref(eager_z, t, 1.3)
    eager_grads = torch.autograd.grad(eager, [x, *params_of(head)])
    with torch.no_grad():  # each row (about 1e3 here) held to the rule on its own
        rows = head.distill_loss(x, t, temperature=1.3, reduction="none")
        rows_eager = R.hydra_kl_loss_ref(eager_z, t, 1.3, reduction="none")
        rows_ref = R.hydra_kl_loss_ref(R.linear_heads_ref(x.double(), head.weight.double(), head.bias.double()),
                                       t.double(), 1.3, reduction="none")
    tolerance_rule(rows, rows_eager, rows_ref, atol=1e-5, what="loss rows")
    # The mean of 63 such rows in float32 carries a few units in the last place of the largest row whatever the
    # order of the sum: eager's landed 0.1 unit of the mean off under one seed (FASTHYDRA_TEST_SEED=9), the
    # kernel's reduction 1.9, its rows as eager's (the same largest error)
    summed = 2 * torch.finfo(torch.float32).eps * rows_ref.abs().max().item()
    tolerance_rule(loss, eager, loss_ref, atol=1e-5 + summed, what="loss")
    for name, g, e, g_ref in zip(["x", "weight", "bias"], grads, eager_grads, grads_ref):
        tolerance_rule(g, e, g_ref, atol=1e-5 * g_ref.abs().max().item(), what=name)


def test_small_step_heads_per_program():
    """Launch 1 splits the heads across programs until the grid is wide; small-C shares them by two."""
    assert _common.small_heads_config(512, 10, 10, 512, 4)["HEADS"] == 1  # gpu-small: 32 x 10 programs
    assert _common.small_heads_config(4096, 8, 10, 512, 4)["HEADS"] == 2  # small-C: 256 x 4 programs
    assert _common.small_heads_config(8192, 4, 10, 64, 2)["HEADS"] == 2


def test_outer_products_only_for_ieee_fp32_tiles_that_fit(monkeypatch):
    """The small step's logits tile sums fp32 IEEE products as outer products where (BLOCK_B, BLOCK_C, BLOCK_K)
    fits 64 registers a thread (C up to 16); TF32 and 16-bit operands (tensor cores) and wider tiles take tl.dot."""
    cfg = _common.small_heads_config(4096, 8, 10, 512, 4)
    assert _common.small_outer_fma(cfg, "ieee")
    assert not _common.small_outer_fma(cfg, "tf32")
    assert not _common.small_outer_fma(_common.small_heads_config(4096, 8, 17, 512, 4), "ieee")  # 16 x 32 x 32
    grads = _common.small_grads_config(4096, 8, 10, 512, 4, 4)
    assert _common.small_grads_outer(grads, "ieee") and not _common.small_grads_outer(grads, "tf32")
    monkeypatch.setattr(_common, "SMALL_OUTER_DW", False)  # dW alone by tl.dot
    assert _common.small_outer_fma(cfg, "ieee") and not _common.small_grads_outer(grads, "ieee")
    monkeypatch.setattr(_common, "SMALL_OUTER_DW", True)
    monkeypatch.setattr(_common, "SMALL_OUTER_FMA", False)
    assert not _common.small_outer_fma(cfg, "ieee") and not _common.small_grads_outer(grads, "ieee")


@pytest.mark.parametrize("outer,outer_dw", [(True, True), (True, False), (False, False)],
                         ids=["outer-products", "dW-by-tl-dot", "tl-dot"])
@pytest.mark.parametrize("b,d,m,c,hidden", [(70, 45, 3, 13, None), (40, 70, 4, 10, 24)], ids=["linear", "mlp"])
def test_small_step_fp32_products_in_either_form(monkeypatch, outer, outer_dw, b, d, m, c, hidden):
    """fp32 at IEEE precision, the logits tile's and dW's products summed as outer products (the default at
    these C) or by tl.dot (SMALL_OUTER_FMA off; SMALL_OUTER_DW off: dW alone), against float64: K in several
    tiles with a masked tail (and the MLP heads' per-head hidden inputs in one), rows past B masked, dW over
    several row steps, two heads a program; spies on the launches' forms."""
    import fasthydra.ops.linear_hydra_kl as lk

    use_heads_path(monkeypatch, "small")
    monkeypatch.setattr(_common, "SMALL_OUTER_FMA", outer)
    monkeypatch.setattr(_common, "SMALL_OUTER_DW", outer_dw)
    config = lk.small_heads_config
    monkeypatch.setattr(lk, "small_heads_config", lambda *a: {**config(*a), "HEADS": 2})
    forms = []
    for name in ("small_outer_fma", "small_grads_outer"):
        rule = getattr(_common, name)
        monkeypatch.setattr(_common, name, lambda *a, rule=rule: forms.append(rule(*a)) or forms[-1])
    head = HydraHead(d, c, m, hidden_features=hidden, impl="triton")
    x = torch.randn(b, d, requires_grad=True)
    t = teacher_logits(b, m, c)
    loss = head.distill_loss(x, t, temperature=1.7)
    grads = torch.autograd.grad(loss * 0.6, [x, *params_of(head)])
    assert forms == [outer, outer_dw]
    loss_ref, grads_ref = reference_loss_and_grads(head, x, t, 1.7, upstream=0.6)
    assert_close_to(loss, loss_ref, rtol=2e-6, atol=1e-7, what="loss")
    for name, g, g_ref in zip(["x"] + [n for n, _ in head.named_parameters()], grads, grads_ref):
        assert_close_to(g, g_ref, rtol=1e-5, atol=1e-8, what=name)


@pytest.mark.parametrize("triton_kernel", [True, False], ids=["triton", "torch-ops"])
def test_row_value_flags_set_the_error_word(monkeypatch, triton_kernel):
    """The torch path's teacher check on CUDA: NaN, +inf and -inf among the row maxima set bits 1, 2, 4
    of the op's error word (one Triton launch; torch ops where Triton cannot run), nothing otherwise;
    blocks of 4 so that a bad value sits in a later program."""
    from fasthydra.ops import checks

    monkeypatch.setattr(checks, "FLAG_BLOCK", 4)
    monkeypatch.setattr(checks, "helper_kernels_run_on", lambda t: triton_kernel)
    word = checks.error_word(torch.device("cpu"), "hinton_kl_loss")
    for bad, bits in [(None, 0), (float("nan"), 1), (float("inf"), 2), (float("-inf"), 4)]:
        word.zero_()
        values = torch.randn(11)
        if bad is not None:
            values[9] = bad
        checks._flag_row_values(values, "hinton_kl_loss")
        assert int(word) == bits
    word.zero_()


def test_helper_kernels_run_only_where_the_kernels_are_supported(monkeypatch):
    """The torch path's Triton helpers (row flags, in-place gradient scale) launch where impl="auto" would take
    the kernels: on a CUDA device without a fallback reason, or under the interpreter of Triton 3.6 or later;
    an older or ROCm GPU or an older Triton gets torch ops (the torch path there launches no Triton kernel)."""
    import types

    cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    for reason, want in [(None, True), ("compute capability 7.5 (the kernels need 8.0 or later)", False)]:
        monkeypatch.setattr(_common, "auto_fallback_reason", lambda device, reason=reason: reason)
        assert _common.helper_kernels_run_on(cuda) is want
    cpu = torch.zeros(1)
    for version, want in [((3, 0), False), ((3, 5), False), ((3, 6), True), ((4, 1), True)]:
        monkeypatch.setattr(_common, "_triton_version", lambda version=version: version)
        assert _common.helper_kernels_run_on(cpu) is want
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    assert not _common.helper_kernels_run_on(cpu)


def test_launch_counts_table(capsys):
    """bench/launch_counts.py: one row per op and path; the small-step rows count 2 Triton launches and
    only the error word's copy besides (checks run as on CUDA there)."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
    import launch_counts

    from fasthydra.ops import checks

    try:
        assert launch_counts.main(["--markdown"]) == 0
    finally:
        checks._flags.clear()  # the deferred-mode word of that run: not this process's business after it
    rows_all = capsys.readouterr().out.splitlines()
    rows = [ln for ln in rows_all if ln.startswith("| distill")]
    assert len(rows) == 9  # linear and MLP heads: small-step and cuBLAS paths with and without a row mask;
    #                        Gaussian heads
    small = [ln for ln in rows if "| small-step |" in ln or "small-step grads" in ln]
    assert len(small) == 3 and all("| 2 |" in ln for ln in small)
    assert "| 2 | 1 (copy_) | 3 |" in small[0]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]  # op, path, triton, torch, total
    totals = {(op, path): int(total) for op, path, _, _, total in cells}
    # a row mask with "mean": the small step's two launches and the count of kept rows (linear heads; MLP heads
    # also zero x before their first layer: a where and its scalar, and their backward the same)
    masked = {(op, path): (int(tr), int(total)) for op, path, tr, _, total in cells if path.endswith("row mask")}
    assert masked[("distill_loss, linear heads", "small-step, row mask")] == (2, totals[
        ("distill_loss, linear heads", "small-step")] + 1)
    assert masked[("distill_loss, MLP heads", "small-step, row mask")] == (2, totals[
        ("distill_loss, MLP heads", "small-step")] + 5)
    # the losses on logits read the mask in their kernels: the same launches as without it, plus the count of kept
    # rows for "mean" in the forward (before, the rows were masked and reduced by eight torch ops after the kernel,
    # and their backward; with DEFER_KL_GRAD on the deferred backward counts them again)
    logits = {(op, path): (int(tr), int(total)) for op, path, tr, _, total in
              ([c.strip() for c in ln.strip("|").split("|")] for ln in rows_all if ln.startswith("| h"))}
    for op in ("hydra_kl_loss on logits", "hinton_kl_loss"):
        plain = logits[(op, "loss kernel")]
        assert logits[(op, "loss kernel, row mask")] == (plain[0], plain[1] + 1)
    # a top-k teacher: its checks one launch (before, about 17 torch ops), the Hinton target of several members one
    # more (before, a scatter per member and about 16 ops), then the loss kernel; the word's copy besides
    assert logits[("hinton_kl_loss, top-k teacher", "target + loss kernel")] == (3, 4)
    assert logits[("hydra_kl_loss on logits, top-k teacher", "top-k loss kernel")] == (2, 3)


@pytest.mark.parametrize("upstream", [1.0, 0.7, float("nan")])
def test_scale_unless_one_kernel(monkeypatch, upstream):
    """The GPU backward's chain rule for stored gradients (kernels/scale.py), under the interpreter: four
    tensors of three dtypes (two launches of up to three), each longer than the programs' first blocks
    (grid stride); an upstream of exactly 1 leaves every bit as it was, others scale in place (fp64 in
    fp64), NaN makes NaN."""
    monkeypatch.setattr(hk, "SCALE_PROGRAMS", 2)
    monkeypatch.setattr(hk, "SCALE_BLOCK", 16)
    tensors = [torch.randn(100), torch.randn(7, 9).to(torch.bfloat16), torch.randn(5, dtype=torch.float64),
               torch.randn(3, 40)]
    before = [x.clone() for x in tensors]
    g = torch.tensor(upstream)
    hk.launch_scale_unless_one(tensors, g)
    for x, x0 in zip(tensors, before):
        if upstream == 1.0:
            assert torch.equal(x, x0)
        elif upstream != upstream:
            assert torch.isnan(x).all()
        else:
            expected = x0.double() * g.double()  # g as given (fp32), exactly
            rtol = 1e-15 if x.dtype == torch.float64 else (1e-6 if x.dtype == torch.float32 else 8e-3)
            assert_close_to(x, expected, rtol=rtol, atol=0.0, what=str(x.dtype))


def _neg_dots_reference(t, pairs):
    """-sum <g, x> / t in float64, NaN products as 0 (a learned temperature's gradient through the xs)."""
    total = sum((g.double() * x.double()).nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf).sum()
                for g, x in pairs)
    return -total / t.double()


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.float64])
def test_neg_dots_over_kernel(monkeypatch, t_dtype):
    """dL/dT's reduction in a learned temperature's backward (functional._LearnedT), under the interpreter: one
    launch over three pairs of three dtypes (a 16-bit teacher with an fp32 gradient, as fp16's are stored), each
    longer than the programs' first blocks (grid stride), against float64; a masked class (0 * -inf) and a padding
    row (0 * NaN) count 0, an infinite product stays infinite; the result has T's shape and dtype (0-dim, (1,)),
    and T = 2 divides by 2. A launch is what ran: the torch form is switched off."""
    monkeypatch.setattr(hk, "SCALE_PROGRAMS", 3)
    monkeypatch.setattr(hk, "SCALE_BLOCK", 16)
    monkeypatch.setattr(hk, "DOT_CHUNK_ELEMENTS", None)  # (the torch form would fail on it)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 13, generator=gen)
    b = torch.nn.Parameter(torch.randn(4, 10, generator=gen).to(torch.bfloat16))  # (a frozen layer's, scaled)
    t = torch.randn(6, 4, 10, generator=gen).to(torch.float16)
    gx, gb, gt = torch.randn(9, 13, generator=gen), torch.randn(4, 10, generator=gen).to(torch.bfloat16), \
        torch.randn(6, 4, 10, generator=gen)
    t[0, 1, 2], gt[0, 1, 2] = float("-inf"), 0.0
    x[3], gx[3] = float("nan"), 0.0
    pairs = [(gx, x), (gb, b), (gt, t)]
    for value, shape in ((1.0, ()), (2.0, (1,))):
        temperature = torch.nn.Parameter(torch.full(shape, value, dtype=t_dtype))  # (as a learned T is held)
        got = hk.neg_dots_over(temperature, pairs)
        assert got.shape == shape and got.dtype == t_dtype
        size = sum((g.double() * x.double()).nan_to_num(0.0).abs().sum() for g, x in pairs) / value
        assert_close_to(got, _neg_dots_reference(temperature.detach(), pairs), rtol=0.0, atol=1e-6 * size,
                        what=f"T={value}")
    gb[1, 1] = 1.0
    with torch.no_grad():
        b[1, 1] = float("inf")
    assert hk.neg_dots_over(torch.tensor(1.0, dtype=t_dtype), pairs).item() == -math.inf


def test_neg_dots_over_takes_torch_ops_where_the_kernel_does_not_apply(monkeypatch):
    """Non-contiguous tensors, float64 ones, more than three pairs: the chunked torch form (the kernel reads
    contiguous 16/32-bit storage, three pairs a launch); the same value either way, T = 2 dividing by 2."""
    import fasthydra.kernels.reduce as kr

    def refuse(*args, **kwargs):
        raise AssertionError("the kernel launched")

    gen = torch.Generator().manual_seed(6)
    temperature = torch.tensor(2.0)
    a, g = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    cases = [[(g.t(), a.t())], [(g.double(), a.double())], [(g, a)] * 4]
    expected = [_neg_dots_reference(temperature, pairs) for pairs in cases]
    monkeypatch.setattr(kr, "_neg_dots_over_kernel", refuse)
    for pairs, want in zip(cases, expected):  # (fp32 sums of cancelling terms: their size sets the tolerance)
        size = sum((g.double() * x.double()).abs().sum() for g, x in pairs) / 2
        assert_close_to(hk.neg_dots_over(temperature, pairs), want, rtol=0.0, atol=1e-6 * size, what=str(len(pairs)))


@pytest.mark.parametrize("torch_takes_it", [True, False])
def test_fp32_output_dx_accumulation_and_its_fallback(monkeypatch, torch_takes_it):
    """dx over head groups: addmm with an fp32 output reading the accumulator where torch takes it (CUDA;
    stood in for here), else, after torch refuses it once, the product and an add from then on; the
    sum is acc + dz @ W either way."""
    import fasthydra.ops.linear_hydra_kl as lk

    monkeypatch.setattr(_common, "FP32_OUT_GEMM", True)
    monkeypatch.setattr(lk, "_fp32_out_candidate", lambda acc, a: True)
    real = torch.addmm
    calls = []

    def addmm(*args, **kwargs):
        if "out_dtype" in kwargs:
            calls.append(kwargs["out_dtype"])
            if not torch_takes_it:
                raise RuntimeError("self and mat2 must have the same dtype")
            kwargs.pop("out_dtype")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", addmm)
    acc, a, b = torch.randn(5, 7), torch.randn(5, 9), torch.randn(9, 7)
    expected = acc.double() + 2 * (a.double() @ b.double())
    for _ in range(2):  # two head groups
        acc = lk._add_product_fp32(acc, a, b)
    assert_close_to(acc, expected, rtol=1e-6, atol=1e-6, what="accumulated dx")
    assert calls == ([torch.float32] * 2 if torch_takes_it else [torch.float32])  # refused once, then not tried
    assert _common.FP32_OUT_GEMM is torch_takes_it
