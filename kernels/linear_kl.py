"""Device code: M head GEMMs fused with the tempered softmax + per-head KL.

Forward formula, per row b and head m (x_b the row's input for head m: shared x, or the head's own
hidden activations for MLP heads):
    z[b, m, :] = x_b @ W[m].T + bias[m],   loss[b, m] = T^2 * KL(softmax(t[b, m] / T) || softmax(z[b, m] / T))
Gradient: dloss/dz = T * (q - p); the launcher turns the stashed dz into dx = dz @ W and
dW += dz^T @ x with the grouped GEMM kernel.
Each (BLOCK_B x BLOCK_C) logits tile is produced by tl.dot over K tiles and folded into the online
softmax/KL statistics straight from registers. With WRITE_GRAD the tile is also stashed, rounded to
the gradient dtype (so the statistics see exactly the logits an eager run would see), and pass 2
rewrites each stashed tile in place as the gradient: the GEMM runs once, not twice.
"""

import triton
import triton.language as tl

from .softmax_kl import _kl_grad_tile, _online_kl_update


@triton.jit
def _heads_logits_tile(x_rows, w_head, bias_ptr, head, rows_ok, cols, col_ok, K, stride_wc, stride_biasm,
                       HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_B, BLOCK_C) tile of head logits in fp32: x_rows @ W[head, cols].T + bias[head, cols].

    x_rows: pointers to the rows' inputs (BLOCK_B, 1), unit stride along K; w_head: W[head] (C, K).
    """
    ks0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + ks0
        k_ok = ks < K
        xt = tl.load(x_rows + ks[None, :], mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_head + cols[None, :] * stride_wc + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_DOT:  # interpreter: tl.dot on 16-bit operands is unreliable there
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt.to(xt.dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + head * stride_biasm + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _linear_hydra_kl_fwd_kernel(
    x_ptr,  # inputs: row b of head m starts at x_ptr + b * stride_xb + m * stride_xm, unit stride along K
    w_ptr,  # weights (M, C, K): head stride stride_wm, class stride stride_wc, unit stride along K
    bias_ptr,  # bias (M, C), head stride stride_biasm, unit stride along C; unused unless HAS_BIAS
    t_ptr,  # teacher logits (B, M, C): strides stride_tb, stride_tm, unit along C
    loss_ptr,  # out: (B, M) fp32 contiguous, T^2 * KL
    g_ptr,  # out: (B, M, C) stash / gradient in the input dtype, strides stride_gb, stride_gm, unit along C
    tstat_ptr,  # out: (B, M) fp32 teacher row status: max(t)/T, +inf if a +inf, NaN if a NaN (the value check)
    B,
    C,
    K,
    stride_xb,
    stride_xm,
    stride_wm,
    stride_wc,
    stride_biasm,
    stride_tb,
    stride_tm,
    stride_gb,
    stride_gm,
    inv_temp,  # 1 / T
    loss_scale,  # T^2
    grad_scale,  # T * reduction coefficient
    HAS_BIAS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter: tl.dot on 16-bit operands is unreliable there
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands ("ieee" or "tf32")
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    cols0 = tl.arange(0, BLOCK_C)
    x_rows = x_ptr + head * stride_xm + rows[:, None] * stride_xb
    w_head = w_ptr + head * stride_wm
    t_rows = t_ptr + rows[:, None] * stride_tb + head * stride_tm
    g_rows = g_ptr + rows[:, None] * stride_gb + head * stride_gm

    m_s = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    m_u = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    d_s = tl.zeros((BLOCK_B,), tl.float32)
    d_u = tl.zeros((BLOCK_B,), tl.float32)
    a = tl.zeros((BLOCK_B,), tl.float32)
    n_nan = tl.zeros((BLOCK_B,), tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        col_ok = cols < C
        acc = _heads_logits_tile(x_rows, w_head, bias_ptr, head, row_ok, cols, col_ok, K, stride_wc, stride_biasm,
                                 HAS_BIAS, UPCAST_DOT, PRECISION, BLOCK_B, BLOCK_C, BLOCK_K)
        mask = row_ok[:, None] & col_ok[None, :]
        if WRITE_GRAD:
            # Round to the stash dtype first: stats and gradient then see the same logits.
            z_low = acc.to(g_ptr.dtype.element_ty)
            tl.store(g_rows + cols[None, :], z_low, mask=mask)
            acc = z_low.to(tl.float32)
        s = tl.where(mask, acc * inv_temp, float("-inf"))
        t = tl.load(t_rows + cols[None, :], mask=mask, other=float("-inf"))
        u = t.to(tl.float32) * inv_temp
        n_nan += tl.sum((u != u).to(tl.int32), axis=1)  # the NaN check rides on the load already made
        m_s, d_s, m_u, d_u, a = _online_kl_update(s, u, m_s, d_s, m_u, d_u, a)
    tl.store(tstat_ptr + rows * tl.num_programs(1) + head, tl.where(n_nan > 0, float("nan"), m_u), mask=row_ok)

    log_d_s = tl.log(d_s)
    log_d_u = tl.log(d_u)
    kl = a / d_u - log_d_u + log_d_s
    tl.store(loss_ptr + rows * tl.num_programs(1) + head, kl * loss_scale, mask=row_ok)

    if WRITE_GRAD:
        # Pass-1 stores left the MMA layout; pass 2 loads in a blocked one: make them visible CTA-wide.
        tl.debug_barrier()
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            mask = row_ok[:, None] & (cols < C)[None, :]
            # Each program reads back only the tiles it wrote itself: no cross-program race.
            z = tl.load(g_rows + cols[None, :], mask=mask, other=float("-inf"))
            t = tl.load(t_rows + cols[None, :], mask=mask, other=float("-inf"))
            g = _kl_grad_tile(z.to(tl.float32) * inv_temp, t.to(tl.float32) * inv_temp,
                              m_s, log_d_s, m_u, log_d_u, grad_scale)
            tl.store(g_rows + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)


# Split-C statistics, for large C (M*C far beyond what one program should walk): program (row block,
# head, split) runs the heads GEMM over its own range of classes only and writes its partial online
# statistics (m_s, d_s, m_u, d_u, a as in softmax_kl.py, and a NaN count). The host merges the splits
# (a log-sum-exp merge over a (S, B, M) tensor), which gives the loss, both log-normalisers and the
# teacher check. Gradient: _linear_hydra_kl_grad_kernel below, one class block at a time.
@triton.jit
def _linear_hydra_kl_stats_kernel(
    x_ptr,  # inputs, as in _linear_hydra_kl_fwd_kernel
    w_ptr,  # weights (M, C, K)
    bias_ptr,  # bias (M, C); unused unless HAS_BIAS
    t_ptr,  # teacher logits (B, M, C)
    stats_ptr,  # out: (6, S, B, M) fp32 partial statistics m_s, d_s, m_u, d_u, a, NaN count
    B,
    C,
    K,
    cols_per_split,  # a multiple of BLOCK_C
    stride_xb,
    stride_xm,
    stride_wm,
    stride_wc,
    stride_biasm,
    stride_tb,
    stride_tm,
    inv_temp,  # 1 / T
    HAS_BIAS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    n_heads = tl.num_programs(1)
    n_splits = tl.num_programs(2)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    cols0 = tl.arange(0, BLOCK_C)
    x_rows = x_ptr + head * stride_xm + rows[:, None] * stride_xb
    w_head = w_ptr + head * stride_wm
    t_rows = t_ptr + rows[:, None] * stride_tb + head * stride_tm
    c_start = split * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, C)

    m_s = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    m_u = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    d_s = tl.zeros((BLOCK_B,), tl.float32)
    d_u = tl.zeros((BLOCK_B,), tl.float32)
    a = tl.zeros((BLOCK_B,), tl.float32)
    n_nan = tl.zeros((BLOCK_B,), tl.int32)
    for c0 in range(c_start, c_end, BLOCK_C):
        cols = c0 + cols0
        col_ok = cols < c_end
        acc = _heads_logits_tile(x_rows, w_head, bias_ptr, head, row_ok, cols, col_ok, K, stride_wc, stride_biasm,
                                 HAS_BIAS, UPCAST_DOT, PRECISION, BLOCK_B, BLOCK_C, BLOCK_K)
        mask = row_ok[:, None] & col_ok[None, :]
        s = tl.where(mask, acc * inv_temp, float("-inf"))
        t = tl.load(t_rows + cols[None, :], mask=mask, other=float("-inf"))
        u = t.to(tl.float32) * inv_temp
        n_nan += tl.sum((u != u).to(tl.int32), axis=1)
        m_s, d_s, m_u, d_u, a = _online_kl_update(s, u, m_s, d_s, m_u, d_u, a)

    plane = n_splits * B * n_heads
    out = stats_ptr + split * B * n_heads + rows * n_heads + head
    tl.store(out, m_s, mask=row_ok)
    tl.store(out + plane, d_s, mask=row_ok)
    tl.store(out + 2 * plane, m_u, mask=row_ok)
    tl.store(out + 3 * plane, d_u, mask=row_ok)
    tl.store(out + 4 * plane, a, mask=row_ok)
    tl.store(out + 5 * plane, n_nan.to(tl.float32), mask=row_ok)


# Gradient of one class block: every program owns one (BLOCK_B x BLOCK_C) logits tile of one head,
# recomputes it with the heads GEMM and writes grad_scale * (q - p) with the merged log-normalisers.
# A 3-D grid (row blocks, class tiles, heads) keeps every SM busy however small B is.
@triton.jit
def _linear_hydra_kl_grad_kernel(
    x_ptr,  # inputs, as above
    w_ptr,  # weights (M, C, K)
    bias_ptr,  # bias (M, C); unused unless HAS_BIAS
    t_ptr,  # teacher logits (B, M, C)
    lse_s_ptr,  # (B, M) fp32 student log-normaliser of s = z / T
    lse_u_ptr,  # (B, M) fp32 teacher log-normaliser of u = t / T
    g_ptr,  # out: (B, M, block) gradient block in the input dtype, strides stride_gb, stride_gm, unit
    B,
    K,
    c_begin,  # first class of the block
    c_stop,  # one past its last class
    stride_xb,
    stride_xm,
    stride_wm,
    stride_wc,
    stride_biasm,
    stride_tb,
    stride_tm,
    stride_gb,
    stride_gm,
    inv_temp,
    grad_scale,
    HAS_BIAS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2).to(tl.int64)
    n_heads = tl.num_programs(2)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    local = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cols = c_begin + local
    col_ok = cols < c_stop
    x_rows = x_ptr + head * stride_xm + rows[:, None] * stride_xb
    w_head = w_ptr + head * stride_wm
    acc = _heads_logits_tile(x_rows, w_head, bias_ptr, head, row_ok, cols, col_ok, K, stride_wc, stride_biasm,
                             HAS_BIAS, UPCAST_DOT, PRECISION, BLOCK_B, BLOCK_C, BLOCK_K)
    mask = row_ok[:, None] & col_ok[None, :]
    lse_s = tl.load(lse_s_ptr + rows * n_heads + head, mask=row_ok, other=0.0)
    lse_u = tl.load(lse_u_ptr + rows * n_heads + head, mask=row_ok, other=0.0)
    t = tl.load(t_ptr + rows[:, None] * stride_tb + head * stride_tm + cols[None, :], mask=mask, other=float("-inf"))
    u = t.to(tl.float32) * inv_temp
    q = tl.exp(acc * inv_temp - lse_s[:, None])
    p = tl.where(u > float("-inf"), tl.exp(u - lse_u[:, None]), 0.0)
    g = grad_scale * (q - p)
    tl.store(g_ptr + rows[:, None] * stride_gb + head * stride_gm + local[None, :], g.to(g_ptr.dtype.element_ty),
             mask=mask)
