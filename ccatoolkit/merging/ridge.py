"""Choosing CCA's ridge for a merge (``ridge="auto"``), without labels by default.

The default rule fits the transforms on 3 of every 4 batches of the merge data and keeps the ridge
whose merge agrees best with the models' ensemble on the held-out batches (:func:`agreement_scorer`).
``rule="correlation"`` scores the aligned features' held-out correlation instead, with no merge per
candidate (cheaper, measured worse: docs/design.md, "Measured"). With validation data the ridge whose
merge is most accurate there wins. Every candidate reuses one set of statistics and each space's
eigendecompositions (the solvers' cache).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ccatoolkit import distributed
from ccatoolkit._utils import batch_inputs, check_logits, eval_mode, to_model
from ccatoolkit.analysis.linalg import as_dense
from ccatoolkit.analysis.stats import JointStats
from ccatoolkit.merging.graph import MergeGraph
from ccatoolkit.merging.methods import AlignmentProblem, Transforms
from ccatoolkit.merging.prepare import Prepared, check_ridge
from ccatoolkit.zoo.training import evaluate

__all__ = ["DEFAULT_RIDGE", "RIDGE_GRID", "RIDGE_RULES", "RidgeChoice", "choose_ridge", "check_ridge_setting",
           "problem_solver"]

#: CCA's ridge when one is not chosen from data (``align_to``, or merge data too small to hold out batches).
DEFAULT_RIDGE = 0.1
#: The ridges ``ridge="auto"`` chooses from (docs/design.md, "Measured": why these four).
RIDGE_GRID: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0)
#: Label-free rules; the first is the default.
RIDGE_RULES = ("agreement", "correlation")
#: Label-free selection holds out every this-many-th batch of the merge data.
HOLD_OUT_EVERY = 4

# builds a merged model from transforms; candidate_batches: the held-out count when scoring a candidate
Builder = Callable[[list[Transforms | None], int | None], nn.Module]
# computes transforms at a ridge from given statistics, reusing ``cache`` across ridges
Solver = Callable[[dict[str, JointStats], float, dict[Any, Any]], list[Transforms | None]]
# collects a merge's joint statistics over the given batches: (batches, show progress[, cross_only, start])
Collector = Callable[..., dict[str, JointStats]]


@dataclass
class RidgeChoice:
    """The chosen ``value``, the ``rule`` that chose it (as ``merge_info["ridge_selection"]`` says it), every
    candidate's score, the statistics of all the merge data (the final merge reuses them) and, when the best
    candidate already is the final merge (validation accuracy), that model."""

    value: float
    rule: str
    scores: dict[float, float] = field(default_factory=dict)
    statistics: dict[str, JointStats] | None = None
    merged: nn.Module | None = None


@torch.no_grad()
def agreement_scorer(models: Sequence[nn.Module], held_out: Sequence[Any]) -> Callable[[nn.Module], float]:
    """A function ``merged -> score``: how closely ``merged`` reproduces the ensemble on ``held_out`` (higher is better).

    Classifiers (2-D outputs with several columns): ``-KL(ensemble || merged)`` per sample, the
    ensemble being the average of the models' predicted distributions. Other outputs: minus the mean
    squared difference from the models' mean output. The ensemble's outputs are computed once.
    """
    inputs = [to_model(batch_inputs(b), models[0]) for b in held_out]
    with eval_mode(*models):
        outs = [torch.stack([check_logits(m(x), m, "ridge='auto'") for m in models]) for x in inputs]
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
        total, seen = distributed.sum_over_ranks([total, count])  # under torchrun: over every rank's batches
        return total / max(seen, 1)

    return score


def held_out_correlation(
    held: dict[str, JointStats], graph: MergeGraph, ref: int, transforms: Sequence[Transforms | None]
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
            T = as_dense(t[space.name][0]).to(st.cov(ref, ref).device, torch.float64)
            cross = (st.cov(ref, k) * T).sum(1)  # diag(S_rk T^T)
            var_t = ((T @ st.cov(k, k)) * T).sum(1)  # diag(T S_kk T^T)
            denom = torch.sqrt(st.var(ref).clamp_min(0) * var_t.clamp_min(0))
            corr = torch.where(denom > 0, cross / denom.clamp_min(1e-300), torch.zeros_like(cross))
            values.append(float(corr.mean()))
    return float(np.mean(values)) if values else 0.0


def _by_validation(prepared: Prepared, grid: Sequence[float], val_data: Any, collect: Collector, solve: Solver,
                   build: Builder) -> RidgeChoice:
    """The ridge whose merge (on the statistics of all the data) is most accurate on ``val_data``; that merge is
    the result."""
    stats = collect(prepared.data, True)
    scores: dict[float, float] = {}
    best: tuple[float, nn.Module] | None = None
    cache: dict[Any, Any] = {}
    for r in grid:
        merged = build(solve(stats, r, cache), None)
        result = evaluate(merged, val_data)
        correct, count = distributed.sum_over_ranks([result["accuracy"] * result["n"], result["n"]])
        scores[r] = round(correct) / max(count, 1)
        if best is None or scores[r] > scores[best[0]]:  # the first of equal scores wins, as max() picks it
            best = (r, merged)
    assert best is not None
    return RidgeChoice(best[0], "validation accuracy", scores, stats, best[1])


def choose_ridge(
    prepared: Prepared, grid: Sequence[float], rule: str, val_data: Any, collect: Collector, solve: Solver,
    build: Builder,
) -> RidgeChoice:
    """The ridge for ``ridge="auto"`` (see the module doc).

    Without ``val_data`` the split is made in one pass and the held-out batches are kept, so a shuffling
    DataLoader cannot mix the two parts; the final merge then uses all batches, so no candidate is the
    result. With fewer than ``HOLD_OUT_EVERY`` batches nothing is held out and :data:`DEFAULT_RIDGE` is used.
    A candidate's BatchNorm statistics come from as many batches as are held out (``build``'s second
    argument), which ranks the ridges as the full pass does at a quarter of its cost.
    """
    if val_data is not None:
        return _by_validation(prepared, grid, val_data, collect, solve, build)
    held_out: list[Any] = []

    def fit_batches() -> Iterator[Any]:  # one pass: every 4th batch is kept aside, the others feed the statistics
        for i, batch in enumerate(itertools.islice(iter(prepared.data), prepared.max_batches)):
            if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1:
                held_out.append(batch)
            else:
                yield batch

    fit_stats = collect(fit_batches(), True)
    ranks_without, total_held_out = distributed.sum_over_ranks([not held_out, len(held_out)])  # all ranks alike
    if ranks_without and total_held_out:
        raise ValueError(f"ridge='auto' under torch.distributed: {int(ranks_without)} rank(s) had fewer than "
                         f"{HOLD_OUT_EVERY} batches, so they hold none out; give every rank at least "
                         f"{HOLD_OUT_EVERY} batches (shards of equal size) or pass a fixed ridge")
    if not total_held_out:
        return RidgeChoice(DEFAULT_RIDGE, f"default (fewer than {HOLD_OUT_EVERY} batches: none held out)",
                           statistics=fit_stats)
    # the agreement rule reads the held-out batches' statistics only for the final merge: they are collected
    # after the candidates, so a wide model never holds two sets of joint Gram matrices with them
    held_stats = collect(held_out, False) if rule != "agreement" else None
    score = agreement_scorer(prepared.models, held_out) if rule == "agreement" else None
    scores: dict[float, float] = {}
    cache: dict[Any, Any] = {}
    for r in grid:
        transforms = solve(fit_stats, r, cache)
        if score is None:
            assert held_stats is not None
            scores[r] = held_out_correlation(held_stats, prepared.graph, prepared.reference, transforms)
        else:
            scores[r] = score(build(transforms, len(held_out)))
        del transforms  # before the next candidate's are made (dense maps of every space)
    cache.clear()  # the eigendecompositions of the fitting statistics
    if held_stats is None:  # the held-out batches go into the fitting sums: one Gram matrix per space, not three
        stats = collect(held_out, False, start=_continued(fit_stats))
    else:
        stats = {name: fit_stats.pop(name) + held_stats.pop(name) for name in list(fit_stats)}
    described = ("agreement with the ensemble on held-out batches" if rule == "agreement"
                 else "correlation of the aligned features on held-out batches")
    return RidgeChoice(max(scores, key=scores.__getitem__), described, scores, stats)


def _continued(fit_stats: dict[str, JointStats]) -> dict[str, JointStats]:
    """What the held-out statistics go on from: the fitting statistics (all-reduced already, so under
    ``torch.distributed`` rank 0 alone carries them and the final all-reduce counts them once), emptied out
    of ``fit_stats``."""
    taken = {name: fit_stats.pop(name) for name in list(fit_stats)}
    return taken if distributed.rank() == 0 else {}


def check_ridge_setting(ridge: float | str, grid: Sequence[float], rule: str) -> tuple[float | str, tuple[float, ...]]:
    """``(ridge, grid)`` checked: a number >= 0 or "auto", a non-empty grid of such numbers, a known rule."""
    checked_grid = tuple(check_ridge(r, "ridge_grid value") for r in grid)
    if not checked_grid:
        raise ValueError("ridge_grid is empty: pass at least one ridge, e.g. ridge_grid=(0.1, 1.0)")
    if rule not in RIDGE_RULES:
        raise ValueError(f"ridge_rule must be one of {RIDGE_RULES}, got {rule!r}")
    if isinstance(ridge, str):
        if ridge != "auto":
            raise ValueError(f"ridge must be a number >= 0 or 'auto', got {ridge!r}")
        return ridge, checked_grid
    return check_ridge(ridge), checked_grid


def problem_solver(prepared: Prepared, options: dict[str, Any]) -> Solver:
    """The method's transforms at any ridge from given statistics (the ridge choice's ``solve``)."""

    def solve(stats: dict[str, JointStats], ridge: float, cache: dict[Any, Any]) -> list[Transforms | None]:
        problem = AlignmentProblem(prepared.models, prepared.reference, prepared.graph, stats, ridge, cache)
        return prepared.method(problem, **options).transforms

    return solve
