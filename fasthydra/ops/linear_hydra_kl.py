"""Head GEMMs fused with the Hydra loss: the GPU path (cuBLAS GEMMs around the Triton loss kernel, or
the small-step kernels) and the chunked torch path.

They walk the batch in row chunks or head groups (the torch path, for large C, the classes in
blocks). For each chunk the logits are formed, turned into loss rows and the logits gradient
T * (q - p) * coefficient, and the gradient is at once contracted into the input gradient and the
weight and bias gradients. No more than one chunk's or group's logits exist at a time; the backward
only scales the stored gradients (the autograd wiring is the custom op ``fasthydra::linear_hydra_kl``
in library.py).

The input is shared by all heads, x (B, K), for linear heads (one GEMM over the stacked (M*C, K)
weight), or per head, u (B, M, K), for the second layer of MLP heads (the grouped GEMM).
"""

from __future__ import annotations

import torch

from . import _common, native
from ._common import (
    CUBLAS_GROUP_ELEMENTS,
    TORCH_CHUNK_ELEMENTS,
    cdiv,
    compute_dtype,
    empty_stored_grad,
    kl_rows_config,
    temperature_factor,
    rows_per_chunk,
    small_heads_config,
    small_step_mode,
    stored_grad_dtype,
)
from .checks import after_launch
from .small_heads import linear_hydra_kl_forward_small
from .hydra_kl import (
    A_SCALE,
    _teacher_grad,
    kept_mean_factor,
    kl_chunk_topk_torch,
    kl_chunk_torch,
    kl_from_sums,
    launch_kl_grad_cols,
    launch_kl_rows,
    launch_kl_rows_topk,
    reduce_rows,
    reduction_coefficient,
    topk_kl_rows,
    topk_teacher,
)


def _results(rows, inp, weight, bias, grad_in, grad_w32, grad_b32, reduction, grad_t=None):
    """(loss, grad_in, grad_weight, grad_bias, grad_teacher) with the gradients in their parameters' stored
    dtypes (``stored_grad_dtype``: fp32 for fp16 parameters until the backward has scaled them)."""
    return (reduce_rows(rows, reduction, rows.dtype), grad_in,  # loss in the compute dtype: the caller casts
            None if grad_w32 is None else grad_w32.to(stored_grad_dtype(weight.dtype)),
            None if grad_b32 is None else grad_b32.to(stored_grad_dtype(bias.dtype)), grad_t)


# Row blocks thinner than this make every GEMM re-read the whole weight for a handful of rows (large
# C): the torch path then takes one head at a time (_head_chunk_rows), or where even that is too big,
# keeps up to TILED_BLOCK_ROWS rows and walks the classes in tiles instead.
MIN_CHUNK_ROWS = 128
TILED_BLOCK_ROWS = 1024
# Elements of one (M, rows, tile) logits tile in that mode: a few MiB, so the tile and its softmax
# temporaries stay in cache between the GEMM that makes them and the GEMMs that consume them.
TILE_ELEMENTS = 1 << 19


def _online_kl_stats(s, u, inv_t, stats):
    """Folds one class tile into the per-row statistics, as the Triton kernel does (see
    kernels/softmax_kl.py): running maxima m_s, m_u of the raw logits, sums d_s = sum exp((s - m_s) / T), d_u
    likewise and a = sum exp((u - m_u) / T) * ((u - m_u) - (s - m_s)) * A_SCALE (the kernels' unit: a sum of up
    to C terms each as large as the largest difference must not overflow; kl_from_sums takes it; the
    differences raw, scaled by T only there). s and u (raw) are consumed."""
    m_s, d_s, m_u, d_u, a = stats
    new_ms = torch.maximum(m_s, s.amax(-1))
    new_mu = torch.maximum(m_u, u.amax(-1))
    ref_s = torch.where(torch.isneginf(new_ms), 0.0, new_ms)
    ref_u = torch.where(torch.isneginf(new_mu), 0.0, new_mu)
    shift = (ref_u - m_u) - (ref_s - m_s)
    scale_u = torch.exp((m_u - ref_u) * inv_t)
    # 0 where nothing was kept so far, or the old maximum lies so far below the new one (a first tile masked at
    # torch.finfo's min) that its terms vanish: d_u * shift may overflow there, and 0 * inf would be NaN
    a = torch.where(scale_u == 0, 0.0, scale_u * (a - d_u * (shift * A_SCALE)))
    d_s = d_s * torch.exp((m_s - ref_s) * inv_t)
    d_u = d_u * scale_u
    sh_s = s.sub_(ref_s.unsqueeze(-1))
    sh_u = u.sub_(ref_u.unsqueeze(-1))
    e_u = (sh_u * inv_t).exp_()
    d_u = d_u + e_u.sum(-1)
    a = a + sh_u.sub_(sh_s).mul_(e_u).nan_to_num_(nan=0.0).mul_(A_SCALE).sum(-1)  # masked classes: 0 * -inf -> 0
    d_s = d_s + sh_s.mul_(inv_t).exp_().sum(-1)
    return new_ms, d_s, new_mu, d_u, a


def _tiled_setup(xc, w, temperature, shared):
    """Shapes, 1/T, compute dtype, the (M, rows, K) inputs and the class tile of a class-tiled row block."""
    m, c, k = w.shape
    bc = xc.shape[0]
    xs = xc.unsqueeze(0).expand(m, bc, k) if shared else xc.transpose(0, 1)  # (M, rows, K)
    return m, c, k, bc, 1.0 / temperature, w.dtype, xs, max(16, TILE_ELEMENTS // max(bc * m, 1))


def _class_tiled_block(xc, w, bias_c, tb, temperature, want_grad, shared, beta, scale, grads, tgrad=None):
    """One row block with the classes in tiles: pass 1 collects the online softmax/KL statistics
    tile by tile, pass 2 recomputes each logits tile and turns it into gradients at once. Four
    GEMMs instead of three, but no chunk ever re-reads the whole weight for a few rows, and only
    one (M, rows, tile) logits tile is alive at a time. tgrad (rows, M, C), when given, receives the
    teacher's gradient scale * p * (log p - log q - KL), formed around the teacher's most probable
    class as the Triton kernel does (no cancellation at large logits; one more pass, see
    kernels/softmax_kl.py). Returns the loss rows (rows, M).

    fp32 on the CPU with a frozen fp32 teacher: each pass is one C sweep per tile row (native.tile_stats,
    native.tile_grad) instead of about ten torch ops over the tile."""
    m, c, k, bc, inv_t, cdt, xs, tile = _tiled_setup(xc, w, temperature, shared)
    in_c = tgrad is None and native.tile_usable(xc, tb)

    def tiles():
        for c0 in range(0, c, tile):
            c1 = min(c, c0 + tile)
            s = torch.baddbmm(bias_c[:, None, c0:c1], xs, w[:, c0:c1].transpose(1, 2))  # raw logits
            if in_c:  # the raw teacher, seen as (M, rows, tile)
                yield c0, c1, s, tb[:, :, c0:c1].transpose(0, 1)
                continue
            # a new tensor: never write the caller's teacher
            yield c0, c1, s, tb[:, :, c0:c1].permute(1, 0, 2).to(cdt, copy=True)

    if in_c:
        return _class_tiled_in_c(tiles, m, bc, temperature, want_grad, shared, xs, w, beta, scale, grads)

    inf = torch.full((m, bc), float("-inf"), dtype=cdt, device=xc.device)
    zero = torch.zeros((m, bc), dtype=cdt, device=xc.device)
    stats = (inf, zero, inf, zero, zero)
    s_at = zero.clone()  # the student's logit at the teacher's most probable class
    for _, _, s, u in tiles():
        if tgrad is not None:
            tile_max = u.amax(-1)
            here = torch.where(u == tile_max.unsqueeze(-1), s, float("-inf")).amax(-1)
            s_at = torch.where(tile_max > stats[2], here, s_at)
        stats = _online_kl_stats(s, u, inv_t, stats)
    m_s, d_s, m_u, d_u, a = stats
    log_d_s, log_d_u = d_s.log(), d_u.log()
    loss = kl_from_sums(a, d_s, d_u, temperature).T
    # Log-probabilities as (logit - row max) - log d: the large max cancels exactly first, so a logit
    # of 1e3 does not cost the small log d its digits (as logit - (max + log d) would).
    ref_u = torch.where(torch.isneginf(m_u), 0.0, m_u).unsqueeze(-1)
    ref_s, log_d_s, log_d_u = m_s.unsqueeze(-1), log_d_s.unsqueeze(-1), log_d_u.unsqueeze(-1)
    if tgrad is not None:  # sum_k p_k e_k with e = (u - u_j) - (s - s_j), j the pivot (raw: T e)
        mean_e = torch.zeros_like(d_u)
        for _, _, s, u in tiles():
            e = (u - ref_u).sub_(s.sub_(s_at.unsqueeze(-1)))
            mean_e += e.mul_(u.sub_(ref_u).mul_(inv_t).sub_(log_d_u).exp_()).nan_to_num_(nan=0.0).sum(-1)
    if not want_grad and tgrad is None:
        return loss

    def grads_of_tiles():
        for c0, c1, s, u in tiles():
            e = (u - ref_u).sub_(s - s_at.unsqueeze(-1)) if tgrad is not None else None
            log_q = s.sub_(ref_s).mul_(inv_t).sub_(log_d_s)
            log_p = u.sub_(ref_u).mul_(inv_t).sub_(log_d_u)
            if tgrad is not None:  # p * (e - sum_k p_k e_k); masked classes: 0 * -inf = NaN, truly 0
                h = e.sub_(mean_e.unsqueeze(-1)).mul_(log_p.exp()).nan_to_num_(nan=0.0)
                torch.mul(h.transpose(0, 1), scale * inv_t, out=tgrad[:, :, c0:c1])  # (e raw: T e)
            if want_grad:
                yield c0, c1, log_q.exp_().sub_(log_p.exp_())  # q - p, (M, rows, tile)

    if not want_grad:
        for _ in grads_of_tiles():  # the teacher's gradient only
            pass
        return loss
    _tiles_into_grads(grads_of_tiles(), shared, xs, w, beta, scale, grads)
    return loss


def _class_tiled_in_c(tiles, m, bc, temperature, want_grad, shared, xs, w, beta, scale, grads):
    """_class_tiled_block's two passes in the C tile kernels (fp32 on the CPU, a frozen fp32 teacher):
    tiles() yields (c0, c1, raw student tile, raw teacher view), both (M, rows, tile)."""
    stats = native.tile_stats_init(m * bc)
    for _, _, s, t in tiles():
        native.tile_stats(s, t, stats, temperature)
    m_s, d_s, m_t, d_u, a = stats
    log_d_s, log_d_u = d_s.log(), d_u.log()
    loss = kl_from_sums(a, d_s, d_u, temperature).view(m, bc).T
    if want_grad:
        _tiles_into_grads(((c0, c1, native.tile_grad(s, t, m_s, log_d_s, m_t, log_d_u, temperature))
                           for c0, c1, s, t in tiles()), shared, xs, w, beta, scale, grads)
    return loss


def _tiles_into_grads(tile_grads, shared, xs, w, beta, scale, grads) -> None:
    """(c0, c1, q - p) tiles contracted into the input, weight and bias gradients (grads: their buffers, and
    the block's rows left out by a row mask, or None)."""
    grad_in, grad_w32, grad_b32, drop = grads
    gx = torch.zeros_like(xs) if grad_in is not None else None
    for c0, c1, g in tile_grads:
        if drop is not None:  # (M, rows, tile)
            g.masked_fill_(drop[None, :, None], 0.0)
        _tile_into_grads(g, c0, c1, w, xs, gx, grad_w32, grad_b32, beta, scale)
    if gx is not None:  # scaled as it is stored (the products summed unscaled)
        torch.mul(gx.sum(0) if shared else gx.transpose(0, 1), scale, out=grad_in)


def _tile_into_grads(g, c0, c1, w, xs, gx, grad_w32, grad_b32, beta, scale) -> None:
    """One (M, rows, tile) logits-gradient tile contracted into the input, weight and bias gradients."""
    if gx is not None:
        gx.baddbmm_(g, w[:, c0:c1])
    if grad_w32 is not None:
        grad_w32[:, c0:c1].baddbmm_(g.transpose(1, 2), xs, beta=beta, alpha=scale)
    if grad_b32 is not None:
        grad_b32[:, c0:c1].add_(g.sum(1), alpha=scale)


def _class_tiled_block_topk(xc, w, bias_c, vb, ib, temperature, want_grad, shared, beta, scale, grads, tgrad=None):
    """_class_tiled_block for a top-k teacher (values vb, indices ib, (rows, M, k)): pass 1 keeps the
    student's online max and sum and gathers its logits at the kept classes tile by tile; pass 2 forms
    q tile by tile minus p~ at the kept classes that fall in it. Returns the loss rows (rows, M)."""
    m, c, k, bc, inv_t, cdt, xs, tile = _tiled_setup(xc, w, temperature, shared)
    v, p, log_d_v = topk_teacher(vb.permute(1, 0, 2), cdt, inv_t)  # (M, rows, k), raw, max 0
    idx = ib.permute(1, 0, 2).long()

    def tiles():
        for c0 in range(0, c, tile):
            c1 = min(c, c0 + tile)
            here = (idx >= c0) & (idx < c1)
            local = (idx - c0).clamp_(0, c1 - c0 - 1)
            yield c0, c1, torch.baddbmm(bias_c[:, None, c0:c1], xs, w[:, c0:c1].transpose(1, 2)), here, local

    m_s = torch.full((m, bc, 1), float("-inf"), dtype=cdt, device=xc.device)
    d_s = torch.zeros((m, bc, 1), dtype=cdt, device=xc.device)
    s_idx = torch.zeros_like(v)
    for _, _, s, here, local in tiles():
        s_idx = torch.where(here, s.gather(-1, local), s_idx)
        new_m = torch.maximum(m_s, s.amax(-1, keepdim=True))
        d_s = d_s * torch.exp((m_s - new_m) * inv_t) + s.sub_(new_m).mul_(inv_t).exp_().sum(-1, keepdim=True)
        m_s = new_m
    log_d_s = d_s.log()
    loss = topk_kl_rows(v, p, s_idx - m_s, log_d_s - log_d_v, temperature).T
    if tgrad is not None:  # (raw differences: T times the gradient's bracket)
        torch.mul(_teacher_grad(v - s_idx, p).transpose(0, 1), scale * inv_t, out=tgrad)
    if not want_grad:
        return loss
    _tiles_into_grads(((c0, c1, s.sub_(m_s).mul_(inv_t).sub_(log_d_s).exp_()
                        .scatter_add_(-1, local, torch.where(here, -p, 0.0)))
                       for c0, c1, s, here, local in tiles()), shared, xs, w, beta, scale, grads)  # q - p~
    return loss


def linear_hydra_kl_forward_torch(inp, weight, bias, teacher, temperature: float, reduction: str, shared: bool,
                                  need_in: bool, need_w: bool, need_b: bool, need_t: bool = False,
                                  teacher_indices=None, row_mask=None):
    """Fused heads + Hydra loss in torch ops, walking the batch in row blocks.

    Wide row blocks (small and mid C): one addmm (shared input) or baddbmm (per head) per block,
    then the loss and q - p from two softmaxes, contracted at once into the gradients. The logits stay
    raw (the loss takes its differences before 1/T: kl_chunk_torch) and T * coefficient rides on the
    gradient GEMMs' alpha, so it costs no pass over the block. Large C (a row block of all heads would be
    thin): one head at a time in row chunks (``_head_chunk_rows``); past that, the classes are tiled
    inside each block with online softmax statistics (see ``_class_tiled_block``). With need_t the teacher's
    gradient comes out of the same pass. A top-k teacher (teacher = its values, teacher_indices its
    class ids) is read as it is, never made dense. row_mask (B,) bool: rows left out get zero loss rows
    and gradients (their logits gradient zeroed before the gradient GEMMs; the coefficient stays).
    Returns (loss, grad_in, grad_weight, grad_bias, grad_teacher), the gradients None where not asked for.
    A tensor temperature is read as a number first (T * coefficient is the GEMMs' alpha): on a
    GPU that read waits for the device, so a GPU step keeps it off this path (the Triton path, the default
    there, reads T on the device).
    """
    if isinstance(temperature, torch.Tensor):
        temperature = float(temperature)
    m, c, k = weight.shape
    b = inp.shape[0]
    cdt = compute_dtype(inp.dtype)
    want_grad = need_in or need_w or need_b
    scale = temperature * reduction_coefficient(reduction, b * m)
    w = weight.to(cdt)
    wf = w.reshape(m * c, k)
    bias_c = torch.zeros(m, c, dtype=cdt, device=inp.device) if bias is None else bias.to(cdt)
    rows = torch.empty(b, m, dtype=cdt, device=inp.device)
    grad_in = torch.empty(inp.shape, dtype=cdt, device=inp.device) if need_in else None
    # Weight and bias gradients: the first row block writes (beta=0), later blocks accumulate.
    grad_w32 = torch.empty(m, c, k, dtype=cdt, device=inp.device) if need_w else None
    grad_b32 = torch.zeros(m, c, dtype=cdt, device=inp.device) if need_b else None
    grad_t = teacher.new_empty(teacher.shape) if need_t else None
    topk = None if teacher_indices is None else teacher_indices.long()
    drop = None if row_mask is None else ~row_mask
    inp = _zero_dropped_input(inp, drop, shared)
    step = rows_per_chunk(b, m * c, TORCH_CHUNK_ELEMENTS)
    per_group = m  # heads per chunk: all of them, or one at a time where all would make thin row blocks
    tiled = step < min(b, MIN_CHUNK_ROWS)
    if tiled and (want_grad or need_t) and (head_rows := _head_chunk_rows(b, c)):
        step, per_group, tiled = head_rows, 1, False
    elif tiled:
        step = min(b, TILED_BLOCK_ROWS)
    if need_w and b == 0:
        grad_w32.zero_()
    for r0 in range(0, b, step):
        xc = inp[r0:r0 + step].to(cdt)
        bc = xc.shape[0]
        beta = 0.0 if r0 == 0 else 1.0
        if tiled:
            block_grads = (None if grad_in is None else grad_in[r0:r0 + step], grad_w32, grad_b32,
                           None if drop is None else drop[r0:r0 + step])
            t_block = None if grad_t is None else grad_t[r0:r0 + step]
            if topk is not None:
                rows[r0:r0 + step] = _class_tiled_block_topk(xc, w, bias_c, teacher[r0:r0 + step],
                                                             topk[r0:r0 + step], temperature, want_grad, shared,
                                                             beta, scale, block_grads, t_block)
            else:
                rows[r0:r0 + step] = _class_tiled_block(xc, w, bias_c, teacher[r0:r0 + step], temperature,
                                                        want_grad, shared, beta, scale, block_grads, t_block)
            continue
        for h0 in range(0, m, per_group):
            h1 = min(m, h0 + per_group)
            hs, rs = slice(h0, h1), slice(r0, r0 + step)
            if shared:  # the group's heads in one GEMM over their stacked (g*C, K) weight; raw logits
                wg = wf[h0 * c:h1 * c]
                s = torch.addmm(bias_c[hs].reshape(1, -1), xc, wg.T).view(bc, h1 - h0, c)
            else:  # grouped GEMM: head m multiplies its own input u[:, m]
                s = torch.baddbmm(bias_c[hs].unsqueeze(1), xc[:, hs].transpose(0, 1),
                                  w[hs].transpose(1, 2)).transpose(0, 1)
            if topk is not None:
                loss, g, tg = kl_chunk_topk_torch(s, teacher[rs, hs], topk[rs, hs], temperature, want_grad, need_t,
                                                  scale)
            else:
                loss, g, tg = kl_chunk_torch(s, teacher[rs, hs], temperature, want_grad, need_t, scale)
            del s
            if drop is not None and g is not None:  # rows left out: no gradient (whatever their values)
                g.masked_fill_(drop[rs, None, None], 0.0)
            rows[rs, hs] = loss
            if need_t:
                grad_t[rs, hs] = tg  # scaled already
            if not want_grad:
                continue
            if shared:
                g2 = g.view(bc, (h1 - h0) * c)
                if need_in:  # the head groups' products summed, each scaled by the GEMM's alpha
                    grad_in[rs].addmm_(g2, wg, beta=0.0 if h0 == 0 else 1.0, alpha=scale)
                if need_w:
                    grad_w32.view(m * c, k)[h0 * c:h1 * c].addmm_(g2.T, xc, beta=beta, alpha=scale)
            else:
                gm = g.transpose(0, 1)  # (g, bc, C)
                if need_in:  # written in place through the (g, rows, K) view: no (rows, g, K) temporary and copy
                    grad_in[rs, hs].transpose(0, 1).baddbmm_(gm, w[hs], beta=0.0, alpha=scale)
                if need_w:
                    grad_w32[hs].baddbmm_(gm.transpose(1, 2), xc[:, hs].transpose(0, 1), beta=beta, alpha=scale)
            if need_b:
                grad_b32[hs].add_(g.sum(0), alpha=scale)
    if grad_in is not None:  # (scaled already: the GEMMs' alpha, or the tiles' store)
        grad_in = grad_in.to(stored_grad_dtype(inp.dtype))
    _drop_rows(drop, rows, grad_t)
    return _results(rows, inp, weight, bias, grad_in, grad_w32, grad_b32, reduction, grad_t)


def _zero_dropped_input(inp, drop, shared: bool):
    """A shared input (B, K) with the rows a row mask leaves out (drop: (B,) bool, or None) set to 0, a new
    tensor (one pass over x): whatever they held (NaN at a padding position included), those rows' logits
    are then the bias alone, finite, and they add exactly 0 to the weight gradient. Per-head inputs (MLP
    heads' hidden activations, non-zero there even for a zero x) are left as they are: their logits
    gradient is zeroed instead."""
    if drop is None or not shared:
        return inp
    return inp.masked_fill(drop[:, None], 0.0)


def _drop_rows(drop, loss_rows, grad_t) -> None:
    """A row mask's rows left out (drop: (B,) bool, or None): their (B, M) loss rows and teacher gradient
    zeroed in place (NaN or not)."""
    if drop is None:
        return
    loss_rows.masked_fill_(drop[:, None], 0.0)
    if grad_t is not None:
        grad_t.masked_fill_(drop[:, None, None], 0.0)


def _head_chunk_rows(b: int, c: int) -> int:
    """Rows of a one-head chunk on the torch path where a chunk of all heads would be a thin row block
    (large C): about half the chunk budget, at least MIN_CHUNK_ROWS rows (thinner blocks re-read the
    head's weight too often), at most the whole budget; 0 where even that does not fit (then the
    classes are tiled). Three GEMMs per chunk, as in the row mode, where the class-tiled mode needs four:
    at (256, 256, 4, 32000) on this project's CPU about 466 ms against 570 (bench/RESULTS.md). For the
    loss alone (no gradient) both modes make one GEMM per logit, and the class tiles' one-sweep
    statistics win (about 192 against 230 ms there): the caller keeps class tiles then."""
    rows = max(rows_per_chunk(b, c, TORCH_CHUNK_ELEMENTS // 2), min(b, MIN_CHUNK_ROWS))
    return rows if rows * c <= TORCH_CHUNK_ELEMENTS else 0


def _head_groups(b: int, m: int, c: int) -> tuple[int, int]:
    """(heads per group, rows per chunk) on the cuBLAS path: all heads and all rows when their logits fit
    CUBLAS_GROUP_ELEMENTS; else fewer heads per group (each head's dW still complete in one GEMM);
    rows are chunked only when one head's (B, C) block alone does not fit."""
    per_head = max(b * c, 1)
    heads = max(1, min(m, CUBLAS_GROUP_ELEMENTS // per_head))
    rows = b if per_head <= CUBLAS_GROUP_ELEMENTS else max(1, CUBLAS_GROUP_ELEMENTS // max(c, 1))
    return heads, max(rows, 1)


def linear_hydra_kl_forward_cublas(inp, weight, bias, teacher, temperature: float, reduction: str, shared: bool,
                                   need_in: bool, need_w: bool, need_b: bool, need_t: bool = False,
                                   teacher_indices=None, row_mask=None):
    """Heads + Hydra loss as cuBLAS GEMMs around the one-pass Triton loss kernel (the GPU default).

    Per head group (all M heads unless their logits are too big, see ``_head_groups``):
      1. the group's logits in one GEMM over its stacked (g*C, K) weight (addmm, the bias in cuBLASLt's
         epilogue; the per-head inputs of MLP heads' second layer: one bmm, the bias added by the loss
         kernel on its loads), written into one reused buffer;
      2. one Triton pass turns that buffer in place into the loss rows and the gradient
         T * coef * (q - p) (tempered softmax + per-head KL + gradient; teacher checked on the way);
         with SPLIT_BIAS_PASS on (off: slower on the H200), a bias and rows too long for registers, two
         launches instead: the loss rows and row normalisers, then dz with its column sums, db;
      3. cuBLAS again: dW of the group's heads complete in one GEMM, written once in the weight dtype
         (an fp32 accumulator for the group's slice only when rows had to be chunked); dx = dz @ W,
         accumulated in fp32 across groups; db as an fp32 column sum unless step 2 formed it.
    Where one launch of step 2 covers every row, its last program reduces the loss ("mean"/"sum").
    Only one group's logits exist at a time; with no gradient wanted nothing (B, M, C)-sized is kept.
    With need_t the same pass writes the teacher's gradient. A top-k teacher (teacher = values,
    teacher_indices = class ids) runs the top-k loss kernel instead: the same GEMMs, M*k teacher
    entries read per row instead of M*C. A row mask (B,) bool: a shared input's rows left out are set to 0
    first (one pass over x), so their logits are the bias alone and they add nothing to dW. The loss
    kernel (dense or top-k teacher; the split bias pass's two launches too) reads the mask: loss 0, dz 0 and
    teacher gradient 0 on those rows; dx and db follow; "mean" is over the kept rows (their count read on the
    device).
    Returns (loss, grad_in, grad_weight, grad_bias, grad_teacher), None where not asked for.
    """
    m, c, k = weight.shape
    b = inp.shape[0]
    dev, dt = inp.device, inp.dtype
    if row_mask is not None and shared:  # (per-head inputs are left as they are: the loss kernel zeroes their dz)
        inp = _zero_dropped_input(inp, ~row_mask, shared)
    weight = weight.contiguous()
    if bias is not None and bias.stride(-1) != 1:  # the loss kernels read a bias row with unit stride along C
        bias = bias.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    topk = None
    if teacher_indices is not None:
        topk = teacher_indices if teacher_indices.stride(-1) == 1 else teacher_indices.contiguous()
    want_grad = need_in or need_w or need_b
    coef = reduction_coefficient(reduction, b * m)
    # fp16 inputs: dz kept unnormalised (T (q - p), in fp16's range whatever B*M), the coefficient applied in
    # fp32 by the gradient GEMMs, whose outputs stay fp32 (stored_grad_dtype) until the backward has scaled them
    wide = want_grad and stored_grad_dtype(dt) != dt
    grad_scale = temperature_factor(temperature) * (1.0 if wide else coef)
    loss = torch.empty(b, m, dtype=torch.float32, device=dev)
    grad_t = torch.empty(teacher.shape, dtype=teacher.dtype, device=dev) if need_t else None
    heads, rows = _head_groups(b, m, c)
    n_groups, n_chunks = cdiv(m, heads), max(1, cdiv(b, rows))
    # "mean"/"sum" where one launch of the loss kernel (dense or top-k) covers every row: its last program sums
    # them (no reduction launch); otherwise one reduction of the loss rows at the end.
    # A row mask is read by the loss kernel itself (loss 0 and dz 0 on the rows left out), and "mean" is over
    # the rows it keeps: their count summed on the device, the loss kernel scaling dz and its in-kernel sum by
    # B / count. fp16's unnormalised dz (wide) keeps that factor out of 16 bits (one kept row in a large batch
    # would overflow): there the gradients and the loss take it at the end.
    keep_u8 = None if row_mask is None else row_mask.view(torch.uint8)
    nkept = row_mask.sum() if row_mask is not None and reduction == "mean" else None
    kept_mean = None if nkept is None or wide else (nkept, b)
    reduced = None
    if reduction != "none" and b * m > 0 and n_groups * n_chunks == 1:
        reduced = torch.empty((), dtype=torch.float32, device=dev)
    reduce_to = None if reduced is None else (reduced, reduction_coefficient(reduction, b * m))
    # The group's logits, turned into dz in place
    buf = torch.empty(min(rows, b) * heads * c, dtype=dt, device=dev)
    grad_w = empty_stored_grad(weight) if need_w else None
    grad_b = torch.empty(m, c, dtype=torch.float32, device=dev) if need_b else None
    # dx: per-head inputs (MLP heads) get disjoint slices per group, so no accumulation; a shared input
    # sums over groups, in fp32 when there is more than one.
    grad_in = grad_in32 = None
    if need_in:
        if shared and n_groups > 1:
            grad_in32 = torch.zeros(inp.shape, dtype=torch.float32, device=dev)
        else:
            grad_in = empty_stored_grad(inp)
    # Bias and long rows (the dense, frozen teacher) with SPLIT_BIAS_PASS on: the loss pass forms dz and db
    # together; the row normalisers between its two launches live in `norms`.
    split_bias = (want_grad and need_b and _common.SPLIT_BIAS_PASS and topk is None and grad_t is None
                  and not kl_rows_config(c, inp.element_size(), not shared and bias is not None)["ROW_IN_REGISTERS"])
    norms = torch.empty(min(rows, b) * heads * 4, dtype=torch.float32, device=dev) if split_bias else None
    if b == 0:
        for g in (grad_w, grad_b):
            if g is not None:
                g.zero_()
    for h0 in range(0, m, heads):
        h1 = min(m, h0 + heads)
        gh = h1 - h0
        wg = weight[h0:h1]
        w2 = wg.view(gh * c, k)
        acc = torch.zeros(gh, c, k, dtype=torch.float32, device=dev) if need_w and n_chunks > 1 else None
        for r0 in range(0, b, rows):
            r1 = min(b, r0 + rows)
            br = r1 - r0
            b3 = None  # a bias for the loss kernel to add (per-head inputs)
            if shared:  # z[b, h, :] for the group: one GEMM over the stacked weight, rows major
                xc = inp[r0:r1]
                z = buf[:br * gh * c].view(br, gh * c)
                if bias is not None:  # a 1-D bias: cuBLASLt adds it in the GEMM's epilogue (a (1, N) one is
                    #                   first copied into every row of z, then read back)
                    torch.addmm(bias[h0:h1].reshape(gh * c), xc, w2.T, out=z)
                else:
                    torch.mm(xc, w2.T, out=z)
                z3 = z.view(br, gh, c)
                t3, l2 = teacher[r0:r1, h0:h1], loss[r0:r1, h0:h1]
                h3 = None if grad_t is None else grad_t[r0:r1, h0:h1]
                i3 = None if topk is None else topk[r0:r1, h0:h1]
            else:  # per-head inputs: one batched GEMM, head major
                xc = inp[r0:r1, h0:h1].transpose(0, 1)  # (gh, br, K)
                z3 = buf[:br * gh * c].view(gh, br, c)
                if bias is not None and topk is not None:
                    torch.baddbmm(bias[h0:h1].unsqueeze(1), xc, wg.transpose(1, 2), out=z3)
                else:  # a dense teacher's loss kernel adds the bias on its loads: no (gh, br, C)
                    #                 bias copy into z3 for the GEMM to read back (bmm has no bias epilogue)
                    torch.bmm(xc, wg.transpose(1, 2), out=z3)
                    if bias is not None:
                        b3 = bias[h0:h1].unsqueeze(1).expand(gh, br, c)
                t3, l2 = teacher[r0:r1, h0:h1].transpose(0, 1), loss[r0:r1, h0:h1].T
                h3 = None if grad_t is None else grad_t[r0:r1, h0:h1].transpose(0, 1)
                i3 = None if topk is None else topk[r0:r1, h0:h1].transpose(0, 1)
            db_parts = None  # partial column sums of dz (heads, row groups, C) when the loss pass forms them
            k2 = None  # the batch rows' mask over the view's (rows, heads) or (heads, rows) axes
            if keep_u8 is not None:
                k2 = keep_u8[r0:r1, None].expand(br, gh) if shared else keep_u8[None, r0:r1].expand(gh, br)
            if topk is not None:
                launch_kl_rows_topk(z3, t3, i3, l2, z3 if want_grad else None, temperature, grad_scale,
                                    "distill_loss", h3, k2, kept_mean, reduce_to)
            elif split_bias:  # head-major views: one program's rows share a head, so db sums per program
                zh, th, lh = (z3.transpose(0, 1), t3.transpose(0, 1), l2.T) if shared else (z3, t3, l2)
                nh = norms[:gh * br * 4].view(gh, br, 4)
                launch_kl_rows(zh, th, lh, None, temperature, grad_scale, "distill_loss", None, b3, norms=nh,
                               reduce_to=reduce_to, keep2=None if k2 is None else k2.transpose(0, 1) if shared else k2,
                               kept_mean=kept_mean)
                db_parts = launch_kl_grad_cols(zh, th, nh, zh, b3, temperature, grad_scale,
                                               None if keep_u8 is None else keep_u8[r0:r1].contiguous(), kept_mean)
            else:
                launch_kl_rows(z3, t3, l2, z3 if want_grad else None, temperature, grad_scale, "distill_loss", h3, b3,
                               reduce_to=reduce_to, keep2=k2, kept_mean=kept_mean)
            if not want_grad:
                continue
            # z3 now holds dL/dz for the group's rows.
            if shared:
                gz = z3.view(br, gh * c)
                if need_w:
                    if wide:
                        into = grad_w[h0:h1] if acc is None else acc
                        _product32(gz.T, xc, coef, into.view(gh * c, k), accumulate=acc is not None and r0 > 0)
                    elif acc is None:
                        torch.mm(gz.T, xc, out=grad_w[h0:h1].view(gh * c, k))
                    else:
                        acc.view(gh * c, k).add_(torch.mm(gz.T, xc))
                if need_in:
                    if wide:
                        _product32(gz, w2, coef, grad_in32[r0:r1] if grad_in32 is not None else grad_in[r0:r1],
                                   accumulate=grad_in32 is not None)
                    elif grad_in32 is not None and n_chunks == 1:
                        grad_in32 = _add_product_fp32(grad_in32, gz, w2)
                    elif grad_in32 is not None:
                        grad_in32[r0:r1].add_(torch.mm(gz, w2))
                    else:
                        torch.mm(gz, w2, out=grad_in[r0:r1])
                if need_b:  # db: dz's rows summed, or the loss pass's partial sums summed
                    src, dim = (gz.view(br, gh, c), 0) if db_parts is None else (db_parts, 1)
                    _sum_rows_into(grad_b[h0:h1], src, dim, r0 == 0)
            else:
                if need_w:
                    if wide:
                        _product32(z3.transpose(1, 2), xc, coef, grad_w[h0:h1] if acc is None else acc,
                                   accumulate=acc is not None and r0 > 0)
                    elif acc is None:
                        torch.bmm(z3.transpose(1, 2), xc, out=grad_w[h0:h1])
                    else:
                        acc.add_(torch.bmm(z3.transpose(1, 2), xc))
                if need_in and wide:
                    _product32(z3, wg, coef, grad_in[r0:r1, h0:h1].transpose(0, 1))
                elif need_in:  # written through its (gh, rows, K) view: cuBLAS takes the strides, no copy
                    grad_in[r0:r1, h0:h1].transpose(0, 1).baddbmm_(z3, wg, beta=0.0)
                if need_b:
                    _sum_rows_into(grad_b[h0:h1], db_parts if db_parts is not None else z3, 1, r0 == 0)
        if acc is not None:
            grad_w[h0:h1] = acc
    after_launch(dev, "distill_loss", teacher.shape)
    if grad_in32 is not None:
        grad_in = grad_in32.to(stored_grad_dtype(dt))
    if wide and grad_b is not None:
        grad_b.mul_(coef)
    if wide and grad_t is not None:
        grad_t.mul_(coef)
    total = reduced if reduced is not None else reduce_rows(loss, reduction, loss.dtype)
    if nkept is not None and (wide or reduced is None):  # "mean" over the kept rows where no kernel applied it
        factor = kept_mean_factor(nkept, b)
        total = total * factor
        for g in (grad_in, grad_w, grad_b, grad_t) if wide else ():
            if g is not None:
                g.mul_(factor)
    return total, grad_in, grad_w, None if grad_b is None else grad_b.to(stored_grad_dtype(bias.dtype)), grad_t


def _add_product_fp32(acc, a, b):
    """acc + a @ b for an fp32 accumulator (dx summed over head groups). 16-bit a, b on CUDA: one cuBLAS
    GEMM with an fp32 output that reads acc as its addend (addmm's out_dtype; FP32_OUT_GEMM), so each
    group's product is neither rounded to 16 bits nor written and read again by a separate add; where
    this torch lacks that form (an fp32 addend came later than out_dtype), the product, then an add."""
    if _common.FP32_OUT_GEMM and _fp32_out_candidate(acc, a):
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # raised on the host, before anything runs
            _common.FP32_OUT_GEMM = False
    return acc.add_(torch.mm(a, b))


# Whether this torch writes an fp32-output GEMM (out_dtype) into a given tensor (out=); else a new one, copied.
_FP32_OUT_INTO = True


def _product32(a, b, alpha: float, out, accumulate: bool = False) -> None:
    """out = alpha * (a @ b) (+ out where accumulate) in fp32, batched for 3-D a: the wide gradients of fp16
    inputs (stored_grad_dtype), from the unnormalised dz = T (q - p), whose product rounded to fp16 could
    leave fp16's range either way. cuBLAS with an fp32 output (out_dtype, FP32_OUT_GEMM) where this torch
    has it, else the operands in fp32."""
    gemm = torch.baddbmm if a.dim() == 3 else torch.addmm
    beta = 1.0 if accumulate else 0.0
    if _common.FP32_OUT_GEMM and a.is_cuda:
        global _FP32_OUT_INTO
        if _FP32_OUT_INTO and out.is_contiguous() and not accumulate:  # in place (beta 0: out's contents ignored)
            try:
                gemm(out, a, b, out_dtype=torch.float32, beta=0.0, alpha=alpha, out=out)
                return
            except (RuntimeError, TypeError):  # raised on the host, before anything runs: the form below
                _FP32_OUT_INTO = False
        try:
            out.copy_(gemm(out, a, b, out_dtype=torch.float32, beta=beta, alpha=alpha))
            return
        except (RuntimeError, TypeError):
            _common.FP32_OUT_GEMM = False
    out.copy_(gemm(out, a.float(), b.float(), beta=beta, alpha=alpha))


def _fp32_out_candidate(acc, a) -> bool:
    """Where addmm's fp32 output for 16-bit operands exists at all: CUDA."""
    return acc.is_cuda and a.dtype in (torch.float16, torch.bfloat16)


def _sum_rows_into(out, src, dim: int, first: bool) -> None:
    """A row chunk's bias gradient into out (heads, C) fp32: src summed over its row axis dim (dz itself,
    or the loss pass's partial column sums); the first chunk writes, later ones accumulate."""
    if first:
        torch.sum(src, dim, dtype=torch.float32, out=out)
    else:
        out += src.sum(dim, dtype=torch.float32)


def small_step_config(inp, weight, teacher_indices) -> dict | None:
    """The small-step path's blocks where it takes this call (a dense teacher, a problem that
    small_heads_config accepts, FASTHYDRA_SMALL_STEP not "0"), else None."""
    if small_step_mode() != "auto" or teacher_indices is not None:
        return None
    return small_heads_config(inp.shape[0], weight.shape[0], weight.shape[1], weight.shape[2], inp.element_size())


def linear_hydra_kl_forward_triton(inp, weight, bias, teacher, temperature: float, reduction: str, shared: bool,
                                   need_in: bool, need_w: bool, need_b: bool, need_t: bool = False,
                                   teacher_indices=None, row_mask=None):
    """Heads + Hydra loss on the Triton path. Small problems (``small_heads_config``: C <= 64, up to
    8192 rows, M*C*K <= 2^20, weight re-reads bounded) with a dense teacher take the two-launch
    path (``linear_hydra_kl_forward_small``) unless FASTHYDRA_SMALL_STEP=0; everything else cuBLAS
    GEMMs around the loss kernel (``linear_hydra_kl_forward_cublas``). (A third design, Triton GEMM
    tiles fused with the softmax/KL, took 1.9x to 11x this path's time on an H200 and was removed:
    bench/RESULTS.md.) A row mask is read by either path's kernels. Returns (loss, grad_in, grad_weight,
    grad_bias, grad_teacher), None where not asked for."""
    cfg = small_step_config(inp, weight, teacher_indices)
    if cfg is not None:
        return linear_hydra_kl_forward_small(inp, weight, bias, teacher, temperature, reduction, shared, need_in,
                                             need_w, need_b and bias is not None, cfg, row_mask, need_t)
    return linear_hydra_kl_forward_cublas(inp, weight, bias, teacher, temperature, reduction, shared,
                                          need_in, need_w, need_b, need_t, teacher_indices, row_mask)
