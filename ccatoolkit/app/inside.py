"""Notebooks 1 and 2: the zoo under one progress bar, and what notebook 2 reads off two models' activations.

Notebook 1 (training a zoo):

* :func:`zoo_models`: the zoo's models of several splits (:func:`ccatoolkit.app.inputs.zoo`) under *one*
  progress bar for the whole task, with each model's training bars off;
* :func:`class_mix`: each model's class fractions in its part of a split (flat for ``"disjoint"``, which
  cuts one shuffled training set; uneven for ``"skewed"``).

Notebook 2 (looking inside):

* :func:`correlation_block`, :func:`render_correlation_block` and :func:`correlation_block_widget`: the
  neuron-by-neuron correlation heatmaps (original, permuted and CCA-aligned B,
  :func:`ccatoolkit.app.contexts.correlation_views`) zoomed on a block of neurons, so the diagonal is
  more than a hairline; each panel's title gives the mean diagonal of the *whole* matrix;
* :func:`directions_for_variance`: how many principal directions of a layer hold most of its variance
  (the few that carry a layer, against the many that canonical correlations also count);
* :func:`tracking`: how well B tracks each of A's neurons, from any covariances (those ``T`` was fitted
  on, or held-out ones): the correlation of A's neuron ``i`` with B's matched neuron ``perm[i]`` and with
  ``(T z_b)[i]``, the combination of B's neurons CCA Merge's ``T`` builds;
* :func:`row_mass`, :func:`entries_for_mass` and :func:`random_rows`: how concentrated the rows of a
  transform are (a permutation's row: one entry holds all of it), beside rows of random numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ccatoolkit._utils import progress_bar
from ccatoolkit.app.contexts import CorrelationContext, correlation_views
from ccatoolkit.app.controls import InteractiveFigure
from ccatoolkit.app.inputs import loaders, zoo
from ccatoolkit.app.render import new_figure
from ccatoolkit.app.settings import Settings
from ccatoolkit.plots.analysis import plot_correlation

__all__ = [
    "zoo_models", "class_mix", "correlation_block", "render_correlation_block", "correlation_block_widget",
    "directions_for_variance", "tracking", "row_mass", "entries_for_mass", "random_rows",
]


# --------------------------------------------------------------------------- notebook 1: the zoo


def zoo_models(s: Settings, splits: Mapping[str, int], desc: str = "zoo") -> dict[str, list[Any]]:
    """``{split: inputs.zoo(s, split, n)}`` for each ``split: n``, under one progress bar (when ``s.progress``).

    The models' own training bars (an epoch bar and a batch bar per model) are switched off, so a cell that
    trains twelve models shows one bar, not dozens. ``"full"`` advances the bar model by model (seeds
    ``0..n-1``, as ``inputs.zoo`` numbers them); a data split advances it by the whole split (its ``n`` models
    are parts of one cut, trained by one ``inputs.zoo`` call). The models are the ones ``inputs.zoo`` gives
    (the same cache entries).
    """
    quiet = s.replace(progress=False)
    tasks: list[tuple[str, int, list[int] | None]] = []
    for split, n in splits.items():
        if split == "full":
            tasks += [("full", 1, [seed]) for seed in range(int(n))]
        else:
            tasks.append((split, int(n), None))
    out: dict[str, list[Any]] = {split: [] for split in splits}
    bar = progress_bar(tasks, s.progress, desc=desc, unit="task")
    for split, n, seeds in bar:
        bar.set_postfix(split=split, models=len(out[split]) + n)
        out[split] += zoo(quiet, split, n=n, seeds=seeds)
    bar.close()
    return out


def class_mix(s: Settings, split: str, n: int | None = None, num_classes: int = 10) -> np.ndarray:
    """``(n, num_classes)``: the fraction of each class in model ``i``'s training data under ``split``."""
    n = s.n_models if n is None else int(n)
    mix = np.zeros((n, num_classes))
    for i in range(n):
        labels = torch.cat([y for _, y in loaders(s, split, n_models=n, model_index=i)["train"]]).cpu()
        counts = torch.bincount(labels, minlength=num_classes).double()
        mix[i] = (counts / counts.sum()).numpy()
    return mix


# --------------------------------------------------------------------------- notebook 2: correlations, zoomed


def correlation_block(views: Mapping[str, Any], size: int = 64, start: int = 0) -> dict[str, np.ndarray]:
    """The ``size x size`` block of each view at rows and columns ``start..start+size`` (clipped to the matrix).

    In every view B's neuron ``j`` is compared with A's neuron ``j`` after alignment, so the block keeps
    the diagonal of the whole matrix on its own diagonal.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    out = {}
    for label, matrix in views.items():
        m = np.asarray(matrix, dtype=np.float64)
        lo = max(0, min(int(start), min(m.shape) - 1))
        out[label] = m[lo:lo + size, lo:lo + size]
    return out


def render_correlation_block(ctx: CorrelationContext, layer: str, pair: tuple[str, str] | None = None,
                             size: int = 64, start: int = 0) -> Any:
    """Three heatmaps (original, permuted, CCA-aligned B) of neurons ``start..start+size`` of ``layer``.

    Each title gives the mean diagonal correlation of the whole layer, not only of the block shown.
    """
    pair = tuple(pair) if pair is not None else ctx.pairs[0]
    views = correlation_views(ctx, layer, pair)
    blocks = correlation_block(views, size, start)
    n = min(next(iter(views.values())).shape)
    lo = max(0, min(int(start), n - 1))
    hi = min(n, lo + size)
    fig = new_figure((13, 4.2))
    axes = fig.subplots(1, len(blocks))
    for ax, (label, block) in zip(axes, blocks.items()):
        plot_correlation(block, ax=ax, colorbar=ax is axes[-1], xlabel=f"{pair[1]} neuron", ylabel=f"{pair[0]} neuron")
        ticks = np.linspace(0, hi - lo - 1, min(5, hi - lo)).round().astype(int)
        ax.set_xticks(ticks, [str(lo + t) for t in ticks])
        ax.set_yticks(ticks, [str(lo + t) for t in ticks])
        whole = float(np.nanmean(np.diag(np.asarray(views[label]))))
        ax.set_title(f"{label}\nmean diagonal, all {n} neurons: {whole:.2f}", fontsize="medium")
    fig.suptitle(f"layer {layer}: {pair[0]} vs {pair[1]}, neurons {lo} to {hi - 1} of {n}")
    return fig


def correlation_block_widget(ctx: CorrelationContext, layer: str | None = None, size: int = 64) -> InteractiveFigure:
    """Dropdowns for the layer and the pair, and a slider for the block's first neuron; redraws
    :func:`render_correlation_block` (the matrices are cached in ``ctx``, so moving back is instant)."""
    import ipywidgets as W

    layer = layer or ctx.layers[0]
    n = min(correlation_views(ctx, layer).popitem()[1].shape)
    layer_dd = W.Dropdown(options=list(ctx.layers), value=layer, description="layer")
    pair_dd = W.Dropdown(options=[(f"{a} vs {b}", (a, b)) for a, b in ctx.pairs], value=ctx.pairs[0],
                         description="models")
    start = W.IntSlider(value=0, min=0, max=max(0, n - size), step=max(1, size // 2), description="first neuron",
                        continuous_update=False)
    return InteractiveFigure(lambda layer, pair, start: render_correlation_block(ctx, layer, pair, size, start),
                             {"layer": layer_dd, "pair": pair_dd, "start": start})


# --------------------------------------------------------------------------- notebook 2: T against a permutation


def directions_for_variance(cov: Any, share: float = 0.9) -> int:
    """The fewest principal directions (eigenvectors of the covariance ``cov``) that hold ``share`` of its variance."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    S = torch.as_tensor(cov, dtype=torch.float64).cpu()
    values = torch.linalg.eigvalsh((S + S.T) / 2).flip(0).clamp_min(0)
    total = float(values.sum())
    if total <= 0:
        return 0
    return int((torch.cumsum(values, 0) < share * total * (1 - 1e-12)).sum()) + 1


def tracking(stats: Any, T: Any, perm: Any) -> dict[str, np.ndarray]:
    """Per neuron ``i`` of A: ``corr(a_i, b_perm[i])`` (``"matched"``) and ``corr(a_i, (T z_b)_i)`` (``"combined"``).

    ``stats`` has ``cov(i, j)`` (a :class:`~ccatoolkit.analysis.stats.JointStats` of A then B): pass the
    statistics ``T`` and ``perm`` were fitted on for the in-sample fit, other samples' for a held-out one.
    Only covariances are read (no forward pass). A neuron of A with no variance, or a zero row of ``T``
    (CCA's constant neurons), gives NaN (use ``np.nanmedian``).
    """
    S_aa, S_bb, S_ab = (torch.as_tensor(stats.cov(i, j), dtype=torch.float64).cpu() for i, j in ((0, 0), (1, 1), (0, 1)))
    Tt = torch.as_tensor(np.asarray(T), dtype=torch.float64)
    idx = torch.as_tensor(np.asarray(perm), dtype=torch.long)
    n = S_aa.shape[0]
    if Tt.shape != (n, S_bb.shape[0]) or idx.shape != (n,):
        raise ValueError(f"T must be {n} x {S_bb.shape[0]} and perm of length {n}; got {tuple(Tt.shape)}, "
                         f"{tuple(idx.shape)}")
    sd_a = torch.diagonal(S_aa).clamp_min(0).sqrt()
    sd_b = torch.diagonal(S_bb).clamp_min(0).sqrt()

    def ratio(num: torch.Tensor, den: torch.Tensor) -> np.ndarray:
        out = torch.full_like(num, float("nan"))
        ok = den > 1e-12 * float(den.max()) if den.numel() and float(den.max()) > 0 else torch.zeros_like(den, dtype=torch.bool)
        out[ok] = num[ok] / den[ok]
        return out.numpy()

    matched = ratio(S_ab[torch.arange(n), idx], sd_a * sd_b[idx])
    sd_t = ((Tt @ S_bb) * Tt).sum(1).clamp_min(0).sqrt()  # sd of (T z_b)_i
    combined = ratio((S_ab * Tt).sum(1), sd_a * sd_t)  # cov(a_i, (T z_b)_i) = (S_ab T^T)_ii
    return {"matched": matched, "combined": combined}


def row_mass(M: Any, live: Any = None) -> np.ndarray:
    """``(rows, n)``: the share of each row's L1 norm held by its ``k`` largest ``|entries|``, ``k = 1..n``.

    Rows that are all zero (CCA's constant neurons) are left out, as are rows where ``live`` is False. A
    permutation's row is 1 from ``k = 1``; a dense row climbs slowly.
    """
    a = np.abs(np.asarray(M, dtype=np.float64))
    if a.ndim != 2:
        raise ValueError(f"M must be a matrix, got shape {a.shape}")
    keep = a.sum(1) > 0
    if live is not None:
        keep &= np.asarray(live, dtype=bool)
    a = a[keep]
    cum = np.cumsum(-np.sort(-a, axis=1), axis=1)
    return cum / cum[:, -1:]


def entries_for_mass(curves: np.ndarray, mass: float = 0.9) -> np.ndarray:
    """For each row of :func:`row_mass`' result: how many of its largest entries hold ``mass`` of its L1 norm."""
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    curves = np.asarray(curves)
    return (curves < mass - 1e-12).sum(axis=1) + 1


def random_rows(n: int, rows: int = 512, seed: int = 0) -> np.ndarray:
    """``rows x n`` independent standard normal numbers: the reference of a row with no structure at all."""
    return np.random.default_rng(seed).standard_normal((int(rows), int(n)))
