"""Test tiers: cpu (torch path vs the reference), interpret (Triton under TRITON_INTERPRET=1 on CPU
tensors), gpu (Triton on CUDA; skipped without it).

On a machine without CUDA the interpreter is switched on here, before anything imports Triton, so
that plain `pytest` runs the cpu and interpret tiers together.
"""

import importlib
import os
import shutil

if "TRITON_INTERPRET" not in os.environ and not (os.path.exists("/dev/nvidiactl") and shutil.which("nvidia-smi")):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton imported now, under the setting above: Triton fixes the interpreter on or off when it is first
# imported, so a test that flips TRITON_INTERPRET (to check that the ops refuse it) must not be the first
# to import it (run first, it turned the interpreter off for every later kernel: 37 failures).
try:
    importlib.import_module("triton")
except Exception:  # pragma: no cover - a platform without Triton runs the cpu tier only
    pass

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_interp = pytest.mark.skip(reason="interpret tier needs TRITON_INTERPRET=1 (set before triton is imported)")
    skip_gpu = pytest.mark.skip(reason="gpu tier needs a CUDA device")
    for item in items:
        if "interpret" in item.keywords and not INTERPRETING:
            item.add_marker(skip_interp)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def no_impl_env(monkeypatch):
    monkeypatch.delenv("FASTHYDRA_IMPL", raising=False)
