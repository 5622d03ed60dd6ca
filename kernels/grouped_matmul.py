"""Device code: a grouped (batched) GEMM over strided 3-D views, with the epilogues the heads need.

Forward formula, for every group g (a head, or a single group for the stacked (M*C, D) weight):
    out[g] = act(a[g] @ b[g] + bias[g])          act: identity or relu
    out[g] += a[g] @ b[g]                        with ACCUMULATE (fp32 out: weight-gradient sums over chunks)
Gradient of out = act(a @ b + bias): with dy = dout * act'(.), da = dy @ b^T and db = a^T @ dy; the
host computes both with this same kernel. All operand layouts are plain strides, so the transposes
of the backward pass cost nothing.
"""

import triton
import triton.language as tl


@triton.jit
def _grouped_matmul_kernel(
    a_ptr,  # (G, M, K) operand, strides stride_ag, stride_am, stride_ak
    b_ptr,  # (G, K, N) operand, strides stride_bg, stride_bk, stride_bn
    out_ptr,  # (G, M, N) result, strides stride_og, stride_om, stride_on (fp32 when ACCUMULATE)
    bias_ptr,  # (G, N) bias, group stride stride_biasg, unit stride along N; unused unless HAS_BIAS
    M,
    N,
    K,
    stride_ag,
    stride_am,
    stride_ak,
    stride_bg,
    stride_bk,
    stride_bn,
    stride_og,
    stride_om,
    stride_on,
    stride_biasg,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter: tl.dot on 16-bit operands is unreliable there
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands ("ieee" or "tf32")
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # tiles of BLOCK_M rows walked together so B tiles stay in L2
):
    pid = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = (first_m + (pid % width) % size_m).to(tl.int64)
    pid_n = ((pid % width) // size_m).to(tl.int64)

    # 64-bit scalar bases; 32-bit offsets inside a tile (a tile spans at most BLOCK * stride elements).
    a_base = a_ptr + group * stride_ag + (pid_m * BLOCK_M) * stride_am
    b_base = b_ptr + group * stride_bg + (pid_n * BLOCK_N) * stride_bn
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M - pid_m * BLOCK_M
    n_ok = rn < N - pid_n * BLOCK_N
    a_ptrs = a_base + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_base + rk[:, None] * stride_bk + rn[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        at = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST_DOT:
            at = at.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(at, bt.to(at.dtype), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + group * stride_biasg + pid_n * BLOCK_N + rn, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    out_base = out_ptr + group * stride_og + (pid_m * BLOCK_M) * stride_om + (pid_n * BLOCK_N) * stride_on
    out_ptrs = out_base + rm[:, None] * stride_om + rn[None, :] * stride_on
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
