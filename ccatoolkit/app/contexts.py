"""What the notebooks' widgets work on: a *context* per widget (models, data, a cache) and the numbers it shows.

A context holds the models and data of one widget plus a cache of what was computed, so moving a
control back is instant; what a slider runs through is computed ahead (the alpha paths on their
whole grid, CCA's statistics for the ridge slider), so a move only looks up or re-solves. The
functions here compute (correlations, merged accuracies, points of a path);
:mod:`ccatoolkit.app.render` draws them and :mod:`ccatoolkit.app.controls` wires ipywidgets to the
drawing. All computation goes through the library (``merge``, ``RidgeSweep``, ``align_to``,
``correlation_matrix``, ``interpolate``).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ccatoolkit._utils import has_batchnorm, model_device, progress_bar
from ccatoolkit.analysis.stats import correlation_matrix
from ccatoolkit.landscape.curves import Curve, curve_coefficients, describe_data, state_digest
from ccatoolkit.landscape.paths import interpolate
from ccatoolkit.landscape.results import InterpolationResult, PlaneResult
from ccatoolkit.merging.api import RidgeSweep, align_to, ensemble, merge
from ccatoolkit.merging.graph import merge_graph
from ccatoolkit.zoo.cache import load_or_create
from ccatoolkit.zoo.training import evaluate

__all__ = [
    "CCA_METHODS", "CorrelationContext", "MergeContext", "AlphaContext", "CurveContext", "NModelsContext",
    "correlation_views", "merge_accuracy", "alpha_point", "curve_point", "n_models_accuracy", "activation_layers",
    "best_methods", "model_subsets", "merge_code_digest", "MergeResultStore", "precompute_ridges",
]

CCA_METHODS = ("cca", "cca_multiview")


def activation_layers(model: nn.Module) -> list[str]:
    """The layers a layer dropdown offers: each hidden space's capture layer (post-activation), in forward order."""
    return [space.capture[0] for space in merge_graph(model) if space.capture]


def _accuracy(model: nn.Module, data: Iterable[Any]) -> float:
    return float(evaluate(model, data)["accuracy"])


@functools.lru_cache(maxsize=1)
def merge_code_digest() -> str:
    """SHA-256 of the source that computes a merged model's accuracy (merging, analysis, evaluation).

    Part of the key of every cached merge result, so a result is only read back by the code that
    computed it: any change to the merge code computes it again.
    """
    root = Path(__file__).resolve().parents[1]
    files = sorted([*(root / "merging").rglob("*.py"), *(root / "analysis").rglob("*.py"),
                    root / "zoo" / "training.py", root / "_utils.py"])
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass
class MergeResultStore:
    """Merged models' test accuracies kept on disk (the zoo's cache folder), so a notebook's second run reads them.

    The key holds everything a number depends on: each model's weights, the statistics and test data
    (digests of their tensors), the method and its options, the device, and the merge code itself
    (:func:`merge_code_digest`). So ``make prefetch`` makes a workshop's run fast, and a changed
    model, data set or library computes afresh. ``enabled=False`` computes every time.
    """

    enabled: bool = True
    loaded: int = 0  # accuracies read back rather than computed
    _digests: dict[int, str] = field(default_factory=dict, repr=False)  # by id(): the caller keeps the objects

    def _digest(self, obj: Any, make: Callable[[Any], str]) -> str:
        if id(obj) not in self._digests:
            self._digests[id(obj)] = make(obj)
        return self._digests[id(obj)]

    def accuracy(self, models: Sequence[nn.Module], data: Iterable[Any], test_data: Iterable[Any], method: str,
                 options: Mapping[str, Any], compute: Callable[[], float]) -> float:
        """``compute()`` (the test accuracy of ``models`` merged by ``method``), or its stored value."""
        if not self.enabled:
            return compute()
        key = {
            "method": method, "options": repr(sorted(options.items())), "device": str(model_device(models[0])),
            "models": [self._digest(m, state_digest) for m in models], "data": self._digest(data, describe_data),
            "test": self._digest(test_data, describe_data), "code": merge_code_digest(),
        }
        computed = []

        def create() -> dict[str, torch.Tensor]:
            computed.append(True)
            return {"accuracy": torch.tensor(float(compute()), dtype=torch.float64)}

        value = load_or_create("merge-accuracy", key, create)
        self.loaded += not computed
        return float(value["accuracy"])


# --------------------------------------------------------------------------- 02: correlations


@dataclass
class CorrelationContext:
    """Models to compare neuron by neuron, the data for their activation statistics, and the layers offered.

    ``pairs`` are pairs of keys of ``models`` (default: each model against the first).
    """

    models: Mapping[str, nn.Module]
    data: Iterable[Any]
    layers: Sequence[str] = ()
    pairs: Sequence[tuple[str, str]] = ()
    cache: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = list(self.models)
        if len(names) < 2:
            raise ValueError(f"a correlation widget needs at least two models, got {len(names)}")
        if not self.layers:
            self.layers = activation_layers(self.models[names[0]])
        if not self.pairs:
            self.pairs = [(names[0], n) for n in names[1:]]
        self.pairs = [tuple(p) for p in self.pairs]
        for a, b in self.pairs:
            if a not in self.models or b not in self.models:
                raise ValueError(f"pair {(a, b)} names a model that is not one of {names}")

    def aligned(self, pair: tuple[str, str], method: str) -> nn.Module:
        """Model ``pair[1]`` aligned to ``pair[0]`` by ``method`` (``"none"`` leaves it as is); cached."""
        a, b = pair
        if method == "none":
            return self.models[b]
        key = ("aligned", a, b, method)
        if key not in self.cache:
            self.cache[key] = align_to(self.models[a], self.models[b], method=method, data=self.data, progress=False)
        return self.cache[key]


_VIEWS = (("none", "original"), ("permute", "after permutation alignment"), ("cca", "after CCA alignment"))


def correlation_views(ctx: CorrelationContext, layer: str, pair: tuple[str, str] | None = None) -> dict[str, np.ndarray]:
    """The correlation matrices of ``layer`` between the pair's models: original, permuted and CCA-aligned B (cached)."""
    pair = tuple(pair) if pair is not None else ctx.pairs[0]
    if layer not in ctx.layers:
        raise ValueError(f"unknown layer {layer!r}; choose one of: {', '.join(ctx.layers)}")
    views: dict[str, np.ndarray] = {}
    for method, label in _VIEWS:
        key = ("corr", pair, layer, method)
        if key not in ctx.cache:
            corr = correlation_matrix(ctx.models[pair[0]], ctx.aligned(pair, method), ctx.data, layer, progress=False)
            ctx.cache[key] = np.asarray(corr.detach().cpu() if hasattr(corr, "detach") else corr, dtype=np.float64)
        views[label] = ctx.cache[key]
    return views


# --------------------------------------------------------------------------- 03: merging two models


@dataclass
class MergeContext:
    """Models to merge, data for their statistics (``data``) and for evaluation (``test_data``).

    Both are read once into lists of batches: every merge and evaluation (a ridge slider's) reuses the
    batches instead of collating them again.
    """

    models: Sequence[nn.Module]
    data: Iterable[Any]
    test_data: Iterable[Any]
    methods: Sequence[str] = ("average", "permute", "permute_weight", "cca", "ensemble")
    names: Sequence[str] = ()
    cache: dict[Any, float] = field(default_factory=dict)
    sweeps: dict[str, RidgeSweep] = field(default_factory=dict)  # per CCA method: statistics kept across ridges
    disk_cache: bool = True  # keep each merge's accuracy on disk too (:class:`MergeResultStore`)
    store: MergeResultStore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise ValueError(f"merging needs at least two models, got {len(self.models)}")
        self.data, self.test_data = list(self.data), list(self.test_data)
        self.store = MergeResultStore(enabled=self.disk_cache)
        if not self.names:
            self.names = [f"model {chr(ord('A') + i)}" for i in range(len(self.models))]

    def endpoints(self) -> dict[str, float]:
        """The accuracies of the input models (cached)."""
        out = {}
        for name, model in zip(self.names, self.models):
            key = ("endpoint", name)
            if key not in self.cache:
                self.cache[key] = _accuracy(model, self.test_data)
            out[name] = self.cache[key]
        return out


def _merge_key(method: str, ridge: float | str) -> tuple[str, float | str | None]:
    if method not in CCA_METHODS:
        return (method, None)
    return (method, ridge if isinstance(ridge, str) else round(float(ridge), 6))


def merge_accuracy(ctx: MergeContext, method: str, ridge: float | str = "auto") -> float:
    """Test accuracy of the models merged by ``method`` (the CCA methods use ``ridge``: a number, or
    ``"auto"``, merge's label-free choice); cached.

    A numeric ridge goes through the method's :class:`~ccatoolkit.merging.api.RidgeSweep` (made at the
    first one): the statistics and eigendecompositions are reused, so a new ridge costs the solve,
    the averaging and the evaluation only.
    """
    key = _merge_key(method, ridge)
    if key not in ctx.cache:
        models = list(ctx.models)
        options = {"ridge": key[1]} if method in CCA_METHODS else {}

        def run() -> float:
            if method == "ensemble":
                merged = ensemble(models)
            elif method in CCA_METHODS and not isinstance(ridge, str):
                if method not in ctx.sweeps:
                    ctx.sweeps[method] = RidgeSweep(models, method=method, data=ctx.data)
                merged = ctx.sweeps[method](float(ridge))
            else:
                merged = merge(models, method=method, data=ctx.data, progress=False, **options)
            return _accuracy(merged, ctx.test_data)

        ctx.cache[key] = ctx.store.accuracy(models, ctx.data, ctx.test_data, method, options, run)
    return ctx.cache[key]


def precompute_ridges(ctx: MergeContext, ridges: Sequence[float], progress: bool = True) -> int:
    """Merge with every CCA method of ``ctx`` at each of ``ridges`` ahead of time (:func:`merge_accuracy`).

    A widget's ridge slider then only looks results up: a new ridge costs a CCA solve, the averaging,
    REPAIR's passes and an evaluation (about 1.5 s for two 3 x 512 MLPs on 2 CPU cores), paid here once,
    and the results stay in the disk store for later runs. Returns how many merges were computed
    (0 when all were cached).
    """
    todo = [(m, float(r)) for m in ctx.methods if m in CCA_METHODS for r in ridges
            if _merge_key(m, float(r)) not in ctx.cache]
    before = ctx.store.loaded
    for method, ridge in progress_bar(todo, progress, desc="CCA merges for the ridge slider"):
        merge_accuracy(ctx, method, ridge)
    return len(todo) - (ctx.store.loaded - before)


# --------------------------------------------------------------------------- 04: along alpha


@dataclass
class AlphaContext:
    """Paths from model A to B, one per alignment method, each evaluated once on a grid of alphas.

    ``curves`` are :func:`ccatoolkit.landscape.interpolate` results made with ``confusion=True`` (so
    each grid point has its confusion matrix) on one alpha grid; their labels name the methods a
    widget offers. Everything a slider shows is in them: moving it only looks a point up.
    :meth:`from_models` evaluates the paths itself.
    """

    curves: Sequence[InterpolationResult]
    label: str = "A to B"
    class_names: Sequence[str] | None = None  # axis labels of the confusion matrix (default: class indices)

    def __post_init__(self) -> None:
        self.curves = list(self.curves)
        if not self.curves:
            raise ValueError("no paths: pass interpolate(..., confusion=True) results, one per method")
        for c in self.curves:
            if c.confusion is None:
                raise ValueError(f"path {c.label!r} has no confusion matrices: make it with interpolate(..., confusion=True)")
        if not all(np.allclose(c.alphas, self.curves[0].alphas) for c in self.curves):
            raise ValueError("the paths are evaluated on different alpha grids; use one grid for all")
        labels = [c.label for c in self.curves]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two paths share a label: {labels}")

    @classmethod
    def from_models(cls, model_a: nn.Module, model_b: nn.Module, test_data: Iterable[Any],
                    methods: Sequence[str | None] = (None,), alphas: int | Sequence[float] = 21,
                    align_data: Iterable[Any] | None = None, bn_data: Iterable[Any] | None = None,
                    progress: bool = False, **kwargs: Any) -> "AlphaContext":
        """Evaluate the path from ``model_a`` to ``model_b`` aligned by each of ``methods`` (None: not aligned)."""
        reset = has_batchnorm(model_a)
        curves = [interpolate(model_a, model_b, test_data, alphas=alphas, align=m, align_data=align_data,
                              reset_bn=reset, bn_data=bn_data, confusion=True, progress=progress) for m in methods]
        return cls(curves, **kwargs)

    @property
    def methods(self) -> list[str]:
        """The paths' labels, in order: what the method control offers."""
        return [c.label for c in self.curves]

    @property
    def alphas(self) -> np.ndarray:
        """The grid every path was evaluated on."""
        return np.asarray(self.curves[0].alphas, dtype=np.float64)

    def curve(self, method: str | None = None) -> InterpolationResult:
        """The path labelled ``method`` (None: the last, usually the aligned one the notebook is about)."""
        if method is None:
            return self.curves[-1]
        for c in self.curves:
            if c.label == method:
                return c
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(self.methods)}")


def alpha_point(ctx: AlphaContext, alpha: float, method: str | None = None) -> dict[str, Any]:
    """Accuracy, loss and confusion counts of the model at ``alpha`` on ``method``'s path: a grid look-up.

    ``alpha`` must be a grid point (within 1e-6); the point's model is never evaluated again.
    """
    curve = ctx.curve(method)
    grid = np.asarray(curve.alphas, dtype=np.float64)
    i = int(np.argmin(np.abs(grid - float(alpha))))
    if abs(grid[i] - float(alpha)) > 1e-6:
        raise ValueError(f"alpha {alpha} is not on the grid; choose one of: {', '.join(f'{a:g}' for a in grid)}")
    assert curve.confusion is not None
    return dict(alpha=float(grid[i]), index=i, method=curve.label, accuracy=float(curve.accuracy[i]),
                loss=float(curve.loss[i]), confusion=curve.confusion[i])


# --------------------------------------------------------------------------- 05: a point of a learned curve


@dataclass
class CurveContext:
    """A learned curve, the loss plane through its ends and control point, and test data for the model at ``t``.

    ``plane`` is ``loss_plane(A, B', control)`` (labels in that order); ``paths`` are results along t
    (e.g. the curve's and the straight line's) drawn behind the marker; ``bn_data`` is needed for
    BatchNorm models.
    """

    curve: Curve
    plane: PlaneResult
    test_data: Iterable[Any]
    paths: Sequence[Any] = ()
    bn_data: Iterable[Any] | None = None
    cache: dict[float, dict[str, Any]] = field(default_factory=dict)


def curve_point(ctx: CurveContext, t: float) -> dict[str, Any]:
    """The model at ``t`` on the curve: its test loss and accuracy and its coordinates on the plane (cached)."""
    key = round(float(t), 6)
    if key not in ctx.cache:
        result = evaluate(ctx.curve.model_at(key, bn_data=ctx.bn_data), ctx.test_data)
        weights = curve_coefficients(ctx.curve.kind, [key])[0]  # on (A, control, B)
        xy = np.array([weights[0], weights[2], weights[1]]) @ np.asarray(ctx.plane.coords, dtype=np.float64)
        ctx.cache[key] = dict(t=key, accuracy=float(result["accuracy"]), loss=float(result["loss"]), xy=xy)
    return ctx.cache[key]


# --------------------------------------------------------------------------- 06: N models


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
                    return _accuracy(ensemble(models), ctx.test_data)
                merged = merge(models, method=method, data=ctx.data_for(split), progress=False, **options)
                return _accuracy(merged, ctx.test_data)

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
