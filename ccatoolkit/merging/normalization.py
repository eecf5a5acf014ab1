"""Repair a merged model's activation statistics: BatchNorm reset and REPAIR (Jordan et al. 2023).

Averaging aligned weights shrinks activation variances ("variance collapse") and leaves BatchNorm
running statistics that belong to no model. :func:`reset_bn_stats` re-estimates every BatchNorm's
running mean/variance on data (cumulative averages, ``momentum=None``). :func:`repair` goes
further: for every activation space it makes the merged model's per-channel pre-activation mean
and standard deviation equal to the average of the aligned endpoint models' (Jordan et al.'s
REPAIR), folding the affine correction into BatchNorm weight/bias or Linear/Conv rows and bias.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from ccatoolkit import distributed
from ccatoolkit.analysis.stats import Scratch, SpaceSums, reshift_sums
from ccatoolkit.analysis.linalg import DiagonalPlusLowRank, as_dense
from ccatoolkit._utils import BATCHNORM_TYPES as _BN
from ccatoolkit._utils import LINEAR_LAYER_TYPES as _LINEAR
from ccatoolkit._utils import (
    batch_count,
    batch_inputs,
    check_data,
    check_finite_parameters,
    check_max_batches,
    eval_mode,
    progress_bar,
    to_model,
)
from ccatoolkit.merging.graph import MergeGraph, merge_graph
from ccatoolkit.merging.transform import scaled_permutation_parts

__all__ = [
    "reset_bn_stats", "repair", "repair_batchnorm", "repair_endpoints", "channel_stats", "channel_moments",
    "MomentSums", "ChannelMoments",
    "mapped_channel_stats", "RepairTargets",
    "use_batch_statistics", "population_bn_statistics", "MixtureRepair",
]


def _batches(data: Iterable[Any], max_batches: int | None, progress: bool, desc: str) -> Iterator[torch.Tensor]:
    max_batches = check_max_batches(max_batches)
    check_data(data)
    total = batch_count(data, max_batches)
    it: Iterable[Any] = data
    if progress:
        it = progress_bar(data, total=total, desc=desc, leave=False)
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        yield batch_inputs(batch)


def _several_samples(batches: Iterable[torch.Tensor], caller: str) -> Iterator[torch.Tensor]:
    """``batches`` without those of one sample, and one warning naming how many were left out: BatchNorm cannot
    normalise a single sample with batch statistics ("Expected more than 1 value per channel")."""
    skipped = 0
    for x in batches:
        if x.shape[0] == 1:
            skipped += 1
            continue
        yield x
    if skipped:
        warnings.warn(f"{caller} left out {skipped} batch(es) of one sample: BatchNorm cannot normalise one sample "
                      "with batch statistics; pass drop_last=True to the DataLoader to avoid such a last batch",
                      RuntimeWarning, stacklevel=3)


def reset_bn_stats(
    model: nn.Module, data: Iterable[Any], max_batches: int | None = None, progress: bool = True, *,
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``data``.

    Every BatchNorm's running statistics are reset and accumulated as a cumulative average over the
    batches (``momentum=None``); other layers (dropout, ...) stay in eval mode. The copy's training
    flags and momenta are restored afterwards; ``model`` is not modified. One pass: ``data`` may be a generator.
    ``inplace``: change and return ``model`` itself (a merge's own new model: no copy of a large model).
    """
    check_finite_parameters([model])
    new = model if inplace else copy.deepcopy(model)
    bns = [m for m in new.modules() if isinstance(m, _BN)]
    if not bns:
        return new
    momenta = {m: m.momentum for m in bns}
    try:
        with eval_mode(new):
            use_batch_statistics(new, accumulate=True)
            seen = 0
            with torch.no_grad():
                for x in _several_samples(_batches(data, max_batches, progress, "reset BatchNorm"), "reset_bn_stats"):
                    new(to_model(x, new))
                    seen += 1
            if distributed.active():
                seen = int(distributed.sum_over_ranks([seen])[0])
                _average_over_ranks([m for m in bns if m.running_mean is not None])
        if seen == 0:
            raise ValueError("the data gave no batches of two or more samples; pass a non-empty DataLoader or "
                             "iterable of batches")
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
    return new


def _average_over_ranks(bns: Sequence[nn.Module]) -> None:
    """Each BatchNorm's cumulative averages (``momentum=None``) over the batches of all ranks, weighted by the
    batches each rank saw: what one process reading every rank's batches computes."""
    tracked = [bn.num_batches_tracked.to(torch.float64) for bn in bns]
    sums = distributed.all_reduce_sum(
        [t for bn, n in zip(bns, tracked) for t in (bn.running_mean * n, bn.running_var * n, n)])
    with torch.no_grad():
        for i, bn in enumerate(bns):
            mean, var, n = sums[3 * i : 3 * i + 3]
            if n.item() > 0:
                bn.running_mean.copy_(mean / n)
                bn.running_var.copy_(var / n)
            bn.num_batches_tracked.copy_(n.round().to(bn.num_batches_tracked.dtype))


def repair_batchnorm(
    model: nn.Module,
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    data: Iterable[Any],
    max_batches: int | None = None,
    progress: bool = True,
    *,
    tol: float = 1e-4,
    max_passes: int = 4,
    inplace: bool = False,
) -> nn.Module:
    """REPAIR through BatchNorm: each targeted BatchNorm outputs its target channel mean and std.

    ``targets[name] = (mean, std)`` per channel of BatchNorm ``name`` (e.g. the aligned endpoint
    models' averaged statistics, as :func:`ccatoolkit.merging.api.merge` computes them). The layer's
    weight becomes the target std and its bias the target mean, then the running statistics are
    re-estimated on ``data`` (:func:`reset_bn_stats`). A BatchNorm normalises its input, so its output
    has the target statistics whatever happens upstream: one pass sets every layer at once, where
    REPAIR on plain layers needs a pass per layer. Then eval-mode passes (at most ``max_passes``)
    measure the outputs and fold the remaining per-channel affine error into weight and bias (the
    running variance is unbiased and includes ``eps``, a population std is neither; an upstream fix
    shifts the layers below it), until every channel is within ``tol`` of its target: a model that
    already has the target statistics comes back unchanged. Returns a copy; ``model`` is not modified
    (``inplace``: ``model`` itself is changed and returned). ``data`` must be re-iterable (a list of
    batches or a DataLoader): it is read once per pass.
    """
    check_data(data, reiterable=True)
    new = model if inplace else copy.deepcopy(model)
    modules = dict(new.named_modules())
    with torch.no_grad():
        for name, (mean, std) in targets.items():
            bn = modules.get(name)
            if not isinstance(bn, _BN):
                raise ValueError(f"repair_batchnorm: {name!r} is not a BatchNorm layer of the model")
            if not bn.affine:
                warnings.warn(f"repair_batchnorm skips {name!r}: BatchNorm without affine parameters", RuntimeWarning)
                continue
            bn.weight.copy_(std.to(bn.weight))
            bn.bias.copy_(mean.to(bn.bias))
    new = reset_bn_stats(new, data, max_batches=max_batches, progress=progress, inplace=True)
    modules = dict(new.named_modules())
    names = [n for n in targets if isinstance(modules[n], _BN) and modules[n].affine]
    if names:
        _correct(new, names, targets, data, max_batches, eps=1e-5, tol=tol, passes=max_passes, progress=False)
    return new


# --- REPAIR -----------------------------------------------------------------------------------------


def repair_endpoints(model: nn.Module, graph: MergeGraph) -> dict[str, list[str]]:
    """``{space: [module names]}`` whose outputs are each space's pre-activations.

    The last output-side module of the space: its BatchNorm layers if it has any, else its
    LayerNorm/GroupNorm layers, else its Linear/Conv layers (several for a residual stream, one per
    branch that writes into it).
    """
    modules = dict(model.named_modules())
    result: dict[str, list[str]] = {}
    for space in graph.spaces:
        # a BatchNorm over a concatenation holds other spaces' channels too: not this space's endpoint
        names = list(dict.fromkeys(ref.name.rsplit(".", 1)[0] for ref in space.outputs if not ref.is_segment))
        mods = [n for n in names if n in modules]
        bn = [n for n in mods if isinstance(modules[n], _BN)]
        norm = [n for n in mods if isinstance(modules[n], (nn.LayerNorm, nn.GroupNorm))]
        lin = [n for n in mods if isinstance(modules[n], _LINEAR)]
        result[space.name] = bn or norm or lin
    return result


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _reduce_channels(
    out: torch.Tensor, matrix: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel sum and sum of squares (float64) of ``out`` (or of ``matrix @ out``), and the sample count.

    The product with a dense ``matrix`` runs in the output's precision (at least float32), the sums in
    float64: the product is the cost (samples x C x C), and its rounding is far below what a merge changes.
    """
    t = out.detach()
    t = t.movedim(1, -1).reshape(-1, t.shape[1]) if t.dim() > 2 else t
    if matrix is not None:
        dtype = torch.promote_types(t.dtype, torch.float32)
        t = t.to(dtype) @ torch.as_tensor(matrix, device=t.device).to(dtype).T
    t = t.to(torch.float64)
    return t.sum(0), (t * t).sum(0), t.shape[0]


def _accumulate(
    model: nn.Module,
    modules: Sequence[str],
    data: Iterable[Any],
    reduce: Mapping[str, Any],
    max_batches: int | None,
    progress: bool,
    stop_after: str | None = None,
    fired: list[str] | None = None,
    reduce_ranks: bool = True,
) -> dict[str, list[Any]]:
    """One eval-mode pass over ``data``: ``reduce[name](output)`` of each module, summed over batches (tuples
    whose last item is the sample count), then over ``torch.distributed`` ranks unless ``reduce_ranks=False``.

    ``fired``: a list that gets each module's name every time its hook runs (the forward order).
    """
    named = dict(model.named_modules())
    acc: dict[str, list[Any]] = {n: [] for n in modules}
    handles = []

    def make(name: str):
        def hook(_m: nn.Module, _a: Any, out: torch.Tensor) -> None:
            if fired is not None:
                fired.append(name)
            parts = reduce[name](out)
            a = acc[name]
            acc[name] = list(parts) if not a else [x + y for x, y in zip(a, parts)]
            if name == stop_after:
                raise _Stop

        return hook

    try:
        for n in modules:
            handles.append(named[n].register_forward_hook(make(n)))
        with eval_mode(model), torch.no_grad():
            for x in _batches(data, max_batches, progress, "channel statistics"):
                try:
                    model(to_model(x, model))
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    if reduce_ranks:
        acc = _sum_over_ranks(acc)
    for n, a in acc.items():
        if not a or a[-1] == 0:
            raise ValueError(f"module {n!r} produced no output on the data; is it used in forward()?")
    return acc


def _sum_over_ranks(acc: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """:func:`_accumulate`'s sums added over ``torch.distributed`` ranks (as they are on one process).

    Each entry is ``[tensor, ..., count]``. The counts go first, so that a module no rank saw is named by the
    error every rank raises; then all tensors in one collective.
    """
    if not distributed.active():
        return acc
    names = list(acc)
    counts = distributed.sum_over_ranks([acc[n][-1] if acc[n] else 0 for n in names])
    if any(c == 0 for c in counts):
        return {n: acc[n] if c else [] for n, c in zip(names, counts)}
    if any(not acc[n] for n in names):
        raise ValueError("a rank saw no output of a module the others saw: give every rank at least one batch")
    tensors = [t for n in names for t in acc[n][:-1]]
    reduced = iter(distributed.all_reduce_sum(tensors))
    return {n: [next(reduced) for _ in acc[n][:-1]] + [int(round(c))] for n, c in zip(names, counts)}


def _scale(std: torch.Tensor, t_std: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-channel factors taking ``std`` to ``t_std``; channels whose std is below ``eps`` keep their scale."""
    return torch.where(std > eps, t_std / std.clamp_min(eps), torch.ones_like(std))


def _mean_std(s: torch.Tensor, ss: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std from per-channel sums and sums of squares."""
    mean = s / count
    return mean, (ss / count - mean * mean).clamp_min(0.0).sqrt()


def channel_stats(
    model: nn.Module,
    modules: Sequence[str],
    data: Iterable[Any],
    max_batches: int | None = None,
    progress: bool = False,
    stop_after: str | None = None,
    transform: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and (population) std of the outputs of ``modules`` on ``data``, in eval mode.

    Channels are dim 1; conv outputs count every position as a sample. With ``stop_after`` the
    forward pass ends after that module (cheaper when only early layers matter). ``transform[name]``
    (a ``C x C`` matrix) maps a module's channels ``y`` to ``transform @ y`` before they are counted
    (the statistics of a model's features seen in another model's space).
    """
    transform = {n: as_dense(m) for n, m in (transform or {}).items()}  # (a map in factors multiplied out)
    # a (scaled) permutation maps the sums themselves: no per-sample product (permute, weight matching, C2M3)
    sparse = {n: scaled_permutation_parts(m) for n, m in transform.items() if n in modules}
    reduce = {n: (lambda out, m=None if sparse.get(n) else transform.get(n): _reduce_channels(out, m))
              for n in modules}
    acc = _accumulate(model, modules, data, reduce, max_batches, progress, stop_after)
    result = {}
    for n, (s, ss, c) in acc.items():
        if sparse.get(n) is not None:
            index, scale = (t.to(s.device) for t in sparse[n])
            s, ss = scale.double() * s[index], scale.double() ** 2 * ss[index]
        result[n] = _mean_std(s, ss, c)
    return result


@dataclass
class ChannelMoments:
    """One module's channel moments as sums about a fixed ``shift`` (float64): ``count`` samples, ``sum`` of
    ``y - shift`` and ``gram``, the sum of its outer products. The mean, the covariance and the statistics
    of any linear map of ``y`` follow (:meth:`mapped`); the covariance is never formed unless asked for.

    From :class:`MomentSums` the tensors are its running sums, not copies: read them before more data is added.
    """

    count: int
    shift: torch.Tensor
    sum: torch.Tensor
    gram: torch.Tensor | None  # C x C, or its diagonal alone (C) where only the channels' own statistics are needed
    samples: torch.Tensor | None = None  # or (a wide module on few samples) the samples minus the shift, C x count

    def _full_gram(self, what: str) -> torch.Tensor:
        if self.gram is None:
            assert self.samples is not None
            samples = self.samples.to(torch.float64)
            return samples @ samples.T
        if self.gram.dim() != 2:
            raise ValueError(f"{what} needs the channels' covariances, but only their variances were recorded "
                             "(MomentSums(diagonal=True), the reference model of a merge, which no map moves)")
        return self.gram

    @classmethod
    def of(cls, mean: torch.Tensor, cov: torch.Tensor) -> "ChannelMoments":
        """The moments of a known mean and (population) covariance: one "sample" about the mean."""
        return cls(1, mean.to(torch.float64), torch.zeros_like(mean, dtype=torch.float64), cov.to(torch.float64))

    def mean(self) -> torch.Tensor:
        return self.shift + self.sum / self.count

    def cov(self) -> torch.Tensor:
        """The population covariance (a new ``C x C`` matrix)."""
        m = self.sum / self.count
        return (self._full_gram("the covariance") / self.count).addr_(m, m, alpha=-1.0)

    def mapped(self, matrix: torch.Tensor | DiagonalPlusLowRank | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and population std of ``matrix @ y`` (``y`` itself when None): ``M mean`` and the root of
        ``diag(M C M^T) = diag(M G M^T) / n - (M m)^2``, with ``m`` the mean about the shift (small, so the
        difference loses nothing). A map in factors is never multiplied out."""
        m = self.sum / self.count
        if matrix is None:
            return self.shift + m, (self._squares(None) / self.count - m * m).clamp_min(0.0).sqrt()
        M = matrix.to(device=m.device, dtype=torch.float64) if isinstance(matrix, DiagonalPlusLowRank) else \
            torch.as_tensor(matrix, device=m.device).to(torch.float64)
        mapped_m = M @ m
        var = self._squares(M) / self.count - mapped_m * mapped_m
        return M @ self.shift + mapped_m, var.clamp_min(0.0).sqrt()

    def _squares(self, M: torch.Tensor | DiagonalPlusLowRank | None) -> torch.Tensor:
        """``diag(M G M^T)``, each mapped channel's sum of squares about the shift (``diag(G)`` for None): from
        the kept samples' products, or the Gram matrix (a map in factors never multiplied out)."""
        if self.samples is not None:  # no C x C matrix
            samples = self.samples.to(torch.float64)
            mapped = samples if M is None else M @ samples
            return (mapped * mapped).sum(1)
        assert self.gram is not None
        if M is None:
            return self.gram if self.gram.dim() == 1 else torch.diagonal(self.gram)
        gram = self._full_gram("a mapped channel's std")
        if isinstance(M, DiagonalPlusLowRank):
            return M.diagonal_of_congruence(gram)
        return ((M @ gram) * M).sum(1)


class MomentSums:
    """The running sums behind :func:`channel_moments` for one model's modules, fed one output at a time.

    :func:`channel_moments` feeds them from a pass of its own. A merge feeds them from its statistics pass
    instead (:class:`~ccatoolkit.analysis.stats.StatisticsCollector`'s ``also``), which runs the models over
    the same data anyway: one forward of every model fewer. :meth:`result` may be read at any point (the
    sums go on: a merge reads them after the fitting batches, then after all batches).

    Each module's sums are a one-model :class:`~ccatoolkit.analysis.stats.SpaceSums`, the accumulator of
    the activation statistics: outputs shifted by the first batch's channel means into one scratch matrix,
    the upper triangle of their Gram in the outputs' precision (at least float32), moved into float64 sums
    every ``FLUSH_SAMPLES`` samples (straight into them for a module wider than ``LARGE_RUNNING_GRAM``; such a
    module seen on at most half as many samples as it has channels keeps the samples instead, and its
    :class:`ChannelMoments` carry them). ``diagonal``: only each channel's sum of squares, not the Gram (the reference model of a merge, whose
    channels no map moves: its targets need their means and stds alone).
    """

    def __init__(self, modules: Sequence[str], diagonal: bool = False) -> None:
        self.modules = list(modules)
        self.diagonal = diagonal  # only each channel's sum of squares: enough for a model no map moves
        self.sums: dict[str, SpaceSums] = {}
        self.scratch = Scratch()

    def add(self, name: str, out: torch.Tensor) -> int:
        """Add one output of module ``name`` (channels on dimension 1); returns its sample count."""
        t = out.detach()
        if name not in self.sums:  # a wide module seen on few samples keeps them (SpaceSums' keep_samples)
            self.sums[name] = SpaceSums(name, [name], 1, reference=0 if self.diagonal else None,
                                        keep_samples=not self.diagonal)
            self.sums[name].setup([int(t.shape[1])], [t], t.device)
        sums = self.sums[name]
        before = sums.count
        sums.add([t], self.scratch)
        return sums.count - before

    def hooks(self) -> dict[str, Any]:
        """``{module: fn(output)}`` adding every output (what ``StatisticsCollector(also=...)`` calls)."""
        return {name: functools.partial(self.add, name) for name in self.modules}

    def result(self) -> dict[str, ChannelMoments]:
        """Per module, the moments so far: the running sums themselves (no copy), or under ``torch.distributed``
        their sums over every rank (about rank 0's shift)."""
        if not distributed.active():  # a wide module still keeping its samples gives them (no C x C matrix)
            kept = {n: s.shifted_samples() for n, s in self.sums.items() if s.sampling}
        else:  # every rank's sums are added: a Gram matrix each
            kept = {}
        parts = {n: list(self.sums[n].shifted_sums()) if n in self.sums and n not in kept else [] for n in self.modules}
        if distributed.active():  # every rank's sums about rank 0's shift, then added
            common = {n: distributed.broadcast(p[1]) for n, p in parts.items() if p}
            acc = _sum_over_ranks({n: [*reshift_sums(p[0], p[2], p[3], (p[1] - common[n]).to(torch.float64)), p[0]]
                                   if p else [] for n, p in parts.items()})
            parts = {n: [a[-1], common[n], a[0], a[1]] if a else [] for n, a in acc.items()}
        result = {}
        for n, p in parts.items():
            if n in kept:
                count, shift, total, samples = kept[n]
                result[n] = ChannelMoments(count, shift, total, None, samples)
                continue
            if not p or p[0] == 0:
                raise ValueError(f"module {n!r} produced no output on the data; is it used in forward()?")
            result[n] = ChannelMoments(*p)
        return result


def channel_moments(
    model: nn.Module, modules: Sequence[str], data: Iterable[Any], max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, the channels' mean and covariance matrix (population, float64; channels dim 1, conv
    positions count as samples), in eval mode.

    The statistics :func:`channel_stats` counts, for every linear map at once: those of ``M @ y`` follow
    without another pass over the data (:func:`mapped_channel_stats`), which is how a merge's REPAIR
    targets for CCA's dense maps cost no pass per ridge tried. Each batch's Gram matrix is one product in
    the output's precision (at least float32), of features shifted by the first batch's means so that
    large means do not cancel the variance away; a running matrix in that precision moves into float64
    sums every ``FLUSH_SAMPLES`` samples (:class:`MomentSums`). Holds a ``C x C`` matrix per module
    (two below ``LARGE_RUNNING_GRAM`` bytes).
    """
    return {n: (m.mean(), m.cov()) for n, m in _moment_sums(model, modules, data, max_batches, progress).result().items()}


def _moment_sums(model: nn.Module, modules: Sequence[str], data: Iterable[Any], max_batches: int | None,
                 progress: bool = False, diagonal: bool = False) -> MomentSums:
    """:class:`MomentSums` of ``model``'s ``modules`` over one pass of its own over ``data``."""
    sums = MomentSums(modules, diagonal)  # _accumulate counts the samples (a module that never ran raises there)
    _accumulate(model, modules, data, {n: (lambda out, n=n: (sums.add(n, out),)) for n in modules}, max_batches,
                progress, reduce_ranks=False)
    return sums


def mapped_channel_stats(
    moments: ChannelMoments | tuple[torch.Tensor, torch.Tensor], matrix: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) std of ``matrix @ y`` from ``y``'s moments (``y`` itself when None): ``M mean`` and
    ``sqrt(diag(M C M^T))``, what :func:`channel_stats` with ``transform`` counts. ``moments``: a
    :class:`ChannelMoments`, or a ``(mean, cov)`` pair as :func:`channel_moments` gives."""
    if not isinstance(moments, ChannelMoments):
        moments = ChannelMoments.of(*moments)
    return moments.mapped(matrix)


Moments = dict[str, ChannelMoments]  # module -> its channel moments (see MomentSums.result)
Targets = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (target channel mean, target std)


class RepairTargets:
    """REPAIR's targets for a merge's transforms: per pre-activation module (:func:`repair_endpoints`), the
    average over the models of their channel mean and std seen in the merged space (Jordan et al. 2023).

    Alignment methods: the mean over models of the statistics of ``out_k @ y_k`` (model k's pre-activations
    mapped by its transform; exact for permutations). ZipIt! (``channel_groups``): each merged channel's
    target is the average of its group members' means and stds (``sum_k M_k @ stat_k``). The statistics are
    the original models': a folded BatchNorm computes the same outputs.

    ``from_moments`` (dense maps tried at many ridges, the CCA methods): each model's channel moments are
    measured once, and every transform's targets then follow in closed form (:func:`mapped_channel_stats`)
    until :meth:`release`. A merge measures them in its statistics pass (:meth:`recorders`); otherwise
    they take one pass per model on first use. Without ``from_moments`` each call makes one pass per model.
    ``reference``: the model every other one is mapped onto, whose transform is always None; only its
    channels' variances are measured (no ``C x C`` matrix: half of a two-model merge's moment arithmetic).
    """

    def __init__(self, models: Sequence[nn.Module], graph: MergeGraph, data: Any, max_batches: int | None, *,
                 from_moments: bool = False, channel_groups: bool = False, reference: int | None = None) -> None:
        self.models, self.graph, self.data, self.max_batches = list(models), graph, data, max_batches
        self.from_moments, self.channel_groups = from_moments, channel_groups
        self.reference = reference  # a model no transform moves: its moments are its channels' variances alone
        self.endpoints = repair_endpoints(self.models[0], graph)
        self.modules = [n for names in self.endpoints.values() for n in names]  # every endpoint, in space order
        self._moments: list[Moments] | None = None
        self._recorded: list[MomentSums] | None = None

    def recorders(self) -> list[dict[str, Any]] | None:
        """Per model, ``{module: fn(output)}`` that measure the moments in a pass the merge makes anyway (its
        statistics, ``StatisticsCollector(also=...)``); None when these targets are not made from moments.

        Every pass given these hooks adds to the same sums: together they must read the merge data once
        (the fitting batches, then the held-out ones). :meth:`moments` reads what they have seen so far.
        """
        if not self.from_moments:
            return None
        if self._recorded is None:
            self._recorded = [MomentSums(self.modules, diagonal=k == self.reference) for k in range(len(self.models))]
        return [sums.hooks() for sums in self._recorded]

    def moments(self) -> list[Moments]:
        """Each model's :class:`ChannelMoments` at the endpoints: what :meth:`recorders` saw so far (their running
        sums, so read before more data goes in), or measured by a pass per model on first use and kept (a
        ``C x C`` matrix per module)."""
        return [self._model_moments(k) for k in range(len(self.models))]

    def _model_moments(self, k: int) -> Moments:
        if self._recorded is not None:  # the running sums themselves: a wide model holds one copy
            return self._recorded[k].result()
        if self._moments is None:
            self._moments = [_moment_sums(m, self.modules, self.data, self.max_batches, diagonal=k == self.reference)
                             .result() for k, m in enumerate(self.models)]
        return self._moments[k]

    def release(self) -> None:
        """Forget the moments (a large model's are large): a later call measures them again."""
        self._moments = self._recorded = None

    def __call__(self, transforms: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None]) -> Targets:
        """The targets for per-model transforms ``{space: (out, inp)}`` (None: a model used as it is)."""
        names = self.modules
        n_models = len(self.models)
        sums: dict[str, list[torch.Tensor]] = {}
        for k, model in enumerate(self.models):
            t = transforms[k]
            matrix: dict[str, torch.Tensor] = {}
            if t is not None and not self.channel_groups:
                for space, modules in self.endpoints.items():
                    if space in t:
                        matrix.update({name: t[space][0] for name in modules})
            if self.from_moments:
                moments = self._model_moments(k)
                stats = {name: mapped_channel_stats(moments[name], matrix.get(name)) for name in names}
            else:
                stats = channel_stats(model, names, self.data, self.max_batches, transform=matrix)
            for space, modules in self.endpoints.items():
                for name in modules:
                    mean, std = stats[name]
                    if self.channel_groups and t is not None and space in t:
                        M = t[space][0].to(mean.device, torch.float64)  # N * M_k
                        mean, std = M @ mean, M @ std
                    acc = sums.setdefault(name, [torch.zeros_like(mean), torch.zeros_like(std)])
                    acc[0] += mean / n_models
                    acc[1] += std / n_models
        return {name: (v[0], v[1]) for name, v in sums.items()}


def _can_shift(module: nn.Module) -> bool:
    if isinstance(module, _BN):
        return bool(module.affine)
    return getattr(module, "bias", None) is not None


def _fold(module: nn.Module, name: str, scale: torch.Tensor, mean: torch.Tensor, target: torch.Tensor) -> None:
    """Make ``module``'s output ``(y - mean) * scale + target`` per channel (in place on a private copy)."""
    with torch.no_grad():
        if isinstance(module, _BN):
            if not module.affine:  # nothing to fold into (warned once per call, see _warn_uncorrectable)
                return
            w, b = module.weight, module.bias
            new_b = (b.double() - mean) * scale + target
            w.copy_((w.double() * scale).to(w.dtype))
            b.copy_(new_b.to(b.dtype))
        else:
            w = module.weight  # scaled in place, in its own dtype: a 4096 x 25088 weight has no float64 copy
            shape = (-1,) + (1,) * (w.dim() - 1)
            w.mul_(scale.view(shape).to(w.dtype))
            if module.bias is not None:  # without one the means stay (warned once per call)
                b = module.bias
                b.copy_(((b.double() - mean) * scale + target).to(b.dtype))


def _correct(
    model: nn.Module,
    names: Sequence[str],
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    data: Iterable[Any],
    max_batches: int | None,
    *,
    eps: float,
    tol: float,
    passes: int | None,
    progress: bool,
) -> None:
    """REPAIR's passes, in place on ``model``: channel statistics measured (eval mode), per-channel
    affine corrections folded into the modules.

    ``passes=None``: one module at a time in forward order. The first pass measures every module
    (and records the order they run in) and corrects the first; each later pass measures the next
    module, with the forward pass stopped right after it, once every module before it has its
    targets. A module's statistics depend only on the modules that run before it, so after the last
    pass all are exact, in as many passes as modules, each only as long as the network up to its
    module (a chain of three 512-wide layers on 784 inputs: 2.1 full passes instead of 3). A module
    that runs more than once per batch has no single place in the order: then ``len(names)`` passes
    of the other kind run.

    ``passes=k``: each of at most ``k`` passes measures every module and folds every correction at
    once, until all are within ``tol`` of ``targets`` (relative to the target std). A module that
    cannot shift its means does not hold up convergence. Channels whose std is below ``eps`` keep
    their scale.
    """
    _warn_uncorrectable(model, names)
    if passes is None:
        if _correct_in_order(model, names, targets, data, max_batches, eps=eps, progress=progress):
            return
        passes = len(names)  # a module ran twice per batch: no single order
    _correct_jointly(model, names, targets, data, max_batches, eps=eps, tol=tol, passes=passes, progress=progress)


def _warn_uncorrectable(model: nn.Module, names: Sequence[str]) -> None:
    """One warning per REPAIR call naming the modules it cannot fully correct: a BatchNorm without affine
    parameters (skipped) and a layer without a bias (rescaled only: its channel means stay)."""
    modules = dict(model.named_modules())
    skipped = [n for n in names if isinstance(modules[n], _BN) and not modules[n].affine]
    scaled = [n for n in names if not isinstance(modules[n], _BN) and getattr(modules[n], "bias", None) is None]
    problems = []
    if skipped:
        problems.append(f"skips {', '.join(map(repr, skipped))} (BatchNorm without affine parameters)")
    if scaled:
        problems.append(f"can only rescale {', '.join(map(repr, scaled))} (no bias to shift the channel means)")
    if problems:
        warnings.warn(f"REPAIR {'; '.join(problems)}", RuntimeWarning, stacklevel=4)


def _correct_in_order(
    model: nn.Module, names: Sequence[str], targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    data: Iterable[Any], max_batches: int | None, *, eps: float, progress: bool,
) -> bool:
    """One module per pass, in forward order (see :func:`_correct`); False, with nothing changed, when a module
    runs more than once per batch."""
    modules = dict(model.named_modules())
    reduce = {n: _reduce_channels for n in names}
    fired: list[str] = []
    sums = _accumulate(model, names, data, reduce, max_batches, False, fired=fired)
    order = list(dict.fromkeys(fired))
    if any(fired.count(n) != fired.count(order[0]) for n in order):
        return False
    for i, name in enumerate(progress_bar(order, progress, desc="REPAIR passes", leave=False)):
        if i > 0:  # the first pass's sums serve the first module; each later one stops after its module
            sums = _accumulate(model, [name], data, reduce, max_batches, False, stop_after=name)
        mean, std = _mean_std(*sums[name])
        t_mean, t_std = (t.to(mean.device, torch.float64) for t in targets[name])
        _fold(modules[name], name, _scale(std, t_std, eps), mean, t_mean)
    return True


def _correct_jointly(
    model: nn.Module, names: Sequence[str], targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    data: Iterable[Any], max_batches: int | None, *, eps: float, tol: float, passes: int, progress: bool,
) -> None:
    """At most ``passes`` passes, each measuring every module and folding every correction (see :func:`_correct`)."""
    modules = dict(model.named_modules())
    for _ in progress_bar(range(passes), progress, desc="REPAIR passes", leave=False):
        stats = channel_stats(model, names, data, max_batches)
        worst = 0.0
        updates = []
        for n in names:
            mean, std = stats[n]
            t_mean, t_std = (t.to(mean.device, torch.float64) for t in targets[n])
            unit = t_std.clamp_min(eps)
            if _can_shift(modules[n]):
                worst = max(worst, float(((mean - t_mean).abs() / unit).max()))
            live = std > eps
            if live.any():
                worst = max(worst, float(((std - t_std).abs() / unit)[live].max()))
            updates.append((n, _scale(std, t_std, eps), mean, t_mean))
        if worst <= tol:
            break
        for n, scale, mean, t_mean in updates:
            _fold(modules[n], n, scale, mean, t_mean)


def repair(
    merged: nn.Module,
    aligned_models: Sequence[nn.Module] | None,
    data: Iterable[Any],
    graph: MergeGraph | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    *,
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    eps: float = 1e-5,
    tol: float = 1e-4,
    max_passes: int | None = None,
    only: Sequence[str] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """REPAIR: a copy of ``merged`` whose pre-activation channel means/stds equal the endpoints' average.

    For every space of ``graph`` (default ``merge_graph(merged)``) the pre-activation modules are
    found by :func:`repair_endpoints`; the target per channel is the average over
    ``aligned_models`` (the endpoint models after alignment into the merged model's space) of their
    mean and std, or ``targets[module] = (mean, std)`` when given. Each pass over ``data``
    measures channel statistics (eval mode) and folds per-channel corrections. By default the modules
    are corrected one per pass in forward order (:func:`_correct`): exact after as many
    passes as modules, each pass stopping after its module. With ``max_passes`` every pass measures
    all modules and folds all corrections at once (a correction upstream shifts the statistics
    downstream), until every channel is within ``tol`` (relative to the target std) of its targets or
    the passes run out. Channels whose merged std is below ``eps`` keep their scale. ``merged`` and the
    endpoints are not modified (``inplace``: ``merged`` itself is corrected and returned). ``data`` must
    be re-iterable (a list of batches or a DataLoader): it is read once per pass.
    """
    check_data(data, reiterable=True)
    check_finite_parameters([merged], ["merged"])
    if graph is None:
        graph = merge_graph(merged)
    endpoints = [n for names in repair_endpoints(merged, graph).values() for n in names]
    if only is not None:  # e.g. the layers that are not BatchNorm, when BatchNorm layers were set otherwise
        endpoints = [n for n in endpoints if n in set(only)]
    new = merged if inplace else copy.deepcopy(merged)
    if not endpoints:
        return new
    if targets is None:
        if not aligned_models:
            raise ValueError("repair needs the aligned endpoint models (or explicit targets)")
        per_model = [channel_stats(m, endpoints, data, max_batches) for m in aligned_models]
        targets = {
            n: (
                torch.stack([s[n][0] for s in per_model]).mean(0),
                torch.stack([s[n][1] for s in per_model]).mean(0),
            )
            for n in endpoints
        }
    _correct(new, endpoints, targets, data, max_batches, eps=eps, tol=tol,
             passes=None if max_passes is None else int(max_passes), progress=progress)
    return new


# --- BatchNorm statistics of weight-space points -----------------------------------------------------


def use_batch_statistics(model: nn.Module, *, accumulate: bool) -> dict[str, nn.Module]:
    """Switch ``model``'s BatchNorm layers to train mode, normalising with each batch's own statistics.

    ``accumulate=True``: the running statistics restart and become the cumulative average over the
    batches that follow (``momentum=None``; the caller restores the momenta), what :func:`reset_bn_stats`
    reads back. ``accumulate=False``: the running statistics are neither used nor written
    (``track_running_stats=False``), for a copy that trains or measures through batch statistics alone.
    Returns the BatchNorm layers by name, in module order.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _BN)}
    for m in layers.values():
        if accumulate:
            if m.track_running_stats:
                m.reset_running_stats()
            m.momentum = None
        else:
            m.track_running_stats = False
        m.train()
    return layers


class _BatchNormInputSums:
    """A model copy (eval mode) whose BatchNorm layers normalise with batch statistics and record, through
    hooks, the per-channel sums of their inputs."""

    def __init__(self, template: nn.Module) -> None:
        self.model = copy.deepcopy(template).eval()
        self.layers = list(use_batch_statistics(self.model, accumulate=False))
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.counts: list[int] = []
        for name in self.layers:
            self.model.get_submodule(name).register_forward_pre_hook(self._record)

    def _record(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        dims = [0] + list(range(2, x.dim()))
        xd = x.to(torch.float64)
        self.records.append((xd.sum(dim=dims), (xd * xd).sum(dim=dims)))
        self.counts.append(x.numel() // x.shape[1])

    def sums(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        """Per BatchNorm layer: [sum, sum of squares] of its input over batch (and spatial) positions."""
        self.records, self.counts = [], []
        functional_call(self.model, params, (x,))
        out: list[torch.Tensor] = []
        for total, squares in self.records:
            out += [total, squares]
        return out


def population_bn_statistics(
    template: nn.Module,
    states: Sequence[dict[str, torch.Tensor]],
    data: Iterable[Any],
    *,
    batched: bool = False,
    progress: bool = False,
) -> None:
    """Set each state's BatchNorm running statistics (in place) to its own population statistics on ``data``.

    ``states`` are floating state dicts of ``template``'s architecture, each one point of weight space
    (``batched=True``: each a stack of points, ``(P, *shape)`` per entry, run under ``torch.vmap``). A
    forward pass with batch statistics gives each BatchNorm input's per-channel sums, accumulated in
    float64 over all of ``data`` into the mean and the unbiased variance of every sample (where
    :func:`reset_bn_stats` averages the batches' statistics): an interpolated network's own statistics,
    not the mix of its anchors'. One pass: ``data`` may be a generator.
    """
    recorder = _BatchNormInputSums(template)
    params_only = [{k: v for k, v in s.items() if "running_" not in k} for s in states]
    totals: list[list[torch.Tensor] | None] = [None] * len(states)
    samples = [0] * len(recorder.layers)
    check_data(data, "bn_data")
    inputs = (batch_inputs(batch) for batch in progress_bar(data, progress, desc="BatchNorm statistics", leave=False))
    for x in _several_samples(inputs, "BatchNorm statistics at each point"):
        x = to_model(x, template)
        for i, params in enumerate(params_only):
            with torch.no_grad():
                sums = vmap(recorder.sums, in_dims=(0, None))(params, x) if batched else recorder.sums(params, x)
            totals[i] = sums if totals[i] is None else [a + b for a, b in zip(totals[i], sums)]
        samples = [c + n for c, n in zip(samples, recorder.counts)]
    if totals[0] is None:
        raise ValueError("bn_data yielded no batches; pass training data to re-estimate BatchNorm statistics")
    for state, sums in zip(states, totals):
        for j, name in enumerate(recorder.layers):
            n = samples[j]
            mean = sums[2 * j] / n
            var = (sums[2 * j + 1] / n - mean * mean).clamp_min(0.0) * (n / max(n - 1, 1))
            prefix = f"{name}." if name else ""
            ref = state[prefix + "running_mean"]
            state[prefix + "running_mean"] = mean.to(ref.dtype)
            state[prefix + "running_var"] = var.to(ref.dtype)


class MixtureRepair:
    """REPAIR of points between models: a point's target channel statistics are its weights' mix of the models'.

    At the point ``sum_k w_k theta_k`` every pre-activation module (:func:`repair_endpoints`) gets the
    target mean and std ``sum_k w_k stat_k`` of the models' own (measured once, on ``data``), what an
    interpolated model is repaired towards (Jordan et al. 2023).
    """

    def __init__(self, models: Sequence[nn.Module], data: Iterable[Any], graph: MergeGraph | None = None) -> None:
        self.graph = merge_graph(models[0]) if graph is None else graph
        self.modules = [n for names in repair_endpoints(models[0], self.graph).values() for n in names]
        self.model_stats = [channel_stats(m, self.modules, data) for m in models]
        self.data = data

    def targets(self, weights: Sequence[float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each module's target ``(mean, std)`` at the point with ``weights`` on the models."""
        out = {}
        for name in self.modules:
            mean, std = (float(weights[0]) * part for part in self.model_stats[0][name])
            for w, stats in zip(weights[1:], self.model_stats[1:]):
                mean, std = mean + float(w) * stats[name][0], std + float(w) * stats[name][1]
            out[name] = (mean, std)
        return out

    def __call__(self, point: nn.Module, weights: Sequence[float]) -> nn.Module:
        """A copy of ``point`` (the model at ``weights``) repaired towards :meth:`targets`."""
        return repair(point, None, self.data, graph=self.graph, progress=False, targets=self.targets(weights))
