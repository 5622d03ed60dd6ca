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


@pytest.mark.cpu
@pytest.mark.parametrize("argv,message", [
    (["demo", "--heads", "1"], "--heads must be >= 2"),
    (["demo", "--epochs", "0"], "--epochs must be >= 1"),
    (["demo", "--temperature", "-1"], "--temperature must be finite and > 0"),
    (["demo", "--temperature", "nan"], "--temperature must be finite and > 0"),
    (["demo", "--head-hidden", "0"], "--head-hidden must be >= 1"),
    (["demo", "--teacher-top-k", "0"], "--teacher-top-k must be >= 1"),
    (["demo", "--device", "cuda:99"], "--device 'cuda:99'"),
    (["demo", "--device", "nonsense"], "--device 'nonsense' is not a device"),
    (["selftest", "--batch", "0"], "--batch must be >= 1"),
    (["selftest", "--temperature", "0"], "--temperature must be finite and > 0"),
    (["kernel-report", "--jobs", "0"], "fasthydra kernel-report: error: --jobs must be at least 1"),  # was __main__.py
])
def test_bad_options_are_usage_errors_before_any_work(monkeypatch, capsys, argv, message):
    """Each was a traceback (the temperature's after the members had trained) or an error naming two
    options at once; now argparse's usage error (exit status 2) names the option, and nothing runs."""
    import fasthydra.cli as cli
    import fasthydra.demo as demo

    def ran(*args, **kwargs):
        raise AssertionError("the command started before its options were checked")

    monkeypatch.setattr(demo, "run", ran)
    monkeypatch.setattr(cli, "run_demo", ran)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.cpu
def test_demo_run_checks_before_reading_data_or_training(monkeypatch, tmp_path):
    import fasthydra.demo as demo

    def started(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(demo, "load_dataset", started)
    with pytest.raises(ValueError, match="temperature"):
        demo.run("digits", heads=2, epochs=1, out=str(tmp_path), temperature=float("inf"))
    with pytest.raises(ValueError, match="dataset"):
        demo.run("digit", heads=2, epochs=1, out=str(tmp_path))
    monkeypatch.undo()
    monkeypatch.setattr(demo, "train_ensemble", started)  # the data-dependent check: after loading, before training
    with pytest.raises(ValueError, match="teacher_top_k = 11 needs a classification data set"):
        demo.run("digits", heads=2, epochs=1, out=str(tmp_path), teacher_top_k=11)
    with pytest.raises(ValueError, match="teacher_top_k = 1 needs a classification data set"):
        demo.run("toy-regression", heads=2, epochs=1, out=str(tmp_path), teacher_top_k=1)


@pytest.mark.cpu
def test_demo_names_the_missing_extra_before_any_work(monkeypatch, capsys):
    """Without the demo extra, `fasthydra demo` was a ModuleNotFoundError from inside the data loader (or,
    for matplotlib, after all the training); now a usage error names the packages the run needs."""
    import importlib.util

    import fasthydra.demo as demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in demo.PACKAGES else real(name, *a))
    calls = []
    monkeypatch.setattr(demo, "run", lambda *args, **kwargs: calls.append(args))
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--dataset", "digits"])
    assert exit_info.value.code == 2
    assert "the demo on digits needs scikit-learn, matplotlib: pip install 'fasthydra[demo]'" in capsys.readouterr().err
    assert main(["demo", "--dataset", "blobs-1000", "--no-plots"]) == 0  # needs none of them
    assert len(calls) == 1
