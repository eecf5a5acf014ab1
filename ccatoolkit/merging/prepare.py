"""The first step of a merge: check the inputs and decide, once, what the transforms act on.

:func:`prepare` refuses wrong input with a message naming the fix, reads the merge data's batches
when ``max_batches`` asks for a fixed subset, picks the reference, traces the merge graph and makes
the one folding decision (:func:`folding`): a method whose maps mix channels acts on copies of the
models with each BatchNorm folded into the layer that feeds it, which is exact
(:mod:`ccatoolkit.merging.folding`). The result is a frozen :class:`Prepared` record that every later
step reads; ``merge``, ``align_to`` and ``RidgeSweep`` share it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ccatoolkit._utils import (
    batch_inputs,
    check_data,
    check_finite_parameters,
    check_max_batches,
    check_same_architecture,
    has_batchnorm,
    peek_first,
    to_model,
)
from ccatoolkit.merging.folding import fold_batchnorm, foldable_batchnorms, folded_graph
from ccatoolkit.merging.graph import MergeGraph, merge_graph
from ccatoolkit.merging.methods import Method
from ccatoolkit.zoo.training import evaluate

__all__ = ["Prepared", "prepare", "check_models", "check_ridge", "require_data", "first_batches", "traced_graph",
           "folding", "identical"]


def check_models(models: Sequence[nn.Module], min_models: int = 2) -> list[nn.Module]:
    """``models`` as a list, refused unless there are enough modules of one architecture with finite weights."""
    if isinstance(models, nn.Module):
        raise TypeError("pass a list of models, e.g. merge([model_a, model_b], ...)")
    models = list(models)
    if len(models) < min_models:
        raise ValueError(f"need at least {min_models} models to merge, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"model {i} is a {type(m).__name__}, not an nn.Module")
    check_same_architecture(models)
    check_finite_parameters(models)
    return models


def check_ridge(value: Any, name: str = "ridge") -> float:
    """``value`` as a float, refused (naming ``name``) unless it is a finite number >= 0 (not a boolean)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number >= 0 or 'auto', got the boolean {value!r} (True is not a ridge)")
    try:
        ridge = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number >= 0 or 'auto', got {value!r}") from None
    if not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (e.g. 0.1, or ridge='auto'), got {value!r}")
    return ridge


def require_data(data: Any, method: str, what: str = "activation statistics") -> None:
    """Refuse a missing ``data`` for a step that reads it, naming the step."""
    if data is None:
        raise ValueError(
            f"method {method!r} needs data for {what}: pass data=<a DataLoader or iterable of batches> "
            "(training data)"
        )


def first_batches(data: Iterable[Any], max_batches: int | None) -> list[Any]:
    """The first ``max_batches`` batches of ``data`` (all when None), read once into a list."""
    return list(itertools.islice(iter(data), check_max_batches(max_batches)))


def _fixed_batches(data: Iterable[Any] | None, max_batches: int | None) -> Iterable[Any] | None:
    """With ``max_batches``, :func:`first_batches`, so that every pass (statistics, ridge choice, BatchNorm,
    REPAIR) sees the same batches: a shuffling DataLoader would give each pass another subset. Without it,
    ``data`` itself (every pass sees all of it)."""
    if data is None or max_batches is None:
        return data
    return first_batches(data, max_batches)


def traced_graph(
    model: nn.Module, graph: MergeGraph | None, data: Iterable[Any] | None
) -> tuple[MergeGraph, Iterable[Any] | None]:
    """``(graph, data)``: the given graph or one traced with an example from ``data``.

    Use the returned ``data`` afterwards: a one-shot iterator comes back with its first batch chained
    in front, so the statistics never miss it.
    """
    if graph is not None:
        return graph, data
    example = None
    if getattr(model, "config", None) is None and data is not None:
        first, data = peek_first(data)
        example = to_model(batch_inputs(first)[:2], model)
    return merge_graph(model, example_input=example), data


def identical(models: Sequence[nn.Module]) -> bool:
    """Whether every model's state equals the first's, tensor for tensor (then their merge is that model)."""
    first = models[0].state_dict()
    return all(
        other.keys() == first.keys() and all(torch.equal(first[k], other[k]) for k in first)
        for other in (m.state_dict() for m in models[1:])
    )


def folding(method: Method, model: nn.Module, graph: MergeGraph) -> dict[str, str]:
    """``{batchnorm: producer}`` to fold before ``method``'s transforms act (the one folding decision).

    Permutations move BatchNorm parameters exactly; a map that mixes channels cannot be carried by a
    per-channel BatchNorm, so each foldable one is folded into its producer first (exact in eval mode)."""
    if method.mixes_channels and has_batchnorm(model):
        return foldable_batchnorms(model, graph)
    return {}


def _reference_index(models: list[nn.Module], reference: Any, val_data: Any) -> int:
    if isinstance(reference, (int, np.integer)) and not isinstance(reference, bool):
        index = int(reference)
        if not -len(models) <= index < len(models):
            raise ValueError(f"reference index {index} out of range for {len(models)} models")
        return index % len(models)
    if reference == "first":
        return 0
    if reference == "best":
        if val_data is None:
            raise ValueError("reference='best' picks the model with the best validation accuracy: pass val_data")
        return int(np.argmax([evaluate(m, val_data)["accuracy"] for m in models]))
    raise ValueError(f"reference must be 'first', 'best' or a model index, got {reference!r}")


@dataclass(frozen=True)
class Prepared:
    """A checked merge: what every later step reads.

    ``sources`` are what the transforms act on (copies with the ``folded`` BatchNorm layers folded, sharing
    every unchanged tensor with the models, or the models themselves) and ``transform_graph`` the graph
    they act through; ``data`` is the merge data as every pass reads it.
    """

    method: Method
    models: list[nn.Module]
    reference: int
    graph: MergeGraph
    data: Any
    max_batches: int | None
    folded: dict[str, str]
    sources: list[nn.Module]
    transform_graph: MergeGraph


def prepare(
    method: Method, models: list[nn.Module], data: Any, *, reference: Any = "first", val_data: Any = None,
    max_batches: int | None = None, graph: MergeGraph | None = None,
) -> Prepared:
    """Check the data (re-iterable: a merge makes several passes) and the reference, trace the graph, fold."""
    for what, given in (("data", data), ("val_data", val_data)):
        if given is not None:
            check_data(given, what, reiterable=True)
    data = _fixed_batches(data, max_batches)
    ref = _reference_index(models, reference, val_data)
    if method.statistics:
        require_data(data, method.name)
    graph, data = traced_graph(models[ref], graph, data)
    if not graph.spaces and method.name != "average":
        raise ValueError(f"the merge graph of {type(models[ref]).__name__} has no hidden space to align, so method "
                         f"{method.name!r} has nothing to do: use method='average' (or pass graph=MergeGraph.from_spec"
                         "(...) naming the spaces)")
    folded = folding(method, models[ref], graph)
    sources = [fold_batchnorm(m, folded, share_unchanged=True) for m in models] if folded else list(models)
    transform_graph = folded_graph(graph, folded) if folded else graph
    return Prepared(method, models, ref, graph, data, max_batches, folded, sources, transform_graph)
