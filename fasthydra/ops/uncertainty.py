"""Entropy decomposition of a multi-head prediction, and its backward (each head's softmax recomputed from the
logits): the Triton launchers, and the torch path (the native C kernel for fp32 CPU logits, else torch ops).

The forwards record nothing for autograd without a no_grad context of their own: they run inside the op's
autograd.Function (whose forward autograd runs without recording), under the custom op's dispatch (below
autograd), or directly only where no input requires grad or grad mode is off (library._eager_call)."""

from __future__ import annotations

import math

import torch

from fasthydra.reference import Uncertainty

from . import native
from . import _common
from .launch import launch
from ._common import (TORCH_CHUNK_ELEMENTS, batched_backward, compute_dtype, rows_per_chunk, temperature_scalars,
                      uncertainty_config, uncertainty_grad_config)


# Elements of one row chunk of the backward on a GPU: about ten torch launches per chunk, so chunks as small as
# the CPU's (TORCH_CHUNK_ELEMENTS, sized for its caches) would make a (4096, 8, 32000) backward 128 chunks of
# launches; 2^26 fp32 elements are 256 MiB per temporary, four of them alive at a time.
GPU_CHUNK_ELEMENTS = 1 << 26


def _empty_outputs(b: int, c: int, dtype, device):
    probs = torch.empty(b, c, dtype=dtype, device=device)
    return probs, *(torch.empty(b, dtype=dtype, device=device) for _ in range(3))


def uncertainty_torch(logits: torch.Tensor, temperature: float) -> Uncertainty:
    """(B, M, C) logits -> Uncertainty, row chunk by row chunk in fp32 (fp64 for fp64 input); fp32 rows
    in the native C kernel where it is built (one exponential per element, rows hot in cache)."""
    if native.usable(logits) and logits.shape[1] > 0:
        return Uncertainty(*native.uncertainty_rows(logits if logits.stride(-1) == 1 else logits.contiguous(),
                                                    temperature))
    b, m, c = logits.shape
    cdt = compute_dtype(logits.dtype)
    probs, total, aleatoric, epistemic = _empty_outputs(b, c, logits.dtype, logits.device)
    step = rows_per_chunk(b, m * c, TORCH_CHUNK_ELEMENTS)
    for r0 in range(0, b, step):
        z = logits[r0:r0 + step].to(cdt) * (1.0 / temperature)
        q = torch.softmax(z, dim=-1)  # the only exponential per element
        # H[q_m] = lse_m - sum_c q_c z_c = sum_c q_c (max z - z_c) - log max q (lse from the softmax's most
        # probable class: no second exp). Measured from the row's maximum: no cancellation between two numbers
        # as large as the logits (lse - sum q z lost |z / T| * eps, 8% of a confident head's entropy at
        # |z / T| ~ 100); q (max - z) is 0 * inf = NaN on masked (-inf) logits, whose true contribution is 0.
        below_max = z.sub_(z.amax(dim=-1, keepdim=True)).neg_()  # max z - z, in place of z
        head_entropy = below_max.mul_(q).nan_to_num_(0.0).sum(-1).sub_(q.amax(dim=-1).log_())  # (bc, M)
        del z
        mix = q.mean(1)  # (bc, C)
        del q
        mix_entropy = -torch.special.xlogy(mix, mix).sum(-1)
        ale = head_entropy.mean(1)
        probs[r0:r0 + step] = mix
        total[r0:r0 + step] = mix_entropy
        aleatoric[r0:r0 + step] = ale
        epistemic[r0:r0 + step] = (mix_entropy - ale).clamp_min_(0.0)
    return Uncertainty(probs, total, aleatoric, epistemic)


def uncertainty_triton(logits: torch.Tensor, temperature: float) -> Uncertainty:
    from fasthydra.kernels.uncertainty import _uncertainty_fwd_kernel

    b, m, c = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    probs, total, aleatoric, epistemic = _empty_outputs(b, c, logits.dtype, logits.device)
    if b > 0:
        cfg = uncertainty_config(m, c, b)
        vec = max(1, min(cfg["BLOCK_C"], 16 // logits.element_size()))
        tf, temp, t_ptr = temperature_scalars(temperature)
        if _common.UNCERTAINTY_SPLIT and not cfg["ROW_IN_REGISTERS"] and m > 0:
            _uncertainty_split(logits, probs, total, aleatoric, epistemic, tf, temp, t_ptr)
            return Uncertainty(probs, total, aleatoric, epistemic)
        launch(_uncertainty_fwd_kernel, (b,),
            logits, probs, total, aleatoric, epistemic,
            m, c, logits.stride(0), logits.stride(1), probs.stride(0), 1.0 / tf, temp,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], ROW_IN_REGISTERS=cfg["ROW_IN_REGISTERS"],
            VEC=vec, T_PTR=t_ptr, SPREAD=_common.spread_slices(cfg, vec, c, logits), num_warps=cfg["num_warps"],
        )
    return Uncertainty(probs, total, aleatoric, epistemic)


def _uncertainty_split(logits, probs, total, aleatoric, epistemic, tf, temp, t_ptr) -> None:
    """`uncertainty` over long rows in two launches (_common.UNCERTAINTY_SPLIT): each (batch, head) row's
    statistics (raw maximum, log2 of its normaliser, entropy), then the mixture from them, by (row, class block)
    programs; with several blocks a row, each row's last program sums the row's partials (zeroed counts)."""
    from fasthydra.kernels.uncertainty import _head_entropy_kernel, _mixture_kernel

    b, m, c = logits.shape
    cfg = _common.uncertainty_split_config(m, c, b)
    vec = max(1, min(cfg["STATS_BLOCK_C"], 16 // logits.element_size()))
    stats = torch.empty(b * m, 3, dtype=torch.float32, device=logits.device)
    stats_cfg = dict(BLOCK_C=cfg["STATS_BLOCK_C"], num_warps=cfg["STATS_WARPS"], ROW_IN_REGISTERS=False)
    launch(_head_entropy_kernel, (b * m,),
        logits, stats, b * m, m, c, logits.stride(0), logits.stride(1), 1.0 / tf, temp,
        BLOCK_R=1, BLOCK_C=cfg["STATS_BLOCK_C"], VEC=vec, T_PTR=t_ptr,
        SPREAD=_common.spread_slices(stats_cfg, vec, c, logits), num_warps=cfg["STATS_WARPS"],
    )
    blocks = cfg["col_blocks"]
    parts = counts = stats
    if blocks > 1:
        parts = torch.empty(b, blocks, dtype=torch.float32, device=logits.device)
        counts = torch.zeros(b, dtype=torch.int32, device=logits.device)
    launch(_mixture_kernel, (b, blocks),
        logits, stats, probs, total, aleatoric, epistemic, parts, counts, m, c, cfg["cols_per_prog"],
        logits.stride(0), logits.stride(1), probs.stride(0), 1.0 / tf, temp,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], BLOCK_P=_common.reduce_block(blocks, cfg["num_warps"]),
        SINGLE=blocks == 1, T_PTR=t_ptr, num_warps=cfg["num_warps"],
    )


def uncertainty_backward(logits: torch.Tensor, temperature: float, g_probs: torch.Tensor | None,
                         g_total: torch.Tensor | None, g_aleatoric: torch.Tensor | None,
                         g_epistemic: torch.Tensor | None) -> torch.Tensor:
    """dL/dz (B, M, C) from the upstream gradients of (probs, total, aleatoric, epistemic) (None: none).

    With p_m = softmax(z_m / T), P = mean_m p_m, S_m = sum_c p_mc log P_c and H_m = -sum_c p_mc log p_mc:
    dP_c/dz_mk = p_mk (delta_ck - p_mc) / (M T); dH[P]/dz_mk = p_mk (S_m - log P_k) / (M T);
    dA/dz_mk = -p_mk (log p_mk + H_m) / (M T). Epistemic is H[P] - A: its gradient is the mutual
    information's own (the forward's clamp at 0 against rounding is not differentiated). A masked
    class (logit -inf) gets 0. Computed in fp32 (fp64 for fp64 logits): fp32 CPU logits in the native C kernel
    where it is built, else torch ops in row chunks (traced whole under torch.compile)."""
    b, m, c = logits.shape
    cdt = compute_dtype(logits.dtype)
    on_total = _sum_present(g_total, g_epistemic, 1.0)
    on_heads = _sum_present(g_aleatoric, g_epistemic, -1.0)
    if (torch.compiler.is_compiling() or type(logits) is not torch.Tensor
            or batched_backward(g_probs, g_total, g_aleatoric, g_epistemic)):
        # (traced; a tensor subclass; batched upstream gradients, is_grads_batched=True: out of place, whole)
        return _uncertainty_grad_rows(logits, temperature, g_probs, on_total, on_heads, cdt).to(logits.dtype)
    if native.usable(logits) and not torch.is_grad_enabled():  # (create_graph=True: the torch ops, differentiable)
        return native.uncertainty_grad_rows(logits if logits.stride(-1) == 1 else logits.contiguous(), temperature,
                                            g_probs, on_total, on_heads)
    dz = torch.empty((b, m, c), dtype=logits.dtype, device=logits.device)
    step = rows_per_chunk(b, m * c, TORCH_CHUNK_ELEMENTS if logits.device.type == "cpu" else GPU_CHUNK_ELEMENTS)
    for r0 in range(0, b, step):
        rows = slice(r0, r0 + step)
        dz[rows] = _uncertainty_grad_rows(logits[rows], temperature, None if g_probs is None else g_probs[rows],
                                          None if on_total is None else on_total[rows],
                                          None if on_heads is None else on_heads[rows], cdt)
    return dz


def uncertainty_backward_triton(logits: torch.Tensor, temperature: float, g_probs: torch.Tensor | None,
                                g_total: torch.Tensor | None, g_aleatoric: torch.Tensor | None,
                                g_epistemic: torch.Tensor | None) -> torch.Tensor:
    """uncertainty_backward in one launch of `_uncertainty_bwd_kernel` (a program per row; dz in the logits'
    dtype, contiguous). The upstream gradients are read as they come (a mean's backward gives a stride-0 (B,)
    view): no launch besides the kernel."""
    from fasthydra.kernels.uncertainty import _uncertainty_bwd_kernel

    b, m, c = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    dz = torch.empty((b, m, c), dtype=logits.dtype, device=logits.device)
    if b == 0 or c == 0:
        return dz
    if g_probs is not None and g_probs.stride(-1) != 1:
        g_probs = g_probs.contiguous()
    per_row = [dz if g is None else g for g in (g_total, g_aleatoric, g_epistemic)]  # (dz: any pointer, unread)
    cfg = uncertainty_grad_config(m, c, logits.element_size())
    tf, temp, t_ptr = temperature_scalars(temperature)
    launch(_uncertainty_bwd_kernel, (b,),
        logits, dz if g_probs is None else g_probs, *per_row, dz, m, c, logits.stride(0), logits.stride(1),
        0 if g_probs is None else g_probs.stride(0), *(0 if g is None else g.stride(0) for g in (g_total, g_aleatoric,
                                                                                             g_epistemic)),
        dz.stride(0), dz.stride(1), 1.0 / tf, 1.0 / (m * tf), temp, T_PTR=t_ptr, HAS_G=g_probs is not None,
        HAS_T=g_total is not None, HAS_A=g_aleatoric is not None, HAS_E=g_epistemic is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], ROW_IN_REGISTERS=cfg["ROW_IN_REGISTERS"],
        VEC=cfg.get("VEC", 1), SPREAD=_common.spread_slices(cfg, cfg.get("VEC", 1), c, logits),
        num_warps=cfg["num_warps"])
    return dz


def _sum_present(a: torch.Tensor | None, b: torch.Tensor | None, sign: float) -> torch.Tensor | None:
    """a + sign * b with None for an absent term (None when both are)."""
    if b is None:
        return a
    return sign * b if a is None else a + sign * b


def _uncertainty_grad_rows(logits, temperature, g_probs, on_total, on_heads, cdt) -> torch.Tensor:
    """uncertainty_backward on a chunk of rows; on_total = g_total + g_epistemic and on_heads = g_aleatoric -
    g_epistemic, the coefficients of dH[P] and of dA. Grouped as dz_mk = p_mk (V_mk - sum_c p_mc V_mc) / (M T)
    with V_mk = g_k - a log P_k - b log p_mk (a = on_total, b = on_heads; the sum over c of p_mc log p_mc is -H_m);
    the sums are elementwise products and sums (no matrix product: TF32, where enabled, would round them)."""
    m = logits.shape[1]
    log_p = torch.log_softmax(logits.to(cdt) * (1.0 / temperature), dim=-1)  # (rows, M, C)
    p = log_p.exp()
    # masked classes (p = 0 exactly; log p is -inf for a -inf logit, and finite but near the dtype's lowest for a
    # logit masked with torch.finfo(dtype).min): 0 in its place, so that every product with p below is 0, not
    # 0 * inf (-log p times a coefficient above 1 overflows; a NaN logit's row stays NaN through p); in place
    # unless a second-order gradient is being recorded (create_graph=True: log_softmax's backward reads its output)
    fix = torch.Tensor.masked_fill if torch.is_grad_enabled() else torch.Tensor.masked_fill_
    log_p = fix(log_p, p == 0, 0.0)
    v = 0.0  # V: (rows, 1, C) from the row terms, (rows, M, C) with the head term
    if g_probs is not None:
        v = g_probs.to(cdt).unsqueeze(1)
    if on_total is not None:
        # log P (a constant added per row cancels in the centring below); a class every head masks: any finite value
        log_mix = p.mean(1).clamp_min(torch.finfo(cdt).tiny).log()
        v = v - (on_total.to(cdt)[:, None] * log_mix).unsqueeze(1)
    if on_heads is not None:
        v = v - on_heads.to(cdt)[:, None, None] * log_p
    v = v - (p * v).sum(-1, keepdim=True)
    return p * v * (1.0 / (m * temperature))


def topk_log_mean_triton(values: torch.Tensor, indices: torch.Tensor, num_classes: int, temperature,
                         op: str) -> torch.Tensor:
    """T * log mean_m p~_m for a top-k teacher's values and class ids (B, M, k), (B, M, k) -> (B, C) fp32, in one
    launch that also checks the values (bits 1, 2, 4 of op's error word, as ``ensemble_log_mean_triton``): the
    Hinton loss's target for a top-k teacher that does not require grad (a class no member keeps: -inf). The ids'
    checks are the caller's (``checks.flag_topk_teacher`` with values_too=False)."""
    from fasthydra.kernels.uncertainty import _topk_log_mean_kernel

    from .checks import after_launch, error_word

    b, m, k = values.shape
    values = values if values.stride(-1) == 1 else values.contiguous()
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    out = torch.empty(b, num_classes, dtype=torch.float32, device=values.device)
    if b > 0:
        tf, temp, t_ptr = temperature_scalars(temperature)
        launch(_topk_log_mean_kernel, (b,),
               values, indices, out, error_word(values.device, op), m, k, num_classes, values.stride(0),
               values.stride(1), indices.stride(0), indices.stride(1), out.stride(0), 1.0 / tf, tf, math.log(m), temp,
               **_common.topk_target_config(k, num_classes), T_PTR=t_ptr)
        after_launch(values.device, op, values.shape)
    return out


def ensemble_log_mean_triton(teacher: torch.Tensor, temperature: float, op: str) -> torch.Tensor:
    """T * log mean_m softmax(t_m / T), (B, M, C) -> (B, C) fp32, in one launch that also checks the
    teacher (bits 1, 2, 4 of op's error word, as the loss kernels do): the Hinton loss's target for a
    teacher that does not require grad. A class every member masks gets -inf (masked in the loss)."""
    from fasthydra.kernels.uncertainty import _ensemble_log_mean_kernel

    from .checks import after_launch, error_word

    b, m, c = teacher.shape
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    out = torch.empty(b, c, dtype=torch.float32, device=teacher.device)
    if b > 0:
        cfg = uncertainty_config(m, c, hinton_target=True, elem_size=teacher.element_size())
        tf, temp, t_ptr = temperature_scalars(temperature)
        launch(_ensemble_log_mean_kernel, (b,),
            teacher, out, error_word(teacher.device, op), m, c, teacher.stride(0), teacher.stride(1), out.stride(0),
            1.0 / tf, tf, math.log(m), temp, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
            ROW_IN_REGISTERS=cfg["ROW_IN_REGISTERS"], VEC=cfg.get("VEC", 1), T_PTR=t_ptr,
            SPREAD=_common.spread_slices(cfg, cfg.get("VEC", 1), c, teacher), num_warps=cfg["num_warps"])
        after_launch(teacher.device, op, teacher.shape)
    return out
