"""Data sets, splits and loaders for the experiments.

* Fashion-MNIST from its four IDX files, read here (gzip + numpy) so that any copy works: an
  explicit ``root``, ``$CCATOOLKIT_DATA``, Debian's ``/usr/share/datasets/fashion-mnist`` (package
  ``dataset-fashion-mnist``, whose archives differ from upstream's md5 sums, so torchvision cannot
  use them) or, last, a torchvision download.
* CIFAR-10/100 through torchvision (downloaded where there is internet).
* scikit-learn's 8x8 ``digits`` (tiny; for tests and quick demos).

Every data set is held in memory as one tensor (:class:`ImageDataset`), so indexing a batch is a
single tensor operation. Samples are ``(image, label)``: a normalized float image ``(C, H, W)``
and an ``int`` label; ``dataset.targets`` is a ``LongTensor``.

Splits for the CCA Merge experiments (:func:`split_indices`): ``full``, ``disjoint`` and
``skewed`` subsets of the training set, and a held-out validation part of the training set
(:func:`train_val_split`) used to tune hyper-parameters such as CCA's ridge (never the test set).
:func:`get_loaders` puts it together for notebooks.
"""

from __future__ import annotations

import copy
import functools
import gzip
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .device import resolve_device

__all__ = [
    "DATASET_NAMES",
    "SPLIT_KINDS",
    "VAL_FRACTION",
    "ImageDataset",
    "dataset_info",
    "data_root",
    "read_idx",
    "load_dataset",
    "split_indices",
    "train_val_split",
    "make_loader",
    "get_loaders",
    "batch_count",
    "batch_inputs",
    "batch_targets",
    "iterate_inputs",
]

DATASET_NAMES: tuple[str, ...] = ("fashion_mnist", "cifar10", "cifar100", "digits")
SPLIT_KINDS: tuple[str, ...] = ("full", "disjoint", "skewed")
#: Fraction of the training set held out for validation by :func:`get_loaders` (and the zoo).
VAL_FRACTION: float = 0.1
#: Seed of the fixed 80/20 train/test permutation of scikit-learn's digits.
DIGITS_SPLIT_SEED: int = 0
#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
DEBIAN_FASHION_MNIST: Path = Path("/usr/share/datasets/fashion-mnist")

_INFO: dict[str, dict[str, Any]] = {
    "fashion_mnist": dict(in_shape=(1, 28, 28), num_classes=10, mean=(0.2860,), std=(0.3530,)),
    "cifar10": dict(
        in_shape=(3, 32, 32), num_classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
    ),
    "cifar100": dict(
        in_shape=(3, 32, 32), num_classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)
    ),
    # scaled to [0, 1] (pixel / 16); mean and std over all 1797 images
    "digits": dict(in_shape=(1, 8, 8), num_classes=10, mean=(0.3053,), std=(0.3760,)),
}
# train-time augmentation per data set: (crop padding, horizontal flip)
_AUGMENT: dict[str, tuple[int, bool]] = {
    "fashion_mnist": (2, True),
    "cifar10": (4, True),
    "cifar100": (4, True),
    "digits": (1, False),  # flipping would change digits
}
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# tensors above this many bytes as float32 stay uint8 in memory and are normalized per batch
_MAX_FLOAT_BYTES = 256 * 2**20


def _canonical(name: str) -> str:
    key = str(name).lower().replace("-", "_")
    key = {"fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist", "cifar_10": "cifar10",
           "cifar_100": "cifar100"}.get(key, key)
    if key not in _INFO:
        raise ValueError(f"unknown data set {name!r}; valid names are: {', '.join(DATASET_NAMES)}")
    return key


def dataset_info(name: str) -> dict[str, Any]:
    """Shape facts of a data set without loading it: ``in_shape`` (C, H, W), ``num_classes``, ``mean``, ``std``."""
    return dict(_INFO[_canonical(name)])


def data_root() -> Path:
    """Where downloads go: ``$CCATOOLKIT_DATA``, else ``~/.cache/ccatoolkit/data``."""
    env = os.environ.get("CCATOOLKIT_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ccatoolkit" / "data"


# --------------------------------------------------------------------------------------------
# the in-memory data set


class ImageDataset(Dataset):
    """Images and labels held in memory as tensors; samples are ``(normalized float image, int label)``.

    ``images`` is ``(N, C, H, W)``, either already normalized float (small data sets) or raw
    (e.g. uint8) with ``scale`` mapping it to [0, 1] before ``(x - mean) / std`` is applied per
    batch. With ``augment`` on, every fetched image gets a random crop after zero-padding by
    ``padding`` pixels (black, as in torchvision's pad-then-normalize) and, if ``flip``, a random
    horizontal flip, drawn from torch's global generator (seed it for reproducible runs).
    Batched fetching (``__getitems__``) makes a DataLoader batch one tensor operation.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        scale: float = 1.0 / 255.0,
        augment: bool = False,
        padding: int = 0,
        flip: bool = False,
        classes: Sequence[str] | None = None,
        name: str = "",
    ) -> None:
        targets = torch.as_tensor(targets, dtype=torch.long)
        if images.dim() != 4 or images.shape[0] != targets.shape[0]:
            raise ValueError(
                f"images must be (N, C, H, W) with one label each; got images {tuple(images.shape)} "
                f"and {targets.shape[0]} labels"
            )
        channels = images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).expand(1, channels, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).expand(1, channels, 1, 1)
        self.scale = float(scale)
        self.normalized = False
        self.images = images
        if images.numel() * 4 <= _MAX_FLOAT_BYTES:  # small: normalize once, index floats
            self.images = self._normalize(images)
            self.normalized = True
        self.targets = targets
        self.augment = bool(augment)
        self.padding = int(padding)
        self.flip = bool(flip)
        if classes is None:
            classes = [str(i) for i in range(int(targets.max()) + 1 if len(targets) else 0)]
        self.classes = list(classes)
        self.name = name

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() * self.scale - self.mean) / self.std).contiguous()

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.padding > 0:
            p = self.padding
            fill = (0.0 - self.mean) / self.std  # a black pixel, normalized
            padded = fill.expand(n, c, h + 2 * p, w + 2 * p).clone()
            padded[:, :, p : p + h, p : p + w] = x
            dy = torch.randint(0, 2 * p + 1, (n,))
            dx = torch.randint(0, 2 * p + 1, (n,))
            rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
            x = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
        if self.flip:
            flip = torch.rand(n) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def _fetch(self, index: torch.Tensor) -> torch.Tensor:
        x = self.images[index]
        if not self.normalized:
            x = self._normalize(x)
        if self.augment:
            x = self._augment(x)
        return x

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a data set of {len(self)} samples")
        x = self._fetch(torch.tensor([i]))[0]
        return x, int(self.targets[i])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        x = self._fetch(index)
        return list(zip(x.unbind(0), self.targets[index].tolist()))

    def with_augment(self, augment: bool) -> "ImageDataset":
        """A view of the same tensors with augmentation switched on or off."""
        view = copy.copy(self)
        view.augment = bool(augment)
        return view

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.name or 'images'}: {len(self)} samples of shape "
            f"{tuple(self.images.shape[1:])}, {len(self.classes)} classes, augment={self.augment})"
        )


# --------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzip-compressed or not) into a numpy array, checking its header.

    The format: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, then
    each dimension as a big-endian int32, then the data. Images are magic 2051 (uint8, 3 dims),
    labels 2049 (uint8, 1 dim). A file is parsed once per process (keyed by its path, size and
    modification time), since decompressing Fashion-MNIST takes seconds and every loader needs it.
    """
    stat = Path(path).stat()
    array = _read_idx_once(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    return array.copy()


@functools.lru_cache(maxsize=8)
def _read_idx_once(path_str: str, _size: int, _mtime_ns: int) -> np.ndarray:
    path = Path(path_str)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path} is a damaged gzip file ({err}); delete it and fetch it again") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}); delete it and fetch it again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path} is truncated or damaged: its header says shape {shape} ({expected} bytes) "
            f"but the file holds {len(raw)} bytes; delete it and fetch it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_files(folder: Path, train: bool) -> tuple[Path, Path] | None:
    prefix = "train" if train else "t10k"
    images = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
    labels = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    return (images, labels) if images is not None and labels is not None else None


def _with_subfolders(folder: Path) -> list[Path]:
    return [folder, folder / "fashion-mnist", folder / "FashionMNIST" / "raw"]


def _fashion_candidates(root: str | os.PathLike[str] | None) -> list[tuple[Path, str]]:
    """Folders to look in, in order, each with a note saying why."""
    places: list[tuple[Path, str]] = []
    if root is not None:
        places += [(p, "root= argument") for p in _with_subfolders(Path(root).expanduser())]
    env = os.environ.get("CCATOOLKIT_DATA")
    if env:
        places += [(p, "$CCATOOLKIT_DATA") for p in _with_subfolders(Path(env).expanduser())]
    places.append((DEBIAN_FASHION_MNIST, "Debian package dataset-fashion-mnist"))
    if not env:
        places.append((data_root() / "FashionMNIST" / "raw", "earlier torchvision download"))
    return places


def _download_fashion_mnist(target: Path) -> Path:
    """Download with torchvision into ``target``; returns the folder holding the IDX files."""
    from torchvision import datasets

    target.mkdir(parents=True, exist_ok=True)
    datasets.FashionMNIST(root=str(target), train=True, download=True)
    return target / "FashionMNIST" / "raw"


def _find_fashion_mnist(root: str | os.PathLike[str] | None, train: bool, download: bool) -> tuple[Path, Path]:
    places = _fashion_candidates(root)
    for folder, _why in places:
        found = _fashion_files(folder, train)
        if found is not None:
            return found
    target = Path(root).expanduser() if root is not None else data_root()
    if download:
        try:
            found = _fashion_files(_download_fashion_mnist(target), train)
            if found is not None:
                return found
            download_note = f"downloaded into {target} but the files were not where expected"
        except Exception as err:  # no internet, proxy, disk full...: say so below
            download_note = f"failed: {type(err).__name__}: {err}"
    else:
        download_note = "not tried (download=False)"
    prefix = "train" if train else "t10k"
    looked = "\n".join(f"  - {folder}  ({why})" for folder, why in places)
    raise FileNotFoundError(
        f"Fashion-MNIST ({'train' if train else 'test'} split) not found: looked for "
        f"{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz] in\n{looked}\n"
        f"  - torchvision download into {target}: {download_note}\n"
        "Get the data in one of two ways:\n"
        "  1. install the Debian/Ubuntu package:  sudo apt-get install dataset-fashion-mnist\n"
        "     (it puts the files in /usr/share/datasets/fashion-mnist, where they are found automatically);\n"
        "  2. on a machine with internet access, call load_dataset('fashion_mnist', download=True) to let "
        "torchvision download them, or copy the four .gz files into a folder and set CCATOOLKIT_DATA to it "
        "(or pass root=that_folder)."
    )


def _load_fashion_mnist(root: Any, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images_path, labels_path = _find_fashion_mnist(root, train, download)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{images_path} does not hold 28x28 uint8 images (shape {images.shape}, {images.dtype})")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{labels_path} holds {labels.shape} labels for {images.shape[0]} images in {images_path}"
        )
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------------------------
# CIFAR and digits


def _load_cifar(name: str, root: Any, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = Path(root).expanduser() if root is not None else data_root()
    try:
        raw = cls(root=str(folder), train=train, download=download)
    except Exception as err:
        raise FileNotFoundError(
            f"{cls.__name__} not found in {folder} ({type(err).__name__}: {err}).\n"
            f"Get it with internet access via load_dataset({name!r}, download=True), or put torchvision's "
            f"extracted folder ({cls.base_folder}) in a folder and pass root= or set CCATOOLKIT_DATA to it."
        ) from err
    images = torch.as_tensor(np.asarray(raw.data, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(list(raw.targets), dtype=torch.long), list(raw.classes)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def _load_digits(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = _digits_arrays()  # parsed once per process (scikit-learn reads a CSV)
    n = len(targets)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(n)
    n_train = int(0.8 * n)
    part = np.sort(order[:n_train] if train else order[n_train:])
    return torch.as_tensor(images[part]).unsqueeze(1), torch.as_tensor(targets[part])


def load_dataset(
    name: str,
    train: bool = True,
    root: str | os.PathLike[str] | None = None,
    augment: bool = False,
    download: bool = True,
) -> ImageDataset:
    """Load a data set (train or test split) into memory as an :class:`ImageDataset`.

    ``name`` is one of :data:`DATASET_NAMES`. Images are normalized with the data set's usual
    mean and std. ``augment`` turns on train-time augmentation (random crop after padding, and a
    horizontal flip except for digits; CIFAR: ``RandomCrop(32, padding=4)`` + flip). ``root`` is a
    folder holding the files; ``download`` lets torchvision fetch missing files (needs internet).
    Raises ``FileNotFoundError`` saying where it looked and how to get the data.
    """
    key = _canonical(name)
    info = _INFO[key]
    padding, flip = _AUGMENT[key]
    scale, classes = 1.0 / 255.0, None
    if key == "fashion_mnist":
        images, targets = _load_fashion_mnist(root, train, download)
        classes = list(_FASHION_CLASSES)
    elif key in ("cifar10", "cifar100"):
        images, targets, classes = _load_cifar(key, root, train, download)
    else:
        images, targets = _load_digits(train)
        scale = 1.0 / 16.0
    return ImageDataset(
        images, targets, info["mean"], info["std"], scale=scale, augment=augment,
        padding=padding, flip=flip, classes=classes, name=f"{key}-{'train' if train else 'test'}",
    )


# --------------------------------------------------------------------------------------------
# splits


def _as_numpy_targets(targets: Any) -> np.ndarray:
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    arr = np.asarray(targets)
    if arr.ndim != 1:
        raise ValueError(f"targets must be one label per sample (1-D), got shape {arr.shape}")
    return arr.astype(np.int64)


def split_indices(
    targets: Any,
    n_models: int,
    kind: str = "full",
    seed: int = 0,
    major_fraction: float = 0.8,
) -> list[np.ndarray]:
    """Training-set indices for each of ``n_models`` models, as in the CCA Merge experiments.

    * ``"full"``: every model gets every index (models then differ only by their seed).
    * ``"disjoint"``: a random partition into ``n_models`` parts of (almost) equal size.
    * ``"skewed"``: the classes (in sorted order) are cut into ``n_models`` contiguous groups;
      model ``i`` gets ``major_fraction`` of its samples from group ``i`` and the rest spread
      evenly over the other groups; the subsets are disjoint. Of each group, a
      ``major_fraction`` share goes to its own model and the remainder is divided equally among
      the others, so with equal-sized groups every sample is used and every model's mix is exactly
      ``major_fraction`` (2 models on a 10-class set: 80% of one model's data from classes 0-4 and
      20% from 5-9, the other the reverse); unequal groups give approximately that mix.

    Samples are drawn with ``numpy.random.default_rng(seed)``: the same seed gives the same
    split. All models of one experiment must use the same ``seed`` here (their own training seeds
    may differ). Returns sorted ``int64`` index arrays into ``targets``.
    """
    labels = _as_numpy_targets(targets)
    n = labels.shape[0]
    if n_models < 1:
        raise ValueError(f"n_models must be >= 1, got {n_models}")
    if kind not in SPLIT_KINDS:
        raise ValueError(f"unknown split kind {kind!r}; valid kinds are: {', '.join(SPLIT_KINDS)}")
    rng = np.random.default_rng(seed)
    if kind == "full":
        return [np.arange(n, dtype=np.int64) for _ in range(n_models)]
    if kind == "disjoint":
        if n_models > n:
            raise ValueError(f"cannot split {n} samples into {n_models} disjoint non-empty parts")
        return [np.sort(part).astype(np.int64) for part in np.array_split(rng.permutation(n), n_models)]
    # skewed
    if not 0.0 <= major_fraction <= 1.0:
        raise ValueError(f"major_fraction must lie in [0, 1], got {major_fraction}")
    classes = np.unique(labels)
    if n_models > len(classes):
        raise ValueError(f"a skewed split needs at most one model per class: {n_models} models, {len(classes)} classes")
    if n_models == 1:
        return [np.arange(n, dtype=np.int64)]
    parts: list[list[np.ndarray]] = [[] for _ in range(n_models)]
    for g, group in enumerate(np.array_split(classes, n_models)):
        pool = rng.permutation(np.flatnonzero(np.isin(labels, group)))
        own = int(round(major_fraction * len(pool)))
        share = (len(pool) - own) // (n_models - 1)
        parts[g].append(pool[:own])
        others = [m for m in range(n_models) if m != g]
        for k, m in enumerate(others):
            parts[m].append(pool[own + k * share : own + (k + 1) * share])
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def train_val_split(n: int, val_fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into sorted (train, validation) indices; the validation part is a random
    ``val_fraction`` of the training data, held out to tune hyper-parameters (never the test set)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(int(n))
    n_val = int(round(val_fraction * n))
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)


# --------------------------------------------------------------------------------------------
# loaders and batches


def make_loader(
    dataset: Dataset,
    batch_size: int = 256,
    shuffle: bool = False,
    seed: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    device: str | torch.device | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset`` (or its ``indices``) with a seeded shuffle.

    Always ``num_workers=0`` (worker processes can hang notebook kernels and the data is in
    memory anyway); ``pin_memory`` only when the target ``device`` is CUDA.
    """
    if indices is not None:
        dataset = Subset(dataset, [int(i) for i in np.asarray(indices).reshape(-1)])
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=0,
        pin_memory=resolve_device(device).type == "cuda",
        drop_last=drop_last,
    )


def _cap(indices: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` of ``indices``: a seeded random subset, kept sorted."""
    if limit is None or len(indices) <= limit:
        return indices
    if limit < 1:
        raise ValueError(f"limit must be a positive number of samples, got {limit}")
    return np.sort(np.random.default_rng(seed).choice(indices, size=int(limit), replace=False))


def get_loaders(
    name: str = "fashion_mnist",
    batch_size: int = 256,
    split: str | None = "full",
    n_models: int = 1,
    model_index: int = 0,
    split_seed: int = 0,
    seed: int = 0,
    major_fraction: float = 0.8,
    val_fraction: float = VAL_FRACTION,
    augment: bool | None = None,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    limit: int | None = None,
    eval_batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, DataLoader]:
    """Train, validation and test loaders for one model of an experiment.

    1. The training set is cut into a validation part (``val_fraction``, seeded by ``split_seed``)
       and the rest; the validation part is held out from every model.
    2. The rest is split among ``n_models`` models by :func:`split_indices` (``split`` =
       ``"full"``/``None``, ``"disjoint"`` or ``"skewed"``, seeded by ``split_seed``, which all
       models of one experiment share); this loader serves part ``model_index``.
    3. ``limit`` caps each of train, val and test at that many samples (a seeded random subset)
       for smoke runs.

    ``train`` shuffles with ``seed`` and augments (``augment=None``: on for CIFAR, off otherwise);
    ``val`` and ``test`` are neither shuffled nor augmented and use ``eval_batch_size``
    (default ``2 * batch_size``). Returns ``dict(train=..., val=..., test=...)``; ``val`` is
    ``None`` when ``val_fraction`` is 0.
    """
    key = _canonical(name)
    kind = "full" if split is None else split
    if not 0 <= model_index < n_models:
        raise ValueError(f"model_index must lie in [0, {n_models}), got {model_index}")
    if augment is None:
        augment = key in ("cifar10", "cifar100")
    train_set = load_dataset(key, train=True, root=root, download=download)
    test_set = load_dataset(key, train=False, root=root, download=download)
    rest, val = train_val_split(len(train_set), val_fraction, seed=split_seed)
    parts = split_indices(train_set.targets[torch.as_tensor(rest)], n_models, kind, split_seed, major_fraction)
    train_idx = _cap(rest[parts[model_index]], limit, split_seed)
    val_idx = _cap(val, limit, split_seed)
    test_idx = _cap(np.arange(len(test_set), dtype=np.int64), limit, split_seed)
    eval_bs = eval_batch_size or 2 * batch_size
    return dict(
        train=make_loader(train_set.with_augment(augment), batch_size, shuffle=True, seed=seed,
                          indices=train_idx, device=device),
        val=make_loader(train_set, eval_bs, indices=val_idx, device=device) if len(val_idx) else None,
        test=make_loader(test_set, eval_bs, indices=None if limit is None else test_idx, device=device),
    )


def batch_count(data: Iterable[Any], max_batches: int | None = None) -> int | None:
    """How many batches a pass over ``data`` (capped at ``max_batches``) yields; None when unknown (a generator)."""
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return total if max_batches is None else min(total, max_batches)


def batch_inputs(batch: Any) -> torch.Tensor:
    """The inputs of a batch: the batch itself if it is a tensor, else its first item."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return batch[0]
    raise TypeError(
        f"a batch must be a tensor of inputs or a tuple/list (inputs, targets, ...), got {type(batch).__name__}"
    )


def batch_targets(batch: Any) -> torch.Tensor:
    """The targets of a batch: the second item of a tuple/list batch."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise ValueError(
        "this batch has no targets: a batch with labels must be a tuple/list (inputs, targets, ...); "
        f"got {type(batch).__name__}"
    )


def iterate_inputs(data: Iterable[Any]) -> Iterable[torch.Tensor]:
    """Yield the inputs of every batch of ``data``."""
    for batch in data:
        yield batch_inputs(batch)
