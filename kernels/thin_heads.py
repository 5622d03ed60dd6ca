"""Device code: heads with a narrow input (K <= 256: MLP heads' second layer, or linear heads over a small
feature width) fused with the Hydra loss, the classes walked in tiles and each logits tile recomputed from
the input where it is needed.

With a narrow input a logit costs 2K flops but 2 to 4 bytes to store and as many to read back: the
unfused path writes the (B, M, C) logits, reads them (and the teacher) twice in the loss pass and
writes dz. Here one program owns BLOCK_B rows of one head:

  pass 1, per class tile:  z = u_m[rows] @ W_m[tile].T + b_m[tile]      (tl.dot, fp32 accumulator)
                           online softmax/KL statistics of (z / T, t / T) in base-2 units
                           (softmax_kl._online_kl_update: maxima of the raw logits)
          then             loss[b, m] = T^2 KL(p || q), the row's normalisers in registers;
  pass 2, per class tile (when the gradient is wanted): z again, then
                           dz = grad_scale * (q - p), q = 2^((z - m_s) k2 - log2 d_s) and p alike
                           (no select), written in the input dtype, and the tile's column sums of dz
                           over the program's rows, the bias gradient's part.

The logits never reach memory; the teacher is read once for the loss alone and twice with the
gradient (the same bytes as the loss kernel's long rows, minus the logits' write and reads). The
gradient GEMMs (dW = dz^T u, du = dz W) stay cuBLAS. (du formed in pass 2 from the weight tile already
loaded was tried: 1101 against 678 sm_90 instructions per bf16 tile at gpu-large, about 0.8 ms more
issue for a kernel bound by issue, where cuBLAS reading dz once costs about 0.5 ms.) Teacher values are
checked on the loads (error word bits 1, 2, 4, as in softmax_kl.py); "mean"/"sum" are reduced by the
last program (reduce.py). On a GPU the exponentials are ex2.approx.ftz (softmax_kl._exp2) and the teacher
tile is held in the accumulator's layout (_in_layout_of). sm_90 SASS at gpu-large bf16 (Triton 3.6, 4 warps,
see _common.thin_heads_config): 27.0 and 21.3 instructions per element in passes 1 and 2, from 48.9 and
36.3 with 8 warps before those two changes, the base-2 form and the column sums as a dot (_column_sums).
"""

import triton
import triton.language as tl

from .reduce import _last_program_sums
from .small_heads import _heads_logits_tile
from .softmax_kl import LOG2E, _exp2, _kl_from_sums, _online_kl_update, _tempered_scalars


@triton.jit
def _ahead(t_rows, rows_ok, bias_head, c0, C, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """What a class tile needs besides the GEMM (loaded a tile ahead by the caller with PREFETCH): the raw
    teacher logits of the tile at c0 (-inf outside the row) and the head's bias there (fp32; 0 without a
    bias). Nothing is read past C."""
    cols = c0 + tl.arange(0, BLOCK_C)
    t_raw = tl.load(t_rows + cols[None, :], mask=rows_ok[:, None] & (cols < C)[None, :], other=float("-inf"))
    if HAS_BIAS:
        return t_raw, tl.load(bias_head + cols, mask=cols < C, other=0.0).to(tl.float32)
    else:
        return t_raw, tl.zeros((BLOCK_C,), tl.float32)


@triton.jit
def _first_tiles(t_rows, rows_ok, bias_head, C, HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """What a class-tile loop carries in at its start: with PREFETCH the first tile's teacher logits and
    bias (``_ahead``), else placeholders."""
    if PREFETCH:
        return _ahead(t_rows, rows_ok, bias_head, 0, C, HAS_BIAS, BLOCK_C)
    else:
        return 0.0, 0.0


@triton.jit
def _next_tiles(t_next, b_next, t_rows, rows_ok, bias_head, c0, C, HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """(teacher logits, bias) of the tile at c0 and what the loop carries on: with PREFETCH the carried
    tile, and the next one's loads issued now; else the tile's own loads, the placeholders carried on."""
    if PREFETCH:
        t_after, b_after = _ahead(t_rows, rows_ok, bias_head, c0 + BLOCK_C, C, HAS_BIAS, BLOCK_C)
        return t_next, b_next, t_after, b_after
    else:
        t_raw, bias = _ahead(t_rows, rows_ok, bias_head, c0, C, HAS_BIAS, BLOCK_C)
        return t_raw, bias, t_next, b_next


@triton.jit
def _in_layout_of(x, like, PTX: tl.constexpr):
    """x (fp32), held in the register layout of ``like`` (the dot's accumulator) from here on: an inline
    PTX move that reads both, which ptxas removes. Without it Triton keeps the teacher tile in the layout
    of its load, reduces its row maxima and sums there, and converts the shifted tile and the live-class
    mask to the accumulator's layout for the cross term through shared memory, where one exponential is
    computed twice: sm_90 bf16 at gpu-large (Triton 3.6) 48.9 -> 40.4 instructions per element in pass 1
    with 8 warps, 30.5 with 4 (the teacher tile converted once, as 16-bit values, after its load). The
    interpreter runs no PTX: x as it is."""
    if PTX:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [x, like], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return x


@triton.jit
def _thin_heads_tile(t_next, b_next, x_rows, x_blk, w_head, t_rows, bias_head, rows_ok, c0, C, K, stride_wc,
                     HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
                     ONE_K_STEP: tl.constexpr, PTX: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """The class tile at c0, both passes' loop body: (what the loop carries on, as ``_next_tiles``; classes;
    student logits z (bias added); teacher logits t), z and t fp32 in the dot's accumulator layout,
    untempered; t is -inf outside the row (rows past B included), z is finite there (zero inputs and
    weights). With ONE_K_STEP (K <= BLOCK_K) x_blk holds the rows' inputs, loaded once per program: only
    the weight tile is read per class tile; else the inputs are read again in K steps."""
    t_raw, bias, t_next, b_next = _next_tiles(t_next, b_next, t_rows, rows_ok, bias_head, c0, C, HAS_BIAS, PREFETCH,
                                              BLOCK_C)
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    if ONE_K_STEP:
        ks = tl.arange(0, BLOCK_K)
        w = tl.load(w_head + cols[None, :] * stride_wc + ks[:, None], mask=(ks < K)[:, None] & col_ok[None, :],
                    other=0.0)
        if UPCAST_DOT:
            w = w.to(tl.float32)
        acc = tl.dot(x_blk, w.to(x_blk.dtype), input_precision=PRECISION)
    else:
        acc = _heads_logits_tile(x_rows, w_head, w_head, 0, rows_ok, cols, col_ok, K, stride_wc, 0, False,
                                 UPCAST_DOT, PRECISION, BLOCK_B, BLOCK_C, BLOCK_K)
    if HAS_BIAS:  # (without a bias no add: _ahead's zeros are a placeholder)
        acc += bias[None, :]
    return t_next, b_next, cols, acc, _in_layout_of(t_raw.to(tl.float32), acc, PTX)


@triton.jit
def _column_sums(g, g_out, UPCAST_DOT: tl.constexpr, BLOCK_B: tl.constexpr):
    """A dz tile's sums over its rows (fp32, (BLOCK_C,)). 16-bit dz: the stored values summed (as a sum of
    the gradient tensor would), by a tensor-core dot of a one-hot row with the tile, so that the sum over
    rows spread across the lanes of the accumulator's layout takes no butterfly shuffles (sm_90 SASS at
    gpu-large bf16: pass 2 22.0 -> 18.3 instructions per element when it was added). fp32 dz (a TF32 dot
    would round it): the fp32 values summed by tl.sum."""
    if g_out.dtype.primitive_bitwidth == 16:
        first = tl.where(tl.arange(0, 16)[:, None] == 0, 1.0, 0.0) + tl.zeros((16, BLOCK_B), tl.float32)
        if UPCAST_DOT:  # (interpreter)
            return tl.sum(tl.dot(first, g_out.to(tl.float32), input_precision="ieee"), axis=0)
        else:
            return tl.sum(tl.dot(first.to(g_out.dtype), g_out), axis=0)
    else:
        return tl.sum(g, axis=0)


# Forward: z[b, m] = u[b, m] @ W[m].T + bias[m] (never stored), loss[b, m] = T^2 KL(softmax(t/T) ||
# softmax(z/T)); gradient dloss/dz = T (q - p), written times grad_scale / T with its column sums over the
# program's rows. Grid (row blocks of BLOCK_B, heads); pass 1 folds the class tiles into online row
# statistics, pass 2 forms each tile again from them.
@triton.jit
def _thin_heads_kl_kernel(
    x_ptr,  # inputs: row b of head m at x_ptr + b * stride_xb + m * stride_xm (0: shared), unit stride along K
    w_ptr,  # weights (M, C, K): head stride stride_wm, class stride stride_wc, unit stride along K
    bias_ptr,  # bias (M, C), head stride stride_biasm, unit along C; unused unless HAS_BIAS
    t_ptr,  # teacher logits: row (b, m) at b * stride_tb + m * stride_tm, unit along C
    loss_ptr,  # out: fp32 loss rows, (b, m) at b * stride_lb + m * stride_lm, T^2 * KL
    g_ptr,  # out: dz = grad_scale * (q - p), row (b, m) at b * stride_gb + m * stride_gm, unit along C, input
    #         dtype; unused unless WRITE_GRAD
    colsum_ptr,  # out: fp32 (row blocks, M, C) contiguous, dz summed over each program's rows; unused unless
    #              WRITE_COLSUM
    part_ptr,  # out: one fp32 partial loss sum per program; unused unless REDUCE
    err_ptr,  # in/out: int32 error word, OR-ed with 1 (NaN), 2 (+inf), 4 (a row -inf everywhere)
    out_ptr,  # out: the reduced loss, fp32 scalar; unused unless REDUCE
    count_ptr,  # in/out: int32 count of finished programs, 0 before and after; unused unless REDUCE
    B,
    M,
    C,
    K,
    stride_xb,
    stride_xm,
    stride_wm,
    stride_wc,
    stride_biasm,
    stride_tb,
    stride_tm,
    stride_lb,
    stride_lm,
    stride_gb,
    stride_gm,
    inv_temp,  # 1 / T
    loss_scale,  # T^2
    grad_scale,  # T * reduction coefficient
    out_scale,  # reduction coefficient of the summed loss rows
    temp_ptr,  # a tensor temperature where T_PTR, as in softmax_kl._hydra_kl_fwd_kernel
    HAS_BIAS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    WRITE_COLSUM: tl.constexpr,
    REDUCE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter: tl.dot on 16-bit operands is unreliable there
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands ("ieee" or "tf32")
    BLOCK_B: tl.constexpr,  # rows per program (64: one warpgroup's wgmma rows on sm_90)
    BLOCK_C: tl.constexpr,  # classes per tile
    ONE_K_STEP: tl.constexpr,  # K <= BLOCK_K: the rows' inputs loaded once, one dot per class tile
    PTX: tl.constexpr,  # a GPU launch: inline PTX allowed (the exponentials, _in_layout_of); not interpreted
    EVEN_C: tl.constexpr,  # C is a multiple of BLOCK_C: no class past C in any tile
    PREFETCH: tl.constexpr,  # the teacher and bias tiles loaded one tile ahead
    BLOCK_K: tl.constexpr,  # K per dot step
    BLOCK_P: tl.constexpr,  # partial sums read per step by the reducing program
    T_PTR: tl.constexpr = False,
):
    inv_temp, loss_scale, grad_scale = _tempered_scalars(temp_ptr, inv_temp, loss_scale, grad_scale, T_PTR)
    pid_r = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rows_ok = rows < B
    x_rows = x_ptr + rows[:, None] * stride_xb + m * stride_xm
    w_head = w_ptr + m * stride_wm
    t_rows = t_ptr + rows[:, None] * stride_tb + m * stride_tm
    bias_head = bias_ptr + m * stride_biasm
    x_blk = x_ptr  # a placeholder unless ONE_K_STEP
    if ONE_K_STEP:
        ks = tl.arange(0, BLOCK_K)
        x_blk = tl.load(x_rows + ks[None, :], mask=rows_ok[:, None] & (ks < K)[None, :], other=0.0)
        if UPCAST_DOT:
            x_blk = x_blk.to(tl.float32)
    # Statistics in base-2 units: each exponential one ex2 of (x - max) k2, k2 = log2(e) / T.
    k2 = inv_temp * LOG2E
    zero = tl.zeros((BLOCK_B,), tl.float32)
    m_s, d_s, m_u, d_u, a = zero + float("-inf"), zero, zero + float("-inf"), zero, zero
    # With PREFETCH the teacher's and the bias's tiles are loaded one tile ahead (the weight tiles are
    # pipelined by the compiler, these loads were not: one or two programs per SM at these register
    # counts, so little else hides their latency).
    t_next, b_next = _first_tiles(t_rows, rows_ok, bias_head, C, HAS_BIAS, PREFETCH, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        t_next, b_next, cols, z, t = _thin_heads_tile(t_next, b_next, x_rows, x_blk, w_head, t_rows, bias_head,
                                                      rows_ok, c0, C, K, stride_wc, HAS_BIAS, UPCAST_DOT, PRECISION,
                                                      ONE_K_STEP, PTX, PREFETCH, BLOCK_B, BLOCK_C, BLOCK_K)
        if not EVEN_C:  # classes past C (t is -inf there already)
            z = tl.where((cols < C)[None, :], z, float("-inf"))
        m_s, d_s, m_u, d_u, a = _online_kl_update(z, t, m_s, d_s, m_u, d_u, a, k2, PTX)
    kl = _kl_from_sums(a, d_s, d_u, inv_temp) * loss_scale
    tl.store(loss_ptr + rows * stride_lb + m * stride_lm, kl, mask=rows_ok)
    if WRITE_GRAD:
        # dz = grad_scale (q - p), q = 2^((z - m_s) k2 - log2 d_s) (raw maxima: the difference before the
        # scaling, see _online_kl_update), p likewise: no select per element. A row whose teacher is -inf
        # everywhere (rows past B too) is measured from 0 with a log-sum of 0, so p = 2^-inf = 0 there, as
        # on the masked classes of any row; rows past B also get q = 0 (a maximum of +inf): their dz adds
        # nothing to the column sums.
        ref_s = tl.where(rows_ok, m_s, float("inf"))
        l_s = tl.log2(d_s)
        dead = m_u == float("-inf")
        ref_u = tl.where(dead, 0.0, m_u)
        l_u = tl.where(dead, 0.0, tl.log2(d_u))
        t_next, b_next = _first_tiles(t_rows, rows_ok, bias_head, C, HAS_BIAS, PREFETCH, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):
            t_next, b_next, cols, z, t = _thin_heads_tile(t_next, b_next, x_rows, x_blk, w_head, t_rows, bias_head,
                                                          rows_ok, c0, C, K, stride_wc, HAS_BIAS, UPCAST_DOT,
                                                          PRECISION, ONE_K_STEP, PTX, PREFETCH, BLOCK_B, BLOCK_C,
                                                          BLOCK_K)
            g = grad_scale * (_exp2((z - ref_s[:, None]) * k2 - l_s[:, None], PTX)
                              - _exp2((t - ref_u[:, None]) * k2 - l_u[:, None], PTX))
            g_out = g.to(g_ptr.dtype.element_ty)
            tl.store(g_ptr + rows[:, None] * stride_gb + m * stride_gm + cols[None, :], g_out,
                     mask=rows_ok[:, None] & (cols < C)[None, :])
            if WRITE_COLSUM:  # (columns past C hold garbage: not stored)
                tl.store(colsum_ptr + (pid_r * M + m).to(tl.int64) * C + cols,
                         _column_sums(g, g_out, UPCAST_DOT, BLOCK_B), mask=cols < C)
    # A NaN teacher logit makes its row's sum d_u NaN (exp(NaN)), as a +inf one does (inf - inf): no
    # per-element test in the tile loop; a +inf row reports +inf.
    bad = (tl.where((d_u != d_u) & (m_u != float("inf")), 1, 0) | tl.where(m_u == float("inf"), 2, 0)
           | tl.where(m_u == float("-inf"), 4, 0))
    bits = tl.max(tl.where(rows_ok, bad, 0), axis=0)
    tl.atomic_or(err_ptr, bits, mask=bits != 0)
    if REDUCE:
        tl.store(part_ptr + pid_r * tl.num_programs(1) + m, tl.sum(tl.where(rows_ok, kl, 0.0), axis=0))
        _last_program_sums(part_ptr, tl.num_programs(0) * tl.num_programs(1), out_ptr, count_ptr, out_scale, BLOCK_P)
