"""Peak memory of one step per provider, each in a fresh process (the figure the core issue asks for).

    python bench/peak_memory.py [--op linear_fwdbwd] [--B 256 --D 256 --M 4 --C 32000]

CPU: peak resident set above the resident set before the step (glibc told to unmap freed tensors at
once, so this follows live tensors; gradients included). See bench/common.py.
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import Case, fmt_bytes, peak_memory_fresh_process


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", default="linear_fwdbwd")
    for name, default in (("B", 256), ("D", 256), ("M", 4), ("C", 32000)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--providers", nargs="+", default=["eager", "fasthydra"])
    args = parser.parse_args(argv)
    case = Case(args.op, "cli", args.B, args.D, args.M, args.C, torch.float32, "cpu")
    peaks = {p: peak_memory_fresh_process(case, p) for p in args.providers}
    base = peaks.get("eager")
    print(f"{args.op} B={args.B} D={args.D} M={args.M} C={args.C} fp32 on CPU, one step, fresh process each")
    for p, v in peaks.items():
        ratio = f"{v / base:.3f} of eager" if base else ""
        print(f"  {p:10} {fmt_bytes(v):>12}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
