"""Analysis plots draw what they are given into the given axis."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from ccatoolkit.data import dataset_info
from ccatoolkit.plots.analysis import (
    confusion_matrix,
    plot_accuracy_bars,
    plot_accuracy_vs_n,
    plot_cca_spectra,
    plot_confusion,
    plot_correlation,
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
    colors = [p.get_facecolor() for p in ax.patches]
    assert colors[2] != colors[0] and colors[0] == colors[1]
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
