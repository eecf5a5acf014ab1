"""Analysis plots draw what they are given into the given axis."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from ccatoolkit.data import dataset_info
from ccatoolkit.plots.style import method_color
from ccatoolkit.plots.analysis import (
    collapsed_methods,
    confusion_matrix,
    plot_accuracy_bars,
    plot_accuracy_vs_n,
    plot_cca_spectra,
    plot_confusion,
    plot_correlation,
    plot_spread_bars,
    plot_spread_vs_n,
    update_accuracy_bars,
    update_confusion,
)


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def test_correlation_heatmap_draws_the_matrix_and_its_diagonal(ax):
    corr = torch.eye(6) * 0.8
    out = plot_correlation(corr, ax=ax, title="relu1")
    assert out is ax
    image = ax.get_images()[0]
    np.testing.assert_allclose(image.get_array(), corr.numpy())
    assert image.get_clim() == (-1.0, 1.0)
    assert "relu1" in ax.get_title() and "0.80" in ax.get_title()


def test_correlation_heatmap_rejects_vectors(ax):
    with pytest.raises(ValueError, match="2-D"):
        plot_correlation(np.ones(4), ax=ax)


def test_cca_spectra_one_line_per_layer_sorted_descending(ax):
    spectra = {"relu1": [0.2, 0.9, 0.5], "relu2": np.linspace(0, 1, 8)}
    plot_cca_spectra(spectra, ax=ax)
    lines = ax.get_lines()
    assert len(lines) == 2
    y = lines[0].get_ydata()
    np.testing.assert_allclose(y, [0.9, 0.5, 0.2])
    assert lines[1].get_xdata().max() < 1.0 and len(lines[1].get_xdata()) == 8
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("relu1") and "0.53" in labels[0]
    with pytest.raises(ValueError, match="empty"):
        plot_cca_spectra({}, ax=ax)


def test_accuracy_bars_heights_highlight_and_reference(ax):
    accs = {"average": 0.2, "permute": 0.7, "cca": 0.8}
    plot_accuracy_bars(accs, ax=ax, highlight="cca", reference={"model A": 0.85})
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [0.2, 0.7, 0.8])
    colors = [matplotlib.colors.to_hex(p.get_facecolor(), keep_alpha=False) for p in ax.patches]
    assert colors == [method_color(m) for m in accs]  # one colour per method, as in every other figure
    assert [p.get_alpha() for p in ax.patches] == [0.35, 0.35, 1.0] and ax.patches[2].get_linewidth() == 2.0
    reference = [line for line in ax.get_lines() if line.get_label() == "model A"][0]
    assert reference.get_color() == method_color("A")
    assert any(abs(line.get_ydata()[0] - 0.85) < 1e-12 for line in ax.get_lines())
    assert {t.get_text() for t in ax.texts} >= {"20.0%", "80.0%"}
    with pytest.raises(ValueError, match="highlight"):
        plot_accuracy_bars(accs, ax=ax, highlight="zipit")


def test_accuracy_vs_n_lines_and_highlight(ax):
    results = {"average": {2: 0.5, 3: 0.3}, "cca": {3: 0.7, 2: 0.8}}
    plot_accuracy_vs_n(results, ax=ax, highlight=("cca", 3))
    lines = ax.get_lines()
    assert len(lines) == 3  # two methods + the highlight marker
    np.testing.assert_allclose(lines[1].get_xdata(), [2, 3])
    np.testing.assert_allclose(lines[1].get_ydata(), [0.8, 0.7])
    np.testing.assert_allclose(lines[2].get_ydata(), [0.7])
    assert [lines[0].get_color(), lines[1].get_color()] == [method_color("average"), method_color("cca")]
    with pytest.raises(ValueError, match="not a point"):
        plot_accuracy_vs_n(results, ax=ax, highlight=("cca", 4))


def test_confusion_matrix_counts():
    c = confusion_matrix(torch.tensor([0, 1, 1, 2]), np.array([0, 2, 1, 2]), num_classes=3)
    np.testing.assert_array_equal(c, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    assert confusion_matrix([0, 1], [1, 0]).shape == (2, 2)
    with pytest.raises(ValueError, match="length"):
        confusion_matrix([0, 1], [0])
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix([0, 5], [0, 1], num_classes=3)


def test_plot_confusion_normalises_rows_and_reports_accuracy(ax):
    counts = np.array([[3, 1], [0, 4]])
    plot_confusion(counts, ax=ax, class_names=["a", "b"])
    np.testing.assert_allclose(ax.get_images()[0].get_array(), [[0.75, 0.25], [0.0, 1.0]])
    assert "87.5%" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    with pytest.raises(ValueError, match="square"):
        plot_confusion(np.ones((2, 3)), ax=ax)


def test_new_axis_when_none_given():
    ax = plot_confusion(np.eye(10))
    assert ax.get_xticklabels()[0].get_text() == "0"  # no data set is assumed: class indices
    plt.close(ax.figure)
    ax = plot_confusion(np.eye(10), class_names=dataset_info("cifar10")["classes"])
    assert ax.get_xticklabels()[0].get_text() == "airplane"  # names come from the data set
    plt.close(ax.figure)


def test_update_confusion_and_bars_change_the_drawing_in_place(ax):
    plot_confusion(np.eye(3) * 10, ax=ax)
    texts = list(ax.texts)
    update_confusion(ax, [[5, 5, 0], [0, 10, 0], [0, 0, 10]])
    assert list(ax.texts) == texts  # the same artists, new strings
    np.testing.assert_allclose(ax.get_images()[0].get_array()[0], [0.5, 0.5, 0.0])
    assert [t.get_text() for t in ax.texts[:3]] == [".50", ".50", ""] and "83.3%" in ax.get_title()
    with pytest.raises(ValueError, match="3x3"):
        update_confusion(ax, np.eye(4))
    fig, diag = plt.subplots()
    plot_confusion([[5, 5, 0], [0, 10, 0], [0, 0, 10]], ax=diag, annotate="diagonal")  # recall per class only
    assert [t.get_text() for t in diag.texts] == [".50", "1.00", "1.00"]
    update_confusion(diag, np.eye(3))
    assert [t.get_text() for t in diag.texts] == ["1.00"] * 3
    plt.close(fig)
    fig, ax2 = plt.subplots()
    plot_accuracy_bars({"a": 0.5, "b": 0.7}, ax=ax2, highlight="a")
    update_accuracy_bars(ax2, {"a": 0.6, "b": 0.4}, highlight="b")
    assert [p.get_height() for p in ax2.patches] == [0.6, 0.4]
    assert [t.get_text() for t in ax2.texts] == ["60.0%", "40.0%"]
    assert ax2.patches[1].get_facecolor() != ax2.patches[0].get_facecolor()
    plt.close(fig)


def _runs():
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for method, mean in (("average", -0.5), ("permute", -0.03), ("cca", -0.01), ("ensemble", 0.0)):
        for n in (2, 3):
            for run in range(4):
                rows.append(dict(method=method, n=n, relative=mean + (0.0 if method == "ensemble" else rng.normal(0, 0.01))))
    return pd.DataFrame(rows)


def test_spread_bars_show_mean_and_sd_and_put_collapsed_methods_aside(ax):
    frame = _runs()
    assert collapsed_methods(frame) == ["average"]
    plot_spread_bars(frame[frame["n"] == 2], ax=ax)
    main = frame[(frame["n"] == 2) & frame["method"].isin(["permute", "cca"])].groupby("method", sort=False)["relative"]
    np.testing.assert_allclose([p.get_height() for p in ax.patches], main.mean().to_numpy())
    (side,) = ax.child_axes  # the collapsed method, on its own scale
    assert [t.get_text() for t in side.get_xticklabels()] == ["average"]
    assert side.patches[0].get_height() == pytest.approx(frame[(frame["n"] == 2) & (frame["method"] == "average")]["relative"].mean())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["permute", "cca"]  # the ensemble is the 0 line
    whiskers = [np.nanmax(l.get_ydata()) - np.nanmin(l.get_ydata()) for l in ax.lines[:2]]  # one per bar, capped
    np.testing.assert_allclose(whiskers, 2 * main.std().to_numpy(), rtol=1e-6)  # mean +/- one sd
    for axis in (ax, side):  # the ensemble's line at 0 lies inside the frame, not on its edge
        low, high = axis.get_ylim()
        assert low < 0.0 < high and high >= 0.05 * (high - low)


def test_spread_vs_n_draws_one_band_per_method(ax):
    frame = _runs()
    plot_spread_vs_n(frame, ax=ax)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["permute", "cca"] and len(ax.collections) == 2  # the sd bands
    assert [t.get_text() for t in ax.child_axes[0].get_legend().get_texts()] == ["average"]
    means = frame[frame["method"] == "cca"].groupby("n")["relative"].mean().to_numpy()
    np.testing.assert_allclose(ax.lines[1].get_ydata(), means)  # lines in the legend's order: permute, cca
    no_collapse = frame[frame["method"] != "average"]
    fig, ax2 = plt.subplots()
    plot_spread_vs_n(no_collapse, ax=ax2)
    assert not ax2.child_axes
    plt.close(fig)


def test_points_are_percentage_points_and_never_minus_zero():
    from ccatoolkit.plots.style import points

    assert points(-0.004) == "-0.4 pts" and points(0.012) == "+1.2 pts"
    assert points(-0.0001) == "+0.0 pts" and points(-0.0001, signed=False) == "0.0 pts"  # rounds to zero: no sign
    assert points(0.0014, signed=False, decimals=2) == "0.14 pts"
