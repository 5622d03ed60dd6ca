"""Command line: ``fasthydra demo`` (ensemble vs KD vs Hydra on embedded data, the paper's comparison),
``fasthydra selftest`` (a short distillation of random teachers: shows which implementation runs and
the loss falling) and ``fasthydra kernel-report``."""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn


def _make_members(num_members: int, in_dim: int, num_classes: int, generator: torch.Generator):
    """M random two-layer teachers that share a trunk but differ in their heads: they disagree,
    like ensemble members trained from different seeds."""
    trunk = torch.randn(in_dim, 64, generator=generator) / in_dim**0.5
    heads = torch.randn(num_members, 64, num_classes, generator=generator) * 3 / 8

    def teachers(x):
        h = torch.tanh(x @ trunk)
        return torch.einsum("bh,mhc->bmc", h, heads)

    return teachers


def run_demo(steps: int = 300, heads: int = 4, batch: int = 256, temperature: float = 2.0, impl: str = "auto",
             device: str = "cpu", seed: int = 0, log_every: int = 50, stream=sys.stdout) -> list[float]:
    """Distil M random teachers into body + HydraHead with the fused Hydra loss; returns the losses."""
    from tqdm.auto import tqdm

    from fasthydra import HydraHead, uncertainty
    from fasthydra.functional import resolve_impl

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    in_dim, width, num_classes = 32, 64, 10
    teachers = _make_members(heads, in_dim, num_classes, gen)
    body = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width), nn.GELU()).to(device)
    head = HydraHead(width, num_classes, heads, impl=impl, device=device)
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=3e-3)
    chosen = resolve_impl(impl, head.weight)
    print(f"fasthydra demo: distilling {heads} random teachers into a {heads}-head HydraHead "
          f"(impl={impl!r} -> {chosen!r} on {device}), T={temperature}, {steps} steps of {batch} rows", file=stream)
    losses, pending = [], []  # pending: losses still on the device, read at the log steps only (a read per
    start = time.perf_counter()  # step would make the host wait for the GPU at every step)
    bar = tqdm(range(steps), desc="distil", leave=False, file=sys.stderr, disable=not sys.stderr.isatty())
    for step in bar:
        x = torch.randn(batch, in_dim, generator=gen)
        t = teachers(x).to(device)
        loss = head.distill_loss(body(x.to(device)), t, temperature=temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pending.append(loss.detach())
        if step % log_every == 0 or step == steps - 1:
            losses += torch.stack(pending).float().tolist()
            pending.clear()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            print(f"  step {step:5d}  hydra loss {losses[-1]:.5f}", file=stream)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        x = torch.randn(1024, in_dim, generator=gen)
        mu_student = uncertainty(head(body(x.to(device)))).epistemic.mean().item()
        mu_teacher = uncertainty(teachers(x)).epistemic.mean().item()
    first = sum(losses[:10]) / min(10, len(losses))
    last = sum(losses[-10:]) / min(10, len(losses))
    print(f"loss {first:.4f} -> {last:.4f} in {elapsed:.1f}s ({chosen} path); epistemic uncertainty (MU): "
          f"teachers {mu_teacher:.4f}, distilled heads {mu_student:.4f}", file=stream)
    return losses


def _check_selftest_args(steps, heads, batch, temperature, device) -> None:
    from fasthydra.distill import _check_device
    from fasthydra.functional import _check_int, _check_temperature

    for name, value in (("steps", steps), ("heads", heads), ("batch", batch)):
        _check_int(name, value, 1)
    _check_temperature(temperature)
    _check_device(device)


def _usage_errors(parser, options, check, *args, **kwargs) -> None:
    """A bad argument ends the command with a usage error (exit status 2) naming its option, before any
    work, rather than with a traceback after the first minutes of training."""
    try:
        check(*args, **kwargs)
    except (ValueError, TypeError, ModuleNotFoundError) as err:
        name, _, rest = str(err).partition(" ")
        option = "--" + name.replace("_", "-") if name in vars(options) else name
        parser.error(f"{option} {rest}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fasthydra", description="Fast Hydra distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    from fasthydra.data import DATASETS

    full = sub.add_parser("demo", help="ensemble vs KD vs Hydra: the paper's comparison on embedded data")
    full.add_argument("--dataset", choices=DATASETS, default="digits")
    full.add_argument("--heads", type=int, default=8)
    full.add_argument("--epochs", type=int, default=40, help="members and stage 1; stage 2 runs 2.5x as many")
    full.add_argument("--out", default="runs/demo")
    full.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    full.add_argument("--seed", type=int, default=0)
    full.add_argument("--temperature", type=float, default=4.0, help="distillation temperature (classification)")
    full.add_argument("--data-dir", default=None, help="folder with MNIST/Fashion-MNIST/CIFAR-10/SVHN files")
    full.add_argument("--head-hidden", type=int, default=None,
                      help="hidden width of the Hydra heads (two-layer heads); default: linear heads")
    full.add_argument("--teacher-top-k", type=int, default=None,
                      help="cache each member's K largest logits per example (memory-mapped, fp16 values + "
                           "int32 indices) and distil from that sparse teacher instead of the dense logits")
    full.add_argument("--no-plots", action="store_true")
    demo = sub.add_parser("selftest", help="a short distillation of random teachers into a HydraHead")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--heads", type=int, default=4)
    demo.add_argument("--batch", type=int, default=256)
    demo.add_argument("--temperature", type=float, default=2.0)
    demo.add_argument("--impl", choices=["auto", "triton", "torch"], default="auto")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("kernel-report", help="compile every kernel for sm_80/sm_90 and print resources")
    args, rest = parser.parse_known_args(argv)
    if args.command == "kernel-report":
        from fasthydra.kernel_report import main as report_main

        return report_main(rest, prog="fasthydra kernel-report")
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.command == "demo":
        from fasthydra.demo import check_run_args, run

        _usage_errors(parser, args, check_run_args, args.dataset, args.heads, args.epochs, args.device,
                      args.temperature, head_hidden=args.head_hidden, teacher_top_k=args.teacher_top_k,
                      plots=not args.no_plots)
        run(args.dataset, args.heads, args.epochs, args.out, args.device, args.seed, args.temperature,
            data_dir=args.data_dir, plots=not args.no_plots, progress=sys.stderr.isatty(), head_hidden=args.head_hidden,
            teacher_top_k=args.teacher_top_k)
        return 0
    _usage_errors(parser, args, _check_selftest_args, args.steps, args.heads, args.batch, args.temperature, args.device)
    run_demo(args.steps, args.heads, args.batch, args.temperature, args.impl, args.device, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
