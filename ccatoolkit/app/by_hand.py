"""Notebook 3's lesson: CCA Merge of two MLPs written out step by step, and the figures that explain it.

For a plain MLP (``Linear``, ``ReLU``, ..., ``Linear``) ``merge([a, b], "cca", data, repair=False,
ridge=r)`` is four steps, each a function here, so a participant can run them one at a time:

1. :func:`layer_covariances`: per hidden layer, the covariances ``S_AA``, ``S_BB`` and the
   cross-covariance ``S_AB`` of the two models' post-ReLU activations on the same inputs
   (:func:`~ccatoolkit.analysis.stats.collect_statistics`, the pass ``merge`` makes);
2. :func:`cca_maps`: CCA's map ``T`` taking B's neurons into A's, and its inverse
   (:func:`~ccatoolkit.merging.align.cca.cca_transform`, the solver ``merge`` calls);
3. :func:`align_mlp`: B's weights moved through the maps, ``W_l <- T W_l`` and ``b_l <- T b_l`` (the
   rows that make layer ``l``'s neurons) and ``W_{l+1} <- W_{l+1} T^-1`` (the columns that read them);
4. :func:`average_weights`: the mean of A's and the aligned B's weights.

``merge`` then runs REPAIR (``repair=True``, its default for CCA). The rest are what the notebook's
prose and figures read: :func:`versus`, :func:`compared` and :func:`noise_text` (a difference within the
spread is "≈", not a ranking), :func:`pair_endpoint_gaps`, :func:`ridge_curve` (the merge widget's
precomputed ridges, looked up), :func:`plot_pair_accuracies` and :func:`plot_ridge_lesson`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ccatoolkit.analysis.stats import collect_statistics
from ccatoolkit.merging.align.cca import cca_transform, constant_channels
from ccatoolkit.merging.graph import merge_graph
from ccatoolkit.plots.style import method_color, points

__all__ = [
    "mlp_layers", "layer_covariances", "cca_maps", "align_mlp", "average_weights", "max_weight_difference",
    "dead_neurons", "versus", "compared", "noise_text", "pair_endpoint_gaps", "ridge_curve", "plot_pair_accuracies",
    "plot_ridge_lesson",
]

Covariances = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # space -> (S_AA, S_BB, S_AB)
Maps = dict[str, tuple[torch.Tensor, torch.Tensor]]  # space -> (T, T^-1)


# --------------------------------------------------------------------------- the method by hand


def mlp_layers(model: nn.Module) -> list[tuple[str, str, str]]:
    """``(space, layer, next_layer)`` per hidden layer of a plain MLP, in forward order.

    ``space`` names the hidden layer's activations (its ReLU module), ``layer`` the ``nn.Linear``
    that makes them (weight rows and bias) and ``next_layer`` the one that reads them (weight
    columns), as :func:`~ccatoolkit.merging.graph.merge_graph` finds them. Anything else (BatchNorm,
    convolutions, residual sums) raises: ``cc.merge`` handles those, this lesson does not.
    """
    layers = []
    for space in merge_graph(model).spaces:
        outputs = sorted(ref.name for ref in space.outputs)
        inputs = [ref.name for ref in space.inputs]
        layer = outputs[0].rpartition(".")[0] if outputs else ""
        if (outputs != [f"{layer}.bias", f"{layer}.weight"] or len(inputs) != 1 or not inputs[0].endswith(".weight")
                or len(space.capture) != 1):
            raise ValueError(f"space {space.name!r} is not a plain Linear -> ReLU -> Linear hidden layer "
                             f"(it moves {outputs} and {inputs}); merge it with cc.merge instead")
        layers.append((space.name, layer, inputs[0].rpartition(".")[0]))
    return layers


def layer_covariances(models: Sequence[nn.Module], data: Iterable[Any], max_batches: int | None = None,
                      progress: bool = False) -> Covariances:
    """Step 1: ``{space: (S_AA, S_BB, S_AB)}`` (float64) of the two models' hidden activations on ``data``.

    One pass of both models over the same inputs; the covariances are unbiased and centred.
    """
    a, b = models
    spaces = [space for space, _, _ in mlp_layers(a)]
    stats = collect_statistics([a, b], data, spaces, max_batches=max_batches, progress=progress, warn=False)
    return {s: (stats[s].cov(0), stats[s].cov(1), stats[s].cov(0, 1)) for s in spaces}


def cca_maps(covariances: Mapping[str, tuple[Any, Any, Any]], ridge: float) -> Maps:
    """Step 2: ``{space: (T, T^-1)}`` (float64 tensors): CCA's map of B's neurons into A's space, at ``ridge``.

    ``T = S_AA^{1/2} U V^T S_BB^{-1/2}`` where ``U V^T`` is the orthogonal factor of the whitened
    cross-covariance ``S_AA^{-1/2} S_AB S_BB^{-1/2} = U diag(rho) V^T``, each covariance regularised
    as ``S + ridge * trace(S)/n * I`` (:func:`~ccatoolkit.merging.align.cca.cca_transform`).
    """
    return {space: tuple(torch.as_tensor(m, dtype=torch.float64) for m in cca_transform(*covs, ridge=ridge))
            for space, covs in covariances.items()}


@torch.no_grad()
def align_mlp(model: nn.Module, maps: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Step 3: a copy of ``model`` whose hidden layers are moved through ``maps`` (``model`` is not changed).

    Layer ``l``'s neurons ``z`` become ``T z``: the rows of its weight and its bias are mixed by ``T``;
    the next layer reads ``T z`` through ``T^-1`` (its columns), which would undo the map exactly
    if no ReLU stood between them. Products in float64, cast back (as ``merge`` does).
    """
    aligned = copy.deepcopy(model)
    modules = dict(aligned.named_modules())
    for space, layer, next_layer in mlp_layers(aligned):
        T, T_inv = maps[space]
        fc, nxt = modules[layer], modules[next_layer]
        fc.weight.copy_(T @ fc.weight.double())     # output side: rows
        fc.bias.copy_(T @ fc.bias.double())
        nxt.weight.copy_(nxt.weight.double() @ T_inv)  # input side: columns
    return aligned


@torch.no_grad()
def average_weights(models: Sequence[nn.Module]) -> nn.Module:
    """Step 4: a copy of the first model holding the mean of the models' floating-point weights."""
    merged = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    for key, value in merged.state_dict().items():
        if torch.is_floating_point(value):
            value.copy_(sum(s[key].double() for s in states) / len(states))
    return merged


def max_weight_difference(model: nn.Module, other: nn.Module) -> float:
    """The largest absolute difference between two models' weights (entries of the same state-dict keys)."""
    first, second = model.state_dict(), other.state_dict()
    if first.keys() != second.keys():
        raise ValueError("the models have different state-dict keys")
    return max(float((first[k].double() - second[k].double()).abs().max()) for k in first if first[k].numel())


def dead_neurons(covariance: Any) -> int:
    """How many channels of a covariance are constant on the data (dead ReLUs): CCA leaves them out, their
    rows and columns of ``T`` are zero (:mod:`ccatoolkit.merging.align.cca`)."""
    return int(constant_channels(torch.as_tensor(covariance, dtype=torch.float64)).sum())


# --------------------------------------------------------------------------- honest comparisons


def versus(difference: float, spread: float) -> str:
    """``"≈"`` when ``|difference|`` is within ``spread`` (no ranking), else ``"above"`` or ``"below"``."""
    if not spread >= 0:
        raise ValueError(f"the spread must be a number >= 0, got {spread}")
    if abs(difference) <= spread:
        return "≈"
    return "above" if difference > 0 else "below"


def compared(difference: float, spread: float) -> str:
    """``versus`` for a sentence "X is ... Y": ``"about as accurate as (≈)"``, ``"above"`` or ``"below"``."""
    word = versus(difference, spread)
    return "about as accurate as (≈)" if word == "≈" else word


def noise_text(difference: float, spread: float, name: str = "the spread") -> str:
    """A difference of accuracies against its noise: ``"-0.2 pts, within the spread of ±0.4 pts"`` (or
    ``"outside"``), in percentage points."""
    where = "within" if versus(difference, spread) == "≈" else "outside"
    return f"{points(difference)}, {where} {name} of ±{points(spread, signed=False)}"


def pair_endpoint_gaps(runs: Any, endpoint_accuracy: Sequence[float], method: str) -> Any:
    """Per pair of a runs table (``NModelsContext.frame()``, N = 2): ``method``'s accuracy minus the better and
    the worse of the pair's two models (``endpoint_accuracy[i]``: model ``i``'s test accuracy)."""
    import pandas as pd

    rows = []
    for _, run in runs[(runs["method"] == method) & (runs["n"] == 2)].iterrows():
        ends = [float(endpoint_accuracy[i]) for i in run["subset"]]
        rows.append(dict(subset=run["subset"], accuracy=run["accuracy"], minus_better=run["accuracy"] - max(ends),
                         minus_worse=run["accuracy"] - min(ends)))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the ridge


def ridge_curve(ctx: Any, method: str = "cca", ridges: Sequence[float] | None = None,
                progress: bool = False) -> dict[float, float]:
    """``{ridge: merged accuracy}`` at the merge widget's slider ridges (default), merged once.

    The same merges as ``controls.merge_widget`` precomputes (:func:`~ccatoolkit.app.contexts.precompute_ridges`,
    kept in ``ctx`` and in the disk store): computed here at most once, then looked up by the widget.
    """
    from ccatoolkit.app.contexts import merge_accuracy, precompute_ridges
    from ccatoolkit.app.controls import ridge_slider_values

    ridges = ridge_slider_values() if ridges is None else [float(r) for r in ridges]
    precompute_ridges(ctx, ridges, progress=progress)
    return {r: merge_accuracy(ctx, method, r) for r in ridges}


# --------------------------------------------------------------------------- figures


def _axes(ax: Any, figsize: tuple[float, float], ncols: int = 1) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(1, ncols, figsize=figsize, layout="constrained")
    return ax


def plot_pair_accuracies(accuracies: Mapping[str, float], ax: Any = None, title: str | None = None,
                         window: float = 0.08) -> Any:
    """Bars of test accuracy (``{name: accuracy}``: the models and every merge), zoomed to where they differ.

    The y axis spans the bars within ``window`` of the best one, plus a margin; a bar below that (a
    merge that collapses) is drawn to the bottom edge with its value written on it. Each bar has its
    method's colour (:func:`~ccatoolkit.plots.style.method_color`) and its value on top.
    """
    if not accuracies:
        raise ValueError("accuracies is empty; pass a dict name -> accuracy")
    ax = _axes(ax, (7, 3.6))
    names = list(accuracies)
    values = np.array([float(accuracies[n]) for n in names])
    top = float(values.max())
    shown = values[values >= top - window]
    low = float(np.floor((shown.min() - 0.01) * 100) / 100)
    high = float(top + 0.25 * (top - low) + 0.002)
    ax.bar(names, np.maximum(values, low) - low, bottom=low, color=[method_color(n) for n in names],
           edgecolor="black", linewidth=0.5)
    for i, value in enumerate(values):
        if value >= low:
            ax.annotate(f"{value:.1%}", (i, value), ha="center", va="bottom", fontsize="small",
                        xytext=(0, 2), textcoords="offset points")
        else:  # off the scale: the bar stops at the bottom edge, its value is written on the axis
            ax.annotate(f"{value:.1%}\n(off scale)", (i, low), ha="center", va="bottom", fontsize="small",
                        xytext=(0, 3), textcoords="offset points", color="black")
    ax.set_ylim(low, high)
    ax.yaxis.set_major_formatter(_percent_formatter())
    ax.set_ylabel("test accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="x", labelrotation=20)
    if title:
        ax.set_title(title, fontsize="medium")
    return ax


def _percent_formatter() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=1)


def plot_ridge_lesson(curve: Mapping[float, float], chosen: float, scores: Mapping[float, float] | None = None,
                      reference: Mapping[str, float] | None = None, axes: Any = None, method: str = "cca") -> Any:
    """Merged accuracy against the ridge (left) and the label-free rule's scores (right), the chosen ridge starred.

    ``curve``: ``{ridge: accuracy}`` (e.g. :func:`ridge_curve`); ``chosen``: the ridge ``ridge="auto"``
    picked; ``scores``: its candidates' scores (``merge_info["ridge_scores"]``: minus the KL divergence
    from the ensemble's predictions on held-out batches, higher is better); ``reference``: horizontal
    lines (``{"A": .., "B": .., "ensemble": ..}``; A and B are drawn as one band between them).
    Returns the axes (one or two).
    """
    ridges = np.array(sorted(float(r) for r in curve))
    acc = np.array([float(curve[r]) for r in ridges])
    panels = 2 if scores else 1
    axes = _axes(axes, (10.5, 3.6) if panels == 2 else (6, 3.6), ncols=panels)
    axes = list(np.atleast_1d(axes))
    ax = axes[0]
    colour = method_color(method)
    ax.plot(ridges, acc, marker="o", markersize=4, color=colour, label=f"{method} merge (REPAIR on)")
    if scores:
        grid = np.array(sorted(float(r) for r in scores))
        on_curve = [r for r in grid if np.isclose(ridges, r).any()]
        ax.plot(on_curve, [acc[np.isclose(ridges, r)][0] for r in on_curve], linestyle="none", marker="o",
                markersize=9, markerfacecolor="none", markeredgecolor="black", label="the rule's candidates")
    near = np.isclose(ridges, float(chosen))
    if near.any():
        ax.plot([float(chosen)], [acc[near][0]], marker="*", markersize=16, color=colour, markeredgecolor="black",
                linestyle="none", label=f"label-free choice ({float(chosen):g})")
    ref = dict(reference or {})
    ends = [ref.pop(k) for k in ("A", "B") if k in ref]
    if ends:
        ax.axhspan(min(ends), max(ends) if max(ends) > min(ends) else min(ends) + 1e-4, color=method_color("A"),
                   alpha=0.18, label=f"A and B ({min(ends):.1%} to {max(ends):.1%})")
    for name, value in ref.items():
        ax.axhline(float(value), color=method_color(name), linestyle="--", linewidth=1.2, label=f"{name} ({value:.1%})")
    shown = [float(acc.min()), float(acc.max()), *ends, *(float(v) for v in ref.values())]
    low, high = min(shown), max(shown)
    ax.set_ylim(low - 0.06 * (high - low) - 1e-3, high + 0.08 * (high - low) + 1e-3)
    ax.set_xscale("log")
    ax.set_xlabel("ridge (added to each covariance, times its mean variance)")
    ax.set_ylabel("test accuracy")
    ax.yaxis.set_major_formatter(_percent_formatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="lower right")
    ax.set_title("merged accuracy against the ridge (uses test labels)", fontsize="medium")
    if scores:
        side = axes[1]
        grid = sorted(float(r) for r in scores)
        values = [float(scores[r]) for r in grid]
        side.plot(grid, values, marker="o", color=colour)
        best = grid[int(np.argmax(values))]
        side.plot([best], [max(values)], marker="*", markersize=16, color=colour, markeredgecolor="black",
                  linestyle="none", label=f"highest: {best:g}")
        side.set_xscale("log")
        side.set_xlabel("candidate ridge")
        side.set_ylabel("agreement with the ensemble\n(-KL on held-out batches)")
        side.grid(alpha=0.3)
        side.legend(fontsize="x-small")
        side.set_title("the label-free rule's score (no labels)", fontsize="medium")
    return axes if panels == 2 else ax
