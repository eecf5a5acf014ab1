"""Experiments over zoos of models: their accuracy table, and merges of N models at a time by each method.

:class:`NModelsContext` merges every N of a zoo on several subsets (:func:`model_subsets`) per method,
each result kept on disk (:class:`~ccatoolkit.app.store.MergeResultStore`); :func:`best_methods` reads
the winners off the numbers, so a notebook's text never names one the table does not support.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from torch import nn

from ccatoolkit._utils import progress_bar
from ccatoolkit.app.contexts import CCA_METHODS
from ccatoolkit.app.store import MergeResultStore
from ccatoolkit.merging.api import ensemble, merge
from ccatoolkit.zoo.training import evaluate

__all__ = ["accuracy_table", "model_subsets", "NModelsContext", "n_models_accuracy", "best_methods"]


def accuracy_table(models: dict[str, Any], data: Any) -> Any:
    """A pandas DataFrame (or a list of rows without pandas): name, accuracy, loss of each model on ``data``."""
    rows = []
    for name, model in models.items():
        result = evaluate(model, data)
        rows.append({"model": name, "accuracy": float(result["accuracy"]), "loss": float(result["loss"])})
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas comes with the notebooks extra
        return rows
    return pd.DataFrame(rows).set_index("model")


def model_subsets(n_models: int, size: int, limit: int | None = None) -> list[tuple[int, ...]]:
    """Which ``size`` of ``n_models`` models to merge: all subsets, or ``limit`` of them chosen in rotation.

    The rotation comes first: windows ``(i, i+1, ..., i+size-1) mod n_models`` for ``i = 0, 1, ...``, so
    every model is in as many subsets as the others. On a skewed split model ``i`` knows class group
    ``i`` best, so the classes a subset covers rotate too, instead of being tied to N (the first N
    models always cover the first N groups). The other subsets follow in lexicographic order.
    """
    if not 1 <= size <= n_models:
        raise ValueError(f"size must lie in [1, {n_models}], got {size}")
    windows = [tuple(sorted((i + j) % n_models for j in range(size))) for i in range(n_models)]
    ordered = list(dict.fromkeys(windows + list(itertools.combinations(range(n_models), size))))
    return ordered if limit is None else ordered[: max(1, int(limit))]


@dataclass
class NModelsContext:
    """Zoos of models per data split (``zoos[split]`` a list), merged N at a time by each method.

    Each N is merged on several subsets of the zoo (:func:`model_subsets`: all of them, or
    ``subsets`` chosen in rotation), so a difference between methods can be read against the spread
    over subsets. ``data[split]`` gives the statistics data for a split (or one iterable for all
    splits); ``test_data`` is where merged models are evaluated. ``runs[split][method][N]`` holds
    each subset's accuracy and ``results[split][method][N]`` their mean, filled lazily or all at once
    by :meth:`compute`; :meth:`frame` gives the runs as a table (with each subset's ensemble). With
    ``cache`` (the default) each run's accuracy is also kept on disk (:class:`MergeResultStore`), so
    a second run of the notebook reads them back.
    """

    zoos: Mapping[str, Sequence[nn.Module]]
    data: Mapping[str, Iterable[Any]] | Iterable[Any]
    test_data: Iterable[Any]
    methods: Sequence[str] = ("average", "permute", "zipit", "cca", "ensemble")
    ns: Sequence[int] = ()
    ridge: float | str = "auto"
    progress: bool = False
    subsets: int | None = None  # subsets merged per N (None: all)
    cache: bool = True  # keep each merge's accuracy on disk (:class:`MergeResultStore`)
    results: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    runs: dict[str, dict[str, dict[int, dict[tuple[int, ...], float]]]] = field(default_factory=dict)
    store: MergeResultStore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.zoos:
            raise ValueError("zoos is empty; pass a dict split name -> list of models")
        self.test_data = list(self.test_data)  # read once: every merge's evaluation reuses the batches
        smallest = min(len(z) for z in self.zoos.values())
        if smallest < 2:
            raise ValueError("every split needs at least two models to merge")
        if not self.ns:
            self.ns = list(range(2, smallest + 1))
        if max(self.ns) > smallest or min(self.ns) < 2:
            raise ValueError(f"ns must lie in [2, {smallest}] (the smallest zoo), got {list(self.ns)}")
        self.store = MergeResultStore(enabled=self.cache)

    @property
    def loaded(self) -> int:
        """How many accuracies were read back from the disk cache rather than computed."""
        return self.store.loaded

    def data_for(self, split: str) -> Iterable[Any]:
        if isinstance(self.data, Mapping):
            return self.data[split]
        return self.data

    def subsets_for(self, split: str, n: int) -> list[tuple[int, ...]]:
        """The subsets of ``split``'s zoo merged for ``N = n`` (indices into the zoo)."""
        return model_subsets(len(self.zoos[split]), n, self.subsets)

    def compute(self) -> dict[str, dict[str, dict[int, float]]]:
        """Fill every (split, method, N) accuracy over its subsets; returns ``results`` (the means)."""
        cells = [(s, m, n) for s in self.zoos for m in self.methods for n in self.ns]
        iterator: Iterable[Any] = cells
        if self.progress:
            iterator = progress_bar(cells, desc="merging N models")
        for split, method, n in iterator:
            n_models_accuracy(self, n, method, split)
        return self.results

    def frame(self) -> Any:
        """The runs as a pandas DataFrame, one row per (split, method, N, subset): ``accuracy``, and when
        the ensemble is among the methods, ``ensemble`` (that subset's) and ``relative`` (accuracy minus it)."""
        import pandas as pd

        self.compute()
        rows = []
        for split, by_method in self.runs.items():
            for method, by_n in by_method.items():
                for n, by_subset in by_n.items():
                    for subset, acc in by_subset.items():
                        row = dict(split=split, method=method, n=n, subset=subset, accuracy=acc)
                        if "ensemble" in self.methods:
                            row["ensemble"] = self.runs[split]["ensemble"][n][subset]
                            row["relative"] = acc - row["ensemble"]
                        rows.append(row)
        return pd.DataFrame(rows)


def n_models_accuracy(ctx: NModelsContext, n: int, method: str, split: str | None = None) -> float:
    """Mean test accuracy over ``split``'s subsets of ``n`` models merged by ``method`` (each cached in ``ctx.runs``)."""
    split = split if split is not None else next(iter(ctx.zoos))
    if split not in ctx.zoos:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(ctx.zoos)}")
    if method not in ctx.methods:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(ctx.methods)}")
    if n not in ctx.ns:
        raise ValueError(f"N={n} is not offered; choose one of: {list(ctx.ns)}")
    table = ctx.results.setdefault(split, {}).setdefault(method, {})
    if n not in table:
        runs = ctx.runs.setdefault(split, {}).setdefault(method, {}).setdefault(n, {})
        options = {"ridge": ctx.ridge} if method in CCA_METHODS else {}
        for subset in ctx.subsets_for(split, n):
            if subset in runs:
                continue
            models = [ctx.zoos[split][i] for i in subset]

            def run(models: list[nn.Module] = models) -> float:
                if method == "ensemble":
                    return evaluate(ensemble(models), ctx.test_data)["accuracy"]
                merged = merge(models, method=method, data=ctx.data_for(split), progress=False, **options)
                return evaluate(merged, ctx.test_data)["accuracy"]

            runs[subset] = ctx.store.accuracy(models, ctx.data_for(split), ctx.test_data, method, options, run)
        table[n] = float(np.mean(list(runs.values())))
    return table[n]


def best_methods(
    results: Mapping[str, Mapping[str, Mapping[int, float]]], exclude: Sequence[str] = ("ensemble",)
) -> dict[str, dict[int, str]]:
    """The most accurate method for each split and N of ``results[split][method][N]`` (as ``NModelsContext.compute`` gives).

    Ties are joined with ``" = "``. ``exclude``: methods that are not merges (the ensemble runs all N
    models, a reference rather than a competitor). Read off the computed numbers, so a notebook's text
    never has to name a winner that the table may not support.
    """
    best: dict[str, dict[int, str]] = {}
    for split, by_method in results.items():
        candidates = {m: r for m, r in by_method.items() if m not in exclude}
        ns = sorted({n for r in candidates.values() for n in r})
        best[split] = {}
        for n in ns:
            scores = {m: float(r[n]) for m, r in candidates.items() if n in r}
            top = max(scores.values())
            best[split][n] = " = ".join(m for m, v in scores.items() if v == top)
    return best
