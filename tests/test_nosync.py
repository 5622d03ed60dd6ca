"""interpret tier: the ops issue no host synchronisation on the Triton path, and teacher value errors
still surface, later, without one (the GPU machinery of fasthydra/ops/checks.py, run on CPU tensors
with the copy's event treated as landed)."""

import contextlib

import pytest
import torch
from helpers import HEADS_PATHS, teacher_logits, use_heads_path

from fasthydra import HydraHead, GaussianHydraHead, hinton_kl_loss, hydra_kl_loss, uncertainty
from fasthydra.functional import gaussian_kl_loss
from fasthydra.ops import checks

pytestmark = pytest.mark.interpret

SYNCING = ("item", "__bool__", "cpu", "tolist", "__float__", "__int__", "nonzero")


@pytest.fixture
def deferred(monkeypatch):
    monkeypatch.setattr(checks, "_DEFER_ON_CPU", True)
    monkeypatch.setattr(checks, "COPY_INTERVAL_S", 0.0)  # a copy at every call (test_copies_are_spaced: not)
    checks._flags.clear()
    yield
    checks._flags.clear()


@contextlib.contextmanager
def no_host_sync():
    """Every tensor method that reads a value back to the host fails inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def trap(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"torch.Tensor.{name} called inside a training step (a host sync on a GPU)")
        return fail

    try:
        for name in SYNCING:
            setattr(torch.Tensor, name, trap(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_the_trap_really_traps():
    with no_host_sync(), pytest.raises(AssertionError, match="host sync"):
        torch.ones(()).item()


@pytest.mark.parametrize("gemm", HEADS_PATHS)
@pytest.mark.parametrize("hidden", [None, 5])
def test_training_steps_issue_no_host_sync(deferred, monkeypatch, gemm, hidden):
    use_heads_path(monkeypatch, gemm)
    head = HydraHead(8, 12, 3, hidden_features=hidden, impl="triton")
    x = torch.randn(6, 8, requires_grad=True)
    t = teacher_logits(6, 3, 12)
    z = torch.randn(6, 3, 12, requires_grad=True)
    z1 = torch.randn(6, 12, requires_grad=True)
    g = GaussianHydraHead(8, 2, 3, impl="triton")
    tm, tv = torch.randn(6, 3, 2), torch.rand(6, 3, 2) + 0.1
    mu, var = torch.randn(6, 3, 2, requires_grad=True), torch.rand(6, 3, 2) + 0.1
    with no_host_sync():
        for _ in range(2):  # the second step polls the first step's copy
            head.distill_loss(x, t, 2.0).backward()
            (head.distill_loss(x, t, 2.0) * torch.tensor(0.5)).backward()  # an upstream gradient != 1
            hydra_kl_loss(z, t, 2.0, impl="triton").backward()
            hydra_kl_loss(z, t, 2.0, reduction="none", impl="triton").sum().backward()
            hinton_kl_loss(z1, t, 2.0, impl="triton").backward()
            g.distill_loss(x, tm, tv).backward()
            gaussian_kl_loss(mu, var, tm, tv).backward()
            uncertainty(head(x))
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned"])
@pytest.mark.parametrize("gemm", HEADS_PATHS)
def test_a_tensor_temperature_is_never_read_on_the_host(deferred, monkeypatch, gemm, learned):
    """A temperature tensor kept as a device one is (KEEP_CPU_TEMPERATURE_TENSOR): the Triton path's steps read
    it in the kernels only, for every op that takes one; a value out of range there is a NaN loss, not a sync.
    A learned one (requires grad) gets its gradient without a sync too."""
    from fasthydra.ops import _common

    monkeypatch.setattr(_common, "KEEP_CPU_TEMPERATURE_TENSOR", True)
    use_heads_path(monkeypatch, gemm)
    head = HydraHead(8, 12, 3, hidden_features=5, impl="triton")
    x = torch.randn(6, 8, requires_grad=True)
    t = teacher_logits(6, 3, 12)
    z = torch.randn(6, 3, 12, requires_grad=True)
    z1 = torch.randn(6, 12, requires_grad=True)
    temperature = torch.tensor(2.0, requires_grad=learned)
    with no_host_sync():
        for value in (2.0, 0.5, 0.0):
            with torch.no_grad():
                temperature.fill_(value)
            loss = (head.distill_loss(x, t, temperature) + hydra_kl_loss(z, t, temperature, impl="triton")
                    + hinton_kl_loss(z1, t, temperature, impl="triton")
                    + uncertainty(head(x), temperature, impl="triton").epistemic.sum())
            loss.backward()
    assert torch.isnan(loss)  # (the last value, 0, is out of range)
    assert (temperature.grad is not None) == learned


def test_a_bad_teacher_is_reported_on_a_later_call_without_a_sync(deferred):
    z = torch.randn(4, 3, 20, requires_grad=True)
    bad = torch.randn(4, 3, 20)
    bad[2, 1, 7] = float("nan")
    good = torch.randn(4, 3, 20)
    with no_host_sync():
        loss = hydra_kl_loss(z, bad, impl="triton")  # no stall: the error is on its way to the host
    assert torch.isnan(loss)  # the step itself carries NaN: nothing passes silently
    with pytest.raises(ValueError, match=r"hydra_kl_loss: the teacher contained NaN.*1 call\(s\) ago"):
        hydra_kl_loss(z, good, impl="triton")  # the copy the bad call issued has landed: reported here
    assert torch.isfinite(hydra_kl_loss(z, good, impl="triton"))  # reported once, then cleared
    hydra_kl_loss(z, good, impl="triton")


@pytest.mark.parametrize("op", ["distill_loss", "hinton_kl_loss", "gaussian_kl_loss"])
def test_each_op_names_itself(deferred, op):
    head = HydraHead(8, 12, 3, impl="triton")
    x = torch.randn(5, 8)
    t = teacher_logits(5, 3, 12)
    bad = t.clone()
    bad[1, 2, :] = float("-inf")
    tm, tv = torch.randn(5, 3, 2), torch.rand(5, 3, 2) + 0.1
    bad_tv = tv.clone()
    bad_tv[0, 0, 0] = -1.0
    run = {
        "distill_loss": lambda tt: head.distill_loss(x, tt),
        "hinton_kl_loss": lambda tt: hinton_kl_loss(torch.randn(5, 12), tt, impl="triton"),
        "gaussian_kl_loss": lambda tt: gaussian_kl_loss(torch.randn(5, 3, 2), tv, tm, bad_tv if tt is bad else tv),
    }[op]
    with pytest.raises(ValueError, match=op):  # on the bad call's inner op or on a later call
        run(bad)
        for _ in range(3):
            run(t)
    run(t)  # cleared once reported


def test_strict_mode_raises_at_the_call(deferred, monkeypatch):
    monkeypatch.setenv("FASTHYDRA_STRICT", "1")
    bad = torch.randn(4, 3, 20)
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"\+Inf"):
        hydra_kl_loss(torch.randn(4, 3, 20), bad, impl="triton")


def test_pending_errors_can_be_read_on_demand(deferred):
    """After CUDA-graph replays nothing polls: raise_pending_errors() reads the word (synchronising)."""
    bad = torch.randn(4, 3, 20)
    bad[1, 1, :] = float("-inf")
    flags = checks._flags_of(torch.device("cpu"))
    flags.in_flight = True  # as if the copy had not landed yet: no call would raise on its own
    flags.event = type("NotLanded", (), {"record": lambda self: None, "query": lambda self: False})()
    with no_host_sync():
        hydra_kl_loss(torch.randn(4, 3, 20), bad, impl="triton")
    checks.raise_pending_errors(sync=False)  # nothing has landed: nothing to say yet
    with pytest.raises(ValueError, match="-Inf for every class"):
        checks.raise_pending_errors(sync=True)
    checks.raise_pending_errors(sync=True)  # reported once, then cleared


def test_pending_errors_without_waiting_in_a_graphed_loop(deferred, monkeypatch):
    """A graphed loop runs no op's Python: its replays write the word, nothing copies it. raise_pending_errors(
    sync=False) once a step starts that copy (spaced as the ops space theirs) and raises from a landed one: the
    error a step after the replay that set it, with no host read on the way."""
    cpu = torch.device("cpu")
    flags = checks._flags_of(cpu)
    pending = []  # the copy "in flight" until the test lets it land
    flags.event = type("Event", (), {"record": lambda self: pending.append(True), "query": lambda self: not pending})()
    monkeypatch.setattr(checks, "COPY_INTERVAL_S", 10.0)
    with no_host_sync():
        checks.raise_pending_errors(sync=False)  # clean: a copy starts
        assert flags.in_flight and len(pending) == 1
        checks.error_word(cpu, "distill_loss").fill_(checks.NAN)  # a replay's kernel sees a NaN teacher
        checks.raise_pending_errors(sync=False)  # the copy has not landed: nothing yet, no second copy
        assert len(pending) == 1
        pending.clear()  # it lands (taken before the NaN: clean)
        checks.raise_pending_errors(sync=False)  # clean; the next copy waits for COPY_INTERVAL_S
        assert not flags.in_flight and not pending
        monkeypatch.setattr(checks, "COPY_INTERVAL_S", 0.0)
        checks.raise_pending_errors(sync=False)  # now it starts, with the NaN in it
        assert flags.in_flight and len(pending) == 1
        pending.clear()
        with pytest.raises(ValueError, match="distill_loss: the teacher contained NaN.* after the last fasthydra call "
                                             "that ran its Python .a CUDA-graph replay's kernels"):
            checks.raise_pending_errors(sync=False)
    assert not checks.error_word(cpu, "distill_loss").any()  # reported once: the word is clear


def test_every_op_that_saw_a_bad_teacher_is_named(deferred):
    """On a GPU a NaN member of the Hinton loss is flagged by its target kernel and, through the NaN
    target, by the inner loss kernel before any copy lands: the error names both ops."""
    cpu = torch.device("cpu")
    checks.error_word(cpu, "hydra_kl_loss").fill_(checks.NAN)
    checks.error_word(cpu, "hinton_kl_loss").fill_(checks.NAN)
    with pytest.raises(ValueError, match=r"hydra_kl_loss: .*NaN.*; hinton_kl_loss: .*NaN"):
        checks.raise_pending_errors(sync=True)
    checks.raise_pending_errors(sync=True)  # both cleared


@pytest.mark.parametrize("top_k", [False, True], ids=["dense", "top-k"])
def test_hinton_with_one_member_names_itself(deferred, top_k):
    """With one member the Hinton loss runs the loss op on the member itself; a bad member is still reported as
    the Hinton loss's (the error word's hinton_kl_loss slot), not as hydra_kl_loss's."""
    from fasthydra import TopKTeacher

    z, t = torch.randn(5, 12), teacher_logits(5, 1, 12)
    bad = t.clone()
    bad[1, 0, 3] = float("nan")
    indices = torch.arange(4).expand(5, 1, 4).contiguous()
    run = (lambda tt: hinton_kl_loss(z, TopKTeacher(tt[..., :4].contiguous(), indices), impl="triton")) if top_k \
        else (lambda tt: hinton_kl_loss(z, tt, impl="triton"))
    with pytest.raises(ValueError, match=r"^hinton_kl_loss: the teacher contained NaN"):
        run(bad)
        for _ in range(3):
            run(t)
    run(t)  # cleared once reported
    assert torch.isfinite(hydra_kl_loss(z[:, None], t, impl="triton"))  # (the context is gone: nothing pending)


def test_copies_are_spaced_and_a_bad_call_between_them_is_still_reported(deferred, monkeypatch):
    """With COPY_INTERVAL_S > 0 a fast loop copies the error word once per interval, not once per call;
    an error flagged by a call between two copies is raised after the next copy lands, with the range of
    calls it may have come from."""
    monkeypatch.setattr(checks, "COPY_INTERVAL_S", 0.01)
    now = [100.0]
    monkeypatch.setattr(checks, "_clock", lambda: now[0])
    cpu = torch.device("cpu")
    flags = checks._flags_of(cpu)
    copies = []
    real_copy = flags.host.copy_
    monkeypatch.setattr(flags, "host", type("Host", (), {
        "copy_": lambda self, src, non_blocking=False: copies.append(flags.calls) or real_copy(src),
        "numpy": lambda self: real_copy.__self__.numpy()})())
    z = torch.randn(4, 3, 20)
    good = torch.randn(4, 3, 20)
    bad = good.clone()
    bad[0, 2, 5] = float("nan")
    for _ in range(5):  # 1 ms apart: one copy (the first call's), polled landed by the second
        hydra_kl_loss(z, good, impl="triton")
        now[0] += 0.001
    assert copies == [1]
    hydra_kl_loss(z, bad, impl="triton")  # call 6, 5 ms after the copy: none issued, the bits wait in the word
    assert copies == [1]
    now[0] += 0.006
    hydra_kl_loss(z, good, impl="triton")  # call 7, 11 ms after: copies the word (NaN bit in it)
    assert copies == [1, 7]
    # call 8 reports it: the bad call is one of calls 2 to 7 (clean up to call 1, copied at call 7)
    with pytest.raises(ValueError, match=r"NaN.*seen by a fasthydra call 1 to 6 call\(s\) ago"):
        hydra_kl_loss(z, good, impl="triton")


@pytest.mark.parametrize("spelling", ["cpu", "torch.device"], ids=["string", "device"])
def test_the_word_is_found_under_any_spelling_of_its_device(deferred, spelling):
    """The ops pass a tensor's device; raise_pending_errors and users may pass "cpu" or a new torch.device:
    one error word per device, found (and polled) under every spelling."""
    device = "cpu" if spelling == "cpu" else torch.device("cpu")
    assert checks.error_word(device, "hydra_kl_loss") is checks.error_word(torch.randn(1).device, "hydra_kl_loss")
    assert len(checks._flags) == 1
    checks.after_launch(torch.device("cpu"), "hydra_kl_loss", (4, 3, 20))  # a copy in flight (landed at once)
    checks.error_word(device, "hydra_kl_loss").fill_(checks.POSINF)  # (set after the copy: not in it)
    checks.poll(device)  # the landed copy is clean
    checks.after_launch(device, "hydra_kl_loss", (4, 3, 20))  # copies the word with the bit in it
    with pytest.raises(ValueError, match=r"\+Inf"):
        checks.poll(device)


def test_threads_first_calls_share_one_word(deferred, monkeypatch):
    """Two threads' first calls on a device (one thread per GPU or per stream in a data-parallel step) get the one
    error word: the word made while the other thread was making its own is the one both see, so every kernel's bits
    land where poll reads them. (Without the lock, the slow construction below let each thread make a word.)"""
    import threading

    made = threading.Barrier(2, timeout=0.5)
    real_init = checks._DeviceFlags.__init__

    def slow_init(self, device):
        real_init(self, device)
        try:  # both threads inside the construction at once, if the code lets them be
            made.wait()
        except threading.BrokenBarrierError:
            pass

    monkeypatch.setattr(checks._DeviceFlags, "__init__", slow_init)
    words = [None, None]

    def first_call(i):
        words[i] = checks.error_word(torch.device("cpu"), "hydra_kl_loss")

    threads = [threading.Thread(target=first_call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert words[0] is words[1] and len(checks._flags) == 1


def _torch_topk_bits(values, indices, num_classes, values_too):
    """The top-k checks' verdict by torch ops: checks.topk_index_bits, and the values' (a NaN anywhere, a +inf
    anywhere, a row of -inf only: the kernel's reading, where one row max would let a NaN hide the others)."""
    return int(checks.topk_index_bits(indices, values, num_classes)) | (values_too and _value_bits(values))


def _value_bits(values):
    return (checks.NAN * bool(torch.isnan(values).any()) | checks.POSINF * bool(torch.isposinf(values).any())
            | checks.ALL_NEGINF * bool(torch.isneginf(values).all(dim=-1).any()))


@pytest.mark.parametrize("k", [1, 5, 32, 100, 256])
def test_topk_checks_are_one_launch_that_agrees_with_torch(deferred, k):
    """On the device a top-k teacher's checks are one launch (_flag_topk_kernel), whose bits match the torch ops'
    on random teachers: ids out of range (padding's too), live ids repeated in a row, padding (-inf) that repeats a
    kept class (allowed), NaN and +inf values, member rows of -inf only; each alone and together, with and without
    the values' checks, ids int32 and int64, and a view whose rows are not contiguous."""
    from test_interpret import _launches_and_torch_ops

    gen = torch.Generator().manual_seed(k)
    c, word = 300, checks.error_word(torch.device("cpu"), "hydra_kl_loss")
    seen = set()
    for trial in range(24):
        b, m = 1 + trial % 5, 1 + trial % 3
        values = torch.randn(b, m, k, generator=gen)
        indices = torch.stack([torch.randperm(c, generator=gen)[:k] for _ in range(b * m)]).view(b, m, k)
        faults = [f for f in range(6) if torch.rand((), generator=gen) < 0.3]
        for f in faults:
            row = (int(torch.randint(b, (), generator=gen)), int(torch.randint(m, (), generator=gen)))
            at = int(torch.randint(k, (), generator=gen))
            if f == 0:
                indices[row + (at,)] = c if at % 2 else -1
            elif f == 1 and k > 1:
                indices[row + (at,)] = indices[row + ((at + 1) % k,)]
            elif f == 2 and k > 1:  # padding entries naming a kept class: allowed
                values[row + (slice(1, None),)] = float("-inf")
                indices[row + (slice(1, None),)] = indices[row + (0,)]
            elif f == 3:
                values[row + (at,)] = float("nan")
            elif f == 4:
                values[row + (at,)] = float("inf")
            elif f == 5:
                values[row] = float("-inf")
        ids = indices.int() if trial % 2 else indices
        if trial % 3 == 0:  # rows of a wider tensor (members strided apart)
            wide_v, wide_i = torch.zeros(b, m, k + 3), torch.zeros(b, m, k + 3, dtype=ids.dtype)
            wide_v[..., :k], wide_i[..., :k] = values, ids
            values, ids = wide_v[..., :k], wide_i[..., :k]
        values_too = trial % 4 != 1
        want = _torch_topk_bits(values, ids, c, values_too)
        word.zero_()

        def check():
            checks.flag_topk_teacher(values, ids, c, "hydra_kl_loss", values_too=values_too)

        launches, ops = _launches_and_torch_ops(check)
        assert launches == ["_flag_topk_kernel"] and not [op for op in ops if op not in ("zero_",)], (launches, ops)
        word.zero_()
        check()
        assert int(word) == want, (trial, faults, int(word), want)
        seen.add(want)
    assert len(seen) >= 4, seen  # (the draws made several kinds of verdict)


def test_topk_checks_past_the_kernels_width_take_torch_ops(deferred, monkeypatch):
    monkeypatch.setattr(checks, "TOPK_CHECK_KERNEL_MAX_K", 4)
    values, indices = torch.randn(3, 2, 5), torch.arange(5).expand(3, 2, 5).clone()
    indices[1, 1, 3] = 0
    word = checks.error_word(torch.device("cpu"), "hydra_kl_loss")
    word.zero_()
    checks.flag_topk_teacher(values, indices, 10, "hydra_kl_loss")
    assert int(word) == checks.REPEATED_INDEX


def test_topk_checks_read_float64_values_in_their_own_dtype(deferred):
    """The torch path on CUDA checks float64 teachers with the same kernel: a finite value past float32's range is
    finite (read as float32 it would be +inf), an infinite one is not."""
    values = torch.tensor([1e300, -1e300, 3.0], dtype=torch.float64).repeat(2, 2, 1)
    indices = torch.tensor([4, 0, 2]).repeat(2, 2, 1)
    word = checks.error_word(torch.device("cpu"), "hinton_kl_loss")
    word.zero_()
    checks.flag_topk_teacher(values, indices, 5, "hinton_kl_loss")
    assert int(word) == 0
    values[1, 0, 2] = float("inf")
    checks.flag_topk_teacher(values, indices, 5, "hinton_kl_loss")
    assert int(word) == checks.POSINF
