"""Merge models of one architecture: ``merge``, ``RidgeSweep``, ``align_to``, ``alignment_transforms``, ``ensemble``.

A merge runs five steps, each in its own module: :mod:`~ccatoolkit.merging.prepare` (check the inputs,
trace the graph, fold BatchNorm where the maps mix channels), :mod:`~ccatoolkit.merging.statistics` (joint
activation statistics, one pass), :mod:`~ccatoolkit.merging.ridge` (CCA's ridge, chosen without labels),
:mod:`~ccatoolkit.merging.methods` (the method's transforms) and :mod:`~ccatoolkit.merging.combine`
(average, then restore the statistics). The merged model is a new model; no input model is changed.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ccatoolkit._utils import PhaseClock, check_data, check_max_batches, has_batchnorm
from ccatoolkit.analysis.linalg import as_dense
from ccatoolkit.analysis.stats import JointStats
from ccatoolkit.merging.combine import candidate_builder, merged_model, repair_targets_for, restoration, with_merge_info
from ccatoolkit.merging.ensembling import Ensemble, ensemble
from ccatoolkit.merging.folding import fold_batchnorm, folded_graph
from ccatoolkit.merging.graph import MergeGraph
from ccatoolkit.merging.methods import REGISTRY, AlignmentProblem, Transforms, aligning_method, get_method
from ccatoolkit.merging.normalization import RepairTargets, repair_batchnorm, reset_bn_stats
from ccatoolkit.merging.prepare import Prepared, check_models, check_ridge, first_batches, folding, prepare
from ccatoolkit.merging.prepare import identical, require_data, traced_graph
from ccatoolkit.merging.ridge import DEFAULT_RIDGE, RIDGE_GRID, RIDGE_RULES, check_ridge_setting
from ccatoolkit.merging.ridge import choose_ridge, problem_solver
from ccatoolkit.merging.refit import refit_input_maps
from ccatoolkit.merging.statistics import merge_statistics, warn_if_unreliable
from ccatoolkit.merging.transform import apply_transforms

__all__ = ["METHODS", "DEFAULT_RIDGE", "RIDGE_GRID", "Ensemble", "ensemble", "merge", "RidgeSweep", "align_to",
           "alignment_transforms", "AlignedFrom"]

METHODS: tuple[str, ...] = (*REGISTRY, "ensemble")


# over 60 lines for its signature and public docstring; the body is the five steps, one screen
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
    ridge_grid: Sequence[float] = RIDGE_GRID,
    ridge_rule: str = RIDGE_RULES[0],
    repair_passes: int | None = None,
    **options: Any,
) -> nn.Module:
    """Merge two or more models of one architecture into one model (a new object of the same class).

    ``data``: training batches for the activation statistics, the BatchNorm statistics and REPAIR
    (at most ``max_batches`` batches each; a list of batches or a DataLoader: a merge makes several
    passes). ``reference``: the model whose neuron basis the others are aligned to ("first", "best" =
    best accuracy on ``val_data``, or an index). ``method``: one of :data:`METHODS`; its own options
    are keyword arguments (``allow_within_model`` for zipit; ``max_iter`` and ``seed`` for
    permute_weight, ``max_iter`` for c2m3), and ``method="ensemble"`` returns :func:`ensemble`.

    ``ridge`` (CCA methods): regularisation ``ridge * trace(S)/n * I``, or ``"auto"`` (the default):
    the value from ``ridge_grid`` whose merge agrees best with the ensemble on held-out batches of
    ``data`` (no labels needed; ``ridge_rule="correlation"``: whose aligned features correlate best with
    the reference's there, with no merge per candidate: cheaper, measured worse), or, with ``val_data``
    (a validation split of the training data, never the test set), whose merge is most accurate there.

    After averaging (REPAIR, Jordan et al. 2023): ``repair`` (default: on for every method but the
    ``average`` baseline) makes each merged pre-activation channel's mean and std the average of the
    aligned models' on layers without BatchNorm (at most ``repair_passes`` passes). ``reset_bn``
    (default on) re-estimates BatchNorm statistics; BatchNorm layers that were folded, or all of them
    with an explicit ``repair=True``, are set to the targets instead. Permutations move BatchNorm
    parameters exactly; the methods whose maps mix channels (cca, cca_multiview, zipit) fold each
    BatchNorm into the layer that feeds it first (exact, :mod:`ccatoolkit.merging.folding`).

    The result carries ``merge_info``: method, reference index, the ridge, how it was chosen and every
    candidate's score, the folded BatchNorm layers, the permutation-only spaces, and ``seconds`` per
    phase (``graph``, ``ridge_selection``, ``statistics``, ``alignment``, ``average_and_repair``).
    A ``RuntimeWarning`` names a space whose statistics cannot support the transforms. Works inside
    ``torch.inference_mode()``.
    """
    if isinstance(method, str) and method.lower() == "ensemble":
        return ensemble(check_models(models))
    entry = get_method(method)
    entry.check_options(options)
    models = check_models(models)
    max_batches = check_max_batches(max_batches)
    ridge, grid = check_ridge_setting(ridge, ridge_grid, ridge_rule)
    clock = PhaseClock()
    prepared = prepare(entry, models, data, reference=reference, val_data=val_data, max_batches=max_batches,
                       graph=graph)
    plan = restoration(prepared, reset_bn=reset_bn, repair=repair, passes=repair_passes)
    targets = repair_targets_for(prepared)
    clock.lap("graph")
    if identical(models):  # their merge is the model itself, statistics included, whatever the method
        reference_copy = copy.deepcopy(models[prepared.reference])
        return with_merge_info(reference_copy, prepared, plan, None, None, {"identical_models": True}, clock.seconds)

    def collect(batches: Iterable[Any], show: bool, cross_only: bool = False,
                start: dict[str, JointStats] | None = None) -> dict[str, JointStats]:
        # REPAIR's moments ride along: every call reads part of the merge data, and all calls read it once
        return merge_statistics(models, prepared.graph, batches, max_batches, progress and show,
                                prepared.reference if cross_only else None,
                                also=targets.recorders() if plan.needs_targets else None, start=start)

    choice = None
    if entry.uses_ridge and ridge == "auto":
        choice = choose_ridge(prepared, grid, ridge_rule, val_data, collect, problem_solver(prepared, options),
                              candidate_builder(prepared, plan, targets))
        clock.lap("ridge_selection")
    stats, chosen = (choice.statistics, choice.value) if choice else (None, ridge if entry.uses_ridge else None)
    if stats is None and entry.statistics:
        stats = collect(prepared.data, True, cross_only=entry.statistics == "cross")
        clock.lap("statistics")
    if stats is not None:
        warn_if_unreliable(stats, entry.name, chosen)
    if choice is not None and choice.merged is not None:  # the best validation candidate is the merge
        return with_merge_info(choice.merged, prepared, plan, chosen, choice, {}, clock.seconds)
    problem = AlignmentProblem(models, prepared.reference, prepared.graph, stats, chosen or 0.0, release_stats=True)
    alignment = entry(problem, **options)
    clock.lap("alignment")
    del problem, stats  # the statistics of wide layers are large: freed before the model is built
    if choice is not None:
        choice.statistics = None
    repair_targets = targets(alignment.transforms) if plan.needs_targets else None
    targets.release()  # the moments (a C x C matrix per module and model), before the merged model is built
    merged = merged_model(prepared, alignment.transforms, plan, repair_targets, progress=progress)
    clock.lap("average_and_repair")
    return with_merge_info(merged, prepared, plan, chosen, choice, alignment.info, clock.seconds)


class RidgeSweep:
    """Merges of the same models by a CCA method at many ridges: ``sweep(ridge)`` is ``merge(..., ridge=ridge)``.

    What does not depend on the ridge is done once, when the sweep is made: the checks, the merge
    graph, the activation statistics and the moments REPAIR's targets are mapped from; each space's
    eigendecompositions are kept after the first ridge. A new ridge reruns only the CCA solve, the
    averaging and REPAIR's passes on the merged model, so a widget's ridge slider answers in a fraction
    of a full merge. ``data``'s batches are read into memory once; they and the statistics stay as long
    as the sweep does.
    """

    def __init__(self, models: Sequence[nn.Module], method: str = "cca", data: Iterable[Any] | None = None, *,
                 reference: str | int = "first", reset_bn: bool = True, repair: bool | None = None,
                 max_batches: int | None = None, graph: MergeGraph | None = None, progress: bool = False,
                 repair_passes: int | None = None, **options: Any) -> None:
        entry = get_method(method)
        if not entry.uses_ridge:
            ridged = ", ".join(m.name for m in REGISTRY.values() if m.uses_ridge)
            raise ValueError(f"a ridge sweep needs a CCA method ({ridged}), got {method!r}")
        entry.check_options(options)
        models = check_models(models)
        max_batches = check_max_batches(max_batches)
        if data is not None:  # read once: REPAIR's passes at every ridge reuse the batches
            check_data(data, "data", reiterable=True)
            data = first_batches(data, max_batches)
        self.prepared = prepare(entry, models, data, reference=reference, max_batches=max_batches, graph=graph)
        self.plan = restoration(self.prepared, reset_bn=reset_bn, repair=repair, passes=repair_passes)
        self.options, self.progress = options, progress
        self.targets = repair_targets_for(self.prepared)
        recorders = self.targets.recorders() if self.plan.needs_targets else None  # measured now: no ridge pays
        self.stats = merge_statistics(models, self.prepared.graph, self.prepared.data, max_batches, progress,
                                      also=recorders)
        self._cache: dict[Any, Any] = {}

    def __call__(self, ridge: float) -> nn.Module:
        """The merged model at ``ridge`` (a number >= 0; the same model ``merge`` gives for it)."""
        ridge = check_ridge(ridge)
        prepared = self.prepared
        warn_if_unreliable(self.stats, prepared.method.name, ridge)
        clock = PhaseClock()
        problem = AlignmentProblem(prepared.models, prepared.reference, prepared.graph, self.stats, ridge, self._cache)
        transforms = prepared.method(problem, **self.options).transforms
        clock.lap("alignment")
        repair_targets = self.targets(transforms) if self.plan.needs_targets else None
        merged = merged_model(prepared, transforms, self.plan, repair_targets, progress=self.progress)
        clock.lap("average_and_repair")
        return with_merge_info(merged, prepared, self.plan, ridge, None, {}, clock.seconds)


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
    space rather than aligning one model to another: use ``merge(..., method="zipit")``. ``data`` is
    read once: a generator will do.
    """
    entry = aligning_method(method)
    entry.check_options(options)
    if isinstance(ridge, str):
        raise ValueError("alignment_transforms needs a numeric ridge; ridge='auto' is available in merge()")
    ridge = check_ridge(ridge)
    models = check_models([reference, model])
    max_batches = check_max_batches(max_batches)
    if data is not None:
        check_data(data)
        data = first_batches(data, max_batches) if max_batches is not None else data
    graph, data = traced_graph(reference, graph, data)
    stats = None
    if entry.statistics:
        require_data(data, entry.name)
        stats = merge_statistics(models, graph, data, max_batches, progress)
        warn_if_unreliable(stats, entry.name, ridge if entry.uses_ridge else None)
    transforms = entry(AlignmentProblem(models, 0, graph, stats, float(ridge)), **options).transforms[1]
    if transforms is None:
        eye = {s.name: torch.eye(s.size, dtype=torch.float64) for s in graph.spaces}
        return {name: (e, e.clone()) for name, e in eye.items()}
    return {name: (as_dense(out), as_dense(inp)) for name, (out, inp) in transforms.items()}


class AlignedFrom:
    """What :func:`align_to` made a model from, as the model's ``aligned_from``: the ``method`` and the
    ``source`` model (held weakly: None once it is gone), so that a loss plane through a CCA-aligned B' can
    compare it with B. A copy or a pickle keeps the method only."""

    def __init__(self, method: str, source: nn.Module) -> None:
        self.method = method
        self._source: weakref.ref[nn.Module] | None = weakref.ref(source)

    @property
    def source(self) -> nn.Module | None:
        return self._source() if self._source is not None else None

    def __getstate__(self) -> dict[str, Any]:
        return {"method": self.method, "_source": None}

    def __repr__(self) -> str:
        return f"AlignedFrom(method={self.method!r}, source={'alive' if self.source is not None else 'gone'})"


def _marked(aligned: nn.Module, method: str, source: nn.Module) -> nn.Module:
    aligned.aligned_from = AlignedFrom(method, source)  # type: ignore[assignment]
    return aligned


@torch.inference_mode(False)  # called inside inference_mode: the result must still be a normal, trainable model
def align_to(
    reference: nn.Module,
    model: nn.Module,
    method: str = "cca",
    data: Iterable[Any] | None = None,
    *,
    repair: bool | None = None,
    reset_bn: bool = False,
    ridge: float = DEFAULT_RIDGE,
    max_batches: int | None = None,
    graph: MergeGraph | None = None,
    progress: bool = True,
    **options: Any,
) -> nn.Module:
    """``model`` aligned into ``reference``'s space (a new model; the inputs are not modified).

    Permutations keep the function exactly. A map that mixes channels (cca, cca_multiview) does not:
    ``ReLU(T y)`` is not ``T ReLU(y)``. So by default (``repair=None``: on for those methods) the aligned
    model is repaired through the map: each space's input map is refitted by least squares in forward
    order (:mod:`ccatoolkit.merging.refit`), then every pre-activation channel gets ``model``'s own mean
    and std seen through ``T`` (BatchNorm layers, folded first, set to them; REPAIR's passes elsewhere).
    ``repair=False`` applies ``T`` and its inverse as they are. ``reset_bn=True`` (permutations) re-estimates
    BatchNorm statistics on ``data``. ``data`` may be a one-shot iterator when it is read once. The result's
    ``aligned_from`` (:class:`AlignedFrom`) names the method and ``model``.
    """
    entry = aligning_method(method)
    check_models([reference, model])
    max_batches = check_max_batches(max_batches)
    repair = entry.mixes_channels if repair is None else bool(repair)
    if data is not None:
        several_passes = repair or (reset_bn and has_batchnorm(model) and bool(entry.statistics))
        check_data(data, reiterable=several_passes)
        data = first_batches(data, max_batches) if max_batches is not None else data
    graph, data = traced_graph(reference, graph, data)
    transforms = alignment_transforms(
        reference, model, entry.name, data, ridge=ridge, max_batches=max_batches, graph=graph, progress=progress,
        **options,
    )
    folded = folding(entry, model, graph)
    source = fold_batchnorm(model, folded) if folded else model
    transform_graph = folded_graph(graph, folded) if folded else graph
    if repair:  # a one-model "merge": refitted maps, then the model's own statistics restored through them
        require_data(data, entry.name, "repairing the aligned model (or pass repair=False)")
        transforms = refit_input_maps(model, source, transform_graph, transforms, data, max_batches,
                                      progress=progress)
        prepared = Prepared(entry, [model], 0, graph, data, max_batches, folded, [source], transform_graph)
        plan = restoration(prepared, reset_bn=True, repair=True, passes=None)
        targets = RepairTargets([model], graph, data, max_batches)([transforms])
        aligned = merged_model(prepared, [transforms], plan, targets, progress=False)  # one bar: the refit's
        return _marked(aligned, entry.name, model)
    aligned = apply_transforms(source, transform_graph, transforms)
    if not (reset_bn and has_batchnorm(aligned)):
        return _marked(aligned, entry.name, model)
    require_data(data, entry.name, "the BatchNorm reset")
    if not folded:
        return _marked(reset_bn_stats(aligned, data, max_batches=max_batches, progress=progress), entry.name, model)
    targets = RepairTargets([model], graph, data, max_batches)([transforms])
    aligned = repair_batchnorm(aligned, {n: t for n, t in targets.items() if n in folded}, data,
                               max_batches=max_batches, progress=progress)
    return _marked(aligned, entry.name, model)
