"""ipywidgets controls for the notebooks: a control change redraws a view (or a ``render_*`` function) into an image.

ipywidgets is imported only when a widget is built. The widgets keep one figure each
(:class:`~ccatoolkit.app.render.LiveFigure` views) and update it in place, so a slider move costs a
look-up and a partial redraw (``benchmarks/widget_speed.py`` measures it). Each builder returns an
:class:`InteractiveFigure`: it displays as its ipywidgets box in a notebook and records what it
last drew (``figure``, ``text``, ``redraws``, ``error``), so tests can set a control's value and
check the redraw.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ccatoolkit.app.contexts import (
    AlphaContext,
    CorrelationContext,
    CurveContext,
    MergeContext,
    precompute_ridges,
)
from ccatoolkit.app.experiments import NModelsContext
from ccatoolkit.app.render import (
    AlphaView,
    LiveFigure,
    MergeView,
    NModelsView,
    figure_title,
    render_correlation,
    render_curve_point,
)

__all__ = [
    "InteractiveFigure", "correlation_widget", "merge_widget", "ridge_slider_values", "alpha_widget", "curve_widget", "n_models_widget",
]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


@dataclass
class InteractiveFigure:
    """Controls, a title line and an image; any control change redraws ``render(**values)``.

    ``render`` returns a matplotlib figure (encoded whole) or a :class:`LiveFigure` view (encoded by
    redrawing only its dynamic artists).

    The figure is shown as a PNG in an ``ipywidgets.Image`` (no output capture, so it behaves the
    same in JupyterLab, papermill and nbval). A failed redraw shows its message in red instead of
    a traceback, so one bad choice does not kill the widget.
    """

    render: Callable[..., Any]
    controls: Mapping[str, Any]
    figure: Any = None  # the last figure drawn
    text: str = ""  # its title
    redraws: int = 0
    error: str | None = None  # the message of the last failed redraw
    title: Any = field(init=False)
    image: Any = field(init=False)
    box: Any = field(init=False)

    def __post_init__(self) -> None:
        import ipywidgets as W

        self.title = W.HTML(layout=W.Layout(min_height="1.6em"))
        self.image = W.Image(format="png", layout=W.Layout(max_width="100%"))
        self.box = W.VBox([W.HBox(list(self.controls.values())), self.title, self.image])
        for control in self.controls.values():
            control.observe(self.redraw, names="value")
        self.redraw()

    def values(self) -> dict[str, Any]:
        """The controls' current values, by name."""
        return {name: control.value for name, control in self.controls.items()}

    def redraw(self, _change: Any = None) -> None:
        """Draw ``render(**values)`` into the image (or show the error)."""
        try:
            out = self.render(**self.values())
            fig = out.figure if isinstance(out, LiveFigure) else out
            png = out.png() if isinstance(out, LiveFigure) else _png(fig)
        except Exception as err:  # shown in the widget instead of a traceback
            self.error = f"{type(err).__name__}: {err}"
            self.title.value = f"<span style='color:#b00'>{html.escape(self.error)}</span>"
            return
        self.figure, self.text, self.error = fig, figure_title(fig), None
        self.redraws += 1
        self.image.value = png  # the image first: once the title changes, the picture matches it
        self.title.value = f"<b>{html.escape(self.text)}</b>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """The widget view, with the current figure as a PNG and its title as text beside it.

        JupyterLab ranks the widget view first and shows the live controls; a static page of the executed
        notebook (``scripts/run_notebooks.py``'s HTML report, GitHub) has no kernel for them and shows the
        figure the widget opened on instead of bare controls.
        """
        bundle = dict(self.box._repr_mimebundle_())
        if self.image.value:
            bundle["image/png"] = base64.b64encode(bytes(self.image.value)).decode("ascii")
            bundle["text/plain"] = self.text or bundle.get("text/plain", "")
        return bundle


def correlation_widget(ctx: CorrelationContext, layer: str | None = None) -> InteractiveFigure:
    """Dropdowns for the layer and the pair of models, redrawing :func:`render_correlation`."""
    import ipywidgets as W

    layer_dd = W.Dropdown(options=list(ctx.layers), value=layer or ctx.layers[0], description="layer")
    pair_dd = W.Dropdown(options=[(f"{a} vs {b}", (a, b)) for a, b in ctx.pairs], value=ctx.pairs[0],
                         description="models")
    return InteractiveFigure(lambda layer, pair: render_correlation(ctx, layer, pair),
                             {"layer": layer_dd, "pair": pair_dd})


RIDGE_EXPONENTS = (-4.0, 1.0, 0.5)  # the merge widget's ridge slider: 10**-4 .. 10**1, in half decades


def ridge_slider_values() -> list[float]:
    """The ridges the merge widget's slider can take (``10**e`` for e in :data:`RIDGE_EXPONENTS`' range)."""
    lo, hi, step = RIDGE_EXPONENTS
    return [float(10.0**e) for e in np.arange(lo, hi + step / 2, step)]


def merge_widget(ctx: MergeContext, method: str | None = None, ridge: float = 0.1,
                 precompute: bool = True) -> InteractiveFigure:
    """A method dropdown and a (log-scale) CCA regularisation slider, updating a :class:`MergeView`.

    ``precompute`` (default): every slider ridge is merged before the widget shows
    (:func:`~ccatoolkit.app.contexts.precompute_ridges`, kept in the disk store), so a ridge change is a
    look-up. Without it a new ridge re-solves CCA on the kept statistics (the context's ``RidgeSweep``)
    when the slider lands on it. A method change only moves the highlight.
    """
    import ipywidgets as W

    if precompute:
        precompute_ridges(ctx, ridge_slider_values())
    lo, hi, step = RIDGE_EXPONENTS
    method_dd = W.Dropdown(options=list(ctx.methods), value=method or ctx.methods[0], description="method")
    ridge_sl = W.FloatLogSlider(value=ridge, base=10, min=lo, max=hi, step=step, description="CCA ridge",
                                continuous_update=False)
    view = MergeView(ctx)
    return InteractiveFigure(lambda method, ridge: view.update(method, ridge), {"method": method_dd, "ridge": ridge_sl})


def alpha_widget(ctx: AlphaContext, alpha: float = 0.5, method: str | None = None) -> InteractiveFigure:
    """A slider over the paths' alpha grid and a method dropdown, updating an :class:`AlphaView`.

    Every grid point was evaluated when the context was made, so the slider updates while it is
    dragged; ``alpha`` starts at the nearest grid point, ``method`` at the last path (default). The
    confusion matrix writes its diagonal (each class's recall); the colours show every cell.
    """
    import ipywidgets as W

    grid = [float(a) for a in ctx.alphas]
    start = grid[int(np.argmin(np.abs(np.asarray(grid) - float(alpha))))]
    slider = W.SelectionSlider(options=[(f"{a:.2f}", a) for a in grid], value=start, description="alpha",
                               continuous_update=True)
    method_dd = W.Dropdown(options=ctx.methods, value=method or ctx.curve().label, description="path")
    view = AlphaView(ctx, annotate="diagonal")
    return InteractiveFigure(lambda alpha, method: view.update(alpha, method), {"alpha": slider, "method": method_dd})


def curve_widget(ctx: CurveContext, t: float = 0.5, step: float = 0.05) -> InteractiveFigure:
    """A slider over t in [0, 1], redrawing :func:`render_curve_point` (the point on the plane and its loss)."""
    import ipywidgets as W

    slider = W.FloatSlider(value=t, min=0.0, max=1.0, step=step, description="t",
                           continuous_update=False, readout_format=".2f")
    return InteractiveFigure(lambda t: render_curve_point(ctx, t), {"t": slider})


def n_models_widget(ctx: NModelsContext, n: int | None = None, method: str | None = None) -> InteractiveFigure:
    """Controls for N, the method and the data split, updating an :class:`NModelsView`."""
    import ipywidgets as W

    controls: dict[str, Any] = {
        "n": W.SelectionSlider(options=list(ctx.ns), value=n or max(ctx.ns), description="N models"),
        "method": W.Dropdown(options=list(ctx.methods), value=method or ctx.methods[0], description="method"),
        "split": W.Dropdown(options=list(ctx.zoos), value=next(iter(ctx.zoos)), description="split"),
    }
    view = NModelsView(ctx)
    return InteractiveFigure(lambda n, method, split: view.update(n, method, split), controls)
