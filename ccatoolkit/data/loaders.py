"""DataLoaders for the experiments: one call gives a model's train, validation and test loaders."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ccatoolkit._utils import resolve_device
from ccatoolkit.data.datasets import canonical_name, load_dataset
from ccatoolkit.data.splits import VAL_FRACTION, split_indices, train_val_split

__all__ = ["make_loader", "get_loaders"]



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
    key = canonical_name(name)
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
