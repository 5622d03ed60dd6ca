"""Device code: a deterministic sum of per-program partial sums inside the launch that made them.

Every program stores its partial sum, then calls ``_last_program_sums``: the last program to finish
(an atomic count of finished programs) adds all partials in a fixed order and resets the count, so a
loss needs no separate reduction launch (the small-step, Gaussian and loss-on-logits kernels).
"""

import triton
import triton.language as tl


@triton.jit
def _last_program_sums(part_ptr, n_parts, out_ptr, count_ptr, out_scale, BLOCK_P: tl.constexpr):
    """Called by every program after storing its partial sum: the last one to finish writes the n_parts
    partials' sum times out_scale to out_ptr (the threadfence-reduction pattern). Each program's store
    is ordered before its count increment (barrier, then a release at GPU scope); the program that takes
    the count to n_parts acquires them all, reads the partials past L1, and sets the count back to 0 for
    the next launch on this stream (or the next graph replay)."""
    tl.debug_barrier()
    finished = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if finished == n_parts - 1:
        tl.store(out_ptr, _sum_parts(part_ptr, n_parts, BLOCK_P) * out_scale)
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _sum_parts(part_ptr, n_parts, BLOCK_P: tl.constexpr):
    """The n_parts fp32 partial sums at part_ptr summed in a fixed order (BLOCK_P at a time, read past L1)."""
    total = tl.zeros((BLOCK_P,), tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        total += tl.load(part_ptr + ps, mask=ps < n_parts, other=0.0, cache_modifier=".cg")
    return tl.sum(total, axis=0)


@triton.jit
def _kept_mean_factor(nkept_ptr, batch_rows, MEAN_KEPT: tl.constexpr):
    """"mean" over the rows a row mask keeps (MEAN_KEPT): the factor batch_rows / max(kept rows, 1) that turns
    a reduction coefficient of 1/(B*M) into 1/(B_kept*M), the count read on the device (an integer scalar at
    nkept_ptr, the mask's sum); 1 otherwise."""
    if MEAN_KEPT:
        return batch_rows / tl.maximum(tl.load(nkept_ptr).to(tl.float32), 1.0)
    else:
        return 1.0


@triton.jit
def _dot_range(a_ptr, b_ptr, n, pid, n_progs, BLOCK: tl.constexpr):
    """Per-lane fp32 sums of a[i] * b[i] over program pid's share of [0, n) (BLOCK-element blocks, a grid stride),
    a NaN product counted as 0 (0 * inf, 0 * NaN: see _neg_dots_over_kernel); infinities kept."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(pid * BLOCK, n, n_progs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32) * \
            tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(p == p, p, 0.0)
    return acc


@triton.jit
def _neg_dots_over_kernel(
    t_ptr,  # a one-element floating tensor t (a learned temperature)
    a_ptr,  # up to three pairs of contiguous tensors (n_* = 0: not there): gradient and input of each
    b_ptr,
    n_a,
    c_ptr,
    d_ptr,
    n_c,
    e_ptr,
    f_ptr,
    n_e,
    part_ptr,  # (programs,) fp32 partial sums
    out_ptr,  # out: one element, t's dtype: -(<a, b> + <c, d> + <e, f>) / t
    count_ptr,  # int32 count of finished programs, 0 before and after the launch
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """d/dT of the x_i / (T / T0) at T = T0 (functional._LearnedT): -sum_i <g_i, x_i> / T for their gradients g_i;
    one read of each tensor, nothing of their size written (the torch form made a product of the largest, a
    teacher's logits, and 16-bit ones in fp32 first); the products of a pair summed in fp32, in a fixed order
    (the last program sums the partials: deterministic)."""
    pid = tl.program_id(0).to(tl.int64)
    n_progs = tl.num_programs(0)
    acc = _dot_range(a_ptr, b_ptr, n_a, pid, n_progs, BLOCK)
    acc += _dot_range(c_ptr, d_ptr, n_c, pid, n_progs, BLOCK)
    acc += _dot_range(e_ptr, f_ptr, n_e, pid, n_progs, BLOCK)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))
    _last_program_sums(part_ptr, n_progs, out_ptr, count_ptr, -1.0 / tl.load(t_ptr), BLOCK_P)
