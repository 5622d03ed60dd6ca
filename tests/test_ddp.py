"""cpu tier: DistributedDataParallel and FSDP2 (fully_shard) with gloo, two processes on this machine. One
training step of body + HydraHead gives the same parameters as one process on the concatenated batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fasthydra import HydraHead

pytestmark = pytest.mark.cpu


class Student(nn.Module):
    def __init__(self, hidden=None):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 24), nn.ReLU())
        self.head = HydraHead(24, 9, 3, hidden_features=hidden, impl="torch")

    def forward(self, x, t, keep=None, divisor=None):
        if divisor is None:
            return self.head.distill_loss(self.body(x), t, temperature=2.0, row_mask=keep)
        return self.head.distill_loss(self.body(x), t, 2.0, "sum", row_mask=keep) / divisor


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(32, 12, generator=g), torch.randn(32, 3, 9, generator=g) * 2


# A padding mask kept unevenly across the two processes' shards (14 of 16 rows, then 5 of 16): the mean of the
# processes' own means weighs the second shard's rows almost three times as much as the first's.
KEEP = torch.cat([torch.arange(16) < 14, torch.arange(16) % 3 == 0])


def _one_step(model, x, t, *masking):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(x, t, *masking)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _worker(rank, world, init_file, out_file, masked=False):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DDP(Student())
    x, t = _data()
    shard = slice(rank * 16, (rank + 1) * 16)
    masking = ()
    if masked:  # the README's recipe: a sum over the kept rows divided by N * M / W, N counted over processes
        kept = KEEP[shard].sum()
        dist.all_reduce(kept)
        masking = (KEEP[shard], kept * 3 / world)
    _one_step(model, x[shard], t[shard], *masking)
    if rank == 0:
        torch.save(model.module.state_dict(), out_file)
    dist.barrier()
    dist.destroy_process_group()
    # The work is done and saved. Leave without the interpreter's teardown: with gloo, a C++ thread of
    # torch.distributed can still be joinable when static destructors run, and the process then dies of
    # SIGABRT ("terminate called without an active exception") after finishing. A worker with a plain
    # nn.Linear model and no fasthydra at all does the same (1 run in 15 here, torch 2.14.1).
    os._exit(0)


@pytest.mark.parametrize("masked", [False, True])
def test_ddp_step_equals_single_process_step(tmp_path, masked):
    """With a row mask: the processes' sums over their kept rows, each divided by N * M / W, give the single
    process's mean over all kept rows (and the plain per-process means would not)."""
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), masked), nprocs=2, join=True)
    torch.manual_seed(0)
    single = Student()
    x, t = _data()
    _one_step(single, x, t, *((KEEP,) if masked else ()))
    ddp_state = torch.load(out, weights_only=True)
    worst = max((ddp_state[k] - v).abs().max().item() for k, v in single.state_dict().items())
    assert worst < 1e-6, worst
    if masked:  # the mean of the two processes' own masked means: another step
        torch.manual_seed(0)
        naive = Student()
        opt = torch.optim.SGD(naive.parameters(), lr=0.5)
        ((naive(x[:16], t[:16], KEEP[:16]) + naive(x[16:], t[16:], KEEP[16:])) / 2).backward()
        opt.step()
        assert max((naive.state_dict()[k] - v).abs().max().item() for k, v in single.state_dict().items()) > 1e-4
    # the step moved the parameters (a vacuous comparison would pass too)
    torch.manual_seed(0)
    untouched = Student().state_dict()
    assert max((untouched[k] - v).abs().max().item() for k, v in single.state_dict().items()) > 1e-3
    print(f"DDP vs single-process max parameter difference: {worst:.3e}")


def _fsdp_worker(rank, world, init_file, out_file):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    x, t = _data()
    shard = slice(rank * 16, (rank + 1) * 16)
    result = {}
    for hidden in (None, 5):
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            models.append(Student(hidden))
            fully_shard(models[-1].head)  # the heads' stack sharded on its own (3 heads over 2 ranks: uneven)
            fully_shard(models[-1])
        try:  # distill_loss is not the head's forward: FSDP has not gathered the head's parameters
            models[0](x[shard], t[shard])
            result[f"error {hidden}"] = "none"
        except TypeError as e:
            result[f"error {hidden}"] = str(e)
        model = models[1]
        register_fsdp_forward_method(model.head, "distill_loss")
        _one_step(model, x[shard], t[shard])
        for k, v in model.state_dict().items():
            result[f"{hidden} {k}"] = v.full_tensor()
    if rank == 0:
        torch.save(result, out_file)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # (see _worker)


def test_fsdp2_step_with_the_heads_sharded_equals_single_process_step(tmp_path):
    """FSDP2 with the head stack sharded on its own module (the large part: (M, C, D) at LLM sizes). FSDP gathers
    a module's parameters around its forward only, and distill_loss is another method: the op received the
    shards (DTensors) and failed with a sharding error about a view; now a TypeError that names the remedy,
    register_fsdp_forward_method, after which one step equals the single-process step, linear and MLP heads."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard") or not hasattr(fsdp, "register_fsdp_forward_method"):
        pytest.skip(f"torch {torch.__version__} has no public FSDP2 (fully_shard: torch 2.6 and later)")
    out = tmp_path / "fsdp.pt"
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    x, t = _data()
    for hidden in (None, 5):
        assert "register_fsdp_forward_method(head, 'distill_loss')" in got[f"error {hidden}"]
        assert ("hidden_weight" if hidden else "weight") + " is a DTensor" in got[f"error {hidden}"]
        torch.manual_seed(0)
        single = Student(hidden)
        before = {k: v.clone() for k, v in single.state_dict().items()}
        _one_step(single, x, t)
        for k, v in single.state_dict().items():
            torch.testing.assert_close(got[f"{hidden} {k}"], v, rtol=0, atol=1e-6, msg=lambda m: f"{hidden} {k}: {m}")
            assert (v - before[k]).abs().max() > 1e-4, k  # the step moved it (no vacuous comparison)
