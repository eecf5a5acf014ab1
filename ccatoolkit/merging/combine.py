"""The last step of a merge: average the transformed models, then restore the statistics averaging breaks.

Averaging aligned weights shrinks activation variances and leaves BatchNorm statistics that belong
to no model. :class:`Restoration` is decided once per merge from the method and the model
(:func:`restoration`): which BatchNorm layers are re-estimated or set to REPAIR's targets, and which
other layers REPAIR corrects (Jordan et al. 2023; the targets come from
:class:`~ccatoolkit.merging.normalization.RepairTargets`). :func:`merged_model` then builds one merged
model for one set of transforms.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ccatoolkit._utils import BATCHNORM_TYPES, has_batchnorm, model_device, release_free_memory
from ccatoolkit.merging.graph import MergeGraph
from ccatoolkit.merging.methods import Transforms
from ccatoolkit.merging.normalization import (
    RepairTargets,
    Targets,
    repair,
    repair_batchnorm,
    repair_endpoints,
    reset_bn_stats,
)
from ccatoolkit.merging.prepare import Prepared, require_data
from ccatoolkit.merging.ridge import Builder, RidgeChoice
from ccatoolkit.merging.transform import add_into, add_transformed

__all__ = ["Restoration", "restoration", "average_into", "merged_model", "repair_targets_for", "candidate_builder",
           "with_merge_info"]

#: Correction passes after BatchNorm layers are set to REPAIR's targets (``repair_passes`` overrides).
BATCHNORM_PASSES = 1


@dataclass(frozen=True)
class Restoration:
    """How one merge restores its statistics after averaging.

    ``reset_bn`` and ``repair`` are the merge's settings (``repair`` resolved from its default).
    ``bn_to_targets``: BatchNorm layers whose weight and bias are set to REPAIR's targets (folded ones, or
    all with an explicit ``repair=True``); other BatchNorm layers keep their exactly moved parameters and
    get their running statistics re-estimated. ``repair_only``: the other layers REPAIR's passes correct
    (None: every endpoint). ``passes``: the cap on REPAIR's passes (None: its default).
    """

    reset_bn: bool
    repair: bool
    has_batchnorm: bool
    bn_to_targets: tuple[str, ...]
    repair_only: tuple[str, ...] | None
    passes: int | None

    @property
    def repairs(self) -> bool:
        """Whether REPAIR's passes run on layers other than BatchNorm."""
        return self.repair and (self.repair_only is None or bool(self.repair_only))

    @property
    def needs_targets(self) -> bool:
        return bool(self.bn_to_targets) or self.repairs


def restoration(prepared: Prepared, *, reset_bn: bool, repair: bool | None, passes: int | None) -> Restoration:
    """The merge's :class:`Restoration`; refuses missing data for a step that needs it.

    ``repair=None`` (the default) repairs every method but the ``average`` baseline, which stays plain
    (it is what REPAIR is measured against). Permutations merge better with a plain BatchNorm reset than
    with the targets, folded merges need the targets (docs/design.md, "Measured").
    """
    explicit = repair is True
    repair = prepared.method.name != "average" if repair is None else bool(repair)
    reference = prepared.models[prepared.reference]
    modules = dict(reference.named_modules())
    endpoints = [n for names in repair_endpoints(reference, prepared.graph).values() for n in names]
    bn_endpoints = tuple(n for n in endpoints if isinstance(modules[n], BATCHNORM_TYPES))
    other_endpoints = tuple(sorted(set(endpoints) - set(bn_endpoints)))
    has_bn = has_batchnorm(reference)
    to_targets = reset_bn and has_bn and bool(bn_endpoints) and (bool(prepared.folded) or explicit)
    result = Restoration(
        reset_bn=reset_bn, repair=repair, has_batchnorm=has_bn,
        bn_to_targets=bn_endpoints if to_targets else (),
        repair_only=None if (explicit and not reset_bn) else other_endpoints,
        passes=None if passes is None else int(passes),
    )
    if result.needs_targets:
        require_data(prepared.data, prepared.method.name, "REPAIR (or pass repair=False)")
    if reset_bn and has_bn:
        require_data(prepared.data, prepared.method.name, "the BatchNorm reset (or pass reset_bn=False)")
    return result


def average_into(
    merged: nn.Module, models: Sequence[nn.Module], graph: MergeGraph, transforms: Sequence[Transforms | None]
) -> None:
    """Set ``merged``'s floating-point state to the mean of the models' states after their transforms.

    Accumulates into ``merged``'s own tensors, one model and one tensor at a time, a large weight a block
    of rows at a time (:func:`~ccatoolkit.merging.transform.add_transformed`): memory holds ``merged`` and at
    most one transformed tensor, never a transformed model. Integer buffers (BatchNorm's batch counter)
    stay as ``merged`` has them.
    """
    target = merged.state_dict()
    with torch.no_grad():
        for k, (model, t) in enumerate(zip(models, transforms)):
            changed = add_transformed(model, graph, t, target, first=k == 0) if t is not None else set()
            for key, value in model.state_dict().items():
                if key not in changed and torch.is_floating_point(value):
                    add_into(target[key], value, first=k == 0)
        for value in target.values():
            if torch.is_floating_point(value):
                value.div_(len(models))


#: A merged model of at least this many bytes of state is built after the memory freed by the phase before is
#: handed back to the system (:func:`~ccatoolkit._utils.release_free_memory`; a few ms per call, which a small
#: model's merge, holding little, does not pay).
RELEASE_BEFORE_BYTES = 64 << 20


def merged_model(
    prepared: Prepared, transforms: Sequence[Transforms | None], plan: Restoration, targets: Targets | None, *,
    progress: bool, candidate_batches: int | None = None,
) -> nn.Module:
    """The merged model for ``transforms``: a copy of the reference with the averaged state, its statistics restored.

    ``targets``: REPAIR's targets for these transforms (needed when ``plan.needs_targets``). BatchNorm layers
    reach theirs in one pass and get ``BATCHNORM_PASSES`` correction passes; other layers get REPAIR's
    passes. ``candidate_batches``: this model is a ridge candidate that only has to rank the ridges, so its
    BatchNorm statistics come from that many batches and get no correction pass (docs/design.md, "Measured").
    The merged model is corrected in place: a large model is never held twice.
    """
    reference = prepared.models[prepared.reference]
    if sum(t.numel() * t.element_size() for t in reference.state_dict().values()) >= RELEASE_BEFORE_BYTES:
        release_free_memory(model_device(reference))  # what the previous phase freed, before a model's worth is made
    merged = copy.deepcopy(reference)
    average_into(merged, prepared.sources, prepared.transform_graph, transforms)
    data, max_batches = prepared.data, prepared.max_batches
    if plan.reset_bn and plan.has_batchnorm:
        bn_batches = max_batches
        if candidate_batches is not None:
            bn_batches = min(candidate_batches, max_batches or candidate_batches)
        if plan.bn_to_targets:
            assert targets is not None
            bn_passes = BATCHNORM_PASSES if plan.passes is None else plan.passes
            merged = repair_batchnorm(merged, {n: targets[n] for n in plan.bn_to_targets}, data,
                                      max_batches=bn_batches, progress=progress,
                                      max_passes=0 if candidate_batches is not None else bn_passes, inplace=True)
        else:
            merged = reset_bn_stats(merged, data, max_batches=bn_batches, progress=progress, inplace=True)
    if plan.repairs:
        only = None if plan.repair_only is None else list(plan.repair_only)
        merged = repair(merged, None, data, prepared.graph, max_batches=max_batches, progress=progress,
                        targets=targets, max_passes=plan.passes, only=only, inplace=True)
    return merged


def repair_targets_for(prepared: Prepared) -> RepairTargets:
    """REPAIR's targets for this merge: from channel moments for dense maps tried at many ridges (CCA), by a
    pass per model otherwise; ZipIt!'s merged channels average their groups' statistics."""
    method = prepared.method
    return RepairTargets(prepared.models, prepared.graph, prepared.data, prepared.max_batches,
                         from_moments=method.uses_ridge, channel_groups=not method.to_reference,
                         reference=prepared.reference if method.to_reference else None)


def candidate_builder(prepared: Prepared, plan: Restoration, targets: RepairTargets) -> Builder:
    """``build(transforms, candidate_batches)``: a ridge candidate's merge (no progress bars), its REPAIR
    targets computed for its transforms."""

    def build(transforms: list[Transforms | None], candidate_batches: int | None) -> nn.Module:
        repair_targets = targets(transforms) if plan.needs_targets else None
        with warnings.catch_warnings():  # what REPAIR cannot correct is said once, by the final merge
            warnings.filterwarnings("ignore", "(REPAIR|repair_batchnorm) (skips|can only rescale)", RuntimeWarning)
            return merged_model(prepared, transforms, plan, repair_targets, progress=False,
                                candidate_batches=candidate_batches)

    return build


def with_merge_info(merged: nn.Module, prepared: Prepared, plan: Restoration, ridge: float | None,
               choice: RidgeChoice | None, info: dict[str, Any], seconds: dict[str, float]) -> nn.Module:
    """``merged`` with its ``merge_info``: method, reference, ridge and how it was chosen, folding,
    permutation-only spaces, the seconds per phase, and what the method reports."""
    merged.merge_info = dict(  # type: ignore[assignment]
        method=prepared.method.name, reference=prepared.reference, ridge=ridge,
        ridge_selection=choice.rule if choice else ("given" if ridge is not None else None),
        ridge_scores=choice.scores if choice else {}, reset_bn=plan.reset_bn, repair=plan.repair,
        num_models=len(prepared.models), folded_batchnorm=sorted(prepared.folded),
        permutation_only={s.name: s.permutation_only for s in prepared.graph.spaces if s.permutation_only},
        seconds=dict(seconds),
    )
    merged.merge_info.update(info)
    return merged
