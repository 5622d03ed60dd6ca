"""Device code: the teacher value checks that the torch-path ops run on CUDA, in one launch.

Given one value per teacher row (its maximum, or a fused kernel's row status), the program ORs into
the error word: 1 if a value is NaN (a NaN logit makes the row max NaN), 2 if +inf, 4 if -inf (the
whole row is -inf). One atomic per program, and only when something is wrong.
"""

import triton
import triton.language as tl


@triton.jit
def _flag_rows_kernel(
    v_ptr,  # one value per row (float), contiguous
    n,  # values
    err_ptr,  # in/out: int32 error word
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(v_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    word = (tl.max(tl.where(v != v, 1, 0), axis=0) | tl.max(tl.where(v == float("inf"), 2, 0), axis=0)
            | tl.max(tl.where(v == float("-inf"), 4, 0), axis=0))
    tl.atomic_or(err_ptr, word, mask=word != 0)
