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


# Modules of the demo extra, and the files that may import them (the demo's data sets and plots).
DEMO_MODULES = {"torchvision", "sklearn", "mnist1d", "matplotlib"}
DEMO_FILES = {"demo.py", "data.py"}


def test_the_package_imports_only_what_it_declares():
    """Every third-party module the package imports (at the top or inside a function) is a declared
    dependency, the demo extra's only in the demo's files, and every declared dependency is used. einops was
    declared and never imported; tqdm was imported by the recipe (train_ensemble, distill) and the selftest but
    declared only in the demo extra, so a plain install failed there with ModuleNotFoundError."""
    import re
    from importlib.metadata import requires

    core = {re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0].lower() for r in requires("fasthydra") if "extra ==" not in r}
    used = set()
    for path in [*(ROOT / "fasthydra").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]:
        for name in _imports(path):
            top = name.split(".")[0]
            if not top or top == "fasthydra" or top in sys.stdlib_module_names:
                continue
            used.add(top)
            allowed = core | (DEMO_MODULES if path.name in DEMO_FILES and path.parent.name == "fasthydra" else set())
            assert top in allowed, f"{path.relative_to(ROOT)} imports {name}, not a declared dependency there"
    assert core <= used, f"declared but never imported: {sorted(core - used)}"


def test_public_names():
    for name in ("HydraHead", "hydra_kl_loss", "hinton_kl_loss", "uncertainty", "Uncertainty"):
        assert hasattr(fasthydra, name)
    from fasthydra.functional import IMPLS

    assert IMPLS == ("auto", "triton", "torch")


@pytest.mark.cpu
def test_the_oldest_torch_per_machine():
    """The installed metadata (what pip resolves) asks for torch 2.5 on ARM, where 2.4's fp32 bmm rounds its
    inputs to bf16 on CPUs with BF16, and for 2.4 elsewhere: one requirement per machine."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.version import Version

    torch_reqs = [r for r in map(Requirement, requires("fasthydra")) if r.name == "torch"]

    def oldest(machine):
        env = {"platform_machine": machine, "platform_system": "Linux", "extra": ""}
        (req,) = [r for r in torch_reqs if r.marker is None or r.marker.evaluate(env)]
        (spec,) = req.specifier
        return spec.operator, Version(spec.version)

    assert oldest("x86_64") == (">=", Version("2.4"))
    assert oldest("aarch64") == oldest("arm64") == (">=", Version("2.5"))


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


def test_the_source_keeps_the_house_style():
    """Every Python file of the repository has lines of at most 120 characters and nothing pyflakes reports
    (unused imports or names, undefined names, redefinitions): the conventions each change was checked
    against by hand, held here so that a lapse fails the tests rather than waiting for a reviewer."""
    import io

    from pyflakes.api import checkPath
    from pyflakes.reporter import Reporter

    folders = ("fasthydra", "kernels", "tests", "bench", "examples")
    paths = sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))
    assert len(paths) > 40, "the source files were not found beside the tests"
    long_lines = [f"{p.relative_to(ROOT)}:{i}: {len(line)} characters"
                  for p in paths for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120]
    assert not long_lines, "lines over 120 characters:\n" + "\n".join(long_lines)
    out = io.StringIO()
    reporter = Reporter(out, out)
    warnings = sum(checkPath(str(p), reporter) for p in paths)
    assert warnings == 0, out.getvalue()
