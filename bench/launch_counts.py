"""Kernel launches per training step, counted (issue 9: "few launches, little Python").

    python bench/launch_counts.py [--markdown]

Runs each op's forward + backward on small CPU tensors with Triton under its interpreter, the error
word treated as on CUDA (checks.py's deferred mode: its non-blocking copy is counted), and counts
what would be a GPU launch: every Triton kernel (a hook on the interpreter's launches) and every
torch op that computes (a TorchDispatchMode; allocations and views do not count, nor do the
interpreter's own copies of kernel arguments). The upstream gradient is 1 here, which the CPU
backward recognises; on a GPU the heads ops' stored gradients pass one more launch
(kernels/scale.py), which reads the upstream gradient on the device and returns at once when it is 1.
Counts depend on the path, not on the sizes, while a path's limits hold.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

# Allocations, views and metadata: no kernel on a GPU.
FREE = {"view", "empty", "empty_like", "empty_strided", "new_empty", "slice", "detach", "alias", "select",
        "unsqueeze", "transpose", "permute", "reshape", "expand", "t", "as_strided", "_unsafe_view",
        "lift_fresh", "ones_like", "equal", "split", "unbind", "squeeze"}


def count(step) -> tuple[list[str], list[str]]:
    """(Triton kernels, torch compute ops) of one call of step(), after a first call that warms up."""
    import triton.runtime.interpreter as interp

    launches, inside = [], []
    cls = interp.InterpretedFunction
    own = cls.__dict__.get("__getitem__")  # (3.6 and later inherit it; 3.5 defines its own)
    real_getitem = cls.__getitem__

    def getitem(self, grid):  # kernel[grid](...): every launch, whatever the interpreter's internals
        launcher = real_getitem(self, grid)

        def launch(*args, **kwargs):
            launches.append(self.fn.__name__)
            inside.append(1)
            try:
                return launcher(*args, **kwargs)
            finally:
                inside.pop()

        return launch

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside:
                self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    cls.__getitem__ = getitem
    try:
        step()
        launches.clear()
        with Ops() as ops:
            step()
    finally:
        if own is None:
            del cls.__getitem__
        else:
            cls.__getitem__ = own
    return list(launches), [op for op in ops.seen if op not in FREE]


def cases():
    """(op, path, step) at small shapes; the settings of each path are applied around its step."""
    from fasthydra import GaussianHydraHead, HydraHead, TopKTeacher, hinton_kl_loss, hydra_kl_loss, uncertainty

    torch.manual_seed(0)
    x = torch.randn(40, 16, requires_grad=True)
    t = torch.randn(40, 4, 10)
    keep = torch.arange(40) % 3 != 0  # a row mask (padding left out), "mean" over the rows it keeps
    out = []
    for hidden, name in ((None, "linear heads"), (16, "MLP heads")):
        head = HydraHead(16, 10, 4, hidden_features=hidden, impl="triton")
        for path, env in (("small-step", {"FASTHYDRA_SMALL_STEP": "auto"}),
                          ("cuBLAS + loss kernel", {"FASTHYDRA_SMALL_STEP": "0"})):
            for mask in (None, keep):
                def step(head=head, mask=mask):
                    head.zero_grad(set_to_none=True)
                    x.grad = None
                    head.distill_loss(x, t, 2.0, row_mask=mask).backward()

                out.append((f"distill_loss, {name}", path if mask is None else f"{path}, row mask", env, step))

    g = GaussianHydraHead(16, 2, 4, impl="triton")
    tm, tv = torch.randn(40, 4, 2), torch.rand(40, 4, 2) + 0.2

    def gaussian_step():
        g.zero_grad(set_to_none=True)
        x.grad = None
        g.distill_loss(x, tm, tv).backward()

    out.append(("distill_loss, Gaussian heads", "fused + small-step grads", {}, gaussian_step))
    z = torch.randn(40, 4, 10, requires_grad=True)
    z1 = torch.randn(40, 10, requires_grad=True)

    for mask in (None, keep):
        def logits_step(mask=mask):
            z.grad = None
            hydra_kl_loss(z, t, 2.0, impl="triton", row_mask=mask).backward()

        def hinton_step(mask=mask):
            z1.grad = None
            hinton_kl_loss(z1, t, 2.0, impl="triton", row_mask=mask).backward()

        path = "loss kernel" if mask is None else "loss kernel, row mask"
        out.append(("hydra_kl_loss on logits", path, {}, logits_step))
        out.append(("hinton_kl_loss", path, {}, hinton_step))
    one_member = t[:, :1].contiguous()

    def kd_step():  # one teacher: the loss kernel on the member itself, no target launch
        z1.grad = None
        hinton_kl_loss(z1, one_member, 2.0, impl="triton").backward()

    out.append(("hinton_kl_loss, one member", "loss kernel", {}, kd_step))
    topk = TopKTeacher(*t.topk(4, dim=-1))

    def topk_step():  # several sparse members: their mean target in one launch, then the loss kernel
        z1.grad = None
        hinton_kl_loss(z1, topk, 2.0, impl="triton").backward()

    out.append(("hinton_kl_loss, top-k teacher", "target + loss kernel", {}, topk_step))

    def topk_logits_step():  # the teacher's ids checked in one launch, its values by the loss kernel
        z.grad = None
        hydra_kl_loss(z, topk, 2.0, impl="triton").backward()

    out.append(("hydra_kl_loss on logits, top-k teacher", "top-k loss kernel", {}, topk_logits_step))
    out.append(("uncertainty", "uncertainty kernel", {}, lambda: uncertainty(z.detach(), impl="triton")))

    def uncertainty_step():
        z.grad = None
        uncertainty(z, impl="triton").epistemic.mean().backward()

    out.append(("uncertainty fwd+bwd (epistemic penalty)", "forward + backward kernels", {}, uncertainty_step))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("launch_counts: needs TRITON_INTERPRET=1 (set before triton is imported)", file=sys.stderr)
        return 2
    from fasthydra.ops import checks

    checks._DEFER_ON_CPU = True  # the error word as on CUDA: its copy is a launch there
    # The word is copied at most every COPY_INTERVAL_S: a clock that stands still within a step and moves
    # on by a second between steps counts one copy per step at most, as a GPU step of microseconds makes
    # (the interpreter's slow launches would otherwise let an op with two launches copy twice).
    real_clock, now = checks._clock, [0.0]
    checks._clock = lambda: now[0]

    def stepped(step):
        def run():
            now[0] += 1.0
            step()
        return run

    rows = []
    try:
        for op, path, env, step in cases():
            with C.settings(env):
                kernels, ops = count(stepped(step))
            rows.append((op, path, kernels, ops))
    finally:
        checks._DEFER_ON_CPU = False
        checks._clock = real_clock
    if args.markdown:
        print("| op (forward + backward) | path | Triton launches | torch launches | total |")
        print("|---|---|---:|---:|---:|")
    for op, path, kernels, ops in rows:
        if args.markdown:
            print(f"| {op} | {path} | {len(kernels)} | {len(ops)} ({', '.join(ops) or '-'}) | "
                  f"{len(kernels) + len(ops)} |")
        else:
            print(f"{op:32} {path:26} triton {len(kernels)} {kernels}  torch {len(ops)} {ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
