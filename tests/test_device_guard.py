"""Ops run on their tensors' CUDA device, as torch's own do. Triton launches on the *current* device (and its
current stream; CUDA events and graph-capture queries follow it too), and in a model split across GPUs
(``device_map="auto"``, pipeline stages) the heads' tensors need not live there: a kernel launched on the wrong
device fails ("cannot be accessed from Triton") or reads another device's memory.

No machine here has two GPUs, so the interpret tier stands a fake current device in for CUDA's: every tensor
"lives" on device 1 while device 0 is current, ``torch.cuda.device`` switches the fake one, and every Triton
launch of every public op's forward records which device was current. The backward runs with the tensors'
device current (autograd's engine runs a CUDA node on its device's worker thread), as it does on a GPU.
"""

import pytest
import torch

from fasthydra import GaussianHydraHead, HydraHead, TopKTeacher, hinton_kl_loss, hydra_kl_loss, uncertainty
from fasthydra.ops import _common



class _FakeCuda:
    """The current CUDA device of this test (0 until a ``torch.cuda.device`` context says otherwise)."""

    current = 0

    def __init__(self, index):
        self.index = index

    def __enter__(self):
        self.before, _FakeCuda.current = _FakeCuda.current, self.index

    def __exit__(self, *exc):
        _FakeCuda.current = self.before


@pytest.fixture
def launches_on(monkeypatch):
    """The fake current device at each Triton launch, with every tensor on device 1."""
    import triton.runtime.interpreter as interp

    seen = []
    real_getitem = interp.InterpretedFunction.__getitem__

    def getitem(self, grid):
        launcher = real_getitem(self, grid)

        def launch(*args, **kwargs):
            seen.append((self.fn.__name__, _FakeCuda.current))
            return launcher(*args, **kwargs)

        return launch

    monkeypatch.setattr(interp.InterpretedFunction, "__getitem__", getitem)
    monkeypatch.setattr(torch.cuda, "device", _FakeCuda)
    monkeypatch.setattr(_common, "device_to_enter", lambda t: None if _FakeCuda.current == 1 else 1)
    _FakeCuda.current = 0
    return seen


def _steps():
    """(name, a forward + backward of one public op on the Triton path)."""
    g = torch.Generator().manual_seed(0)
    b, d, m, c = 6, 8, 3, 11
    x = torch.randn(b, d, generator=g)
    t = torch.randn(b, m, c, generator=g)
    keep = torch.tensor([True, False, True, True, True, False])
    z = torch.randn(b, m, c, generator=g, requires_grad=True)
    topk = TopKTeacher(*t.topk(4, dim=-1))
    linear, mlp = HydraHead(d, c, m, impl="triton"), HydraHead(d, c, m, hidden_features=5, impl="triton")
    gauss = GaussianHydraHead(d, 2, m, impl="triton")
    tm, tv = torch.randn(b, m, 2, generator=g), torch.rand(b, m, 2, generator=g) + 0.5
    return [
        ("hydra_kl_loss", lambda: hydra_kl_loss(z, t, 2.0, impl="triton")),
        ("hydra_kl_loss, masked", lambda: hydra_kl_loss(z, t, 2.0, impl="triton", row_mask=keep)),
        ("hydra_kl_loss, top-k", lambda: hydra_kl_loss(z, topk, 2.0, impl="triton")),
        ("hinton_kl_loss", lambda: hinton_kl_loss(z[:, 0], t, 2.0, impl="triton")),
        ("hinton_kl_loss, top-k", lambda: hinton_kl_loss(z[:, 0], topk, 2.0, impl="triton")),
        ("linear heads", lambda: linear.distill_loss(x, t, 2.0)),
        ("linear heads, masked", lambda: linear.distill_loss(x, t, 2.0, row_mask=keep)),
        ("MLP heads", lambda: mlp.distill_loss(x, t, 2.0)),
        ("Gaussian heads", lambda: gauss.distill_loss(x, tm, tv)),
        ("uncertainty", lambda: uncertainty(z, impl="triton").total.sum() + z.sum()),
    ]


@pytest.mark.interpret
@pytest.mark.parametrize("name", [name for name, _ in _steps()])
def test_every_forward_launch_runs_on_the_tensors_device(launches_on, name):
    step = dict(_steps())[name]
    loss = step()
    assert _FakeCuda.current == 0  # the caller's device is current again
    forward = list(launches_on)
    with _FakeCuda(1):  # (autograd's engine: a CUDA node runs with its device current)
        loss.backward()
    assert forward, "no Triton launch seen: the test would prove nothing"
    assert all(device == 1 for _, device in forward), forward


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["hydra_kl_loss, masked", "linear heads"])
def test_compiled_ops_launch_on_the_tensors_device(launches_on, name):
    """A compiled program calls the custom ops' bodies without the functional layer around them: the bodies
    enter the tensors' device themselves."""
    step = dict(_steps())[name]
    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")()
    assert launches_on and all(device == 1 for _, device in launches_on), launches_on
    assert torch.isfinite(loss)


@pytest.mark.cpu
def test_device_to_enter_reads_no_cuda_state_for_cpu_tensors(monkeypatch):
    def boom():
        raise AssertionError("torch.cuda.current_device() called for a CPU tensor")

    monkeypatch.setattr(torch.cuda, "current_device", boom)
    assert _common.device_to_enter(torch.ones(2)) is None
    assert _common.device_to_enter(torch.ones(2, device="meta")) is None


@pytest.mark.cpu
def test_device_to_enter_names_the_tensors_device_when_another_is_current(monkeypatch):
    class OnCuda1(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 1)

    t = torch.ones(2).as_subclass(OnCuda1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _common.device_to_enter(t) == 1
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _common.device_to_enter(t) is None
