"""Every op gives the same bits for the same inputs, call after call, and reads no memory it did not write.

A training step through every public op and path (the heads' small step and cuBLAS path, row masks, long rows in
tiles, a learned temperature, a teacher that requires grad, the Hinton target dense and top-k, the Gaussian heads,
``uncertainty`` forward and backward) runs again on the same inputs:

- again (cpu and gpu tiers; interpreted, the shuffled run below is the rerun): the same bits as the first time.
  The Triton kernels add no float with atomics (their one atomic count of finished programs only picks the program
  that sums the partials, in a fixed order), the CPU kernels split rows the same way for one thread count, and the
  Hinton loss of a top-k teacher adds its members one at a time.
- poisoned: under ``torch.use_deterministic_algorithms(True)``, which also fills every tensor that torch.empty and
  its kin make with NaN (integers with their largest value): the same bits again, and no op of the step has only a
  nondeterministic implementation (torch would raise). A buffer an op allocates and reads before it writes it
  would show here; a CPU's fresh allocations are often zero pages, which hide such a read, and a GPU's caching
  allocator hands back what the last tensor left.

- programs in another order (interpret tier): every interpreted launch runs its programs in a random order, where
  the interpreter otherwise runs them in grid order and a GPU in any: the same bits again. A program that read
  another's output without the count that orders them, or took the last program to finish for the last in the
  grid, would show here.

- no races (interpret tier): no two programs of a launch store to one address, and none loads what another
  stores before an atomic of its own orders it after that store (the last-program sums' count). The interpreter
  runs one program after another, so a kernel with such a race gives the expected bits there and not on a chip.

``FASTHYDRA_TEST_POISON=1`` runs every test of the suite with allocations poisoned so, ``FASTHYDRA_TEST_SHUFFLE=1``
its interpreted launches with programs shuffled so, ``FASTHYDRA_TEST_RACES=1`` watched for races so
(tests/conftest.py).

cpu tier: the torch path (its C row kernels); interpret tier: the Triton kernels on CPU tensors, both heads paths;
gpu tier: both, on CUDA (with cuBLAS's deterministic workspace setting, which torch asks for in this mode).
"""

import pytest
import torch
import triton
import triton.language as tl
from helpers import HEADS_PATHS, shuffle_interpreted_programs, use_heads_path, watch_interpreted_races

from fasthydra import GaussianHydraHead, HydraHead, gaussian_kl_loss, hinton_kl_loss, hydra_kl_loss, uncertainty
from fasthydra.reference import TopKTeacher

TARGETS = [pytest.param("torch", "cpu", "cublas", marks=pytest.mark.cpu, id="torch-cpu"),
           *[pytest.param("triton", "cpu", p, marks=pytest.mark.interpret, id=f"triton-interpret-{p}")
             for p in HEADS_PATHS],
           pytest.param("torch", "cuda", "cublas", marks=pytest.mark.gpu, id="torch-gpu"),
           *[pytest.param("triton", "cuda", p, marks=pytest.mark.gpu, id=f"triton-gpu-{p}") for p in HEADS_PATHS]]
LONG_C = 9000  # past the 8192 classes a row the loss and uncertainty kernels hold in registers: rows in tiles


def _every_op_step(impl: str, device: str, hidden, view=None) -> dict:
    """One forward + backward through every op, from seed 0: name -> a copy of each loss, output and gradient.
    view: None, or a function that every floating input tensor passes through on its way into the ops (the
    gradients are still read on the tensors before it)."""
    if view is None:
        def view(t):
            return t
    torch.manual_seed(0)
    b, d, m, c = 24, 16, 3, 10

    def leaf(t):
        return t.to(device).requires_grad_()

    head = HydraHead(d, c, m, hidden_features=hidden, impl=impl).to(device)
    wide = HydraHead(d, 300, 2, impl=impl).to(device)  # past the small step's classes: the cuBLAS path always
    ghead = GaussianHydraHead(d, 2, m, impl=impl).to(device)
    x, x_wide = leaf(torch.randn(b, d)), leaf(torch.randn(8, d))
    t = (torch.randn(b, m, c) * 2).to(device)
    t_wide = (torch.randn(8, 2, 300) * 2).to(device)
    t_grad = leaf(torch.randn(b, m, c) * 2)  # a teacher trained with the student (online distillation)
    z = leaf(torch.randn(b, m, c) * 2)
    z_long = leaf(torch.randn(2, 2, LONG_C) * 2)  # (two rows: the interpreter walks each row's tiles in Python)
    t_long = (torch.randn(2, 2, LONG_C) * 2).to(device)
    tm, tv = torch.randn(b, m, 2).to(device), (torch.rand(b, m, 2) + 0.1).to(device)
    learned_t = leaf(torch.tensor(1.7))
    keep = torch.arange(b, device=device) % 3 != 0
    topk = TopKTeacher(*t.topk(4, dim=-1))
    leaves = {"x": x, "x_wide": x_wide, "z": z, "z_long": z_long, "teacher": t_grad, "learned T": learned_t}
    x, x_wide, t, t_wide, t_grad, z, z_long, t_long, tm, tv, learned_t = map(
        view, (x, x_wide, t, t_wide, t_grad, z, z_long, t_long, tm, tv, learned_t))
    topk = TopKTeacher(view(topk.values), topk.indices)

    losses = {
        "heads": head.distill_loss(x, t, 2.0),
        "heads, row mask": head.distill_loss(x, t, 2.0, row_mask=keep),
        "heads, learned T": head.distill_loss(x, t, learned_t),
        "heads, cuBLAS path": wide.distill_loss(x_wide, t_wide, 2.0),
        "logits": hydra_kl_loss(z, t, 2.0, impl=impl),
        "logits, row mask": hydra_kl_loss(z, t, 2.0, row_mask=keep, impl=impl),
        "logits, teacher grad": hydra_kl_loss(z, t_grad, 2.0, impl=impl),
        "logits, long rows": hydra_kl_loss(z_long, t_long, 2.0, impl=impl),
        "logits, top-k": hydra_kl_loss(z, topk, 2.0, impl=impl),
        "Hinton": hinton_kl_loss(z[:, 0], t, 2.0, impl=impl),
        "Hinton, top-k": hinton_kl_loss(z[:, 1], topk, 2.0, impl=impl),
        "Hinton, long rows": hinton_kl_loss(z_long[:, 0], t_long, 2.0, impl=impl),
        "Gaussian heads": ghead.distill_loss(x, tm, tv),
        "Gaussian": gaussian_kl_loss(*ghead(x), tm, tv),
    }
    unc = uncertainty(z_long, impl=impl)
    unc_small = uncertainty(head(x), impl=impl)
    total = sum(losses.values()) + sum((f.sum() for f in (*unc, *unc_small)), torch.zeros((), device=device))
    total.backward()
    out = {name: v.detach().clone() for name, v in losses.items()}
    out.update({f"uncertainty {name}": v.detach().clone() for name, v in zip(unc._fields, unc)})
    out.update({f"uncertainty (heads) {name}": v.detach().clone() for name, v in zip(unc_small._fields, unc_small)})
    for owner, module in (("heads", head), ("cuBLAS heads", wide), ("Gaussian heads", ghead)):
        out.update({f"{owner}.{name}.grad": p.grad.clone() for name, p in module.named_parameters()})
    out.update({f"{name}.grad": v.grad.clone() for name, v in leaves.items()})
    return out


def _assert_same_bits(got: dict, first: dict, what: str) -> None:
    assert got.keys() == first.keys()
    differ = [name for name in first if not torch.equal(got[name], first[name])]
    assert not differ, f"{what}: not the same bits as the first step: {differ}"


@pytest.mark.parametrize("impl,device,path", TARGETS)
@pytest.mark.parametrize("hidden", [None, 8], ids=["linear", "mlp"])
def test_every_op_gives_the_same_bits_again_and_with_poisoned_allocations(monkeypatch, impl, device, path, hidden):
    use_heads_path(monkeypatch, path)
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # (torch raises for cuBLAS without it, below)
    first = _every_op_step(impl, device, hidden)
    bad = [name for name, v in first.items() if not torch.isfinite(v).all()]
    assert not bad, f"not finite: {bad}"
    assert all(v.abs().sum() > 0 for name, v in first.items() if name.endswith(".grad")), "a gradient of zeros"
    if impl == "torch" or device == "cuda":  # (interpreted, the shuffled test's second step is the stricter again)
        _assert_same_bits(_every_op_step(impl, device, hidden), first, "again")
    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(3, device=device)).all()  # (the poison this test relies on)
        poisoned = _every_op_step(impl, device, hidden)
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        torch.utils.deterministic.fill_uninitialized_memory = was[2]
    _assert_same_bits(poisoned, first, "poisoned allocations")


def _negated_view(t: torch.Tensor) -> torch.Tensor:
    """t's values as a tensor with its negative bit set: a lazily negated view of -t, whose storage holds -t (what
    ``z.conj().imag`` of a complex z gives), differentiable back to t."""
    out = torch._neg_view(t.neg())
    assert out.is_neg() and torch.equal(out.resolve_neg(), t)
    return out


@pytest.mark.parametrize("impl,device,path", TARGETS)
def test_every_op_reads_negated_views_by_their_values(monkeypatch, impl, device, path):
    """Inputs with the negative bit set give the same bits, values and gradients, as the same inputs stored plainly.
    The kernels and the C row kernels read storage: before the public functions resolved such views, every loss,
    uncertainty and gradient came back as that of the un-negated values, on every path."""
    use_heads_path(monkeypatch, path)
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    plain = _every_op_step(impl, device, 8)
    _assert_same_bits(_every_op_step(impl, device, 8, view=_negated_view), plain, "inputs as negated views")


@pytest.mark.interpret
@pytest.mark.parametrize("path", HEADS_PATHS)
@pytest.mark.parametrize("hidden", [None, 8], ids=["linear", "mlp"])
def test_every_kernel_gives_the_same_bits_with_its_programs_in_another_order(monkeypatch, path, hidden):
    """Each launch's programs in an order drawn from the test's seed (FASTHYDRA_TEST_SEED draws others)."""
    seed = torch.initial_seed()  # (conftest's, before the step seeds its data)
    use_heads_path(monkeypatch, path)
    first = _every_op_step("triton", "cpu", hidden)
    with monkeypatch.context() as patch:
        shuffle_interpreted_programs(patch, seed)
        shuffled = _every_op_step("triton", "cpu", hidden)
    _assert_same_bits(shuffled, first, f"programs in a shuffled order (seed {seed})")


@pytest.mark.interpret
@pytest.mark.parametrize("path", HEADS_PATHS)
@pytest.mark.parametrize("hidden", [None, 8], ids=["linear", "mlp"])
def test_no_program_races_another_in_any_kernel(monkeypatch, path, hidden):
    use_heads_path(monkeypatch, path)
    with monkeypatch.context() as patch:
        found = watch_interpreted_races(patch)
        _every_op_step("triton", "cpu", hidden)
    assert not found


@triton.jit
def _racy_store_kernel(out_ptr):
    tl.store(out_ptr, tl.program_id(0).to(tl.float32))  # every program, one address


@triton.jit
def _racy_load_kernel(buf_ptr, out_ptr, count_ptr, SYNC: tl.constexpr):
    pid = tl.program_id(0)
    tl.store(buf_ptr + pid, pid.to(tl.float32))
    if SYNC:  # (the count read as the last-program sums read theirs; the load after it is ordered)
        tl.atomic_add(count_ptr, 1, sem="acq_rel")
    tl.store(out_ptr + pid, tl.load(buf_ptr + (pid + 1) % tl.num_programs(0)))  # the next program's store


@pytest.mark.interpret
def test_the_race_watcher_sees_races(monkeypatch):
    """The watcher's own check: two kernels with a race of each kind are reported, by name; the same load after an
    atomic is not (a watcher that stopped seeing loads or stores under another Triton would pass every kernel)."""
    out, buf, count = torch.zeros(4), torch.zeros(4), torch.zeros(1, dtype=torch.int32)
    with monkeypatch.context() as patch:
        found = watch_interpreted_races(patch)
        _racy_store_kernel[(4,)](out)
        _racy_load_kernel[(4,)](buf, out, count, SYNC=False)
        _racy_load_kernel[(4,)](buf, out, count, SYNC=True)
    assert len(found) == 2, found
    assert found[0].startswith("_racy_store_kernel: 3 stores to an address another program stores to"), found
    assert found[1].startswith("_racy_load_kernel: 4 loads of an address another program stores to"), found
    assert torch.equal(out, torch.tensor([1.0, 2.0, 3.0, 0.0])) and int(count) == 4  # (the kernels did run)
