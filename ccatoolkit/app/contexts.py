"""What the notebooks' widgets work on: a *context* per widget (models, data, a cache) and the numbers it shows.

A context holds the models and data of one widget plus a cache of what was computed, so moving a
control back is instant. The functions here compute (correlations, merged accuracies, the model at
a point of a path); :mod:`ccatoolkit.app.render` draws them and :mod:`ccatoolkit.app.controls`
wires ipywidgets to the drawing. All computation goes through the library (``merge``,
``align_to``, ``correlation_matrix``, ``interpolated_model``, ``predict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from torch import nn

from ccatoolkit._utils import progress_bar
from ccatoolkit.analysis.stats import correlation_matrix
from ccatoolkit.landscape.curves import Curve, curve_coefficients
from ccatoolkit.landscape.points import interpolated_model
from ccatoolkit.landscape.results import PlaneResult
from ccatoolkit.merging.api import align_to, ensemble, merge
from ccatoolkit.merging.graph import merge_graph
from ccatoolkit.plots.analysis import confusion_matrix
from ccatoolkit.zoo.training import evaluate, predict

__all__ = [
    "CCA_METHODS", "CorrelationContext", "MergeContext", "AlphaContext", "CurveContext", "NModelsContext",
    "correlation_views", "merge_accuracy", "alpha_point", "curve_point", "n_models_accuracy", "activation_layers",
    "best_methods",
]

CCA_METHODS = ("cca", "cca_multiview")


def activation_layers(model: nn.Module) -> list[str]:
    """The layers a layer dropdown offers: each hidden space's capture layer (post-activation), in forward order."""
    return [space.capture[0] for space in merge_graph(model) if space.capture]


def _accuracy(model: nn.Module, data: Iterable[Any]) -> float:
    return float(evaluate(model, data)["accuracy"])


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
    """Models to merge, data for their statistics (``data``) and for evaluation (``test_data``)."""

    models: Sequence[nn.Module]
    data: Iterable[Any]
    test_data: Iterable[Any]
    methods: Sequence[str] = ("average", "permute", "permute_weight", "cca", "ensemble")
    names: Sequence[str] = ()
    cache: dict[Any, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise ValueError(f"merging needs at least two models, got {len(self.models)}")
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
    ``"auto"``, merge's label-free choice); cached."""
    key = _merge_key(method, ridge)
    if key not in ctx.cache:
        if method == "ensemble":
            merged = ensemble(list(ctx.models))
        else:
            options = {"ridge": ridge} if method in CCA_METHODS else {}
            merged = merge(list(ctx.models), method=method, data=ctx.data, progress=False, **options)
        ctx.cache[key] = _accuracy(merged, ctx.test_data)
    return ctx.cache[key]


# --------------------------------------------------------------------------- 04: along alpha


@dataclass
class AlphaContext:
    """Two end models (B already aligned to A if wanted), test data, optional curves to draw behind the marker.

    ``curves`` are interpolation results (``ccatoolkit.landscape.InterpolationResult``) drawn as accuracy
    along alpha; ``bn_data`` (training batches) is needed for BatchNorm models.
    """

    model_a: nn.Module
    model_b: nn.Module
    test_data: Iterable[Any]
    curves: Sequence[Any] = ()
    bn_data: Iterable[Any] | None = None
    label: str = "A to B"
    class_names: Sequence[str] | None = None  # axis labels of the confusion matrix (default: class indices)
    cache: dict[float, dict[str, Any]] = field(default_factory=dict)


def alpha_point(ctx: AlphaContext, alpha: float) -> dict[str, Any]:
    """Accuracy, loss, predictions and confusion matrix of the model at ``alpha`` on the test data (cached)."""
    key = round(float(alpha), 6)
    if key not in ctx.cache:
        model = interpolated_model([ctx.model_a, ctx.model_b], [1.0 - key, key], bn_data=ctx.bn_data)
        targets, preds, loss = predict(model, ctx.test_data)
        num_classes = int(max(targets.max(), preds.max()) + 1)
        head = getattr(model, "head", None)
        if isinstance(head, nn.Linear):
            num_classes = head.out_features
        ctx.cache[key] = dict(alpha=key, accuracy=float((targets == preds).mean()), loss=loss,
                              confusion=confusion_matrix(targets, preds, num_classes))
    return ctx.cache[key]


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


@dataclass
class NModelsContext:
    """Zoos of models per data split (``zoos[split]`` a list), merged N at a time by each method.

    ``data[split]`` gives the statistics data for a split (or one iterable for all splits);
    ``test_data`` is where merged models are evaluated. Results are filled lazily into ``results``
    (``results[split][method][N]``) or all at once by :meth:`compute`.
    """

    zoos: Mapping[str, Sequence[nn.Module]]
    data: Mapping[str, Iterable[Any]] | Iterable[Any]
    test_data: Iterable[Any]
    methods: Sequence[str] = ("average", "permute", "zipit", "cca", "ensemble")
    ns: Sequence[int] = ()
    ridge: float | str = "auto"
    progress: bool = False
    results: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.zoos:
            raise ValueError("zoos is empty; pass a dict split name -> list of models")
        smallest = min(len(z) for z in self.zoos.values())
        if smallest < 2:
            raise ValueError("every split needs at least two models to merge")
        if not self.ns:
            self.ns = list(range(2, smallest + 1))
        if max(self.ns) > smallest or min(self.ns) < 2:
            raise ValueError(f"ns must lie in [2, {smallest}] (the smallest zoo), got {list(self.ns)}")

    def data_for(self, split: str) -> Iterable[Any]:
        if isinstance(self.data, Mapping):
            return self.data[split]
        return self.data

    def compute(self) -> dict[str, dict[str, dict[int, float]]]:
        """Fill every (split, method, N) accuracy; returns ``results``."""
        cells = [(s, m, n) for s in self.zoos for m in self.methods for n in self.ns]
        iterator: Iterable[Any] = cells
        if self.progress:
            iterator = progress_bar(cells, desc="merging N models")
        for split, method, n in iterator:
            n_models_accuracy(self, n, method, split)
        return self.results


def n_models_accuracy(ctx: NModelsContext, n: int, method: str, split: str | None = None) -> float:
    """Test accuracy of the first ``n`` models of ``split`` merged by ``method`` (cached in ``ctx.results``)."""
    split = split if split is not None else next(iter(ctx.zoos))
    if split not in ctx.zoos:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(ctx.zoos)}")
    if method not in ctx.methods:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(ctx.methods)}")
    if n not in ctx.ns:
        raise ValueError(f"N={n} is not offered; choose one of: {list(ctx.ns)}")
    table = ctx.results.setdefault(split, {}).setdefault(method, {})
    if n not in table:
        models = list(ctx.zoos[split][:n])
        if method == "ensemble":
            merged = ensemble(models)
        else:
            options = {"ridge": ctx.ridge} if method in CCA_METHODS else {}
            merged = merge(models, method=method, data=ctx.data_for(split), progress=False, **options)
        table[n] = _accuracy(merged, ctx.test_data)
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
