"""What a notebook run works on, at a :class:`~ccatoolkit.app.settings.Settings`' sizes: its loaders and its zoo.

Data sets are loaded once per process; the zoo's models are trained once and then read from the
cache (:func:`ccatoolkit.zoo.trained.trained_model`).
"""

from __future__ import annotations

import functools
from typing import Any

from ccatoolkit._utils import progress_bar
from ccatoolkit.app.settings import Settings
from ccatoolkit.data import get_loaders, load_dataset, make_loader
from ccatoolkit.zoo.trained import trained_model

__all__ = ["loaders", "zoo"]


@functools.lru_cache(maxsize=4)
def _dataset(name: str, train: bool) -> Any:
    return load_dataset(name, train=train)


def _subset(n: int, limit: int | None, seed: int) -> Any:
    import numpy as np

    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=int(limit), replace=False))


def loaders(s: Settings, split: str = "full", n_models: int = 1, model_index: int = 0) -> dict[str, Any]:
    """The loaders a notebook uses: ``train`` (this model's part of ``split``), ``test`` and ``stats``.

    ``stats`` holds ``s.stats_limit`` training examples (not shuffled, no augmentation): the data on
    which activation statistics for alignment and merging are measured. ``test`` holds
    ``s.test_limit`` test examples (all when None). Data sets are loaded once per process.
    """
    out = get_loaders(s.dataset, batch_size=s.batch_size, split=split, n_models=n_models,
                      model_index=model_index, seed=s.seed, limit=s.limit, device=s.device)
    train_set, test_set = _dataset(s.dataset, True), _dataset(s.dataset, False)
    eval_bs = 2 * s.batch_size
    out["test"] = make_loader(test_set, eval_bs, indices=_subset(len(test_set), s.test_limit, s.seed), device=s.device)
    stats_idx = _subset(len(train_set), s.stats_limit, s.seed + 1)
    out["stats"] = make_loader(train_set, eval_bs, indices=stats_idx, device=s.device)
    return out


def zoo(s: Settings, split: str = "full", n: int | None = None, seeds: Any = None) -> list[Any]:
    """Trained (cached) models of ``s.model`` on ``split``: ``n`` of them (default ``s.n_models``), in eval mode.

    ``split="full"``: the same data, seeds ``seeds`` (default ``0..n-1``); ``"disjoint"``/``"skewed"``:
    model ``i`` trains on part ``i`` of ``n`` parts (seed ``i``). A second call loads from the cache.
    """
    n = s.n_models if n is None else int(n)
    seeds = list(range(n)) if seeds is None else [int(v) for v in seeds]
    if len(seeds) != n:
        raise ValueError(f"{n} models need {n} seeds, got {len(seeds)}")
    models = []
    # one bar for the set (a model's own epoch and batch bars would make dozens in one cell)
    for i, seed in progress_bar(list(enumerate(seeds)), s.progress, desc=f"{split} zoo", unit="model", leave=False):
        part = dict(n_models=n, model_index=i) if split != "full" else {}
        model = trained_model(model=s.model, model_kwargs=dict(s.model_kwargs), dataset=s.dataset, split=split,
                              seed=seed, epochs=s.epochs, batch_size=s.batch_size, limit=s.limit,
                              device=s.device, progress=False, **part)
        models.append(model.eval())
    return models
