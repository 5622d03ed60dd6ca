"""Device code: M Gaussian regression heads fused with the per-head Gaussian KL.

Forward formula, per row b, head m and output k (x_b shared by all heads):
    mu = x_b @ W[m, k].T + bias[m, k],  r = x_b @ W[m, K + k].T + bias[m, K + k],  var = softplus(r) + min_var
    loss[b, m] = sum_k KL(N(mu_t, var_t) || N(mu, var))
               = 0.5 * sum_k (log(var / var_t) + (var_t + (mu_t - mu)^2) / var - 1)
Gradient: dloss/dmu = (mu - mu_t) / var;  dloss/dr = 0.5 * (1 / var - (var_t + (mu_t - mu)^2) / var^2) * sigmoid(r).
Both are written (times grad_scale) into the (B, M, 2K) stash; the small-step gradient kernel
(small_heads.py, from the backward where the batch allows) or GEMMs contract it into dx, dW and db.
The last program to finish sums the programs' partial losses (as the small-step kernel does). The teacher
is checked on the loads already made: a variance that is not finite and > 0 sets bit 8 of the error word, a
mean that is not finite bit 16.
"""

import triton
import triton.language as tl

from .reduce import _last_program_sums


@triton.jit
def _gaussian_heads_kl_fwd_kernel(
    x_ptr,  # inputs (B, D), row stride stride_xb, unit stride along D
    w_ptr,  # weights (M, 2K, D) contiguous: rows 0..K-1 give the means, K..2K-1 the raw variances
    bias_ptr,  # bias (M, 2K) contiguous; unused unless HAS_BIAS
    tmean_ptr,  # teacher means (B, M, K) contiguous
    tvar_ptr,  # teacher variances (B, M, K) contiguous, > 0
    loss_ptr,  # out: (B, M) fp32, sum_k KL
    part_ptr,  # out: (row blocks, M) fp32, each program's sum of its loss rows
    g_ptr,  # out: (B, M, 2K) gradient w.r.t. (mu, r), in the input dtype; unused unless WRITE_GRAD
    err_ptr,  # in/out: int32 error word, OR-ed with 8 (a bad teacher variance) and 16 (a bad teacher mean)
    out_ptr,  # out: the reduced loss, fp32 scalar (the last program sums the partials)
    count_ptr,  # in/out: int32 count of finished programs, 0 before and after the launch
    B,
    K,
    D,
    stride_xb,
    min_var,  # variance floor added after the softplus
    grad_scale,  # reduction coefficient (1/(B*M*K) for "mean", 1 for "sum"), of the loss too
    HAS_BIAS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter: tl.dot on 16-bit operands is unreliable there
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,  # outputs, padded to >= 16 for tl.dot
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,  # partial sums read per step by the reducing program
):
    pid_b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    n_heads = tl.num_programs(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    outs = tl.arange(0, BLOCK_K)
    out_ok = outs < K
    ds0 = tl.arange(0, BLOCK_D)
    w_head = w_ptr + head * (2 * K * D)

    acc_mu = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
    acc_r = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + ds0
        d_ok = ds < D
        xt = tl.load(x_ptr + rows[:, None] * stride_xb + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        wm = tl.load(w_head + outs[None, :] * D + ds[:, None], mask=d_ok[:, None] & out_ok[None, :], other=0.0)
        wr = tl.load(w_head + (K + outs[None, :]) * D + ds[:, None], mask=d_ok[:, None] & out_ok[None, :], other=0.0)
        if UPCAST_DOT:
            xt = xt.to(tl.float32)
            wm = wm.to(tl.float32)
            wr = wr.to(tl.float32)
        acc_mu = tl.dot(xt, wm.to(xt.dtype), acc_mu, input_precision=PRECISION)
        acc_r = tl.dot(xt, wr.to(xt.dtype), acc_r, input_precision=PRECISION)
    if HAS_BIAS:
        acc_mu += tl.load(bias_ptr + head * 2 * K + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        acc_r += tl.load(bias_ptr + head * 2 * K + K + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]

    mask = row_ok[:, None] & out_ok[None, :]
    t_off = rows[:, None] * (n_heads * K) + head * K + outs[None, :]
    mu_t = tl.load(tmean_ptr + t_off, mask=mask, other=0.0).to(tl.float32)
    var_t = tl.load(tvar_ptr + t_off, mask=mask, other=1.0).to(tl.float32)
    # softplus(r) = max(r, 0) + log(1 + exp(-|r|)), stable for any r
    var = tl.maximum(acc_r, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(acc_r))) + min_var
    diff = mu_t - acc_mu
    ratio = (var_t + diff * diff) / var
    kl = 0.5 * (tl.log(var / var_t) + ratio - 1.0)
    kl = tl.where(mask, kl, 0.0)
    row_kl = tl.sum(kl, axis=1)
    tl.store(loss_ptr + rows * n_heads + head, row_kl, mask=row_ok)
    # (the tile summed whole, not its row sums: Triton 3.6 fails to compile a scalar sum of the rows for
    # sm_100, whose accumulator lives in tensor memory there; kl is already 0 past B)
    tl.store(part_ptr + pid_b * n_heads + head, tl.sum(kl))
    bad_var = mask & ~((var_t > 0.0) & (var_t < float("inf")))  # NaN fails both comparisons
    bad_mean = mask & ~(tl.abs(mu_t) < float("inf"))
    bits = tl.max(tl.max(tl.where(bad_var, 8, 0) | tl.where(bad_mean, 16, 0), axis=1), axis=0)
    tl.atomic_or(err_ptr, bits, mask=bits != 0)

    if WRITE_GRAD:
        g_mu = grad_scale * (-diff) / var
        sig = 1.0 / (1.0 + tl.exp(-acc_r))
        g_r = grad_scale * 0.5 * (1.0 - ratio) / var * sig
        g_off = rows[:, None] * (n_heads * 2 * K) + head * 2 * K + outs[None, :]
        tl.store(g_ptr + g_off, g_mu.to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(g_ptr + g_off + K, g_r.to(g_ptr.dtype.element_ty), mask=mask)
    _last_program_sums(part_ptr, tl.num_programs(0) * n_heads, out_ptr, count_ptr, grad_scale, BLOCK_P)
