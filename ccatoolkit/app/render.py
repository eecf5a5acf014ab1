"""Drawing for the notebooks' widgets: ``render_*(ctx, **choices)`` returns a new matplotlib ``Figure``.

The figures are not managed by pyplot, so redraws never pile up open figures; the numbers come
from :mod:`ccatoolkit.app.contexts`.

=====================  =================================  ==========================================
notebook               context                            render / control
=====================  =================================  ==========================================
02 looking inside      :class:`CorrelationContext`        :func:`render_correlation` / ``correlation_widget``
03 merging two models  :class:`MergeContext`              :func:`render_merge` / ``merge_widget``
04 the landscape       :class:`AlphaContext`              :func:`render_alpha` / ``alpha_widget``
05 mode connectivity   :class:`CurveContext`              :func:`render_curve_point` / ``curve_widget``
06 N models            :class:`NModelsContext`            :func:`render_n_models` / ``n_models_widget``
=====================  =================================  ==========================================
"""

from __future__ import annotations

from typing import Any

from ccatoolkit.app.contexts import (
    CCA_METHODS,
    AlphaContext,
    CorrelationContext,
    CurveContext,
    MergeContext,
    NModelsContext,
    alpha_point,
    correlation_views,
    curve_point,
    merge_accuracy,
    n_models_accuracy,
)
from ccatoolkit.plots.analysis import plot_accuracy_bars, plot_accuracy_vs_n, plot_confusion, plot_correlation
from ccatoolkit.landscape.curves import curve_coefficients
from ccatoolkit.plots.landscape import path_end_label, plot_curve_paths, plot_plane, plot_plane_path

__all__ = [
    "render_correlation", "render_merge", "render_alpha", "render_curve_point", "render_n_models", "new_figure",
    "figure_title",
]


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure that pyplot does not manage (redraws never accumulate open figures)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def figure_title(fig: Any) -> str:
    """The text of a figure's suptitle ("" when it has none): what a widget shows above its plot."""
    title = getattr(fig, "_suptitle", None)
    return title.get_text() if title is not None else ""


def render_correlation(ctx: CorrelationContext, layer: str, pair: tuple[str, str] | None = None) -> Any:
    """Three heatmaps of ``layer``'s neuron correlations between two models: original, permuted, CCA-aligned."""
    pair = tuple(pair) if pair is not None else ctx.pairs[0]
    views = correlation_views(ctx, layer, pair)
    fig = new_figure((13, 4))
    axes = fig.subplots(1, len(views))
    for ax, (label, corr) in zip(axes, views.items()):
        plot_correlation(corr, ax=ax, title=label, colorbar=ax is axes[-1],
                         xlabel=f"{pair[1]} neuron", ylabel=f"{pair[0]} neuron")
    fig.suptitle(f"layer {layer}: {pair[0]} vs {pair[1]}")
    return fig


def render_merge(ctx: MergeContext, method: str, ridge: float | str = "auto") -> Any:
    """Bar chart of every method's merged accuracy with ``method`` highlighted (its accuracy in the title)."""
    if method not in ctx.methods:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(ctx.methods)}")
    bars = {m: merge_accuracy(ctx, m, ridge) for m in ctx.methods}
    fig = new_figure((7, 3.8))
    ax = fig.subplots()
    plot_accuracy_bars(bars, ax=ax, highlight=method, reference=ctx.endpoints())
    detail = f" (ridge {ridge if isinstance(ridge, str) else format(ridge, 'g')})" if method in CCA_METHODS else ""
    fig.suptitle(f"{method}{detail}: accuracy {bars[method]:.2%}")
    return fig


def render_alpha(ctx: AlphaContext, alpha: float) -> Any:
    """Accuracy along alpha with the chosen point marked, and the confusion matrix of the model at ``alpha``."""
    point = alpha_point(ctx, alpha)
    fig = new_figure((10, 4))
    ax_curve, ax_conf = fig.subplots(1, 2, width_ratios=[1.2, 1])
    for curve in ctx.curves:
        ax_curve.plot(curve.alphas, curve.accuracy, marker="o", markersize=3, label=getattr(curve, "label", None))
    ax_curve.axvline(point["alpha"], color="black", linestyle=":", linewidth=1)
    ax_curve.plot([point["alpha"]], [point["accuracy"]], marker="*", markersize=14, color="black",
                  linestyle="none", label=f"alpha = {point['alpha']:.2f}")
    ax_curve.set_xlabel(f"alpha (0 = model A, 1 = {path_end_label(ctx.curves) if ctx.curves else 'model B'})")
    ax_curve.set_ylabel("test accuracy")
    ax_curve.set_ylim(0.0, 1.0)
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize="small", loc="lower left")
    plot_confusion(point["confusion"], ax=ax_conf, title=f"alpha = {point['alpha']:.2f}", class_names=ctx.class_names)
    fig.suptitle(f"{ctx.label}, alpha = {point['alpha']:.2f}: accuracy {point['accuracy']:.2%}, "
                 f"loss {point['loss']:.3f}")
    return fig


def render_curve_point(ctx: CurveContext, t: float) -> Any:
    """The loss plane with the curve, the straight line and the point at ``t`` marked; the loss along t beside it."""
    import numpy as np

    point = curve_point(ctx, t)
    fig = new_figure((12, 4.2))
    ax_plane, ax_path = fig.subplots(1, 2, width_ratios=[1.2, 1])
    plot_plane(ctx.plane, ax=ax_plane, metric="loss")
    on_curve = curve_coefficients(ctx.curve.kind, np.linspace(0, 1, 41))[:, [0, 2, 1]]
    plot_plane_path(ctx.plane, on_curve, ax=ax_plane, label="learned curve")
    plot_plane_path(ctx.plane, [[1, 0, 0], [0, 1, 0]], ax=ax_plane, label="straight line", linestyle="--")
    ax_plane.plot(*point["xy"], marker="*", markersize=16, color="red", markeredgecolor="black", linestyle="none")
    ax_plane.set_aspect("auto")
    if ctx.paths:
        plot_curve_paths(ctx.paths, ax=ax_path, metric="loss")
    ax_path.axvline(point["t"], color="black", linestyle=":", linewidth=1)
    ax_path.plot([point["t"]], [point["loss"]], marker="*", markersize=14, color="red", markeredgecolor="black",
                 linestyle="none", label=f"t = {point['t']:.2f}")
    ax_path.set_xlabel("t (0 = model A, 1 = the curve's end)")
    ax_path.set_ylabel("test loss")
    ax_path.legend(fontsize="small")
    fig.suptitle(f"{ctx.curve.kind} curve ({ctx.curve.method}), t = {point['t']:.2f}: test loss {point['loss']:.3f}, "
                 f"accuracy {point['accuracy']:.2%}")
    return fig


def render_n_models(ctx: NModelsContext, n: int, method: str, split: str | None = None) -> Any:
    """Accuracy against N for every method on ``split`` (lines), the chosen (method, N) circled."""
    split = split if split is not None else next(iter(ctx.zoos))
    for m in ctx.methods:
        for k in ctx.ns:
            n_models_accuracy(ctx, k, m, split)
    results = {m: dict(ctx.results[split][m]) for m in ctx.methods}
    fig = new_figure((6.5, 4))
    ax = fig.subplots()
    plot_accuracy_vs_n(results, ax=ax, highlight=(method, n), title=f"{split} split")
    fig.suptitle(f"{method}, N = {n} ({split} split): accuracy {results[method][n]:.2%}")
    return fig
