"""Device code: the teacher checks that run on CUDA outside the loss kernels, each in one launch.

`_flag_rows_kernel`: given one value per teacher row (its maximum, or a fused kernel's row status), the program ORs
into the error word: 1 if a value is NaN (a NaN logit makes the row max NaN), 2 if +inf, 4 if -inf (the whole row
is -inf). `_flag_topk_kernel`: a top-k teacher's class ids (in range, distinct in a row) and, where asked, its
values. One atomic per program, and only when something is wrong.
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


@triton.jit
def _flag_topk_kernel(
    v_ptr,  # top-k values (B, M, K): strides stride_vb, stride_vm, unit along K
    i_ptr,  # their class ids (B, M, K), int32 or int64: strides stride_ib, stride_im, unit along K
    err_ptr,  # in/out: int32 error word
    R,  # rows, B * M
    M,
    K,
    C,  # classes: an id must lie in [0, C)
    stride_vb,
    stride_vm,
    stride_ib,
    stride_im,
    BAD_INDEX: tl.constexpr,  # the bit of an id outside [0, C) (any entry's, padding's too)
    REPEATED_INDEX: tl.constexpr,  # the bit of a class kept twice in a row (live entries: value not -inf)
    BLOCK_R: tl.constexpr,  # rows a program
    BLOCK_K: tl.constexpr,  # K, padded to a power of two
    BLOCK_J: tl.constexpr,  # the entries each entry is compared with at a time (BLOCK_R * BLOCK_K * BLOCK_J pairs)
    VALUES: tl.constexpr,  # also the values: 1 a NaN, 2 a +inf, 4 a row that is -inf in every entry
):
    """A top-k teacher's checks, BLOCK_R of its (b, m) rows a program: ids in range and distinct among a row's live
    entries (every pair compared, the row's ids reloaded BLOCK_J at a time), and with VALUES its values as the
    loss kernels check a dense row. One atomic per program, and only when something is wrong."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    v_row = v_ptr + (rows // M) * stride_vb + (rows % M) * stride_vm
    i_row = i_ptr + (rows // M) * stride_ib + (rows % M) * stride_im
    ks = tl.arange(0, BLOCK_K)
    ok = row_ok[:, None] & (ks < K)[None, :]
    v = tl.load(v_row[:, None] + ks[None, :], mask=ok, other=float("-inf"))  # (its own dtype: fp64 past fp32's range)
    idx = tl.load(i_row[:, None] + ks[None, :], mask=ok, other=0).to(tl.int64)
    live = ok & (v != float("-inf"))
    word = tl.max(tl.max(tl.where(ok & ((idx < 0) | (idx >= C)), BAD_INDEX, 0), axis=1), axis=0)
    pairs = tl.zeros((BLOCK_R,), tl.int32)
    for j0 in range(0, K, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        ok_j = row_ok[:, None] & (js < K)[None, :]
        v_j = tl.load(v_row[:, None] + js[None, :], mask=ok_j, other=float("-inf"))
        i_j = tl.load(i_row[:, None] + js[None, :], mask=ok_j, other=0).to(tl.int64)
        same = ((idx[:, :, None] == i_j[:, None, :]) & live[:, :, None] & (ok_j & (v_j != float("-inf")))[:, None, :]
                & (ks[:, None] < js[None, :])[None, :, :])
        pairs += tl.sum(tl.sum(same.to(tl.int32), axis=2), axis=1)
    word |= tl.where(tl.max(pairs, axis=0) > 0, REPEATED_INDEX, 0)
    if VALUES:  # a NaN anywhere, a +inf anywhere, a row of -inf only (each seen whatever else its row holds)
        word |= tl.where(tl.max(tl.max((v != v).to(tl.int32), axis=1), axis=0) > 0, 1, 0)
        word |= tl.where(tl.max(tl.max((v == float("inf")).to(tl.int32), axis=1), axis=0) > 0, 2, 0)
        n_live = tl.sum(live.to(tl.int32), axis=1)
        word |= tl.max(tl.where(row_ok & (n_live == 0), 4, 0), axis=0)
    tl.atomic_or(err_ptr, word, mask=word != 0)
