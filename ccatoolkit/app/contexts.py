"""What the notebooks' widgets work on: a *context* per widget (models, data, a cache) and the numbers it shows.

The N-model experiment (notebooks 3, 6 and 7) is :mod:`ccatoolkit.app.experiments`; merged accuracies are
kept on disk by :mod:`ccatoolkit.app.store`.

A context holds the models and data of one widget plus a cache of what was computed, so moving a
control back is instant; what a slider runs through is computed ahead (the alpha paths on their
whole grid, CCA's statistics for the ridge slider), so a move only looks up or re-solves. The
functions here compute (correlations, merged accuracies, points of a path);
:mod:`ccatoolkit.app.render` draws them and :mod:`ccatoolkit.app.controls` wires ipywidgets to the
drawing. All computation goes through the library (``merge``, ``RidgeSweep``, ``align_to``,
``correlation_matrix``, ``interpolate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from torch import nn

from ccatoolkit._utils import has_batchnorm, progress_bar
from ccatoolkit.analysis.stats import correlation_matrix
from ccatoolkit.app.store import MergeResultStore
from ccatoolkit.landscape.curves import Curve, curve_coefficients
from ccatoolkit.landscape.paths import interpolate
from ccatoolkit.landscape.results import InterpolationResult, PlaneResult
from ccatoolkit.merging.api import RidgeSweep, align_to, ensemble, merge
from ccatoolkit.merging.graph import merge_graph
from ccatoolkit.merging.methods import REGISTRY
from ccatoolkit.zoo.training import evaluate

__all__ = [
    "CCA_METHODS", "CorrelationContext", "MergeContext", "AlphaContext", "CurveContext", "correlation_views",
    "merge_accuracy", "alpha_point", "curve_point", "activation_layers", "precompute_ridges",
]

#: The methods with a ridge (a ridge slider), from the method registry.
CCA_METHODS = tuple(name for name, method in REGISTRY.items() if method.uses_ridge)


def activation_layers(model: nn.Module) -> list[str]:
    """The layers a layer dropdown offers: each hidden space's capture layer (post-activation), in forward order."""
    return [space.capture[0] for space in merge_graph(model) if space.capture]


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
                self.cache[key] = evaluate(model, self.test_data)["accuracy"]
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
            return evaluate(merged, ctx.test_data)["accuracy"]

        ctx.cache[key] = ctx.store.accuracy(models, ctx.data, ctx.test_data, method, options, run)
    return ctx.cache[key]


def precompute_ridges(ctx: MergeContext, ridges: Sequence[float], progress: bool = True) -> int:
    """Merge with every CCA method of ``ctx`` at each of ``ridges`` ahead of time (:func:`merge_accuracy`).

    A widget's ridge slider then only looks results up: a new ridge costs a CCA solve, the averaging,
    REPAIR's passes and an evaluation (longer than a slider move may take), paid here once, and the
    results stay in the disk store for later runs. Returns how many merges were computed
    (0 when all were cached).
    """
    todo = [(m, float(r)) for m in ctx.methods if m in CCA_METHODS for r in ridges
            if _merge_key(m, float(r)) not in ctx.cache]
    before = ctx.store.loaded
    for method, ridge in progress_bar(todo, progress and bool(todo), desc="CCA merges for the ridge slider"):  # no empty bar
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
