"""The merge methods: one registry entry each, saying what it needs and how it computes its transforms.

A method turns the models (and, for most, their activation statistics) into per-model transforms
``{space: (out, inp)}`` into the merged space (:mod:`ccatoolkit.merging.transform` applies them).
Each entry of :data:`REGISTRY` is a :class:`Method`: its solver, the statistics it reads, whether it
has a ridge, whether its maps mix channels (then BatchNorm is folded first, see
:mod:`ccatoolkit.merging.folding`), and its own options, the keyword arguments of its solver. A new
method is one solver and one entry.

Spaces that admit only permutations (``Space.permutation_only``, e.g. through a depthwise
convolution) are aligned by activation matching whatever the method; a grouped convolution's linked
spaces (``Space.group_link``) also move whole groups, by one permutation of the groups per link.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ccatoolkit._utils import BATCHNORM_TYPES, has_batchnorm
from ccatoolkit.analysis.linalg import DiagonalPlusLowRank, RidgePath
from ccatoolkit.analysis.stats import JointStats
from ccatoolkit.merging.align.cca import CCAProblem, multiview_cca_transforms
from ccatoolkit.merging.align.cycle import cycle_consistent_matching
from ccatoolkit.merging.align.permutation import (
    match_activations,
    match_linked_groups,
    permutation_transform,
    weight_matching,
)
from ccatoolkit.merging.align.zipit import zipit_transforms
from ccatoolkit.merging.folding import fold_batchnorm, foldable_batchnorms
from ccatoolkit.merging.graph import MergeGraph, Space

__all__ = ["Transforms", "Alignment", "AlignmentProblem", "Method", "REGISTRY", "get_method", "aligning_method"]

# (out, inp) of one space: tensors, or CCA's maps of a space seen on fewer samples than its width in factors
Transform = tuple[torch.Tensor, torch.Tensor] | tuple[DiagonalPlusLowRank, DiagonalPlusLowRank]
Transforms = dict[str, Transform]  # space -> (out, inp), in graph order


@dataclass
class AlignmentProblem:
    """What a solver reads: the models, the reference's index, the graph and, for most, the statistics.

    ``cache`` lives as long as the statistics do (a ridge grid): CCA's eigendecompositions are made once
    per space and model, not once per ridge. ``release_stats``: each space's statistics are dropped once
    its transforms are made (their last use: a 4096-wide space's joint Gram matrix is large, so the next
    space is solved without it).
    """

    models: Sequence[nn.Module]
    reference: int
    graph: MergeGraph
    stats: dict[str, JointStats] | None = None
    ridge: float = 0.0
    cache: dict[Any, Any] = field(default_factory=dict)
    release_stats: bool = False

    def space_stats(self, space: Space) -> JointStats:
        assert self.stats is not None, "this method needs activation statistics"
        return self.stats.pop(space.name) if self.release_stats else self.stats[space.name]


@dataclass
class Alignment:
    """A solver's result: per model its transforms (None: the model is used as it is), and what the
    solver reports (C2M3: ``{"cycle": {iterations, gap, objective}}``)."""

    transforms: list[Transforms | None]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One merge method: its solver and what it needs.

    ``statistics``: "" (none: data-free or no alignment), "cross" (each model against the reference only:
    a quarter of two models' joint Gram) or "joint" (every pair of models). ``mixes_channels``: its maps
    are not permutations, so a per-channel BatchNorm cannot carry them and is folded first.
    ``to_reference``: it maps every model into the reference's space (ZipIt! builds a space of its own).
    """

    name: str
    solve: Callable[..., Alignment]
    summary: str
    statistics: str = ""
    uses_ridge: bool = False
    mixes_channels: bool = False
    to_reference: bool = True

    @property
    def options(self) -> tuple[str, ...]:
        """The method's own options: its solver's keyword-only arguments."""
        params = inspect.signature(self.solve).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse options this method does not take, naming the ones it does (and the methods that take them)."""
        unknown = sorted(set(options) - set(self.options))
        if not unknown:
            return
        owners = {o: [m.name for m in REGISTRY.values() if o in m.options] for o in unknown}
        where = "; ".join(f"{o!r} is an option of {', '.join(ms)}" for o, ms in owners.items() if ms)
        valid = ", ".join(self.options) or "none"
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for method {self.name!r} (its options: {valid})"
                        + (f"; {where}" if where else ""))

    def __call__(self, problem: AlignmentProblem, **options: Any) -> Alignment:
        return self.solve(problem, **options)


# --- solvers -----------------------------------------------------------------------------------------


def _as_pair(out: np.ndarray, inp: np.ndarray) -> Transform:
    return torch.as_tensor(out, dtype=torch.float64), torch.as_tensor(inp, dtype=torch.float64)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def average(problem: AlignmentProblem) -> Alignment:
    """No alignment: every model as it is."""
    return Alignment([None] * len(problem.models))


def _weight_matching_states(problem: AlignmentProblem) -> tuple[list[dict[str, torch.Tensor]], set[str] | None]:
    """The state dicts weight matching compares, and which of their entries (None: its default).

    BatchNorm makes a conv's filters scale-free: their norms say little about what a channel does,
    and BatchNorm's own vectors say little about which channels correspond. So for BatchNorm
    networks each BatchNorm's scale is folded into its producer's rows and only conv/linear weights
    enter the objective (docs/design.md, "Measured"). The permutations found are applied to the
    original models, where they are exact.
    """
    models, ref, graph = problem.models, problem.reference, problem.graph
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


def permute_weight(problem: AlignmentProblem, *, max_iter: int = 100, seed: int = 0) -> Alignment:
    """Git Re-Basin weight matching of each model to the reference (coordinate descent over the spaces;
    ``seed`` orders the first sweep, ``max_iter`` caps the sweeps)."""
    states, names = _weight_matching_states(problem)
    ref = problem.reference
    result: list[Transforms | None] = [None] * len(states)
    for k in range(len(states)):
        if k != ref:
            perms = weight_matching(states[ref], states[k], problem.graph, max_iter=int(max_iter), seed=int(seed),
                                    param_names=names)
            result[k] = {s: permutation_transform(p) for s, p in perms.items()}
    return Alignment(result)


def c2m3(problem: AlignmentProblem, *, max_iter: int = 100) -> Alignment:
    """Cycle-consistent weight matching of all models into one shared space at once (C2M3; Frank-Wolfe,
    at most ``max_iter`` steps): the maps between any two models compose consistently around every cycle."""
    states, names = _weight_matching_states(problem)
    ref = problem.reference
    perms, info = cycle_consistent_matching(states, problem.graph, reference=ref, param_names=names,
                                            max_iter=int(max_iter))
    result: list[Transforms | None] = [None] * len(states)
    for k in range(len(states)):
        if k != ref:
            result[k] = {s: permutation_transform(p) for s, p in perms[k].items()}
    return Alignment(result, {"cycle": info})


# A space solver: (problem, space, its statistics) -> per model the space's (out, inp), None to leave it as it is.
SpaceSolver = Callable[[AlignmentProblem, Space, JointStats], list[Transform | None]]


def _space_by_space(problem: AlignmentProblem, solve_space: SpaceSolver | None) -> Alignment:
    """Solve every space with ``solve_space`` (``None``: activation matching everywhere), in graph order.

    Permutation-only spaces are matched by activations whatever the method. A grouped convolution's
    linked spaces wait until the whole link has its correlations, then share one permutation of the groups.
    """
    n, ref, graph = len(problem.models), problem.reference, problem.graph
    per_model: list[Transforms] = [{} for _ in range(n)]
    pending_links: dict[tuple[str, int], dict[str, np.ndarray]] = {}  # a link's correlations so far, per model
    for space in graph.spaces:
        st = problem.space_stats(space)
        if solve_space is not None and not space.permutation_only:
            for k, pair in enumerate(solve_space(problem, space, st)):
                if pair is not None:
                    per_model[k][space.name] = pair
            continue
        for k in range(n):
            if k == ref:
                continue
            if not space.group_link:
                per_model[k][space.name] = permutation_transform(match_activations(_np(st.corr(ref, k)), space.groups))
                continue
            link = pending_links.setdefault((space.group_link, k), {})
            link[space.name] = _np(st.corr(ref, k))
            linked = graph.group_links[space.group_link]
            if len(link) == len(linked):
                for name, perm in zip(linked, match_linked_groups([link[m] for m in linked], space.groups)):
                    per_model[k][name] = permutation_transform(perm)
                del pending_links[(space.group_link, k)]
    order = [s.name for s in graph.spaces]
    return Alignment([{s: t[s] for s in order if s in t} if t else None for t in per_model])


def permute(problem: AlignmentProblem) -> Alignment:
    """Activation matching: per space, the Hungarian assignment maximising the correlation of each model's
    neurons with the reference's."""
    return _space_by_space(problem, None)


def _cca_space(problem: AlignmentProblem, space: Space, st: JointStats) -> list[Transform | None]:
    ref, pairs = problem.reference, []
    for k in range(len(problem.models)):
        if k == ref:
            pairs.append(None)
            continue
        key = ("cca", space.name, ref, k)
        if key not in problem.cache:
            # on the stats' device; a space seen on fewer samples than its width keeps its maps in factors, and
            # one whose statistics kept the samples never forms a covariance
            if st.samples is not None and 2 * st.count <= st.sizes[ref]:
                problem.cache[key] = CCAProblem.of_samples(st.samples[st.block(ref)], st.samples[st.block(k)])
            else:
                problem.cache[key] = CCAProblem(st.cov(ref, ref), st.cov(k, k), st.cov(ref, k), samples=st.count)
        pairs.append(problem.cache[key].transform(problem.ridge, compact=True))
    return pairs


def cca(problem: AlignmentProblem) -> Alignment:
    """CCA Merge: each model's features mapped into the reference's by regularised CCA (ridge ``problem.ridge``)."""
    return _space_by_space(problem, _cca_space)


def _multiview_space(problem: AlignmentProblem, space: Space, st: JointStats) -> list[Transform | None]:
    n, ref = len(problem.models), problem.reference
    covs = [[_np(st.cov(i, j)) for j in range(n)] for i in range(n)]
    key = ("paths", space.name)
    if key not in problem.cache:
        problem.cache[key] = [RidgePath(torch.as_tensor(covs[k][k])) for k in range(n)]
    pairs = multiview_cca_transforms(covs, reference=ref, ridge=problem.ridge, ridge_paths=problem.cache[key])
    return [None if k == ref else _as_pair(out, inp) for k, (out, inp) in enumerate(pairs)]


def cca_multiview(problem: AlignmentProblem) -> Alignment:
    """All models mapped to a jointly estimated MAXVAR CCA space, expressed in the reference's neuron units."""
    return _space_by_space(problem, _multiview_space)


def zipit(problem: AlignmentProblem, *, allow_within_model: bool = True) -> Alignment:
    """ZipIt!: greedy matching of the most correlated features across all models (and, with
    ``allow_within_model``, within one model) into a space of its own."""

    def solve_space(problem: AlignmentProblem, space: Space, st: JointStats) -> list[Transform | None]:
        n = len(problem.models)
        corr = np.block([[_np(st.corr(i, j)) for j in range(n)] for i in range(n)])
        pairs = zipit_transforms(corr, n, allow_within_model=bool(allow_within_model), reference=problem.reference)
        return [_as_pair(out, inp) for out, inp in pairs]

    return _space_by_space(problem, solve_space)


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("average", average, "plain weight averaging (no alignment)"),
    Method("permute", permute, "activation matching: Hungarian on the neurons' correlations with the reference's",
           statistics="cross"),
    Method("permute_weight", permute_weight, "Git Re-Basin weight matching (data-free alignment)"),
    Method("c2m3", c2m3, "cycle-consistent weight matching of all models at once (C2M3; data-free alignment)"),
    Method("zipit", zipit, "ZipIt!: greedy feature matching across (and within) models", statistics="joint",
           mixes_channels=True, to_reference=False),
    Method("cca", cca, "CCA Merge: regularised CCA into the reference's space", statistics="joint",
           uses_ridge=True, mixes_channels=True),
    Method("cca_multiview", cca_multiview, "multi-view (MAXVAR) CCA space in the reference's units",
           statistics="joint", uses_ridge=True, mixes_channels=True),
)}
#: Other names accepted for methods.
ALIASES = {"permute_activation": "permute", "activation": "permute", "weight": "permute_weight"}


def get_method(name: str) -> Method:
    """The registry entry of ``name`` (or an alias), or a ``ValueError`` listing the valid names."""
    key = str(name).lower()
    key = ALIASES.get(key, key)
    if key not in REGISTRY:
        raise ValueError(f"unknown merge method {name!r}; valid methods are: {', '.join([*REGISTRY, 'ensemble'])} "
                         "(and the alias 'permute_activation')")
    return REGISTRY[key]


def aligning_method(method: str) -> Method:
    """The registry entry of a method that maps one model into another's space."""
    if str(method).lower() in ("zipit", "ensemble"):
        raise ValueError(
            f"method {method!r} does not align one model into another's space; use merge(..., method={method!r}) "
            "or one of: average, permute, permute_weight, cca, cca_multiview"
        )
    return get_method(method)
