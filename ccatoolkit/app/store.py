"""Results the notebooks compute kept on disk, keyed by everything they depend on, the code included.

Merged models' accuracies (:class:`MergeResultStore`) and paths, curves' paths and loss planes
(:class:`LandscapeStore`). A notebook's second run (or a workshop prepared with ``make prefetch``)
reads them back instead of computing them again; a changed model, data set or library computes afresh.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ccatoolkit._utils import model_device
from ccatoolkit.zoo.cache import describe_data, load_or_create, source_digest, state_digest

__all__ = ["merge_code_digest", "landscape_code_digest", "MergeResultStore", "LandscapeStore"]


def merge_code_digest() -> str:
    """SHA-256 of the source that computes a merged model's accuracy (merging, analysis, evaluation).

    Part of the key of every cached merge result, so a result is only read back by the code that
    computed it: any change to the merge code computes it again.
    """
    return source_digest("merging", "analysis")


def landscape_code_digest() -> str:
    """SHA-256 of the source behind paths and planes (landscape, merging for REPAIR and alignment, analysis)."""
    return source_digest("landscape", "merging", "analysis")


@dataclass
class _DiskStore:
    """What both stores share: the switch, the count of results read back, and digests made once per object."""

    enabled: bool = True
    loaded: int = 0  # results read back rather than computed
    _digests: dict[int, str] = field(default_factory=dict, repr=False)  # by id(): the caller keeps the objects

    def _digest(self, obj: Any, make: Callable[[Any], str]) -> str:
        if id(obj) not in self._digests:
            self._digests[id(obj)] = make(obj)
        return self._digests[id(obj)]

    def _load(self, kind: str, key: dict[str, Any], create: Callable[[], Any]) -> Any:
        """``load_or_create(kind, key, create)``, counting in :attr:`loaded` whether it was read back."""
        computed = []

        def make() -> Any:
            computed.append(True)
            return create()

        value = load_or_create(kind, key, make)
        self.loaded += not computed
        return value


@dataclass
class MergeResultStore(_DiskStore):
    """Merged models' test accuracies kept on disk (the zoo's cache folder), so a notebook's second run reads them.

    The key holds everything a number depends on: each model's weights, the statistics and test data
    (digests of their tensors), the method and its options, the device, and the merge code itself
    (:func:`merge_code_digest`). So ``make prefetch`` makes a workshop's run fast, and a changed
    model, data set or library computes afresh. ``enabled=False`` computes every time.
    """

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
        value = self._load("merge-accuracy", key,
                           lambda: {"accuracy": torch.tensor(float(compute()), dtype=torch.float64)})
        return float(value["accuracy"])


def _option_key(name: str, value: Any, digest: Callable[[Any], str]) -> Any:
    """A JSON-able stand-in for one keyword argument of a cached call (data sets by their digest, an attack by
    its settings); raises ``TypeError`` for what cannot be keyed (a callable, a model)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray) or isinstance(value, torch.Tensor):
        return np.asarray(value).tolist()
    if isinstance(value, (tuple, list)) and all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    if name.endswith("data"):
        return digest(value)
    if name == "attack" and callable(getattr(value, "key", None)):  # a PGD attack: its settings (zoo.adversarial)
        return value.key()
    raise TypeError(f"{name}={type(value).__name__} cannot be part of a cache key")


_RESULTS: dict[str, type] = {}


def _result_classes() -> dict[str, type]:
    if not _RESULTS:
        from ccatoolkit.landscape.curves import CurveResult
        from ccatoolkit.landscape.results import InterpolationResult, PlaneResult

        _RESULTS.update({c.__name__: c for c in (InterpolationResult, CurveResult, PlaneResult)})
    return _RESULTS


def _to_record(result: Any) -> dict[str, Any]:
    """A result data class as tensors, strings and numbers (what ``load_or_create`` stores safely)."""
    record: dict[str, Any] = {"class": type(result).__name__}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        record[f.name] = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    return record


def _from_record(record: Mapping[str, Any]) -> Any:
    fields = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in record.items() if k != "class"}
    return _result_classes()[record["class"]](**fields)


@dataclass
class LandscapeStore(_DiskStore):
    """Paths, curves' paths and loss planes kept on disk, as :class:`MergeResultStore` keeps accuracies.

    Each method takes the arguments of the library call it stands for and returns what that call returns;
    the key holds the models' weights, the data (digests), every other argument but ``progress``, and the
    code behind them (:func:`landscape_code_digest`). An argument that cannot be keyed (an ``align``
    callable) computes without the cache. ``enabled=False`` computes every time.
    """

    def _cached(self, kind: str, models: Sequence[nn.Module], data: Iterable[Any], options: Mapping[str, Any],
                compute: Callable[[], Any]) -> Any:
        if not self.enabled:
            return compute()
        try:
            keyed = {k: _option_key(k, v, lambda d: self._digest(d, describe_data))
                     for k, v in sorted(options.items()) if k != "progress"}
        except TypeError:
            return compute()
        key = {"kind": kind, "models": [state_digest(m) for m in models], "data": self._digest(data, describe_data),
               "options": keyed, "device": str(model_device(models[0])), "code": landscape_code_digest()}
        return _from_record(self._load(f"landscape-{kind}", key, lambda: _to_record(compute())))

    def interpolate(self, model_a: nn.Module, model_b: nn.Module, data: Iterable[Any], **options: Any) -> Any:
        """:func:`ccatoolkit.landscape.paths.interpolate`, cached."""
        from ccatoolkit.landscape.paths import interpolate

        return self._cached("path", [model_a, model_b], data, options,
                            lambda: interpolate(model_a, model_b, data, **options))

    def loss_plane(self, model_a: nn.Module, model_b: nn.Module, model_c: nn.Module, data: Iterable[Any],
                   **options: Any) -> Any:
        """:func:`ccatoolkit.landscape.paths.loss_plane`, cached."""
        from ccatoolkit.landscape.paths import loss_plane

        return self._cached("plane", [model_a, model_b, model_c], data, options,
                            lambda: loss_plane(model_a, model_b, model_c, data, **options))

    def evaluate_curve(self, curve: Any, data: Iterable[Any], **options: Any) -> Any:
        """``curve.evaluate(data, **options)`` (:meth:`ccatoolkit.landscape.curves.Curve.evaluate`), cached."""
        start, end = curve.end_models()
        keyed = {**options, "curve_method": curve.method}  # the result's label names it
        return self._cached(f"curve-{curve.kind}", [start, curve.control_model(), end], data, keyed,
                            lambda: curve.evaluate(data, **options))
