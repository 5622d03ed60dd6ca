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

import copy
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fasthydra.functional import gaussian_kl_loss, hinton_kl_loss
from fasthydra.modules import GaussianHydraHead, HydraHead


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
        return self.head(self.body(x))


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


def _bar(iterable, desc: str, progress: bool, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not progress)


def _to(batch, device):
    return [b.to(device) for b in batch]


def member_forward(member: nn.Module, x: torch.Tensor, task: str):
    """Classification members return logits (B, C); regression members (B, 2K) -> (mean, var)."""
    out = member(x)
    if task == "classification":
        return out
    k = out.shape[-1] // 2
    return out[..., :k], nn.functional.softplus(out[..., k:]) + 1e-6


def train_ensemble(make_member: Callable[[], nn.Module], loader: DataLoader, num_members: int, task: str,
                   epochs: int = 30, lr: float = 3e-3, weight_decay: float = 0.0, device: str = "cpu",
                   seed: int = 0, progress: bool = True) -> list[nn.Module]:
    """M members trained independently (member m from seed + m) with cross-entropy, or with the
    Gaussian NLL for regression (outputs (B, 2K): means, then raw variances)."""
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


@torch.no_grad()
def members_output(members: Iterable[nn.Module], x: torch.Tensor, task: str) -> torch.Tensor:
    """All members on one batch: (B, M, C) logits, or (B, M, 2K) means then variances."""
    outs = []
    for member in members:
        out = member_forward(member, x, task)
        outs.append(out if task == "classification" else torch.cat(out, dim=-1))
    return torch.stack(outs, dim=1)


@torch.no_grad()
def teacher_outputs(members: list[nn.Module], loader: DataLoader, task: str, device: str = "cpu",
                    cache_path: str | None = None) -> torch.Tensor:
    """The members' outputs over a loader (in its order, so use shuffle=False), computed once.

    With cache_path the result is written to a memory-mapped ``.npy`` file and returned as a tensor
    over that file (nothing of size (N, M, C) stays in memory).
    """
    chunks, store, row = [], None, 0
    n = len(loader.dataset) if hasattr(loader, "dataset") else None
    for batch in loader:
        x = batch[0].to(device)
        out = members_output(members, x, task).float().cpu()
        if cache_path is not None:
            if store is None:
                if n is None:
                    raise ValueError("cache_path needs a loader with a sized dataset")
                store = np.lib.format.open_memmap(cache_path, mode="w+", dtype=np.float32,
                                                  shape=(n, *out.shape[1:]))
            store[row:row + len(out)] = out.numpy()
            row += len(out)
        else:
            chunks.append(out)
    if cache_path is not None:
        store.flush()
        return torch.from_numpy(np.load(cache_path, mmap_mode="r+"))
    return torch.cat(chunks)


def _batches(loader, teacher_fn, device):
    for batch in loader:
        if teacher_fn is None:
            x, t = _to(batch[:2], device)
        else:
            x = batch[0].to(device)
            t = teacher_fn(x)
        yield x, t


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
    or (x, ...) together with ``teacher_fn(x)`` computing them on the fly. hidden_features gives
    classification heads a hidden layer (MLP heads), which lets them hold more of the members' diversity.
    Returns (kd_model, hydra_model), both ``HydraModel`` (the KD model has one head). Seeded by
    cfg.seed; the caller's global RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _distill(body, feature_dim, num_outputs, num_heads, loader, task, cfg, teacher_fn, impl,
                        hidden_features)


def _distill(body, feature_dim, num_outputs, num_heads, loader, task, cfg, teacher_fn, impl, hidden_features):
    T = cfg.temperature
    if task == "classification":
        head = HydraHead(feature_dim, num_outputs, 1, hidden_features=hidden_features, impl=impl)

        def stage1_loss(model, x, t):
            return hinton_kl_loss(model(x), t, T, impl=impl)

        def stage2_loss(model, x, t):
            return model.head.distill_loss(model.body(x), t, T)
    else:
        head = GaussianHydraHead(feature_dim, num_outputs, 1, impl=impl)

        def stage1_loss(model, x, t):  # one Gaussian against the members' mixture (its two moments)
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


def teacher_loader(x: torch.Tensor, teacher: torch.Tensor, batch_size: int, seed: int) -> DataLoader:
    """A shuffling loader of (x, cached teacher outputs) pairs with its own seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, teacher), batch_size=batch_size, shuffle=True, generator=gen)


def count_parameters(module: nn.Module | Iterable[nn.Module]) -> int:
    mods = [module] if isinstance(module, nn.Module) else list(module)
    return sum(p.numel() for m in mods for p in m.parameters())

