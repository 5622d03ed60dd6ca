"""Shared case builders and the comparison rules of the test tiers."""

from __future__ import annotations

import pytest
import torch

from fasthydra import reference as R

# (B, D, M, C): the odd shape of DESIGN section 5, M = 1, C below 16, and a wider C.
SHAPES = [(37, 45, 5, 13), (8, 16, 1, 10), (4, 8, 3, 3), (16, 32, 4, 70)]
TEMPERATURES = [0.5, 1.0, 4.0, 20.0]
# The Triton-side heads paths: the two-launch small-step kernels (chosen wherever a problem is small)
# and cuBLAS GEMMs around the loss kernel (the default otherwise).
HEADS_PATHS = ("small", "cublas")


def with_heads_paths(targets: list) -> list:
    """pytest params whose first value is an impl -> the same with a heads path appended: a Triton one once per
    HEADS_PATHS, a torch one once (the setting selects between the Triton paths only; "cublas" leaves it at
    FASTHYDRA_SMALL_STEP=0)."""
    out = []
    for p in targets:
        paths = HEADS_PATHS if p.values[0] == "triton" else ("cublas",)
        for path in paths:
            ident = p.id if len(paths) == 1 else f"{p.id}-{path}"
            out.append(pytest.param(*p.values, path, marks=p.marks, id=ident))
    return out


def use_heads_path(monkeypatch, path: str) -> str:
    """Selects one heads path for the calls that follow (the setting is read at every call)."""
    monkeypatch.setenv("FASTHYDRA_SMALL_STEP", "auto" if path == "small" else "0")
    return path


def flush_exponentials_as_a_gpu(monkeypatch) -> None:
    """The interpreter's tl.exp and tl.exp2 with results below float32's smallest normal number flushed to 0, as a
    GPU computes them: Triton lowers both through libdevice, which it builds with flush-to-zero reflected on, to
    ex2.approx.ftz.f32 (the PTX of Triton 3.6 and 3.8 for sm_90). NumPy's, which the interpreter otherwise uses,
    keep subnormal results, so a kernel that needs them passes the interpret tier and fails on the chip."""
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder

    tiny = np.float32(np.finfo(np.float32).tiny)

    def flushed(fn):
        def op(self, arg):
            def ftz(x):
                y = fn(x)
                return np.where(np.abs(y) < tiny, np.zeros_like(y), y)
            return self.unary_op(arg, ftz)
        return op

    monkeypatch.setattr(InterpreterBuilder, "create_exp", flushed(np.exp))
    monkeypatch.setattr(InterpreterBuilder, "create_exp2", flushed(np.exp2))


def shuffle_interpreted_programs(patch, seed: int = 0) -> None:
    """Every interpreted launch runs its programs in a random order (a seeded permutation of its grid per launch)
    where the interpreter runs them one after another in grid order. A GPU runs them at once and finishes them in
    any order: a kernel whose program reads what another writes, without the atomic count that orders them, or
    that takes the last program to finish for the last in the grid, gives other results here. patch: a
    monkeypatch (or anything with its setattr)."""
    import random

    from triton.runtime.interpreter import InterpreterBuilder

    rng = random.Random(seed)
    set_dim, set_idx = InterpreterBuilder.set_grid_dim, InterpreterBuilder.set_grid_idx

    def set_grid_dim(self, nx, ny, nz):
        set_dim(self, nx, ny, nz)
        self.program_order = rng.sample(range(nx * ny * nz), nx * ny * nz)

    def set_grid_idx(self, x, y, z):  # (called once per program, in grid order: the n-th call runs program order[n])
        _, ny, nz = self.grid_dim
        j = self.program_order[(x * ny + y) * nz + z]
        set_idx(self, j // (ny * nz), (j // nz) % ny, j % nz)

    patch.setattr(InterpreterBuilder, "set_grid_dim", set_grid_dim)
    patch.setattr(InterpreterBuilder, "set_grid_idx", set_grid_idx)


def watch_interpreted_races(patch) -> list:
    """Records, per interpreted launch, which program stores and loads each address, and returns the list that
    every launch with a race on a GPU appends a line to (kernel name, what, addresses): two programs that store to
    one address, or a program that loads an address another program of the launch stores to, before any atomic
    of its own that touches memory (the acquire that orders a last-program sum after the other programs' stores).
    Atomics are not stores here (the error word's OR, the counts). The interpreter runs programs one after
    another, so such a kernel gives the expected bits there and a race on the chip. patch: a monkeypatch."""
    import numpy as np
    from triton.runtime.interpreter import GridExecutor, InterpreterBuilder

    found, launch = [], {}

    def accesses(ptrs, mask):
        addrs = np.asarray(ptrs.data).reshape(-1).astype(np.uint64)
        keep = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).reshape(-1)
        return addrs[keep]

    def wrap(name, record):
        real = getattr(InterpreterBuilder, name)

        def op(self, *args, **kwargs):
            if launch:
                record(self, *args)
            return real(self, *args, **kwargs)
        patch.setattr(InterpreterBuilder, name, op)

    def on_program(self, x, y, z):
        _, ny, nz = self.grid_dim
        launch["pid"], launch["synced"] = (x * ny + y) * nz + z, False

    def on_store(self, ptrs, value, mask, *_):
        launch["stores"].append((accesses(ptrs, mask), launch["pid"]))

    def on_load(self, ptrs, mask, *_):
        if not launch["synced"]:
            launch["loads"].append((accesses(ptrs, mask), launch["pid"]))

    def on_atomic(self, *_):
        launch["synced"] = True

    def on_atomic_rmw(self, op, ptrs, value, mask, *_):  # (the error word's OR is masked off but for a bad value)
        launch["synced"] = launch["synced"] or bool(np.any(mask.data))

    wrap("set_grid_idx", on_program)
    wrap("create_masked_store", on_store)
    wrap("create_masked_load", on_load)
    wrap("create_atomic_rmw", on_atomic_rmw)
    wrap("create_atomic_cas", on_atomic)
    run = GridExecutor.__call__

    def checked_run(self, *args, **kwargs):
        launch.update(stores=[], loads=[], pid=0, synced=False)
        try:
            return run(self, *args, **kwargs)
        finally:
            stores, loads = launch.pop("stores"), launch.pop("loads")
            launch.clear()
            _report_races(getattr(self.fn, "__name__", str(self.fn)), stores, loads, found)

    patch.setattr(GridExecutor, "__call__", checked_run)
    return found


def _report_races(kernel: str, stores: list, loads: list, found: list) -> None:
    """found += a line for each kind of race among one launch's (addresses, program) stores and loads."""
    import numpy as np

    def flat(pairs):
        if not pairs:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        return (np.concatenate([a for a, _ in pairs]),
                np.concatenate([np.full(len(a), pid, np.int64) for a, pid in pairs]))

    s_addr, s_pid = flat(stores)
    order = np.lexsort((s_pid, s_addr))
    s_addr, s_pid = s_addr[order], s_pid[order]
    same = (s_addr[1:] == s_addr[:-1]) & (s_pid[1:] != s_pid[:-1])
    if same.any():
        found.append(f"{kernel}: {int(same.sum())} stores to an address another program stores to "
                     f"(e.g. {int(s_addr[1:][same][0]):#x})")
    l_addr, l_pid = flat(loads)
    if len(s_addr) and len(l_addr):
        # each stored address's programs: the first and the last (sorted), so a load races if either differs
        first = np.searchsorted(s_addr, l_addr, side="left")
        hit = (first < len(s_addr)) & (s_addr[np.minimum(first, len(s_addr) - 1)] == l_addr)
        last = np.searchsorted(s_addr, l_addr, side="right") - 1
        lo, hi = s_pid[np.minimum(first, len(s_addr) - 1)], s_pid[np.maximum(last, 0)]
        other = hit & ((lo != l_pid) | (hi != l_pid))
        if other.any():
            found.append(f"{kernel}: {int(other.sum())} loads of an address another program stores to "
                         f"(e.g. {int(l_addr[other][0]):#x})")


def teacher_logits(b, m, c, scale=3.0, masked=True, dtype=torch.float32, device="cpu"):
    """Random member logits; with masked=True a few single classes are -inf (never a whole row)."""
    t = torch.randn(b, m, c, dtype=torch.float64, device=device) * scale
    if masked and b > 0 and c > 1:
        t[0, 0, c // 2] = float("-inf")
        t[b - 1, m - 1, 0] = float("-inf")
    return t.to(dtype)


def params_of(head):
    return [p for _, p in head.named_parameters()]


def reference_logits(head, x):
    """The module's logits through the eager per-head reference, in x's dtype (float64 in tests)."""
    p = dict(head.named_parameters())
    if head.is_mlp:
        return R.mlp_heads_ref(x, p["hidden_weight"], p.get("hidden_bias"), p["weight"], p.get("bias"))
    return R.linear_heads_ref(x, p["weight"], p.get("bias"))


def as_float64_copy(head):
    """A float64 copy of a head's parameters (leaves requiring grad), keyed like named_parameters."""
    return {k: v.detach().double().requires_grad_() for k, v in head.named_parameters()}


def reference_loss_and_grads(head, x, t, temperature, upstream=None):
    """Loss and gradients (x first, then parameters in named_parameters order) from the float64 reference."""
    p64 = as_float64_copy(head)
    x64 = x.detach().double().requires_grad_()
    if head.is_mlp:
        z = R.mlp_heads_ref(x64, p64["hidden_weight"], p64.get("hidden_bias"), p64["weight"], p64.get("bias"))
    else:
        z = R.linear_heads_ref(x64, p64["weight"], p64.get("bias"))
    loss = R.hydra_kl_loss_ref(z, t.double(), temperature)
    scaled = loss * (1.0 if upstream is None else upstream)
    grads = torch.autograd.grad(scaled, [x64, *p64.values()])
    return loss, grads


def assert_close_to(actual, expected, rtol=1e-5, atol=1e-7, what=""):
    """Compare against a float64 expectation with a tolerance scaled by the expectation's size (its finite entries;
    the others must come out exactly as they are: the same infinity, or NaN for NaN)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    special = ~torch.isfinite(expected)
    if bool(special.any()):  # an infinite (or NaN) expectation is met only exactly: inf - inf measures nothing
        got, want = actual[special], expected[special]
        assert bool(((got == want) | (got.isnan() & want.isnan())).all()), \
            f"{what}: non-finite entries {want.tolist()[:8]} came out as {got.tolist()[:8]}"
        actual, expected = actual[~special], expected[~special]
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= atol + rtol * scale, f"{what}: max error {err:.3e} > {atol:.1e} + {rtol:.1e} * {scale:.3e}"


def tolerance_rule(kernel, eager, exact, atol, what=""):
    """DESIGN section 5: the kernel's error against float64 is at most twice eager's plus atol, plus half a unit
    in the last place of the kernel's dtype at the result's largest magnitude: the rounding of the stored
    result, which no computation avoids. Without it a 16-bit result of a few elements failed whenever eager's
    happened to round near exactly: a bf16 bias gradient of 15 elements, eager 0.24 ulp off and the kernel 0.78,
    drawn under torch 2.11 (whose bf16 random draws for a seed differ from 2.14's, which passed)."""
    exact = exact.detach().double().cpu()
    k_err = (kernel.detach().double().cpu() - exact).abs().max().item()
    e_err = (eager.detach().double().cpu() - exact).abs().max().item()
    if kernel.dtype.is_floating_point and exact.numel():
        atol = atol + 0.5 * torch.finfo(kernel.dtype).eps * exact.abs().max().item()
    assert k_err <= 2 * e_err + atol, f"{what}: kernel error {k_err:.3e} > 2 * eager error {e_err:.3e} + {atol:.1e}"


def assert_same_products(actual, expected, inner, what=""):
    """Two computations of the same products whose summation order may differ (GEMMs of different
    shapes pick different BLAS blockings, per CPU and per thread count): equal up to the rounding of
    a length-`inner` dot product in the dtype, |a - b| <= 2 * inner * eps * (1 + |b|)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    eps = torch.finfo(expected.dtype).eps
    bound = 2 * inner * eps * (1 + expected.detach().abs())
    err = (actual.detach() - expected.detach()).abs()
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3e} beyond the rounding bound"


def public_calls(impl, temperature=2.0):
    """(name, inputs that require grad, fn of those inputs) for each public loss and op, with and without a row
    mask, dense and top-k teachers; the temperature a variable of theirs (a number or a one-element tensor).
    Used by test_compile and test_temperature_tensor."""
    from fasthydra import TopKTeacher, gaussian_kl_loss, hinton_kl_loss, hydra_kl_loss, uncertainty
    from fasthydra.functional import (gaussian_heads_kl_loss, linear_heads, linear_hydra_kl_loss,
                                      mlp_hydra_kl_loss)

    g = torch.Generator().manual_seed(3)

    def r(*shape, grad=True, pos=False):
        t = torch.rand(*shape, generator=g) + 0.5 if pos else torch.randn(*shape, generator=g)
        return t.requires_grad_(grad)

    b, d, h, m, c, k = 6, 5, 4, 3, 7, 2
    z, z1, x, t = r(b, m, c), r(b, c), r(b, d), r(b, m, c, grad=False)
    w, bias, hw, hb = r(m, c, d), r(m, c), r(m, h, d), r(m, h)
    w2 = r(m, c, h)
    topk = TopKTeacher(*t.topk(3, dim=-1))
    gw, tm, tv = r(m, 2 * k, d), r(b, m, k, grad=False), r(b, m, k, grad=False, pos=True)
    mean, var = r(b, m, k), r(b, m, k, pos=True)
    keep = torch.tensor([True, False, True, True, False, True])
    calls = []
    for mask in (None, keep):
        tag = "" if mask is None else ", row mask"
        calls += [
            ("hydra_kl_loss" + tag, [z],
             lambda z, mask=mask: hydra_kl_loss(z, t, temperature, impl=impl, row_mask=mask)),
            ("hydra_kl_loss top-k" + tag, [z],
             lambda z, mask=mask: hydra_kl_loss(z, topk, temperature, "sum", impl, row_mask=mask)),
            ("hinton_kl_loss" + tag, [z1],
             lambda z1, mask=mask: hinton_kl_loss(z1, t, temperature, impl=impl, row_mask=mask)),
            ("hinton_kl_loss top-k" + tag, [z1],
             lambda z1, mask=mask: hinton_kl_loss(z1, topk, temperature, impl=impl, row_mask=mask)),
            ("linear_hydra_kl_loss" + tag, [x, w, bias],
             lambda x, w, bias, mask=mask: linear_hydra_kl_loss(x, w, bias, t, temperature, impl=impl, row_mask=mask)),
            ("mlp_hydra_kl_loss" + tag, [x, hw, hb, w2],
             lambda x, hw, hb, w2, mask=mask: mlp_hydra_kl_loss(x, hw, hb, w2, None, t, temperature, impl=impl,
                                                                 row_mask=mask)),
            ("gaussian_kl_loss" + tag, [mean, var],
             lambda mean, var, mask=mask: gaussian_kl_loss(mean, var, tm, tv, row_mask=mask)),
            ("gaussian_heads_kl_loss" + tag, [x, gw],
             lambda x, gw, mask=mask: gaussian_heads_kl_loss(x, gw, None, tm, tv, impl=impl, row_mask=mask)),
        ]
    calls += [("linear_heads", [x, w, bias], lambda x, w, bias: linear_heads(x, w, bias, impl).square().sum()),
              ("uncertainty", [z], lambda z: uncertainty(z, temperature, impl=impl).epistemic.sum() + z.sum())]
    return calls
