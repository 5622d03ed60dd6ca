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
        assert a.y_train.dtype == torch.int64 and int(a.y_train.max()) + 1 == a.num_outputs == 10
    else:
        assert a.y_train.shape == (len(a.x_train), 1) and a.num_outputs == 1
    assert a.ood_description


def test_toy_regression_has_a_gap_and_far_ood():
    d = load_dataset("toy-regression")
    assert (d.x_train.abs() >= 1).all() and (d.x_train.abs() <= 4).all()
    assert ((d.x_ood.abs() < 0.9) | (d.x_ood.abs() > 5)).all()


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
        (folder / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, count, 28, 28) + images.tobytes())
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
