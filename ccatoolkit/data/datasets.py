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
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


__all__ = [
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "DIGITS_CLASSES",
    "ImageDataset",
    "dataset_info",
    "data_root",
    "read_idx",
    "load_dataset",
]

DATASET_NAMES: tuple[str, ...] = ("fashion_mnist", "cifar10", "cifar100", "digits")
#: Seed of the fixed 80/20 train/test permutation of scikit-learn's digits.
DIGITS_SPLIT_SEED: int = 0
#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
DEBIAN_FASHION_MNIST: Path = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR100_CLASSES: tuple[str, ...] = tuple(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm".split()
)
DIGITS_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))

_INFO: dict[str, dict[str, Any]] = {
    "fashion_mnist": dict(in_shape=(1, 28, 28), num_classes=10, mean=(0.2860,), std=(0.3530,),
                          classes=FASHION_MNIST_CLASSES),
    "cifar10": dict(
        in_shape=(3, 32, 32), num_classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        classes=CIFAR10_CLASSES,
    ),
    "cifar100": dict(
        in_shape=(3, 32, 32), num_classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        classes=CIFAR100_CLASSES,
    ),
    # scaled to [0, 1] (pixel / 16); mean and std over all 1797 images
    "digits": dict(in_shape=(1, 8, 8), num_classes=10, mean=(0.3053,), std=(0.3760,), classes=DIGITS_CLASSES),
}
# train-time augmentation per data set: (crop padding, horizontal flip)
_AUGMENT: dict[str, tuple[int, bool]] = {
    "fashion_mnist": (2, True),
    "cifar10": (4, True),
    "cifar100": (4, True),
    "digits": (1, False),  # flipping would change digits
}
# tensors above this many bytes as float32 stay uint8 in memory and are normalized per batch
_MAX_FLOAT_BYTES = 256 * 2**20


def canonical_name(name: str) -> str:
    key = str(name).lower().replace("-", "_")
    key = {"fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist", "cifar_10": "cifar10",
           "cifar_100": "cifar100"}.get(key, key)
    if key not in _INFO:
        raise ValueError(f"unknown data set {name!r}; valid names are: {', '.join(DATASET_NAMES)}")
    return key


def dataset_info(name: str) -> dict[str, Any]:
    """Facts of a data set without loading it: ``in_shape`` (C, H, W), ``num_classes``, ``mean``, ``std``, ``classes`` (names)."""
    return dict(_INFO[canonical_name(name)])


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
    key = canonical_name(name)
    info = _INFO[key]
    padding, flip = _AUGMENT[key]
    scale, classes = 1.0 / 255.0, None
    if key == "fashion_mnist":
        images, targets = _load_fashion_mnist(root, train, download)
        classes = list(FASHION_MNIST_CLASSES)
    elif key in ("cifar10", "cifar100"):
        images, targets, classes = _load_cifar(key, root, train, download)
    else:
        images, targets = _load_digits(train)
        scale = 1.0 / 16.0
    return ImageDataset(
        images, targets, info["mean"], info["std"], scale=scale, augment=augment,
        padding=padding, flip=flip, classes=classes, name=f"{key}-{'train' if train else 'test'}",
    )
