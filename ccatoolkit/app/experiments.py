"""Experiments over zoos of models: their accuracy table, and merges of N models at a time by each method.

:class:`NModelsContext` merges every N of a zoo on several subsets (:func:`model_subsets`) per method,
each result kept on disk (:class:`~ccatoolkit.app.store.MergeResultStore`), each beside the single
models it merged; :func:`zoo_by_part` gives a split's zoo with several seeds per part, so that every
N has several subsets; :func:`best_methods` reads the winners off the numbers and names one only where
its lead is larger than the spread over subsets, so a notebook's text never names one the table does
not support.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from torch import nn

from ccatoolkit._utils import progress_bar
from ccatoolkit.app import inputs
from ccatoolkit.app.contexts import CCA_METHODS
from ccatoolkit.app.store import MergeResultStore
from ccatoolkit.merging.api import ensemble, merge
from ccatoolkit.zoo.training import evaluate, predict

__all__ = ["accuracy_table", "part_table", "model_subsets", "zoo_by_part", "NModelsContext", "n_models_accuracy", "best_methods"]


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


def part_table(models: Sequence[nn.Module], parts: Sequence[int], data: Any, num_classes: int = 10) -> Any:
    """Each model's test accuracy on the classes of its own part of a skewed split and on the other classes.

    ``parts[k]``: the part model ``k`` trained on (:func:`zoo_by_part`); part ``i`` of ``P`` is the
    ``i``-th of ``numpy.array_split(range(num_classes), P)``, as :func:`ccatoolkit.data.split_indices`
    cuts the classes. A pandas DataFrame, one row per model: ``part``, ``classes``, ``accuracy`` (all
    test images), ``own`` (its part's classes) and ``others`` (the rest).
    """
    import pandas as pd

    groups = np.array_split(np.arange(num_classes), len(set(parts)))
    rows = []
    for k, (model, part) in enumerate(zip(models, parts)):
        targets, predictions, _ = predict(model, data)
        own = np.isin(targets, groups[part])
        right = targets == predictions
        rows.append(dict(model=k, part=int(part), classes=", ".join(str(c) for c in groups[part]),
                         accuracy=float(right.mean()), own=float(right[own].mean()), others=float(right[~own].mean())))
    return pd.DataFrame(rows).set_index("model")


def model_subsets(n_models: int, size: int, limit: int | None = None,
                  groups: Sequence[Any] | None = None) -> list[tuple[int, ...]]:
    """Which ``size`` of ``n_models`` models to merge: all subsets, or ``limit`` of them chosen in rotation.

    The rotation comes first: windows ``(i, i+1, ..., i+size-1) mod n_models`` for ``i = 0, 1, ...``, so
    every model is in as many subsets as the others. On a skewed split model ``i`` knows class group
    ``i`` best, so the classes a subset covers rotate too, instead of being tied to N (the first N
    models always cover the first N groups). The other subsets follow in lexicographic order.

    ``groups``: a label per model (the part of a skewed split it trained on); a subset then holds at
    most one model of each group, so ``size`` can be at most the number of groups. A zoo ordered
    part by part and then seed by seed (parts ``0, 1, ..., P-1, 0, 1, ...``) has windows that cover
    distinct parts and mix the seeds.
    """
    if not 1 <= size <= n_models:
        raise ValueError(f"size must lie in [1, {n_models}], got {size}")
    if groups is not None:
        groups = list(groups)
        if len(groups) != n_models:
            raise ValueError(f"groups gives {len(groups)} labels for {n_models} models")
        if size > len(set(groups)):
            raise ValueError(f"size {size} is more than the {len(set(groups))} groups (at most one model of each)")
    windows = [tuple(sorted((i + j) % n_models for j in range(size))) for i in range(n_models)]
    ordered = list(dict.fromkeys(windows + list(itertools.combinations(range(n_models), size))))
    if groups is not None:
        ordered = [s for s in ordered if len({groups[i] for i in s}) == size]
    return ordered if limit is None else ordered[: max(1, int(limit))]


def zoo_by_part(s: Any, split: str, parts: int, seeds_per_part: int = 1) -> tuple[list[nn.Module], list[int]]:
    """``split``'s zoo of ``parts`` parts with ``seeds_per_part`` models (seeds) on each part, and each model's part.

    Ordered part by part, then seed by seed: model ``k`` trained on part ``k % parts`` with seed ``k``
    (so the first ``parts`` models are ``inputs.zoo(s, split, n=parts)``). With the parts as
    ``NModelsContext(groups=...)``, the subsets of every N up to ``parts`` take one model of each part
    they cover, and N = ``parts`` has ``seeds_per_part ** parts`` subsets rather than one. Models are
    trained once and cached (:func:`ccatoolkit.app.inputs.zoo`).
    """
    if parts < 1 or seeds_per_part < 1:
        raise ValueError(f"parts and seeds_per_part must be >= 1, got {parts} and {seeds_per_part}")
    models: list[nn.Module] = []
    for r in range(seeds_per_part):
        models += inputs.zoo(s, split, n=parts, seeds=range(r * parts, (r + 1) * parts))
    return models, [k % parts for k in range(len(models))]


@dataclass
class NModelsContext:
    """Zoos of models per data split (``zoos[split]`` a list), merged N at a time by each method.

    Each N is merged on several subsets of the zoo (:func:`model_subsets`: all of them, or
    ``subsets`` chosen in rotation), so a difference between methods can be read against the spread
    over subsets. ``groups[split]`` (optional) labels each model of a zoo with the part of the data it
    trained on: a subset then takes at most one model of each part (several seeds per part give
    several subsets even at the largest N). ``data[split]`` gives the statistics data for a split (or
    one iterable for all splits); ``test_data`` is where merged models are evaluated.
    ``runs[split][method][N]`` holds each subset's accuracy and ``results[split][method][N]`` their
    mean, filled lazily or all at once by :meth:`compute`; :meth:`frame` gives the runs as a table,
    each beside the ensemble of the same models and the single models merged. With ``cache`` (the
    default) each run's accuracy is also kept on disk (:class:`MergeResultStore`), so a second run
    of the notebook reads them back.
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
    groups: Mapping[str, Sequence[Any]] = field(default_factory=dict)  # per split: each model's part (optional)
    results: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    runs: dict[str, dict[str, dict[int, dict[tuple[int, ...], float]]]] = field(default_factory=dict)
    store: MergeResultStore = field(init=False, repr=False)
    _singles: dict[str, list[float]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.zoos:
            raise ValueError("zoos is empty; pass a dict split name -> list of models")
        self.test_data = list(self.test_data)  # read once: every merge's evaluation reuses the batches
        unknown = set(self.groups) - set(self.zoos)
        if unknown:
            raise ValueError(f"groups for unknown split(s) {', '.join(sorted(unknown))}; the splits are {', '.join(self.zoos)}")
        for split, labels in self.groups.items():
            if len(labels) != len(self.zoos[split]):
                raise ValueError(f"groups[{split!r}] labels {len(labels)} models, the zoo has {len(self.zoos[split])}")
        largest = min(self.largest_n(split) for split in self.zoos)
        if largest < 2:
            raise ValueError("every split needs at least two models (of two parts) to merge")
        if not self.ns:
            self.ns = list(range(2, largest + 1))
        if max(self.ns) > largest or min(self.ns) < 2:
            raise ValueError(f"ns must lie in [2, {largest}] (the fewest models, or parts, of a split), got {list(self.ns)}")
        self.store = MergeResultStore(enabled=self.cache)

    @property
    def loaded(self) -> int:
        """How many accuracies were read back from the disk cache rather than computed."""
        return self.store.loaded

    def largest_n(self, split: str) -> int:
        """The most models of ``split`` one subset can hold: the zoo's size, or its number of parts."""
        labels = self.groups.get(split)
        return len(self.zoos[split]) if labels is None else len(set(labels))

    def data_for(self, split: str) -> Iterable[Any]:
        if isinstance(self.data, Mapping):
            return self.data[split]
        return self.data

    def subsets_for(self, split: str, n: int) -> list[tuple[int, ...]]:
        """The subsets of ``split``'s zoo merged for ``N = n`` (indices into the zoo)."""
        return model_subsets(len(self.zoos[split]), n, self.subsets, self.groups.get(split))

    def single_accuracies(self, split: str) -> list[float]:
        """The test accuracy of each model of ``split``'s zoo, in zoo order (evaluated once)."""
        if split not in self._singles:
            self._singles[split] = [float(evaluate(m, self.test_data)["accuracy"]) for m in self.zoos[split]]
        return self._singles[split]

    def compute(self) -> dict[str, dict[str, dict[int, float]]]:
        """Fill every (split, method, N) accuracy over its subsets; returns ``results`` (the means)."""
        cells = [(s, m, n) for s in self.zoos for m in self.methods for n in self.ns
                 if n not in self.results.get(s, {}).get(m, {})]  # those not computed yet
        iterator: Iterable[Any] = cells
        if self.progress and cells:
            iterator = progress_bar(cells, desc="merging N models")
        for split, method, n in iterator:
            n_models_accuracy(self, n, method, split)
        return self.results

    def spreads(self) -> dict[str, dict[str, dict[int, float]]]:
        """``spreads()[split][method][N]``: the standard deviation of the accuracy over the subsets (NaN for one
        subset), shaped as :attr:`results` (for :func:`best_methods`)."""
        self.compute()
        return {split: {method: {n: float(np.std(list(runs.values()), ddof=1)) if len(runs) > 1 else float("nan")
                                 for n, runs in by_n.items()}
                        for method, by_n in by_method.items()}
                for split, by_method in self.runs.items()}

    def frame(self) -> Any:
        """The runs as a pandas DataFrame, one row per (split, method, N, subset).

        Columns: ``accuracy``; the single models of the subset: ``best_single`` and ``mean_single`` (their
        best and mean test accuracy) and ``vs_best`` (accuracy minus the best of them: above 0, the merge
        beats every model it was made of); when the ensemble is among the methods, ``ensemble`` (that
        subset's) and ``relative`` (accuracy minus it).
        """
        import pandas as pd

        self.compute()
        rows = []
        for split, by_method in self.runs.items():
            singles = self.single_accuracies(split)
            for method, by_n in by_method.items():
                for n, by_subset in by_n.items():
                    for subset, acc in by_subset.items():
                        own = [singles[i] for i in subset]
                        row = dict(split=split, method=method, n=n, subset=subset, accuracy=acc,
                                   best_single=max(own), mean_single=float(np.mean(own)), vs_best=acc - max(own))
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


def mean_sd_table(runs: Any, value: str = "accuracy", singles: bool = True, decimals: int = 1) -> Any:
    """``runs`` (:meth:`NModelsContext.frame`) as a table of ``"mean ± sd"`` strings in percent (or points):
    rows (split, method), columns N, the mean and standard deviation of ``value`` over the subsets.

    ``singles`` adds a row per split for the best single model of each subset (``best_single``; its
    difference from itself is 0, so it is left out for ``value="vs_best"``). One subset gives ``"± nan"``.
    """
    import pandas as pd

    frame = runs
    if singles and value == "accuracy":
        firsts = runs.drop_duplicates(["split", "n", "subset"]).assign(method="best single model")
        frame = pd.concat([runs, firsts.assign(accuracy=firsts["best_single"])], ignore_index=True)
    stats = frame.groupby(["split", "method", "n"], sort=False)[value].agg(["mean", "std"]) * 100
    text = stats.apply(lambda r: f"{r['mean']:.{decimals}f} ± {r['std']:.{decimals}f}", axis=1)
    return text.unstack("n").rename_axis(columns="N")


def best_methods(
    results: Mapping[str, Mapping[str, Mapping[int, float]]], exclude: Sequence[str] = ("ensemble",),
    spread: Mapping[str, Mapping[str, Mapping[int, float]]] | None = None,
) -> dict[str, dict[int, str]]:
    """The most accurate method for each split and N of ``results[split][method][N]`` (as ``NModelsContext.compute`` gives).

    ``spread`` (same shape, e.g. :meth:`NModelsContext.spreads`: the standard deviation over the
    subsets) decides what counts as a lead: a method is named alone only when its mean is above every
    other's by more than the larger of the two spreads. Methods within that of the top are tied with
    it and joined by ``" ≈ "`` (best mean first); where a spread is NaN (one subset, so none measured)
    the label ends with ``" (no spread)"``, since no lead can be judged. Without ``spread`` only
    exact ties count, joined by ``" = "``. ``exclude``: methods that are not merges (the ensemble
    runs all N models, a reference rather than a competitor). Read off the computed numbers, so a
    notebook's text never names a winner that the table does not support.
    """
    best: dict[str, dict[int, str]] = {}
    for split, by_method in results.items():
        candidates = {m: r for m, r in by_method.items() if m not in exclude}
        ns = sorted({n for r in candidates.values() for n in r})
        best[split] = {}
        for n in ns:
            scores = {m: float(r[n]) for m, r in candidates.items() if n in r}
            order = sorted(scores, key=lambda m: -scores[m])
            top = order[0]
            if spread is None:
                best[split][n] = " = ".join(m for m in scores if scores[m] == scores[top])
                continue
            sd = {m: float(spread.get(split, {}).get(m, {}).get(n, float("nan"))) for m in order}
            tied = [m for m in order if m == top or scores[top] - scores[m] <= max(sd[top], sd[m])]
            unknown = any(np.isnan(sd[m]) for m in order) and len(order) > 1
            best[split][n] = " ≈ ".join(tied) + (" (no spread)" if unknown else "")
    return best
