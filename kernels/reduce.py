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
