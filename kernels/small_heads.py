"""Device code: a whole heads + Hydra loss step in two launches, for small problems (C fits one tile).

At small shapes (C = 10, a few thousand rows) a step is a few microseconds of arithmetic and the cost
is launches and serial latency: the cuBLAS path issues the logits GEMM, the loss pass, two gradient
GEMMs, a bias sum and the loss reduction. Here:

  launch 1 (the forward), one program per (BLOCK_B rows, group of heads):
      z_m = x_m @ W_m.T + b_m                          (tl.dot over K tiles, or fp32 outer products; C padded)
      loss[b, m] = T^2 KL(softmax(t_m / T) || softmax(z_m / T)),   dz_m = grad_scale * (q_m - p_m)
      and the program's partial sum of its loss rows; the last program to finish (an atomic count)
      sums the partial losses in a fixed order (deterministic) and resets the count;
  launch 2 (the backward), two kinds of programs, all scaled by the upstream gradient read on the
  device:
      (head, K block): dW_m = dz_m^T @ x_m, db_m = sum_b dz_m over all rows (complete, fp32 inside,
                       written once in the parameters' dtype);
      (BLOCK_R rows, K block): dx = sum_m dz_m @ W_m (shared input) or dx_m = dz_m @ W_m (per head).

Every program's serial chain is short (K / BLOCK_K steps, M steps, or B / BLOCK_RW steps) and the grid
is wide: at these shapes latency and operand traffic, not arithmetic, are what a step costs. fp32 operands
at IEEE precision (no tensor cores) sum the logits' and dW's products as outer products in registers
(OUTER, _outer_fma_tile and _outer_dw): tl.dot's FMA loop re-reads its operands from shared memory for
every product or two at these tile sizes. dz is stashed (B, M, C) in the
input dtype between the launches (what the gradient GEMMs of the cuBLAS path read too). The teacher is
checked on the loads already made (error word bits 1, 2, 4, as in softmax_kl.py). Launch 2 serves the
Gaussian heads too: their fused kernel (gaussian_kl.py) leaves the same kind of stash and reduces its
loss with the same last-program sum. A row mask (HAS_KEEP, padding left out): launch 1 reads the inputs
of the rows left out as 0 and writes loss 0 and dz 0 for them (their teacher still checked), and launch 2
reads them as 0 for dW, so whatever x holds there (NaN included) reaches no gradient.
"""

import triton
import triton.language as tl

from .reduce import _last_program_sums
from .softmax_kl import LOG2E, _kl_from_sums, _launch_scales, _mean_e, _online_kl_update, _store_grads


@triton.jit
def _heads_logits_tile(x_rows, w_head, bias_ptr, head, rows_ok, cols, col_ok, K, stride_wc, stride_biasm,
                       HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                       OUTER: tl.constexpr = False):
    """One (BLOCK_B, BLOCK_C) tile of head logits in fp32: x_rows @ W[head, cols].T + bias[head, cols].

    x_rows: pointers to the rows' inputs (BLOCK_B, 1), unit stride along K; w_head: W[head] (C, K).
    OUTER (fp32 operands, IEEE products): the products summed as (BLOCK_B, BLOCK_C, BLOCK_K) outer products
    in registers, K reduced once after the walk, instead of tl.dot, whose FMA form for such a small tile
    reads each operand from shared memory for every one or two products (see the function below).
    """
    if OUTER:
        acc = _outer_fma_tile(x_rows, w_head, rows_ok, cols, col_ok, K, stride_wc, BLOCK_B, BLOCK_C, BLOCK_K)
    else:
        ks0 = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + ks0
            k_ok = ks < K
            xt = tl.load(x_rows + ks[None, :], mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_head + cols[None, :] * stride_wc + ks[:, None], mask=k_ok[:, None] & col_ok[None, :],
                         other=0.0)
            if UPCAST_DOT:  # interpreter: tl.dot on 16-bit operands is unreliable there
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, wt.to(xt.dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + head * stride_biasm + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _outer_fma_tile(x_rows, w_head, rows_ok, cols, col_ok, K, stride_wc, BLOCK_B: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """x_rows (BLOCK_B, K) @ w_head[cols] (BLOCK_C, K).T in fp32 FMAs, as outer products.

    tl.dot of fp32 operands at IEEE precision is an FMA loop over a (BLOCK_B, BLOCK_C) tile: at 16 x 16 in 4
    warps a thread owns two outputs, so each product needs its own operand reads from shared memory, and
    the class operand's column-major reads there conflict in the banks (the H200's small-step profile:
    the L1/shared pipe 95% busy, 0.5 instructions a cycle). Here a thread holds a (rows, classes) block of
    the (BLOCK_B, BLOCK_C, BLOCK_K) products at one K position, lanes along K: each operand read serves
    several products, and the sum over K crosses the lanes once, after the walk. The loads are pipelined
    like tl.dot's (num_stages)."""
    ks0 = tl.arange(0, BLOCK_K)
    acc3 = tl.zeros((BLOCK_B, BLOCK_C, BLOCK_K), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=3):
        ks = k0 + ks0
        k_ok = ks < K
        xt = tl.load(x_rows + ks[None, :], mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_head + cols[:, None] * stride_wc + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                     other=0.0)
        acc3 += xt[:, None, :] * wt[None, :, :]
    return tl.sum(acc3, axis=2)


@triton.jit
def _small_heads_kl_kernel(
    x_ptr,  # inputs: row b of head m at x_ptr + b * stride_xb + m * stride_xm (stride_xm = 0: shared), unit along K
    w_ptr,  # weights (M, C, K): head stride stride_wm, class stride stride_wc, unit stride along K
    bias_ptr,  # bias (M, C), head stride stride_biasm, unit along C; unused unless HAS_BIAS
    t_ptr,  # teacher logits (B, M, C): strides stride_tb, stride_tm, unit along C
    loss_ptr,  # out: (B, M) fp32 contiguous loss rows, T^2 * KL
    part_ptr,  # out: (row blocks, head groups) fp32 sums of each program's loss rows
    g_ptr,  # out: dz stash (B, M, C) contiguous, input dtype; unused unless WRITE_GRAD
    h_ptr,  # out: the teacher's gradient (B, M, C) contiguous, stored gradient dtype; unused unless WRITE_TGRAD
    err_ptr,  # in/out: int32 error word, OR-ed with 1 (NaN), 2 (+inf), 4 (a row -inf everywhere)
    out_ptr,  # out: the reduced loss, fp32 scalar; unused unless REDUCE
    count_ptr,  # in/out: int32 count of finished programs, 0 before and after the launch; unused unless REDUCE
    keep_ptr,  # row mask (B,) uint8, nonzero = the row counts; unused unless HAS_KEEP
    nkept_ptr,  # the mask's count of kept rows, an integer scalar; unused unless MEAN_KEPT
    B,
    M,
    C,
    K,
    heads_per_program,  # heads of one program (grid axis 1 = their groups): > 1 only when the grid is wide
    stride_xb,
    stride_xm,
    stride_wm,
    stride_wc,
    stride_biasm,
    stride_tb,
    stride_tm,
    inv_temp,  # 1 / T
    loss_scale,  # T^2
    grad_scale,  # T * reduction coefficient
    out_scale,  # reduction coefficient of the summed loss rows
    temp_ptr,  # a tensor temperature where T_PTR, as in softmax_kl._hydra_kl_fwd_kernel
    HAS_BIAS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    WRITE_TGRAD: tl.constexpr,  # a teacher that requires grad (or a learned temperature): its gradient too
    REDUCE: tl.constexpr,  # the last program sums the partial losses into out_ptr
    HAS_KEEP: tl.constexpr,  # a row mask: rows left out read their input as 0 and get loss 0 and dz 0
    MEAN_KEPT: tl.constexpr,  # "mean" over the kept rows: grad_scale and out_scale (1/(B*M) in them) times B / kept
    UPCAST_DOT: tl.constexpr,  # interpreter: tl.dot on 16-bit operands is unreliable there
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands ("ieee" or "tf32")
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,  # >= C: one tile holds a head's whole row
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,  # partial sums read per step by the reducing program
    T_PTR: tl.constexpr = False,
    OUTER: tl.constexpr = False,  # fp32 IEEE products as outer products (_outer_fma_tile) instead of tl.dot
):
    inv_temp, loss_scale, grad_scale, out_scale = _launch_scales(temp_ptr, inv_temp, loss_scale, grad_scale,
                                                                 out_scale, nkept_ptr, B * 1.0, T_PTR, MEAN_KEPT)
    pid_r = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    rows = pid_r * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    live = row_ok  # the rows that count (the teacher is checked on every row all the same)
    if HAS_KEEP:
        live = row_ok & (tl.load(keep_ptr + rows, mask=row_ok, other=0) != 0)
    part = tl.zeros((BLOCK_B,), tl.float32)
    bad = tl.zeros((BLOCK_B,), tl.int32)
    h0 = pid_h * heads_per_program
    # The loop bound is an argument, heads past M skipped inside: a computed bound min(h0 + heads, M) went to
    # local memory and was reloaded in every step (sm_90, fp32 configurations; kernel report).
    for j in range(0, heads_per_program):
        m = h0 + j
        if m < M:
            x_rows = x_ptr + rows[:, None] * stride_xb + m * stride_xm
            acc = _heads_logits_tile(x_rows, w_ptr + m * stride_wm, bias_ptr, m, live, cols, col_ok, K, stride_wc,
                                     stride_biasm, HAS_BIAS, UPCAST_DOT, PRECISION, BLOCK_B, BLOCK_C, BLOCK_K, OUTER)
            # raw logits: the statistics take each difference from the row's maximum before the 1/T scale
            x = tl.where(mask, acc, float("-inf"))
            y = tl.load(t_ptr + rows[:, None] * stride_tb + m * stride_tm + cols[None, :], mask=mask,
                        other=float("-inf")).to(tl.float32)
            zero = tl.zeros((BLOCK_B,), tl.float32)
            m_s, d_s, m_u, d_u, a = _online_kl_update(x, y, zero + float("-inf"), zero, zero + float("-inf"), zero,
                                                      zero, inv_temp * LOG2E)
            bad |= tl.where(tl.sum((y != y).to(tl.int32), axis=1) > 0, 1, 0)
            bad |= tl.where(m_u == float("inf"), 2, 0)
            bad |= tl.where(m_u == float("-inf"), 4, 0)
            kl = _kl_from_sums(a, d_s, d_u, inv_temp, loss_scale)
            if HAS_KEEP:
                kl = tl.where(live, kl, 0.0)
            tl.store(loss_ptr + rows * M + m, kl, mask=row_ok)
            part += tl.where(live, kl, 0.0)
            l_s = tl.log(d_s) * LOG2E
            l_u = tl.log(d_u) * LOG2E
            ref_u = tl.where(m_u == float("-inf"), 0.0, m_u)
            big_a = zero
            x_at = zero
            if WRITE_TGRAD:  # the pivot at the teacher's most probable class (softmax_kl._store_grads)
                x_at = tl.max(tl.where(y == m_u[:, None], x, float("-inf")), axis=1)
                big_a = _mean_e(x, y, ref_u, l_u, x_at, inv_temp)
            at = rows[:, None] * (M * C) + m * C
            _store_grads(x, y, cols, mask, g_ptr + at, h_ptr + at, m_s, l_s, ref_u, l_u, x_at, big_a, inv_temp,
                         grad_scale, live, WRITE_GRAD, WRITE_TGRAD, HAS_KEEP)
    bits = tl.max(tl.where(row_ok, bad, 0), axis=0)
    tl.atomic_or(err_ptr, bits, mask=bits != 0)
    tl.store(part_ptr + pid_r * tl.num_programs(1) + pid_h, tl.sum(part, axis=0))
    if REDUCE:
        _last_program_sums(part_ptr, tl.num_programs(0) * tl.num_programs(1), out_ptr, count_ptr, out_scale, BLOCK_P)


# The gradients from the stash. Program ids: [0, n_w) weight/bias programs (head, K block) walking all
# B rows in BLOCK_RW steps; [n_w, n_w + n_x) input programs (row block, K block) for a shared input
# (inner loop over the M heads' classes), (row block, head, K block) for per-head inputs.
@triton.jit
def _small_heads_grad_kernel(
    x_ptr,  # inputs, as in _small_heads_kl_kernel
    w_ptr,  # weights (M, C, K) contiguous
    g_ptr,  # dz stash (B, M, C) contiguous, input dtype
    dx_ptr,  # out: input gradient, x's shape, contiguous, input dtype; unused unless n_x > 0
    dw_ptr,  # out: weight gradient (M, C, K) contiguous, weight dtype; unused unless NEED_W
    db_ptr,  # out: bias gradient (M, C) contiguous, bias dtype; unused unless NEED_B
    up_ptr,  # the upstream gradient of the (reduced) loss, a scalar on the device; unused unless SCALE_BY_UP
    keep_ptr,  # row mask (B,) uint8 as in launch 1; unused unless HAS_KEEP
    B,
    M,
    C,
    K,
    stride_xb,
    stride_xm,
    n_w,  # weight/bias programs: M * n_kblocks_w, or 0
    n_kblocks_w,  # BLOCK_KW blocks per head for dW (1 when only db is wanted)
    n_x,  # input-gradient programs, or 0
    n_kblocks,  # K blocks of K
    SHARED: tl.constexpr,
    NEED_W: tl.constexpr,
    NEED_B: tl.constexpr,
    SCALE_BY_UP: tl.constexpr,  # gradients times the upstream gradient (launched from the backward)
    HAS_KEEP: tl.constexpr,  # a row mask: dW reads the rows left out as 0 (whatever x holds there; their dz is 0)
    UPCAST_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per input-gradient program
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,  # K block of an input-gradient program
    BLOCK_J: tl.constexpr,  # flattened (head, class) block of a shared input's gradient programs
    BLOCK_RW: tl.constexpr,  # rows per step of the dW walk: long steps, few of them (the chain is B / BLOCK_RW)
    BLOCK_KW: tl.constexpr,  # K block of a dW program: narrow, so that M * K / BLOCK_KW programs fill the GPU
    OUTER: tl.constexpr = False,  # fp32 IEEE: dW's products as outer products (_outer_dw), BLOCK_RW rows a step
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    r0s = tl.arange(0, BLOCK_R).to(tl.int64)
    if pid < n_w:
        m = (pid // n_kblocks_w).to(tl.int64)
        ks = (pid % n_kblocks_w) * BLOCK_KW + tl.arange(0, BLOCK_KW)
        k_ok = ks < K
        rws = tl.arange(0, BLOCK_RW).to(tl.int64)
        if OUTER:
            acc, acc_b = _outer_dw(g_ptr + m * C, x_ptr + m * stride_xm, keep_ptr, rws, cols, col_ok, ks, k_ok, B,
                                   M * C, stride_xb, NEED_W, NEED_B, HAS_KEEP, BLOCK_C, BLOCK_KW, BLOCK_RW)
        else:
            acc = tl.zeros((BLOCK_C, BLOCK_KW), tl.float32)
            acc_b = tl.zeros((BLOCK_C,), tl.float32)
            for r0 in range(0, B, BLOCK_RW):
                rows = r0 + rws
                row_ok = rows < B
                g = tl.load(g_ptr + rows[:, None] * (M * C) + m * C + cols[None, :],
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                if NEED_B:
                    acc_b += tl.sum(g.to(tl.float32), axis=0)
                if NEED_W:
                    x_ok = row_ok
                    if HAS_KEEP:  # (0 * NaN would be NaN: the features of a row left out are not read)
                        x_ok = row_ok & (tl.load(keep_ptr + rows, mask=row_ok, other=0) != 0)
                    x = tl.load(x_ptr + rows[:, None] * stride_xb + m * stride_xm + ks[None, :],
                                mask=x_ok[:, None] & k_ok[None, :], other=0.0)
                    if UPCAST_DOT:
                        g = g.to(tl.float32)
                        x = x.to(tl.float32)
                    acc = tl.dot(tl.trans(g), x.to(g.dtype), acc, input_precision=PRECISION)
        up = _upstream(up_ptr, SCALE_BY_UP)  # loaded after the walk: no register held across it
        if NEED_W:
            tl.store(dw_ptr + m * (C * K) + cols[:, None] * K + ks[None, :], (acc * up).to(dw_ptr.dtype.element_ty),
                     mask=col_ok[:, None] & k_ok[None, :])
        if NEED_B:
            if pid % n_kblocks_w == 0:  # one program per head writes db (a branch: Triton 3.9's interpreter
                # makes an int32 mask of a tensor & scalar condition, which its store refuses)
                tl.store(db_ptr + m * C + cols, (acc_b * up).to(db_ptr.dtype.element_ty), mask=col_ok)
    elif pid < n_w + n_x:
        q = pid - n_w
        ks = (q % n_kblocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        q = q // n_kblocks
        if SHARED:  # q = row block: dx = sum_m dz_m @ W_m = dz (rows, M*C) @ W (M*C, K), the heads flattened
            #         (stash and weight are both contiguous that way): one dot per BLOCK_J of M*C, not one
            #         per head with its classes padded, so the program's serial chain is short
            rows = q.to(tl.int64) * BLOCK_R + r0s
            row_ok = rows < B
            acc = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
            for j0 in range(0, M * C, BLOCK_J):
                acc = _dz_times_w(g_ptr + rows[:, None] * (M * C) + j0, w_ptr + j0 * K, row_ok, tl.arange(0, BLOCK_J),
                                  tl.arange(0, BLOCK_J) < M * C - j0, ks, k_ok, K, acc, UPCAST_DOT, PRECISION)
            tl.store(dx_ptr + rows[:, None] * K + ks[None, :],
                     (acc * _upstream(up_ptr, SCALE_BY_UP)).to(dx_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & k_ok[None, :])
        else:  # q = row block * M + head: dx_m = dz_m @ W_m, dx contiguous (B, M, K)
            m = q % M
            rows = (q // M).to(tl.int64) * BLOCK_R + r0s
            row_ok = rows < B
            acc = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
            acc = _dz_times_w(g_ptr + rows[:, None] * (M * C) + m * C, w_ptr + m * (C * K), row_ok, cols, col_ok,
                              ks, k_ok, K, acc, UPCAST_DOT, PRECISION)
            tl.store(dx_ptr + rows[:, None] * (M * K) + m * K + ks[None, :],
                     (acc * _upstream(up_ptr, SCALE_BY_UP)).to(dx_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _dw_step_tiles(g_head, x_head, keep_ptr, rows, cols, col_ok, ks, k_ok, B, stride_g, stride_xb,
                   NEED_W: tl.constexpr, HAS_KEEP: tl.constexpr):
    """One step of _outer_dw: dz (BLOCK_C, rows) and, where dW is wanted, x (BLOCK_KW, rows) of these rows
    (0 past B, and x 0 in the rows a mask leaves out)."""
    row_ok = rows < B
    g = tl.load(g_head + rows[None, :] * stride_g + cols[:, None], mask=row_ok[None, :] & col_ok[:, None], other=0.0)
    x = tl.zeros((ks.shape[0], rows.shape[0]), tl.float32)
    if NEED_W:
        x_ok = row_ok
        if HAS_KEEP:  # (0 * NaN would be NaN: the features of a row left out are not read)
            x_ok = row_ok & (tl.load(keep_ptr + rows, mask=row_ok, other=0) != 0)
        x = tl.load(x_head + rows[None, :] * stride_xb + ks[:, None], mask=x_ok[None, :] & k_ok[:, None], other=0.0)
    return g, x


@triton.jit
def _outer_dw(g_head, x_head, keep_ptr, rws, cols, col_ok, ks, k_ok, B, stride_g, stride_xb, NEED_W: tl.constexpr,
              NEED_B: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_KW: tl.constexpr,
              BLOCK_RW: tl.constexpr):
    """dW (BLOCK_C, BLOCK_KW) = dz[:, cols].T @ x[:, ks] and db (BLOCK_C,) = the column sums of dz, over all B rows,
    in fp32 FMAs (fp32 operands, IEEE products) as outer products: a thread holds a (classes, K) block of the
    (BLOCK_C, BLOCK_KW, BLOCK_RW) products at one row, lanes along the rows, and the sum over rows crosses the
    lanes once, after the walk. tl.dot's FMA loop over this 16 x 16 tile read an operand from shared memory for
    every product (sm_90: 1030 LDS for 512 FFMA a 256-row step); here 5 LDS.128 (and 5 STSM) serve 64 FFMA, in
    a layout conversion of the loaded tiles, whose scratch Triton lays out without bank conflicts (the tiles'
    rows, the reduced axis, lie across the lanes, so that shared memory holding them as loaded, rows apart by
    the classes, would conflict 16-way: that is why the loads are not left to the pipeliner). Each step's tiles
    are loaded one step ahead."""
    acc3 = tl.zeros((BLOCK_C, BLOCK_KW, BLOCK_RW), tl.float32)
    acc_b2 = tl.zeros((BLOCK_C, BLOCK_RW), tl.float32)
    g_next, x_next = _dw_step_tiles(g_head, x_head, keep_ptr, rws, cols, col_ok, ks, k_ok, B, stride_g, stride_xb,
                                    NEED_W, HAS_KEEP)
    for r0 in range(BLOCK_RW, B + BLOCK_RW, BLOCK_RW):
        g = g_next
        x = x_next
        g_next, x_next = _dw_step_tiles(g_head, x_head, keep_ptr, r0 + rws, cols, col_ok, ks, k_ok, B, stride_g,
                                        stride_xb, NEED_W, HAS_KEEP)
        if NEED_B:
            acc_b2 += g
        if NEED_W:
            acc3 += g[:, None, :] * x[None, :, :]
    return tl.sum(acc3, axis=2), tl.sum(acc_b2, axis=1)


@triton.jit
def _upstream(up_ptr, SCALE_BY_UP: tl.constexpr):
    """The upstream gradient (fp32) where the launch scales by it, else 1."""
    if SCALE_BY_UP:
        return tl.load(up_ptr).to(tl.float32)
    else:
        return 1.0


@triton.jit
def _dz_times_w(g_rows, w_head, row_ok, cols, col_ok, ks, k_ok, stride_wc, acc, UPCAST_DOT: tl.constexpr,
                PRECISION: tl.constexpr):
    """acc + dz (rows, classes) @ W[head][classes, ks] (classes, BLOCK_K): cols are the class offsets of the
    tile (a head's classes, or a block of flattened (head, class) rows); padded ones contribute 0."""
    g = tl.load(g_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    w = tl.load(w_head + cols[:, None] * stride_wc + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    if UPCAST_DOT:
        g = g.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(g, w.to(g.dtype), acc, input_precision=PRECISION)
