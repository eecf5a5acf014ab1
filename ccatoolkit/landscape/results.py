"""Results of paths through weight space (curves, planes, simplices) and the loss barrier.

Plain data classes of numpy arrays: cheap to cache, compare and plot. They know nothing of
drawing: :mod:`ccatoolkit.plots.landscape` draws them (``plot_interpolation``, ``plot_plane``,
``plot_simplex``), so the results need no matplotlib and the layers never import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["InterpolationResult", "PlaneResult", "SimplexResult", "barrier", "check_metric"]


@dataclass
class InterpolationResult:
    """Loss and accuracy along a path between two models, at positions ``alphas`` (0 = A, 1 = B).

    ``confusion``: each point's confusion counts ``(points, classes, classes)`` (rows: true class),
    when the path was evaluated with ``confusion=True``; else None.
    """

    alphas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    label: str = "linear"
    method: str = "none"
    reset_bn: bool = False
    confusion: np.ndarray | None = None

    def barrier(self, metric: str = "loss", against: "InterpolationResult | None" = None) -> float:
        """The barrier of this curve (see :func:`barrier`; ``against`` measures it against another path's ends)."""
        return barrier(self, metric=metric, against=against)

    def ends(self, metric: str = "loss") -> tuple[float, float]:
        """The values at ``alpha = 0`` (A) and ``alpha = 1`` (this path's end: B, or B aligned)."""
        return _ends(np.asarray(self.values(metric), dtype=np.float64), np.asarray(self.alphas, dtype=np.float64))

    def values(self, metric: str = "loss") -> np.ndarray:
        """The array for ``metric`` (``"loss"`` or ``"accuracy"``)."""
        return getattr(self, check_metric(metric))



@dataclass
class PlaneResult:
    """Loss and accuracy on the plane through three models (Garipov et al. 2018).

    ``xs``/``ys`` are the grid's coordinates along the orthonormal axes ``u`` (towards model B)
    and ``v`` (towards model C, orthogonalised); ``loss``/``accuracy`` have shape
    ``(len(ys), len(xs))``. ``coords`` are the three models' coordinates, ``model_loss`` and
    ``model_accuracy`` the values evaluated at exactly those points.
    """

    xs: np.ndarray
    ys: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    coords: np.ndarray  # (3, 2)
    labels: tuple[str, str, str] = ("A", "B", "C")
    model_loss: np.ndarray = field(default_factory=lambda: np.zeros(3))
    model_accuracy: np.ndarray = field(default_factory=lambda: np.zeros(3))
    reset_bn: bool = False

    def values(self, metric: str = "loss") -> np.ndarray:
        return getattr(self, check_metric(metric))



@dataclass
class SimplexResult:
    """Loss and accuracy on barycentric grid points ``weights`` (P, 3) of the simplex through three models."""

    weights: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    labels: tuple[str, str, str] = ("A", "B", "C")
    reset_bn: bool = False

    def values(self, metric: str = "loss") -> np.ndarray:
        return getattr(self, check_metric(metric))



def check_metric(metric: str) -> str:
    """``metric`` if it is ``"loss"`` or ``"accuracy"``; a ``ValueError`` otherwise."""
    if metric not in ("loss", "accuracy"):
        raise ValueError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
    return metric


# --------------------------------------------------------------------------- barrier


def _ends(values: np.ndarray, grid: np.ndarray) -> tuple[float, float]:
    start, end = np.flatnonzero(np.isclose(grid, 0.0)), np.flatnonzero(np.isclose(grid, 1.0))
    if start.size == 0 or end.size == 0:
        raise ValueError("the barrier is measured against the end points: the alpha grid must contain 0 and 1")
    return float(values[start[0]]), float(values[end[0]])


def barrier(
    result_or_values: InterpolationResult | Sequence[float] | np.ndarray,
    metric: str = "loss",
    alphas: Sequence[float] | np.ndarray | None = None,
    against: InterpolationResult | None = None,
) -> float:
    """The barrier along a curve: the largest gap between the curve and the straight line between its ends.

    Loss: ``max_a [L(a) - ((1-a) L(0) + a L(1))]``; accuracy: ``max_a [((1-a) acc(0) + a acc(1)) - acc(a)]``
    (Frankle et al. 2020, Entezari et al. 2022), over the grid points with ``0 <= a <= 1``. The grid must
    contain 0 and 1. ``result_or_values`` is an :class:`InterpolationResult` (or a curve result) or a
    sequence of values, then on ``alphas`` (default: evenly spaced from 0 to 1). A non-finite value
    on the path gives a non-finite barrier.

    ``against``: another path's result whose end values replace this path's in the straight line. A path
    to an aligned B' ends at B', not at B; when B' computes a different function (CCA alignment through
    ReLUs), ``barrier(path_to_b_prime, against=path_to_b)`` is the barrier against the real A and B.
    """
    metric = check_metric(metric)
    if isinstance(result_or_values, InterpolationResult):
        values = np.asarray(result_or_values.values(metric), dtype=np.float64)
        grid = np.asarray(result_or_values.alphas, dtype=np.float64)
    else:
        values = np.asarray(result_or_values, dtype=np.float64).reshape(-1)
        grid = np.linspace(0.0, 1.0, len(values)) if alphas is None else np.asarray(alphas, dtype=np.float64)
    if values.size == 0:
        raise ValueError("barrier needs at least the two end points, got no values")
    if grid.shape != values.shape:
        raise ValueError(f"barrier got {values.size} values but {grid.size} alphas; pass one alpha per value")
    first, last = _ends(values, grid)
    if against is not None:
        first, last = against.ends(metric)
    inside = (grid >= -1e-12) & (grid <= 1 + 1e-12)
    a, v = grid[inside], values[inside]
    line = (1 - a) * first + a * last
    gap = v - line if metric == "loss" else line - v
    with np.errstate(invalid="ignore"):
        if np.isnan(gap).any():
            return float("nan")
        return float(max(0.0, np.max(gap)))
