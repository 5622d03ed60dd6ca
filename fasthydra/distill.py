"""The Hydra recipe as library code: train (or take) an ensemble, cache its outputs, distil.

Works with any body ``nn.Module`` (whatever maps inputs to features) and plain DataLoaders:
- ``train_ensemble`` trains M members (each a body + a head) from different seeds, or take your own;
- ``teacher_outputs`` runs the members once over a loader in order and caches their outputs, as a
  tensor or a memory-mapped ``.npy`` file, ``(N, M, C)`` (classification) or ``(N, M, 2K)``
  (regression: means and variances); for data too big to cache pass ``teacher_fn`` instead and the
  members run on the fly;
- ``distill`` runs stage 1 (body + a one-head head against the ensemble mean: plain KD, Hinton's
  loss) and stage 2 (``expand`` to M heads, each against its member: the fused Hydra loss),
  optionally with the body frozen. It returns both the KD model and the Hydra model.
No global state: every function takes its seed and device; progress shows as tqdm bars.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SubsetRandomSampler, TensorDataset, WeightedRandomSampler

from fasthydra.functional import _check_int, _check_number, _check_temperature, gaussian_kl_loss, hinton_kl_loss
from fasthydra.modules import GaussianHydraHead, HydraHead
from fasthydra.reference import TopKTeacher


def mlp_body(in_features: int, width: int = 64, depth: int = 2) -> nn.Sequential:
    """A small MLP feature extractor (the demo's body): depth x (Linear, ReLU)."""
    layers, d = [], in_features
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers)


class HydraModel(nn.Module):
    """Body + heads: ``forward(x) = head(body(x))``; logits (B, M, C), or (mean, var) for Gaussian heads."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x):
        features = self.body(x)
        if isinstance(features, torch.Tensor) and features.shape[-1:] != (self.head.in_features,):
            raise ValueError(f"the body gives features of shape {tuple(features.shape)}, the head takes "
                             f"{self.head.in_features} (distill's feature_dim): they must agree")
        return self.head(features)


@dataclass
class DistillConfig:
    """Everything stage 1 and stage 2 need, as plain values."""

    temperature: float = 1.0
    epochs_stage1: int = 30
    epochs_stage2: int = 30
    lr: float = 3e-3
    weight_decay: float = 0.0
    noise_std: float = 0.0  # perturbation of the expanded heads
    freeze_body: bool = False  # stage 2 trains the heads only
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):  # bad values fail here, not after stage 1 (or silently: a negative epoch count)
        self.temperature = _check_temperature(self.temperature)
        self.epochs_stage1 = _check_int("epochs_stage1", self.epochs_stage1, 0)
        self.epochs_stage2 = _check_int("epochs_stage2", self.epochs_stage2, 0)
        self.lr = _check_number("lr", self.lr, positive=True)
        self.weight_decay = _check_number("weight_decay", self.weight_decay)
        self.noise_std = _check_number("noise_std", self.noise_std)
        self.seed = _check_int("seed", self.seed)


TASKS = ("classification", "regression")


def _check_task(task) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _check_device(device) -> torch.device:
    """device as a torch.device that this machine has: a ValueError naming it otherwise, before any work."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a device torch knows: {err}") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def _bar(iterable, desc: str, progress: bool, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not progress)


def _to(batch, device):
    return [b.to(device) for b in batch]


def member_forward(member: nn.Module, x: torch.Tensor, task: str):
    """Classification members return logits (B, C); regression members (B, 2K) -> (mean, var)."""
    _check_task(task)
    out = member(x)
    if task == "classification":
        return out
    if out.shape[-1] % 2:
        raise ValueError(f"a regression member must return (B, 2K): K means, then K raw variances; got "
                         f"{tuple(out.shape)}")
    k = out.shape[-1] // 2
    return out[..., :k], nn.functional.softplus(out[..., k:]) + 1e-6


def train_ensemble(make_member: Callable[[], nn.Module], loader: DataLoader, num_members: int, task: str,
                   epochs: int = 30, lr: float = 3e-3, weight_decay: float = 0.0, device: str = "cpu",
                   seed: int = 0, progress: bool = True) -> list[nn.Module]:
    """M members trained independently (member m from seed + m) with cross-entropy, or with the
    Gaussian NLL for regression (outputs (B, 2K): means, then raw variances)."""
    _check_task(task)
    num_members = _check_int("num_members", num_members, 1)
    epochs = _check_int("epochs", epochs, 0)
    lr, weight_decay = _check_number("lr", lr, positive=True), _check_number("weight_decay", weight_decay)
    _check_device(device)
    members = []
    for m in range(num_members):
        with torch.random.fork_rng(devices=[]):  # member m's seed, without touching the caller's RNG
            torch.manual_seed(seed + 1000 * m)
            members.append(_train_member(make_member, loader, task, epochs, lr, weight_decay, device, progress,
                                         f"member {m + 1}/{num_members}"))
    return members


def _train_member(make_member, loader, task, epochs, lr, weight_decay, device, progress, desc) -> nn.Module:
    model = make_member().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in _bar(range(epochs), desc, progress):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if task == "classification":
                loss = nn.functional.cross_entropy(model(x), y)
            else:
                mean, var = member_forward(model, x, task)
                loss = nn.functional.gaussian_nll_loss(mean, y, var, full=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@contextlib.contextmanager
def _eval_mode(members: list[nn.Module]):
    """The members in eval mode while they give the teacher's outputs (dropout off, batch norm on its running
    statistics: a member in training mode would hand the students noise, and a cache of it would differ on every
    pass), every module's own mode restored after."""
    modes = [(module, module.training) for member in members for module in member.modules()]
    try:
        for member in members:
            member.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def members_output(members: Iterable[nn.Module], x: torch.Tensor, task: str) -> torch.Tensor:
    """All members on one batch, each in eval mode (its mode restored after): (B, M, C) logits, or (B, M, 2K) means
    then variances."""
    members = list(members)
    outs = []
    with _eval_mode(members):
        for member in members:
            out = member_forward(member, x, task)
            outs.append(out if task == "classification" else torch.cat(out, dim=-1))
    return torch.stack(outs, dim=1)


class _Cache:
    """Memory-mapped ``.npy`` arrays written row block by row block, with a small JSON marker beside
    them that records what they hold and how many rows are done. A cache whose marker says it is
    complete is reused as it is; a partial one (an interrupted run) is completed from its last row;
    arrays without a marker, or with a marker for other shapes, are never used: they are rewritten."""

    # The arrays a cache holds: a dense one in the file named by its path, a top-k pair beside it
    LAYOUTS = (("logits",), ("values", "indices"))

    def __init__(self, path: str, arrays: dict):
        self.path, self.arrays = path, arrays
        self.marker = path + ".json"
        self.files = self.array_files(path, list(arrays))
        self.spec = {name: [list(shape), np.dtype(dtype).str] for name, (shape, dtype) in arrays.items()}

    def _read_marker(self):
        try:
            with open(self.marker) as f:
                state = json.load(f)
        except (OSError, ValueError):
            return None
        if state.get("spec") != self.spec or not all(os.path.exists(f) for f in self.files.values()):
            return None
        return state

    def open(self) -> int:
        """Opens (or creates) the arrays; returns the number of rows already written."""
        state = self._read_marker()
        mode = "r+" if state is not None else "w+"
        self.maps = {name: np.lib.format.open_memmap(self.files[name], mode=mode, dtype=dtype, shape=tuple(shape))
                     for name, (shape, dtype) in self.arrays.items()}
        self.rows = 0 if state is None else int(state["rows"])
        if state is None:
            self._write_marker(False)
        return self.rows

    def _write_marker(self, complete: bool) -> None:
        tmp = self.marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"spec": self.spec, "rows": self.rows, "complete": complete}, f)
        os.replace(tmp, self.marker)  # atomic: a crash leaves the old marker or the new one

    def write(self, parts: dict) -> None:
        n = len(next(iter(parts.values())))
        for name, value in parts.items():
            self.maps[name][self.rows:self.rows + n] = value
        for m in self.maps.values():
            m.flush()  # the data first, then the marker that counts it
        self.rows += n
        self._write_marker(False)

    def finish(self) -> dict:
        self._write_marker(True)
        return self.load()

    def load(self) -> dict:
        return {name: torch.from_numpy(np.load(self.files[name], mmap_mode="r+")) for name in self.arrays}

    @staticmethod
    def array_files(path: str, names: list) -> dict:
        """Each array's file: the path itself for one array, path.NAME.npy for several."""
        return {name: f"{path}.{name}.npy" if len(names) > 1 else path for name in names}

    @classmethod
    def files_of(cls, path: str) -> list[str]:
        """Every file a cache at path may have: the marker (and its temporary) and the arrays of either layout."""
        return [path + ".json", path + ".json.tmp",
                *[f for names in cls.LAYOUTS for f in cls.array_files(path, list(names)).values()]]

    def written_rows(self) -> dict:
        """The rows written so far, as tensors over the maps."""
        return {name: torch.from_numpy(np.asarray(m[:self.rows])) for name, m in self.maps.items()}

    @classmethod
    def reuse(cls, path: str, rows: int, top_k: int | None):
        """The arrays of a complete cache at path for `rows` rows (and k = top_k), else None; decided from
        the marker alone, before anything is computed."""
        try:
            with open(path + ".json") as f:
                state = json.load(f)
        except (OSError, ValueError):
            return None
        names = list(cls.LAYOUTS[top_k is not None])
        spec = state.get("spec", {})
        if sorted(spec) != sorted(names) or not state.get("complete") or state.get("rows") != rows:
            return None
        if any(spec[name][0][0] != rows for name in names) or (top_k is not None and spec["values"][0][-1] != top_k):
            return None
        cache = cls(path, {name: (tuple(spec[name][0]), np.dtype(spec[name][1])) for name in names})
        return cache.load() if all(os.path.exists(f) for f in cache.files.values()) else None


def remove_teacher_cache(cache_path: str) -> None:
    """Deletes the files of a ``teacher_outputs`` cache at cache_path (its marker and arrays), where they exist: for a
    run whose members are new (another seed or training run), whose outputs a cache of earlier members must not
    stand for. Nothing else is touched."""
    for f in _Cache.files_of(cache_path):
        if os.path.isfile(f):
            os.remove(f)


# How far a cached output may lie from the members' own, relative to its row's largest finite magnitude, and still be
# theirs. Measured on the demo's digits members (3 MLPs, 512 rows): bf16 autocast on one pass and not the other moves
# a logit by up to 7.3e-3 of that scale, fp16 autocast 9e-4, float16 storage 5e-4, another batch size or device less;
# other members (another seed) by 0.17 to 1.3 of it, every row by at least 0.17.
CACHE_MATCH_RTOL = 5e-2


def _check_cache_is_theirs(path: str, cached: dict, fresh: torch.Tensor, top_k: int | None) -> None:
    """ValueError unless the cache's first rows are the members' outputs on the loader's first batch (fresh): a cache
    written by other members, or for other data or another order, must never stand in for this teacher."""
    rows = min(len(fresh), len(next(iter(cached.values()))))
    fresh = fresh[:rows]
    if top_k is None:
        pairs = [("logits", cached["logits"][:rows].float(), fresh)]
    else:
        values, indices = cached["values"][:rows].float(), cached["indices"][:rows].long()
        if rows and (indices.min() < 0 or indices.max() >= fresh.shape[-1]):
            raise ValueError(f"cache_path {path!r} holds class indices outside these members' {fresh.shape[-1]} "
                             f"classes: it was written for another teacher; {_STALE_FIX}")
        rounded = fresh.half().float()  # as the cache stores values
        pairs = [("values at its indices", values, rounded.gather(-1, indices)),
                 ("top-k values", values, rounded.topk(top_k, dim=-1).values)]
    scale = fresh.masked_fill(~fresh.isfinite(), 0.0).abs().amax(-1, keepdim=True)
    for what, got, want in pairs:
        close = (got == want) | (got.isnan() & want.isnan()) | ((got - want).abs() <= CACHE_MATCH_RTOL * scale)
        if not bool(close.all()):
            row = int((~close).flatten(1).any(1).nonzero()[0])
            raise ValueError(f"cache_path {path!r} holds another teacher's outputs: its {what} on row {row} differ "
                             f"from these members' on the loader's first batch by more than {CACHE_MATCH_RTOL} of the "
                             f"row's scale (written by other members, or for other data or another order); "
                             f"{_STALE_FIX}")


_STALE_FIX = "remove its files (fasthydra.distill.remove_teacher_cache) or give another cache_path"


def _check_in_order(loader) -> None:
    """That a loader gives its dataset's rows in order: teacher_outputs' i-th row is row i's
    teacher (teacher_loader pairs it with x[i]), so a loader that draws rows at random would pair every input with
    another input's teacher, silently. ValueError naming the sampler (the usual slip: the training loader)."""
    samplers = (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    for sampler in samplers:
        if isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)) or \
                getattr(sampler, "shuffle", False) is True:  # DistributedSampler(shuffle=True)
            raise ValueError(f"loader draws its rows with {type(sampler).__name__}: teacher_outputs needs them in the "
                             f"dataset's order (a DataLoader with shuffle=False), since its i-th output is row i's "
                             f"teacher")


@torch.no_grad()
def teacher_outputs(members: list[nn.Module], loader: DataLoader, task: str, device: str = "cpu",
                    cache_path: str | None = None, top_k: int | None = None, progress: bool = True):
    """The members' outputs over a loader (in its order, so use shuffle=False), computed once.

    Returns a tensor (N, M, C) (classification logits) or (N, M, 2K) (regression), or, with top_k=k,
    a ``TopKTeacher`` of each member's k largest logits per example: values (N, M, k) in float16 and
    indices (N, M, k) in int32 (M*k*6 bytes per example instead of M*C*4). k = 32 to 128 keeps
    nearly all of the tempered mass at large C; the loss renormalises over the kept classes.
    With cache_path the result goes to memory-mapped ``.npy`` files (dense: cache_path itself; top-k:
    cache_path.values.npy and cache_path.indices.npy) with a marker cache_path.json, and is returned
    as tensors over those files: nothing (N, M, ...)-sized stays in memory. A complete cache is
    reused, the members run on the first batch only; an interrupted one is completed from where it stopped.
    Either must hold these members' outputs: its first rows are checked against the first batch's (within
    CACHE_MATCH_RTOL of each row's scale), and a cache written by other members, or for other data or another
    order, raises ValueError rather than stand in for this teacher (``remove_teacher_cache`` deletes one).
    """
    _check_task(task)
    _check_device(device)
    _check_in_order(loader)
    if top_k is not None:
        top_k = _check_int("top_k", top_k, 1)
        if task != "classification":
            raise ValueError(f"top_k needs a classification task, got task {task!r}")
    n = len(loader.dataset) if hasattr(loader, "dataset") else None
    batches = iter(loader)
    first = members_output(members, next(batches)[0].to(device), task).float().cpu() if n != 0 else None
    if top_k is not None and first is not None and top_k > first.shape[-1]:
        raise ValueError(f"top_k = {top_k} is more than the members' {first.shape[-1]} classes")
    if cache_path is not None and n is not None:
        done = _Cache.reuse(cache_path, n, top_k)
        if done is not None:  # complete, for this many rows and this k: the other batches need not run
            if first is not None:
                _check_cache_is_theirs(cache_path, done, first, top_k)
            return done["logits"] if top_k is None else TopKTeacher(done["values"], done["indices"])

    def convert(out):
        if top_k is None:
            return {"logits": out.numpy()}
        values, indices = out.topk(top_k, dim=-1)
        return {"values": values.half().numpy(), "indices": indices.int().numpy()}

    def result(parts):
        if top_k is None:
            return parts["logits"]
        return TopKTeacher(parts["values"], parts["indices"])

    def remaining(skip_rows: int = 0):
        """The members' outputs batch by batch; batches wholly inside the first skip_rows rows are
        passed over without running the members (they are in the cache already)."""
        row = len(first) if first is not None else 0
        if first is not None:
            yield first
        for batch in batches:
            if row + len(batch[0]) <= skip_rows:
                row += len(batch[0])
                yield len(batch[0])
                continue
            row += len(batch[0])
            yield members_output(members, batch[0].to(device), task).float().cpu()

    if cache_path is None:
        outs = [convert(o) for o in _bar(remaining(), "teacher outputs", progress, total=len(loader))]
        return result({k: torch.from_numpy(np.concatenate([o[k] for o in outs])) for k in outs[0]})
    if n is None:
        raise ValueError("cache_path needs a loader with a sized dataset")
    shape = (n, *first.shape[1:-1])
    arrays = ({"logits": ((*shape, first.shape[-1]), np.float32)} if top_k is None else
              {"values": ((*shape, top_k), np.float16), "indices": ((*shape, top_k), np.int32)})
    cache = _Cache(cache_path, arrays)
    done = cache.open()
    if done:  # an interrupted run's rows: continued only if they are these members' outputs
        _check_cache_is_theirs(cache_path, cache.written_rows(), first, top_k)
    row = 0
    for out in _bar(remaining(done), "teacher outputs", progress, total=len(loader)):
        size = out if isinstance(out, int) else len(out)
        if row + size <= done:  # written by an earlier, interrupted run
            row += size
            continue
        cache.write(convert(out[max(0, done - row):]))
        row += size
    if cache.rows != n:
        raise RuntimeError(f"the loader gave {cache.rows} rows for a dataset of {n}")
    return result(cache.finish())


def _batches(loader, teacher_fn, device):
    for batch in loader:
        if teacher_fn is None and len(batch) == 3:  # x, top-k values, top-k indices
            x, values, indices = _to(batch, device)
            yield x, TopKTeacher(values, indices)
            continue
        if teacher_fn is None:
            x, t = _to(batch[:2], device)
        else:
            x = batch[0].to(device)
            t = teacher_fn(x)
        yield x, t


def _check_members(teacher, num_heads: int) -> None:
    """Stage 2 pairs head m with member m: a loader whose teachers have another member count fails at stage
    1's first batch (a host-side shape check), not after the whole of stage 1."""
    t = teacher.values if isinstance(teacher, TopKTeacher) else teacher
    if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[1] != num_heads:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"the teachers must be (B, num_heads = {num_heads}, C) per batch (head m learns member "
                         f"m), the loader gave {shape}")


def _gaussian_split(t: torch.Tensor):
    k = t.shape[-1] // 2
    return t[..., :k], t[..., k:]


def _stage(model: HydraModel, loader, teacher_fn, epochs, cfg: DistillConfig, loss_fn, desc, params):
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in _bar(range(epochs), desc, cfg.progress):
        for x, t in _batches(loader, teacher_fn, cfg.device):
            loss = loss_fn(model, x, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


def distill(body: nn.Module, feature_dim: int, num_outputs: int, num_heads: int, loader: DataLoader, task: str,
            cfg: DistillConfig, teacher_fn: Callable | None = None, impl: str = "auto",
            hidden_features: int | None = None):
    """Stage 1 (KD: one head against the ensemble mean), then stage 2 (Hydra: M heads, one per member).

    loader yields (x, teacher) with teacher (B, M, C) cached logits (or (B, M, 2K) for regression),
    or (x, values, indices) from a top-k cache (``teacher_outputs(..., top_k=k)`` then
    ``teacher_loader``), or (x, ...) together with ``teacher_fn(x)`` computing them on the fly. hidden_features gives
    classification heads a hidden layer (MLP heads), which lets them hold more of the members' diversity.
    Returns (kd_model, hydra_model), both ``HydraModel`` (the KD model has one head). Seeded by
    cfg.seed; the caller's global RNG state is left as it was.
    """
    if not isinstance(cfg, DistillConfig):
        raise TypeError(f"cfg must be a DistillConfig, got {type(cfg).__name__}")
    _check_task(task)
    _check_int("num_heads", num_heads, 1)  # checked here, not when stage 2 starts
    _check_device(cfg.device)
    if not isinstance(body, nn.Module):
        raise TypeError(f"body must be an nn.Module (inputs to features), got {type(body).__name__}")
    if not hasattr(loader, "__iter__"):
        raise TypeError(f"loader must be an iterable of batches (a DataLoader), got {type(loader).__name__}")
    if teacher_fn is not None and not callable(teacher_fn):
        raise TypeError(f"teacher_fn must be callable (x -> the members' outputs), got {type(teacher_fn).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _distill(body, feature_dim, num_outputs, num_heads, loader, task, cfg, teacher_fn, impl,
                        hidden_features)


def _distill(body, feature_dim, num_outputs, num_heads, loader, task, cfg, teacher_fn, impl, hidden_features):
    T = cfg.temperature
    if task == "classification":
        head = HydraHead(feature_dim, num_outputs, 1, hidden_features=hidden_features, impl=impl)

        def stage1_loss(model, x, t):
            _check_members(t, num_heads)
            return hinton_kl_loss(model(x), t, T, impl=impl)

        def stage2_loss(model, x, t):
            return model.head.distill_loss(model.body(x), t, T)
    else:
        head = GaussianHydraHead(feature_dim, num_outputs, 1, impl=impl)

        def stage1_loss(model, x, t):  # one Gaussian against the members' mixture (its two moments)
            _check_members(t, num_heads)
            mu_t, var_t = _gaussian_split(t)
            mix_mu = mu_t.mean(1, keepdim=True)
            mix_var = var_t.mean(1, keepdim=True) + mu_t.var(1, unbiased=False, keepdim=True)
            mean, var = model(x)
            return gaussian_kl_loss(mean, var, mix_mu, mix_var)

        def stage2_loss(model, x, t):
            mu_t, var_t = _gaussian_split(t)
            return model.head.distill_loss(model.body(x), mu_t, var_t)

    kd = HydraModel(body, head).to(cfg.device)
    _stage(kd, loader, teacher_fn, cfg.epochs_stage1, cfg, stage1_loss, "stage 1 (KD)", kd.parameters())
    hydra = copy.deepcopy(kd)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    hydra.head = hydra.head.to("cpu").expand(num_heads, noise_std=cfg.noise_std, generator=gen).to(cfg.device)
    if cfg.freeze_body:
        for p in hydra.body.parameters():
            p.requires_grad_(False)
    params = [p for p in hydra.parameters() if p.requires_grad]
    _stage(hydra, loader, teacher_fn, cfg.epochs_stage2, cfg, stage2_loss, "stage 2 (Hydra)", params)
    return kd.eval(), hydra.eval()


def teacher_loader(x: torch.Tensor, teacher, batch_size: int, seed: int) -> DataLoader:
    """A shuffling loader of (x, cached teacher outputs) with its own seeded generator; a ``TopKTeacher``
    cache gives (x, values, indices) batches, which ``distill`` reads as top-k teachers. x's row i goes with the
    teacher's row i: a different number of rows is a ValueError naming both."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor of inputs, got {type(x).__name__}")
    if not isinstance(teacher, (torch.Tensor, TopKTeacher)):
        raise TypeError(f"teacher must be a tensor of the members' outputs or a TopKTeacher (teacher_outputs gives "
                        f"either), got {type(teacher).__name__}")
    parts = (x, teacher.values, teacher.indices) if isinstance(teacher, TopKTeacher) else (x, teacher)
    if any(p.dim() == 0 or len(p) != len(x) for p in parts):
        raise ValueError(f"x and teacher must have one row per example: x has shape {tuple(x.shape)}, teacher "
                         f"{' and '.join(str(tuple(p.shape)) for p in parts[1:])}")
    _check_int("batch_size", batch_size, 1)
    gen = torch.Generator().manual_seed(_check_int("seed", seed))
    return DataLoader(TensorDataset(*parts), batch_size=batch_size, shuffle=True, generator=gen)


def count_parameters(module: nn.Module | Iterable[nn.Module]) -> int:
    mods = [module] if isinstance(module, nn.Module) else list(module)
    return sum(p.numel() for m in mods for p in m.parameters())

