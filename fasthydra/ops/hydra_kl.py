"""Tempered per-head KL on given logits: the Triton launchers and the chunked torch path.

The torch path, and the Triton path for a teacher that requires grad or a top-k teacher, compute the
loss rows and the gradient T * (q - p) * coefficient in the forward pass; the backward only scales
the stored gradient by the upstream gradient (Liger-Kernel's pattern). The Triton path with a
frozen dense teacher writes only the loss rows and each row's normalisers in the forward and forms
the gradient in the backward, in one streaming pass that reads the upstream gradient on the device.
The autograd wiring lives in ``fasthydra.ops.library`` (custom ops, so that torch.compile sees them
whole).
"""

from __future__ import annotations

import math

import torch

from . import native
from .checks import after_launch, error_word
from .launch import launch
from . import _common
from ._common import (TORCH_CHUNK_ELEMENTS, cdiv, compute_dtype, finished_count, kl_rows_config, next_pow2,
                      rows_per_chunk)
from ._common import empty_stored_grad, temperature_factor, temperature_scalars


def reduction_coefficient(reduction: str, n_rows: int) -> float:
    """Gradient coefficient of each row's loss: 1/rows for "mean", 1 for "sum" and "none"."""
    return 1.0 / max(n_rows, 1) if reduction == "mean" else 1.0


def kept_mean_factor(nkept: torch.Tensor, batch: int) -> torch.Tensor:
    """B / max(kept rows, 1) as a 0-dim fp32 tensor on the count's device (no host read): what turns a mean over
    all B*M loss rows into the mean over the B_kept*M a row mask keeps (the kernels' _kept_mean_factor)."""
    return nkept.clamp_min(1).to(torch.float32).reciprocal_().mul_(float(batch))


def reduce_rows(rows: torch.Tensor, reduction: str, out_dtype: torch.dtype) -> torch.Tensor:
    """Reduces (B, M) fp32 loss rows; "mean" of an empty batch is 0, like the reference."""
    if reduction == "none":
        return rows.to(out_dtype)
    total = rows.mean() if reduction == "mean" and rows.numel() > 0 else rows.sum()  # one launch
    return total.to(out_dtype)


def _is_one(grad_output: torch.Tensor) -> bool:
    """loss.backward() in eager mode on the CPU: the upstream gradient is 1 and reading it costs no stall.
    On a GPU reading it would synchronise, and traced (compile, AOT: tensor subclasses) it is unknown."""
    return (type(grad_output) is torch.Tensor and grad_output.device.type == "cpu" and grad_output.dim() == 0
            and not torch.compiler.is_compiling() and torch.equal(grad_output, torch.ones_like(grad_output)))


def scale_grad(stored: torch.Tensor, grad_output: torch.Tensor, reduction: str) -> torch.Tensor:
    """Chain rule for a gradient stored in the forward: scalar or per-row (B, M) upstream gradient."""
    if reduction == "none":
        return stored * grad_output.unsqueeze(-1).to(stored.dtype)
    if _is_one(grad_output):  # no (B, M, C)-sized multiply
        return stored
    return stored * grad_output.to(stored.dtype)


def scale_grads(stored: list, grad_output: torch.Tensor) -> list:
    """scale_grad for several stored gradients of a scalar loss; on a GPU one foreach launch for all."""
    if _is_one(grad_output):
        return list(stored)
    if stored and stored[0].is_cuda and not torch.compiler.is_compiling() and \
            len({t.dtype for t in stored}) == 1 and type(grad_output) is torch.Tensor:
        return list(torch._foreach_mul(stored, grad_output.to(stored[0].dtype)))
    return [t * grad_output.to(t.dtype) for t in stored]


# Programs of the in-place scaling kernel (a grid stride covers larger tensors) and their blocks.
SCALE_PROGRAMS = 1024
SCALE_BLOCK = 4096


def scale_grads_(stored: list, grad_output: torch.Tensor) -> None:
    """scale_grads in place, for gradients nothing else holds (no new weight-sized tensor): on a GPU one
    launch (``launch_scale_unless_one``) that reads the upstream gradient on the device and touches
    nothing when it is 1 (the usual ``loss.backward()``); on the CPU decided on the host, where reading
    it costs no stall (no op at all when it is 1). A per-row upstream gradient (B, M) multiplies the
    (B, M, C) gradients in place, broadcast over C."""
    stored = [t for t in stored if t.numel() > 0]
    if stored and grad_output.dim() > 0:  # reduction "none": one upstream value per (b, m) row
        for t in stored:
            t.mul_(grad_output.unsqueeze(-1).to(t.dtype))
    elif stored and grad_output.is_cuda and type(grad_output) is torch.Tensor \
            and _common.helper_kernels_run_on(grad_output) and all(t.is_contiguous() for t in stored):
        launch_scale_unless_one(stored, grad_output)
    elif stored and not _is_one(grad_output):
        for t in stored:
            t.mul_(grad_output.to(t.dtype))


def launch_scale_unless_one(stored: list, grad_output: torch.Tensor) -> None:
    """tensors *= g in place, unless the one-element tensor g is 1, decided on the device
    (kernels/scale.py): up to three contiguous tensors per launch, no host read of g."""
    from fasthydra.kernels.scale import _scale_unless_one_kernel

    for i in range(0, len(stored), 3):
        group = stored[i:i + 3]
        ptrs = [(t, t.numel()) for t in group] + [(grad_output, 0)] * (3 - len(group))
        programs = max(1, min(SCALE_PROGRAMS, max(cdiv(n, SCALE_BLOCK) for _, n in ptrs)))
        launch(_scale_unless_one_kernel, (programs,), grad_output, *(v for pair in ptrs for v in pair),
               BLOCK=SCALE_BLOCK, num_warps=4)


# Elements of one chunk of the torch form of neg_dots_over (its products' scratch: 16 MiB in fp32).
DOT_CHUNK_ELEMENTS = 1 << 22
_DOT_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # (not a subclass with storage of its own: fake, DTensor)


def neg_dots_over(t: torch.Tensor, pairs: list) -> torch.Tensor:
    """-sum over (g, x) in pairs of <g, x> / t, in the one-element t's dtype, shape and device: a learned
    temperature's gradient through the x / (T / T.detach()) of functional._LearnedT (t = T). A NaN product counts
    as 0 (0 * inf at a masked class's -inf teacher logit, 0 * NaN at a padding row's features); infinities are
    kept. Where the helper kernels run (t and the tensors on one CUDA device, 16/32-bit, contiguous, up to
    three pairs) one launch that reads each tensor once and writes nothing of their size
    (``_neg_dots_over_kernel``: fp32 sums, a fixed order); elsewhere torch ops in t's dtype, in chunks of
    DOT_CHUNK_ELEMENTS (the product of a (B, M, C) teacher and its gradient is never formed whole)."""
    pairs = [(g, x) for g, x in pairs if g.numel() > 0]
    if 0 < len(pairs) <= 3 and _dot_kernel_applies(t, pairs):
        from fasthydra.kernels.reduce import _neg_dots_over_kernel

        n = max(v.numel() for pair in pairs for v in pair)
        programs = max(1, min(SCALE_PROGRAMS, cdiv(n, SCALE_BLOCK)))
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        parts = torch.empty(programs, dtype=torch.float32, device=t.device)
        args = [v for g, x in pairs for v in (g, x, g.numel())] + [t, t, 0] * (3 - len(pairs))
        launch(_neg_dots_over_kernel, (programs,), t, *args, parts, out, finished_count(t.device), BLOCK=SCALE_BLOCK,
               BLOCK_P=_common.reduce_block(programs, 4), num_warps=4)
        return out
    total = torch.zeros((), dtype=t.dtype, device=pairs[0][0].device if pairs else t.device)
    for g, x in pairs:
        rows = max(1, DOT_CHUNK_ELEMENTS // max(1, g[0].numel())) if g.dim() > 0 else 1
        for g_part, x_part in zip(*(v.split(rows) if v.dim() > 0 else (v,) for v in (g, x))):
            term = (g_part.to(t.dtype) * x_part.to(t.dtype)).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
            total += term.sum()
    return total.to(t.device).neg_() / t  # (a CPU t of CUDA tensors: one copy, after all the sums)


def _dot_kernel_applies(t: torch.Tensor, pairs: list) -> bool:
    return (type(t) in _PLAIN_TENSORS and not torch.compiler.is_compiling() and t.device.type in ("cuda", "cpu")
            and t.dtype in (torch.float32, torch.float64) and _common.helper_kernels_run_on(t)
            and all(type(v) in _PLAIN_TENSORS and v.device == t.device and v.dtype in _DOT_KERNEL_DTYPES
                    and v.is_contiguous() for pair in pairs for v in pair))


# ----------------------------------------------------------------------------------------------
# torch path
# ----------------------------------------------------------------------------------------------


def _teacher_grad(diff: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """p * ((log p - log q) - KL) from diff = u - s (consumed) and p, per row over the last dim.

    Up to a constant per row, log p - log q is diff; with the pivot j = argmax p, e = diff - diff_j,
    the bracket is e_c - sum_k p_k e_k exactly, e_j = 0 and the sum is dominated by the small p_k:
    no cancellation between two numbers as large as the logits (as in diff_c - sum_k p_k diff_k).
    A masked class (p = 0, diff = -inf) gets 0."""
    pivot = diff.gather(-1, p.argmax(-1, keepdim=True))
    e = diff.sub_(pivot)
    mean_e = (e * p).nan_to_num_(nan=0.0).sum(-1, keepdim=True)
    return e.sub_(mean_e).mul_(p).nan_to_num_(nan=0.0)


# The unit of a running `a` carried across class tiles (the kernels' A_SCALE, kernels/softmax_kl.py): its terms
# times 2^-24, exact, so that no sum of up to 2^24 classes overflows; kl_from_sums undoes it.
A_SCALE = 2.0 ** -24
A_UNIT = 2.0 ** 24


def kl_from_sums(a: torch.Tensor, d_s: torch.Tensor, d_u: torch.Tensor, temperature: float) -> torch.Tensor:
    """Loss rows T^2 KL from their sums over raw logits z, t (each from its own row maximum: d_s = sum
    exp((z - max z) / T), d_u likewise, a = sum exp((t - max t) / T) ((t - max t) - (z - max z)) * A_SCALE):
    (a / d_u) A_UNIT T + log(d_s / d_u) T^2, the mean a / d_u first (it stays below the largest difference where
    `a` itself may not), then T (the KL itself, a / d_u over T, may pass float32's range where T^2 times it does
    not: a student at torch.finfo's min at T < 1). One logarithm of the normalisers' ratio, not log d_s - log
    d_u: where student and teacher are close (nearly uniform rows at a high temperature) the two logs, each about
    log C, cancel to a KL of 1e-3 and take their rounding with them (median error 3x eager's at T = 5, C = 1000;
    the ratio's is a third of eager's)."""
    return (a / d_u).mul_(A_UNIT * temperature).add_((d_s / d_u).log_().mul_(temperature * temperature))


def kl_chunk_torch(s: torch.Tensor, t: torch.Tensor, temperature: float, want_grad: bool, want_tgrad: bool = False,
                   tgrad_scale: float = 1.0):
    """Loss rows T^2 * KL, (optionally) the unscaled gradient q - p, and (optionally) the teacher gradient
    p * (log p - log q - KL) times tgrad_scale for one chunk.

    s: (..., C) raw student logits in the compute dtype; it is consumed (overwritten). t: (..., C) raw teacher
    logits of any float dtype. Returns (loss (...), q - p (..., C) or None, teacher gradient (..., C) or None).
    The caller applies T * coefficient to q - p where it is cheapest (a GEMM's alpha, or the final store); the
    teacher's gradient takes it here, as tgrad_scale: formed from raw differences (T times the bracket), it is
    scaled once by tgrad_scale / T, a number (unscaled first, it passes float32's range at T < 1 for a student
    near torch.finfo's min, where T * coefficient times it fits).

    Each row measured from its own raw maximum (t' = t - max t, z' = s - max s: free of any offset of the
    logits, exactly 0 at the maximum), T^2 KL = T (a / d_u) + T^2 log(d_s / d_u), a = sum_c e^{t'_c / T}
    (t'_c - z'_c), d = sum e^{. / T} (kl_from_sums; here the mean under p: the sum under e^{t' / T}, up to d_u
    times the largest difference, overflowed to inf where a student at torch.finfo's min faces classes the
    teacher keeps and eager's loss is a finite 1e37; and the differences raw, times T only in the mean: divided
    by T first they overflow there at T < 1, though the loss fits). The teacher's term is p * ((log p - log q) -
    KL), formed around its most probable class (_teacher_grad). Two exponentials per element, as two softmaxes.
    """
    inv_t = 1.0 / temperature
    if native.usable(s):  # fp32 on CPU: the three-sweep C row kernel (a fourth for the teacher's gradient)
        return native.kl_rows(s, t, temperature, want_grad, want_tgrad, s_scale=1.0 / float(temperature),
                              tgrad_scale=tgrad_scale)
    # Three (..., C) buffers at the peak (s, t' and t' - z'): p takes t''s, q takes s's (s is the caller's to
    # consume).
    u = t.to(s.dtype)
    max_u = u.amax(dim=-1, keepdim=True)
    u = u - max_u.masked_fill_(max_u == -math.inf, 0.0)  # (a row all -inf, flagged elsewhere: p NaN, no error)
    s.sub_(s.amax(dim=-1, keepdim=True))
    diff = u - s
    p = u.mul_(inv_t).exp_()
    d_u = p.sum(-1)
    p.div_(d_u.unsqueeze(-1))
    # p (t' - z'): a masked class (p = 0, t' = -inf) gives 0 * -inf = NaN, which is its exact value 0; +inf (a
    # student -inf where the teacher has mass) is the true KL and stays
    mean_a = (diff * p if want_tgrad else diff.mul_(p)).nan_to_num_(nan=0.0, posinf=math.inf,
                                                                     neginf=-math.inf).sum(-1)
    q = s.mul_(inv_t).exp_()
    d_s = q.sum(-1)
    # T^2 KL (the log ratio: kl_from_sums)
    loss = mean_a.mul_(temperature).add_((d_s / d_u).log_().mul_(temperature * temperature))
    tgrad = _teacher_grad(diff, p).mul_(tgrad_scale * inv_t) if want_tgrad else None
    if not want_grad:
        return loss, None, tgrad
    return loss, q.div_(d_s.unsqueeze(-1)).sub_(p), tgrad


def hydra_kl_forward_torch(student, teacher, temperature: float, reduction: str, want_grad: bool,
                           want_tgrad: bool = False, indices=None):
    """Hydra loss on given logits on the torch path; the gradients (already scaled by T * coefficient) come out
    of the forward. teacher: dense logits (B, M, C), or a top-k teacher's values (B, M, k) with their class ids
    `indices`. A dense fp32 teacher with the native row kernel: one call over every row, the student read as it
    lies; otherwise torch ops row chunk by row chunk. Returns (loss, grad or None, teacher grad or None)."""
    b, m, c = student.shape
    grad_scale = temperature * reduction_coefficient(reduction, b * m)
    cdt = compute_dtype(student.dtype)
    # kept for the backward's scaling: fp32 for fp16 tensors (stored_grad_dtype)
    grad = empty_stored_grad(student) if want_grad else None
    tgrad = empty_stored_grad(teacher) if want_tgrad else None
    idx = None if indices is None else indices.long()
    if idx is None and native.usable(student) and teacher.dtype == torch.float32 and student.dim() == 3:
        # the C row kernel reads the raw student (tempered as read) and writes the scaled gradients where they are
        # kept: no tempered copy, no scaling pass, nothing chunk-sized allocated (so one call over every row)
        loss, _, _ = native.kl_rows(student, teacher, temperature, want_grad, want_tgrad, s_scale=1.0 / temperature,
                                    grad_out=grad, tgrad_out=tgrad, out_scale=grad_scale)
        return reduce_rows(loss, reduction, loss.dtype), grad, tgrad
    rows = torch.empty(b, m, dtype=cdt, device=student.device)
    step = rows_per_chunk(b, m * c, TORCH_CHUNK_ELEMENTS)
    for r0 in range(0, b, step):
        s = student[r0:r0 + step].to(cdt, copy=True)  # raw: kl_chunk_torch consumes it
        if idx is None:
            loss, g, tg = kl_chunk_torch(s, teacher[r0:r0 + step], temperature, want_grad, want_tgrad, grad_scale)
        else:
            loss, g, tg = kl_chunk_topk_torch(s, teacher[r0:r0 + step], idx[r0:r0 + step], temperature, want_grad,
                                              want_tgrad, grad_scale)
        rows[r0:r0 + step] = loss
        if want_grad:
            torch.mul(g, grad_scale, out=grad[r0:r0 + step])  # scale, round to the student dtype, store
        if want_tgrad:
            tgrad[r0:r0 + step] = tg  # scaled already
    return reduce_rows(rows, reduction, rows.dtype), grad, tgrad  # the caller casts the loss


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------


def _reduce_target(reduction: str, n_rows: int, device):
    """(out, reduce_to) for a loss kernel that sums its rows in its last program: a 0-dim fp32 out and
    (out, coefficient) for "mean"/"sum" over n_rows > 0 rows, else (None, None) (a torch reduction then)."""
    if reduction == "none" or n_rows == 0:
        return None, None
    out = torch.empty((), dtype=torch.float32, device=device)
    return out, (out, reduction_coefficient(reduction, n_rows))


def _reduce_args(reduce_to, grid: int, placeholder):
    """(out, coefficient, partial sums, finished count) a reducing launch of `grid` programs passes its kernel;
    placeholder pointers (never read) where reduce_to is None."""
    if reduce_to is None:
        return placeholder, 0.0, placeholder, placeholder
    out, coef = reduce_to
    return out, coef, torch.empty(grid, dtype=torch.float32, device=placeholder.device), finished_count(out.device)


def launch_kl_rows(z3, t3, loss2, grad3, temperature: float, grad_scale: float | None, op: str, tgrad3=None,
                   bias3=None, norms=None, reduce_to=None, keep2=None, kept_mean=None):
    """One launch of the row kernel over (O, I, C) views with unit stride along C: student logits z3,
    teacher t3, fp32 loss rows loss2 (O, I) written, gradient grad3 (O, I, C) written when grad3 is
    given (grad3 may be z3 itself: the logits turn into their gradient in place), the teacher's
    gradient tgrad3 (O, I, C) when given; bias3, an (O, I, C) view (broadcast strides welcome) added
    to z3 on every load when given; norms, a contiguous (O, I, 4) fp32 tensor, receives each row's
    normalisers when given (for ``launch_kl_grad``); grad_scale = T * reduction coefficient (T as
    ``temperature_factor`` gives it: 1 for a tensor temperature, which the kernel reads and applies itself);
    reduce_to = (out, coefficient): the loss rows' sum times the coefficient written into the 0-dim fp32
    out by the launch's last program (no reduction launch; a torch sum after it where the configuration
    cannot, ``kl_rows_reduces_in_launch``). keep2: an (O, I) uint8 view (broadcast strides welcome) of a
    row mask: the rows it leaves out get loss 0 and gradients 0 (whatever their logits hold). kept_mean =
    (count, B): "mean" over the rows the mask keeps, grad_scale and the reduction's coefficient (with 1/(B*M)
    in them) times B / count, count (the mask's sum, an integer scalar) read on the device. The teacher's
    value errors go to the device's error word (checks.py), never through a host synchronisation."""
    from fasthydra.kernels.softmax_kl import _hydra_kl_fwd_kernel

    o, i, c = z3.shape
    r = o * i
    if r == 0:
        return
    g3 = grad3 if grad3 is not None else z3
    h3 = tgrad3 if tgrad3 is not None else z3
    b3 = bias3 if bias3 is not None else z3
    cfg = kl_rows_config(c, z3.element_size(), tgrad3 is not None or bias3 is not None)
    vec = max(1, min(cfg["BLOCK_C"], 16 // z3.element_size()))
    grid = cdiv(r, cfg["BLOCK_R"])
    after = None
    if reduce_to is not None and not _common.kl_rows_reduces_in_launch(cfg, grad3 is not None):
        after, reduce_to = reduce_to, None
    out, coef, parts, count = _reduce_args(reduce_to, grid, loss2)
    nkept, batch = (loss2, 0.0) if kept_mean is None else kept_mean
    tf, temp, t_ptr = temperature_scalars(temperature)
    launch(_hydra_kl_fwd_kernel, (grid,),
        z3, t3, loss2, g3, h3, error_word(z3.device, op), b3, norms if norms is not None else loss2, parts, out,
        count, loss2 if keep2 is None else keep2, nkept, r, i, c, z3.stride(0), z3.stride(1), t3.stride(0),
        t3.stride(1), g3.stride(0), g3.stride(1), loss2.stride(0), loss2.stride(1), h3.stride(0), h3.stride(1),
        b3.stride(0), b3.stride(1), 0 if keep2 is None else keep2.stride(0), 0 if keep2 is None else keep2.stride(1),
        1.0 / tf, tf * tf, grad_scale if grad_scale is not None else 0.0, coef, float(batch), temp,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], WRITE_GRAD=grad3 is not None,
        WRITE_TGRAD=tgrad3 is not None, ROW_IN_REGISTERS=cfg["ROW_IN_REGISTERS"], HAS_BIAS=bias3 is not None,
        VEC=vec, WRITE_NORMS=norms is not None,
        REDUCE=reduce_to is not None, BLOCK_P=_common.reduce_block(grid, cfg["num_warps"]), HAS_KEEP=keep2 is not None,
        MEAN_KEPT=kept_mean is not None, T_PTR=t_ptr,
        SPREAD=_common.spread_slices(cfg, vec, c, z3, t3, g3, bias3),
        L2_HINTS=_common.KL_L2_HINTS and not cfg["ROW_IN_REGISTERS"], num_warps=cfg["num_warps"],
    )
    if after is not None:
        out, coef = after
        torch.sum(loss2, (0, 1), out=out)
        if coef != 1.0:
            out.mul_(coef)
        if kept_mean is not None:
            out.mul_(kept_mean_factor(*kept_mean))


def launch_kl_grad(z3, t3, norms, upstream, grad3, temperature: float, grad_scale: float, keep2=None,
                   kept_mean=None) -> None:
    """The gradient of the loss rows that ``launch_kl_rows`` wrote with ``norms``, formed in the backward:
    grad3 = grad_scale * upstream * (q - p) over (O, I, C) views; upstream is a 0-dim tensor or (O, I),
    read on the device; keep2 and kept_mean as launch_kl_rows takes them (0 on the rows left out, "mean"
    over the kept ones)."""
    from fasthydra.kernels.softmax_kl import _hydra_kl_grad_kernel

    o, i, c = z3.shape
    r = o * i
    if r == 0 or c == 0:
        return
    up = upstream.reshape(1, 1) if upstream.dim() == 0 else upstream
    cfg = _common.kl_grad_config(r, c)
    nkept, batch = (norms, 0.0) if kept_mean is None else kept_mean
    tf, temp, t_ptr = temperature_scalars(temperature)
    launch(_hydra_kl_grad_kernel, (cdiv(r, cfg["BLOCK_R"]), cfg["col_blocks"]),
        z3, t3, norms, up, grad3, norms if keep2 is None else keep2, nkept, r, i, c, cfg["cols_per_prog"],
        z3.stride(0), z3.stride(1), t3.stride(0), t3.stride(1), 0 if upstream.dim() == 0 else up.stride(0),
        0 if upstream.dim() == 0 else up.stride(1), grad3.stride(0), grad3.stride(1),
        0 if keep2 is None else keep2.stride(0), 0 if keep2 is None else keep2.stride(1), 1.0 / tf,
        grad_scale, float(batch), temp, BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], HAS_KEEP=keep2 is not None,
        MEAN_KEPT=kept_mean is not None, T_PTR=t_ptr, num_warps=cfg["num_warps"],
    )


def launch_kl_grad_cols(z3, t3, norms, grad3, bias3, temperature: float, grad_scale: float, keep=None,
                        kept_mean=None) -> torch.Tensor:
    """dz = grad_scale * (q - p) over a head-major (O, I, C) view (grad3 may be z3: in place) from the row
    normalisers ``launch_kl_rows`` wrote for the same view, and its sums over I per head without reading
    dz again: returns the fp32 partial sums (O, row groups, C), which summed over axis 1 are the bias
    gradient. bias3, an (O, I, C) view of a per-head bias broadcast over I (stride 0 there), is added to z3
    when given. keep: a row mask over I, (I,) uint8 with unit stride (rows left out: dz 0, their logits
    finite); kept_mean as launch_kl_rows takes it."""
    from fasthydra.kernels.softmax_kl import _hydra_kl_grad_cols_kernel

    o, i, c = z3.shape
    if o * i == 0 or c == 0:
        return torch.zeros(o, 1, c, dtype=torch.float32, device=z3.device)
    cfg = _common.kl_grad_cols_config(o, i, c)
    part = torch.empty(o, cfg["n_groups"], c, dtype=torch.float32, device=z3.device)
    if bias3 is not None and ((i > 1 and bias3.stride(1) != 0) or (c > 1 and bias3.stride(2) != 1)):
        raise ValueError("launch_kl_grad_cols: bias3 must be one row per head broadcast over the rows")
    if keep is not None and (keep.shape != (i,) or (i > 1 and keep.stride(0) != 1)):
        raise ValueError("launch_kl_grad_cols: keep must be one contiguous uint8 entry per row of the I axis")
    b3 = bias3 if bias3 is not None else z3
    nkept, batch = (part, 0.0) if kept_mean is None else kept_mean
    tf, temp, t_ptr = temperature_scalars(temperature)
    launch(_hydra_kl_grad_cols_kernel, (o * cfg["n_groups"], cfg["col_blocks"]),
        z3, t3, b3, norms, grad3, part, part if keep is None else keep, nkept, i, c, cfg["n_groups"],
        cfg["rows_per_prog"], z3.stride(0), z3.stride(1), t3.stride(0), t3.stride(1), b3.stride(0), grad3.stride(0),
        grad3.stride(1), 1.0 / tf, grad_scale, float(batch), temp, BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"],
        HAS_BIAS=bias3 is not None, HAS_KEEP=keep is not None, MEAN_KEPT=kept_mean is not None, T_PTR=t_ptr,
        num_warps=cfg["num_warps"],
    )
    return part


def masked_reduction(rows: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    """Loss rows (B, ...) of which only the rows `keep` (B,) counts: the others are 0 ("none"), "sum" adds
    the rows kept and "mean" averages over them (0 when none is kept). On the device: no host read."""
    kept = torch.where(keep.view(-1, *(1,) * (rows.dim() - 1)), rows, 0.0)  # (NaN in a row left out: 0 too)
    if reduction == "none":
        return kept
    total = kept.sum(dtype=torch.float32 if rows.element_size() < 4 else None)  # 16-bit rows summed in fp32
    if reduction == "mean":
        total = total / _kept_entries(keep, rows, total.dtype)
    return total.to(rows.dtype)


def _kept_entries(keep: torch.Tensor, rows: torch.Tensor, dtype) -> torch.Tensor:
    """The entries a "mean" over the kept rows divides by: kept rows times one row's entries, at least 1."""
    per_row = rows[0].numel() if rows.shape[0] else 1
    return keep.sum(dtype=dtype).mul_(per_row).clamp_min_(1)


def mask_rows_torch(row_mask, reduction: str, forward, student, teacher, temperature: float, want_grad: bool,
                    want_tgrad: bool, *indices):
    """`forward` (a torch path's forward: loss, grad, teacher grad) with a row mask (B,) bool or None: the rows
    as "none", the loss reduced over the kept ones (masked_reduction), and both gradients 0 on the rows left
    out (filled, not multiplied: a student row left out may hold NaN or infinities), the kept ones scaled by
    the reduction's coefficient over them (1 / (B_kept * M) for "mean"). No host read."""
    if row_mask is None:
        return forward(student, teacher, temperature, reduction, want_grad, want_tgrad, *indices)
    loss, grad, tgrad = forward(student, teacher, temperature, "none", want_grad, want_tgrad, *indices)
    if want_grad or want_tgrad:
        coef = _kept_entries(row_mask, loss, loss.dtype).reciprocal_() if reduction == "mean" else None
        dropped = ~row_mask.view(-1, 1, 1)
        for g in (grad, tgrad):
            if g is not None:
                if coef is not None:
                    g.mul_(coef.to(g.dtype))
                g.masked_fill_(dropped, 0.0)
    return masked_reduction(loss, row_mask, reduction), grad, tgrad


def row_mask_views(row_mask, n_heads: int, reduction: str):
    """A batch row mask (B,) bool as the loss kernels read it for (B, M) rows: (keep2, kept_mean), keep2 a
    (B, M) uint8 view with stride 0 along the heads, kept_mean (count of kept rows on the device, B) for
    "mean" (else None); (None, None) without a mask."""
    if row_mask is None:
        return None, None
    keep2 = row_mask.view(torch.uint8)[:, None].expand(row_mask.shape[0], n_heads)
    return keep2, (row_mask.sum(), row_mask.shape[0]) if reduction == "mean" else None


def hydra_kl_forward_triton(student, teacher, temperature: float, reduction: str, want_grad: bool,
                            want_tgrad: bool = False, op: str = "hydra_kl_loss", deferred: bool = False,
                            row_mask=None):
    """Hydra loss on given logits with the one-launch Triton kernel (strided views read in place).
    Returns (loss, grad or None, teacher grad or None); with deferred (a frozen teacher) the student's
    gradient is left to the backward (``hydra_kl_backward_triton``) and the second value is the (B, M, 4)
    row normalisers it needs: the forward reads each row once and writes no (B, M, C) tensor. row_mask (B,)
    bool: the rows left out get loss 0 and gradients 0, "mean" is over the kept rows (the kernel reads both)."""
    b, m, c = student.shape
    grad_scale = temperature_factor(temperature) * reduction_coefficient(reduction, b * m)
    student = student if student.stride(-1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    loss = torch.empty(b, m, dtype=torch.float32, device=student.device)
    # "mean"/"sum": the launch's last program reduces the rows (no reduction launch); an empty batch: torch
    reduced, reduce_to = _reduce_target(reduction, b * m, student.device)
    norms = grad = tgrad = None
    if deferred:
        norms = torch.empty(b, m, 4, dtype=torch.float32, device=student.device)
    else:
        grad = empty_stored_grad(student) if want_grad else None
        tgrad = empty_stored_grad(teacher) if want_tgrad else None
    keep2, kept_mean = row_mask_views(row_mask, m, reduction)
    launch_kl_rows(student, teacher, loss, grad, temperature, grad_scale, op, tgrad, norms=norms, reduce_to=reduce_to,
                   keep2=keep2, kept_mean=kept_mean)
    after_launch(student.device, op, teacher.shape)
    out = reduced if reduced is not None else reduce_rows(loss, reduction, loss.dtype)
    return (out, norms, None) if deferred else (out, grad, tgrad)


def hydra_kl_backward_triton(student, teacher, norms, grad_loss, temperature: float, reduction: str, row_mask=None):
    """The student's gradient for ``hydra_kl_forward_triton(..., deferred=True)``: one streaming pass over
    z and t that multiplies by the upstream gradient on the device (no host read, no second pass); with the
    forward's row_mask (its rows left out: 0; "mean" over the kept ones, counted again on the device)."""
    b, m, c = student.shape
    student = student if student.stride(-1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    grad = torch.empty(b, m, c, dtype=student.dtype, device=student.device)
    launch_kl_grad(student, teacher, norms, grad_loss, grad, temperature,
                   temperature_factor(temperature) * reduction_coefficient(reduction, b * m),
                   *row_mask_views(row_mask, m, reduction))
    return grad


# ----------------------------------------------------------------------------------------------
# Sparse (top-k) teacher: values (B, M, k) on indices (B, M, k); no dense teacher is ever formed
# ----------------------------------------------------------------------------------------------


def shifted_values(v: torch.Tensor) -> torch.Tensor:
    """Top-k teacher values (..., k) less each row's largest (0 for a row of -inf pads only, which the checks
    flag), before they are divided by T: softmax, log_softmax and the teacher gradient's differences do not change,
    but a row whose one live value is fp32's lowest (a mask written as finfo.min) would overflow to -inf at T < 1
    and give p = NaN (a loss 200x off and NaN gradients, found beside the Hinton target's same fault)."""
    top = v.detach().amax(-1, keepdim=True)
    return v - torch.where(torch.isneginf(top), 0.0, top)


def topk_teacher(v: torch.Tensor, dtype: torch.dtype, inv_t: float):
    """A top-k teacher's values (..., k) in `dtype`, raw with each row's largest at 0 (shifted_values), p~ =
    softmax(w / T) over them, and log sum exp(w / T) (..., 1)."""
    w = shifted_values(v.to(dtype))
    w_t = w * inv_t
    return w, torch.softmax(w_t, dim=-1), torch.logsumexp(w_t, dim=-1, keepdim=True)


def topk_kl_rows(w: torch.Tensor, p: torch.Tensor, z_idx: torch.Tensor, log_ratio: torch.Tensor, temperature: float):
    """Loss rows T^2 sum p~ (log p~ - log q_idx) against a top-k teacher (topk_teacher's w and p~), from the
    student's raw logits at the kept classes less its row maximum, z_idx (..., k), and log_ratio (..., 1), the log
    of the student's normaliser over the teacher's, log sum exp((z - max z) / T) - log sum exp(w / T). As p~ sums to
    1, T^2 KL = T sum p~ (w - z_idx) + T^2 log_ratio: the raw difference first (the row's maximum off first: a logit
    of 1e3 would otherwise cost the sum its digits), its mean under p~, and only then T (divided by T first it
    overflows at T < 1 for a student near torch.finfo's min, though the loss fits; as kl_chunk_torch). A padding
    entry (p~ = 0, w = -inf) gives NaN, truly 0; a NaN temperature tensor (out of range) stays NaN: it enters after
    the NaNs are cleared."""
    mean_a = (w - z_idx).mul_(p).nan_to_num_(nan=0.0, posinf=math.inf).sum(-1)
    return mean_a.mul_(temperature).add_(log_ratio.squeeze(-1).mul_(temperature * temperature))


def kl_chunk_topk_torch(s: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, temperature: float, want_grad: bool,
                        want_tgrad: bool = False, tgrad_scale: float = 1.0):
    """kl_chunk_torch for a top-k teacher. s: (..., C) raw student logits (consumed); v: (..., k)
    raw teacher values (-inf pads); idx: (..., k) int64 class ids. Returns (loss (...), unscaled
    gradient q - scatter(p~) (..., C) or None, values gradient p~ * (log p~ - log q_idx - KL) times tgrad_scale
    (..., k) or None, scaled as kl_chunk_torch's). One softmax over C for the student, one over k for the
    teacher."""
    inv_t = 1.0 / temperature
    w, p, log_d_w = topk_teacher(v, s.dtype, inv_t)
    s_idx = s.gather(-1, idx)
    max_s = s.amax(dim=-1, keepdim=True)
    q = s.sub_(max_s).mul_(inv_t).exp_()
    sum_q = q.sum(-1, keepdim=True)
    q.div_(sum_q)
    loss = topk_kl_rows(w, p, s_idx - max_s, sum_q.log_().sub_(log_d_w), temperature)
    tgrad = _teacher_grad(w - s_idx, p).mul_(tgrad_scale * inv_t) if want_tgrad else None
    if not want_grad:
        return loss, None, tgrad
    return loss, q.scatter_add_(-1, idx, -p), tgrad


def topk_config(n_cols: int, k: int) -> dict:
    """The top-k row kernel: the dense kernel's C tile, the k entries in one tile of their own."""
    block_c = max(16, min(next_pow2(n_cols), _common.MAX_BLOCK_C))  # the row is walked twice in tiles
    block_r = max(1, min(16, 1024 // block_c))
    lanes = block_r * block_c
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4 if lanes <= 1024 else min(32, lanes // 256),
                BLOCK_K=max(2, next_pow2(k)))


def launch_kl_rows_topk(z3, v3, i3, loss2, grad3, temperature: float, grad_scale: float, op: str, tgrad3=None,
                        keep2=None, kept_mean=None, reduce_to=None):
    """launch_kl_rows for a top-k teacher: values v3 and indices i3 are (O, I, k) views with unit
    stride along k; grad3 may be z3 (in place); tgrad3 (O, I, k) receives the values' gradient; keep2,
    kept_mean and reduce_to as launch_kl_rows takes them (rows left out: loss 0, gradients 0, whatever their
    student logits hold; the gradients of "mean" over the kept rows; the loss summed by the launch's last
    program)."""
    from fasthydra.kernels.softmax_kl import _hydra_kl_topk_fwd_kernel

    o, i, c = z3.shape
    k = v3.shape[-1]
    r = o * i
    if r == 0:
        return
    g3 = grad3 if grad3 is not None else z3
    h3 = tgrad3 if tgrad3 is not None else v3
    cfg = topk_config(c, k)
    vec = max(1, min(cfg["BLOCK_C"], 16 // z3.element_size()))
    grid = cdiv(r, cfg["BLOCK_R"])
    out, coef, parts, count = _reduce_args(reduce_to, grid, loss2)
    tf, temp, t_ptr = temperature_scalars(temperature)
    launch(_hydra_kl_topk_fwd_kernel, (grid,),
        z3, v3, i3, loss2, g3, h3, error_word(z3.device, op), loss2 if keep2 is None else keep2,
        loss2 if kept_mean is None else kept_mean[0], parts, out, count, r, i, c, k, z3.stride(0), z3.stride(1),
        v3.stride(0), v3.stride(1), i3.stride(0), i3.stride(1), g3.stride(0), g3.stride(1), loss2.stride(0),
        loss2.stride(1), h3.stride(0), h3.stride(1), 0 if keep2 is None else keep2.stride(0),
        0 if keep2 is None else keep2.stride(1), 1.0 / tf, tf * tf, grad_scale, coef,
        0.0 if kept_mean is None else float(kept_mean[1]), temp, BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"],
        BLOCK_K=cfg["BLOCK_K"], WRITE_GRAD=grad3 is not None, WRITE_TGRAD=tgrad3 is not None,
        VEC=vec, HAS_KEEP=keep2 is not None,
        MEAN_KEPT=kept_mean is not None, REDUCE=reduce_to is not None,
        BLOCK_P=_common.reduce_block(grid, cfg["num_warps"]), T_PTR=t_ptr,
        SPREAD=_common.spread_slices(cfg, vec, c, z3, g3),
        num_warps=cfg["num_warps"],
    )


def hydra_kl_topk_forward_triton(student, values, indices, temperature: float, reduction: str, want_grad: bool,
                                 want_tgrad: bool = False, op: str = "hydra_kl_loss", row_mask=None):
    """The Hydra loss against a top-k teacher with the one-launch Triton kernel ("mean"/"sum" summed by its last
    program; a row mask read as ``hydra_kl_forward_triton`` reads it). Returns (loss, grad or None, values grad
    or None)."""
    b, m, c = student.shape
    grad_scale = temperature_factor(temperature) * reduction_coefficient(reduction, b * m)
    student = student if student.stride(-1) == 1 else student.contiguous()
    values = values if values.stride(-1) == 1 else values.contiguous()
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    loss = torch.empty(b, m, dtype=torch.float32, device=student.device)
    grad = empty_stored_grad(student) if want_grad else None
    tgrad = empty_stored_grad(values) if want_tgrad else None
    reduced, reduce_to = _reduce_target(reduction, b * m, student.device)
    keep2, kept_mean = row_mask_views(row_mask, m, reduction)
    launch_kl_rows_topk(student, values, indices, loss, grad, temperature, grad_scale, op, tgrad, keep2, kept_mean,
                        reduce_to)
    after_launch(student.device, op, values.shape)
    return (reduced if reduced is not None else reduce_rows(loss, reduction, loss.dtype)), grad, tgrad
