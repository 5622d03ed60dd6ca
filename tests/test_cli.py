"""cpu/interpret tiers: the README's main job (`fasthydra demo`) runs and its loss falls."""

import io
import subprocess
import sys

import pytest

from fasthydra.cli import main, run_demo


@pytest.mark.cpu
def test_demo_loss_falls_on_the_torch_path():
    out = io.StringIO()
    losses = run_demo(steps=120, heads=3, batch=64, impl="torch", log_every=40, stream=out)
    assert len(losses) == 120
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    text = out.getvalue()
    assert "impl='torch' -> 'torch'" in text and "step    40" in text


@pytest.mark.interpret
def test_demo_runs_the_triton_kernels():
    out = io.StringIO()
    losses = run_demo(steps=30, heads=2, batch=32, impl="triton", log_every=5, stream=out)
    assert sum(losses[-5:]) < 0.85 * sum(losses[:5])
    assert "-> 'triton'" in out.getvalue()
    # same seed, same data: the torch path follows the same trajectory
    torch_losses = run_demo(steps=30, heads=2, batch=32, impl="torch", log_every=5, stream=io.StringIO())
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(losses, torch_losses))


@pytest.mark.cpu
def test_console_script_and_bad_arguments():
    for module in ("fasthydra.cli", "fasthydra"):  # the console script's code, and `python -m fasthydra`
        proc = subprocess.run([sys.executable, "-m", module, "selftest", "--steps", "3", "--heads", "2"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "hydra loss" in proc.stdout
    with pytest.raises(SystemExit):
        main(["selftest", "--steps", "0"])
