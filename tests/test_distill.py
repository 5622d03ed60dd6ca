"""cpu tier: the distillation recipe's pieces (ensemble, cached or on-the-fly teachers, both stages)."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fasthydra import HydraHead
from fasthydra.distill import (
    DistillConfig,
    distill,
    members_output,
    mlp_body,
    teacher_loader,
    teacher_outputs,
    train_ensemble,
)

pytestmark = pytest.mark.cpu


def _toy_classification(n=96, d=6, c=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y, d, c


def _members(x, y, d, c, m=3):
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    return train_ensemble(lambda: nn.Sequential(mlp_body(d, 16), nn.Linear(16, c)), loader, m, "classification",
                          epochs=5, progress=False)


def test_members_differ_and_cached_outputs_match_memmap(tmp_path):
    x, y, d, c = _toy_classification()
    members = _members(x, y, d, c)
    out = members_output(members, x, "classification")
    assert out.shape == (96, 3, 3)
    assert not torch.allclose(out[:, 0], out[:, 1])  # different seeds, different members
    ordered = DataLoader(TensorDataset(x), batch_size=40, shuffle=False)
    in_memory = teacher_outputs(members, ordered, "classification")
    path = tmp_path / "teacher.npy"
    mapped = teacher_outputs(members, ordered, "classification", cache_path=str(path))
    assert path.exists() and path.stat().st_size >= 96 * 3 * 3 * 4
    assert torch.allclose(in_memory, mapped) and torch.allclose(in_memory, out, atol=1e-6)


def test_two_stages_cached_and_on_the_fly_with_a_frozen_body():
    x, y, d, c = _toy_classification()
    members = _members(x, y, d, c)
    teacher = members_output(members, x, "classification")
    cfg = DistillConfig(temperature=2.0, epochs_stage1=3, epochs_stage2=3, progress=False, freeze_body=True)
    kd, hydra = distill(mlp_body(d, 16), 16, c, 3, teacher_loader(x, teacher, 32, 0), "classification", cfg)
    assert isinstance(kd.head, HydraHead) and kd.head.num_heads == 1 and hydra.head.num_heads == 3
    assert kd(x).shape == (96, 1, c) and hydra(x).shape == (96, 3, c)
    for a, b in zip(kd.body.parameters(), hydra.body.parameters()):  # frozen in stage 2
        assert torch.equal(a, b)
    assert not torch.equal(kd.head.weight.expand(3, -1, -1), hydra.head.weight)  # heads moved apart

    def teacher_fn(batch_x):
        return members_output(members, batch_x, "classification")

    plain = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    cfg2 = DistillConfig(temperature=2.0, epochs_stage1=2, epochs_stage2=2, progress=False)
    kd2, hydra2 = distill(mlp_body(d, 16), 16, c, 3, plain, "classification", cfg2, teacher_fn=teacher_fn,
                          hidden_features=8)
    assert hydra2.head.is_mlp and hydra2(x).shape == (96, 3, c)


def test_stage_two_moves_each_head_towards_its_member():
    x, y, d, c = _toy_classification(n=256)
    members = _members(x, y, d, c, m=2)
    teacher = members_output(members, x, "classification")
    cfg = DistillConfig(temperature=1.0, epochs_stage1=20, epochs_stage2=60, progress=False)
    _, hydra = distill(mlp_body(d, 32), 32, c, 2, teacher_loader(x, teacher, 32, 0), "classification", cfg)
    with torch.no_grad():
        z = hydra(x)
    q = torch.log_softmax(z, -1)
    p = torch.softmax(teacher, -1)
    own = (p * (torch.log(p) - q)).sum(-1).mean(0)  # KL of head m to member m
    swapped = (p.flip(1) * (torch.log(p.flip(1)) - q)).sum(-1).mean(0)  # head m against the other member
    assert (own < swapped).all()


def test_recipe_leaves_the_global_rng_alone():
    x, y, d, c = _toy_classification(n=32)
    body = mlp_body(d, 8)  # built by the test itself, before the check starts
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    members = _members(x, y, d, c, m=2)
    teacher = members_output(members, x, "classification")
    cfg = DistillConfig(epochs_stage1=1, epochs_stage2=1, progress=False, seed=5)
    distill(body, 8, c, 2, teacher_loader(x, teacher, 16, 0), "classification", cfg)
    assert torch.equal(torch.rand(3), expected)


class _Counting(nn.Module):
    """A member that counts the rows it has seen (to tell a reused cache from a recomputed one)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x):
        self.rows += len(x)
        return self.inner(x)


class _Interrupted(Exception):
    pass


def _loader_that_fails_after(x, batches):
    class Failing:
        dataset = TensorDataset(x)

        def __len__(self):
            return (len(x) + 15) // 16

        def __iter__(self):
            for i, batch in enumerate(DataLoader(TensorDataset(x), batch_size=16, shuffle=False)):
                if i == batches:
                    raise _Interrupted
                yield batch

    return Failing()


def test_top_k_teacher_outputs_in_memory_and_cached(tmp_path):
    from fasthydra import TopKTeacher

    x, y, d, c = _toy_classification(n=80, c=3)
    members = [_Counting(m) for m in _members(x, y, d, c)]
    ordered = DataLoader(TensorDataset(x), batch_size=16, shuffle=False)
    dense = teacher_outputs(members, ordered, "classification", progress=False)
    sparse = teacher_outputs(members, ordered, "classification", top_k=2, progress=False)
    assert isinstance(sparse, TopKTeacher)
    assert sparse.values.dtype == torch.float16 and sparse.indices.dtype == torch.int32
    values, indices = dense.topk(2, dim=-1)
    assert torch.equal(sparse.indices, indices.int())
    assert torch.allclose(sparse.values.float(), values, rtol=1e-3, atol=1e-3)  # fp16 storage
    path = str(tmp_path / "t")
    cached = teacher_outputs(members, ordered, "classification", top_k=2, cache_path=path, progress=False)
    assert torch.equal(cached.indices, sparse.indices) and torch.equal(cached.values, sparse.values)
    size = (tmp_path / "t.values.npy").stat().st_size + (tmp_path / "t.indices.npy").stat().st_size
    assert size < 80 * 3 * 2 * 6 + 2 * 256  # 6 bytes per kept entry, plus the .npy headers
    seen = members[0].rows
    again = teacher_outputs(members, ordered, "classification", top_k=2, cache_path=path, progress=False)
    assert members[0].rows == seen + 16  # a complete cache is reused: the members ran on the first batch alone
    assert torch.equal(again.values, cached.values)
    with pytest.raises(ValueError, match="top_k"):
        teacher_outputs(members, ordered, "classification", top_k=4, progress=False)  # more than C = 3
    with pytest.raises(ValueError, match="top_k"):
        teacher_outputs(members, ordered, "regression", top_k=2, progress=False)


@pytest.mark.parametrize("top_k", [None, 2])
def test_an_interrupted_cache_is_completed_never_used_half_written(tmp_path, top_k):
    x, y, d, c = _toy_classification(n=80, c=3)
    members = [_Counting(m) for m in _members(x, y, d, c)]
    path = str(tmp_path / "cache")
    with pytest.raises(_Interrupted):
        teacher_outputs(members, _loader_that_fails_after(x, 3), "classification", top_k=top_k, cache_path=path,
                        progress=False)
    marker = json.loads((tmp_path / "cache.json").read_text())
    assert marker["rows"] == 48 and not marker["complete"]
    before = members[0].rows
    ordered = DataLoader(TensorDataset(x), batch_size=16, shuffle=False)
    done = teacher_outputs(members, ordered, "classification", top_k=top_k, cache_path=path, progress=False)
    # resumed: the first batch (for the shapes) and the two batches not yet written ran, not all five
    assert members[0].rows - before == 16 + 32
    fresh = teacher_outputs(members, ordered, "classification", top_k=top_k, progress=False)
    for a, b in zip(done if top_k else (done,), fresh if top_k else (fresh,)):
        assert torch.equal(a, b)
    assert json.loads((tmp_path / "cache.json").read_text())["complete"]


@pytest.mark.parametrize("top_k", [None, 2])
def test_a_cache_of_another_teacher_is_refused_never_used(tmp_path, top_k):
    """A cache (complete, or interrupted) written by other members, or for the rows in another order, raises a
    ValueError naming it rather than stand in for these members; the same members' cache is reused under another
    batch size and under bf16 autocast; remove_teacher_cache clears it for a fresh one."""
    from fasthydra.distill import remove_teacher_cache

    x, y, d, c = _toy_classification(n=80, c=3)
    members = _members(x, y, d, c)
    others = train_ensemble(lambda: nn.Sequential(mlp_body(d, 16), nn.Linear(16, c)),
                            DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                                       generator=torch.Generator().manual_seed(1)), 3, "classification", epochs=5,
                            progress=False, seed=1)
    ordered = DataLoader(TensorDataset(x), batch_size=16, shuffle=False)
    path = str(tmp_path / "cache")
    mine = teacher_outputs(members, ordered, "classification", top_k=top_k, cache_path=path, progress=False)
    rebatched = DataLoader(TensorDataset(x), batch_size=24, shuffle=False)
    again = teacher_outputs(members, rebatched, "classification", top_k=top_k, cache_path=path, progress=False)
    for a, b in zip(mine if top_k else (mine,), again if top_k else (again,)):
        assert torch.equal(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same members in bf16: their own cache still
        teacher_outputs(members, ordered, "classification", top_k=top_k, cache_path=path, progress=False)
    with pytest.raises(ValueError, match="cache_path .*cache.* another teacher"):
        teacher_outputs(others, ordered, "classification", top_k=top_k, cache_path=path, progress=False)
    reversed_rows = DataLoader(TensorDataset(x.flip(0)), batch_size=16, shuffle=False)
    with pytest.raises(ValueError, match="another teacher"):
        teacher_outputs(members, reversed_rows, "classification", top_k=top_k, cache_path=path, progress=False)
    remove_teacher_cache(path)
    assert not list(tmp_path.iterdir())
    with pytest.raises(_Interrupted):  # an interrupted cache of other members is not continued either
        teacher_outputs(others, _loader_that_fails_after(x, 3), "classification", top_k=top_k, cache_path=path,
                        progress=False)
    with pytest.raises(ValueError, match="another teacher"):
        teacher_outputs(members, ordered, "classification", top_k=top_k, cache_path=path, progress=False)
    remove_teacher_cache(path)
    fresh = teacher_outputs(members, ordered, "classification", top_k=top_k, cache_path=path, progress=False)
    for a, b in zip(mine if top_k else (mine,), fresh if top_k else (fresh,)):
        assert torch.equal(a, b)


def test_a_loader_that_draws_rows_at_random_is_refused():
    """teacher_outputs' i-th row is row i's teacher: a shuffling loader (the training loader, passed by mistake)
    would pair every input with another's teacher, so it is refused, naming its sampler, before any member runs."""
    from torch.utils.data import BatchSampler, DistributedSampler, SequentialSampler, WeightedRandomSampler

    x, y, d, c = _toy_classification(n=32, c=3)
    members = [_Counting(m) for m in _members(x, y, d, c)]
    data = TensorDataset(x)
    loaders = {"RandomSampler": DataLoader(data, batch_size=8, shuffle=True),
               "WeightedRandomSampler": DataLoader(data, batch_size=8, sampler=WeightedRandomSampler([1.0] * 32, 32)),
               "DistributedSampler": DataLoader(data, batch_size=8, sampler=DistributedSampler(data, 1, 0)),
               "RandomSampler ": DataLoader(data, batch_sampler=BatchSampler(torch.utils.data.RandomSampler(data), 8,
                                                                             False))}
    for name, loader in loaders.items():
        with pytest.raises(ValueError, match=f"loader draws its rows with {name.strip()}.*shuffle=False"):
            teacher_outputs(members, loader, "classification", progress=False)
    assert members[0].rows == 0
    ordered = DataLoader(data, batch_size=8, sampler=SequentialSampler(data))
    assert torch.allclose(teacher_outputs(members, ordered, "classification", progress=False),
                          members_output(members, x, "classification"), atol=1e-6)  # batches of 8 against all 32


def test_teacher_loader_refuses_rows_that_do_not_pair():
    """x's row i goes with the teacher's row i: another row count (dense or top-k), a wrong type or a bad batch size
    or seed is refused naming it (TensorDataset's bare AssertionError before)."""
    from fasthydra import TopKTeacher

    x = torch.randn(10, 4)
    short = TopKTeacher(torch.randn(9, 3, 2), torch.zeros(9, 3, 2, dtype=torch.int32))
    for teacher, shapes in [(torch.randn(9, 3, 5), r"\(9, 3, 5\)"), (short, r"\(9, 3, 2\) and \(9, 3, 2\)")]:
        with pytest.raises(ValueError, match=r"x has shape \(10, 4\), teacher " + shapes):
            teacher_loader(x, teacher, 4, 0)
    with pytest.raises(TypeError, match="teacher must be"):
        teacher_loader(x, (torch.randn(10, 3, 2), torch.zeros(10, 3, 2)), 4, 0)
    with pytest.raises(TypeError, match="x must be a tensor"):
        teacher_loader(x.numpy(), torch.randn(10, 3, 5), 4, 0)
    with pytest.raises(ValueError, match="batch_size"):
        teacher_loader(x, torch.randn(10, 3, 5), 0, 0)
    with pytest.raises(TypeError, match="seed"):
        teacher_loader(x, torch.randn(10, 3, 5), 4, 0.5)
    xs, ts = zip(*teacher_loader(x, x[:, None, :] * 2, 4, 0))  # the pairs survive the shuffle
    assert torch.equal(torch.cat(ts), torch.cat(xs)[:, None, :] * 2) and len(torch.cat(xs)) == 10


def test_members_give_their_outputs_in_eval_mode_and_keep_their_own(tmp_path):
    """A member handed over in training mode (dropout on) gives the teacher's outputs in eval mode: the same on every
    pass (so its cache is reused, not refused as another teacher's), equal to its eval-mode outputs; each module's
    own mode is back afterwards."""
    x, y, d, c = _toy_classification(n=48, c=3)
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, c)) for _ in range(2)]
    members[1][2].eval()  # one module already in eval mode: it stays so
    ordered = DataLoader(TensorDataset(x), batch_size=16, shuffle=False)
    path = str(tmp_path / "cache")
    first = teacher_outputs(members, ordered, "classification", cache_path=path, progress=False)
    again = teacher_outputs(members, ordered, "classification", cache_path=path, progress=False)
    assert torch.equal(first, again)
    assert [m.training for m in members[0].modules()] == [True] * 5
    assert [m.training for m in members[1].modules()] == [True, True, True, False, True]
    for m in members:
        m.eval()
    with torch.no_grad():
        want = torch.stack([m(x) for m in members], dim=1)
    assert torch.allclose(first, want, atol=1e-6)  # batches of 16 against all 48


def test_arrays_without_a_marker_are_rewritten(tmp_path):
    import numpy as np

    x, y, d, c = _toy_classification(n=32, c=3)
    members = _members(x, y, d, c)
    path = tmp_path / "stale.npy"
    np.save(path, np.full((32, 3, 3), 7.0, dtype=np.float32))  # same shape, no marker: not trusted
    ordered = DataLoader(TensorDataset(x), batch_size=16, shuffle=False)
    got = teacher_outputs(members, ordered, "classification", cache_path=str(path), progress=False)
    assert torch.allclose(got, members_output(members, x, "classification"), atol=1e-6)


def test_distill_from_a_top_k_cache(tmp_path):
    x, y, d, c = _toy_classification(n=96, c=3)
    members = _members(x, y, d, c)
    ordered = DataLoader(TensorDataset(x), batch_size=32, shuffle=False)
    cache = teacher_outputs(members, ordered, "classification", top_k=2, cache_path=str(tmp_path / "k2"),
                            progress=False)
    cfg = DistillConfig(temperature=2.0, epochs_stage1=2, epochs_stage2=2, progress=False)
    kd, hydra = distill(mlp_body(d, 16), 16, c, 3, teacher_loader(x, cache, 32, 0), "classification", cfg)
    assert hydra(x).shape == (96, 3, c) and kd(x).shape == (96, 1, c)
    assert not torch.equal(hydra.head.weight[0], hydra.head.weight[1])  # each head followed its member


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(epochs_stage1=-1), ValueError, "epochs_stage1"),  # was accepted: range(-1) trained nothing
    (dict(epochs_stage2=2.5), TypeError, "epochs_stage2"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(weight_decay=-1e-4), ValueError, "weight_decay"),
    (dict(noise_std=float("inf")), ValueError, "noise_std"),
    (dict(seed=1.5), TypeError, "seed"),
])
def test_distill_config_refuses_bad_values(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DistillConfig(**kwargs)


def test_the_recipe_checks_its_arguments_before_anything_trains(monkeypatch):
    """A typo in task, a head count of 0 or an absent device used to surface after stage 1 (or silently: a
    misspelt task took the regression branch); now each is a ValueError / TypeError naming it, raised before
    any member or stage trains."""
    import fasthydra.distill as D

    def trained(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(D, "_train_member", trained)
    monkeypatch.setattr(D, "_stage", trained)
    x, y, d, c = _toy_classification(n=8)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    member = lambda: nn.Linear(d, c)  # noqa: E731
    absent = f"cuda:{torch.cuda.device_count()}"  # one index past the devices there are: absent on any machine
    bad_calls = {
        "task": lambda: train_ensemble(member, loader, 2, "clasification"),
        "num_members": lambda: train_ensemble(member, loader, 0, "classification"),
        "epochs": lambda: train_ensemble(member, loader, 2, "classification", epochs=-1),
        "lr": lambda: train_ensemble(member, loader, 2, "classification", lr=-1.0),
        "device": lambda: train_ensemble(member, loader, 2, "classification", device=absent),
        "device ": lambda: train_ensemble(member, loader, 2, "classification", device="gpu0"),
        "top_k": lambda: teacher_outputs([member()], loader, "regression", top_k=2),
        "top_k ": lambda: teacher_outputs([member()], loader, "classification", top_k=True),
        "task ": lambda: teacher_outputs([member()], loader, "regresion"),
        "num_heads": lambda: distill(mlp_body(d, 8), 8, c, 0, loader, "classification", DistillConfig()),
        "task  ": lambda: distill(mlp_body(d, 8), 8, c, 2, loader, "Classification", DistillConfig()),
        "cfg": lambda: distill(mlp_body(d, 8), 8, c, 2, loader, "classification", {"epochs_stage1": 1}),
        "device  ": lambda: distill(mlp_body(d, 8), 8, c, 2, loader, "classification", DistillConfig(device=absent)),
        "body": lambda: distill(lambda v: v, 8, c, 2, loader, "classification", DistillConfig()),
        "loader": lambda: distill(mlp_body(d, 8), 8, c, 2, None, "classification", DistillConfig()),
        "teacher_fn": lambda: distill(mlp_body(d, 8), 8, c, 2, loader, "classification", DistillConfig(),
                                      teacher_fn="members"),
    }
    monkeypatch.undo()  # an odd output width for regression: means and variances cannot be told apart
    with pytest.raises(ValueError, match=r"\(B, 2K\)"):
        train_ensemble(lambda: nn.Linear(d, 3), DataLoader(TensorDataset(x, x[:, :1]), batch_size=4), 1, "regression",
                       epochs=1, progress=False)
    for name, call in bad_calls.items():
        with pytest.raises((ValueError, TypeError), match=name.strip()):
            call()
    # a feature_dim other than the body's width: named at stage 1's first batch (the head's own message spoke of
    # an "x" of the body's output shape, which the caller never passed)
    teachers = DataLoader(TensorDataset(x, torch.randn(len(x), 2, c)), batch_size=4)
    with pytest.raises(ValueError, match=r"body gives features of shape \(4, 8\), the head takes 6 .*feature_dim"):
        distill(mlp_body(d, 8), 6, c, 2, teachers, "classification", DistillConfig(progress=False))


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_a_member_count_other_than_num_heads_fails_at_the_first_batch(task):
    """Stage 2 pairs head m with member m; teachers with 3 members for 4 heads failed only when stage 2
    began, after all of stage 1."""
    x, _, d, c = _toy_classification(n=32)
    calls = []

    def teacher_fn(xb):
        calls.append(len(xb))
        return torch.randn(len(xb), 3, c if task == "classification" else 2 * c).abs() + 0.1

    loader = DataLoader(TensorDataset(x), batch_size=8)
    cfg = DistillConfig(epochs_stage1=5, epochs_stage2=1, progress=False)
    with pytest.raises(ValueError, match=r"num_heads = 4.*gave \(8, 3, "):
        distill(mlp_body(d, 8), 8, c, 4, loader, task, cfg, teacher_fn=teacher_fn)
    assert calls == [8]
