"""Device code: entropy decomposition of a multi-head prediction, one row per program.

Forward formula for row b with head logits z[b, m, :] (divided by T):
    q_m = softmax(z_m),  P = mean_m q_m,  total = H[P],  aleatoric = mean_m H[q_m],
    epistemic = max(total - aleatoric, 0)   (the mutual information; clamped at 0 against rounding)
Pass 1 walks the C tiles with all heads of the row in one (BLOCK_M, BLOCK_C) tile (a row held whole: once) and
keeps per-head max, d = sum exp and e = sum exp * (z - max) / T, so that H[q_m] = log d - e / d. Pass 2 forms P
tile by tile, stores it and sums -P log P. The backward (`_uncertainty_bwd_kernel`) is the softmax's vector
product per head with the gradient with respect to q_m.

Every kernel here measures a row from its raw logits' maximum and scales the difference by 1/T (in base 2:
2^((x - max) log2(e) / T)): exact near the maximum and exactly 0 at it, however the compiler contracts the
scale into the subtraction. A masked class (-inf, or a finite logit whose exponential underflows: torch.finfo's
min) has probability 0 and adds 0 to every sum.
"""

import triton
import triton.language as tl

from .reduce import _sum_parts
from .softmax_kl import (LN2, LOG2E, _device_temperature, _tempered_scalars, _thread_max, _thread_merge,
                         _thread_slices)


@triton.jit
def _uncertainty_fwd_kernel(
    z_ptr,  # logits (B, M, C): strides stride_zb, stride_zm, unit along C
    probs_ptr,  # out: (B, C) mixture probabilities, row stride stride_pb, unit along C
    total_ptr,  # out: (B,) H[P]
    aleatoric_ptr,  # out: (B,) mean_m H[q_m]
    epistemic_ptr,  # out: (B,) total - aleatoric, clamped at 0
    M,
    C,
    stride_zb,
    stride_zm,
    stride_pb,
    inv_temp,  # 1 / T
    temp_ptr,  # a tensor temperature where T_PTR (inv_temp then 1), as in softmax_kl._hydra_kl_fwd_kernel
    BLOCK_M: tl.constexpr,  # heads, padded to a power of two
    BLOCK_C: tl.constexpr,
    ROW_IN_REGISTERS: tl.constexpr,  # C <= BLOCK_C: the (M, C) row is read once and reused by pass 2
    VEC: tl.constexpr,  # elements of one 16-byte load: a thread's slice on the per-thread statistics path
    T_PTR: tl.constexpr = False,
    SPREAD: tl.constexpr = False,  # long rows Triton cannot prove 16-byte aligned (softmax_kl._thread_slices)
):
    inv_temp, _, _ = _tempered_scalars(temp_ptr, inv_temp, 1.0, 1.0, T_PTR, NAN_INV=True)
    c2 = inv_temp * LOG2E  # exponents in base 2: 2^((x - max x) c2) = exp((x - max x) / T)
    row = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_M)
    head_ok = heads < M
    cols0 = tl.arange(0, BLOCK_C)
    z_row = z_ptr + row * stride_zb + heads[:, None].to(tl.int64) * stride_zm
    probs_row = probs_ptr + row * stride_pb

    # Every exponent is (x - max x) c2 from the raw logits' maxima: the difference is exact near the maximum and
    # exactly 0 at it however the compiler contracts the scale into it, so a head with one class left has
    # entropy 0 (a product x / T taken first kept its rounding there). Masked classes (-inf) and padding load
    # -inf: exp 0, and their term 2^(..) (x - max x) is 0 (`_mass_times_shift`).
    if ROW_IN_REGISTERS:
        row_mask = head_ok[:, None] & (cols0 < C)[None, :]
        x_row = tl.load(z_row + cols0[None, :], mask=row_mask, other=float("-inf")).to(tl.float32)
        row_m = tl.max(x_row, axis=1)
        sx = x_row - tl.where(row_m == float("-inf"), 0.0, row_m)[:, None]
        ex = tl.exp2(sx * c2)
        d = tl.sum(ex, axis=1)
        e = tl.sum(_mass_times_shift(ex, sx), axis=1) * inv_temp  # sum exp(s - max s) (s - max s), s = x/T
    else:
        row_m, d, e = _entropy_sums(z_row, head_ok, C, c2, inv_temp, BLOCK_M, BLOCK_C, VEC, SPREAD)

    d_ok = tl.where(head_ok, d, 1.0)  # padded heads: d 1 (their q is 0 below); a head masked everywhere: NaN
    ent = tl.where(head_ok, tl.log(d_ok) - e / d_ok, 0.0)
    aleatoric = tl.sum(ent, axis=0) / M

    # P = mean_m q_m, stored, and -sum P log P; a NaN P (a NaN logit in the row) stays NaN (a P > 0 test would
    # drop it), P = 0 adds 0
    if ROW_IN_REGISTERS:
        p = tl.sum(ex * (1.0 / d_ok)[:, None], axis=0) / M
        tl.store(probs_row + cols0, p.to(probs_row.dtype.element_ty), mask=cols0 < C)
        plogp = _p_log2_p(p)
    else:
        # q_m = 2^((x - max x) c2 - log2 d_m): one exp2 per element and no select (masked classes and padded
        # heads load -inf: q = 0); sum P log P kept per thread and reduced once per row.
        ref_raw = tl.where(head_ok & (row_m > float("-inf")), row_m, 0.0)
        plogp = _mixture_walk(z_row, probs_row, head_ok, ref_raw, tl.log2(d_ok), c2, M, 0, C, BLOCK_C)
    total = -tl.sum(plogp, axis=0) * LN2

    _store_outputs(total, aleatoric, row, total_ptr, aleatoric_ptr, epistemic_ptr)


@triton.jit
def _mass_times_shift(ex, sx):
    """ex * sx, the entropy sum's term 2^(sx c2) sx, with a masked class's shift sx = -inf taken as the most
    negative float: its ex is 0 and the term 0 (not 0 * -inf = NaN), with no select per element. A NaN logit's
    term stays NaN (its ex is NaN)."""
    return ex * tl.maximum(sx, -3.4028234663852886e38)


@triton.jit
def _p_log2_p(p):
    """P log2 P per class: 0 where P = 0, NaN where P is NaN."""
    return tl.where(p == 0, 0.0, p * tl.log2(tl.where(p > 0, p, 1.0)))


@triton.jit
def _entropy_sums(z_row, row_ok, C, c2, inv_temp, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
                  SPREAD: tl.constexpr):
    """Pass 1 over long rows (BLOCK_R of them, pointers z_row (BLOCK_R, 1), row_ok masking the rest): per row the
    raw logits' maximum m, d = sum 2^((x - m) c2) and e = sum 2^((x - m) c2) (x - m) / T, so that the row's
    softmax has entropy log d - e / d. Per-thread running statistics over 16-byte slices (a tile is (rows,
    threads, VEC); max and sums inside the thread), merged across threads once per row: no barrier in the loop
    (sm_90 SASS: the tile-wise form spent ~21 instructions per element and 6 barriers per tile)."""
    offs = _thread_slices(BLOCK_C, VEC, SPREAD)
    tm = tl.full((BLOCK_R, BLOCK_C // VEC), float("-inf"), tl.float32)
    td = tl.zeros((BLOCK_R, BLOCK_C // VEC), tl.float32)
    te = tl.zeros((BLOCK_R, BLOCK_C // VEC), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        mask = row_ok[:, None, None] & (cols < C)
        x = tl.load(z_row[:, :, None] + cols, mask=mask, other=float("-inf")).to(tl.float32)
        new_m, ref, scale = _thread_max(x, tm, c2)
        # (scale == 0: nothing so far, or a maximum so far below the new one that its terms vanish, where
        # td * (ref - tm) may overflow: a class at torch.finfo(dtype).min first, then live ones)
        te = tl.where(scale == 0, 0.0, scale * (te - td * (ref - tm)))
        sx = x - ref[:, :, None]
        ex = tl.exp2(sx * c2)
        te += tl.sum(_mass_times_shift(ex, sx), axis=2)
        td = td * scale + tl.sum(ex, axis=2)
        tm = new_m
    row_m, ref, w = _thread_merge(tm, c2)
    d = tl.sum(tl.where(td == 0, 0.0, w * td), axis=1)
    e = tl.sum(tl.where(w == 0, 0.0, w * (te - td * (ref - tm))), axis=1) * inv_temp
    return row_m, d, e


@triton.jit
def _mixture_walk(z_row, probs_row, head_ok, ref_raw, log2_d, c2, M, c_lo, c_hi, BLOCK_C: tl.constexpr):
    """Pass 2 over classes [c_lo, c_hi) of one row's heads (pointers z_row (BLOCK_M, 1), padded heads masked by
    head_ok): P = mean_m 2^((x - ref_m) c2 - log2 d_m) stored at probs_row, and P log2 P summed per lane
    (BLOCK_C,). One exp2 per element and no select (masked classes and padded heads load -inf: q = 0); the last
    tile first (the walk before it read that one last, so L2 most likely still holds it)."""
    cols0 = tl.arange(0, BLOCK_C)
    ref = ref_raw[:, None]
    log2_d = log2_d[:, None]
    plogp = tl.zeros((BLOCK_C,), tl.float32)
    n_tiles = tl.cdiv(c_hi - c_lo, BLOCK_C)
    for j in range(0, n_tiles):
        cols = c_lo + (n_tiles - 1 - j) * BLOCK_C + cols0
        x = tl.load(z_row + cols[None, :], mask=head_ok[:, None] & (cols < c_hi)[None, :],
                    other=float("-inf")).to(tl.float32)
        p = tl.sum(tl.exp2((x - ref) * c2 - log2_d), axis=0) / M
        tl.store(probs_row + cols, p.to(probs_row.dtype.element_ty), mask=cols < c_hi)
        plogp += _p_log2_p(p)
    return plogp


# `uncertainty` over long rows in two launches (UNCERTAINTY_SPLIT in fasthydra/ops/_common.py): the one-kernel
# form above walks a whole (M, C) row per program twice, 512 KiB of 16-bit logits at (4096, 8, 32000), with
# hundreds of MB of rows in flight, so its second read comes from DRAM anyway; these read each row once per
# launch, in programs that each stream far less. `_head_entropy_kernel`: pass 1 per (batch, head) row, whose
# statistics it writes; `_mixture_kernel`: pass 2 per (batch row, class block), from those statistics.
@triton.jit
def _head_entropy_kernel(
    z_ptr,  # logits (B, M, C): row (b, m) at b * stride_zb + m * stride_zm, unit stride along C
    stats_ptr,  # out: (B * M, 3) fp32 per row b * M + m: the raw maximum (0 where -inf or NaN), log2 d, entropy
    R,  # B * M rows
    M,
    C,
    stride_zb,
    stride_zm,
    inv_temp,
    temp_ptr,  # a tensor temperature where T_PTR (inv_temp then 1)
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
    T_PTR: tl.constexpr = False,
    SPREAD: tl.constexpr = False,
):
    inv_temp, _, _ = _tempered_scalars(temp_ptr, inv_temp, 1.0, 1.0, T_PTR, NAN_INV=True)
    c2 = inv_temp * LOG2E
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < R
    z_row = z_ptr + ((rows // M) * stride_zb + (rows % M) * stride_zm)[:, None]
    row_m, d, e = _entropy_sums(z_row, row_ok, C, c2, inv_temp, BLOCK_R, BLOCK_C, VEC, SPREAD)
    # as the one-kernel form: a head masked everywhere has d = 0 and entropy NaN (so the row's aleatoric part)
    tl.store(stats_ptr + rows * 3, tl.where(row_m > float("-inf"), row_m, 0.0), mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 1, tl.log2(d), mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 2, tl.log(d) - e / d, mask=row_ok)


@triton.jit
def _mixture_kernel(
    z_ptr,  # logits (B, M, C), as _head_entropy_kernel's
    stats_ptr,  # (B * M, 3) fp32 from _head_entropy_kernel
    probs_ptr,  # out: (B, C) mixture probabilities, row stride stride_pb, unit along C
    total_ptr,  # out: (B,) H[P]
    aleatoric_ptr,  # out: (B,) mean_m H[q_m]
    epistemic_ptr,  # out: (B,) total - aleatoric, clamped at 0
    part_ptr,  # (B, n_blocks) fp32: each program's sum of P log2 P; unused where SINGLE
    count_ptr,  # (B,) int32 zeros: finished programs of each row, 0 again after the launch; unused where SINGLE
    M,
    C,
    cols_per_prog,  # classes of one program (grid axis 1 walks their blocks): a multiple of BLOCK_C
    stride_zb,
    stride_zm,
    stride_pb,
    inv_temp,
    temp_ptr,
    BLOCK_M: tl.constexpr,  # heads, padded to a power of two
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,  # partial sums read per step by a row's last program
    SINGLE: tl.constexpr,  # one class block a row (cols_per_prog >= C): the row's outputs from its one program
    T_PTR: tl.constexpr = False,
):
    inv_temp, _, _ = _tempered_scalars(temp_ptr, inv_temp, 1.0, 1.0, T_PTR, NAN_INV=True)
    c2 = inv_temp * LOG2E
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    heads = tl.arange(0, BLOCK_M)
    head_ok = heads < M
    stats = stats_ptr + (row * M + heads) * 3
    ref_raw = tl.load(stats, mask=head_ok, other=0.0)
    log2_d = tl.load(stats + 1, mask=head_ok, other=0.0)
    c_lo = block * cols_per_prog
    z_row = z_ptr + row * stride_zb + heads[:, None].to(tl.int64) * stride_zm
    plogp = _mixture_walk(z_row, probs_ptr + row * stride_pb, head_ok, ref_raw, log2_d, c2, M, c_lo,
                          tl.minimum(C, c_lo + cols_per_prog), BLOCK_C)
    # the aleatoric part: the mean of the heads' entropies (the statistics' third column)
    aleatoric = tl.sum(tl.load(stats + 2, mask=head_ok, other=0.0), axis=0) / M
    if SINGLE:
        _store_outputs(-tl.sum(plogp, axis=0) * LN2, aleatoric, row, total_ptr, aleatoric_ptr, epistemic_ptr)
    else:
        # the row's last program to finish sums the row's partials in block order (deterministic: see
        # reduce._last_program_sums, the same pattern per row) and writes its three outputs
        n_blocks = tl.num_programs(1)
        tl.store(part_ptr + row * n_blocks + block, tl.sum(plogp, axis=0))
        tl.debug_barrier()
        finished = tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu")
        if finished == n_blocks - 1:
            total = -_sum_parts(part_ptr + row * n_blocks, n_blocks, BLOCK_P) * LN2
            _store_outputs(total, aleatoric, row, total_ptr, aleatoric_ptr, epistemic_ptr)
            tl.atomic_xchg(count_ptr + row, 0, sem="relaxed", scope="gpu")


@triton.jit
def _store_outputs(total, aleatoric, row, total_ptr, aleatoric_ptr, epistemic_ptr):
    """A row's total and aleatoric parts, and the epistemic part, total - aleatoric clamped at 0 (a NaN kept:
    tl.maximum would turn a NaN row's into 0)."""
    tl.store(total_ptr + row, total.to(total_ptr.dtype.element_ty))
    tl.store(aleatoric_ptr + row, aleatoric.to(aleatoric_ptr.dtype.element_ty))
    diff = total - aleatoric
    tl.store(epistemic_ptr + row, tl.where(diff < 0.0, 0.0, diff).to(epistemic_ptr.dtype.element_ty))


# The ensemble's mean prediction in log space, the Hinton loss's target: per row b and class c,
#     out[b, c] = T * log pbar_c,   pbar = mean_m softmax(t_m / T)
# formed as T * (mx_c + log sum_m exp(l_mc - mx_c) - log M) with l_mc = t_mc / T - lse_m and
# mx_c = max_m l_mc, so no probability is ever formed in linear space (no underflow); a class that
# every member masks (-inf) gets -inf. No gradient (a teacher that requires grad takes torch ops).
# Pass 1 walks the C tiles with all heads of the row in one tile for each head's log-normaliser lse_m
# and checks the teacher on the same loads (error word: 1 a NaN, 2 a +inf, 4 a member row that is -inf
# for every class); pass 2 forms the target tile by tile.
@triton.jit
def _ensemble_log_mean_kernel(
    t_ptr,  # member logits (B, M, C): strides stride_tb, stride_tm, unit along C
    out_ptr,  # out: (B, C) fp32 T * log pbar, row stride stride_ob, unit along C
    err_ptr,  # in/out: int32 error word (bits 1, 2, 4)
    M,
    C,
    stride_tb,
    stride_tm,
    stride_ob,
    inv_temp,  # 1 / T
    temp,  # T
    log_m,  # log M
    temp_ptr,  # a tensor temperature where T_PTR (inv_temp and temp then 1); out of range, the target is made
    #            with T = 1 (the loss kernel that reads it makes that loss NaN: a NaN target would read as a
    #            NaN teacher)
    BLOCK_M: tl.constexpr,  # heads, padded to a power of two
    BLOCK_C: tl.constexpr,
    ROW_IN_REGISTERS: tl.constexpr,  # C <= BLOCK_C: the (M, C) row is read once and reused by pass 2
    VEC: tl.constexpr = 1,  # long rows: a thread's contiguous classes in a tile, one 16-byte load
    T_PTR: tl.constexpr = False,
    SPREAD: tl.constexpr = False,  # long rows Triton cannot prove 16-byte aligned: pass 1 in spread slices
):
    if T_PTR:
        t, _ = _device_temperature(temp_ptr)
        inv_temp = inv_temp / t
        temp = temp * t
    c2 = inv_temp * LOG2E
    row = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_M)
    head_ok = heads < M
    cols0 = tl.arange(0, BLOCK_C)
    t_row = t_ptr + row * stride_tb + heads[:, None].to(tl.int64) * stride_tm

    if ROW_IN_REGISTERS:
        row_mask = head_ok[:, None] & (cols0 < C)[None, :]
        x_row = tl.load(t_row + cols0[None, :], mask=row_mask, other=float("-inf")).to(tl.float32)
        n_nan = tl.sum((x_row != x_row).to(tl.int32), axis=1)
        m, d = _lse_update(x_row, tl.full((BLOCK_M,), float("-inf"), tl.float32), tl.zeros((BLOCK_M,), tl.float32), c2)
    else:
        m, d, n_nan = _thread_lse(t_row, head_ok, C, c2, BLOCK_M, BLOCK_C, VEC, True, SPREAD)
    bad = tl.max(tl.where(head_ok & (n_nan > 0), 1, 0), axis=0)
    bad |= tl.max(tl.where(head_ok & (m == float("inf")), 2, 0), axis=0)
    bad |= tl.max(tl.where(head_ok & (m == float("-inf")), 4, 0), axis=0)
    tl.atomic_or(err_ptr, bad, mask=bad != 0)
    ref = tl.where(m == float("-inf"), 0.0, m)
    log_d = tl.where(head_ok, tl.log(d), 0.0)  # padded heads: l = -inf, nothing to the sum

    out_row = out_ptr + row * stride_ob
    if ROW_IN_REGISTERS:
        _log_mean_tile(x_row, ref, log_d, inv_temp, cols0, out_row, C, temp, log_m)
    else:
        n_tiles = tl.cdiv(C, BLOCK_C)
        for j in range(0, n_tiles):  # last tile first: pass 1 read it last, so L2 most likely still holds it
            cols = (n_tiles - 1 - j) * BLOCK_C + cols0
            x = tl.load(t_row + cols[None, :], mask=head_ok[:, None] & (cols < C)[None, :],
                        other=float("-inf")).to(tl.float32)
            _log_mean_tile(x, ref, log_d, inv_temp, cols, out_row, C, temp, log_m)


# The same target for a top-k teacher (TopKTeacher: member m keeps k classes of a row, values v_mi at classes
# idx_mi): pbar_c = mean_m p~_mc with p~_m = softmax(v_m / T) over the member's kept classes, 0 elsewhere. One
# program a row: the (C,) output row is filled with -inf (log 0), then each member in turn folds its entries into
# it in log space, out[idx] = T * logaddexp(out[idx] / T, log p~_mi - log M), so no probability underflows to 0
# and no class is summed twice at once: a member keeps each class once, the members are added one after another
# (a barrier between them orders one member's stores before the next one's loads), always in the same order: the
# same bits every run, where torch's scatter_add on a GPU adds with atomics. Padding entries (-inf) and class
# ids outside [0, C) are skipped (the id checks report both; an id out of range is never written). The values are
# checked on the same loads (error word: 1 a NaN, 2 a +inf, 4 a member row that is -inf in every entry); the ids
# before the launch (checks.flag_topk_teacher). No gradient (a teacher whose values require grad takes torch ops).
@triton.jit
def _topk_log_mean_kernel(
    v_ptr,  # member values (B, M, K): strides stride_vb, stride_vm, unit along K
    i_ptr,  # their class ids (B, M, K), int32 or int64: strides stride_ib, stride_im, unit along K
    out_ptr,  # out: (B, C) fp32 T * log pbar, row stride stride_ob, unit along C
    err_ptr,  # in/out: int32 error word (bits 1, 2, 4)
    M,
    K,
    C,
    stride_vb,
    stride_vm,
    stride_ib,
    stride_im,
    stride_ob,
    inv_temp,  # 1 / T
    temp,  # T
    log_m,  # log M
    temp_ptr,  # a tensor temperature where T_PTR, as _ensemble_log_mean_kernel takes it
    BLOCK_K: tl.constexpr,  # K, padded to a power of two
    BLOCK_C: tl.constexpr,  # the fill's tile
    T_PTR: tl.constexpr = False,
):
    if T_PTR:
        t, _ = _device_temperature(temp_ptr)
        inv_temp = inv_temp / t
        temp = temp * t
    row = tl.program_id(0).to(tl.int64)
    out_row = out_ptr + row * stride_ob
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        tl.store(out_row + c0 + cols, tl.full((BLOCK_C,), float("-inf"), tl.float32), mask=c0 + cols < C)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    c2 = inv_temp * LOG2E
    for m in range(0, M):
        tl.debug_barrier()  # the fill's and the last member's stores, seen by every thread's loads below
        v = tl.load(v_ptr + row * stride_vb + m * stride_vm + ks, mask=k_ok, other=float("-inf")).to(tl.float32)
        idx = tl.load(i_ptr + row * stride_ib + m * stride_im + ks, mask=k_ok, other=0).to(tl.int64)
        top = tl.max(v, axis=0)
        bad = tl.where(tl.sum((v != v).to(tl.int32), axis=0) > 0, 1, 0)
        bad |= tl.where(top == float("inf"), 2, 0)
        bad |= tl.where(top == float("-inf"), 4, 0)
        tl.atomic_or(err_ptr, bad, mask=bad != 0)
        ref = tl.where(top == float("-inf"), 0.0, top)
        lp = (v - ref) * inv_temp - (tl.log(tl.sum(tl.exp2((v - ref) * c2), axis=0)) + log_m)
        live = k_ok & (v != float("-inf")) & (idx >= 0) & (idx < C)
        ptrs = out_row + idx
        cur = tl.load(ptrs, mask=live, other=float("-inf")) * inv_temp
        hi = tl.maximum(cur, lp)
        lo = tl.minimum(cur, lp)
        new = tl.where(lo == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(lo - hi)))
        tl.store(ptrs, new * temp, mask=live)


@triton.jit
def _lse_update(x, m, d, c2):
    """Folds one (BLOCK_M, BLOCK_C) tile of raw logits into each head's running raw max m and sum
    d = sum 2^((x - m) c2) = sum exp((x - m) / T) (c2 = log2(e) / T): the difference before the scale."""
    new_m = tl.maximum(m, tl.max(x, axis=1))
    ref = tl.where(new_m == float("-inf"), 0.0, new_m)
    d = d * tl.exp2((m - ref) * c2) + tl.sum(tl.exp2((x - ref[:, None]) * c2), axis=1)
    return new_m, d


@triton.jit
def _thread_lse(z_row, head_ok, C, c2, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
                COUNT_NAN: tl.constexpr, SPREAD: tl.constexpr = False):
    """Pass 1 over a long (heads, C) row (z_row: (BLOCK_M, 1) head pointers, unit stride along C) in
    (BLOCK_M, THREADS, VEC) slices (`_thread_slices`, SPREAD as there; as `_uncertainty_fwd_kernel`'s pass 1):
    each head's raw max m and d = sum 2^((x - m) c2) kept per thread and merged once at the end; with COUNT_NAN,
    each head's count of NaN logits (else zeros). Returns (m, d, count), each (BLOCK_M,)."""
    offs = _thread_slices(BLOCK_C, VEC, SPREAD)
    ptrs = z_row[:, :, None]
    live = head_ok[:, None, None]
    tm = tl.full((BLOCK_M, BLOCK_C // VEC), float("-inf"), tl.float32)
    td = tl.zeros((BLOCK_M, BLOCK_C // VEC), tl.float32)
    tn = tl.zeros((BLOCK_M, BLOCK_C // VEC), tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        x = tl.load(ptrs + cols, mask=live & (cols < C), other=float("-inf")).to(tl.float32)
        if COUNT_NAN:
            tn += tl.sum((x != x).to(tl.int32), axis=2)
        tm, ref, scale = _thread_max(x, tm, c2)
        td = td * scale + tl.sum(tl.exp2((x - ref[:, :, None]) * c2), axis=2)
    row_m, _, w = _thread_merge(tm, c2)
    # (a thread that saw nothing live has d 0 and weight 0: it adds 0, where 0 * a NaN weight would not)
    return row_m, tl.sum(tl.where(td == 0, 0.0, w * td), axis=1), tl.sum(tn, axis=1)


@triton.jit
def _log_mean_tile(x, ref, log_d, inv_temp, cols, out_row, C, temp, log_m):
    """Stores T * log mean_m q_m on one class tile of raw logits x, log q_m = (x - ref_m) / T - log d_m
    (-inf where every member masks)."""
    lq = (x - ref[:, None]) * inv_temp - log_d[:, None]
    mx = tl.max(lq, axis=0)
    ref = tl.where(mx == float("-inf"), 0.0, mx)
    s = tl.sum(tl.exp(lq - ref[None, :]), axis=0)
    lp = tl.where(mx == float("-inf"), float("-inf"), ref + tl.log(s) - log_m)
    tl.store(out_row + cols, lp * temp, mask=cols < C)


@triton.jit
def _uncertainty_grad_tile(x, ref, log_d, inv_temp, a, b, g_row, cols, C, M, HAS_G: tl.constexpr):
    """(p, V) on one (BLOCK_M, BLOCK_C) tile of raw logits x: p = softmax(x / T) per head, V = g - a log P - b log p
    (log p as 0 where p = 0, log P as 0 where P = 0: their products with p are 0; NaN stays NaN). log p is
    (x - ref) / T - log d with ref the raw maximum: x - ref is exact near the maximum (and 0 at it however the
    scale is contracted into it), where s - (ref + log d) would carry the rounding of |s| (at |z / T| ~ 100,
    errors of 4e-6 in log p, 30x eager's in the gradient)."""
    lp = (x - ref[:, None]) * inv_temp - log_d[:, None]
    p = tl.exp(lp)
    mix = tl.sum(p, axis=0) / M
    v = -a * tl.log(tl.where(mix == 0, 1.0, mix))
    if HAS_G:
        v += tl.load(g_row + cols, mask=cols < C, other=0.0).to(tl.float32)
    v = v[None, :] - b * tl.where(p == 0, 0.0, lp)
    return p, v


@triton.jit
def _uncertainty_bwd_kernel(
    z_ptr,  # logits (B, M, C): strides stride_zb, stride_zm, unit along C
    g_ptr,  # upstream gradient of the mixture (B, C), row stride stride_gb (HAS_G)
    gt_ptr,  # upstream gradients of total, aleatoric, epistemic (B,), strides stride_gt/ga/ge (0: a broadcast
    ga_ptr,  # scalar, as a mean's backward gives); each read only where HAS_T/HAS_A/HAS_E
    ge_ptr,
    dz_ptr,  # out: (B, M, C), strides stride_db, stride_dm, unit along C
    M,
    C,
    stride_zb,
    stride_zm,
    stride_gb,
    stride_gt,
    stride_ga,
    stride_ge,
    stride_db,
    stride_dm,
    inv_temp,  # 1 / T
    scale,  # 1 / (M T)
    temp_ptr,  # a tensor temperature where T_PTR (inv_temp then 1, scale 1 / M)
    HAS_G: tl.constexpr,
    HAS_T: tl.constexpr,
    HAS_A: tl.constexpr,
    HAS_E: tl.constexpr,
    BLOCK_M: tl.constexpr,  # heads, padded to a power of two
    BLOCK_C: tl.constexpr,
    ROW_IN_REGISTERS: tl.constexpr,  # C <= BLOCK_C: the row is read once
    VEC: tl.constexpr = 1,  # long rows: a thread's contiguous classes in a tile, one 16-byte load
    T_PTR: tl.constexpr = False,
    SPREAD: tl.constexpr = False,  # long rows Triton cannot prove 16-byte aligned: pass 1 in spread slices
):
    """Backward of uncertainty for one row: dz_m = p_m (V_m - <p_m, V_m>) / (M T), the softmax's vector product
    with V = dL/dp. Pass 1: each head's max and sum of exponentials; pass 2: <p_m, V_m>; pass 3: dz (long rows
    read the row three times, in tiles whose classes fill every thread (_common.head_slices_config): the mixture
    is summed inside a thread and <p_m, V_m> kept per thread until the row ends, no exchange between warps per
    tile; a row in registers once)."""
    inv_temp, _, _ = _tempered_scalars(temp_ptr, inv_temp, 1.0, 1.0, T_PTR, NAN_INV=True)
    scale, _, _ = _tempered_scalars(temp_ptr, scale, 1.0, 1.0, T_PTR, NAN_INV=True)
    c2 = inv_temp * LOG2E
    row = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_M)
    head_ok = heads < M
    cols0 = tl.arange(0, BLOCK_C)
    z_row = z_ptr + row * stride_zb + heads[:, None].to(tl.int64) * stride_zm
    dz_row = dz_ptr + row * stride_db + heads[:, None].to(tl.int64) * stride_dm
    g_row = g_ptr + row * stride_gb
    # a: the coefficient of d total (total's upstream + epistemic's), b: of d aleatoric (aleatoric's - epistemic's)
    a = tl.zeros((), tl.float32)
    b = tl.zeros((), tl.float32)
    if HAS_T:
        a += tl.load(gt_ptr + row * stride_gt).to(tl.float32)
    if HAS_A:
        b += tl.load(ga_ptr + row * stride_ga).to(tl.float32)
    if HAS_E:
        ge = tl.load(ge_ptr + row * stride_ge).to(tl.float32)
        a += ge
        b -= ge
    if ROW_IN_REGISTERS:
        mask = head_ok[:, None] & (cols0 < C)[None, :]
        x_row = tl.load(z_row + cols0[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        mx, d = _lse_update(x_row, tl.full((BLOCK_M,), float("-inf"), tl.float32), tl.zeros((BLOCK_M,), tl.float32),
                            c2)
    else:
        mx, d, _ = _thread_lse(z_row, head_ok, C, c2, BLOCK_M, BLOCK_C, VEC, False, SPREAD)
    ref = tl.where(mx == float("-inf"), 0.0, mx)  # padded heads (and a head masked everywhere: NaN below)
    log_d = tl.log(tl.where(head_ok, d, 1.0))  # padded heads: ref 0, log d 0, so that their p is exp(-inf) = 0
    if ROW_IN_REGISTERS:
        p, v = _uncertainty_grad_tile(x_row, ref, log_d, inv_temp, a, b, g_row, cols0, C, M, HAS_G)
        pv = tl.sum(p * v, axis=1)
        tl.store(dz_row + cols0[None, :], (p * (v - pv[:, None]) * scale).to(dz_ptr.dtype.element_ty), mask=mask)
    else:
        live = head_ok[:, None]
        tpv = tl.zeros((BLOCK_M, BLOCK_C // VEC), tl.float32)  # <p_m, V_m> per thread until the row ends
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            x = tl.load(z_row + cols[None, :], mask=live & (cols < C)[None, :], other=float("-inf")).to(tl.float32)
            p, v = _uncertainty_grad_tile(x, ref, log_d, inv_temp, a, b, g_row, cols, C, M, HAS_G)
            tpv += tl.sum(tl.reshape(p * v, (BLOCK_M, BLOCK_C // VEC, VEC)), axis=2)  # (a thread's own VEC classes)
        pv = tl.sum(tpv, axis=1)[:, None]
        n_tiles = tl.cdiv(C, BLOCK_C)
        for j in range(0, n_tiles):  # last tile first: pass 2 read it last
            cols = (n_tiles - 1 - j) * BLOCK_C + cols0
            tile_mask = live & (cols < C)[None, :]
            x = tl.load(z_row + cols[None, :], mask=tile_mask, other=float("-inf")).to(tl.float32)
            p, v = _uncertainty_grad_tile(x, ref, log_d, inv_temp, a, b, g_row, cols, C, M, HAS_G)
            tl.store(dz_row + cols[None, :], (p * (v - pv) * scale).to(dz_ptr.dtype.element_ty), mask=tile_mask)
