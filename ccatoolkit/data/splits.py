"""Which training samples each model of an experiment sees: full, disjoint and skewed splits, and a validation part.

The splits of the CCA Merge experiments (Horoi et al. 2024): models that differ only by seed, models
trained on disjoint parts, and models trained on class-skewed parts (80% of each model's data
from its own group of classes). All are reproducible from a seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["SPLIT_KINDS", "VAL_FRACTION", "split_indices", "train_val_split"]

SPLIT_KINDS: tuple[str, ...] = ("full", "disjoint", "skewed")
#: Fraction of the training set held out for validation by :func:`~ccatoolkit.data.loaders.get_loaders` (and the zoo).
VAL_FRACTION: float = 0.1



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
