"""The second step of a merge: the models' joint activation statistics at every space of the merge graph.

One streamed pass of all models over the merge data (:func:`~ccatoolkit.analysis.stats.collect_statistics`).
A method that matches each model to the reference only ("cross" statistics, activation matching) needs the
covariances with the reference and every channel's variance: a quarter of two models' joint Gram.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ccatoolkit.analysis.linalg import condition_number
from ccatoolkit.analysis.stats import JointStats, collect_statistics, warn_if_constant
from ccatoolkit.merging.graph import MergeGraph

__all__ = ["merge_statistics", "warn_if_unreliable"]

#: A ridge below this meets an ill-conditioned covariance with a warning (CCA then amplifies noise).
SMALL_RIDGE = 1e-6
#: Covariances of live channels with a larger condition number count as ill-conditioned.
ILL_CONDITIONED = 1e6


def merge_statistics(
    models: Sequence[nn.Module], graph: MergeGraph, data: Iterable[Any], max_batches: int | None, progress: bool,
    reference: int | None = None, also: Sequence[Mapping[str, Callable[[Any], None]]] | None = None,
    start: Mapping[str, JointStats] | None = None,
) -> dict[str, JointStats]:
    """Per space, the statistics of its capture points' activations; with ``reference``, cross-only.
    ``also``: per model, other modules' output hooks fed by the same passes (REPAIR's moments). ``start``:
    statistics of other batches to add these to (consumed)."""
    layers = {s.name: list(s.capture) for s in graph.spaces}
    return collect_statistics(models, data, layers, max_batches=max_batches, progress=progress, warn=False,
                              reference=reference, also=also, start=start)


def warn_if_unreliable(stats: dict[str, JointStats], method: str, ridge: float | None) -> None:
    """Warn when the statistics cannot support the transforms: fewer samples than channels, or (CCA with a
    ridge below ``SMALL_RIDGE``) a covariance of live channels that is ill-conditioned; and when every
    channel is constant (blank inputs: the statistics carry no information, any alignment is arbitrary)."""
    warn_if_constant(stats, "the merge data")
    for name, st in stats.items():
        st.warn_if_rank_deficient(ridge, space=name)
    if ridge is None or ridge >= SMALL_RIDGE:
        return
    bad = []
    for name, st in stats.items():
        for k in range(st.num_models):
            alive = st.alive(k)
            cond = condition_number(st.cov(k)[alive][:, alive])
            if cond > ILL_CONDITIONED:
                bad.append(f"{name!r} (model {k}: condition number {cond:.2g})")
    if bad:
        warnings.warn(
            f"{method} with ridge={ridge:g} on ill-conditioned covariances of {', '.join(bad)}: the inverse "
            "square roots amplify noise and the merge can be far worse than its models; use ridge='auto' "
            "(merge) or a ridge of at least 1e-3",
            RuntimeWarning,
            stacklevel=3,
        )
