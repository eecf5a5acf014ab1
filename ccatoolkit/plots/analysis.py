"""Analysis plots: correlation heatmaps, canonical-correlation spectra, accuracy bars, accuracy against N, confusion matrices,
and the spread of merges over many pairs or subsets (mean +/- sd, relative to the ensemble; seaborn).

Every function draws into the given matplotlib axis (a new figure's axis when ``ax`` is None) and
returns it, so notebooks and widgets can redraw in place. matplotlib is imported only inside the
functions; the data arguments are numpy arrays, torch tensors or plain dicts.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ccatoolkit.plots.style import METHOD_COLORS, method_color, method_palette

__all__ = [
    "plot_correlation",
    "plot_cca_spectra",
    "plot_accuracy_bars",
    "update_accuracy_bars",
    "plot_accuracy_vs_n",
    "plot_confusion",
    "update_confusion",
    "confusion_matrix",
    "collapsed_methods",
    "plot_spread_bars",
    "plot_spread_vs_n",
    "plot_row_mass",
    "plot_value_cdfs",
]


def _axis(ax: Any, figsize: tuple[float, float] = (5, 3.5)) -> Any:
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=figsize)
    return ax


def _array(x: Any, name: str, ndim: int | None = None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {arr.shape}")
    return arr


def plot_correlation(matrix: Any, ax: Any = None, title: str | None = None, colorbar: bool = True,
                     xlabel: str = "model B neuron", ylabel: str = "model A neuron") -> Any:
    """Heatmap of a neuron-by-neuron correlation matrix (rows: model A, columns: model B), colours fixed to [-1, 1].

    A well-aligned pair shows a bright diagonal; the mean diagonal correlation is added to the title.
    """
    corr = _array(matrix, "matrix", ndim=2)
    ax = _axis(ax, (4.2, 3.6))
    image = ax.imshow(corr, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest", aspect="auto")
    n = min(corr.shape)
    diag = float(np.nanmean(np.diag(corr)[:n])) if n else float("nan")
    text = f"mean diagonal {diag:.2f}"
    ax.set_title(f"{title}\n{text}" if title else text, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="correlation")
    return ax


def plot_cca_spectra(spectra: Mapping[str, Any], ax: Any = None, title: str | None = None,
                     normalize: bool = True) -> Any:
    """Canonical correlations of each layer (a dict layer -> sorted correlations), all layers on one axis.

    ``normalize=True`` puts the x-axis on [0, 1] (index / number of directions), so layers of
    different widths compare; the legend gives each layer's mean canonical correlation.
    """
    if not spectra:
        raise ValueError("spectra is empty; pass a dict layer name -> canonical correlations")
    import matplotlib.pyplot as plt

    ax = _axis(ax, (5.5, 3.5))
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(spectra)))
    for color, (layer, values) in zip(colors, spectra.items()):
        rho = np.sort(_array(values, f"spectra[{layer!r}]").reshape(-1))[::-1]
        x = (np.arange(rho.size) + 0.5) / rho.size if normalize else np.arange(1, rho.size + 1)
        ax.plot(x, rho, color=color, label=f"{layer} (mean {np.mean(rho):.2f})")
    ax.set_xlabel("canonical direction (fraction of the layer)" if normalize else "canonical direction")
    ax.set_ylabel("canonical correlation")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return ax


def plot_accuracy_bars(accuracies: Mapping[str, float], ax: Any = None, title: str | None = None,
                       highlight: str | None = None, reference: Mapping[str, float] | None = None,
                       ylabel: str = "test accuracy") -> Any:
    """Bar chart of accuracy per method (a dict name -> accuracy in [0, 1]), each bar labelled with its value.

    Each bar has its method's colour. ``highlight`` outlines one bar and fades the others (the widget's
    current choice); ``reference`` draws horizontal lines (e.g. the two end models' accuracies), a model's
    line in that model's colour where the label ends with its name (``"model A"``).
    """
    if not accuracies:
        raise ValueError("accuracies is empty; pass a dict method name -> accuracy")
    if highlight is not None and highlight not in accuracies:
        raise ValueError(f"highlight {highlight!r} is not one of the bars: {', '.join(accuracies)}")
    ax = _axis(ax, (6, 3.5))
    names = list(accuracies)
    bars = ax.bar(names, np.zeros(len(names)))
    for bar in bars:
        ax.annotate("", (bar.get_x() + bar.get_width() / 2, 0.0), ha="center", va="bottom",
                    fontsize="small", xytext=(0, 2), textcoords="offset points")
    update_accuracy_bars(ax, accuracies, highlight)
    values = np.array([float(accuracies[n]) for n in names])
    for i, (label, value) in enumerate((reference or {}).items()):
        ax.axhline(float(value), color=method_color(label.split()[-1] if label.split() else "", default=f"C{i + 2}"),
                   linestyle="--", linewidth=1, label=label)
    if reference:
        ax.legend(fontsize="small", loc="lower right")
    ax.set_ylim(0.0, min(1.05, max(1e-3, float(np.nanmax(values))) * 1.15 + 0.02))
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=20)
    if title:
        ax.set_title(title)
    return ax


#: The colour of a bar or line whose name is not a method's (:func:`~ccatoolkit.plots.style.method_color`).
_OTHER = "#4c72b0"


def update_accuracy_bars(ax: Any, accuracies: Mapping[str, float], highlight: str | None = None) -> Any:
    """Set the bars of :func:`plot_accuracy_bars` (same names, in order) to ``accuracies``: heights, labels, highlight."""
    names = list(accuracies)
    bars, labels = ax.patches[: len(names)], [t for t in ax.texts if hasattr(t, "xy")][: len(names)]
    if len(bars) != len(names) or len(labels) != len(names):
        raise ValueError(f"this axis has {len(bars)} bars, got {len(names)} accuracies")
    if highlight is not None and highlight not in accuracies:
        raise ValueError(f"highlight {highlight!r} is not one of the bars: {', '.join(names)}")
    for name, bar, label in zip(names, bars, labels):
        value = float(accuracies[name])
        bar.set_height(value)
        chosen = highlight is None or name == highlight  # the chosen bar at full strength, outlined; the others faded
        bar.set_facecolor(method_color(name, default=_OTHER))
        bar.set_alpha(1.0 if chosen else 0.35)
        bar.set_edgecolor("black" if name == highlight else "none")
        bar.set_linewidth(2.0 if name == highlight else 0.0)
        label.xy = (bar.get_x() + bar.get_width() / 2, value)
        label.set_text(f"{value:.1%}")
    return ax


def plot_accuracy_vs_n(results: Mapping[str, Mapping[int, float]], ax: Any = None, title: str | None = None,
                       highlight: tuple[str, int] | None = None) -> Any:
    """Accuracy against the number of merged models, one line per method (a dict method -> {N: accuracy}).

    ``highlight=(method, N)`` circles one point (the widget's current choice).
    """
    if not results:
        raise ValueError("results is empty; pass a dict method -> {number of models: accuracy}")
    ax = _axis(ax, (5.5, 3.5))
    for method, curve in results.items():
        ns = sorted(int(n) for n in curve)
        ax.plot(ns, [float(curve[n]) for n in ns], marker="o", label=method, color=method_color(method, default=_OTHER))
    if highlight is not None:
        method, n = highlight
        if method not in results or n not in results[method]:
            raise ValueError(f"highlight {highlight!r} is not a point of the plot")
        ax.plot([n], [float(results[method][n])], marker="o", markersize=14, markerfacecolor="none",
                markeredgecolor="black", markeredgewidth=2, linestyle="none")
    all_ns = sorted({int(n) for curve in results.values() for n in curve})
    ax.set_xticks(all_ns)
    ax.set_xlabel("number of models merged (N)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return ax


def confusion_matrix(targets: Any, predictions: Any, num_classes: int | None = None) -> np.ndarray:
    """Counts ``C[i, j]`` of examples of true class ``i`` predicted as ``j`` (integer labels)."""
    t = _array(targets, "targets").astype(np.int64).reshape(-1)
    p = _array(predictions, "predictions").astype(np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"targets and predictions differ in length: {t.size} vs {p.size}")
    k = int(num_classes) if num_classes is not None else int(max(t.max(initial=-1), p.max(initial=-1)) + 1)
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= k):
        raise ValueError(f"labels must lie in [0, {k}); got values in [{min(t.min(), p.min())}, {max(t.max(), p.max())}]")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def plot_confusion(matrix: Any, ax: Any = None, title: str | None = None,
                   class_names: Sequence[str] | None = None, normalize: bool = True,
                   annotate: bool | str = True) -> Any:
    """Confusion matrix (rows: true class, columns: predicted) as a heatmap; rows normalised to fractions by default.

    ``class_names`` label the axes (e.g. ``dataset_info(name)["classes"]``); default: the class indices.
    ``annotate``: write every non-zero cell's value (True), none (False) or only the diagonal's
    (``"diagonal"``, each class's recall: ten texts draw far faster than a hundred, for a slider).
    :func:`update_confusion` shows another matrix of the same size in the same axis (a widget's redraw).
    """
    counts = _array(matrix, "matrix", ndim=2)
    if counts.shape[0] != counts.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {counts.shape}")
    k = counts.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}x{k} confusion matrix")
    ax = _axis(ax, (4.5, 4))
    ax.imshow(np.zeros((k, k)), cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None, interpolation="nearest")
    if annotate not in (True, False, "diagonal"):
        raise ValueError(f"annotate must be True, False or 'diagonal', got {annotate!r}")
    cells = [(i, i) for i in range(k)] if annotate == "diagonal" else [(i, j) for i in range(k) for j in range(k)]
    for i, j in cells if annotate else ():  # one text per cell, empty where the count is 0: an update sets strings
        ax.text(j, i, "", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize="x-small")
    ax.set_yticklabels(names, fontsize="x-small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return update_confusion(ax, counts, title=title, normalize=normalize)


def update_confusion(ax: Any, matrix: Any, title: str | None = None, normalize: bool = True) -> Any:
    """Show ``matrix`` in an axis drawn by :func:`plot_confusion` (same size): image, cell texts and title, in place."""
    counts = _array(matrix, "matrix", ndim=2)
    image = ax.get_images()[0]
    k = image.get_array().shape[0]
    if counts.shape != (k, k):
        raise ValueError(f"this axis shows a {k}x{k} confusion matrix, got shape {counts.shape}")
    shown = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) if normalize else counts
    image.set_data(shown)
    if not normalize:
        image.set_clim(0.0, max(float(shown.max()), 1.0))
    if len(ax.texts) in (k, k * k):  # the diagonal's texts, or every cell's
        top = shown.max() if shown.size else 1.0
        for text, value in zip(ax.texts, np.diag(shown) if len(ax.texts) == k else shown.reshape(-1)):
            text.set_text("" if value <= 0 else (f"{value:.2f}".lstrip("0") if normalize else f"{int(value)}"))
            text.set_color("white" if value > 0.6 * top else "black")
    total = counts.sum()
    acc = float(np.trace(counts) / total) if total else float("nan")
    ax.set_title(f"{title} (accuracy {acc:.1%})" if title else f"accuracy {acc:.1%}", fontsize="medium")
    return ax


def collapsed_methods(frame: Any, y: str = "relative", below: float = -0.2) -> list[str]:
    """The methods of a runs table (``NModelsContext.frame()``) whose mean ``y`` lies below ``below``.

    A merge that collapses (plain averaging of unaligned models) is tens of points
    below the others; on a shared axis it squeezes their differences of a point or two flat, so the
    spread plots draw it on an axis of its own.
    """
    means = frame.groupby("method", sort=False)[y].mean()
    return [str(m) for m, v in means.items() if v < below]


def _side_axis(ax: Any, title: str) -> Any:
    """An axis of its own scale at the right of ``ax`` (for the methods that collapse)."""
    side = ax.inset_axes([1.15, 0.0, 0.3, 1.0])
    side.set_title(title, fontsize="small")
    side.grid(alpha=0.3, axis="y")
    return side


def _relative_label(y: str) -> str:
    return "accuracy - ensemble's (points)" if y == "relative" else y


def plot_spread_bars(frame: Any, ax: Any = None, y: str = "relative", title: str | None = None,
                     collapse_below: float = -0.2, exclude: Sequence[str] = ("ensemble",)) -> Any:
    """Mean +/- sd of ``y`` per method over the runs of a table (one row per run: ``method`` and ``y``), one dot per run.

    ``y="relative"`` (the default) is each merge's accuracy minus the ensemble of the same models:
    0 is the ensemble. Methods whose mean lies below ``collapse_below`` (:func:`collapsed_methods`)
    are drawn on an axis of their own at the right, so they do not flatten the others' scale. Each bar has
    its method's colour (:mod:`ccatoolkit.plots.style`); a difference is labelled in percentage points.
    ``exclude``: rows left out (the ensemble, which is 0 by definition). Needs seaborn.
    """
    import seaborn as sns

    frame = frame[~frame["method"].isin(list(exclude))]
    if frame.empty:
        raise ValueError("no runs to plot (after leaving out the excluded methods)")
    low = collapsed_methods(frame, y, collapse_below)
    ax = _axis(ax, (6, 3.5))
    parts = [(ax, frame[~frame["method"].isin(low)])]
    if low:
        parts.append((_side_axis(ax, "collapsed (own scale)"), frame[frame["method"].isin(low)]))
    for axis, part in parts:
        order = list(dict.fromkeys(part["method"]))
        sns.barplot(data=part, x="method", y=y, order=order, errorbar="sd", hue="method", hue_order=order,
                    palette=method_palette(order), saturation=1.0, legend=False, ax=axis, capsize=0.2,
                    err_kws={"linewidth": 1.2})
        sns.stripplot(data=part, x="method", y=y, order=order, color="black", size=3, ax=axis)
        axis.tick_params(axis="x", labelrotation=30)
        axis.set_xlabel("")
        if y != "accuracy":  # a difference of accuracies: percentage points
            axis.yaxis.set_major_formatter(lambda v, _: f"{100 * v:+.1f}")
        if y == "relative":
            axis.axhline(0.0, color=METHOD_COLORS["ensemble"], linestyle="--", linewidth=1)
            low_y, high_y = axis.get_ylim()  # bars below 0 end at the frame: lift it so the line shows
            axis.set_ylim(low_y, max(high_y, 0.0) + 0.08 * (max(high_y, 0.0) - low_y))
    ax.set_ylabel(_relative_label(y))
    if low:
        parts[1][0].set_ylabel("")
    if title:
        ax.set_title(title)
    return ax


def plot_spread_vs_n(frame: Any, ax: Any = None, y: str = "relative", title: str | None = None,
                     collapse_below: float = -0.2, exclude: Sequence[str] = ("ensemble",),
                     collapsed_ax: Any = None, reference: str | None = None, ylabel: str | None = None) -> Any:
    """Mean +/- sd band of ``y`` against the number of models merged, one line per method (rows: ``method``, ``n``, ``y``).

    As :func:`plot_spread_bars`: ``y="relative"`` puts the ensemble of the same models at 0, and methods
    that collapse (mean below ``collapse_below``) are drawn on an axis of their own: ``collapsed_ax``
    when given (e.g. a narrow panel beside ``ax``, hidden when nothing collapses), else an inset at the
    right of ``ax``. Each method keeps its colour (:func:`~ccatoolkit.plots.style.method_palette`); a
    difference (any ``y`` but ``"accuracy"``) is labelled in percentage points (``-0.004`` reads
    ``-0.4``), an accuracy in percent. ``reference`` names the dashed line at 0 (default: ``"ensemble"``
    for ``y="relative"``; none for ``"accuracy"``), written beside it; ``ylabel`` overrides the axis
    label. Fonts are 9 pt or larger. Needs seaborn.
    """
    import seaborn as sns
    from matplotlib.ticker import FuncFormatter

    frame = frame[~frame["method"].isin(list(exclude))]
    if frame.empty:
        raise ValueError("no runs to plot (after leaving out the excluded methods)")
    low = collapsed_methods(frame, y, collapse_below)
    ax = _axis(ax, (5.5, 3.5))
    methods = list(dict.fromkeys(frame["method"]))
    palette = method_palette(methods)
    unknown = [m for m in methods if palette[m] == "#000000"]  # not one of the shared colours: seaborn's cycle
    palette.update(zip(unknown, sns.color_palette(n_colors=len(unknown)).as_hex()))
    parts = [(ax, frame[~frame["method"].isin(low)])]
    if low:
        side = collapsed_ax if collapsed_ax is not None else _side_axis(ax, "")
        side.set_title("collapsed (own scale)", fontsize=9)
        side.grid(alpha=0.3, axis="y")
        parts.append((side, frame[frame["method"].isin(low)]))
    elif collapsed_ax is not None:
        collapsed_ax.set_axis_off()
    if reference is None and y == "relative":
        reference = "ensemble"
    difference = y != "accuracy"
    if difference:
        formatter = FuncFormatter(lambda v, _: "0" if abs(v) < 5e-7 else f"{100 * v:.3g}")
    else:
        formatter = FuncFormatter(lambda v, _: f"{100 * v:.3g}%")
    ns = sorted({int(n) for n in frame["n"]})
    for axis, part in parts:
        sns.lineplot(data=part, x="n", y=y, hue="method", palette=palette, errorbar="sd", marker="o", ax=axis)
        axis.set_xticks(ns)
        axis.set_xlim(ns[0] - 0.25, ns[-1] + 0.25)
        axis.set_xlabel("number of models merged (N)", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=9)
        axis.yaxis.set_major_formatter(formatter)
        axis.tick_params(labelsize=9)
        axis.set_ylabel("")
        if reference is not None and difference:
            color = METHOD_COLORS.get(reference, "#333333")
            axis.axhline(0.0, color=color, linestyle="--", linewidth=1)
            if axis is ax:  # named once, on the main axis
                axis.annotate(reference, xy=(0.98, 0.0), xycoords=("axes fraction", "data"), xytext=(0, -2),
                              textcoords="offset points", fontsize=9, color=color, ha="right", va="top")
    labels = {"relative": "accuracy - ensemble's (points)", "vs_best": "accuracy - best single model's (points)",
              "accuracy": "test accuracy"}
    ax.set_ylabel(ylabel or labels.get(y, f"{y} (points)" if difference else y), fontsize=10)
    if low:
        parts[1][0].set_xlabel("N", fontsize=10)
    if title:
        ax.set_title(title, fontsize=11)
    return ax


def plot_row_mass(curves: Mapping[str, Any], ax: Any = None, title: str | None = None, mass: float = 0.9,
                  colors: Mapping[str, str] | None = None) -> Any:
    """How concentrated the rows of some matrices are: the share of a row's L1 norm held by its ``k`` largest
    ``|entries|`` against ``k`` (log axis), the median over rows with a band from the 10th to the 90th percentile.

    ``curves``: ``{label: (rows, n) array}`` of cumulative shares (``ccatoolkit.app.inside.row_mass``). A
    permutation's rows are 1 from ``k = 1``; dense rows climb late. A dotted line marks ``mass``; each legend
    entry gives the median number of entries that reach it. ``colors``: a colour per label (default: the
    method colour of :mod:`ccatoolkit.plots.style` when the label is a method's name, else matplotlib's cycle).
    """
    if not curves:
        raise ValueError("curves is empty; pass a dict label -> (rows, n) cumulative shares")
    ax = _axis(ax, (6, 3.6))
    for i, (label, values) in enumerate(curves.items()):
        c = _array(values, f"curves[{label!r}]", ndim=2)
        if c.shape[0] == 0:
            raise ValueError(f"curves[{label!r}] has no rows")
        k = np.arange(1, c.shape[1] + 1)
        lo, mid, hi = np.quantile(c, [0.1, 0.5, 0.9], axis=0)
        needed = int(np.median((c < mass - 1e-12).sum(axis=1) + 1))
        color = (colors or {}).get(label) or METHOD_COLORS.get(label, f"C{i}")
        ax.plot(k, mid, color=color, label=f"{label}: {needed} for {mass:.0%}")
        ax.fill_between(k, lo, hi, color=color, alpha=0.2, linewidth=0)
    ax.axhline(mass, color="k", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("k largest entries of the row (log scale)")
    ax.set_ylabel("share of the row's L1 norm")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="lower right")
    if title:
        ax.set_title(title)
    return ax


def plot_value_cdfs(values: Mapping[str, Any], ax: Any = None, title: str | None = None, xlabel: str = "value",
                    colors: Mapping[str, str] | None = None, styles: Mapping[str, str] | None = None) -> Any:
    """Empirical distribution function of each named set of values (NaNs left out), one line each.

    A line further right holds larger values; its legend entry gives the median. ``colors`` and ``styles``
    (matplotlib line styles) per label; unnamed labels take matplotlib's cycle and solid lines.
    """
    if not values:
        raise ValueError("values is empty; pass a dict label -> values")
    ax = _axis(ax, (6, 3.6))
    for i, (label, v) in enumerate(values.items()):
        x = _array(v, f"values[{label!r}]").reshape(-1)
        x = np.sort(x[np.isfinite(x)])
        if x.size == 0:
            raise ValueError(f"values[{label!r}] holds no finite number")
        y = np.arange(1, x.size + 1) / x.size
        ax.step(x, y, where="post", color=(colors or {}).get(label, f"C{i}"),
                linestyle=(styles or {}).get(label, "-"), label=f"{label} (median {np.median(x):.3f})")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction at or below")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    if title:
        ax.set_title(title)
    return ax
