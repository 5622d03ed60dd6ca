"""fasthydra.ops.launch: the direct launch path launches what Triton's own path would.

- The key refines Triton's specialisation (checked against the installed Triton's own specialiser, so the
  interpret tier checks it under every Triton version CI installs).
- With the driver stood in (bench/host_overhead.py), every launch of a training step's second call takes the
  direct path, and hands the compiled kernel's launcher the same kernel and the same arguments, in the same
  order, as JITFunction.run does for that call; a call whose argument properties change (a pointer off by 4
  bytes, an integer that becomes 1 or a multiple of 16) goes back through Triton.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from fasthydra import HydraHead, hydra_kl_loss, uncertainty
from fasthydra.ops import launch as L

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"

INTS = [0, 1, 2, 15, 16, 17, 32, 48, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**32, -2**31,
        -2**31 - 16, -2**31 - 1, 2**63 - 16, 2**63 - 1, 2**63, 2**63 + 16, 2**64 - 16, 2**64 - 1, -2**63]


def _tensors() -> list:
    """Views of one buffer at every address residue modulo 16 a dtype can take, in several dtypes, and a
    Parameter beside a plain tensor."""
    buf = torch.zeros(256, dtype=torch.uint8)
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.uint8, torch.bool):
        size = torch.empty((), dtype=dtype).element_size()
        for offset in range(0, 16, size):
            out.append(buf[offset:offset + 64].view(dtype))
    out.append(torch.nn.Parameter(torch.zeros(4)))
    out.append(torch.nn.Parameter(torch.zeros(5))[1:])
    return out


@pytest.mark.interpret
@pytest.mark.kernels
def test_the_key_refines_tritons_specialisation():
    """Any two arguments whose key entries are equal are specialised alike by Triton (type, 16-byte alignment,
    divisibility by 16, equal to 1, integer range), so an entry found under a key is the kernel Triton would
    pick. And the key does not merge what Triton tells apart in the cases met in practice (the direct path is
    only taken on a hit)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends import BaseBackend

    values = [*INTS, 0.5, 1.0, 16.0, True, False, None, *_tensors()]
    keys = [L.args_key((v,))[0] for v in values]
    specs = [native_specialize_impl(BaseBackend, v, False, True, True) for v in values]
    for i in range(len(values)):
        for j in range(len(values)):
            if keys[i] == keys[j]:
                assert specs[i] == specs[j], (values[i], values[j], keys[i], specs[i], specs[j])
    assert keys[INTS.index(1)] != L.args_key((True,))[0]  # (1 == True in Python: the key keeps their types)
    # tensors: one entry per (dtype, address modulo 16); Triton's split by alignment is reproduced
    t = _tensors()
    assert len({L.args_key((x,))[0] for x in t}) == len({(x.dtype, x.data_ptr() % 16) for x in t})


@pytest.mark.interpret
@pytest.mark.kernels
def test_arguments_the_key_cannot_stand_for_are_not_cached():
    """_tail: the arguments past the positional ones in signature order, or None where a cached launch could
    not be trusted with them (a float or a tensor given positionally for a constexpr, a keyword tensor, an
    argument type the key does not model)."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    def kernel(x_ptr, n, scale, BLOCK: tl.constexpr, MODE: tl.constexpr = "a"):
        pass

    launcher = L._Launcher(JITFunction(kernel))  # (the class itself: under the interpreter triton.jit makes another)
    x = torch.zeros(4)
    assert launcher._tail((x, 3, 0.5), {"BLOCK": 16}) == (16, "a")
    assert launcher._tail((x, 3), {"MODE": "b", "BLOCK": 8, "scale": 1.5, "num_warps": 4}) == (1.5, 8, "b")
    assert launcher._tail((x, 3, 0.5, 16, "b"), {}) == ()
    assert launcher._tail((x, 3, 0.5, 16.0), {}) is None  # a float constexpr: its key entry is the type alone
    assert launcher._tail((x, 3, 0.5, x), {}) is None  # a tensor as a constexpr
    assert launcher._tail((x, 3), {"scale": x, "BLOCK": 4}) is None  # a keyword tensor: keyed by identity
    assert launcher._tail((x, 3, 0.5), {}) is None  # BLOCK missing: Triton's path raises its own error
    assert launcher._tail((x, [3], 0.5), {"BLOCK": 16}) is None  # a list: not a modelled type


def _without_interpreter() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, BENCH)
    import host_overhead as H
    import torch
    from triton import knobs
    from triton.runtime.jit import JITFunction
    H.install_stand_ins("triton")
    from fasthydra.ops import launch as L
    from fasthydra.kernels.checks import _flag_rows_kernel

    launched, compiled, jit_calls = [], {}, [0]

    class Compiled:  # one per Triton cache key: a wrong kernel shows as another `function`
        def __init__(self):
            self.function, self.packed_metadata = object(), object()

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *args):
            launched.append(args)

    H._EveryKeyCached.get = lambda self, key, default=None: compiled.setdefault(key, Compiled())
    real_run = JITFunction.run

    def counting_run(self, *args, **kwargs):
        jit_calls[0] += 1
        return real_run(self, *args, **kwargs)

    JITFunction.run = counting_run
    real_call = L._Launcher.__call__
    report = {"direct": 0, "via_triton": 0}

    def same(a, b):
        return a is b or (type(a) is type(b) and type(a) in (int, float, bool, str) and a == b)

    def checked_call(self, grid, args, kwargs):
        launched.clear()
        self.jit[grid](*args, **kwargs)
        expected = launched[-1]
        launched.clear()
        before = jit_calls[0]
        out = real_call(self, grid, args, kwargs)
        got = launched[-1]
        assert got[:4] == expected[:4], (got[:4], expected[:4])  # grid, stream
        assert got[4] is expected[4] and got[5] is expected[5], self.jit.fn.__name__  # the same compiled kernel
        assert len(got) == len(expected) and all(same(a, b) for a, b in zip(got[9:], expected[9:])), \\
            self.jit.fn.__name__
        report["direct" if jit_calls[0] == before else "via_triton"] += 1
        return out

    L._Launcher.__call__ = checked_call
    for name in sys.argv[1:]:
        step, params = H.cases()[name]
        for p in params:
            p.grad = None
        step()
        report.update(direct=0, via_triton=0)
        for p in params:
            p.grad = None
        step()
        print(name, "|", report["direct"], report["via_triton"])

    # argument properties that change Triton's specialisation go back through it
    word = torch.zeros(4, dtype=torch.int32)
    buf = torch.zeros(64)
    calls = [(buf, 16), (buf.clone(), 16), (buf[1:], 16), (buf[2:], 16), (buf[4:], 16), (buf, 17), (buf, 1),
             (buf, 33), (buf, 48), (buf[4:], 48)]
    route = []
    for values, n in calls:
        report.update(direct=0, via_triton=0)
        L.launch(_flag_rows_kernel, (1,), values, n, word, BLOCK=256)
        route.append("d" if report["direct"] else "t")
    print("route", "".join(route))
    # a launch hook set (a profiler): Triton's path, which calls it
    knobs.runtime.launch_enter_hook.add(lambda metadata: None)
    report.update(direct=0, via_triton=0)
    L.launch(_flag_rows_kernel, (1,), buf, 16, word, BLOCK=256)
    print("hooked", report["direct"], report["via_triton"])
""")

CASES = ["linear heads fwd+bwd", "linear heads fwd+bwd, tensor T", "linear heads fwd+bwd, learned T",
         "linear heads fwd (no_grad)", "MLP heads fwd+bwd", "loss on logits fwd+bwd",
         "loss on logits fwd+bwd, row mask", "Gaussian heads fwd+bwd", "uncertainty",
         "linear heads fwd+bwd, cuBLAS path"]


@pytest.mark.cpu
@pytest.mark.kernels
def test_direct_launches_pass_what_tritons_path_passes():
    proc = subprocess.run([sys.executable, "-c", f"BENCH = {str(BENCH)!r}\n" + _SCRIPT, *CASES],
                          env=_without_interpreter(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(line.split(" | ") for line in proc.stdout.splitlines() if " | " in line)
    assert set(rows) == set(CASES)
    for name, counts in rows.items():
        direct, via_triton = map(int, counts.split())
        assert direct >= 1 and via_triton == 0, (name, counts)  # a repeated step: every launch direct
    # buf; a clone (another address, aligned: direct); 4 and 8 bytes off (each new); 16 bytes off (aligned:
    # direct); then n = 17, 1 (a constant to Triton), 33 and 48 (each a new value); 48 again 16 bytes off (direct)
    assert "route tdttdttttd" in proc.stdout, proc.stdout
    assert "hooked 0 1" in proc.stdout


def _step(head, x, t, z):
    """A training step of the heads, the loss on logits and uncertainty's gradient: their values and grads."""
    x = x.detach().requires_grad_()
    z = z.detach().requires_grad_()
    for p in head.parameters():
        p.grad = None
    loss = head.distill_loss(x, t, temperature=2.0)
    loss.backward()
    kl = hydra_kl_loss(z, t, 2.0)
    u = uncertainty(z)
    (kl + u.epistemic.sum()).backward()
    return [loss.detach(), x.grad, *(p.grad for p in head.parameters()), kl.detach(), z.grad, u.total]


@pytest.mark.gpu
@pytest.mark.kernels
@pytest.mark.parametrize("hidden", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_steps_take_the_direct_path_and_match_tritons(monkeypatch, hidden, dtype):
    """A training loop's repeated calls launch directly (no JITFunction.run), and every step, with new data, inputs
    an element off their alignment (x's rows, the logits, the teacher) and another batch size between them, gives
    what Triton's own launches give on the same inputs."""
    from triton.runtime.jit import JITFunction

    calls = [0]
    real = JITFunction.run

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counting)
    d, m, c = 32, 4, 10
    head = HydraHead(d, c, m, hidden_features=hidden, impl="triton", device="cuda", dtype=dtype)
    wide = torch.randn(64, d + 1, device="cuda", dtype=dtype)
    inputs = [(torch.randn(b, d, device="cuda", dtype=dtype), b) for b in (64, 64)]
    inputs += [(wide[:, 1:], 64), (torch.randn(48, d, device="cuda", dtype=dtype), 48),
               (torch.randn(64, d, device="cuda", dtype=dtype), 64)]
    jit_calls = []
    for i, (x, b) in enumerate(inputs):
        off = 1 if i == 2 else 0  # the third step's logits and teacher one element off their buffers' alignment
        t = torch.randn(b * m * c + off, device="cuda", dtype=dtype)[off:].view(b, m, c)
        z = torch.randn(b * m * c + off, device="cuda", dtype=dtype)[off:].view(b, m, c)
        before = calls[0]
        direct = _step(head, x, t, z)
        jit_calls.append(calls[0] - before)
        monkeypatch.setattr(L, "FAST_LAUNCH", False)
        through_triton = _step(head, x, t, z)
        monkeypatch.setattr(L, "FAST_LAUNCH", True)
        for got, want in zip(direct, through_triton):
            torch.testing.assert_close(got, want)
    # the second and fifth steps repeat the first's argument properties: every launch direct
    assert jit_calls[1] == 0 and jit_calls[4] == 0, jit_calls
    assert jit_calls[0] > 0 and jit_calls[2] > 0, jit_calls  # (the first call, and logits off alignment: new keys)
