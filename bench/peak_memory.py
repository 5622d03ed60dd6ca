"""Peak host memory of one fused forward + backward, measured in a fresh subprocess per case.

CPU tensors have no allocator statistics, so this reads the kernel's own accounting: after the
inputs exist, the process resets its peak resident set (``/proc/self/clear_refs`` = 5), runs the
op once, and reports ``VmHWM - VmRSS(before)``: the most memory the op itself held at any moment,
gradients included. Each case runs in its own interpreter so that no cached allocation of an
earlier case hides or inflates the next one.

    python bench/peak_memory.py --B 256 --D 256 --M 4 --C 32000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PROVIDERS = ("eager", "fasthydra")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(provider: str, b: int, d: int, m: int, c: int, temperature: float) -> dict:
    import gc

    import torch

    from fasthydra import HydraHead
    from fasthydra import reference as R

    torch.manual_seed(0)
    torch.set_num_threads(1)  # per-thread scratch of the BLAS would blur a memory comparison
    head = HydraHead(d, c, m, impl="torch")
    x = torch.randn(b, d, requires_grad=True)
    t = torch.randn(b, m, c)
    # Warm up on a tiny case so that one-time allocations of torch itself are not counted.
    HydraHead(4, 3, 2, impl="torch").distill_loss(torch.randn(2, 4), torch.randn(2, 2, 3)).backward()
    R.hydra_kl_loss_ref(R.linear_heads_ref(torch.randn(2, 4, requires_grad=True), torch.randn(2, 3, 4)),
                        torch.randn(2, 2, 3)).backward()
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    if provider == "eager":
        loss = R.hydra_kl_loss_ref(R.linear_heads_ref(x, head.weight, head.bias), t, temperature)
    else:
        loss = head.distill_loss(x, t, temperature)
    loss.backward()
    peak = _status_kib("VmHWM")
    grads = (head.weight.numel() + head.bias.numel() + x.numel()) * 4
    return {"provider": provider, "B": b, "D": d, "M": m, "C": c, "peak_bytes": (peak - before) * 1024,
            "gradient_bytes": grads, "loss": loss.item()}


def measure(provider: str, b: int, d: int, m: int, c: int, temperature: float = 2.0) -> dict:
    """Runs one case in a fresh interpreter and returns its record (peak_bytes is the op's own peak)."""
    code = (f"import json, sys; sys.path.insert(0, {repr(__file__.rsplit('/', 1)[0])}); import peak_memory as p; "
            f"print(json.dumps(p._child({provider!r}, {b}, {d}, {m}, {c}, {temperature})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("B", 256), ("D", 256), ("M", 4), ("C", 32000)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    rows = [measure(p, args.B, args.D, args.M, args.C) for p in PROVIDERS]
    base = rows[0]["peak_bytes"]
    print(f"fused forward + backward, B={args.B} D={args.D} M={args.M} C={args.C} fp32, CPU, one thread")
    print(f"{'provider':10} {'peak MiB':>9} {'vs eager':>9} {'loss':>10}   (weight+bias+x gradients alone: "
          f"{rows[0]['gradient_bytes'] / 2**20:.1f} MiB)")
    for r in rows:
        print(f"{r['provider']:10} {r['peak_bytes'] / 2**20:9.1f} {r['peak_bytes'] / base:9.3f} {r['loss']:10.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
