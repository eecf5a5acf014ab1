"""Loss-landscape plots: interpolation curves, barrier bars, 2-D planes, simplices and curves along t.

Every function draws into the given matplotlib axis (a new figure's axis when ``ax`` is None) and
returns it, so notebooks and widgets can redraw in place. matplotlib is imported only here, inside
the functions.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ccatoolkit.landscape.results import InterpolationResult, PlaneResult, SimplexResult, barrier
from ccatoolkit.plots.style import METHOD_COLORS, method_color

__all__ = [
    "plot_interpolation", "plot_barriers", "plot_plane", "plot_plane_path", "plot_curve_paths", "plot_simplex",
    "path_end_label", "plot_barriers_against", "plot_pam_rounds",
]

_YLABEL = {"loss": "test loss", "accuracy": "test accuracy"}


def _axis(ax: Any) -> Any:
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(5, 3.5))
    return ax


def _check(metric: str) -> str:
    if metric not in ("loss", "accuracy"):
        raise ValueError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
    return metric


def _as_list(results: Any) -> list[InterpolationResult]:
    if isinstance(results, dict):
        return list(results.values())
    return list(results) if isinstance(results, (list, tuple)) else [results]


def path_end_label(results: Sequence[InterpolationResult] | InterpolationResult) -> str:
    """What position 1 of these paths is: ``"model B"`` (unaligned paths), ``"B (aligned)"`` (aligned ones) or both.

    An aligned path ends at B aligned to A, which is B itself only for a permutation: a CCA map is exact
    only without the non-linearities, so its end computes a different (usually worse) function.
    """
    aligned = {getattr(r, "method", "none") != "none" for r in _as_list(results)}
    if aligned == {True}:
        return "B (aligned)"
    if aligned == {True, False}:
        return "B or B (aligned)"
    return "model B"


def plot_interpolation(results: Sequence[InterpolationResult] | InterpolationResult, ax: Any = None, metric: str = "loss",
                       title: str | None = None) -> Any:
    """Loss or accuracy along alpha for several interpolation results on one axis, with a legend.

    Non-finite points are left out of the line (gaps), so a curve through a diverging region still draws.
    """
    metric = _check(metric)
    ax = _axis(ax)
    for r in _as_list(results):
        values = np.asarray(getattr(r, metric), dtype=np.float64)
        values = np.where(np.isfinite(values), values, np.nan)
        ax.plot(r.alphas, values, marker="o", markersize=3, label=getattr(r, "label", None))
    return _finish_path_axis(ax, f"alpha (0 = model A, 1 = {path_end_label(results)})", metric, title)


def _finish_path_axis(ax: Any, xlabel: str, metric: str, title: str | None) -> Any:
    """Labels, title, grid and legend shared by the plots of values along a path."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_YLABEL[metric])
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def plot_barriers(results: Sequence[InterpolationResult] | InterpolationResult, ax: Any = None, metric: str = "loss",
                  title: str | None = None) -> Any:
    """A bar chart of the barriers of several results (one bar per method), values written on the bars."""
    metric = _check(metric)
    ax = _axis(ax)
    items = _as_list(results)
    labels = [getattr(r, "label", str(i)) for i, r in enumerate(items)]
    values = [barrier(r, metric=metric) for r in items]
    bars = ax.bar(range(len(values)), [v if np.isfinite(v) else 0.0 for v in values], color="C0")
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize="small")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_ylabel(f"{metric} barrier")
    if title:
        ax.set_title(title)
    return ax


def plot_plane(plane: PlaneResult, ax: Any = None, metric: str = "loss", levels: int | Sequence[float] = 20,
               title: str | None = None, log: bool | None = None) -> Any:
    """Filled contours of a :class:`~ccatoolkit.landscape.PlaneResult` with the three models marked and labelled.

    Loss is drawn on a log scale by default (its range spans orders of magnitude on a plane).
    """
    metric = _check(metric)
    ax = _axis(ax)
    z = np.asarray(getattr(plane, metric), dtype=np.float64)
    z = np.where(np.isfinite(z), z, np.nan)
    log = (metric == "loss") if log is None else log
    if log:
        z = np.log10(np.clip(z, 1e-8, None))
    finite = z[np.isfinite(z)]
    if isinstance(levels, int) and finite.size and finite.min() == finite.max():
        levels = np.linspace(finite.min() - 1e-6, finite.max() + 1e-6, 3)
    contour = ax.contourf(plane.xs, plane.ys, z, levels=levels, cmap="viridis_r" if metric == "loss" else "viridis")
    ax.contour(plane.xs, plane.ys, z, levels=contour.levels, colors="k", linewidths=0.3, alpha=0.5)
    colorbar = ax.figure.colorbar(contour, ax=ax)  # this axis's figure, pyplot-managed or not
    colorbar.set_label(f"log10 {metric}" if log else metric)
    for (x, y), name in zip(plane.coords, plane.labels):
        ax.plot(x, y, marker="o", color="white", markeredgecolor="black", markersize=8)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), color="white", fontweight="bold")
    ax.set_xlabel(f"u (towards {plane.labels[1]})")
    ax.set_ylabel(f"v (towards {plane.labels[2]}, orthogonalised)")
    ax.set_aspect("equal", adjustable="box")
    if title:
        ax.set_title(title)
    return ax


def plot_plane_path(plane: PlaneResult, weights: Sequence[Sequence[float]] | np.ndarray, ax: Any = None,
                    label: str | None = None, **style: Any) -> Any:
    """Draw a path on a plane's plot: its points given by ``weights`` ``(P, 3)`` on the plane's three models.

    A point ``wa A + wb B + wc C`` (weights summing to 1) lies in the plane at ``weights @ plane.coords``;
    e.g. a quadratic Bezier curve from A to B with control point C (``curve_coefficients`` gives its
    weights on A, C, B: reorder the columns to the plane's order). ``style`` goes to ``ax.plot``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != 3:
        raise ValueError(f"weights must have shape (P, 3) (one weight per model of the plane), got {w.shape}")
    if not np.allclose(w.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("each row of weights must sum to 1 (an affine combination of the plane's three models)")
    ax = _axis(ax)
    xy = w @ np.asarray(plane.coords, dtype=np.float64)
    style = {"color": "white", "linewidth": 2, **style}
    ax.plot(xy[:, 0], xy[:, 1], label=label, **style)
    if label:
        ax.legend(fontsize="small", loc="best", facecolor="0.55", framealpha=0.8)  # grey: white lines stay visible
    return ax


def plot_curve_paths(results: Sequence[InterpolationResult] | InterpolationResult, ax: Any = None, metric: str = "loss",
                     title: str | None = None) -> Any:
    """Loss or accuracy along t for linear paths (dashed) and learned curves (solid), colours paired by alignment."""
    metric = _check(metric)
    ax = _axis(ax)
    colours: dict[str, str] = {}
    for r in _as_list(results):
        method = getattr(r, "method", "none")
        colour = colours.setdefault(method, method_color(str(method)) if str(method) in METHOD_COLORS
                                    else f"C{len(colours)}")
        learned = hasattr(r, "kind")
        values = np.asarray(getattr(r, metric), dtype=np.float64)
        values = np.where(np.isfinite(values), values, np.nan)
        ax.plot(r.alphas, values, color=colour, linestyle="-" if learned else "--",
                marker="o" if learned else None, markersize=3, label=getattr(r, "label", None))
    return _finish_path_axis(ax, f"t (0 = model A, 1 = {path_end_label(results)})", metric, title)


def plot_simplex(result: SimplexResult, ax: Any = None, metric: str = "loss", levels: int = 20,
                 title: str | None = None) -> Any:
    """Filled contours on the triangle of a :class:`~ccatoolkit.landscape.SimplexResult`, corners labelled."""
    import matplotlib.tri as mtri

    metric = _check(metric)
    ax = _axis(ax)
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    xy = np.asarray(result.weights) @ corners
    z = np.asarray(getattr(result, metric), dtype=np.float64)
    z = np.where(np.isfinite(z), z, np.nanmax(np.where(np.isfinite(z), z, np.nan)) if np.isfinite(z).any() else 0.0)
    tri = mtri.Triangulation(xy[:, 0], xy[:, 1])
    contour = ax.tricontourf(tri, z, levels=levels, cmap="viridis_r" if metric == "loss" else "viridis")
    ax.figure.colorbar(contour, ax=ax).set_label(metric)
    for (x, y), name in zip(corners, result.labels):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontweight="bold")
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title)
    return ax


def plot_barriers_against(results: Sequence[InterpolationResult] | InterpolationResult, reference: InterpolationResult,
                          ax: Any = None, metric: str = "loss", title: str | None = None) -> Any:
    """Each path's barrier against ``reference``'s ends (the unaligned path: the real A and B), one bar per path.

    Bars take the method's colour (:func:`ccatoolkit.plots.style.method_color`). A path whose end is not B
    (its end value differs from ``reference``'s: a CCA-aligned B' computes another function) gets a second,
    hatched bar beside it: its barrier against its own end B', labelled so. Values are written on the bars.
    """
    metric = _check(metric)
    ax = _axis(ax)
    b_end = reference.ends(metric)[1]
    bars: list[tuple[str, float, str, bool]] = []  # label, value, colour, against its own end
    for r in _as_list(results):
        method = str(getattr(r, "method", "none"))
        label = str(getattr(r, "label", method))
        colour = method_color(method, default=method_color(label))
        bars.append((f"{label}\nvs B", barrier(r, metric=metric, against=reference), colour, False))
        if not np.isclose(r.ends(metric)[1], b_end, rtol=1e-4, atol=1e-6):
            bars.append((f"{label}\nvs its own end B'", barrier(r, metric=metric), colour, True))
    values = [v for _, v, _, _ in bars]
    drawn = ax.bar(range(len(bars)), [v if np.isfinite(v) else 0.0 for v in values],
                   color=[c for _, _, c, _ in bars], edgecolor="black", linewidth=0.6)
    for patch, (_, v, _, own) in zip(drawn, bars):
        if own:
            patch.set_hatch("//")
            patch.set_alpha(0.55)
        ax.annotate(f"{v:.3f}", (patch.get_x() + patch.get_width() / 2, patch.get_height()),
                    ha="center", va="bottom", fontsize="small")
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([label for label, _, _, _ in bars], fontsize="small")
    ax.set_ylabel(f"{metric} barrier")
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return ax


def plot_pam_rounds(results: dict[str, Any], axes: Sequence[Any] | None = None, colors: dict[str, str] | None = None,
                    linestyles: dict[str, str] | None = None, title: str | None = None) -> Sequence[Any]:
    """PAM round by round (:func:`ccatoolkit.landscape.pam.train_curve_pam`), one run per entry of ``results``.

    Left: the fraction of B's neurons each round's permutation step moved (grouped bars, values written on
    them, so a run that moved nothing shows "0%"). Right: the test loss at the curve's midpoint after each
    round's curve step (:attr:`PamResult.midpoint`: run PAM with ``eval_data``). ``results``:
    ``{label: PamResult}``; ``colors`` and ``linestyles`` by label (default: the start's colour,
    :func:`~ccatoolkit.plots.style.method_color`, and a solid line). ``axes``: two axes (default: a new
    figure). Returns the two axes.
    """
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    if axes is None:
        import matplotlib.pyplot as plt

        _, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    moved_ax, loss_ax = axes
    colors, linestyles = dict(colors or {}), dict(linestyles or {})
    runs = list(results.items())
    width = 0.8 / max(len(runs), 1)
    for k, (label, r) in enumerate(runs):
        colour = colors.get(label, method_color(str(getattr(r, "start", label))))
        rounds = np.arange(1, len(r.moved) + 1)
        x = rounds + (k - (len(runs) - 1) / 2) * width
        bars = moved_ax.bar(x, r.moved, width=width, color=colour, label=label, edgecolor="black", linewidth=0.5)
        for bar, value in zip(bars, r.moved):
            moved_ax.annotate(f"{value:.0%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize="x-small")
        if len(r.midpoint):
            loss_ax.plot(np.arange(1, len(r.midpoint) + 1), r.midpoint, marker="o", color=colour,
                         linestyle=linestyles.get(label, "-"), label=label)
    moved_ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    moved_ax.set_ylim(0, max([0.1] + [max(r.moved, default=0.0) for _, r in runs]) * 1.18)
    moved_ax.set(xlabel="round (its permutation step)", ylabel="neurons moved", title="neurons re-paired per round")
    loss_ax.set(xlabel="round (after its curve step)", ylabel="test loss at t = 0.5", title="the curve's midpoint")
    for ax in (moved_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, axis="y" if ax is moved_ax else "both")
        ax.legend(fontsize="small")
    if title:
        moved_ax.figure.suptitle(title)
    return axes
