"""cpu tier: bench/host_overhead.py measures what it says (Triton's own launch code, driver stood in)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"

pytestmark = [pytest.mark.cpu, pytest.mark.kernels]


def _without_interpreter() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_steps_go_through_tritons_launch_code():
    """With the stand-ins, a small training step's first call passes its two launches through JITFunction.run
    (binder, specialisation, cache key: one binder per kernel and device); the second step launches the compiled
    kernels directly (fasthydra.ops.launch), Triton's binder not called; in the stubbed mode Triton binds no
    argument."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(BENCH)!r})
        import host_overhead as H
        from triton.runtime.jit import JITFunction
        H.install_stand_ins(sys.argv[1])
        seen, real = [], JITFunction.run

        def run(self, *args, **kwargs):
            seen.append(self.fn.__name__)
            return real(self, *args, **kwargs)

        JITFunction.run = run
        made, real_binder = [], JITFunction.create_binder

        def create_binder(self):
            made.append(self.fn.__name__)
            return real_binder(self)

        JITFunction.create_binder = create_binder
        direct = []
        H._NoOpKernel.run = lambda self, *args: direct.append(args[4])
        for name in ("linear heads fwd+bwd", "loss on logits fwd+bwd", "linear heads fwd+bwd, cuBLAS path"):
            step, _ = H.cases()[name]
            seen.clear()
            step()
            print(name, "first", sorted(seen))
            seen.clear()
            direct.clear()
            step()
            print(name, "again", sorted(seen), len(direct))
        print("binders", len(made))
    """)
    out = {}
    for mode in ("triton", "stubbed"):
        proc = subprocess.run([sys.executable, "-c", script, mode], env=_without_interpreter(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = proc.stdout
    triton, stubbed = out["triton"], out["stubbed"]
    assert "linear heads fwd+bwd first ['_small_heads_grad_kernel', '_small_heads_kl_kernel']" in triton
    # the second step: both launches direct, JITFunction.run not called
    assert "linear heads fwd+bwd again [] 2" in triton
    # (the loss on logits forms dz in its forward launch: DEFER_KL_GRAD off; on a GPU the backward adds the
    # scaling kernel's launch, which the stand-ins' CPU tensors scale in torch instead)
    assert "loss on logits fwd+bwd first ['_hydra_kl_fwd_kernel']" in triton
    assert "loss on logits fwd+bwd again [] 1" in triton
    # the wider case takes the cuBLAS path (its GEMMs are torch calls), the loss kernel its one launch
    assert "linear heads fwd+bwd, cuBLAS path again [] 1" in triton
    assert "binders 3" in triton  # one per kernel and device
    assert "linear heads fwd+bwd again ['_small_heads_grad_kernel', '_small_heads_kl_kernel'] 0" in stubbed
    assert "binders 0" in stubbed


def test_table_has_every_case():
    proc = subprocess.run([sys.executable, str(BENCH / "host_overhead.py"), "--steps", "3", "--markdown"],
                          env=_without_interpreter(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in proc.stdout.splitlines()
            if line.startswith("| ") and "---" not in line and "case" not in line}
    assert set(rows) == {"autograd floor", "linear heads fwd+bwd", "linear heads fwd+bwd, tensor T",
                         "linear heads fwd+bwd, learned T",
                         "linear heads fwd (no_grad)", "MLP heads fwd+bwd",
                         "loss on logits fwd+bwd", "loss on logits fwd+bwd, row mask", "Gaussian heads fwd+bwd",
                         "uncertainty",
                         "linear heads fwd+bwd, cuBLAS path", "MLP heads fwd+bwd, cuBLAS path"}
    calls = {name: int(cols[2].strip(" |")) for name, cols in rows.items()}
    assert all(float(cols[0]) > 0 and float(cols[1]) > 0 for cols in rows.values())
    # the fused steps do more than autograd alone, and evaluation less than training
    assert calls["linear heads fwd+bwd"] > calls["linear heads fwd (no_grad)"] > calls["autograd floor"]
