"""Drawing for the notebooks' widgets: ``render_*(ctx, **choices)`` returns a new matplotlib ``Figure``.

The figures are not managed by pyplot, so redraws never pile up open figures; the numbers come
from :mod:`ccatoolkit.app.contexts` (and :mod:`ccatoolkit.app.experiments`). A widget keeps a *view* instead (:class:`MergeView`,
:class:`AlphaView`, :class:`NModelsView`, all :class:`LiveFigure`): the same figure, whose update
changes a few artists in place and re-encodes only them, so a slider move is a look-up and a blit.
``render_*`` is a view's first figure.

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

import io

from ccatoolkit.app.contexts import (
    CCA_METHODS,
    AlphaContext,
    CorrelationContext,
    CurveContext,
    MergeContext,
    alpha_point,
    correlation_views,
    curve_point,
    merge_accuracy,
)
from ccatoolkit.app.experiments import NModelsContext, n_models_accuracy
from ccatoolkit.landscape.curves import curve_coefficients
from ccatoolkit.plots.analysis import (
    plot_accuracy_bars,
    plot_accuracy_vs_n,
    plot_confusion,
    plot_correlation,
    update_accuracy_bars,
    update_confusion,
)
from ccatoolkit.plots.landscape import path_end_label, plot_curve_paths, plot_plane, plot_plane_path
from ccatoolkit.plots.style import method_color

__all__ = [
    "render_correlation", "render_merge", "render_alpha", "render_curve_point", "render_n_models", "new_figure",
    "figure_title", "LiveFigure", "AlphaView", "MergeView", "NModelsView",
]


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure that pyplot does not manage (redraws never accumulate open figures)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_title(fig: Any) -> str:
    """The text of a figure's suptitle ("" when it has none): what a widget shows above its plot."""
    title = getattr(fig, "_suptitle", None)
    return title.get_text() if title is not None else ""


class LiveFigure:
    """A figure that a widget keeps and changes in place, and encodes to PNG by drawing only what changed.

    A view draws its figure once and lists in ``dynamic`` the artists an update changes (a marker, an
    image, texts). :meth:`png` renders the rest (axes, ticks, static curves) once into a cached
    background and, on later calls, pastes that background and draws the dynamic artists over it
    (Agg blitting): text layout and the static artists are not redone on a slider move. The layout
    is frozen after the first draw. A view that changes static content calls :meth:`invalidate`.
    ``figure`` stays a complete matplotlib figure (``savefig`` draws everything).
    """

    dpi = 72  # widget images: about 720 px wide for a 10-inch figure

    def __init__(self, figsize: tuple[float, float]) -> None:
        self.figure = new_figure(figsize)
        self.dynamic: list[Any] = []
        self.full_draws = 0  # renders of the static background (the slow path)
        self._background: Any = None

    def invalidate(self) -> None:
        """The static part changed: the next :meth:`png` renders the whole figure again."""
        self._background = None

    def png(self) -> bytes:
        """The figure as PNG bytes (fast when only the dynamic artists changed since the last call)."""
        from PIL import Image

        fig, canvas = self.figure, self.figure.canvas
        if self._background is None:
            fig.set_dpi(self.dpi)
            for artist in self.dynamic:
                artist.set_animated(True)  # left out of the background
            canvas.draw()
            fig.set_layout_engine("none")  # positions stay: later draws skip the layout
            self._background = canvas.copy_from_bbox(fig.bbox)
            self.full_draws += 1
        else:
            canvas.restore_region(self._background)
        for artist in self.dynamic:
            fig.draw_artist(artist)
            artist.set_animated(False)  # so a plain savefig still draws it
        width, height = canvas.get_width_height(physical=True)
        image = Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="png", compress_level=1)
        return buf.getvalue()


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


def _ridge_text(method: str, ridge: float | str) -> str:
    return f" (ridge {ridge if isinstance(ridge, str) else format(ridge, 'g')})" if method in CCA_METHODS else ""


class MergeView(LiveFigure):
    """Every method's merged accuracy as bars, ``method`` highlighted; a method or ridge change updates the bars in place."""

    def __init__(self, ctx: MergeContext) -> None:
        super().__init__((7, 3.8))
        self.ctx = ctx
        self.ax = self.figure.subplots()
        self._top = 0.0
        self.title = self.figure.suptitle(" ")

    def update(self, method: str, ridge: float | str = "auto") -> "MergeView":
        ctx = self.ctx
        if method not in ctx.methods:
            raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(ctx.methods)}")
        bars = {m: merge_accuracy(ctx, m, ridge) for m in ctx.methods}
        if not self.ax.patches:
            plot_accuracy_bars(bars, ax=self.ax, highlight=method, reference=ctx.endpoints())
            self._top = self.ax.get_ylim()[1]
            self.dynamic = [*self.ax.patches, *[t for t in self.ax.texts if hasattr(t, "xy")], self.title]
        else:
            update_accuracy_bars(self.ax, bars, highlight=method)
            if max(bars.values()) * 1.05 > self._top:  # a bar outgrew the axis: new limits, new background
                self._top = min(1.05, max(bars.values()) * 1.15 + 0.02)
                self.ax.set_ylim(0.0, self._top)
                self.invalidate()
        self.title.set_text(f"{method}{_ridge_text(method, ridge)}: accuracy {bars[method]:.2%}")
        return self


def render_merge(ctx: MergeContext, method: str, ridge: float | str = "auto") -> Any:
    """Bar chart of every method's merged accuracy with ``method`` highlighted (its accuracy in the title)."""
    return MergeView(ctx).update(method, ridge).figure


class AlphaView(LiveFigure):
    """Accuracy along alpha for every path, the chosen path and point marked, and that point's confusion matrix.

    Built once from the context's precomputed paths; a change of alpha or method moves the marker,
    the highlighted path and the confusion image in place (no model is evaluated). ``annotate``: which
    cells carry their value (:func:`~ccatoolkit.plots.analysis.plot_confusion`); the widget writes the
    diagonal only, as a hundred texts cost more to draw than everything else a move changes.
    """

    def __init__(self, ctx: AlphaContext, annotate: bool | str = True) -> None:
        super().__init__((10, 4))
        self.ctx = ctx
        ax_curve, ax_conf = self.figure.subplots(1, 2, width_ratios=[1.2, 1])
        self.ax_curve, self.ax_conf = ax_curve, ax_conf
        self.lines = {}
        for curve in ctx.curves:
            (self.lines[curve.label],) = ax_curve.plot(curve.alphas, curve.accuracy, marker="o", markersize=3,
                                                       alpha=0.5, label=curve.label,
                                                       color=method_color(str(getattr(curve, "method", "none"))))
        (self.chosen,) = ax_curve.plot([], [], linewidth=3, marker="o", markersize=4)
        self.vline = ax_curve.axvline(0.0, color="black", linestyle=":", linewidth=1)
        (self.star,) = ax_curve.plot([], [], marker="*", markersize=14, color="black", linestyle="none")
        ax_curve.set_xlabel(f"alpha (0 = model A, 1 = {path_end_label(ctx.curves)})")
        ax_curve.set_ylabel("test accuracy")
        ax_curve.set_ylim(0.0, 1.0)
        ax_curve.grid(alpha=0.3)
        ax_curve.legend(fontsize="small", loc="lower left")
        first = alpha_point(ctx, ctx.alphas[0])
        plot_confusion(first["confusion"], ax=ax_conf, title="alpha", class_names=ctx.class_names, annotate=annotate)
        self.title = self.figure.suptitle(" ")
        self.dynamic = [self.chosen, self.vline, self.star, *ax_conf.get_images(), *ax_conf.texts, ax_conf.title,
                        self.title]

    def update(self, alpha: float, method: str | None = None) -> "AlphaView":
        point = alpha_point(self.ctx, alpha, method)
        curve = self.ctx.curve(point["method"])
        a = point["alpha"]
        self.chosen.set_data(curve.alphas, curve.accuracy)
        self.chosen.set_color(self.lines[curve.label].get_color())
        self.vline.set_xdata([a, a])
        self.star.set_data([a], [point["accuracy"]])
        update_confusion(self.ax_conf, point["confusion"], title=f"alpha = {a:.2f}")
        self.title.set_text(f"{self.ctx.label}, {curve.label} path, alpha = {a:.2f}: "
                            f"accuracy {point['accuracy']:.2%}, loss {point['loss']:.3f}")
        return self


def render_alpha(ctx: AlphaContext, alpha: float, method: str | None = None) -> Any:
    """Accuracy along alpha with the chosen point marked, and the confusion matrix of the model at ``alpha``."""
    return AlphaView(ctx).update(alpha, method).figure


class NModelsView(LiveFigure):
    """Mean accuracy against N for every method on one split, the chosen (method, N) circled in place."""

    def __init__(self, ctx: NModelsContext) -> None:
        super().__init__((6.5, 4))
        self.ctx = ctx
        self.ax = self.figure.subplots()
        self.split: str | None = None
        self.title = self.figure.suptitle(" ")

    def update(self, n: int, method: str, split: str | None = None) -> "NModelsView":
        ctx = self.ctx
        split = split if split is not None else next(iter(ctx.zoos))
        for m in ctx.methods:
            for k in ctx.ns:
                n_models_accuracy(ctx, k, m, split)
        results = {m: dict(ctx.results[split][m]) for m in ctx.methods}
        if method not in results or n not in results[method]:
            raise ValueError(f"({method!r}, N={n}) is not a point of the plot")
        if split != self.split:  # new lines: a new background
            for line in list(self.ax.get_lines()):
                line.remove()
            plot_accuracy_vs_n(results, ax=self.ax, title=f"{split} split (mean over subsets)")
            (self.circle,) = self.ax.plot([], [], marker="o", markersize=14, markerfacecolor="none",
                                          markeredgecolor="black", markeredgewidth=2, linestyle="none")
            self.dynamic = [self.circle, self.title]
            self.split = split
            self.invalidate()
        self.circle.set_data([n], [results[method][n]])
        self.title.set_text(f"{method}, N = {n} ({split} split): accuracy {results[method][n]:.2%}")
        return self


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
    return NModelsView(ctx).update(n, method, split).figure
