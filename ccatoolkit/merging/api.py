"""Merge models of one architecture: ``merge(models, method=..., data=...)``, ``align_to``, ``ensemble``.

Pipeline of :func:`merge`: check the models, derive the merge graph, collect activation statistics
of all models jointly (once), compute per-space ``(out, inp)`` transforms for every model
(:mod:`ccatoolkit.merging.align`), transform and average the weights, then re-estimate BatchNorm
statistics (``reset_bn``) and optionally REPAIR the channel statistics. The merged model is a deep
copy of the reference model with the merged state loaded; no input model is changed.

Methods (``METHODS``):

* ``average``: plain weight averaging (no alignment).
* ``permute`` (alias ``permute_activation``): activation matching, Hungarian on the correlation
  between the reference's and each model's neurons.
* ``permute_weight``: Git Re-Basin weight matching (no data needed for the alignment itself).
* ``zipit``: ZipIt! feature merging across all models (``allow_within_model=True`` by default).
* ``cca``: CCA Merge, each model mapped into the reference's space by regularised CCA.
* ``cca_multiview``: all models mapped to a jointly estimated MAXVAR CCA space, expressed in the
  reference's neuron units (see :func:`ccatoolkit.merging.align.cca.multiview_cca_transforms`).
* ``ensemble``: output averaging (returns an :class:`Ensemble`, the target merging tries to reach).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ccatoolkit._utils import batch_inputs, check_same_architecture, has_batchnorm
from ccatoolkit.analysis.stats import JointStats, collect_statistics
from ccatoolkit.merging.align.cca import cca_transform, multiview_cca_transforms
from ccatoolkit.merging.align.permutation import match_activations, permutation_transform, weight_matching
from ccatoolkit.merging.align.zipit import zipit_transforms
from ccatoolkit.merging.graph import MergeGraph, merge_graph
from ccatoolkit.merging.normalization import channel_stats, repair_endpoints, reset_bn_stats
from ccatoolkit.merging.normalization import repair as repair_model
from ccatoolkit.merging.transform import apply_transforms
from ccatoolkit.zoo.training import evaluate

__all__ = [
    "METHODS",
    "DEFAULT_RIDGE",
    "RIDGE_GRID",
    "Ensemble",
    "ensemble",
    "merge",
    "align_to",
    "alignment_transforms",
]

METHODS: tuple[str, ...] = ("average", "permute", "permute_weight", "zipit", "cca", "cca_multiview", "ensemble")
_ALIASES = {"permute_activation": "permute", "activation": "permute", "weight": "permute_weight"}
DEFAULT_RIDGE = 1e-2
RIDGE_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
_STATS_METHODS = {"permute", "zipit", "cca", "cca_multiview"}
_OPTIONS = {"allow_within_model", "max_iter", "seed", "ridge_grid", "repair_passes"}
_RIDGE_METHODS = {"cca", "cca_multiview"}

Transforms = dict[str, tuple[torch.Tensor, torch.Tensor]]


# --- ensemble ---------------------------------------------------------------------------------------


class Ensemble(nn.Module):
    """Output averaging: ``forward`` returns ``log(mean_k softmax(model_k(x)))`` (log-probabilities).

    Works with cross-entropy losses and ``argmax`` predictions like a single classifier's logits.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(copy.deepcopy(m) for m in models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(x), dim=-1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))


def ensemble(models: Sequence[nn.Module]) -> Ensemble:
    """An :class:`Ensemble` of copies of ``models`` (the inputs are not shared or modified)."""
    models = _check_models(models, min_models=1)
    return Ensemble(models)


# --- helpers ----------------------------------------------------------------------------------------


def _check_models(models: Sequence[nn.Module], min_models: int = 2) -> list[nn.Module]:
    if isinstance(models, nn.Module):
        raise TypeError("pass a list of models, e.g. merge([model_a, model_b], ...)")
    models = list(models)
    if len(models) < min_models:
        raise ValueError(f"need at least {min_models} models to merge, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"model {i} is a {type(m).__name__}, not an nn.Module")
    check_same_architecture(models)
    return models


def _canonical_method(method: str) -> str:
    key = str(method).lower()
    key = _ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(
            f"unknown merge method {method!r}; valid methods are: {', '.join(METHODS)} "
            "(and the alias 'permute_activation')"
        )
    return key


def _check_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise TypeError(f"unknown merge option(s) {', '.join(unknown)}; valid options are: {', '.join(sorted(_OPTIONS))}")


def _first_inputs(data: Iterable[Any] | None) -> torch.Tensor | None:
    if data is None:
        return None
    for batch in data:
        return batch_inputs(batch)
    raise ValueError("the data gave no batches; pass a non-empty DataLoader or iterable of batches")


def _graph(model: nn.Module, graph: MergeGraph | None, data: Iterable[Any] | None) -> MergeGraph:
    if graph is not None:
        return graph
    example = None
    if getattr(model, "config", None) is None:
        x = _first_inputs(data)
        example = None if x is None else x[:2]
    return merge_graph(model, example_input=example)


def _require_data(data: Any, method: str, what: str = "activation statistics") -> None:
    if data is None:
        raise ValueError(
            f"method {method!r} needs data for {what}: pass data=<a DataLoader or iterable of batches> "
            "(training data)"
        )


def _accuracy(model: nn.Module, val_data: Iterable[Any]) -> float:
    return float(evaluate(model, val_data)["accuracy"])


def _reference_index(models: list[nn.Module], reference: Any, val_data: Any) -> int:
    if isinstance(reference, (int, np.integer)) and not isinstance(reference, bool):
        idx = int(reference)
        if not -len(models) <= idx < len(models):
            raise ValueError(f"reference index {idx} out of range for {len(models)} models")
        return idx % len(models)
    if reference == "first":
        return 0
    if reference == "best":
        if val_data is None:
            raise ValueError("reference='best' picks the model with the best validation accuracy: pass val_data")
        scores = [_accuracy(m, val_data) for m in models]
        return int(np.argmax(scores))
    raise ValueError(f"reference must be 'first', 'best' or a model index, got {reference!r}")


def _stats(
    models: list[nn.Module], graph: MergeGraph, data: Any, max_batches: int | None, progress: bool
) -> dict[str, JointStats]:
    layers = {s.name: list(s.capture) for s in graph.spaces}
    return collect_statistics(models, data, layers, max_batches=max_batches, progress=progress, warn=False)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def _pair(out: np.ndarray, inp: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(out, dtype=torch.float64), torch.as_tensor(inp, dtype=torch.float64)


def _compute_transforms(
    method: str,
    models: list[nn.Module],
    ref: int,
    graph: MergeGraph,
    stats: dict[str, JointStats] | None,
    ridge: float,
    options: dict[str, Any],
) -> list[Transforms | None]:
    """Per model, ``{space: (out, inp)}`` into the merged space (None: the model is used as it is)."""
    n = len(models)
    result: list[Transforms | None] = [None] * n
    if method == "average":
        return result
    if method == "permute_weight":
        ref_state = models[ref].state_dict()
        for k in range(n):
            if k != ref:
                perms = weight_matching(
                    ref_state, models[k].state_dict(), graph,
                    max_iter=int(options.get("max_iter", 100)), seed=int(options.get("seed", 0)),
                )
                result[k] = {s: _pair(*permutation_transform(p)) for s, p in perms.items()}
        return result
    assert stats is not None
    per: list[Transforms] = [{} for _ in range(n)]
    for space in graph.spaces:
        st = stats[space.name]
        if method == "permute":
            for k in range(n):
                if k != ref:
                    per[k][space.name] = _pair(*permutation_transform(match_activations(_np(st.corr(ref, k)))))
        elif method == "cca":
            S_aa = _np(st.cov(ref, ref))
            for k in range(n):
                if k != ref:
                    out, inp = cca_transform(S_aa, _np(st.cov(k, k)), _np(st.cov(ref, k)), ridge=ridge)
                    per[k][space.name] = _pair(out, inp)
        elif method == "cca_multiview":
            covs = [[_np(st.cov(i, j)) for j in range(n)] for i in range(n)]
            for k, (out, inp) in enumerate(multiview_cca_transforms(covs, reference=ref, ridge=ridge)):
                if k != ref:
                    per[k][space.name] = _pair(out, inp)
        elif method == "zipit":
            corr = np.block([[_np(st.corr(i, j)) for j in range(n)] for i in range(n)])
            pairs = zipit_transforms(
                corr, n, allow_within_model=bool(options.get("allow_within_model", True)), reference=ref
            )
            for k, (out, inp) in enumerate(pairs):
                per[k][space.name] = _pair(out, inp)
        else:  # pragma: no cover - guarded by _canonical_method
            raise ValueError(method)
    for k in range(n):
        if per[k]:
            result[k] = per[k]
    return result


def _transformed(models: list[nn.Module], graph: MergeGraph, transforms: list[Transforms | None]) -> list[nn.Module]:
    return [m if t is None else apply_transforms(m, graph, t) for m, t in zip(models, transforms)]


def _average_state(models: list[nn.Module], ref: int) -> dict[str, torch.Tensor]:
    states = [m.state_dict() for m in models]
    merged = {}
    for key, value in states[ref].items():
        if torch.is_floating_point(value):
            merged[key] = torch.stack([s[key].to(torch.float64) for s in states]).mean(0).to(value.dtype)
        else:
            merged[key] = value.clone()
    return merged


def _repair_targets(
    method: str,
    models: list[nn.Module],
    graph: MergeGraph,
    transforms: list[Transforms | None],
    data: Any,
    max_batches: int | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """REPAIR targets per pre-activation module: the endpoints' statistics seen in the merged space.

    Alignment methods: the mean over models of the channel mean/std of ``out_k @ y_k`` (model k's
    pre-activations mapped by its transform; exact for permutations). ZipIt: each merged channel's
    target is the average of its group members' means/stds (``sum_k M_k @ stat_k``).
    """
    endpoints = repair_endpoints(models[0], graph)
    n = len(models)
    sums: dict[str, list[torch.Tensor]] = {}
    for k, model in enumerate(models):
        t = transforms[k]
        matrix: dict[str, torch.Tensor] = {}
        if t is not None and method != "zipit":
            for space, names in endpoints.items():
                if space in t:
                    matrix.update({name: t[space][0] for name in names})
        stats = channel_stats(model, [m for ns in endpoints.values() for m in ns], data, max_batches,
                              transform=matrix)
        for space, names in endpoints.items():
            for name in names:
                mean, std = stats[name]
                if method == "zipit" and t is not None and space in t:
                    M = t[space][0].to(mean.device, torch.float64)  # N * M_k
                    mean, std = M @ mean, M @ std
                acc = sums.setdefault(name, [torch.zeros_like(mean), torch.zeros_like(std)])
                acc[0] += mean / n
                acc[1] += std / n
    return {name: (v[0], v[1]) for name, v in sums.items()}


def _finish(
    merged: nn.Module,
    method: str,
    models: list[nn.Module],
    graph: MergeGraph,
    transforms: list[Transforms | None],
    data: Any,
    reset_bn: bool,
    repair: bool,
    max_batches: int | None,
    progress: bool,
    repair_passes: int | None = None,
) -> nn.Module:
    if reset_bn and has_batchnorm(merged):
        _require_data(data, method, "the BatchNorm reset (or pass reset_bn=False)")
        merged = reset_bn_stats(merged, data, max_batches=max_batches, progress=progress)
    if repair:
        _require_data(data, method, "REPAIR")
        targets = _repair_targets(method, models, graph, transforms, data, max_batches)
        merged = repair_model(merged, None, data, graph, max_batches=max_batches, progress=progress, targets=targets,
                              max_passes=repair_passes)
    return merged


def _merged_model(
    method: str, models: list[nn.Module], ref: int, graph: MergeGraph, transforms: list[Transforms | None]
) -> nn.Module:
    aligned = _transformed(models, graph, transforms)
    merged = copy.deepcopy(models[ref])
    merged.load_state_dict(_average_state(aligned, ref))
    return merged


# --- public API -------------------------------------------------------------------------------------


def merge(
    models: Sequence[nn.Module],
    method: str = "cca",
    data: Iterable[Any] | None = None,
    *,
    reference: str | int = "first",
    reset_bn: bool = True,
    repair: bool = False,
    ridge: float | str = DEFAULT_RIDGE,
    val_data: Iterable[Any] | None = None,
    max_batches: int | None = None,
    graph: MergeGraph | None = None,
    progress: bool = True,
    **options: Any,
) -> nn.Module:
    """Merge two or more models of one architecture into one model (a new object of the same class).

    ``data``: training batches for the activation statistics, the BatchNorm reset and REPAIR
    (at most ``max_batches`` batches each). ``reference``: the model whose neuron basis the others
    are aligned to ("first", "best" = best accuracy on ``val_data``, or an index). ``ridge``: CCA
    regularisation (``ridge * trace(S)/n * I``); ``"auto"`` picks from ``options['ridge_grid']``
    (default :data:`RIDGE_GRID`) by the merged model's accuracy on ``val_data`` (a validation split
    of the training data, never the test set). Other ``options``: ``allow_within_model`` (zipit),
    ``max_iter`` and ``seed`` (permute_weight), ``repair_passes`` (cap on REPAIR's passes over the
    data; default until converged). ``method="ensemble"`` returns :func:`ensemble`.

    The result carries ``merge_info`` (method, reference index, ridge and the ridge scores).
    """
    method = _canonical_method(method)
    _check_options(options)
    models = _check_models(models)
    if method == "ensemble":
        return ensemble(models)
    ref = _reference_index(models, reference, val_data)
    uses_ridge = method in _RIDGE_METHODS
    grid: Sequence[float]
    if isinstance(ridge, str):
        if ridge != "auto":
            raise ValueError(f"ridge must be a number >= 0 or 'auto', got {ridge!r}")
        if uses_ridge and val_data is None:
            raise ValueError(
                "ridge='auto' selects the ridge by validation accuracy: pass val_data=<a held-out validation "
                "split of the training data> (never the test set), or give a number such as ridge=1e-2"
            )
        grid = tuple(options.pop("ridge_grid", RIDGE_GRID)) if uses_ridge else (DEFAULT_RIDGE,)
    else:
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        grid = (float(ridge),)
    if method in _STATS_METHODS:
        _require_data(data, method)
    graph = _graph(models[ref], graph, data)
    stats = _stats(models, graph, data, max_batches, progress) if method in _STATS_METHODS else None
    scores: dict[float, float] = {}
    best: tuple[float, float, nn.Module] | None = None
    for r in grid:
        transforms = _compute_transforms(method, models, ref, graph, stats, r, options)
        merged = _merged_model(method, models, ref, graph, transforms)
        merged = _finish(merged, method, models, graph, transforms, data, reset_bn, repair, max_batches, progress,
                         options.get("repair_passes"))
        if len(grid) == 1:
            best = (r, float("nan"), merged)
            break
        scores[r] = _accuracy(merged, val_data)
        if best is None or scores[r] > best[1]:
            best = (r, scores[r], merged)
    assert best is not None
    merged = best[2]
    merged.merge_info = dict(  # type: ignore[assignment]
        method=method, reference=ref, ridge=best[0] if uses_ridge else None, ridge_scores=scores,
        reset_bn=reset_bn, repair=repair, num_models=len(models),
    )
    return merged


def alignment_transforms(
    reference: nn.Module,
    model: nn.Module,
    method: str = "cca",
    data: Iterable[Any] | None = None,
    *,
    ridge: float = DEFAULT_RIDGE,
    max_batches: int | None = None,
    graph: MergeGraph | None = None,
    progress: bool = True,
    **options: Any,
) -> Transforms:
    """``{space: (out, inp)}`` (float64 tensors) mapping ``model``'s features into ``reference``'s space.

    Methods: average (identities), permute / permute_activation, permute_weight, cca, cca_multiview
    (the two-model multi-view space expressed in the reference's units). ZipIt builds a new shared
    space rather than aligning one model to another: use ``merge(..., method="zipit")``.
    """
    method = _canonical_method(method)
    _check_options(options)
    if method in ("zipit", "ensemble"):
        raise ValueError(
            f"method {method!r} does not align one model into another's space; use merge(..., method={method!r}) "
            "or one of: average, permute, permute_weight, cca, cca_multiview"
        )
    if isinstance(ridge, str):
        raise ValueError("alignment_transforms needs a numeric ridge; ridge='auto' is available in merge()")
    models = _check_models([reference, model])
    graph = _graph(reference, graph, data)
    stats = None
    if method in _STATS_METHODS:
        _require_data(data, method)
        stats = _stats(models, graph, data, max_batches, progress)
    transforms = _compute_transforms(method, models, 0, graph, stats, float(ridge), options)[1]
    if transforms is None:
        eye = {s.name: torch.eye(s.size, dtype=torch.float64) for s in graph.spaces}
        return {name: (e, e.clone()) for name, e in eye.items()}
    return transforms


def align_to(
    reference: nn.Module,
    model: nn.Module,
    method: str = "cca",
    data: Iterable[Any] | None = None,
    *,
    reset_bn: bool = False,
    ridge: float = DEFAULT_RIDGE,
    max_batches: int | None = None,
    graph: MergeGraph | None = None,
    progress: bool = True,
    **options: Any,
) -> nn.Module:
    """``model`` aligned into ``reference``'s space (a new model; the inputs are not modified).

    Permutations keep the function exactly; CCA maps the features with a general linear transform
    (approximate through ReLUs). ``reset_bn=True`` re-estimates BatchNorm statistics of the aligned
    model on ``data`` (useful for CCA on BatchNorm networks).
    """
    graph = _graph(reference, graph, data)
    transforms = alignment_transforms(
        reference, model, method, data, ridge=ridge, max_batches=max_batches, graph=graph, progress=progress,
        **options,
    )
    aligned = apply_transforms(model, graph, transforms)
    if reset_bn and has_batchnorm(aligned):
        _require_data(data, method, "the BatchNorm reset")
        aligned = reset_bn_stats(aligned, data, max_batches=max_batches, progress=progress)
    return aligned
