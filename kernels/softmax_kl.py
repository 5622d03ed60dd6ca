"""Device code: the online tempered softmax + KL shared by the loss kernels, and the loss kernel on given logits.

Per row r (one (batch, head) pair), with student logits z and teacher logits t:
    p = softmax(t / T), q = softmax(z / T), loss_r = T^2 * KL(p || q) = T^2 * sum_c p_c (log p_c - log q_c)
    dloss_r / dz_c = T * (q_c - p_c)
The row is read in C tiles. Pass 1 keeps, per row, the running maxima m_s, m_u of the raw logits, the
running sums d_s = sum exp((z - m_s) / T), d_u = sum exp((t - m_u) / T) and
a = sum exp((t - m_u) / T) * ((t - m_u) - (z - m_s)) * A_SCALE, rescaled whenever a maximum moves; then
KL = (a / d_u) * (1 / (A_SCALE T)) + log(d_s / d_u) (_kl_from_sums). Every term takes the difference of raw
logits first and scales it by 1 / T after: exact at the maximum (a one-class row gives 0 however the compiler
contracts a product into the subtraction that follows it), and |z| up to 1e4 loses nothing to cancellation.
Pass 2 (only when a gradient is wanted) reads the tiles again and writes T * (q - p) * scale.
A teacher logit of -inf masks its class: p_c = 0 and the class adds nothing to the loss, nor does a finite logit
whose p_c underflows to 0 (torch.finfo(dtype).min, a masked_fill's mask), whatever the student's logit there.
`a` is kept in raw-logit units times A_SCALE = 2^-24 (exact: a power of two). The sum is up to d_u (up to C)
times the largest difference, so a student at torch.finfo's min on classes the teacher keeps (differences near
3.4e38) overflowed it to inf where eager's loss is a finite 1e37 (until the forty-fourth session; in base-2 units,
times log2(e) / T, one such class did at T < 1.44); a / d_u, a mean of the differences, cannot.
"""

import triton
import triton.language as tl

from .reduce import _kept_mean_factor, _last_program_sums

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# `a`'s unit (module docstring): its terms times 2^-24, for any C below 2^24 classes.
A_SCALE = tl.constexpr(5.9604644775390625e-08)
A_UNIT = tl.constexpr(16777216.0)


@triton.jit
def _device_temperature(temp_ptr):
    """A temperature given as a tensor, read from device memory (fp32 or fp64, used in fp32): (T, 1.0) where it
    lies in [2^-64, 2^63] (the range a number is checked against on the host), else (1.0, NaN)."""
    t = tl.load(temp_ptr).to(tl.float32)
    ok = (t >= 5.421010862427522e-20) & (t <= 9.223372036854775808e18)
    return tl.where(ok, t, 1.0), tl.where(ok, 1.0, float("nan"))


@triton.jit
def _tempered_scalars(temp_ptr, inv_temp, loss_scale, grad_scale, T_PTR: tl.constexpr,
                      NAN_INV: tl.constexpr = False):
    """A launch's (1 / T, loss scale, gradient scale). A number T was folded into them by the launcher
    (returned as they came); a tensor T (T_PTR: the launcher passed 1, 1 and the reduction coefficient) is
    read here and applied: 1 / T, times T^2, times T. A tensor T out of range makes the loss and gradient
    scales NaN (so the loss and gradients are NaN: nothing passes as a number) and leaves 1 / T finite, so the
    teacher checks see the teacher's own values (NaN in 1 / T would read as a NaN teacher); NAN_INV: 1 / T
    NaN too (kernels whose outputs carry no such scale)."""
    if T_PTR:
        t, nan_if_bad = _device_temperature(temp_ptr)
        if NAN_INV:
            inv_temp = inv_temp * nan_if_bad
        return inv_temp / t, loss_scale * t * t * nan_if_bad, grad_scale * t * nan_if_bad
    else:
        return inv_temp, loss_scale, grad_scale


@triton.jit
def _launch_scales(temp_ptr, inv_temp, loss_scale, grad_scale, out_scale, nkept_ptr, batch_rows, T_PTR: tl.constexpr,
                   MEAN_KEPT: tl.constexpr):
    """The loss kernels' (1 / T, loss scale, gradient scale, scale of the summed loss rows): `_tempered_scalars`,
    the last two times "mean" over the kept rows' factor B / kept rows where MEAN_KEPT (`_kept_mean_factor`)."""
    inv_temp, loss_scale, grad_scale = _tempered_scalars(temp_ptr, inv_temp, loss_scale, grad_scale, T_PTR)
    kept_mean = _kept_mean_factor(nkept_ptr, batch_rows, MEAN_KEPT)
    return inv_temp, loss_scale, grad_scale * kept_mean, out_scale * kept_mean


@triton.jit
def _row_block(R, R_INNER, BLOCK_R: tl.constexpr):
    """This program's BLOCK_R rows (int64; program axis 0), which of them are below R, and each one's outer and
    inner index: the rows are (R // R_INNER, R_INNER), each tensor giving its own two strides."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    return rows, rows < R, rows // R_INNER, rows % R_INNER


@triton.jit
def _exp2_kept(x, EXACT: tl.constexpr = True):
    """2^x in fp32 for x <= 0, results below 2^-126 kept subnormal on a GPU too. Triton lowers tl.exp2 through
    libdevice built with flush-to-zero reflected on (ex2.approx.ftz.f32 in the PTX of Triton 3.6 and 3.8), so a
    teacher probability of 1e-40 came out 0 on the chip (the interpreter, NumPy's exp2, keeps it). Where the student
    lies at torch.finfo's min on that class, p times the KL's difference there (about 3.4e38 / T) is a term of the
    loss of order T, and of the teacher's gradient. 2^(x / 2) squared: x / 2 is exact and normal down to -252, and
    the square (a plain multiply, which keeps subnormals) rounds once.
    - EXACT (fp32 rows held whole or in row tiles, the small step): the square only below -126, tl.exp2 itself
      elsewhere, to the digit.
    - else (16-bit inputs, and every per-thread walk of long rows): the square everywhere, which doubles the
      chip's approximation error (about 2 fp32 ulp); 201 sm_90 instructions a tile in the loss kernel's pass 1 at
      (4096, 8, 32000) bf16 where tl.exp2 takes 187 (8 pairs a thread). The exact form's predicates, live across
      the exponential, spilled: 104 to 120 bytes in a 16-bit row of 16384 held in registers (Triton 3.6), 8 bytes
      inside the loop of fp32 walks in 2048-class tiles (sm_90, Triton 3.8).
    An offset form, 2^(x + 64) 2^-64, cost one multiply but rounded x + 64 to float32's steps near 64 (7.6e-6):
    2.6e-6 of p near 1. The teacher's side only: its probabilities multiply those differences; the student's
    exponentials only enter sums of at least 1 and q - p."""
    if EXACT:
        low = x < -126.0
        e = tl.exp2(tl.where(low, x * 0.5, x))
        return tl.where(low, e * e, e)
    else:
        e = tl.exp2(x * 0.5)
        return e * e


@triton.jit
def _online_kl_update(x, y, m_s, d_s, m_u, d_u, a, c, EXACT: tl.constexpr = True):
    """Folds one (ROWS, BLOCK_C) tile of raw logits into the per-row statistics (all fp32), in base 2.

    x, y: student and teacher logits (bias added), -inf on lanes outside the row; c = log2(e) / T.
    m_s, d_s, m_u, d_u, a: (ROWS,) running statistics described in the module docstring, the maxima of the
    raw logits. Each exponential is 2^((x - max) c): the difference taken before the scaling (exact near the
    maximum, where the probabilities that matter are: scaling first rounds each x / T to the ulp of its size,
    an error a probability near 1 then carries into q - p, and a compiler that contracts the product into
    the subtraction keeps it even at the maximum), one multiply per exponential. ``a`` comes out as raw-logit
    differences times A_SCALE (_kl_from_sums turns it into nats), the sums d_s, d_u as in nats. EXACT: the
    teacher's exponentials' form (_exp2_kept).
    """
    new_m_s = tl.maximum(m_s, tl.max(x, axis=1))
    new_m_u = tl.maximum(m_u, tl.max(y, axis=1))
    # A row whose tiles so far were all masked keeps a -inf maximum; shift by 0 then (2^-inf = 0).
    ref_s = tl.where(new_m_s == float("-inf"), 0.0, new_m_s)
    ref_u = tl.where(new_m_u == float("-inf"), 0.0, new_m_u)
    # Old terms of `a` were measured against the old maxima: move them to the new ones.
    shift = ((ref_u - m_u) - (ref_s - m_s)) * A_SCALE
    scale_s = tl.exp2((m_s - ref_s) * c)
    scale_u = _exp2_kept((m_u - ref_u) * c)  # (times `a`, which may hold such a term: kept as e_u below)
    # The differences from the maxima in A_SCALE units, x A_SCALE - ref A_SCALE: one FMA each, the same value as
    # (x - ref) A_SCALE (a power of two scales exactly), so `a`'s terms cost no multiply more than unscaled ones;
    # times c A_UNIT they are the exponents (x - ref) c again.
    cu = c * A_UNIT
    r_s = x * A_SCALE - (ref_s * A_SCALE)[:, None]
    r_u = y * A_SCALE - (ref_u * A_SCALE)[:, None]
    sh_s = r_s * cu
    # (scale_u == 0: nothing kept so far, or a maximum so far below the new one that its terms vanish; d_u * shift
    # may overflow there, where 0 * inf would be NaN)
    a = tl.where(scale_u == 0, 0.0, scale_u * (a - d_u * shift))
    e_u = _exp2_kept(r_u * cu, EXACT)  # (subnormal kept: a term of `a` where the student lies at finfo's min)
    # a class adds to `a` where its teacher probability is not 0: a -inf logit, or a finite one whose exponent
    # underflows (torch.finfo(dtype).min, a masked_fill's mask, overflows to -inf when scaled), adds 0, however
    # the student's logit there compares
    a += tl.sum(tl.where(e_u > 0, e_u * (r_u - r_s), 0.0), axis=1)
    d_s = d_s * scale_s + tl.sum(tl.exp2(sh_s), axis=1)
    d_u = d_u * scale_u + tl.sum(e_u, axis=1)
    return new_m_s, d_s, new_m_u, d_u, a


@triton.jit
def _thread_slices(BLOCK_C: tl.constexpr, VEC: tl.constexpr, SPREAD: tl.constexpr = False):
    """Class offsets of a tile as (1, THREADS, VEC), each thread's VEC classes on the last axis so that
    reductions over it stay inside the thread: VEC contiguous classes, one 16-byte load, where Triton can prove
    the rows 16-byte aligned; SPREAD (rows it cannot: C or a row stride not a multiple of 16, a pointer off 16
    bytes) VEC classes THREADS apart, so that a load of one class per thread is coalesced across the lanes
    instead. Contiguous classes that do not vectorise were laid one per lane, and each tile's sums over VEC took
    shuffles (sm_90 SASS at C = 50257 bf16: 120 shuffles and 639 instructions a tile in the loss kernel's pass 1,
    242 with SPREAD, 187 for aligned rows)."""
    if SPREAD:
        return (tl.arange(0, BLOCK_C // VEC)[:, None] + tl.arange(0, VEC)[None, :] * (BLOCK_C // VEC))[None, :, :]
    else:
        return (tl.arange(0, BLOCK_C // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :])[None, :, :]


@triton.jit
def _thread_max(x, m, c2):
    """Per-thread running max m (ROWS, THREADS) after one (ROWS, THREADS, VEC) tile x of raw logits: the
    new max, the -inf-safe reference the tile's terms are measured from, and the rescale
    2^((m - ref) c2) of the sums kept so far (c2 = log2(e) / T)."""
    new_m = tl.maximum(m, tl.max(x, axis=2))
    ref = tl.where(new_m == float("-inf"), 0.0, new_m)
    return new_m, ref, _exp2_kept((m - ref) * c2)  # (once a thread and tile: the teacher's rescales `a`)


@triton.jit
def _thread_merge(m, c2):
    """Merging per-thread statistics (ROWS, THREADS) once per row: the row max, its -inf-safe reference
    (ROWS, 1), and each thread's weight 2^((m - ref) c2)."""
    row_m = tl.max(m, axis=1)
    ref = tl.where(row_m == float("-inf"), 0.0, row_m)[:, None]
    return row_m, ref, _exp2_kept((m - ref) * c2)


@triton.jit
def _thread_kl_update(x, y, mx, dx, my, dy, a, c2):
    """Folds one (ROWS, THREADS, VEC) tile of raw student and teacher logits (-inf outside the row) into
    per-thread statistics (ROWS, THREADS): maxima mx, my of the raw logits, sums dx = sum 2^((x - mx) c2)
    and dy likewise (c2 = log2(e) / T), and a = sum 2^((y - my) c2) ((y - my) - (x - mx)) A_SCALE in raw-logit
    units, rescaled when a maximum moves. Every reduction runs over VEC, inside the thread."""
    new_mx, ref_x, scale_x = _thread_max(x, mx, c2)
    new_my, ref_y, scale_y = _thread_max(y, my, c2)
    # (the zero probabilities as in _online_kl_update: selected on the exponentials, not on -inf logits)
    a = tl.where(scale_y == 0, 0.0, scale_y * (a - dy * (((ref_y - my) - (ref_x - mx)) * A_SCALE)))
    # (the differences in A_SCALE units, one FMA each: see _online_kl_update)
    c2u = c2 * A_UNIT
    sx = x * A_SCALE - (ref_x * A_SCALE)[:, :, None]
    sy = y * A_SCALE - (ref_y * A_SCALE)[:, :, None]
    ey = _exp2_kept(sy * c2u, False)  # (_exp2_kept's square everywhere: the exact form spilled on these walks)
    a += tl.sum(tl.where(ey > 0, ey * (sy - sx), 0.0), axis=2)
    dx = dx * scale_x + tl.sum(tl.exp2(sx * c2u), axis=2)
    dy = dy * scale_y + tl.sum(ey, axis=2)
    return new_mx, dx, new_my, dy, a


@triton.jit
def _thread_kl_combine(mx, dx, my, dy, a, c2):
    """The per-row statistics (ROWS,) from per-thread ones: every thread's sums moved to the row's maxima
    (raw-logit units, as _thread_kl_update). A thread that saw nothing live (d == 0), or whose maximum is so far
    below the row's that its weight is 0 (its d * shift may overflow), adds nothing; a NaN sum passes its NaN
    on."""
    row_mx, ref_x, wx = _thread_merge(mx, c2)
    row_my, ref_y, wy = _thread_merge(my, c2)
    a_row = tl.sum(tl.where(wy == 0, 0.0, wy * (a - dy * (((ref_y - my) - (ref_x - mx)) * A_SCALE))), axis=1)
    dx_row = tl.sum(tl.where(dx == 0, 0.0, wx * dx), axis=1)
    dy_row = tl.sum(tl.where(dy == 0, 0.0, wy * dy), axis=1)
    return row_mx, dx_row, row_my, dy_row, a_row


@triton.jit
def _kl_from_sums(a, d_s, d_u, inv_temp, loss_scale):
    """Loss rows from pass 1's sums: loss_scale (T^2 times the launch's coefficient) times the KL,
    (a / d_u) (A_UNIT loss_scale / T) + log(d_s / d_u) loss_scale, `a` in A_SCALE raw-logit units (the mean a / d_u
    first: it stays below the largest difference). The scales meet before they meet the mean: at T < 1 the mean
    difference over T (the KL before T^2) may pass float32's range where T^2 times it (the loss) does not (a student
    at torch.finfo's min where the teacher keeps mass: a loss row of 1e38 at T = 0.3). One log of the normalisers'
    ratio, not log d_s - log d_u: on nearly uniform rows (a high temperature) those two logs, each about log C,
    cancel to a KL of 1e-3 and take their rounding with them (3x eager's error; the ratio's is below eager's)."""
    return (a / d_u) * ((inv_temp * loss_scale) * A_UNIT) + tl.log(d_s / d_u) * loss_scale


@triton.jit
def _kept_rows(keep_ptr, keep_offs, row_ok, HAS_KEEP: tl.constexpr):
    """A row mask's view of a program's rows: (BLOCK_R,) bool, True for the rows that count (row_ok without
    HAS_KEEP). _drop_rows then selects 0 for the others' gradients."""
    if HAS_KEEP:
        return tl.load(keep_ptr + keep_offs, mask=row_ok, other=0) != 0
    return row_ok


@triton.jit
def _drop_rows(g, kept, HAS_KEEP: tl.constexpr):
    """A gradient tile g (BLOCK_R, ...) with exactly 0 on the rows a row mask leaves out (kept: _kept_rows's
    (BLOCK_R,) mask, given with g's rank by the caller, kept[:, None] or kept[:, None, None]): a select, not a
    product by a zero scale, so that a row left out may hold anything (NaN, infinities: a model's output at
    padding) and still gets 0. Without HAS_KEEP: g. (A branch on g's rank in here compiled its 2-D form for
    the top-k kernel's 3-D tiles under Triton 3.6 and 3.8, which the interpreter never showed.)"""
    if HAS_KEEP:
        return tl.where(kept, g, 0.0)
    return g


# Forward formula: loss[r] = T^2 * KL(softmax(t[r]/T) || softmax(z[r]/T)); gradient
# dloss/dz[r, c] = T * (q - p), written (times grad_scale / T) in the same launch as the loss.
# One program owns BLOCK_R whole rows and walks their C tiles twice (stats, then gradient), so no
# row statistics ever cross programs. Rows are numbered r = o * R_INNER + i over two strided axes
# (batch and head, in either order), so any (B, M, C) or (M, B, C) view with unit stride along C is
# read in place. grad_ptr may equal z_ptr: each tile is read before it is overwritten by the program
# that owns it (the logits buffer becomes the gradient, no second (B, M, C) buffer).
# Teacher values are checked on the loads already made: a NaN, a +inf, or a row that is -inf
# everywhere sets bits 1, 2, 4 of *err_ptr (one atomic OR per program, only when something is
# wrong), which the host reads without a synchronisation (fasthydra/ops/checks.py).
@triton.jit
def _hydra_kl_fwd_kernel(
    z_ptr,  # student logits: row (o, i) at o * stride_zo + i * stride_zi, unit stride along C
    t_ptr,  # teacher logits: row (o, i) at o * stride_to + i * stride_ti, unit stride along C
    loss_ptr,  # out: fp32 T^2 * KL of row (o, i) at o * stride_lo + i * stride_li
    grad_ptr,  # out: grad_scale * (q - p) in the student's dtype (may alias z_ptr); unused unless WRITE_GRAD
    tgrad_ptr,  # out: teacher gradient grad_scale * p * (log p - log q - KL), row (o, i) at o * stride_ho +
    #             i * stride_hi, in the teacher's dtype; unused unless WRITE_TGRAD
    err_ptr,  # in/out: one int32 error word, OR-ed with 1 (NaN), 2 (+inf), 4 (all -inf row) by bad teachers
    bias_ptr,  # student bias added to z on every load: row (o, i) at o * stride_bo + i * stride_bi, unit along
    #            C (MLP heads' per-head bias, so their GEMM needs no bias operand); unused unless HAS_BIAS
    norm_ptr,  # out: (R, 4) fp32 per row r: max z, log d_s, max t, log d_u (maxima of the raw logits, bias
    #            added; d = sum exp((x - max) / T)), the normalisers
    #            _hydra_kl_grad_kernel needs for a gradient formed in the backward; unused unless WRITE_NORMS
    part_ptr,  # out: one fp32 partial loss sum per program; unused unless REDUCE
    out_ptr,  # out: the reduced loss, fp32 scalar, written by the last program; unused unless REDUCE
    count_ptr,  # in/out: int32 count of finished programs, 0 before and after; unused unless REDUCE
    keep_ptr,  # row mask, uint8, nonzero = the row counts: row (o, i) at o * stride_ko + i * stride_ki (a
    #            batch mask broadcast over heads: one stride 0); unused unless HAS_KEEP
    nkept_ptr,  # the mask's count of kept rows, an integer scalar; unused unless MEAN_KEPT
    R,  # rows in all
    R_INNER,  # rows along the inner axis i
    C,
    stride_zo,
    stride_zi,
    stride_to,
    stride_ti,
    stride_go,
    stride_gi,
    stride_lo,
    stride_li,
    stride_ho,
    stride_hi,
    stride_bo,
    stride_bi,
    stride_ko,
    stride_ki,
    inv_temp,  # 1 / T
    loss_scale,  # T^2
    grad_scale,  # T * reduction coefficient (1/(B*M) for "mean", 1 otherwise)
    out_scale,  # reduction coefficient of the summed loss rows; unused unless REDUCE
    batch_rows,  # B, the batch the reduction coefficient counts (this launch may cover a chunk); unused unless
    #              MEAN_KEPT
    temp_ptr,  # a tensor temperature (one fp32/fp64 value) where T_PTR; else unused (T is in the scalars above)
    BLOCK_R: tl.constexpr,  # rows per program: several when C is small, so a program has ~1k lanes
    BLOCK_C: tl.constexpr,  # class tile: up to 2048 lanes keeps the tile in registers without spills
    WRITE_GRAD: tl.constexpr,
    WRITE_TGRAD: tl.constexpr,  # the teacher requires grad: its gradient comes out of the same pass
    ROW_IN_REGISTERS: tl.constexpr,  # C <= BLOCK_C: the row is read once and kept in registers for pass 2
    HAS_BIAS: tl.constexpr,
    VEC: tl.constexpr,  # elements of one 16-byte load: a thread's share of a tile on the per-thread path
    WRITE_NORMS: tl.constexpr,
    REDUCE: tl.constexpr = False,  # the loss rows also summed (their last program), times out_scale
    BLOCK_P: tl.constexpr = 128,  # partial sums read per step by that program
    HAS_KEEP: tl.constexpr = False,  # a row mask: rows left out get loss 0 and gradients 0 (their teacher
    #                                  still checked; their student logits may be anything, NaN included)
    MEAN_KEPT: tl.constexpr = False,  # "mean" over the kept rows: grad_scale and out_scale times B / kept rows
    T_PTR: tl.constexpr = False,  # T read from temp (the scalars above came without it: _tempered_scalars)
    SPREAD: tl.constexpr = False,  # long rows Triton cannot prove 16-byte aligned: `_thread_slices`
    L2_HINTS: tl.constexpr = False,  # long rows: L2 eviction priorities on the walks' loads and stores (below)
):
    # (norms are for a gradient formed later, from a frozen teacher: never beside the gradients here)
    tl.static_assert(not (WRITE_NORMS and (WRITE_GRAD or WRITE_TGRAD)))
    # L2_HINTS: a long row's second read hits L2 only if nothing evicted it since the first, and every program
    # in flight streams its own rows through L2 meanwhile. The walks that a later walk of this launch reads
    # again load with L2 priority evict_last (KEEP); the last walk's loads and the gradients' stores, which
    # nothing here reads again, with evict_first (DONE), so that they leave L2 before the rows still to be
    # re-read; a launch with no second walk loads with evict_first throughout. (PTX createpolicy
    # L2::evict_last / evict_first; the interpreter ignores them.) Unset: the default priority everywhere.
    if L2_HINTS:
        KEEP: tl.constexpr = "evict_last" if (WRITE_GRAD or WRITE_TGRAD) else "evict_first"
        DONE: tl.constexpr = "evict_first"
    else:
        KEEP: tl.constexpr = ""
        DONE: tl.constexpr = ""
    inv_temp, loss_scale, grad_scale, out_scale = _launch_scales(temp_ptr, inv_temp, loss_scale, grad_scale,
                                                                 out_scale, nkept_ptr, batch_rows, T_PTR, MEAN_KEPT)
    rows, row_ok, r_out, r_in = _row_block(R, R_INNER, BLOCK_R)
    # the rows left out (HAS_KEEP): their gradients and loss selected to 0 (_drop_rows; the loss below)
    kept = _kept_rows(keep_ptr, r_out * stride_ko + r_in * stride_ki, row_ok, HAS_KEEP)
    z_rows = z_ptr + (r_out * stride_zo + r_in * stride_zi)[:, None]
    t_rows = t_ptr + (r_out * stride_to + r_in * stride_ti)[:, None]
    b_rows = bias_ptr + (r_out * stride_bo + r_in * stride_bi)[:, None]
    # ROW_IN_REGISTERS: one tile holds the whole row, so the loops below run once and the later passes
    # use the tile already loaded (one read of z and t instead of two: the op is bound by these bytes).
    cols0 = tl.arange(0, BLOCK_C)

    m_s = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    m_u = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    d_s = tl.zeros((BLOCK_R,), tl.float32)
    d_u = tl.zeros((BLOCK_R,), tl.float32)
    a = tl.zeros((BLOCK_R,), tl.float32)
    n_nan = tl.zeros((BLOCK_R,), tl.int32)
    x_at = tl.zeros((BLOCK_R,), tl.float32)  # the student's raw logit at the teacher's most probable class
    # Statistics of the raw logits, exponents in base 2 (_online_kl_update); `a` in nats by _kl_from_sums.
    c2 = inv_temp * LOG2E
    EXACT_EXP: tl.constexpr = z_ptr.dtype.element_ty == tl.float32  # the teacher's exponentials' form (_exp2_kept)
    if ROW_IN_REGISTERS:
        row_mask = row_ok[:, None] & (cols0 < C)[None, :]
        # The row stays in registers in its storage dtype (half the registers for 16-bit inputs); the later
        # passes convert it to fp32 again (the 16-bit row alone fits 16384 classes without spills).
        z_row = tl.load(z_rows + cols0[None, :], mask=row_mask, other=float("-inf"))
        t_row = tl.load(t_rows + cols0[None, :], mask=row_mask, other=float("-inf"))
        if HAS_BIAS:
            b_row = tl.load(b_rows + cols0[None, :], mask=row_mask, other=0.0)
        else:
            b_row = z_row  # a placeholder: _biased ignores it without a bias
        x_row = _biased(z_row, b_row, HAS_BIAS)
        y_row = t_row.to(tl.float32)
        n_nan += tl.sum((y_row != y_row).to(tl.int32), axis=1)
        if WRITE_TGRAD:
            y_max = tl.max(y_row, axis=1)
            x_at = tl.max(tl.where(y_row == y_max[:, None], x_row, float("-inf")), axis=1)
        m_s, d_s, m_u, d_u, a = _online_kl_update(x_row, y_row, m_s, d_s, m_u, d_u, a, c2, EXACT_EXP)
    else:
        # Long rows (the hot path at vocabulary-sized C): each thread keeps running statistics over its own
        # 16-byte slices of the row (a tile is (rows, threads, VEC): the max and sums over VEC stay inside the
        # thread), merged across threads once per row. A tile-wise reduction costs shuffles and about ten
        # barriers per tile (sm_90 SASS: ~46 instructions per element pair in that loop, the kernel bound by
        # issue, not by memory; a teacher that requires grad walked such tiles until the fifty-first session).
        # Maxima are of the raw logits (bias added), so x - max is exact near the max and the temperature and
        # log2(e) go into one multiply before each exp2. With WRITE_TGRAD each thread also keeps its pivot
        # candidate (the student's logit at the thread's largest teacher logit so far) and its count of NaN
        # teacher logits.
        offs = _thread_slices(BLOCK_C, VEC, SPREAD)
        mx = tl.full((BLOCK_R, BLOCK_C // VEC), float("-inf"), tl.float32)
        my = tl.full((BLOCK_R, BLOCK_C // VEC), float("-inf"), tl.float32)
        dx = tl.zeros((BLOCK_R, BLOCK_C // VEC), tl.float32)
        dy = tl.zeros((BLOCK_R, BLOCK_C // VEC), tl.float32)
        ax = tl.zeros((BLOCK_R, BLOCK_C // VEC), tl.float32)
        tx_at = tl.zeros((BLOCK_R, BLOCK_C // VEC), tl.float32)
        tn = tl.zeros((BLOCK_R, BLOCK_C // VEC), tl.int32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs
            mask = row_ok[:, None, None] & (cols < C)
            x = _student(z_rows[:, :, None], b_rows[:, :, None], cols, mask, HAS_BIAS, KEEP)
            y = tl.load(t_rows[:, :, None] + cols, mask=mask, other=float("-inf"), eviction_policy=KEEP).to(tl.float32)
            if WRITE_TGRAD:  # the pivot of the teacher gradient (see below) and the NaN check, on these loads
                tn += tl.sum((y != y).to(tl.int32), axis=2)
                slice_max = tl.max(y, axis=2)
                here = tl.max(tl.where(y == slice_max[:, :, None], x, float("-inf")), axis=2)
                tx_at = tl.where(slice_max > my, here, tx_at)
            mx, dx, my, dy, ax = _thread_kl_update(x, y, mx, dx, my, dy, ax, c2)
        row_mx, d_s, row_my, d_u, a = _thread_kl_combine(mx, dx, my, dy, ax, c2)
        # the raw maxima from here on (what the norms hold; the checks below read only infinities)
        m_s, m_u = row_mx, row_my
        if WRITE_TGRAD:
            # the pivot from a thread that holds the row's largest teacher logit (any of them: the bracket below
            # does not depend on which class is the pivot)
            x_at = tl.max(tl.where(my == m_u[:, None], tx_at, float("-inf")), axis=1)
            n_nan += tl.sum(tn, axis=1)
        else:
            # A NaN teacher logit makes its thread's sum NaN and so the row's (two +inf do too: those rows
            # are flagged +inf by m_u instead).
            n_nan += ((d_u != d_u) & (m_u != float("inf"))).to(tl.int32)
    bad = tl.max(tl.where(row_ok & (n_nan > 0), 1, 0), axis=0)
    bad |= tl.max(tl.where(row_ok & (m_u == float("inf")), 2, 0), axis=0)
    bad |= tl.max(tl.where(row_ok & (m_u == float("-inf")), 4, 0), axis=0)
    tl.atomic_or(err_ptr, bad, mask=bad != 0)

    log_d_s = tl.log(d_s)
    log_d_u = tl.log(d_u)
    kl = _kl_from_sums(a, d_s, d_u, inv_temp, loss_scale)  # T^2 KL (times the launch's coefficient)
    if HAS_KEEP:
        kl = tl.where(kept, kl, 0.0)
    tl.store(loss_ptr + r_out * stride_lo + r_in * stride_li, kl, mask=row_ok)
    if REDUCE:
        tl.store(part_ptr + tl.program_id(0).to(tl.int64), tl.sum(tl.where(row_ok, kl, 0.0), axis=0))
        _last_program_sums(part_ptr, tl.num_programs(0), out_ptr, count_ptr, out_scale, BLOCK_P)
    if WRITE_NORMS:
        tl.store(norm_ptr + rows * 4, m_s, mask=row_ok)
        tl.store(norm_ptr + rows * 4 + 1, log_d_s, mask=row_ok)
        tl.store(norm_ptr + rows * 4 + 2, m_u, mask=row_ok)
        tl.store(norm_ptr + rows * 4 + 3, log_d_u, mask=row_ok)

    # The gradients' normalisers as _grad_from_norms takes them (a teacher row that is -inf everywhere
    # measured from 0, so that its p is 0)
    l_s = log_d_s * LOG2E
    l_u = log_d_u * LOG2E
    ref_u = tl.where(m_u == float("-inf"), 0.0, m_u)
    big_a = tl.zeros((BLOCK_R,), tl.float32)  # sum_k p_k e_k (teacher gradient only)
    if WRITE_TGRAD:
        # dL/dt_c = T * coef * p_c * ((log p_c - log q_c) - KL). Written as is, the bracket is a
        # difference of two numbers as large as the logits (1e3 and up): all of fp32's digits go to
        # cancellation. With the pivot j = argmax p and e_k = ((t_k - t_j) - (z_k - z_j)) / T, the bracket
        # is e_c - sum_k p_k e_k exactly (log q - log p shifts by a constant per row), e_j = 0, and the
        # sum is dominated by small p_k: one more pass over the row, only for a teacher that needs it. (e and
        # its mean kept in raw units, T e: the 1 / T goes into the gradient's scale, _store_grads.)
        if ROW_IN_REGISTERS:
            big_a = _mean_e(_biased(z_row, b_row, HAS_BIAS), t_row.to(tl.float32), ref_u, l_u, x_at, inv_temp)
        else:  # per thread over 16-byte slices, summed once per row
            offs = _thread_slices(BLOCK_C, VEC, SPREAD)
            t_big_a = tl.zeros((BLOCK_R, BLOCK_C // VEC), tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + offs
                mask = row_ok[:, None, None] & (cols < C)
                x = _student(z_rows[:, :, None], b_rows[:, :, None], cols, mask, HAS_BIAS, KEEP)
                y = tl.load(t_rows[:, :, None] + cols, mask=mask, other=float("-inf"),
                            eviction_policy=KEEP).to(tl.float32)
                live, e, p = _teacher_terms(x, y, ref_u[:, None, None], l_u[:, None, None], x_at[:, None, None],
                                            inv_temp, False)  # (per-thread walk: _exp2_kept's square everywhere)
                t_big_a += tl.sum(tl.where(live, p * e, 0.0), axis=2)
            big_a = tl.sum(t_big_a, axis=1)

    if WRITE_GRAD or WRITE_TGRAD:
        g_rows = grad_ptr + (r_out * stride_go + r_in * stride_gi)[:, None]
        h_rows = tgrad_ptr + (r_out * stride_ho + r_in * stride_hi)[:, None]
        if ROW_IN_REGISTERS:
            _store_grads(_biased(z_row, b_row, HAS_BIAS), t_row.to(tl.float32), cols0, row_mask, g_rows, h_rows, m_s,
                         l_s, ref_u, l_u, x_at, big_a, inv_temp, grad_scale, kept, WRITE_GRAD, WRITE_TGRAD, HAS_KEEP)
        elif WRITE_TGRAD:
            n_tiles = tl.cdiv(C, BLOCK_C)
            for j in range(0, n_tiles):  # last tile first: pass 1 read it last, so L2 most likely still holds it
                c0 = (n_tiles - 1 - j) * BLOCK_C
                cols = c0 + cols0
                mask = row_ok[:, None] & (cols < C)[None, :]
                x = _student(z_rows, b_rows, cols, mask, HAS_BIAS, DONE)
                y = tl.load(t_rows + cols[None, :], mask=mask, other=float("-inf"), eviction_policy=DONE).to(tl.float32)
                _store_grads(x, y, cols, mask, g_rows, h_rows, m_s, l_s, ref_u, l_u, x_at, big_a, inv_temp,
                             grad_scale, kept, WRITE_GRAD, WRITE_TGRAD, HAS_KEEP, False, DONE)  # (as the walk above)
        else:
            # q = exp2((x - max x) * c2 - log2 d_s), p likewise: one exp2 per element and tensor, no
            # select (a masked teacher class is -inf: p = 0); the row's -inf maxima (nothing live) as 0.
            ref_x = tl.where(row_mx == float("-inf"), 0.0, row_mx)[:, None, None]
            ref_y = ref_u[:, None, None]
            lx = l_s[:, None, None]
            ly = l_u[:, None, None]
            n_tiles = tl.cdiv(C, BLOCK_C)
            for j in range(0, n_tiles):  # last tile first: pass 1 read it last, so L2 most likely still holds it
                cols = (n_tiles - 1 - j) * BLOCK_C + offs
                mask = row_ok[:, None, None] & (cols < C)
                x = _student(z_rows[:, :, None], b_rows[:, :, None], cols, mask, HAS_BIAS, DONE)
                y = tl.load(t_rows[:, :, None] + cols, mask=mask, other=float("-inf"),
                            eviction_policy=DONE).to(tl.float32)
                g = _drop_rows(grad_scale * (tl.exp2((x - ref_x) * c2 - lx) - tl.exp2((y - ref_y) * c2 - ly)),
                               kept[:, None, None], HAS_KEEP)
                tl.store(g_rows[:, :, None] + cols, g.to(g_rows.dtype.element_ty), mask=mask,
                         eviction_policy=DONE)


# The gradient on its own, in the backward (hydra_kl_loss on given logits with a frozen teacher): the
# forward wrote only the loss rows and each row's normalisers (norm_ptr above), so the (B, M, C)
# gradient is formed once, already multiplied by the upstream gradient, which is read here on the
# device (a scalar: strides 0; reduction "none": one value per row):
#     dz[r, c] = grad_scale * g[r] * (q - p),  q = exp((z - max z) / T - log d_s),  p likewise
# A streaming pass, no reduction: one program per BLOCK_R rows and block of cols_per_prog classes, which
# it walks in BLOCK_C tiles (the rows' normalisers and upstream gradient loaded once).
@triton.jit
def _hydra_kl_grad_kernel(
    z_ptr,  # student logits: row (o, i) at o * stride_zo + i * stride_zi, unit stride along C
    t_ptr,  # teacher logits: row (o, i) at o * stride_to + i * stride_ti, unit stride along C
    norm_ptr,  # (R, 4) fp32 from the forward: m_s, log d_s, m_u, log d_u per row
    up_ptr,  # upstream gradient: row (o, i) at o * stride_uo + i * stride_ui (both 0 for a scalar)
    grad_ptr,  # out: dz in the student's dtype, row (o, i) at o * stride_go + i * stride_gi
    keep_ptr,  # row mask, uint8, nonzero = the row counts: row (o, i) at o * stride_ko + i * stride_ki; unused
    #            unless HAS_KEEP
    nkept_ptr,  # the count of kept rows (an integer scalar), read where MEAN_KEPT
    R,
    R_INNER,
    C,
    cols_per_prog,  # classes of one program (grid axis 1 walks their blocks): a multiple of BLOCK_C
    stride_zo,
    stride_zi,
    stride_to,
    stride_ti,
    stride_uo,
    stride_ui,
    stride_go,
    stride_gi,
    stride_ko,
    stride_ki,
    inv_temp,
    grad_scale,  # T * reduction coefficient
    batch_rows,  # B, for MEAN_KEPT's factor B / count
    temp_ptr,  # a tensor temperature where T_PTR, as in _hydra_kl_fwd_kernel
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_KEEP: tl.constexpr = False,  # a row mask: dz 0 on the rows left out (whatever their logits)
    MEAN_KEPT: tl.constexpr = False,  # "mean" over the kept rows: grad_scale times B / count
    T_PTR: tl.constexpr = False,
):
    inv_temp, _, grad_scale, _ = _launch_scales(temp_ptr, inv_temp, 1.0, grad_scale, 1.0, nkept_ptr, batch_rows,
                                                T_PTR, MEAN_KEPT)
    rows, row_ok, r_out, r_in = _row_block(R, R_INNER, BLOCK_R)
    c_lo = tl.program_id(1) * cols_per_prog
    c_hi = tl.minimum(C, c_lo + cols_per_prog)
    # per row, once: the normalisers and grad_scale times the upstream gradient
    m_s, l_s, m_u, l_u = _load_norms(norm_ptr + rows * 4, row_ok)
    up = tl.load(up_ptr + r_out * stride_uo + r_in * stride_ui, mask=row_ok, other=0.0).to(tl.float32)
    kept = _kept_rows(keep_ptr, r_out * stride_ko + r_in * stride_ki, row_ok, HAS_KEEP)
    scale = grad_scale * up[:, None]
    z_rows = z_ptr + (r_out * stride_zo + r_in * stride_zi)[:, None]
    t_rows = t_ptr + (r_out * stride_to + r_in * stride_ti)[:, None]
    g_rows = grad_ptr + (r_out * stride_go + r_in * stride_gi)[:, None]
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C))[None, :]
        mask = row_ok[:, None] & (cols < c_hi)
        x = tl.load(z_rows + cols, mask=mask, other=float("-inf")).to(tl.float32)
        y = tl.load(t_rows + cols, mask=mask, other=float("-inf")).to(tl.float32)
        g = _drop_rows(_grad_from_norms(x, y, m_s, l_s, m_u, l_u, inv_temp, scale), kept[:, None], HAS_KEEP)
        tl.store(g_rows + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_norms(norm_rows, row_ok):
    """A row's normalisers from the forward (norm_rows: (ROWS,) pointers to max z, log d_s, max t, log d_u:
    the raw logits' maxima), as _grad_from_norms takes them: the sums' logs in base 2, and a teacher row
    that is -inf everywhere (flagged by the forward) measured from 0, so that its p is 0."""
    m_s = tl.load(norm_rows, mask=row_ok, other=0.0)
    l_s = tl.load(norm_rows + 1, mask=row_ok, other=0.0) * LOG2E
    m_u = tl.load(norm_rows + 2, mask=row_ok, other=0.0)
    l_u = tl.load(norm_rows + 3, mask=row_ok, other=0.0) * LOG2E
    return m_s, l_s, tl.where(m_u == float("-inf"), 0.0, m_u), l_u


@triton.jit
def _grad_from_norms(x, y, m_s, l_s, m_u, l_u, inv_temp, grad_scale):
    """``grad_scale * (q - p)`` for one (rows, classes) tile of raw student and teacher logits x, y (fp32,
    -inf outside the row; the student's bias added), from _load_norms's (ROWS,) normalisers; grad_scale
    a scalar or a (ROWS, 1) column."""
    # q = 2^((x - max x) log2(e) / T - log2 d_s): the difference of raw logits first (exact near the max,
    # where a probability near 1 makes q - p cancel; scaling first would round x / T to the ulp of its
    # size: with |x / T| ~ 80, 4 ulp of q there), then one FMA and one exp2 per element; a -inf logit
    # (masked class, lanes outside the row) gives 0 without a select.
    c2 = inv_temp * LOG2E
    q = tl.exp2((x - m_s[:, None]) * c2 - l_s[:, None])
    p = tl.exp2((y - m_u[:, None]) * c2 - l_u[:, None])
    return grad_scale * q - grad_scale * p


# The gradient and its column sums (the bias gradient) in one streaming pass, in the forward of the
# heads + loss op when the head has a bias (ops/linear_hydra_kl.py): the loss kernel above wrote the loss
# rows and their normalisers (WRITE_NORMS, one read of z and t), this pass reads z and t once more and
# writes dz = grad_scale * (q - p) (in place of z when grad_ptr is z_ptr), and sums it over rows as it
# goes, so db needs no third read of the (B, M, C) gradient. The view is head-major, (O, I, C) = (heads,
# rows, C): program (o, g) walks rows [g * ROWS_PER_PROG, (g + 1) * ROWS_PER_PROG) of head o in
# (BLOCK_R, BLOCK_C) tiles for one class block, and writes that block's partial sum to
# part_ptr[o * n_groups + g, :] (fp32; the host sums the n_groups partials of a head). Norms come as
# (O, I, 4), row (o, i) at (o * I + i) * 4, the order the loss kernel writes them for the same view.
@triton.jit
def _hydra_kl_grad_cols_kernel(
    z_ptr,  # student logits: row (o, i) at o * stride_zo + i * stride_zi, unit stride along C
    t_ptr,  # teacher logits, likewise
    bias_ptr,  # (O, C) added to every row of head o (per-head inputs' bias), head stride stride_bo, unit
    #            along C; unused unless HAS_BIAS
    norm_ptr,  # (O * I, 4) fp32: m_s, log d_s, m_u, log d_u per row
    grad_ptr,  # out: dz in the student's dtype (may alias z_ptr)
    part_ptr,  # out: (O * n_groups, C) fp32 partial column sums of dz
    keep_ptr,  # row mask over the I axis, uint8 (nonzero = the row counts), unit stride; unused unless HAS_KEEP
    nkept_ptr,  # the mask's count of kept rows, an integer scalar; unused unless MEAN_KEPT
    I,
    C,
    n_groups,
    rows_per_prog,  # a multiple of BLOCK_R
    stride_zo,
    stride_zi,
    stride_to,
    stride_ti,
    stride_bo,
    stride_go,
    stride_gi,
    inv_temp,
    grad_scale,  # T * reduction coefficient
    batch_rows,  # B, as in _hydra_kl_fwd_kernel; unused unless MEAN_KEPT
    temp_ptr,  # a tensor temperature where T_PTR, as in _hydra_kl_fwd_kernel
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_KEEP: tl.constexpr = False,  # rows left out: dz 0 (selected), nothing added to the sums
    MEAN_KEPT: tl.constexpr = False,  # "mean" over the kept rows: grad_scale times B / kept rows
    T_PTR: tl.constexpr = False,
):
    inv_temp, _, grad_scale, _ = _launch_scales(temp_ptr, inv_temp, 1.0, grad_scale, 1.0, nkept_ptr, batch_rows,
                                                T_PTR, MEAN_KEPT)
    pid = tl.program_id(0)
    o = (pid // n_groups).to(tl.int64)
    i_lo = (pid % n_groups) * rows_per_prog
    i_hi = tl.minimum(I, i_lo + rows_per_prog)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    if HAS_BIAS:  # one bias row per head: loaded once
        b = tl.load(bias_ptr + o * stride_bo + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)  # summed over rows once, after the loop: no
    #                                                  cross-thread reduction (shuffles, barriers) per tile
    for i0 in range(i_lo, i_hi, BLOCK_R):
        ri = i0 + tl.arange(0, BLOCK_R).to(tl.int64)
        row_ok = ri < i_hi
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(z_ptr + (o * stride_zo + ri * stride_zi)[:, None] + cols[None, :], mask=mask,
                    other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            x = x + b
        y = tl.load(t_ptr + (o * stride_to + ri * stride_ti)[:, None] + cols[None, :], mask=mask,
                    other=float("-inf")).to(tl.float32)
        m_s, l_s, m_u, l_u = _load_norms(norm_ptr + (o * I + ri) * 4, row_ok)
        g = _drop_rows(_grad_from_norms(x, y, m_s, l_s, m_u, l_u, inv_temp, grad_scale),
                       _kept_rows(keep_ptr, ri, row_ok, HAS_KEEP)[:, None], HAS_KEEP)
        tl.store(grad_ptr + (o * stride_go + ri * stride_gi)[:, None] + cols[None, :],
                 g.to(grad_ptr.dtype.element_ty), mask=mask)
        acc += tl.where(mask, g, 0.0)
    tl.store(part_ptr + pid.to(tl.int64) * C + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _biased(z, b, HAS_BIAS: tl.constexpr):
    """z (any float dtype) in fp32, plus the bias b when there is one (masked lanes stay -inf)."""
    if HAS_BIAS:
        return z.to(tl.float32) + b.to(tl.float32)
    return z.to(tl.float32)


@triton.jit
def _student(z_rows, b_rows, cols, mask, HAS_BIAS: tl.constexpr, EVICT: tl.constexpr = tl.constexpr("")):
    """One tile of student logits in fp32 (-inf outside the row), with the bias added when there is one.
    z_rows, b_rows: row pointers; cols: class offsets of the tile; both broadcast to the mask's shape
    (a 1-D cols is taken as a (1, BLOCK_C) row of classes). EVICT: the logits' load's L2 eviction priority
    (the bias, a few rows every program reads, keeps the default)."""
    if len(cols.shape) == 1:
        offsets = cols[None, :]
    else:
        offsets = cols
    z = tl.load(z_rows + offsets, mask=mask, other=float("-inf"), eviction_policy=EVICT)
    if HAS_BIAS:
        return _biased(z, tl.load(b_rows + offsets, mask=mask, other=0.0), HAS_BIAS)
    return z.to(tl.float32)


@triton.jit
def _teacher_terms(x, y, ref_u, l_u, x_at, inv_temp, EXACT: tl.constexpr = True):
    """For one tile of raw logits x, y (fp32, -inf outside the row): which classes the teacher keeps (live: p > 0;
    a finite logit whose p underflows is as masked as -inf, and its e may be infinite), e = (y - y_j) - (x - x_j)
    around the pivot j, the teacher's most probable class (its logit the row's maximum ref_u; x_at = x_j), in raw
    units (the 1 / T goes into the gradient's scale: e / T overflows at T < 1 where a student at torch.finfo's min
    lies far below x_j, though T p (e - mean e) / T fits), and p = 2^((y - ref_u) log2(e) / T - l_u), l_u = log2 of
    the teacher's sum. The row statistics ref_u, l_u, x_at come shaped to broadcast against the tile ((rows, 1), or
    (rows, 1, 1) for per-thread slices)."""
    dy = y - ref_u
    e = dy - (x - x_at)
    p = _exp2_kept(dy * (inv_temp * LOG2E) - l_u, EXACT)  # (EXACT: _exp2_kept's form)
    return p > 0, e, p


@triton.jit
def _mean_e(x, y, ref_u, l_u, x_at, inv_temp):
    """sum_k p_k e_k over one (rows, classes) tile (see _teacher_terms; the row statistics (rows,)); masked classes
    add 0."""
    live, e, p = _teacher_terms(x, y, ref_u[:, None], l_u[:, None], x_at[:, None], inv_temp)
    return tl.sum(tl.where(live, p * e, 0.0), axis=1)


@triton.jit
def _store_grads(x, y, cols, mask, g_rows, h_rows, m_s, l_s, ref_u, l_u, x_at, big_a, inv_temp, grad_scale, kept,
                 WRITE_GRAD: tl.constexpr, WRITE_TGRAD: tl.constexpr, HAS_KEEP: tl.constexpr,
                 EXACT: tl.constexpr = True, EVICT: tl.constexpr = tl.constexpr("")):
    """One tile's gradients from its raw logits x, y and the finished row statistics (m_s, l_s, ref_u, l_u as
    _grad_from_norms takes them; x_at, big_a as _mean_e gives them): the student's grad_scale * (q - p) and,
    for a teacher that requires grad, grad_scale * p * (e - sum_k p_k e_k) / T (e raw: _teacher_terms); 0 on the
    rows a row mask leaves out (kept, HAS_KEEP: see _drop_rows). EVICT: the stores' L2 eviction priority."""
    if WRITE_TGRAD:  # a masked class (p = 0) gets 0
        live, e, p = _teacher_terms(x, y, ref_u[:, None], l_u[:, None], x_at[:, None], inv_temp, EXACT)
        h = _drop_rows(tl.where(live, p * (e - big_a[:, None]), 0.0) * (inv_temp * grad_scale), kept[:, None],
                       HAS_KEEP)
        tl.store(h_rows + cols[None, :], h.to(h_rows.dtype.element_ty), mask=mask, eviction_policy=EVICT)
    if WRITE_GRAD:
        g = _drop_rows(_grad_from_norms(x, y, m_s, l_s, ref_u, l_u, inv_temp, grad_scale), kept[:, None], HAS_KEEP)
        tl.store(g_rows + cols[None, :], g.to(g_rows.dtype.element_ty), mask=mask, eviction_policy=EVICT)


# Sparse (top-k) teacher. Row r keeps K classes: raw values v[r, :K] on distinct indices idx[r, :K]
# (a -inf value pads). p~ = softmax(v / T) over the kept classes, zero elsewhere; q = softmax(z / T)
# over all C. loss[r] = T^2 * sum_i p~_i (log p~_i - log q_idx_i); dloss/dz = T * (q - scatter(p~));
# dloss/dv_i = T * p~_i * ((log p~_i - log q_idx_i) - KL). The student row is read in C tiles (online
# max and sum), the K teacher entries in one tile, and the student's logits at the kept classes are
# gathered once; no dense teacher is ever formed. The gradient is written dense (q, pass 2), then,
# after a barrier, q - p~ at the kept classes (the same program owns the row: no other writer).
@triton.jit
def _hydra_kl_topk_fwd_kernel(
    z_ptr,  # student logits: row (o, i) at o * stride_zo + i * stride_zi, unit stride along C
    v_ptr,  # teacher values: row (o, i) at o * stride_vo + i * stride_vi, unit stride along K
    idx_ptr,  # teacher class indices (int32/int64): same row layout (stride_xo, stride_xi), unit along K
    loss_ptr,  # out: fp32 T^2 * KL of row (o, i) at o * stride_lo + i * stride_li
    grad_ptr,  # out: grad_scale * (q - scatter(p~)) in the student's dtype (may alias z_ptr)
    vgrad_ptr,  # out: the values' gradient (row (o, i) at o * stride_ho + i * stride_hi); unused unless WRITE_TGRAD
    err_ptr,  # in/out: int32 error word: 1 NaN, 2 +inf, 4 a row with no finite value, 64 an index outside [0, C)
    keep_ptr,  # row mask, uint8, nonzero = the row counts: row (o, i) at o * stride_ko + i * stride_ki; unused
    #            unless HAS_KEEP
    nkept_ptr,  # the mask's count of kept rows, an integer scalar; unused unless MEAN_KEPT
    part_ptr,  # out: one fp32 partial loss sum per program; unused unless REDUCE
    out_ptr,  # out: the reduced loss, fp32 scalar, written by the last program; unused unless REDUCE
    count_ptr,  # in/out: int32 count of finished programs, 0 before and after; unused unless REDUCE
    R,
    R_INNER,
    C,
    K,
    stride_zo,
    stride_zi,
    stride_vo,
    stride_vi,
    stride_xo,
    stride_xi,
    stride_go,
    stride_gi,
    stride_lo,
    stride_li,
    stride_ho,
    stride_hi,
    stride_ko,
    stride_ki,
    inv_temp,  # 1 / T
    loss_scale,  # T^2
    grad_scale,  # T * reduction coefficient
    out_scale,  # reduction coefficient of the summed loss rows; unused unless REDUCE
    batch_rows,  # B, as in _hydra_kl_fwd_kernel; unused unless MEAN_KEPT
    temp_ptr,  # a tensor temperature where T_PTR, as in _hydra_kl_fwd_kernel
    BLOCK_R: tl.constexpr,  # rows per program (several when C is small)
    BLOCK_C: tl.constexpr,  # class tile of the student row
    BLOCK_K: tl.constexpr,  # K padded to a power of two: the whole teacher row in one tile
    WRITE_GRAD: tl.constexpr,
    WRITE_TGRAD: tl.constexpr,
    VEC: tl.constexpr,  # elements of one 16-byte load: a thread's slice of a student tile
    HAS_KEEP: tl.constexpr = False,  # a row mask, as in _hydra_kl_fwd_kernel: loss 0 and gradients 0 on the rows
    #                                  left out (teacher still checked; their student logits may be anything)
    MEAN_KEPT: tl.constexpr = False,  # "mean" over the kept rows: grad_scale and out_scale times B / kept rows
    REDUCE: tl.constexpr = False,  # the loss rows also summed (their last program), times out_scale
    BLOCK_P: tl.constexpr = 128,  # partial sums read per step by that program
    T_PTR: tl.constexpr = False,
    SPREAD: tl.constexpr = False,  # student rows Triton cannot prove 16-byte aligned: `_thread_slices`
):
    inv_temp, loss_scale, grad_scale, out_scale = _launch_scales(temp_ptr, inv_temp, loss_scale, grad_scale,
                                                                 out_scale, nkept_ptr, batch_rows, T_PTR, MEAN_KEPT)
    rows, row_ok, r_out, r_in = _row_block(R, R_INNER, BLOCK_R)
    kept = _kept_rows(keep_ptr, r_out * stride_ko + r_in * stride_ki, row_ok, HAS_KEEP)
    z_rows = z_ptr + (r_out * stride_zo + r_in * stride_zi)[:, None]

    # The teacher's K entries and the student's logits there (gathered before any store: in place is safe)
    ks = tl.arange(0, BLOCK_K)
    k_mask = row_ok[:, None] & (ks < K)[None, :]
    v = tl.load(v_ptr + (r_out * stride_vo + r_in * stride_vi)[:, None] + ks[None, :], mask=k_mask,
                other=float("-inf"))
    idx = tl.load(idx_ptr + (r_out * stride_xo + r_in * stride_xi)[:, None] + ks[None, :], mask=k_mask,
                  other=0).to(tl.int64)
    w = v.to(tl.float32)  # raw: the maximum of the raw values, the difference taken before the 1/T scale
    in_range = (idx >= 0) & (idx < C)
    x_idx = tl.load(z_rows + idx, mask=k_mask & in_range, other=0.0).to(tl.float32)
    m_w = tl.max(w, axis=1)
    ref_w = tl.where(m_w == float("-inf"), 0.0, m_w)
    w_sh = (w - ref_w[:, None]) * inv_temp  # (v - max v) / T: 0 at the maximum
    valid = (w > float("-inf")) & k_mask
    d_w = tl.sum(tl.where(valid, tl.exp(w_sh), 0.0), axis=1)
    log_d_w = tl.log(d_w)
    # p~ formed directly, subnormal values kept (_exp2_kept: e_w / d_w lost them on a GPU)
    p = tl.where(valid, _exp2_kept((w_sh - log_d_w[:, None]) * LOG2E), 0.0)
    # the entries that count: p > 0 (a -inf pad, or a finite one whose p underflows, such as torch.finfo's min,
    # adds nothing, is not written back, and so never races a kept entry of the same index)
    live = p > 0

    bad = tl.max(tl.where(row_ok & (tl.sum((w != w).to(tl.int32), axis=1) > 0), 1, 0), axis=0)
    bad |= tl.max(tl.where(row_ok & (m_w == float("inf")), 2, 0), axis=0)
    bad |= tl.max(tl.where(row_ok & (m_w == float("-inf")), 4, 0), axis=0)
    bad |= tl.max(tl.max(tl.where(k_mask & ~in_range, 64, 0), axis=1), axis=0)
    tl.atomic_or(err_ptr, bad, mask=bad != 0)

    # The student's normaliser: per-thread running max and sum over 16-byte slices of the row (a tile is
    # (rows, threads, VEC)), merged once per row; raw-logit maxima, T and log2(e) in one multiply.
    offs = _thread_slices(BLOCK_C, VEC, SPREAD)
    c2 = inv_temp * LOG2E
    tm = tl.full((BLOCK_R, BLOCK_C // VEC), float("-inf"), tl.float32)
    td = tl.zeros((BLOCK_R, BLOCK_C // VEC), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        mask = row_ok[:, None, None] & (cols < C)
        x = tl.load(z_rows[:, :, None] + cols, mask=mask, other=float("-inf")).to(tl.float32)
        tm, ref, scale = _thread_max(x, tm, c2)
        td = td * scale + tl.sum(tl.exp2((x - ref[:, :, None]) * c2), axis=2)
    row_m, ref_x, thread_w = _thread_merge(tm, c2)
    d_s = tl.sum(tl.where(td == 0, 0.0, td * thread_w), axis=1)
    log_d_s = tl.log(d_s)
    # The student's tempered logits at the kept classes measured from its raw maximum, the difference first
    # (as d_s was summed: a rounded max z / T subtracted from z / T in one FMA would shift them from it)
    ref_m = tl.where(row_m == float("-inf"), 0.0, row_m)[:, None]
    sd = (x_idx - ref_m) * inv_temp

    # T^2 KL = sum_i p_i (((v_i - max v) - (z_idx_i - max z)) T + (log d_s - log d_w) T^2), masked entries 0: the
    # raw difference first, times p_i, scaled by T^2 / T (T^2 and the launch's coefficient: loss_scale) only then.
    # Divided by T first it overflows at T < 1 where the student lies near torch.finfo's min at a kept class, times
    # T before p_i at T > 1, though the loss row fits float32.
    raw = (w - ref_w[:, None]) - (x_idx - ref_m)
    log_ratio = (log_d_s - log_d_w) * loss_scale
    kl = tl.sum(tl.where(live, (p * raw) * (inv_temp * loss_scale) + p * log_ratio[:, None], 0.0), axis=1)
    if HAS_KEEP:
        kl = tl.where(kept, kl, 0.0)
    tl.store(loss_ptr + r_out * stride_lo + r_in * stride_li, kl, mask=row_ok)
    if REDUCE:
        tl.store(part_ptr + tl.program_id(0).to(tl.int64), tl.sum(tl.where(row_ok, kl, 0.0), axis=0))
        _last_program_sums(part_ptr, tl.num_programs(0), out_ptr, count_ptr, out_scale, BLOCK_P)

    if WRITE_TGRAD:  # pivoted at the teacher's most probable class, as in _hydra_kl_fwd_kernel (e raw, T e)
        x_at = tl.max(tl.where(live & (w == m_w[:, None]), x_idx, float("-inf")), axis=1)
        e = (w - ref_w[:, None]) - (x_idx - x_at[:, None])
        mean_e = tl.sum(tl.where(live, p * e, 0.0), axis=1)
        h = _drop_rows(tl.where(live, p * (e - mean_e[:, None]), 0.0) * (inv_temp * grad_scale), kept[:, None],
                       HAS_KEEP)
        tl.store(vgrad_ptr + (r_out * stride_ho + r_in * stride_hi)[:, None] + ks[None, :],
                 h.to(vgrad_ptr.dtype.element_ty), mask=k_mask)

    if WRITE_GRAD:
        g_rows = grad_ptr + (r_out * stride_go + r_in * stride_gi)[:, None]
        lx = (log_d_s * LOG2E)[:, None, None]
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs
            mask = row_ok[:, None, None] & (cols < C)
            x = tl.load(z_rows[:, :, None] + cols, mask=mask, other=float("-inf")).to(tl.float32)
            q = tl.exp2((x - ref_x[:, :, None]) * c2 - lx)
            g = _drop_rows(q * grad_scale, kept[:, None, None], HAS_KEEP)
            tl.store(g_rows[:, :, None] + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # every dense store of this program lands before the kept classes are rewritten
        q_idx = tl.exp(sd - log_d_s[:, None])
        g_idx = _drop_rows((q_idx - p) * grad_scale, kept[:, None], HAS_KEEP)
        tl.store(g_rows + idx, g_idx.to(grad_ptr.dtype.element_ty), mask=live & in_range)
