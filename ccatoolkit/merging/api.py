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
* ``c2m3``: cycle-consistent weight matching of all models at once into one shared space (C2M3,
  Crisostomi et al. 2024; Frank-Wolfe, :mod:`ccatoolkit.merging.align.cycle`), data-free like
  ``permute_weight``; ``merge_info["cycle"]`` reports its iterations, gap and objective.
* ``zipit``: ZipIt! feature merging across all models (``allow_within_model=True`` by default).
* ``cca``: CCA Merge, each model mapped into the reference's space by regularised CCA.
* ``cca_multiview``: all models mapped to a jointly estimated MAXVAR CCA space, expressed in the
  reference's neuron units (see :func:`ccatoolkit.merging.align.cca.multiview_cca_transforms`).
* ``ensemble``: output averaging (returns an :class:`Ensemble`, the target merging tries to reach).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ccatoolkit._utils import (
    BATCHNORM_TYPES,
    batch_inputs,
    check_data,
    check_finite_parameters,
    check_same_architecture,
    eval_mode,
    has_batchnorm,
    peek_first,
    to_model,
)
from ccatoolkit.analysis.linalg import RidgePath, condition_number
from ccatoolkit.analysis.stats import JointStats, collect_statistics
from ccatoolkit.merging.align.cca import CCAProblem, multiview_cca_transforms
from ccatoolkit.merging.align.cycle import cycle_consistent_matching
from ccatoolkit.merging.align.permutation import (
    match_activations,
    match_linked_groups,
    permutation_matrix,
    weight_matching,
)
from ccatoolkit.merging.align.zipit import zipit_transforms
from ccatoolkit.merging.folding import fold_batchnorm, foldable_batchnorms, folded_graph
from ccatoolkit.merging.graph import MergeGraph, merge_graph
from ccatoolkit.merging.normalization import (
    channel_moments,
    channel_stats,
    mapped_channel_stats,
    repair_batchnorm,
    repair_endpoints,
    reset_bn_stats,
)
from ccatoolkit.merging.normalization import repair as repair_model
from ccatoolkit.merging.transform import apply_transforms, transformed_tensors
from ccatoolkit.zoo.training import evaluate

__all__ = [
    "METHODS",
    "DEFAULT_RIDGE",
    "RIDGE_GRID",
    "Ensemble",
    "ensemble",
    "merge",
    "RidgeSweep",
    "align_to",
    "alignment_transforms",
]

METHODS: tuple[str, ...] = (
    "average", "permute", "permute_weight", "c2m3", "zipit", "cca", "cca_multiview", "ensemble",
)
_ALIASES = {"permute_activation": "permute", "activation": "permute", "weight": "permute_weight"}
#: CCA's ridge when one is not chosen from data (``align_to``, or merge data too small to hold out batches).
DEFAULT_RIDGE = 0.1
#: The ridges ``ridge="auto"`` chooses from. 0.001 was never chosen on the tested models and merged worst;
#: 10 is chosen where the agreement score still rises at 1 (skewed-split ResNet20 pairs: 68.7 -> 69.9%).
RIDGE_GRID: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0)
#: Label-free ridge selection holds out every this-many-th batch of the merge data.
_HOLD_OUT_EVERY = 4
_BATCHNORM_PASSES = 1  # correction passes after BatchNorm layers are set to REPAIR's targets (see _Plan.finish)
#: Label-free rules for ``ridge="auto"`` (``options['ridge_rule']``); the first is the default.
_RIDGE_RULES = ("agreement", "correlation")
_STATS_METHODS = {"permute", "zipit", "cca", "cca_multiview"}
_OPTIONS = {"allow_within_model", "max_iter", "seed", "ridge_grid", "repair_passes", "ridge_rule"}
_RIDGE_METHODS = {"cca", "cca_multiview"}
_LINEAR_MAP_METHODS = {"cca", "cca_multiview", "zipit"}  # transforms that mix channels (not permutations)
#: A ridge below this meets an ill-conditioned covariance with a warning (CCA then amplifies noise).
_SMALL_RIDGE = 1e-6
#: Covariances of live channels with a larger condition number count as ill-conditioned.
_ILL_CONDITIONED = 1e6

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
    check_finite_parameters(models)
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


def _graph(
    model: nn.Module, graph: MergeGraph | None, data: Iterable[Any] | None
) -> tuple[MergeGraph, Iterable[Any] | None]:
    """``(graph, data)``: the given graph or one traced with an example from ``data``.

    Use the returned ``data`` afterwards: a one-shot iterator comes back with its first batch
    chained in front, so the statistics never miss it.
    """
    if graph is not None:
        return graph, data
    example = None
    if getattr(model, "config", None) is None and data is not None:
        first, data = peek_first(data)
        example = to_model(batch_inputs(first)[:2], model)
    return merge_graph(model, example_input=example), data


def _require_data(data: Any, method: str, what: str = "activation statistics") -> None:
    if data is None:
        raise ValueError(
            f"method {method!r} needs data for {what}: pass data=<a DataLoader or iterable of batches> "
            "(training data)"
        )


def _check_ridge(value: float, name: str = "ridge") -> float:
    """``value`` as a float, refused (naming ``name``) unless it is a finite number >= 0."""
    try:
        ridge = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number >= 0 or 'auto', got {value!r}") from None
    if not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (e.g. 0.1, or ridge='auto'), got {value!r}")
    return ridge


def _warn_if_unreliable(stats: dict[str, JointStats], method: str, ridge: float | None) -> None:
    """Warn when the statistics cannot support the transforms: fewer samples than channels, or
    (CCA with a ridge below ``_SMALL_RIDGE``) a covariance of live channels that is ill-conditioned."""
    for name, st in stats.items():
        st.warn_if_rank_deficient(ridge, space=name)
    if ridge is None or ridge >= _SMALL_RIDGE:
        return
    bad = []
    for name, st in stats.items():
        for k in range(st.num_models):
            alive = st.alive(k)
            cond = condition_number(st.cov(k)[alive][:, alive])
            if cond > _ILL_CONDITIONED:
                bad.append(f"{name!r} (model {k}: condition number {cond:.2g})")
    if bad:
        warnings.warn(
            f"{method} with ridge={ridge:g} on ill-conditioned covariances of {', '.join(bad)}: the inverse "
            "square roots amplify noise and the merge can be far worse than its models; use ridge='auto' "
            "(merge) or a ridge of at least 1e-3",
            RuntimeWarning,
            stacklevel=3,
        )


def _accuracy(model: nn.Module, val_data: Iterable[Any]) -> float:
    return float(evaluate(model, val_data)["accuracy"])


def _fixed_batches(data: Iterable[Any] | None, max_batches: int | None) -> Iterable[Any] | None:
    """With ``max_batches``, the first ``max_batches`` batches read once into a list, so that every pass
    (statistics, ridge choice, BatchNorm, REPAIR) sees the same batches: a shuffling DataLoader would
    give each pass a different subset. Without it, ``data`` itself (every pass sees all of it)."""
    if data is None or max_batches is None:
        return data
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 (or None for all), got {max_batches}")
    return list(itertools.islice(iter(data), max_batches))


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
    models: list[nn.Module], graph: MergeGraph, data: Any, max_batches: int | None, progress: bool,
    reference: int | None = None,
) -> dict[str, JointStats]:
    """The merge's activation statistics; with ``reference``, cross-only (enough for matching to it)."""
    layers = {s.name: list(s.capture) for s in graph.spaces}
    return collect_statistics(models, data, layers, max_batches=max_batches, progress=progress, warn=False,
                              reference=reference)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def _pair(out: np.ndarray, inp: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(out, dtype=torch.float64), torch.as_tensor(inp, dtype=torch.float64)


def _permutation_pair(perm: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, P^T)`` of a permutation, the inverse a view of ``P`` (a 4096-wide space's matrix is 134 MB:
    held once per model, not twice; transforms are read, never written)."""
    P = torch.as_tensor(permutation_matrix(perm), dtype=torch.float64)
    return P, P.T


def _weight_matching_inputs(
    models: list[nn.Module], ref: int, graph: MergeGraph
) -> tuple[list[dict[str, torch.Tensor]], set[str] | None]:
    """The state dicts weight matching compares, and which of their entries (None: its default).

    BatchNorm makes a conv's filters scale-free: their norms say little about what a channel does,
    and BatchNorm's own vectors say little about which channels correspond. So for BatchNorm
    networks each BatchNorm's scale is folded into its producer's rows (:mod:`ccatoolkit.merging.folding`)
    and only conv/linear weights enter the objective (measured on VGG11s: 48.7% -> 70.9% merged
    accuracy; adding the folded biases back gave 59.6%). The permutations found are applied to
    the original models, where they are exact.
    """
    states = [m.state_dict() for m in models]
    pairs = foldable_batchnorms(models[ref], graph) if has_batchnorm(models[ref]) else {}
    if not pairs:
        return states, None
    modules = dict(models[ref].named_modules())
    names = {  # the graph's weights other than BatchNorm's: the linear and conv layers'
        name for name in graph.param_spaces
        if name.endswith(".weight") and not isinstance(modules.get(name.rpartition(".")[0]), BATCHNORM_TYPES)
    }
    return [fold_batchnorm(m, pairs).state_dict() for m in models], names


def _compute_transforms(
    method: str,
    models: list[nn.Module],
    ref: int,
    graph: MergeGraph,
    stats: dict[str, JointStats] | None,
    ridge: float,
    options: dict[str, Any],
    cache: dict[Any, Any] | None = None,
    release_stats: bool = False,
) -> list[Transforms | None]:
    """Per model, ``{space: (out, inp)}`` into the merged space (None: the model is used as it is).

    ``cache``: a dict kept across calls on the same ``stats`` (a ridge grid): CCA's
    eigendecompositions are made once per layer and model, not once per ridge. ``release_stats``:
    each space's statistics are removed from ``stats`` once its transforms are made (the last use:
    a 4096-wide space's joint Gram matrix is 0.5 GB, so the next space is solved without it).
    """
    cache = {} if cache is None else cache
    n = len(models)
    result: list[Transforms | None] = [None] * n
    if method == "average":
        return result
    if method == "c2m3":  # all models into one universe at once: cycle-consistent by construction
        states, names = _weight_matching_inputs(models, ref, graph)
        perms, info = cycle_consistent_matching(states, graph, reference=ref, param_names=names,
                                                max_iter=int(options.get("max_iter", 100)))
        cache["cycle"] = info
        for k in range(n):
            if k != ref:
                result[k] = {s: _permutation_pair(p) for s, p in perms[k].items()}
        return result
    if method == "permute_weight":
        states, names = _weight_matching_inputs(models, ref, graph)
        for k in range(n):
            if k != ref:
                perms = weight_matching(
                    states[ref], states[k], graph, max_iter=int(options.get("max_iter", 100)),
                    seed=int(options.get("seed", 0)), param_names=names,
                )
                result[k] = {s: _permutation_pair(p) for s, p in perms.items()}
        return result
    assert stats is not None
    per: list[Transforms] = [{} for _ in range(n)]
    links = graph.group_links
    waiting: dict[tuple[str, int], dict[str, np.ndarray]] = {}  # a link's correlations until all its spaces are in
    for space in graph.spaces:
        st = stats.pop(space.name) if release_stats else stats[space.name]
        if method == "permute" or space.permutation_only:  # e.g. a depthwise conv: no channel mixing
            for k in range(n):
                if k == ref:
                    continue
                if not space.group_link:
                    per[k][space.name] = _permutation_pair(match_activations(_np(st.corr(ref, k)), space.groups))
                    continue
                # a grouped convolution's input and output: whole groups move too, the same on every linked space
                got = waiting.setdefault((space.group_link, k), {})
                got[space.name] = _np(st.corr(ref, k))
                names = links[space.group_link]
                if len(got) == len(names):
                    for name, perm in zip(names, match_linked_groups([got[m] for m in names], space.groups)):
                        per[k][name] = _permutation_pair(perm)
                    del waiting[(space.group_link, k)]
        elif method == "cca":
            for k in range(n):
                if k != ref:
                    key = ("cca", space.name, ref, k)
                    if key not in cache:
                        cache[key] = CCAProblem(st.cov(ref, ref), st.cov(k, k), st.cov(ref, k))  # on the stats' device
                    out, inp = cache[key].transform(ridge)
                    per[k][space.name] = (out, inp)
        elif method == "cca_multiview":
            covs = [[_np(st.cov(i, j)) for j in range(n)] for i in range(n)]
            key = ("paths", space.name)
            if key not in cache:
                cache[key] = [RidgePath(torch.as_tensor(covs[k][k])) for k in range(n)]
            pairs = multiview_cca_transforms(covs, reference=ref, ridge=ridge, ridge_paths=cache[key])
            for k, (out, inp) in enumerate(pairs):
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
            result[k] = {s.name: per[k][s.name] for s in graph.spaces if s.name in per[k]}  # graph order
    return result


def _average_into(
    merged: nn.Module, models: list[nn.Module], graph: MergeGraph, transforms: list[Transforms | None]
) -> None:
    """Set ``merged``'s floating-point state to the mean of the models' states after their transforms.

    Accumulates into ``merged``'s own tensors, one endpoint and one tensor at a time
    (:func:`~ccatoolkit.merging.transform.transformed_tensors`): memory holds ``merged`` and one
    transformed tensor, not a transformed model (a torchvision VGG11 is 0.5 GB). Integer buffers
    (e.g. BatchNorm's batch counter) stay as ``merged`` has them.
    """
    target = merged.state_dict()

    def accumulate(first: bool, key: str, value: torch.Tensor) -> None:
        if torch.is_floating_point(value):
            if first:
                target[key].copy_(value)
            else:
                target[key].add_(value.to(target[key].dtype))

    with torch.no_grad():
        for k, (model, t) in enumerate(zip(models, transforms)):
            changed = set()
            for key, value in transformed_tensors(model, graph, t) if t is not None else ():
                accumulate(k == 0, key, value)
                changed.add(key)
                del value  # dropped before the next transformed tensor is made
            for key, value in model.state_dict().items():
                if key not in changed:
                    accumulate(k == 0, key, value)
        for value in target.values():
            if torch.is_floating_point(value):
                value.div_(len(models))


def _repair_targets(
    method: str,
    models: list[nn.Module],
    graph: MergeGraph,
    transforms: list[Transforms | None],
    data: Any,
    max_batches: int | None,
    moments: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """REPAIR targets per pre-activation module: the endpoints' statistics seen in the merged space.

    ``moments``: each model's :func:`~ccatoolkit.merging.normalization.channel_moments` at these modules,
    measured once (a ridge sweep): the mapped statistics then follow in closed form, without a pass.

    Alignment methods: the mean over models of the channel mean/std of ``out_k @ y_k`` (model k's
    pre-activations mapped by its transform; exact for permutations). ZipIt: each merged channel's
    target is the average of its group members' means/stds (``sum_k M_k @ stat_k``). The
    statistics are those of the original models: a folded BatchNorm computes the same outputs.
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
        names = [m for ns in endpoints.values() for m in ns]
        if moments is not None:
            stats = {name: mapped_channel_stats(moments[k][name], matrix.get(name)) for name in names}
        else:
            stats = channel_stats(model, names, data, max_batches, transform=matrix)
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


@dataclass
class _Plan:
    """How one merge runs: the graph, what the transforms act on, and how statistics are repaired afterwards.

    ``folded`` maps each BatchNorm folded into its producer (non-permutation methods on BatchNorm
    networks, see :mod:`ccatoolkit.merging.folding`); ``sources`` are the models the transforms act
    on (folded copies or the models themselves) and ``transform_graph`` the graph they act through.
    """

    method: str
    models: list[nn.Module]
    ref: int
    graph: MergeGraph
    folded: dict[str, str]
    sources: list[nn.Module]
    transform_graph: MergeGraph
    data: Any
    reset_bn: bool
    repair: bool
    repair_explicit: bool  # repair=True was asked for (not the default)
    max_batches: int | None
    progress: bool
    options: dict[str, Any]
    moments: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None  # see _repair_targets
    scoring_batches: int | None = None  # batches for a ridge candidate's BatchNorm statistics (see finish)
    keep_moments: bool = True  # False for a merge's last model: the moments go once its targets are computed

    @classmethod
    def build(cls, method: str, models: list[nn.Module], ref: int, graph: MergeGraph, **kwargs: Any) -> _Plan:
        folded: dict[str, str] = {}
        if method in _LINEAR_MAP_METHODS and has_batchnorm(models[ref]):
            folded = foldable_batchnorms(models[ref], graph)
        sources = [fold_batchnorm(m, folded, share_unchanged=True) for m in models] if folded else list(models)
        transform_graph = folded_graph(graph, folded) if folded else graph
        return cls(method, models, ref, graph, folded, sources, transform_graph, **kwargs)

    def merged(self, transforms: list[Transforms | None], progress: bool | None = None, *,
               scoring: bool = False) -> nn.Module:
        """Transform, average and repair: the merged model for these transforms.

        ``scoring``: a candidate of the ridge selection, which only has to rank the ridges: BatchNorm layers
        get their targets without a correction pass (on ResNet20 pairs the same ridge is chosen), and their
        running statistics from the first ``scoring_batches`` batches (as many as are held out, a quarter;
        see :func:`_select_ridge` for what it changed). REPAIR's passes on other layers stay: capped at two,
        they changed an MLP pair's choice from 1.0 to 0.1.
        """
        targets = None
        if not self.keep_moments and self.moments is not None:  # a C x C matrix per module and model: gone
            targets = self.repair_targets(transforms)  # before the merged model is built (peak memory)
        merged = copy.deepcopy(self.models[self.ref])
        _average_into(merged, self.sources, self.transform_graph, transforms)
        return self.finish(merged, transforms, self.progress if progress is None else progress, scoring=scoring,
                           targets=targets)

    def repair_targets(self, transforms: list[Transforms | None]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """REPAIR's targets for these transforms (:func:`_repair_targets`; from the moments for the CCA methods).
        Without ``keep_moments`` the moments are freed once the targets are computed."""
        targets = _repair_targets(self.method, self.models, self.graph, transforms, self.data, self.max_batches,
                                  self.endpoint_moments())
        if not self.keep_moments:
            self.moments = None
        return targets

    def endpoint_moments(self) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]] | None:
        """Each model's channel moments at REPAIR's endpoints, for the dense maps of the CCA methods: one pass
        per model, after which every ridge's targets follow in closed form (:func:`_repair_targets`).
        None for the other methods, whose targets are sums moved by indexing (or ZipIt's averages)."""
        if self.moments is None and self.method in _RIDGE_METHODS:
            endpoints = [n for names in repair_endpoints(self.models[0], self.graph).values() for n in names]
            self.moments = [channel_moments(m, endpoints, self.data, self.max_batches) for m in self.models]
        return self.moments

    def finish(self, merged: nn.Module, transforms: list[Transforms | None], progress: bool,
               scoring: bool = False, targets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
               ) -> nn.Module:
        """Statistics that make sense after averaging (REPAIR, Jordan et al. 2023).

        Targets are the aligned models' average channel mean and std at each space's pre-activation
        modules. BatchNorm layers reach theirs in one pass (:func:`repair_batchnorm`; with neither
        folding nor REPAIR, a plain BatchNorm reset) and one correction pass (``repair_passes`` sets
        more; measured on a ResNet20 pair, 0 to 4 passes merged within 0.5 points of each other with
        cca and with zipit, the test set's noise); other layers need REPAIR's passes. ``targets``: REPAIR's
        targets when already computed (:meth:`repair_targets`). ``merged`` is this merge's own new model and
        is corrected in place: a large model (vgg11_bn, 0.5 GB) is never held twice.
        """
        endpoints = repair_endpoints(self.models[self.ref], self.graph)
        modules = dict(merged.named_modules())
        bn_endpoints = {n for names in endpoints.values() for n in names if isinstance(modules[n], BATCHNORM_TYPES)}
        other_endpoints = {n for names in endpoints.values() for n in names} - bn_endpoints
        has_bn = has_batchnorm(merged)
        # BatchNorm layers: folded ones (or any, when REPAIR was asked for) are set to the targets; permuted
        # ones keep their exactly moved parameters and get their running statistics re-estimated
        bn_targets = self.reset_bn and has_bn and bool(bn_endpoints) and (bool(self.folded) or self.repair_explicit)
        repair_only = None if (self.repair_explicit and not self.reset_bn) else sorted(other_endpoints)
        iterative = self.repair and (repair_only is None or bool(repair_only))
        passes = self.options.get("repair_passes")
        if (bn_targets or iterative) and targets is None:
            _require_data(self.data, self.method, "REPAIR (or pass repair=False)")
            targets = self.repair_targets(transforms)
        if self.reset_bn and has_bn:
            _require_data(self.data, self.method, "the BatchNorm reset (or pass reset_bn=False)")
            bn_batches = self.max_batches
            if scoring and self.scoring_batches is not None:
                bn_batches = min(self.scoring_batches, bn_batches or self.scoring_batches)
            if bn_targets:
                assert targets is not None
                bn_passes = 0 if scoring else (_BATCHNORM_PASSES if passes is None else int(passes))
                merged = repair_batchnorm(merged, {n: targets[n] for n in bn_endpoints}, self.data,
                                          max_batches=bn_batches, progress=progress, max_passes=bn_passes,
                                          inplace=True)
            else:
                merged = reset_bn_stats(merged, self.data, max_batches=bn_batches, progress=progress, inplace=True)
        if iterative:
            merged = repair_model(merged, None, self.data, self.graph, max_batches=self.max_batches,
                                  progress=progress, targets=targets, max_passes=passes, only=repair_only,
                                  inplace=True)
        return merged


@torch.no_grad()
def _agreement_scorer(models: list[nn.Module], held_out: Iterable[Any]) -> Any:
    """A function ``merged -> score``: how closely ``merged`` reproduces the ensemble on ``held_out`` (higher is better).

    Classifiers (2-D outputs with several columns): ``-KL(ensemble || merged)`` per sample, the
    ensemble being the average of the models' predicted distributions. Other outputs: minus the mean
    squared difference from the models' mean output. The ensemble's outputs are computed once.
    """
    inputs = [to_model(batch_inputs(b), models[0]) for b in held_out]
    with eval_mode(*models):
        outs = [torch.stack([m(x) for m in models]) for x in inputs]
    classifier = all(o.dim() == 3 and o.shape[-1] > 1 for o in outs)
    if classifier:
        targets = [torch.logsumexp(torch.log_softmax(o.double(), -1), 0) - math.log(len(models)) for o in outs]
    else:
        targets = [o.double().mean(0) for o in outs]
    count = sum(int(x.shape[0]) for x in inputs)

    @torch.no_grad()
    def score(merged: nn.Module) -> float:
        total = 0.0
        with eval_mode(merged):
            for x, target in zip(inputs, targets):
                out = merged(x).double()
                if classifier:
                    kl = (target.exp() * (target - torch.log_softmax(out, -1))).sum()
                    total -= float(kl)
                else:
                    total -= float(((out - target) ** 2).flatten(1).mean(1).sum())
        return total / max(count, 1)

    return score


def _held_out_correlation(
    held: dict[str, JointStats], graph: MergeGraph, ref: int, transforms: list[Transforms | None]
) -> float:
    """Mean correlation, on held-out statistics, between the reference's channels and the others' aligned ones.

    For model ``k``'s map ``T`` into the reference's space, channel ``i``'s correlation is
    ``(S_rk T^T)_ii / sqrt((S_rr)_ii (T S_kk T^T)_ii)`` from the held-out covariances: no forward
    pass and no merge. Averaged over channels, then over the spaces that admit any map and the
    models. A ridge too small fits the fitting batches' noise and aligns held-out features worse.
    """
    values = []
    for k, t in enumerate(transforms):
        if t is None or k == ref:
            continue
        for space in graph.spaces:
            if space.permutation_only or space.name not in t:
                continue
            st = held[space.name]
            T = t[space.name][0].to(st.cov(ref, ref).device, torch.float64)
            cross = (st.cov(ref, k) * T).sum(1)  # diag(S_rk T^T)
            var_t = ((T @ st.cov(k, k)) * T).sum(1)  # diag(T S_kk T^T)
            denom = torch.sqrt(st.var(ref).clamp_min(0) * var_t.clamp_min(0))
            corr = torch.where(denom > 0, cross / denom.clamp_min(1e-300), torch.zeros_like(cross))
            values.append(float(corr.mean()))
    return float(np.mean(values)) if values else 0.0


def _select_ridge(
    plan: _Plan, method: str, grid: Sequence[float], data: Any, val_data: Any, max_batches: int | None, progress: bool
) -> tuple[float, dict[float, float], str, dict[str, JointStats], nn.Module | None]:
    """``(ridge, scores, how, statistics of all the data, the merge with that ridge or None)`` for ``ridge="auto"``.

    With ``val_data``: the ridge whose merge has the best validation accuracy. Without: fit the
    transforms on 3 of every 4 batches of ``data`` and keep the ridge whose merge agrees best with
    the ensemble on the held-out batches (no labels needed); the final merge then uses all batches,
    so no candidate is the result. The split is made in one pass and the
    held-out batches are kept, so a shuffling DataLoader cannot mix the two parts. With fewer than
    4 batches there is nothing to hold out, and :data:`DEFAULT_RIDGE` is used.

    Scoring a whole merge costs its BatchNorm and REPAIR passes per candidate, which is slow on large
    models (a torchvision ResNet-50 on a CPU). A candidate's BatchNorm statistics therefore come from as
    many batches as are held out (:meth:`_Plan.finish`), a quarter of the pass. Measured on three pairs
    of Fashion-MNIST models (8 batches of 256, one thread, shared cores): ResNet20 chose the same ridge
    (1.0) in 3 of 3 pairs and merged to 76.7-78.7% as before, in 35-39 s instead of 43-65 s; VGG11
    (width 0.25, BatchNorm) chose another ridge in 2 of 3 pairs, where the candidates' scores differ
    by a few thousandths, and merged to 83.43% on average against 83.47% (every ridge merges VGG11
    within 0.3 points). ``options['ridge_rule'] = "correlation"`` scores the
    candidates by the held-out correlation of the aligned features instead
    (:func:`_held_out_correlation`), with no merge at all. It is cheaper but picks worse ridges:
    measured on notebook 7's ResNet-18s (Fashion-MNIST) it chose 0.01 and merged to 49.8% where the
    agreement rule chose 1.0 and merged to 72.8%; so agreement is the default.
    """
    models, ref, graph = plan.models, plan.ref, plan.graph
    if val_data is not None:
        stats = _stats(models, graph, data, max_batches, progress)
        scores: dict[float, float] = {}
        best: tuple[float, nn.Module] | None = None
        cache: dict[Any, Any] = {}
        for r in grid:  # on the statistics of all the data: the best candidate is the result
            merged = plan.merged(_compute_transforms(method, models, ref, graph, stats, r, plan.options, cache),
                                 False)
            scores[r] = _accuracy(merged, val_data)
            if best is None or scores[r] > scores[best[0]]:  # the first of equal scores wins, as max() picks it
                best = (r, merged)
        assert best is not None
        return best[0], scores, "validation accuracy", stats, best[1]
    held_out: list[Any] = []

    def fit_batches() -> Iterator[Any]:  # one pass: every 4th batch is kept aside, the others feed the statistics
        for i, batch in enumerate(itertools.islice(iter(data), max_batches)):
            if i % _HOLD_OUT_EVERY == _HOLD_OUT_EVERY - 1:
                held_out.append(batch)
            else:
                yield batch

    fit_stats = _stats(models, graph, fit_batches(), None, progress)
    if not held_out:
        return DEFAULT_RIDGE, {}, f"default (fewer than {_HOLD_OUT_EVERY} batches: none held out)", fit_stats, None
    rule = plan.options.get("ridge_rule") or _RIDGE_RULES[0]
    # the agreement rule reads the held-out batches' statistics only for the final merge: they are
    # collected after the candidates, so a wide model never holds two sets of joint Gram matrices with them
    held_stats = _stats(models, graph, held_out, None, False) if rule != "agreement" else None
    score = _agreement_scorer(models, held_out) if rule == "agreement" else None
    plan.scoring_batches = len(held_out)
    scores = {}
    cache: dict[Any, Any] = {}
    for r in grid:
        transforms = _compute_transforms(method, models, ref, graph, fit_stats, r, plan.options, cache)
        if score is None:
            assert held_stats is not None
            scores[r] = _held_out_correlation(held_stats, graph, ref, transforms)
        else:
            scores[r] = score(plan.merged(transforms, False, scoring=True))
        del transforms  # before the next candidate's are made (dense maps of every space)
    cache.clear()  # the eigendecompositions of the fitting statistics
    if held_stats is None:
        held_stats = _stats(models, graph, held_out, None, False)
    stats = {name: fit_stats.pop(name) + held_stats.pop(name) for name in list(fit_stats)}
    how = ("agreement with the ensemble on held-out batches" if rule == "agreement"
           else "correlation of the aligned features on held-out batches")
    return max(scores, key=scores.__getitem__), scores, how, stats, None


# --- public API -------------------------------------------------------------------------------------


@torch.inference_mode(False)  # called inside inference_mode: the result must still be a normal, trainable model
def merge(
    models: Sequence[nn.Module],
    method: str = "cca",
    data: Iterable[Any] | None = None,
    *,
    reference: str | int = "first",
    reset_bn: bool = True,
    repair: bool | None = None,
    ridge: float | str = "auto",
    val_data: Iterable[Any] | None = None,
    max_batches: int | None = None,
    graph: MergeGraph | None = None,
    progress: bool = True,
    **options: Any,
) -> nn.Module:
    """Merge two or more models of one architecture into one model (a new object of the same class).

    ``data``: training batches for the activation statistics, the BatchNorm statistics and REPAIR
    (at most ``max_batches`` batches each). ``reference``: the model whose neuron basis the others
    are aligned to ("first", "best" = best accuracy on ``val_data``, or an index).

    ``ridge`` (CCA methods): regularisation ``ridge * trace(S)/n * I``, or ``"auto"`` (the default):
    the value from ``options['ridge_grid']`` (default :data:`RIDGE_GRID`) whose merge agrees best
    with the ensemble on held-out batches of ``data`` (no labels needed; ``ridge_rule="correlation"``:
    whose aligned features correlate best with the reference's there, with no merge per candidate:
    cheaper, but measured worse, see :func:`_select_ridge`), or, with ``val_data``
    (a validation split of the training data, never the test set), whose merge is most accurate there.

    Statistics after averaging (REPAIR, Jordan et al. 2023): ``repair`` (default: on for every method
    but the ``average`` baseline) makes each merged pre-activation channel's mean and std the average
    of the aligned models' on layers without BatchNorm, by REPAIR's passes. ``reset_bn`` (default on)
    re-estimates BatchNorm statistics; BatchNorm layers that were folded (see below), or all of them
    with an explicit ``repair=True``, are set to the targets in one pass instead (weight and bias :=
    target std and mean). Measured on VGG11s: permutations merge better with the plain reset (80.3%
    against 76.7% with the targets), folded merges need the targets.
    Permutations move BatchNorm parameters exactly. The other methods (cca, cca_multiview, zipit) mix
    channels, which a per-channel BatchNorm cannot represent, so each BatchNorm is folded into the
    layer that feeds it before transforming (exact, :mod:`ccatoolkit.merging.folding`) and comes
    back neutral. Other ``options``: ``allow_within_model`` (zipit), ``max_iter`` and
    ``seed`` (permute_weight; ``max_iter`` also caps c2m3's Frank-Wolfe steps), ``repair_passes`` (cap on REPAIR's passes; BatchNorm layers set to their targets get 1 correction pass by default). ``method="ensemble"``
    returns :func:`ensemble`.

    Spaces that admit only permutations (``Space.permutation_only``, e.g. through a depthwise
    convolution) are aligned by activation matching whatever the method.

    The result carries ``merge_info``: method, reference index, the ridge, how it was chosen and the
    score of every candidate, the folded BatchNorm layers, the permutation-only spaces, and
    ``seconds``: wall-clock time per phase (``graph``; ``ridge_selection``, which includes its
    statistics and candidate merges; ``statistics``; ``alignment``; ``average_and_repair``).

    Checked up front: ``data`` and ``val_data`` must be re-iterable (a list of batches or a
    DataLoader; merge makes several passes), input weights finite, dtypes equal, ridges finite. A
    ``RuntimeWarning`` names the space when the statistics have fewer samples than channels, or
    when a ridge below 1e-6 meets an ill-conditioned covariance. Works inside ``torch.inference_mode()``.
    """
    method = _canonical_method(method)
    _check_options(options)
    models = _check_models(models)
    if method == "ensemble":
        return ensemble(models)
    grid = tuple(_check_ridge(r, "ridge_grid value") for r in options.pop("ridge_grid", RIDGE_GRID))
    if isinstance(ridge, str):
        if ridge != "auto":
            raise ValueError(f"ridge must be a number >= 0 or 'auto', got {ridge!r}")
    else:
        ridge = _check_ridge(ridge)
    clock = _PhaseClock()
    plan = _plan(method, models, data, reference, reset_bn, repair, val_data, max_batches, graph, progress, options)
    clock.lap("graph")
    uses_ridge = method in _RIDGE_METHODS
    scores: dict[float, float] = {}
    chosen: float | None = None
    how = None
    stats = None
    merged: nn.Module | None = None
    if uses_ridge and ridge == "auto":
        chosen, scores, how, stats, merged = _select_ridge(plan, method, grid, plan.data, val_data, max_batches, progress)
        clock.lap("ridge_selection")
    elif uses_ridge:
        chosen, how = float(ridge), "given"
    if stats is None and method in _STATS_METHODS:
        # activation matching compares each model with the reference only: cross-only statistics (a
        # quarter of the joint Gram of two models; vgg11_bn's 4096-wide spaces need 0.27 GB, not 1.07 GB)
        cross_only = plan.ref if method == "permute" else None
        stats = _stats(models, plan.graph, plan.data, max_batches, progress, reference=cross_only)
        clock.lap("statistics")
    if stats is not None:
        _warn_if_unreliable(stats, method, chosen)
    extra: dict[str, Any] = {}
    if merged is None:
        transforms = _compute_transforms(method, models, plan.ref, plan.graph, stats,
                                         chosen if chosen is not None else 0.0, options, extra, release_stats=True)
        clock.lap("alignment")
        stats = None  # the joint Gram matrices of wide layers are large: free them before the models are built
        plan.keep_moments = False  # and REPAIR's moments, once this merge's targets are computed
        merged = plan.merged(transforms)
        clock.lap("average_and_repair")
    return _with_info(merged, plan, chosen, how, scores, extra, clock.seconds)


class _PhaseClock:
    """Wall-clock seconds per phase of a merge, for ``merge_info["seconds"]``: where a slow merge spends its time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


def _plan(
    method: str, models: list[nn.Module], data: Any, reference: str | int, reset_bn: bool, repair: bool | None,
    val_data: Any, max_batches: int | None, graph: MergeGraph | None, progress: bool, options: dict[str, Any],
) -> _Plan:
    """The checks and set-up every merge makes before its statistics: data, reference, REPAIR default, graph."""
    for what, given in (("data", data), ("val_data", val_data)):
        if given is not None:
            check_data(given, what, reiterable=True)
    data = _fixed_batches(data, max_batches)
    ref = _reference_index(models, reference, val_data)
    repair_explicit = repair is True
    if repair is None:
        repair = method != "average"  # the baselines stay plain: average is what REPAIR is measured against
    if method in _STATS_METHODS:
        _require_data(data, method)
    if options.get("ridge_rule") is not None and options["ridge_rule"] not in _RIDGE_RULES:
        raise ValueError(f"ridge_rule must be one of {_RIDGE_RULES}, got {options['ridge_rule']!r}")
    graph, data = _graph(models[ref], graph, data)
    return _Plan.build(method, models, ref, graph, data=data, reset_bn=reset_bn, repair=repair,
                       repair_explicit=repair_explicit, max_batches=max_batches, progress=progress, options=options)


def _with_info(merged: nn.Module, plan: _Plan, ridge: float | None, how: str | None, scores: dict[float, float],
               extra: dict[str, Any], seconds: dict[str, float] | None = None) -> nn.Module:
    """``merged`` with its ``merge_info``: method, reference, ridge and how it was chosen, folding, permutation-only
    spaces, and the seconds spent per phase."""
    merged.merge_info = dict(  # type: ignore[assignment]
        method=plan.method, reference=plan.ref, ridge=ridge, ridge_selection=how, ridge_scores=scores,
        reset_bn=plan.reset_bn, repair=plan.repair, num_models=len(plan.models), folded_batchnorm=sorted(plan.folded),
        permutation_only={s.name: s.permutation_only for s in plan.graph.spaces if s.permutation_only},
        seconds=dict(seconds or {}),
    )
    if "cycle" in extra:  # c2m3: Frank-Wolfe's iterations, final gap and objective
        merged.merge_info["cycle"] = extra["cycle"]
    return merged


class RidgeSweep:
    """Merges of the same models by a CCA method at many ridges: ``sweep(ridge)`` is ``merge(..., ridge=ridge)``.

    What does not depend on the ridge is done once, when the sweep is made: the checks, the merge
    graph, the activation statistics and the moments REPAIR's targets are mapped from
    (:func:`~ccatoolkit.merging.normalization.channel_moments`); each layer's eigendecompositions are
    kept after the first ridge (the cache of :class:`~ccatoolkit.merging.align.cca.CCAProblem`). A new
    ridge reruns only the CCA solve, the averaging and REPAIR's passes on the merged model, so a
    widget's ridge slider answers in a fraction of a full merge. ``data``'s batches are read into
    memory once; they and the statistics stay as long as the sweep does.
    """

    def __init__(self, models: Sequence[nn.Module], method: str = "cca", data: Iterable[Any] | None = None, *,
                 reference: str | int = "first", reset_bn: bool = True, repair: bool | None = None,
                 max_batches: int | None = None, graph: MergeGraph | None = None, progress: bool = False,
                 **options: Any) -> None:
        method = _canonical_method(method)
        if method not in _RIDGE_METHODS:
            raise ValueError(f"a ridge sweep needs a CCA method ({', '.join(sorted(_RIDGE_METHODS))}), got {method!r}")
        _check_options(options)
        options.pop("ridge_grid", None)
        models = _check_models(models)
        if data is not None:  # read once: REPAIR's passes at every ridge reuse the batches
            check_data(data, "data", reiterable=True)
            data = list(itertools.islice(iter(data), max_batches))
        self.plan = _plan(method, models, data, reference, reset_bn, repair, None, max_batches, graph, progress,
                          options)
        self.stats = _stats(models, self.plan.graph, self.plan.data, max_batches, progress)
        if self.plan.repair or (reset_bn and has_batchnorm(models[0])):  # REPAIR's targets, without a pass per ridge
            self.plan.endpoint_moments()
        self._cache: dict[Any, Any] = {}

    def __call__(self, ridge: float) -> nn.Module:
        """The merged model at ``ridge`` (a number >= 0; the same model ``merge`` gives for it)."""
        ridge = _check_ridge(ridge)
        plan = self.plan
        _warn_if_unreliable(self.stats, plan.method, ridge)
        clock = _PhaseClock()
        transforms = _compute_transforms(plan.method, plan.models, plan.ref, plan.graph, self.stats, ridge,
                                         plan.options, self._cache)
        clock.lap("alignment")
        merged = plan.merged(transforms)
        clock.lap("average_and_repair")
        return _with_info(merged, plan, ridge, "given", {}, {}, clock.seconds)


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
    ridge = _check_ridge(ridge)
    models = _check_models([reference, model])
    if data is not None:
        check_data(data)
    data = _fixed_batches(data, max_batches)
    graph, data = _graph(reference, graph, data)
    stats = None
    if method in _STATS_METHODS:
        _require_data(data, method)
        stats = _stats(models, graph, data, max_batches, progress)
        _warn_if_unreliable(stats, method, ridge if method in _RIDGE_METHODS else None)
    transforms = _compute_transforms(method, models, 0, graph, stats, float(ridge), options)[1]
    if transforms is None:
        eye = {s.name: torch.eye(s.size, dtype=torch.float64) for s in graph.spaces}
        return {name: (e, e.clone()) for name, e in eye.items()}
    return transforms


@torch.inference_mode(False)  # called inside inference_mode: the result must still be a normal, trainable model
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
    (approximate through ReLUs). On BatchNorm networks a CCA map is applied with each BatchNorm folded
    into the layer before it (exact, see :mod:`ccatoolkit.merging.folding`); the aligned model then
    has neutral BatchNorm layers. ``reset_bn=True`` gives them statistics again: re-estimated on
    ``data`` for permutations, and for CCA set to the model's own channel mean and std as seen
    through the transform (so the aligned model's layers keep the scale they had).

    ``data`` may be a one-shot iterator unless ``reset_bn`` needs a second pass over it.
    """
    method = _canonical_method(method)
    _check_models([reference, model])
    if data is not None:
        check_data(data, reiterable=reset_bn and has_batchnorm(model) and method in _STATS_METHODS)
    data = _fixed_batches(data, max_batches)
    graph, data = _graph(reference, graph, data)
    transforms = alignment_transforms(
        reference, model, method, data, ridge=ridge, max_batches=max_batches, graph=graph, progress=progress,
        **options,
    )
    folded = foldable_batchnorms(model, graph) if method in _LINEAR_MAP_METHODS and has_batchnorm(model) else {}
    source = fold_batchnorm(model, folded) if folded else model
    aligned = apply_transforms(source, folded_graph(graph, folded) if folded else graph, transforms)
    if reset_bn and has_batchnorm(aligned):
        _require_data(data, method, "the BatchNorm reset")
        if folded:
            targets = _repair_targets(method, [model], graph, [transforms], data, max_batches)
            aligned = repair_batchnorm(aligned, {n: t for n, t in targets.items() if n in folded}, data,
                                       max_batches=max_batches, progress=progress)
        else:
            aligned = reset_bn_stats(aligned, data, max_batches=max_batches, progress=progress)
    return aligned
