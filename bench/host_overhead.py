"""Host time per training step of the GPU code path, measured on a machine without a GPU (issue 9: "little
Python").

    python bench/host_overhead.py [--markdown] [--steps N] [--profile CASE]

A small step is host-bound on a GPU (bench/RESULTS.md: the GPU finishes it in tens of microseconds), so what
the host does per step is its time. Each case runs forward + backward on small CPU tensors through the code
that CUDA tensors take (impl="triton"; the error word deferred and copied as on CUDA, checks.py), in two modes:

- ``triton``: the host code of every launch runs, with the driver replaced by a stand-in and the compiled
  kernel's launch a no-op: Triton's own (argument binding and specialisation, the kernel cache key) on a
  kernel's first call with given argument properties, ``fasthydra.ops.launch``'s direct path after it. What
  is left out is the C launcher and the driver call (a few microseconds each on a bare host, tens under a
  sandbox).
- ``stubbed``: every launch a no-op: this project's Python and the torch calls it makes.

Beside them, ``autograd floor``: an autograd.Function that takes the same parameters and does nothing, the
cost of autograd's forward and backward alone. Parameter gradients are set to None before each step (as
``zero_grad()`` does), so that the backward does not time CPU additions a GPU would run asynchronously. The
``calls`` column counts the Python function calls of one step (``sys.setprofile``, the stubbed mode):
the same on every machine, unlike the times. Nothing here runs a kernel; results are garbage by design.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # the JIT launch path is what this measures
    sys.exit("bench/host_overhead.py measures Triton's JIT launch path: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402


class _StandInDriver:
    """What JITFunction.run asks the driver for before it launches: device, stream, target."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


class _NoOpKernel:
    """A compiled kernel whose launch does nothing."""

    function = 0
    packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        return None


class _EveryKeyCached(dict):
    def get(self, key, default=None):
        return _NoOpKernel()


def install_stand_ins(mode: str) -> None:
    """Route every Triton launch of this process to a no-op: through Triton's own launch code (mode "triton")
    or around it (mode "stubbed"); and let impl="triton" take CPU tensors as it takes CUDA ones."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    import fasthydra.functional as F
    from fasthydra.ops import _common, checks

    driver.set_active(_StandInDriver())
    real_binder = JITFunction.create_binder

    def create_binder(self):
        _, key_cache, target, backend, binder = real_binder(self)
        return _EveryKeyCached(), key_cache, target, backend, binder

    JITFunction.create_binder = create_binder
    JITFunction.device_caches = property(lambda self: self.__dict__["device_caches"],
                                         lambda self, v: self.__dict__.__setitem__("device_caches", v))
    if mode == "stubbed":
        from fasthydra.ops import launch

        JITFunction.run = lambda self, *args, grid, warmup, **kwargs: None
        launch.FAST_LAUNCH = False  # (its direct path would compute a key for a kernel that never comes)
    checks._DEFER_ON_CPU = True  # the error word copied and polled as on CUDA
    F.interpreting = lambda: True  # resolve_impl: impl="triton" on CPU tensors
    _common.KEEP_CPU_TEMPERATURE_TENSOR = True  # a tensor temperature kept and passed to the kernels, as on CUDA
    _common.helper_kernels_run_on = lambda t: True  # helper launches (a learned T's dL/dT reduction) as on CUDA


def cases(rows: int = 32) -> dict:
    """name -> (step, parameters whose .grad is reset): tiny shapes on the small-step paths, and on the cuBLAS
    path (C past the small step's class limit: the path of the host-bound mid and large-C cases on the device
    machine). The host cost does not depend on the shape; torch ops that a GPU would only launch compute here,
    so they are kept tiny."""
    from common import AutogradFloor
    from fasthydra import GaussianHydraHead, HydraHead, hydra_kl_loss, uncertainty
    from fasthydra.ops._common import SMALL_MAX_CLASSES

    g = torch.Generator().manual_seed(0)
    d, m, c = 32, 10, 10
    x = torch.randn(rows, d, generator=g)
    t = torch.randn(rows, m, c, generator=g)
    linear = HydraHead(d, c, m, impl="triton")
    mlp = HydraHead(d, c, m, hidden_features=16, impl="triton")
    gauss = GaussianHydraHead(d, 1, m, impl="triton")
    mean, var = torch.randn(rows, m, 1, generator=g), torch.rand(rows, m, 1, generator=g) + 0.5
    z = torch.randn(rows, m, c, generator=g, requires_grad=True)
    temperature = torch.tensor(2.0)  # an annealed T, read by the kernels (install_stand_ins keeps it a tensor)
    learned = torch.tensor(2.0, requires_grad=True)  # a learned T (an nn.Parameter of the model)
    keep = torch.arange(rows) % 4 != 0  # a row mask, "mean" over the rows it keeps
    wide_c = SMALL_MAX_CLASSES + 1  # the cuBLAS path: heads GEMMs in torch around the loss kernel
    t_wide = torch.randn(4, 2, wide_c, generator=g)
    x_wide = torch.randn(4, 8, generator=g)
    linear_wide = HydraHead(8, wide_c, 2, impl="triton")
    mlp_wide = HydraHead(8, wide_c, 2, hidden_features=8, impl="triton")

    def no_grad_step(fn):
        def step():
            with torch.no_grad():
                fn()
        return step

    return {
        "autograd floor": (lambda: AutogradFloor.apply(x, linear.weight, linear.bias).backward(),
                           list(linear.parameters())),
        "linear heads fwd+bwd": (lambda: linear.distill_loss(x, t, 2.0).backward(), list(linear.parameters())),
        "linear heads fwd+bwd, tensor T": (lambda: linear.distill_loss(x, t, temperature).backward(),
                                           list(linear.parameters())),
        "linear heads fwd+bwd, learned T": (lambda: linear.distill_loss(x, t, learned).backward(),
                                            [*linear.parameters(), learned]),
        "linear heads fwd (no_grad)": (no_grad_step(lambda: linear.distill_loss(x, t, 2.0)), []),
        "MLP heads fwd+bwd": (lambda: mlp.distill_loss(x, t, 2.0).backward(), list(mlp.parameters())),
        "linear heads fwd+bwd, cuBLAS path": (lambda: linear_wide.distill_loss(x_wide, t_wide, 2.0).backward(),
                                              list(linear_wide.parameters())),
        "MLP heads fwd+bwd, cuBLAS path": (lambda: mlp_wide.distill_loss(x_wide, t_wide, 2.0).backward(),
                                           list(mlp_wide.parameters())),
        "loss on logits fwd+bwd": (lambda: hydra_kl_loss(z, t, 2.0, impl="triton").backward(), [z]),
        "loss on logits fwd+bwd, row mask": (lambda: hydra_kl_loss(z, t, 2.0, impl="triton", row_mask=keep).backward(),
                                             [z]),
        "Gaussian heads fwd+bwd": (lambda: gauss.distill_loss(x, mean, var).backward(), list(gauss.parameters())),
        "uncertainty": (no_grad_step(lambda: uncertainty(z.detach(), impl="triton")), []),
    }


def time_step(step, params, steps: int, rounds: int = 7) -> float:
    """Median over rounds of the mean host time per step, in microseconds."""
    def one():
        for p in params:
            p.grad = None
        step()

    for _ in range(max(20, steps // 10)):
        one()
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        per_round.append((time.perf_counter() - t0) / steps * 1e6)
    return statistics.median(per_round)


def count_calls(step, params) -> int:
    """Python function calls (and C functions called from Python) of one step."""
    for p in params:
        p.grad = None
    step()
    n = 0

    def prof(frame, event, arg):
        nonlocal n
        if event in ("call", "c_call"):
            n += 1

    for p in params:
        p.grad = None
    sys.setprofile(prof)
    try:
        step()
    finally:
        sys.setprofile(None)
    return n


def _child(mode: str, steps: int, profile: str | None, only: list[str] | None = None) -> None:
    """One mode in this process (the stand-ins cannot be taken back once kernels have bound); only: these
    cases alone (bench/gpu_check.py times two of them on the device machine's CPU)."""
    torch.set_num_threads(1)
    install_stand_ins(mode)
    table = cases()
    unknown = [name for name in only or () if name not in table]
    if unknown:
        raise SystemExit(f"host_overhead.py: no case {', '.join(map(repr, unknown))}; the cases: {', '.join(table)}")
    for name, (step, params) in table.items():
        if (profile and name != profile) or (only and name not in only):
            continue
        us = time_step(step, params, steps)
        calls = count_calls(step, params) if mode == "stubbed" else 0
        print(f"{name}\t{us:.1f}\t{calls}", flush=True)
        if profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(steps):
                step()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main(argv=None) -> int:
    import subprocess

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--profile", default=None, help="a case name: cProfile of its stubbed steps")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case", action="append", default=None,
                    help="with --child: time this case only (repeatable); prints name, us, calls per line")
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.steps, args.profile, args.case)
        return 0
    if args.profile:
        _child("stubbed", args.steps, args.profile)
        return 0
    measured: dict[str, dict[str, tuple[float, int]]] = {}
    for mode in ("stubbed", "triton"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            name, us, calls = line.split("\t")
            measured.setdefault(name, {})[mode] = (float(us), int(calls))
    head = ("case", "host us (Triton's launch code)", "host us (launches stubbed)", "Python calls")
    rows = [(name, f"{v['triton'][0]:.1f}", f"{v['stubbed'][0]:.1f}", str(v["stubbed"][1]))
            for name, v in measured.items()]
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|---|---:|---:|---:|")
        print("\n".join("| " + " | ".join(r) + " |" for r in rows))
    else:
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
        for r in [head, *rows]:
            print("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    print(f"\ntorch {torch.__version__}, Triton {__import__('triton').__version__}, one thread, "
          f"median of 7 rounds of {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
