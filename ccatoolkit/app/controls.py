"""ipywidgets controls for the notebooks: a control change redraws a ``render_*`` function into an image.

ipywidgets is imported only when a widget is built. Each builder returns an
:class:`InteractiveFigure`: it displays as its ipywidgets box in a notebook and records what it
last drew (``figure``, ``text``, ``redraws``, ``error``), so tests can set a control's value and
check the redraw.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ccatoolkit.app.contexts import AlphaContext, CorrelationContext, CurveContext, MergeContext, NModelsContext
from ccatoolkit.app.render import (
    figure_title,
    render_alpha,
    render_correlation,
    render_curve_point,
    render_merge,
    render_n_models,
)

__all__ = [
    "InteractiveFigure", "correlation_widget", "merge_widget", "alpha_widget", "curve_widget", "n_models_widget",
]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


@dataclass
class InteractiveFigure:
    """Controls, a title line and an image; any control change redraws ``render(**values)``.

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
            fig = self.render(**self.values())
        except Exception as err:  # shown in the widget instead of a traceback
            self.error = f"{type(err).__name__}: {err}"
            self.title.value = f"<span style='color:#b00'>{html.escape(self.error)}</span>"
            return
        self.figure, self.text, self.error = fig, figure_title(fig), None
        self.redraws += 1
        self.image.value = _png(fig)  # the image first: once the title changes, the picture matches it
        self.title.value = f"<b>{html.escape(self.text)}</b>"

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.box)


def correlation_widget(ctx: CorrelationContext, layer: str | None = None) -> InteractiveFigure:
    """Dropdowns for the layer and the pair of models, redrawing :func:`render_correlation`."""
    import ipywidgets as W

    layer_dd = W.Dropdown(options=list(ctx.layers), value=layer or ctx.layers[0], description="layer")
    pair_dd = W.Dropdown(options=[(f"{a} vs {b}", (a, b)) for a, b in ctx.pairs], value=ctx.pairs[0],
                         description="models")
    return InteractiveFigure(lambda layer, pair: render_correlation(ctx, layer, pair),
                             {"layer": layer_dd, "pair": pair_dd})


def merge_widget(ctx: MergeContext, method: str | None = None, ridge: float = 0.1) -> InteractiveFigure:
    """A method dropdown and a (log-scale) CCA regularisation slider, redrawing :func:`render_merge`."""
    import ipywidgets as W

    method_dd = W.Dropdown(options=list(ctx.methods), value=method or ctx.methods[0], description="method")
    ridge_sl = W.FloatLogSlider(value=ridge, base=10, min=-4, max=1, step=0.5, description="CCA ridge",
                                continuous_update=False)
    return InteractiveFigure(lambda method, ridge: render_merge(ctx, method, ridge),
                             {"method": method_dd, "ridge": ridge_sl})


def alpha_widget(ctx: AlphaContext, alpha: float = 0.5, step: float = 0.05) -> InteractiveFigure:
    """A slider over alpha in [0, 1], redrawing :func:`render_alpha` (accuracy and confusion matrix)."""
    import ipywidgets as W

    slider = W.FloatSlider(value=alpha, min=0.0, max=1.0, step=step, description="alpha",
                           continuous_update=False, readout_format=".2f")
    return InteractiveFigure(lambda alpha: render_alpha(ctx, alpha), {"alpha": slider})


def curve_widget(ctx: CurveContext, t: float = 0.5, step: float = 0.05) -> InteractiveFigure:
    """A slider over t in [0, 1], redrawing :func:`render_curve_point` (the point on the plane and its loss)."""
    import ipywidgets as W

    slider = W.FloatSlider(value=t, min=0.0, max=1.0, step=step, description="t",
                           continuous_update=False, readout_format=".2f")
    return InteractiveFigure(lambda t: render_curve_point(ctx, t), {"t": slider})


def n_models_widget(ctx: NModelsContext, n: int | None = None, method: str | None = None) -> InteractiveFigure:
    """Controls for N, the method and the data split, redrawing :func:`render_n_models`."""
    import ipywidgets as W

    controls: dict[str, Any] = {
        "n": W.SelectionSlider(options=list(ctx.ns), value=n or max(ctx.ns), description="N models"),
        "method": W.Dropdown(options=list(ctx.methods), value=method or ctx.methods[0], description="method"),
        "split": W.Dropdown(options=list(ctx.zoos), value=next(iter(ctx.zoos)), description="split"),
    }
    return InteractiveFigure(lambda n, method, split: render_n_models(ctx, n, method, split), controls)
