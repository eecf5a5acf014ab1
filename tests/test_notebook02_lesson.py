"""Notebooks 1 and 2: the helpers of ``ccatoolkit.app.inside`` and the two new plots, and the notebooks' shape
(clean, one ridge, numbers in prose from the run, modules named in prose exist, solutions hidden and running)."""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

import ccatoolkit as cc
from ccatoolkit.analysis.stats import collect_statistics
from ccatoolkit.app import contexts, inside, render
from ccatoolkit.app import settings as nb
from ccatoolkit.merging.align.cca import cca_transform
from ccatoolkit.merging.align.permutation import match_activations
from ccatoolkit.merging.ridge import DEFAULT_RIDGE
from ccatoolkit.plots import analysis as pa
from ccatoolkit.plots.style import method_color

from toybox import notebook_solutions

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NB01, NB02 = NOTEBOOKS / "01_train_a_zoo.ipynb", NOTEBOOKS / "02_looking_inside.ipynb"


@pytest.fixture(scope="module")
def fitted(digits, pair):
    """The pair's statistics at relu1 on the training batches and on the test batches, T and perm from the former."""
    train, test = digits
    a, b = pair
    st = collect_statistics([a, b], train, ["relu1"], progress=False)["relu1"]
    held = collect_statistics([a, b], test, ["relu1"], progress=False)["relu1"]
    T, _ = cca_transform(st.cov(0), st.cov(1), st.cov(0, 1), ridge=DEFAULT_RIDGE)
    return SimpleNamespace(st=st, held=held, T=T, perm=match_activations(st.corr(0, 1)))


def _activations(model, batches, layer="relu1"):
    out = []
    with torch.no_grad(), cc.capture(model, [layer]) as cache:
        for x, _ in batches:
            model(x)
            out.append(cache[layer].clone())
    return torch.cat(out).double().numpy()


# --------------------------------------------------------------------------- T against a permutation


def test_tracking_is_the_correlation_of_each_neuron_with_its_two_stand_ins(digits, pair, fitted):
    _, test = digits
    za, zb = (_activations(m, test) for m in pair)  # held-out activations, computed directly
    got = inside.tracking(fitted.held, fitted.T, fitted.perm)
    combined = zb @ fitted.T.T  # (T z_b) for every sample
    for i in range(za.shape[1]):
        if za[:, i].std() == 0:
            assert np.isnan(got["matched"][i]) and np.isnan(got["combined"][i])
            continue
        j = fitted.perm[i]
        if zb[:, j].std() > 0:
            assert got["matched"][i] == pytest.approx(np.corrcoef(za[:, i], zb[:, j])[0, 1], abs=1e-6)
        if combined[:, i].std() > 0:
            assert got["combined"][i] == pytest.approx(np.corrcoef(za[:, i], combined[:, i])[0, 1], abs=1e-6)
    # CCA's combination beats the single matched neuron, on the samples it was fitted on and on held-out ones
    for stats in (fitted.st, fitted.held):
        t = inside.tracking(stats, fitted.T, fitted.perm)
        assert np.nanmedian(t["combined"]) > np.nanmedian(t["matched"])


def test_tracking_checks_shapes_and_gives_nan_for_a_zero_row(fitted):
    T = fitted.T.copy()
    T[3] = 0.0
    assert np.isnan(inside.tracking(fitted.st, T, fitted.perm)["combined"][3])
    with pytest.raises(ValueError, match="perm of length"):
        inside.tracking(fitted.st, fitted.T, fitted.perm[:-1])


def test_a_permutation_tracks_exactly_what_activation_matching_pairs(fitted):
    P = np.eye(len(fitted.perm))[fitted.perm]  # P[i, perm[i]] = 1: (P z_b)_i = z_b[perm[i]]
    t = inside.tracking(fitted.st, P, fitted.perm)
    ok = np.isfinite(t["matched"])
    np.testing.assert_allclose(t["combined"][ok], t["matched"][ok], atol=1e-12)


def test_row_mass_and_entries_for_mass():
    P = np.eye(5)[[2, 0, 4, 1, 3]]
    curves = inside.row_mass(P)
    assert curves.shape == (5, 5) and np.all(curves == 1.0)
    assert list(inside.entries_for_mass(curves, 0.9)) == [1] * 5
    flat = inside.row_mass(np.full((2, 10), -3.0))
    np.testing.assert_allclose(flat[0], np.arange(1, 11) / 10)
    assert list(inside.entries_for_mass(flat, 0.9)) == [9, 9] and list(inside.entries_for_mass(flat, 0.95)) == [10, 10]
    M = np.array([[0.0, 0.0, 0.0], [1.0, -3.0, 0.0], [2.0, 2.0, 2.0]])  # a zero row (a constant neuron) is left out
    kept = inside.row_mass(M)
    assert kept.shape == (2, 3) and kept[0, 0] == pytest.approx(0.75)
    assert inside.row_mass(M, live=[True, False, True]).shape == (1, 3)
    with pytest.raises(ValueError, match="mass"):
        inside.entries_for_mass(kept, 1.5)


def test_random_rows_are_a_dense_reference():
    R = inside.random_rows(64, rows=200, seed=1)
    assert R.shape == (200, 64) and np.array_equal(R, inside.random_rows(64, rows=200, seed=1))
    k = np.median(inside.entries_for_mass(inside.row_mass(R), 0.9))
    assert 0.55 * 64 < k < 0.75 * 64  # a row of random numbers needs about two thirds of its entries


def test_directions_for_variance():
    S = np.diag([5.0, 3.0, 1.0, 1.0])
    assert inside.directions_for_variance(S, 0.5) == 1
    assert inside.directions_for_variance(S, 0.9) == 3
    assert inside.directions_for_variance(S, 1.0) == 4
    Q = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))[0]  # any basis
    assert inside.directions_for_variance(Q @ S @ Q.T, 0.8) == 2
    assert inside.directions_for_variance(np.zeros((3, 3))) == 0


# --------------------------------------------------------------------------- correlations, zoomed


def test_correlation_block_keeps_the_diagonal_and_clips():
    M = np.arange(100.0).reshape(10, 10)
    block = inside.correlation_block({"x": M}, size=4, start=3)["x"]
    np.testing.assert_array_equal(np.diag(block), np.diag(M)[3:7])
    assert inside.correlation_block({"x": M}, size=4, start=8)["x"].shape == (2, 2)
    with pytest.raises(ValueError, match="size"):
        inside.correlation_block({"x": M}, size=0)


def test_render_correlation_block_zooms_and_titles_the_whole_layer(digits, pair):
    ctx = contexts.CorrelationContext({"seed 0": pair[0], "seed 1": pair[1]}, digits[0])
    fig = inside.render_correlation_block(ctx, "relu1", size=8, start=4)
    views = contexts.correlation_views(ctx, "relu1")
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 3 and all(im.get_array().shape == (8, 8) for im in images)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    for title, (label, m) in zip(titles, views.items()):
        assert title.startswith(label) and f"all 32 neurons: {np.diag(m).mean():.2f}" in title
    assert "neurons 4 to 11 of 32" in render.figure_title(fig)


def test_correlation_block_widget_redraws_when_the_block_moves(digits, pair):
    ctx = contexts.CorrelationContext({"seed 0": pair[0], "seed 1": pair[1]}, digits[0])
    widget = inside.correlation_block_widget(ctx, size=8)
    assert widget.error is None and "neurons 0 to 7" in widget.text
    widget.controls["start"].value = 16
    assert widget.redraws == 2 and "neurons 16 to 23" in widget.text
    widget.controls["layer"].value = "relu2"
    assert widget.error is None and "layer relu2" in widget.text


# --------------------------------------------------------------------------- notebook 1: one bar, class mix


def test_zoo_models_shows_one_bar_and_trains_quietly(monkeypatch):
    calls, bars = [], []

    def fake_zoo(s, split, n=None, seeds=None):
        calls.append((split, n, seeds, s.progress))
        return [f"{split}-{seed}" for seed in (seeds or range(n))]

    import tqdm.auto

    class Counting(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            bars.append(not kwargs.get("disable", False))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(inside, "zoo", fake_zoo)
    monkeypatch.setattr(tqdm.auto, "tqdm", Counting)
    out = inside.zoo_models(nb.settings(True, progress=True), {"full": 3, "skewed": 2}, desc="zoo")
    assert out == {"full": ["full-0", "full-1", "full-2"], "skewed": ["skewed-0", "skewed-1"]}
    assert calls == [("full", 1, [0], False), ("full", 1, [1], False), ("full", 1, [2], False),
                     ("skewed", 2, None, False)]
    assert bars == [True]  # one bar for the whole task
    bars.clear()
    inside.zoo_models(nb.settings(True, progress=False), {"full": 1})
    assert bars in ([], [False])


def test_class_mix_counts_each_models_labels(monkeypatch):
    def fake_loaders(s, split, n_models=1, model_index=0):
        y = torch.tensor([model_index] * 3 + [2])  # model i: three of class i, one of class 2
        return {"train": [(None, y[:2]), (None, y[2:])]}

    monkeypatch.setattr(inside, "loaders", fake_loaders)
    mix = inside.class_mix(nb.settings(True), "skewed", n=2, num_classes=3)
    np.testing.assert_allclose(mix, [[0.75, 0.0, 0.25], [0.0, 0.75, 0.25]])


# --------------------------------------------------------------------------- the new plots


def test_plot_row_mass_draws_a_median_line_per_matrix_on_a_log_axis():
    curves = {"permutation P": inside.row_mass(np.eye(6)), "cca": inside.row_mass(inside.random_rows(6, 20))}
    ax = pa.plot_row_mass(curves, colors={"permutation P": method_color("permute")}, title="rows")
    lines = [line for line in ax.lines if line.get_label() and not line.get_label().startswith("_")]
    assert [line.get_label().split(":")[0] for line in lines] == ["permutation P", "cca"]
    assert lines[0].get_color() == method_color("permute") and lines[1].get_color() == method_color("cca")
    assert "1 for 90%" in lines[0].get_label() and ax.get_xscale() == "log" and ax.get_title() == "rows"
    np.testing.assert_allclose(lines[0].get_ydata(), 1.0)
    with pytest.raises(ValueError, match="empty"):
        pa.plot_row_mass({})
    plt.close("all")


def test_plot_value_cdfs_steps_to_one_and_drops_nans():
    ax = pa.plot_value_cdfs({"a": [0.2, np.nan, 0.4, 0.6], "b": np.array([0.9, 0.95])},
                            colors={"a": "#123456"}, styles={"b": "--"}, xlabel="corr")
    a, b = ax.lines[:2]
    np.testing.assert_allclose(a.get_xdata(), [0.2, 0.4, 0.6]) and np.testing.assert_allclose(a.get_ydata()[-1], 1.0)
    assert a.get_color() == "#123456" and b.get_linestyle() == "--" and "median 0.400" in a.get_label()
    with pytest.raises(ValueError, match="finite"):
        pa.plot_value_cdfs({"c": [np.nan]})
    plt.close("all")


# --------------------------------------------------------------------------- the notebooks' shape


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _source(cell):
    return "".join(cell["source"])


@pytest.mark.parametrize("path", [NB01, NB02], ids=["01", "02"])
def test_notebook_has_takeaways_solutions_and_a_check(path):
    cells = _cells(path)
    code = [c for c in cells if c["cell_type"] == "code"]  # clean, parameters, intro: test_notebook.py
    takeaways = next(_source(c) for c in code if "takeaways = [" in _source(c))
    listed = next(node.value for node in ast.walk(ast.parse(takeaways))
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "takeaways")
    assert 3 <= len(listed.elts) <= 5 and "display(Markdown(" in takeaways
    text = next(_source(c) for c in cells if c["cell_type"] == "markdown" and "## Your turn" in _source(c))
    solutions = re.findall(r"<details><summary>Solution</summary>(.*?)</details>", text, flags=re.S)
    assert 1 <= len(solutions) <= 2 and all(re.search(r"```python\n.*?```", s, flags=re.S) for s in solutions)
    assert "expect_results(" in _source(code[-1])


@pytest.mark.parametrize("path", [NB01, NB02], ids=["01", "02"])
def test_the_first_cell_promises_the_checks(path):
    """The intro's expected numbers are the centres the last cell checks (numbers in later prose:
    test_notebook.py)."""
    cells = _cells(path)
    first, check = _source(cells[0]), _source([c for c in cells if c["cell_type"] == "code"][-1])
    for centre, fmt in re.findall(r"around\((-?[\d.]+), [\d.]+\), \"(\{[^\"]+\})\"", check):
        written = fmt.format(float(centre)).replace("+", "").replace("-", "")
        assert written.rstrip("0").rstrip(".") in first, (written, first)
    for centre in re.findall(r"around\((-?[\d.]+), [\d.]+\)\)", check):  # default format: the number as written
        assert centre.lstrip("-") in first, centre


@pytest.mark.parametrize("path", [NB01, NB02], ids=["01", "02"])
def test_modules_and_functions_named_in_prose_exist(path):
    prose = "\n".join(_source(c) for c in _cells(path) if c["cell_type"] == "markdown")
    for module in set(re.findall(r"`(ccatoolkit(?:\.\w+)+)`", prose)):
        assert importlib.util.find_spec(module) is not None, module
    for name in set(re.findall(r"`cc\.(\w+)", prose)):
        assert name in cc.__all__, name
    for module, name in set(re.findall(r"`(inside|inputs|contexts)\.(\w+)", prose)):
        assert hasattr(importlib.import_module(f"ccatoolkit.app.{module}"), name), (module, name)
    assert "ccatoolkit.activations" not in prose


def test_notebook02_uses_one_ridge_the_merges_default():
    code = "\n".join(_source(c) for c in _cells(NB02) if c["cell_type"] == "code")
    assert "RIDGE = DEFAULT_RIDGE" in code and DEFAULT_RIDGE == 0.1
    ridges = set(re.findall(r"ridge=([^,)\s]+)", code)) - {"'auto'"}  # 'auto': cc.merge's choice, named in a print
    assert ridges == {"RIDGE"}, ridges  # every CCA computation at the one ridge
    assert "inside.tracking(held" in code and 'data["test"]' in code  # T's fit is measured held out
    assert any(_source(c).strip() == "inside.correlation_block_widget(ctx)" for c in _cells(NB02))


def test_notebook01_trains_under_one_bar_per_cell():
    code = [_source(c) for c in _cells(NB01) if c["cell_type"] == "code"]
    training = [c for c in code if "zoo_models(" in c]
    assert len(training) == 2 and all("inputs.zoo(S," not in c for c in training)


def test_notebook02_solutions_run(digits, pair, fitted):
    train, test = digits
    a, b = pair
    st = fitted.st
    namespace = dict(cc=cc, np=np, inside=inside, cca_transform=cca_transform, match_activations=match_activations,
                     collect_statistics=collect_statistics, RIDGE=DEFAULT_RIDGE, a=a, b=b, layers=["relu1", "relu2"],
                     data={"stats": train, "test": test}, st=st, held=fitted.held, perm=fitted.perm,
                     S_aa=st.cov(0), S_bb=st.cov(1), S_ab=st.cov(0, 1),
                     stats=collect_statistics([a, b], train, ["relu1", "relu2"], progress=False))
    out = io.StringIO()
    for code in notebook_solutions(NB02):
        with contextlib.redirect_stdout(out):
            exec(code, namespace)  # noqa: S102
    printed = out.getvalue()
    assert printed.count("ridge ") == 3 and "relu1:" in printed and "relu2:" in printed


def test_notebook01_solutions_run(digits, pair):
    _, test = digits
    mix = np.full((2, 10), 0.02)
    mix[0, :5], mix[1, 5:] = 0.18, 0.18
    namespace = dict(
        cc=cc, np=np, skewed=list(pair), data={"test": test}, classes=list(range(10)), mix={"skewed": mix},
        S=SimpleNamespace(replace=lambda **changes: changes),
        inside=SimpleNamespace(zoo_models=lambda s, splits: {"full": [pair[0]]}),
        n_train={"disjoint": 350}, group={"disjoint": pd.Series([0.8, 0.9])},
    )
    out = io.StringIO()
    for code in notebook_solutions(NB01):
        with contextlib.redirect_stdout(out):
            exec(code, namespace)  # noqa: S102
    printed = out.getvalue()
    assert "skewed part 1" in printed and "random 350 images" in printed
