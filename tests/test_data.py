"""Data sets, IDX files, splits and loaders (no downloads: made-up files and monkeypatched torchvision)."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from ccatoolkit.data import datasets as data
from ccatoolkit.data.datasets import DATASET_NAMES, dataset_info, load_dataset, read_idx
from ccatoolkit._utils import batch_inputs, batch_targets
from ccatoolkit.data.loaders import get_loaders, make_loader
from ccatoolkit.data.splits import split_indices, train_val_split

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(folder: Path, n_train: int = 20, n_test: int = 10, compress: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        arrays[prefix] = (images, labels)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            raw = _idx_bytes(arr)
            if compress:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / stem).write_bytes(raw)
    return arrays


# ---------------------------------------------------------------------------------------- IDX


def test_read_idx_plain_and_gzip(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_bytes(images)
    assert int.from_bytes(raw[:4], "big") == 2051  # the images magic number
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    for name in ("a", "a.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, images)
    labels = _idx_bytes(np.array([3, 1, 4], dtype=np.uint8))
    assert int.from_bytes(labels[:4], "big") == 2049
    (tmp_path / "l").write_bytes(labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "l"), [3, 1, 4])


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    raw = _idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))
    (tmp_path / "bad_magic").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(ValueError, match="bad_magic.*not an IDX file"):
        read_idx(tmp_path / "bad_magic")
    (tmp_path / "short").write_bytes(raw[:-5])
    with pytest.raises(ValueError, match="short.*truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "broken.gz").write_bytes(gzip.compress(raw)[:-10])
    with pytest.raises(ValueError, match="broken.gz"):
        read_idx(tmp_path / "broken.gz")


# ---------------------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_from_root(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path / "fashion-mnist")
    train = load_dataset("fashion_mnist", root=tmp_path, download=False)
    test = load_dataset("fashion-mnist", train=False, root=tmp_path, download=False)
    assert len(train) == 20 and len(test) == 10
    assert train.targets.dtype == torch.long and train.targets.tolist() == list(np.arange(20) % 10)
    x, y = train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int) and y == 3
    expected = (arrays["train"][0][3].astype(np.float32) / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(test[9][0][0].numpy(), (arrays["t10k"][0][9] / 255.0 - 0.2860) / 0.3530, atol=1e-5)


def test_fashion_mnist_from_env_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fashion(tmp_path / "FashionMNIST" / "raw", compress=False)
    monkeypatch.setenv("CCATOOLKIT_DATA", str(tmp_path))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    assert len(load_dataset("fashion_mnist", download=False)) == 20


def test_fashion_mnist_augmentation_keeps_shape(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    ds = load_dataset("fashion_mnist", root=tmp_path, download=False, augment=True)
    batch = ds.__getitems__(list(range(20)))
    assert all(x.shape == (1, 28, 28) for x, _ in batch)
    plain = ds.with_augment(False)
    assert not plain.augment and ds.augment and plain.images is ds.images


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CCATOOLKIT_DATA", str(tmp_path))  # empty: the Debian copy must be found
    train = load_dataset("fashion_mnist", download=False)
    test = load_dataset("fashion_mnist", train=False, download=False)
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 1, 28, 28)
    assert train.targets.bincount().tolist() == [6000] * 10
    assert abs(train.images.mean().item()) < 0.01 and abs(train.images.std().item() - 1.0) < 0.01
    assert train.classes[0] == "T-shirt/top"


def test_missing_fashion_mnist_explains_where_and_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CCATOOLKIT_DATA", str(empty))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")

    def offline(target: Path) -> Path:
        raise OSError("no internet here")

    monkeypatch.setattr(data, "_download_fashion_mnist", offline)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion_mnist", root=tmp_path / "given")
    message = str(info.value)
    for place in (tmp_path / "given", empty, empty / "FashionMNIST" / "raw", tmp_path / "no-debian"):
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "CCATOOLKIT_DATA" in message and "download=True" in message
    assert "no internet here" in message
    with pytest.raises(FileNotFoundError, match="not tried"):
        load_dataset("fashion_mnist", train=False, download=False)


# ---------------------------------------------------------------------------------------- CIFAR (fake torchvision)


class _FakeCIFAR:
    """Stands in for torchvision's CIFAR classes: random uint8 images of the real shapes."""

    base_folder = "cifar-fake"
    num_classes = 10

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        n = 40 if train else 16
        rng = np.random.default_rng(1 if train else 2)
        self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        self.targets = [int(i % self.num_classes) for i in range(n)]
        self.classes = [f"c{i}" for i in range(self.num_classes)]


class _FakeCIFAR100(_FakeCIFAR):
    num_classes = 100


@pytest.fixture
def fake_cifar(monkeypatch: pytest.MonkeyPatch) -> type[_FakeCIFAR]:
    from torchvision import datasets

    monkeypatch.setattr(datasets, "CIFAR10", _FakeCIFAR)
    monkeypatch.setattr(datasets, "CIFAR100", _FakeCIFAR100)
    return _FakeCIFAR


def test_cifar_normalization(fake_cifar: type[_FakeCIFAR], tmp_path: Path) -> None:
    ds = load_dataset("cifar10", root=tmp_path, download=False)
    raw = fake_cifar(str(tmp_path)).data
    assert len(ds) == 40 and ds.targets.dtype == torch.long and ds.classes[1] == "c1"
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and y == 5
    mean = np.array([0.4914, 0.4822, 0.4465])[:, None, None]
    std = np.array([0.2470, 0.2435, 0.2616])[:, None, None]
    np.testing.assert_allclose(x.numpy(), (raw[5].transpose(2, 0, 1) / 255.0 - mean) / std, atol=1e-5)
    c100 = load_dataset("cifar100", train=False, root=tmp_path)
    assert len(c100) == 16 and dataset_info("cifar100")["num_classes"] == 100


def test_large_sets_stay_uint8_and_normalize_per_batch(
    fake_cifar: type[_FakeCIFAR], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = load_dataset("cifar10", root=tmp_path)
    monkeypatch.setattr(data, "_MAX_FLOAT_BYTES", 0)  # pretend it is too big to hold as floats
    big = load_dataset("cifar10", root=tmp_path)
    assert big.images.dtype == torch.uint8 and small.images.dtype == torch.float32
    assert torch.allclose(big[7][0], small[7][0], atol=1e-6)
    got = torch.stack([x for x, _ in big.__getitems__([0, 3, 9])])
    assert torch.allclose(got, small.images[[0, 3, 9]], atol=1e-6)


def test_cifar_augmentation_is_a_crop_of_the_padded_image(fake_cifar: type[_FakeCIFAR], tmp_path: Path) -> None:
    plain = load_dataset("cifar10", root=tmp_path)
    aug = plain.with_augment(True)
    torch.manual_seed(3)
    batch = aug.__getitems__(list(range(8)))
    fill = ((0.0 - plain.mean) / plain.std)[0]
    changed = 0
    for i, (x, _) in enumerate(batch):
        padded = fill.expand(3, 40, 40).clone()
        padded[:, 4:36, 4:36] = plain[i][0]
        matches = [
            (dy, dx, f)
            for dy, dx, f in itertools.product(range(9), range(9), (False, True))
            if torch.equal((padded.flip(-1) if f else padded)[:, dy : dy + 32, dx : dx + 32], x)
        ]
        assert matches, f"augmented image {i} is not a crop (+flip) of the padded original"
        changed += not torch.equal(x, plain[i][0])
    assert changed >= 6  # random crops/flips almost never give back the original


def test_get_loaders_cifar_augments_only_training(fake_cifar: type[_FakeCIFAR], tmp_path: Path) -> None:
    loaders = get_loaders("cifar10", batch_size=8, root=tmp_path, val_fraction=0.25)
    assert loaders["train"].dataset.dataset.augment
    assert not loaders["val"].dataset.dataset.augment and not loaders["test"].dataset.augment
    x, y = next(iter(loaders["train"]))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.long
    assert len(loaders["train"].dataset) == 30 and len(loaders["val"].dataset) == 10


# ---------------------------------------------------------------------------------------- digits, info


def test_digits_fixed_split() -> None:
    train, test = load_dataset("digits"), load_dataset("digits", train=False)
    assert len(train) == 1437 and len(test) == 360
    assert train[0][0].shape == (1, 8, 8)
    assert abs(train.images.mean().item()) < 0.05 and abs(train.images.std().item() - 1.0) < 0.05
    again = load_dataset("digits")
    assert torch.equal(train.images, again.images) and torch.equal(train.targets, again.targets)
    # no test image appears in the training set
    flat_train = {bytes(row.numpy().tobytes()) for row in train.images.flatten(1)}
    shared = sum(bytes(row.numpy().tobytes()) in flat_train for row in test.images.flatten(1))
    assert shared <= 2  # the raw data has a handful of exact duplicates


def test_dataset_info_and_unknown_names() -> None:
    assert dataset_info("fashion_mnist")["in_shape"] == (1, 28, 28)
    assert dataset_info("cifar10") == dict(dataset_info("cifar10"))
    assert dataset_info("digits")["num_classes"] == 10
    with pytest.raises(ValueError) as info:
        dataset_info("mnist")
    for name in DATASET_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="cifar100"):
        load_dataset("imagenet")


# ---------------------------------------------------------------------------------------- splits


def _balanced_targets(per_class: int = 100, classes: int = 10) -> np.ndarray:
    return np.random.default_rng(5).permutation(np.repeat(np.arange(classes), per_class))


def test_full_and_disjoint_splits() -> None:
    targets = _balanced_targets()
    full = split_indices(targets, 3, "full", seed=1)
    assert len(full) == 3 and all(np.array_equal(p, np.arange(1000)) for p in full)
    parts = split_indices(torch.as_tensor(targets), 3, "disjoint", seed=1)
    assert [len(p) for p in parts] == [334, 333, 333]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1000))
    # every class is in every random part
    assert all(len(np.unique(targets[p])) == 10 for p in parts)


def test_skewed_split_two_models_is_80_20() -> None:
    targets = _balanced_targets()
    a, b = split_indices(targets, 2, "skewed", seed=0, major_fraction=0.8)
    assert len(a) == len(b) == 500
    assert len(np.intersect1d(a, b)) == 0
    assert np.mean(targets[a] < 5) == pytest.approx(0.8)
    assert np.mean(targets[b] >= 5) == pytest.approx(0.8)
    # the minority part spreads over all the other group's classes
    assert set(np.unique(targets[a][targets[a] >= 5])) == {5, 6, 7, 8, 9}


def test_skewed_split_three_models_unequal_groups() -> None:
    targets = _balanced_targets()
    parts = split_indices(targets, 3, "skewed", seed=0, major_fraction=0.7)
    groups = np.array_split(np.arange(10), 3)
    for part, group in zip(parts, groups):
        assert np.mean(np.isin(targets[part], group)) == pytest.approx(0.7, abs=0.08)
    for p, q in itertools.combinations(parts, 2):
        assert len(np.intersect1d(p, q)) == 0


def test_splits_are_reproducible_and_seeded() -> None:
    targets = _balanced_targets()
    for kind in ("disjoint", "skewed"):
        first = split_indices(targets, 2, kind, seed=7)
        again = split_indices(targets, 2, kind, seed=7)
        other = split_indices(targets, 2, kind, seed=8)
        assert all(np.array_equal(p, q) for p, q in zip(first, again))
        assert not np.array_equal(first[0], other[0])


def test_split_errors() -> None:
    targets = _balanced_targets(10, 3)
    with pytest.raises(ValueError, match="full, disjoint, skewed"):
        split_indices(targets, 2, "random")
    with pytest.raises(ValueError, match="at most one model per class"):
        split_indices(targets, 4, "skewed")
    with pytest.raises(ValueError, match="major_fraction"):
        split_indices(targets, 2, "skewed", major_fraction=1.5)


def test_train_val_split() -> None:
    train, val = train_val_split(1000, 0.1, seed=3)
    assert len(train) == 900 and len(val) == 100
    assert len(np.intersect1d(train, val)) == 0 and np.array_equal(np.sort(np.r_[train, val]), np.arange(1000))
    assert np.array_equal(val, train_val_split(1000, 0.1, seed=3)[1])
    assert not np.array_equal(val, train_val_split(1000, 0.1, seed=4)[1])
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(10, 1.0)


# ---------------------------------------------------------------------------------------- loaders, batches


def test_make_loader_seeded_shuffle_and_indices() -> None:
    ds = load_dataset("digits")
    order = lambda loader: torch.cat([y for _, y in loader])  # noqa: E731
    a = make_loader(ds, 64, shuffle=True, seed=1, device="cpu")
    b = make_loader(ds, 64, shuffle=True, seed=1, device="cpu")
    c = make_loader(ds, 64, shuffle=True, seed=2, device="cpu")
    assert torch.equal(order(a), order(b)) and not torch.equal(order(a), order(c))
    assert a.num_workers == 0 and not a.pin_memory
    sub = make_loader(ds, 10, indices=np.array([5, 1, 7]))
    x, y = next(iter(sub))
    assert x.shape == (3, 1, 8, 8) and y.tolist() == ds.targets[[5, 1, 7]].tolist()


def test_get_loaders_split_val_and_limit() -> None:
    loaders = get_loaders("digits", batch_size=32, split="skewed", n_models=2, model_index=1, split_seed=0)
    train_idx = np.array(loaders["train"].dataset.indices)
    val_idx = np.array(loaders["val"].dataset.indices)
    assert len(np.intersect1d(train_idx, val_idx)) == 0  # validation is held out
    assert len(val_idx) == round(0.1 * 1437)
    targets = loaders["train"].dataset.dataset.targets.numpy()
    assert np.mean(targets[train_idx] >= 5) == pytest.approx(0.8, abs=0.03)
    other = get_loaders("digits", split="skewed", n_models=2, model_index=0)
    assert len(np.intersect1d(np.array(other["train"].dataset.indices), train_idx)) == 0
    small = get_loaders("digits", limit=50)
    assert [len(small[k].dataset) for k in ("train", "val", "test")] == [50, 50, 50]
    with pytest.raises(ValueError, match="model_index"):
        get_loaders("digits", n_models=2, model_index=2)


def test_batch_helpers() -> None:
    x, y = torch.zeros(2, 3), torch.tensor([1, 0])
    assert batch_inputs(x) is x
    assert batch_inputs((x, y)) is x and batch_inputs([x, y]) is x
    assert batch_targets((x, y)) is y
    with pytest.raises(ValueError, match="no targets"):
        batch_targets(x)
    with pytest.raises(TypeError, match="tuple/list"):
        batch_inputs({"x": x})
