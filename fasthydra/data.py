"""Data sets for the demo and the tests. Nothing is downloaded at run time.

Embedded (always available): ``digits`` (scikit-learn's bundled 8x8 digits; the default),
``mnist1d`` (generated locally by the mnist1d package), ``toy-regression`` (1-D, heteroscedastic,
with a gap in the inputs) and ``diabetes`` (scikit-learn, regression). With ``data_dir`` pointing at
files the user already has: ``mnist``, ``fashion-mnist``, ``cifar10``, ``svhn`` through torchvision
(``download=False``).

Every set has a fixed train/test split for a seed and an out-of-distribution (OOD) set:
- digits: the test images with their 64 pixels shuffled by one fixed permutation (same intensities,
  no digit structure);
- mnist1d: the test signals with their 40 positions shuffled by one fixed permutation;
- toy-regression: training inputs with 2 <= |x| <= 5; OOD inputs from the gap (-1.6, 1.6) and from
  outside the data, 6 < |x| < 8;
- diabetes: test inputs moved far outside the training range (each feature shifted by 4 standard
  deviations, signs at random per row);
- blobs-1000 (generated, for large C): 1000 classes in 32 dimensions, Gaussian blobs around class
  centres drawn from one seed, close enough that neighbouring classes overlap (members disagree);
  OOD: blobs around 100 centres twice as far from the origin as any class centre;
- the image sets: the paired set when its files are there (mnist <-> fashion-mnist, cifar10 <-> svhn),
  else the test images with shuffled pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fasthydra.functional import _check_int

EMBEDDED = ("digits", "mnist1d", "toy-regression", "diabetes", "blobs-1000")
FROM_FILES = ("mnist", "fashion-mnist", "cifar10", "svhn")
# The modules (of the demo extra) each set's loader imports; the others need none.
LOADER_MODULES = {"digits": ("sklearn",), "diabetes": ("sklearn",), "mnist1d": ("mnist1d",),
                  **{name: ("torchvision",) for name in FROM_FILES}}
DATASETS = EMBEDDED + FROM_FILES


@dataclass
class DataSplit:
    name: str
    task: str  # "classification" or "regression"
    x_train: torch.Tensor  # (N, features) float32
    y_train: torch.Tensor  # (N,) int64 labels, or (N, K) float32 targets
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_ood: torch.Tensor
    num_outputs: int  # classes C, or regression outputs K
    ood_description: str
    y_ood: torch.Tensor | None = None  # regression: the true function at the OOD inputs (for plots)

    @property
    def in_features(self) -> int:
        return self.x_train.shape[1]


def _split(n: int, test_fraction: float, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def _standardise(train: torch.Tensor, *others: torch.Tensor):
    mu, sd = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mu) / sd for t in (train, *others)]


def _shuffled(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return x[:, torch.randperm(x.shape[1], generator=gen)]


def _digits(seed: int) -> DataSplit:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    tr, te = _split(len(y), 0.3, gen)
    ood = _shuffled(x[te], gen)
    return DataSplit("digits", "classification", x[tr], y[tr], x[te], y[te], ood, 10,
                     "test digits with their 64 pixels shuffled by one fixed permutation")


def _mnist1d(seed: int) -> DataSplit:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=False)
    args.seed = seed
    data = make_dataset(args)
    x_tr = torch.tensor(data["x"], dtype=torch.float32)
    x_te = torch.tensor(data["x_test"], dtype=torch.float32)
    x_tr, x_te = _standardise(x_tr, x_te)
    gen = torch.Generator().manual_seed(seed)
    return DataSplit("mnist1d", "classification", x_tr, torch.tensor(data["y"], dtype=torch.int64), x_te,
                     torch.tensor(data["y_test"], dtype=torch.int64), _shuffled(x_te, gen), 10,
                     "test signals with their 40 positions shuffled by one fixed permutation")


def toy_function(x: torch.Tensor) -> torch.Tensor:
    """The toy regression's mean function."""
    return torch.sin(1.5 * x) * 1.5 + 0.3 * x


def toy_noise_std(x: torch.Tensor) -> torch.Tensor:
    """Its heteroscedastic noise: larger for larger |x|."""
    return 0.05 + 0.1 * x.abs()


def _toy_regression(seed: int, n_train: int = 600, n_test: int = 300) -> DataSplit:
    gen = torch.Generator().manual_seed(seed)

    def inputs(n):  # |x| in [2, 5], both signs: a gap (-2, 2) in the middle
        mag = 2.0 + 3.0 * torch.rand(n, generator=gen)
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        return (mag * sign)[:, None]

    def targets(x):
        return toy_function(x) + toy_noise_std(x) * torch.randn(x.shape, generator=gen)

    x_tr, x_te = inputs(n_train), inputs(n_test)
    gap = (torch.rand(100, generator=gen) * 3.2 - 1.6)[:, None]
    far = ((6.0 + 2.0 * torch.rand(100, generator=gen)) * torch.where(torch.rand(100, generator=gen) < 0.5, -1.0,
                                                                       1.0))[:, None]
    ood = torch.cat([gap, far])
    return DataSplit("toy-regression", "regression", x_tr, targets(x_tr), x_te, targets(x_te), ood, 1,
                     "inputs from the gap (-1.6, 1.6) in the training inputs (|x| in [2, 5]) and from outside "
                     "them (6 < |x| < 8)", y_ood=toy_function(ood))


def _diabetes(seed: int) -> DataSplit:
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.float32)[:, None]
    gen = torch.Generator().manual_seed(seed)
    tr, te = _split(len(y), 0.25, gen)
    x_tr, x_te = _standardise(x[tr], x[te])
    y_tr, y_te = _standardise(y[tr], y[te])
    signs = torch.where(torch.rand(x_te.shape, generator=gen) < 0.5, -1.0, 1.0)
    ood = x_te + 4.0 * signs
    return DataSplit("diabetes", "regression", x_tr, y_tr, x_te, y_te, ood, 1,
                     "test inputs shifted 4 standard deviations per feature (random sign), outside the data")


_TV = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "svhn": "SVHN"}
_PAIR = {"mnist": "fashion-mnist", "fashion-mnist": "mnist", "cifar10": "svhn", "svhn": "cifar10"}


def _torchvision_arrays(name: str, data_dir: str, train: bool, limit: int | None):
    import torchvision

    cls = getattr(torchvision.datasets, _TV[name])
    if name == "svhn":
        ds = cls(data_dir, split="train" if train else "test", download=False)
        images, labels = torch.as_tensor(ds.data), torch.as_tensor(ds.labels)
    else:
        ds = cls(data_dir, train=train, download=False)
        images = torch.as_tensor(ds.data)
        labels = torch.as_tensor(ds.targets)
        if images.dim() == 4:  # CIFAR: (N, H, W, C) -> (N, C, H, W), as SVHN stores it
            images = images.permute(0, 3, 1, 2)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.reshape(len(images), -1).float() / 255.0, labels.long()


def _from_files(name: str, data_dir: str | None, seed: int, limit: int | None) -> DataSplit:
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir pointing at its files (nothing is downloaded); "
                         f"embedded sets: {', '.join(EMBEDDED)}")
    try:
        x_tr, y_tr = _torchvision_arrays(name, data_dir, True, limit)
        x_te, y_te = _torchvision_arrays(name, data_dir, False, limit)
    except RuntimeError as exc:
        raise FileNotFoundError(f"{name} files not found under {data_dir}: {exc}") from exc
    gen = torch.Generator().manual_seed(seed)
    pair = _PAIR[name]
    try:
        x_ood, _ = _torchvision_arrays(pair, data_dir, False, limit)
        if x_ood.shape[1] != x_te.shape[1]:
            raise RuntimeError("shape mismatch")
        what = f"the {pair} test images"
    except (RuntimeError, FileNotFoundError, OSError):
        x_ood, what = _shuffled(x_te, gen), "test images with shuffled pixels"
    return DataSplit(name, "classification", x_tr, y_tr, x_te, y_te, x_ood, int(y_tr.max()) + 1, what)


BLOBS_CLASSES, BLOBS_DIM = 1000, 32


def _blobs(seed: int, classes: int = BLOBS_CLASSES, dim: int = BLOBS_DIM, per_class_train: int = 24,
           per_class_test: int = 6, noise: float = 1.3) -> DataSplit:
    """Gaussian blobs: centres ~ N(0, I) in `dim` dimensions, points = centre + N(0, noise^2 I); at the
    default noise the nearest true centre is right for about 70% of the points (classes overlap). OOD points
    come from far-away centres (radius twice the largest class centre's), so the members extrapolate there and
    disagree."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    centres = torch.randn(classes, dim, generator=gen)

    def sample(per_class):
        y = torch.arange(classes).repeat_interleave(per_class)
        return centres[y] + noise * torch.randn(len(y), dim, generator=gen), y

    x_tr, y_tr = sample(per_class_train)
    x_te, y_te = sample(per_class_test)
    far = torch.randn(100, dim, generator=gen)
    far = far / far.norm(dim=1, keepdim=True) * 2 * centres.norm(dim=1).max()
    x_ood = far.repeat_interleave(len(y_te) // 100 or 1, 0)
    x_ood = x_ood + noise * torch.randn(x_ood.shape, generator=gen)
    return DataSplit("blobs-1000", "classification", x_tr, y_tr, x_te, y_te, x_ood, classes,
                     "points around 100 centres twice as far from the origin as any class centre")


def load_dataset(name: str = "digits", seed: int = 0, data_dir: str | None = None,
                 limit: int | None = None) -> DataSplit:
    """One of DATASETS as tensors, split and with its OOD set (see the module docstring).

    limit caps the rows of the file-based sets (for quick runs and tests).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    seed = _check_int("seed", seed)
    if limit is not None:
        limit = _check_int("limit", limit, 1)
    if name == "digits":
        return _digits(seed)
    if name == "mnist1d":
        return _mnist1d(seed)
    if name == "toy-regression":
        return _toy_regression(seed)
    if name == "diabetes":
        return _diabetes(seed)
    if name == "blobs-1000":
        return _blobs(seed)
    return _from_files(name, data_dir, seed, limit)


