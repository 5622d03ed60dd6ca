"""cpu tier: the layout rules of DESIGN section 3 (kernels installed as fasthydra.kernels, import arrows)."""

import ast
import pathlib
import subprocess
import sys

import pytest

import fasthydra

pytestmark = pytest.mark.cpu

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")


def test_kernels_are_installed_as_fasthydra_kernels(tmp_path):
    code = "import fasthydra.kernels as k, importlib.util as u; print(k.__file__); print(u.find_spec('kernels'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    path, spec = out.stdout.split("\n")[:2]
    assert pathlib.Path(path).parent.name == "kernels"
    assert spec == "None"  # never importable as a top-level `kernels` from outside the repo


def test_kernels_import_only_triton():
    for path in (ROOT / "kernels").glob("*.py"):
        for name in _imports(path):
            assert name.split(".")[0] in ("triton", "") or name.startswith("."), f"{path.name} imports {name}"


def test_only_ops_import_kernels():
    for path in (ROOT / "fasthydra").rglob("*.py"):
        rel = path.relative_to(ROOT / "fasthydra")
        if rel.parts[0] == "ops" or rel.name == "kernel_report.py":  # the report compiles them by name
            continue
        for name in _imports(path):
            assert "kernels" not in name, f"{rel} imports {name}: only fasthydra/ops may"


def test_public_names():
    for name in ("HydraHead", "hydra_kl_loss", "hinton_kl_loss", "uncertainty", "Uncertainty"):
        assert hasattr(fasthydra, name)
    from fasthydra.functional import IMPLS

    assert IMPLS == ("auto", "triton", "torch")


@pytest.mark.cpu
def test_an_eager_training_step_does_not_import_the_compiler():
    """Eager calls bypass the custom-op dispatcher: torch._dynamo and sympy (about a second and 150 MiB
    on the first call) load only when torch.compile is in use."""
    code = (
        "import sys, torch\n"
        "from fasthydra import HydraHead, hydra_kl_loss, hinton_kl_loss, uncertainty\n"
        "h = HydraHead(16, 10, 2, hidden_features=8)\n"
        "x = torch.randn(4, 16, requires_grad=True); t = torch.randn(4, 2, 10)\n"
        "h.distill_loss(x, t, 2.0).backward(); hydra_kl_loss(h(x), t).backward()\n"
        "hinton_kl_loss(torch.randn(4, 10, requires_grad=True), t).backward(); uncertainty(h(x))\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_docstring_examples_run():
    """The examples in the public functions' and modules' docstrings run and print what they show
    (DESIGN section 5 asks every public function for one; a stale one would mislead)."""
    import doctest
    import importlib

    for name in ("fasthydra.functional", "fasthydra.modules"):
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0, f"{name}: no docstring examples found"
        assert result.failed == 0, f"{name}: {result.failed} docstring example(s) failed (see the output above)"
