"""The logic behind the notebooks' widgets: pure ``render_*`` functions and thin ipywidgets builders.

Each notebook widget is a *context* (the models and data it works on, plus a cache of what was
computed, so moving a control back is instant) and a ``render_*(ctx, **choices) -> Figure``
function that draws a new matplotlib ``Figure`` (not a pyplot one, so redraws never pile up). The
``*_widget(ctx)`` builders wire ipywidgets controls to those functions; ipywidgets is imported only
there. A built widget records what it last drew (``.figure``, ``.text``, ``.redraws``, ``.error``)
so that tests can set a control's value and check what was redrawn.

=====================  =================================  ==========================================
notebook               context                            render / builder
=====================  =================================  ==========================================
02 looking inside      :class:`CorrelationContext`        :func:`render_correlation` / :func:`correlation_widget`
03 merging two models  :class:`MergeContext`              :func:`render_merge` / :func:`merge_widget`
04 the landscape       :class:`AlphaContext`              :func:`render_alpha` / :func:`alpha_widget`
06 N models            :class:`NModelsContext`            :func:`render_n_models` / :func:`n_models_widget`
=====================  =================================  ==========================================
"""

from __future__ import annotations

import copy
import html
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ccatoolkit.data import batch_inputs, batch_targets
from ccatoolkit.device import model_device

__all__ = [
    "CorrelationContext", "MergeContext", "AlphaContext", "NModelsContext",
    "render_correlation", "render_merge", "render_alpha", "render_n_models",
    "correlation_widget", "merge_widget", "alpha_widget", "n_models_widget",
    "correlation_views", "merge_accuracy", "alpha_point", "n_models_accuracy",
    "interpolated_model", "predict", "relu_layers", "figure_title",
]

CCA_METHODS = ("cca", "cca_multiview")


# --------------------------------------------------------------------------- shared helpers


def _figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure that pyplot does not manage (redraws never accumulate open figures)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def figure_title(fig: Any) -> str:
    """The text of a figure's suptitle ("" when it has none): what a widget shows above its plot."""
    title = getattr(fig, "_suptitle", None)
    return title.get_text() if title is not None else ""


def relu_layers(model: nn.Module) -> list[str]:
    """Names of the model's ``nn.ReLU`` modules: the activations a layer dropdown offers."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.ReLU)]


@torch.no_grad()
def predict(model: nn.Module, data: Iterable[Any]) -> tuple[np.ndarray, np.ndarray, float]:
    """``(targets, predictions, mean loss)`` of ``model`` in eval mode on labelled ``data``."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    targets, preds, total, count = [], [], 0.0, 0
    try:
        for batch in data:
            x, y = batch_inputs(batch), batch_targets(batch)
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            count += int(y.numel())
            targets.append(y.cpu())
            preds.append(logits.argmax(dim=1).cpu())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation data is empty")
    return torch.cat(targets).numpy(), torch.cat(preds).numpy(), total / count


def _accuracy(model: nn.Module, data: Iterable[Any]) -> float:
    t, p, _ = predict(model, data)
    return float((t == p).mean())


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def interpolated_model(model_a: nn.Module, model_b: nn.Module, alpha: float,
                       bn_data: Iterable[Any] | None = None) -> nn.Module:
    """A new model ``(1 - alpha) A + alpha B`` (all floating parameters and buffers; integer buffers from A).

    BatchNorm models need ``bn_data`` (training batches): their running statistics are re-estimated
    there, as an interpolated network's own statistics differ from the mix of its ends'.
    """
    sa, sb = model_a.state_dict(), model_b.state_dict()
    if sa.keys() != sb.keys():
        raise ValueError("the two models have different parameters; interpolate models of one architecture")
    mixed = {}
    for k, va in sa.items():
        vb = sb[k].to(va.device)
        mixed[k] = (1.0 - alpha) * va + alpha * vb if va.is_floating_point() else va.clone()
    model = copy.deepcopy(model_a)
    model.load_state_dict(mixed)
    if _has_batchnorm(model):
        if bn_data is None:
            raise ValueError("this model has BatchNorm layers: pass bn_data (training batches) to re-estimate "
                             "the interpolated model's statistics")
        from ccatoolkit.normalization import reset_bn_stats

        model = reset_bn_stats(model, bn_data, progress=False)
    return model.eval()


# --------------------------------------------------------------------------- 02: correlations


@dataclass
class CorrelationContext:
    """Models to compare neuron by neuron, the data for their activation statistics, and the layers offered.

    ``pairs`` are pairs of keys of ``models`` (default: each model against the first).
    """

    models: Mapping[str, nn.Module]
    data: Iterable[Any]
    layers: Sequence[str] = ()
    pairs: Sequence[tuple[str, str]] = ()
    cache: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = list(self.models)
        if len(names) < 2:
            raise ValueError(f"a correlation widget needs at least two models, got {len(names)}")
        if not self.layers:
            self.layers = relu_layers(self.models[names[0]])
        if not self.pairs:
            self.pairs = [(names[0], n) for n in names[1:]]
        self.pairs = [tuple(p) for p in self.pairs]
        for a, b in self.pairs:
            if a not in self.models or b not in self.models:
                raise ValueError(f"pair {(a, b)} names a model that is not one of {names}")

    def aligned(self, pair: tuple[str, str], method: str) -> nn.Module:
        """Model ``pair[1]`` aligned to ``pair[0]`` by ``method`` (``"none"`` leaves it as is); cached."""
        a, b = pair
        if method == "none":
            return self.models[b]
        key = ("aligned", a, b, method)
        if key not in self.cache:
            from ccatoolkit.merging import align_to

            self.cache[key] = align_to(self.models[a], self.models[b], method=method, data=self.data, progress=False)
        return self.cache[key]


_VIEWS = (("none", "original"), ("permute", "after permutation alignment"), ("cca", "after CCA alignment"))


def correlation_views(ctx: CorrelationContext, layer: str, pair: tuple[str, str] | None = None) -> dict[str, np.ndarray]:
    """The correlation matrices of ``layer`` between the pair's models: original, permuted and CCA-aligned B (cached)."""
    from ccatoolkit.stats import correlation_matrix

    pair = tuple(pair) if pair is not None else ctx.pairs[0]
    if layer not in ctx.layers:
        raise ValueError(f"unknown layer {layer!r}; choose one of: {', '.join(ctx.layers)}")
    views: dict[str, np.ndarray] = {}
    for method, label in _VIEWS:
        key = ("corr", pair, layer, method)
        if key not in ctx.cache:
            corr = correlation_matrix(ctx.models[pair[0]], ctx.aligned(pair, method), ctx.data, layer, progress=False)
            ctx.cache[key] = np.asarray(corr.detach().cpu() if hasattr(corr, "detach") else corr, dtype=np.float64)
        views[label] = ctx.cache[key]
    return views


def render_correlation(ctx: CorrelationContext, layer: str, pair: tuple[str, str] | None = None) -> Any:
    """Three heatmaps of ``layer``'s neuron correlations between two models: original, permuted, CCA-aligned."""
    from ccatoolkit.plots.analysis import plot_correlation

    pair = tuple(pair) if pair is not None else ctx.pairs[0]
    views = correlation_views(ctx, layer, pair)
    fig = _figure((13, 4))
    axes = fig.subplots(1, len(views))
    for ax, (label, corr) in zip(axes, views.items()):
        plot_correlation(corr, ax=ax, title=label, colorbar=ax is axes[-1],
                         xlabel=f"{pair[1]} neuron", ylabel=f"{pair[0]} neuron")
    fig.suptitle(f"layer {layer}: {pair[0]} vs {pair[1]}")
    return fig


# --------------------------------------------------------------------------- 03: merging two models


@dataclass
class MergeContext:
    """Models to merge, data for their statistics (``data``) and for evaluation (``test_data``)."""

    models: Sequence[nn.Module]
    data: Iterable[Any]
    test_data: Iterable[Any]
    methods: Sequence[str] = ("average", "permute", "permute_weight", "cca", "ensemble")
    names: Sequence[str] = ()
    cache: dict[Any, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise ValueError(f"merging needs at least two models, got {len(self.models)}")
        if not self.names:
            self.names = [f"model {chr(ord('A') + i)}" for i in range(len(self.models))]

    def endpoints(self) -> dict[str, float]:
        """The accuracies of the input models (cached)."""
        out = {}
        for name, model in zip(self.names, self.models):
            key = ("endpoint", name)
            if key not in self.cache:
                self.cache[key] = _accuracy(model, self.test_data)
            out[name] = self.cache[key]
        return out


def _merge_key(method: str, ridge: float) -> tuple[str, float | None]:
    return (method, round(float(ridge), 6) if method in CCA_METHODS else None)


def merge_accuracy(ctx: MergeContext, method: str, ridge: float = 0.01) -> float:
    """Test accuracy of the models merged by ``method`` (the CCA methods use regularisation ``ridge``); cached."""
    key = _merge_key(method, ridge)
    if key not in ctx.cache:
        from ccatoolkit.merging import ensemble, merge

        if method == "ensemble":
            merged = ensemble(list(ctx.models))
        else:
            options = {"ridge": float(ridge)} if method in CCA_METHODS else {}
            merged = merge(list(ctx.models), method=method, data=ctx.data, progress=False, **options)
        ctx.cache[key] = _accuracy(merged, ctx.test_data)
    return ctx.cache[key]


def render_merge(ctx: MergeContext, method: str, ridge: float = 0.01) -> Any:
    """Bar chart of every method's merged accuracy with ``method`` highlighted (its accuracy in the title)."""
    from ccatoolkit.plots.analysis import plot_accuracy_bars

    if method not in ctx.methods:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(ctx.methods)}")
    bars = {m: merge_accuracy(ctx, m, ridge) for m in ctx.methods}
    fig = _figure((7, 3.8))
    ax = fig.subplots()
    plot_accuracy_bars(bars, ax=ax, highlight=method, reference=ctx.endpoints())
    detail = f" (ridge {ridge:g})" if method in CCA_METHODS else ""
    fig.suptitle(f"{method}{detail}: accuracy {bars[method]:.2%}")
    return fig


# --------------------------------------------------------------------------- 04: along alpha


@dataclass
class AlphaContext:
    """Two end models (B already aligned to A if wanted), test data, optional curves to draw behind the marker.

    ``curves`` are interpolation results (``ccatoolkit.landscape.InterpolationResult``) drawn as accuracy
    along alpha; ``bn_data`` (training batches) is needed for BatchNorm models.
    """

    model_a: nn.Module
    model_b: nn.Module
    test_data: Iterable[Any]
    curves: Sequence[Any] = ()
    bn_data: Iterable[Any] | None = None
    label: str = "A to B"
    cache: dict[float, dict[str, Any]] = field(default_factory=dict)


def alpha_point(ctx: AlphaContext, alpha: float) -> dict[str, Any]:
    """Accuracy, loss, predictions and confusion matrix of the model at ``alpha`` on the test data (cached)."""
    from ccatoolkit.plots.analysis import confusion_matrix

    key = round(float(alpha), 6)
    if key not in ctx.cache:
        model = interpolated_model(ctx.model_a, ctx.model_b, key, bn_data=ctx.bn_data)
        targets, preds, loss = predict(model, ctx.test_data)
        num_classes = int(max(targets.max(), preds.max()) + 1)
        head = getattr(model, "head", None)
        if isinstance(head, nn.Linear):
            num_classes = head.out_features
        ctx.cache[key] = dict(alpha=key, accuracy=float((targets == preds).mean()), loss=loss,
                              confusion=confusion_matrix(targets, preds, num_classes))
    return ctx.cache[key]


def render_alpha(ctx: AlphaContext, alpha: float) -> Any:
    """Accuracy along alpha with the chosen point marked, and the confusion matrix of the model at ``alpha``."""
    from ccatoolkit.plots.analysis import plot_confusion

    point = alpha_point(ctx, alpha)
    fig = _figure((10, 4))
    ax_curve, ax_conf = fig.subplots(1, 2, width_ratios=[1.2, 1])
    for curve in ctx.curves:
        ax_curve.plot(curve.alphas, curve.accuracy, marker="o", markersize=3, label=getattr(curve, "label", None))
    ax_curve.axvline(point["alpha"], color="black", linestyle=":", linewidth=1)
    ax_curve.plot([point["alpha"]], [point["accuracy"]], marker="*", markersize=14, color="black",
                  linestyle="none", label=f"alpha = {point['alpha']:.2f}")
    ax_curve.set_xlabel("alpha (0 = model A, 1 = model B)")
    ax_curve.set_ylabel("test accuracy")
    ax_curve.set_ylim(0.0, 1.0)
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize="small", loc="lower left")
    plot_confusion(point["confusion"], ax=ax_conf, title=f"alpha = {point['alpha']:.2f}")
    fig.suptitle(f"{ctx.label}, alpha = {point['alpha']:.2f}: accuracy {point['accuracy']:.2%}, "
                 f"loss {point['loss']:.3f}")
    return fig


# --------------------------------------------------------------------------- 06: N models


@dataclass
class NModelsContext:
    """Zoos of models per data split (``zoos[split]`` a list), merged N at a time by each method.

    ``data[split]`` gives the statistics data for a split (or one iterable for all splits);
    ``test_data`` is where merged models are evaluated. Results are filled lazily into ``results``
    (``results[split][method][N]``) or all at once by :meth:`compute`.
    """

    zoos: Mapping[str, Sequence[nn.Module]]
    data: Mapping[str, Iterable[Any]] | Iterable[Any]
    test_data: Iterable[Any]
    methods: Sequence[str] = ("average", "permute", "zipit", "cca", "ensemble")
    ns: Sequence[int] = ()
    ridge: float = 0.01
    progress: bool = False
    results: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.zoos:
            raise ValueError("zoos is empty; pass a dict split name -> list of models")
        smallest = min(len(z) for z in self.zoos.values())
        if smallest < 2:
            raise ValueError("every split needs at least two models to merge")
        if not self.ns:
            self.ns = list(range(2, smallest + 1))
        if max(self.ns) > smallest or min(self.ns) < 2:
            raise ValueError(f"ns must lie in [2, {smallest}] (the smallest zoo), got {list(self.ns)}")

    def data_for(self, split: str) -> Iterable[Any]:
        if isinstance(self.data, Mapping):
            return self.data[split]
        return self.data

    def compute(self) -> dict[str, dict[str, dict[int, float]]]:
        """Fill every (split, method, N) accuracy; returns ``results``."""
        cells = [(s, m, n) for s in self.zoos for m in self.methods for n in self.ns]
        iterator: Iterable[Any] = cells
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(cells, desc="merging N models")
        for split, method, n in iterator:
            n_models_accuracy(self, n, method, split)
        return self.results


def n_models_accuracy(ctx: NModelsContext, n: int, method: str, split: str | None = None) -> float:
    """Test accuracy of the first ``n`` models of ``split`` merged by ``method`` (cached in ``ctx.results``)."""
    split = split if split is not None else next(iter(ctx.zoos))
    if split not in ctx.zoos:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(ctx.zoos)}")
    if method not in ctx.methods:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(ctx.methods)}")
    if n not in ctx.ns:
        raise ValueError(f"N={n} is not offered; choose one of: {list(ctx.ns)}")
    table = ctx.results.setdefault(split, {}).setdefault(method, {})
    if n not in table:
        from ccatoolkit.merging import ensemble, merge

        models = list(ctx.zoos[split][:n])
        if method == "ensemble":
            merged = ensemble(models)
        else:
            options = {"ridge": float(ctx.ridge)} if method in CCA_METHODS else {}
            merged = merge(models, method=method, data=ctx.data_for(split), progress=False, **options)
        table[n] = _accuracy(merged, ctx.test_data)
    return table[n]


def render_n_models(ctx: NModelsContext, n: int, method: str, split: str | None = None) -> Any:
    """Accuracy against N for every method on ``split`` (lines), the chosen (method, N) circled."""
    from ccatoolkit.plots.analysis import plot_accuracy_vs_n

    split = split if split is not None else next(iter(ctx.zoos))
    for m in ctx.methods:
        for k in ctx.ns:
            n_models_accuracy(ctx, k, m, split)
    results = {m: dict(ctx.results[split][m]) for m in ctx.methods}
    fig = _figure((6.5, 4))
    ax = fig.subplots()
    plot_accuracy_vs_n(results, ax=ax, highlight=(method, n), title=f"{split} split")
    fig.suptitle(f"{method}, N = {n} ({split} split): accuracy {results[method][n]:.2%}")
    return fig


# --------------------------------------------------------------------------- ipywidgets builders


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _interactive(render: Callable[..., Any], controls: Mapping[str, Any]) -> Any:
    """A VBox of ``controls``, a title line and an image; any control change redraws ``render(**values)``.

    The figure is shown as a PNG in an ``ipywidgets.Image`` (no output capture, so it behaves the
    same in JupyterLab, papermill and nbval). The box records ``.figure`` (last figure), ``.text``
    (its title), ``.redraws`` and ``.error`` (the message of a failed redraw, shown in red instead
    of a traceback).
    """
    import ipywidgets as W

    title = W.HTML(layout=W.Layout(min_height="1.6em"))
    image = W.Image(format="png", layout=W.Layout(max_width="100%"))
    box = W.VBox([W.HBox(list(controls.values())), title, image])
    box.controls = dict(controls)
    box.figure, box.text, box.redraws, box.error = None, "", 0, None

    def redraw(_change: Any = None) -> None:
        values = {name: control.value for name, control in controls.items()}
        try:
            fig = render(**values)
        except Exception as err:  # shown in the widget, so one bad choice does not kill it
            box.error = f"{type(err).__name__}: {err}"
            title.value = f"<span style='color:#b00'>{html.escape(box.error)}</span>"
            return
        box.figure, box.text, box.error = fig, figure_title(fig), None
        box.redraws += 1
        image.value = _png(fig)  # the image first: once the title changes, the picture matches it
        title.value = f"<b>{html.escape(box.text)}</b>"

    for control in controls.values():
        control.observe(redraw, names="value")
    box.redraw = redraw
    redraw()
    return box


def correlation_widget(ctx: CorrelationContext, layer: str | None = None) -> Any:
    """Dropdowns for the layer and the pair of models, redrawing :func:`render_correlation`."""
    import ipywidgets as W

    layer_dd = W.Dropdown(options=list(ctx.layers), value=layer or ctx.layers[0], description="layer")
    pair_dd = W.Dropdown(options=[(f"{a} vs {b}", (a, b)) for a, b in ctx.pairs], value=ctx.pairs[0],
                         description="models")
    return _interactive(lambda layer, pair: render_correlation(ctx, layer, pair), {"layer": layer_dd, "pair": pair_dd})


def merge_widget(ctx: MergeContext, method: str | None = None, ridge: float = 0.01) -> Any:
    """A method dropdown and a (log-scale) CCA regularisation slider, redrawing :func:`render_merge`."""
    import ipywidgets as W

    method_dd = W.Dropdown(options=list(ctx.methods), value=method or ctx.methods[0], description="method")
    ridge_sl = W.FloatLogSlider(value=ridge, base=10, min=-4, max=1, step=0.5, description="CCA ridge",
                                continuous_update=False)
    return _interactive(lambda method, ridge: render_merge(ctx, method, ridge), {"method": method_dd, "ridge": ridge_sl})


def alpha_widget(ctx: AlphaContext, alpha: float = 0.5, step: float = 0.05) -> Any:
    """A slider over alpha in [0, 1], redrawing :func:`render_alpha` (accuracy and confusion matrix)."""
    import ipywidgets as W

    slider = W.FloatSlider(value=alpha, min=0.0, max=1.0, step=step, description="alpha",
                           continuous_update=False, readout_format=".2f")
    return _interactive(lambda alpha: render_alpha(ctx, alpha), {"alpha": slider})


def n_models_widget(ctx: NModelsContext, n: int | None = None, method: str | None = None) -> Any:
    """Controls for N, the method and the data split, redrawing :func:`render_n_models`."""
    import ipywidgets as W

    controls: dict[str, Any] = {
        "n": W.SelectionSlider(options=list(ctx.ns), value=n or max(ctx.ns), description="N models"),
        "method": W.Dropdown(options=list(ctx.methods), value=method or ctx.methods[0], description="method"),
        "split": W.Dropdown(options=list(ctx.zoos), value=next(iter(ctx.zoos)), description="split"),
    }
    return _interactive(lambda n, method, split: render_n_models(ctx, n, method, split), controls)
