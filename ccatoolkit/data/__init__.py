"""Data: the data sets (Fashion-MNIST from IDX files, CIFAR, digits), the experiments' splits and loaders.

``datasets`` loads and describes data sets, ``splits`` decides which samples each model sees, ``loaders`` wraps both.
"""

from ccatoolkit.data.datasets import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    DATASET_NAMES,
    DIGITS_CLASSES,
    FASHION_MNIST_CLASSES,
    ImageDataset,
    data_root,
    dataset_info,
    load_dataset,
    read_idx,
)
from ccatoolkit.data.loaders import get_loaders, make_loader
from ccatoolkit.data.splits import SPLIT_KINDS, VAL_FRACTION, split_indices, train_val_split

__all__ = [
    "CIFAR10_CLASSES", "CIFAR100_CLASSES", "DATASET_NAMES", "DIGITS_CLASSES", "FASHION_MNIST_CLASSES",
    "ImageDataset", "data_root", "dataset_info", "load_dataset", "read_idx", "get_loaders", "make_loader",
    "SPLIT_KINDS", "VAL_FRACTION", "split_indices", "train_val_split",
]
