"""cpu tier: the data sets (embedded ones, and torchvision files the test writes itself)."""

import struct

import numpy as np
import pytest
import torch

from fasthydra.data import EMBEDDED, load_dataset

pytestmark = pytest.mark.cpu


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_sets_are_split_and_deterministic(name):
    a = load_dataset(name, seed=0)
    b = load_dataset(name, seed=0)
    c = load_dataset(name, seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_ood, b.x_ood)
    assert not torch.equal(a.x_test, c.x_test)
    assert a.x_train.dtype == torch.float32 and a.x_train.dim() == 2
    assert a.x_test.shape[1] == a.x_ood.shape[1] == a.in_features
    assert len(a.x_train) > len(a.x_test) > 0 and len(a.x_ood) > 0
    if a.task == "classification":
        assert a.y_train.dtype == torch.int64 and int(a.y_train.max()) + 1 == a.num_outputs
        assert a.num_outputs == (1000 if name == "blobs-1000" else 10)
    else:
        assert a.y_train.shape == (len(a.x_train), 1) and a.num_outputs == 1
    assert a.ood_description


def test_toy_regression_has_a_gap_and_far_ood():
    d = load_dataset("toy-regression")
    assert (d.x_train.abs() >= 2).all() and (d.x_train.abs() <= 5).all()
    assert ((d.x_ood.abs() < 1.6) | (d.x_ood.abs() > 6)).all()


def test_unknown_and_missing_files():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("mnist")


def _write_idx(folder, prefix, n, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("t10k", n // 2)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        header = struct.pack(">iiii", 2051, count, 28, 28)
        (folder / f"{split}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, count) + labels.tobytes())


def test_mnist_from_files_with_fashion_as_ood(tmp_path):
    _write_idx(tmp_path / "MNIST" / "raw", "mnist", 40, 0)
    only = load_dataset("mnist", data_dir=str(tmp_path))
    assert only.x_train.shape == (40, 784) and only.x_test.shape == (20, 784)
    assert float(only.x_train.max()) <= 1.0 and "shuffled" in only.ood_description
    _write_idx(tmp_path / "FashionMNIST" / "raw", "fashion", 40, 1)
    paired = load_dataset("mnist", data_dir=str(tmp_path), limit=10)
    assert paired.x_train.shape == (10, 784) and "fashion-mnist" in paired.ood_description
    assert paired.x_ood.shape == (10, 784)


def _write_cifar(root, n):
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, size=n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def _write_svhn(root, n):
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        savemat(root / f"{split}_32x32.mat", {"X": rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8),
                                              "y": rng.integers(1, 11, size=(n, 1))})


def test_cifar10_and_svhn_from_files(tmp_path, monkeypatch):
    """The test writes tiny files in the real formats; torchvision's md5 check is what they cannot pass."""
    import torchvision

    for cls in (torchvision.datasets.CIFAR10, torchvision.datasets.SVHN):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    _write_cifar(tmp_path, 6)
    cifar = load_dataset("cifar10", data_dir=str(tmp_path))
    assert cifar.x_train.shape == (30, 3072) and cifar.x_test.shape == (6, 3072)
    assert "shuffled" in cifar.ood_description  # no SVHN files yet
    _write_svhn(tmp_path, 8)
    svhn = load_dataset("svhn", data_dir=str(tmp_path))
    assert svhn.x_train.shape == (8, 3072) and 0 <= int(svhn.y_train.min()) and int(svhn.y_train.max()) <= 9
    paired = load_dataset("cifar10", data_dir=str(tmp_path))
    assert "svhn" in paired.ood_description and paired.x_ood.shape == (8, 3072)


def test_blobs_1000_is_large_c_with_overlap_and_far_ood():
    d = load_dataset("blobs-1000", seed=0)
    assert d.num_outputs == 1000 and d.in_features == 32
    counts = torch.bincount(d.y_train, minlength=1000)
    assert bool((counts == counts[0]).all())  # balanced
    # classes overlap: a point's nearest class mean is not always its own (members will disagree)
    means = torch.stack([d.x_train[d.y_train == c].mean(0) for c in range(1000)])
    nearest = torch.cdist(d.x_test, means).argmin(1)
    agree = (nearest == d.y_test).float().mean().item()
    assert 0.3 < agree < 0.95
    # OOD points lie outside the training cloud
    assert d.x_ood.norm(dim=1).median() > 1.5 * d.x_train.norm(dim=1).max() / 1.5
    assert d.x_ood.norm(dim=1).median() > d.x_train.norm(dim=1).quantile(0.99)


def test_load_dataset_checks_seed_and_limit():
    with pytest.raises(TypeError, match="seed"):  # was torch's "manual_seed expected a long"
        load_dataset("digits", seed=1.5)
    with pytest.raises(ValueError, match="limit"):
        load_dataset("mnist", data_dir="/nonexistent", limit=0)
