"""Notebook 4's lesson (issues 27 and 28): its toys, its barrier by hand, its barrier chart, and the notebook itself.

The toys (``ccatoolkit.app.toys``) back sentences the notebook prints: a permutation passes through a ReLU and a
mixing map does not; CCA's map reads back a neuron that B spread over two (on held-out samples) where the best
permutation cannot; the barrier written out in numpy is the package's ``barrier()``. No downloads: the models
here are built in the test or trained on scikit-learn's digits in a second.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ccatoolkit.app import toys
from ccatoolkit.landscape.results import InterpolationResult, barrier

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "04_landscape.ipynb"


# --------------------------------------------------------------------------- toy (a): ReLU(Tz) != T ReLU(z)


def test_a_permutation_passes_through_the_relu_and_a_mixing_map_does_not() -> None:
    toy = toys.relu_toy()
    p, t = toy["commute"]["P"], toy["commute"]["T"]
    np.testing.assert_allclose(p["relu_after"], p["relu_before"])
    assert not np.allclose(t["relu_after"], t["relu_before"])
    np.testing.assert_allclose(t["relu_after"], [1.0, 0.0])       # ReLU(T z) with z = (2, -1)
    np.testing.assert_allclose(t["relu_before"], [1.6, -1.2])     # T ReLU(z): a negative entry no ReLU can output
    assert t["relu_before"].min() < 0
    # at x = (1, 0) the tiny network's hidden pre-activations are z
    np.testing.assert_allclose(toy["W1"] @ toy["x"][0] + toy["b1"], toy["z"])
    out = toy["outputs"]
    np.testing.assert_allclose(out["B mapped by P"], out["B"])    # the permuted network is B
    assert not np.isclose(out["B mapped by T"], out["B"]).any()   # the mapped one differs on every input shown


def test_mapping_the_hidden_layer_is_exact_without_the_relu() -> None:
    rng = np.random.default_rng(0)
    W1, b1, w2 = rng.normal(size=(3, 2)), rng.normal(size=3), rng.normal(size=3)
    T = rng.normal(size=(3, 3)) + 3 * np.eye(3)
    W1m, b1m, w2m = toys.map_hidden(W1, b1, w2, T)
    x = rng.normal(size=(20, 2))
    linear = lambda W, b, w: (x @ W.T + b) @ w  # noqa: E731  (the same network without its ReLU)
    np.testing.assert_allclose(linear(W1m, b1m, w2m), linear(W1, b1, w2), atol=1e-10)
    assert not np.allclose(toys.tiny_net(W1m, b1m, w2m, x), toys.tiny_net(W1, b1, w2, x))
    P = np.eye(3)[[2, 0, 1]]
    np.testing.assert_allclose(toys.tiny_net(*toys.map_hidden(W1, b1, w2, P), x), toys.tiny_net(W1, b1, w2, x),
                               atol=1e-12)


# --------------------------------------------------------------------------- toy (b): one neuron split over two


def test_cca_reads_back_the_split_neuron_on_held_out_samples_and_a_permutation_cannot() -> None:
    s = toys.split_neuron_toy()
    w0, w1 = 0.6, 0.4
    # T's row for a0 reads B's neurons 1 (the mix) and 2 (a1 alone): the inverse of the mix, a many-to-one row
    assert s.T[0, 1] == pytest.approx(1 / w0, rel=0.05) and s.T[0, 2] == pytest.approx(-w1 / w0, rel=0.05)
    assert np.abs(s.T[0, [0, 3]]).max() < 0.05
    assert np.count_nonzero(s.P[0]) == 1                           # a permutation copies one neuron
    assert s.error_T[0] < 0.05 < 0.25 < s.error_P[0]               # held-out samples
    assert s.error_T[1:].max() < 0.02 and s.error_P[1:].max() < 0.02
    # the errors are measured on samples the maps were not fitted on
    assert s.n_test == 2000 and not np.array_equal(s.error_T, s.train_error_T)
    other = toys.split_neuron_toy(n_test=500)
    np.testing.assert_allclose(other.T, s.T)                       # the same fit (the first samples) ...
    assert not np.allclose(other.error_T, s.error_T)               # ... measured on another held-out set


def test_the_split_neuron_exercise_solution_holds() -> None:
    """Exercise 2's solution: no split, both maps at the noise level; an even split, the permutation's a0 error grows."""
    errors = {w: toys.split_neuron_toy(weights=w) for w in ((1.0, 0.0), (0.6, 0.4), (0.5, 0.5))}
    same = errors[(1.0, 0.0)]
    assert same.error_P.max() < 0.02 and same.error_T.max() < 0.02
    assert errors[(0.5, 0.5)].error_P[0] > errors[(0.6, 0.4)].error_P[0] > 0.25
    assert max(e.error_T[0] for e in errors.values()) < 0.05
    for e in errors.values():
        assert e.error_P[1:].max() < 0.02                          # only neuron 0 changes


# --------------------------------------------------------------------------- the barrier by hand


def test_the_barrier_by_hand_is_the_package_barrier() -> None:
    rng = np.random.default_rng(1)
    alphas = np.linspace(0, 1, 21)
    for _ in range(20):
        loss = rng.uniform(0.2, 2.0, size=21)
        path = InterpolationResult(alphas=alphas, loss=loss, accuracy=1 - loss / 3)
        assert toys.hand_barrier(alphas, loss) == pytest.approx(barrier(path))
        real_b = InterpolationResult(alphas=alphas, loss=rng.uniform(0.2, 2.0, size=21), accuracy=np.zeros(21))
        ends = real_b.ends("loss")
        assert toys.hand_barrier(alphas, loss, ends) == pytest.approx(path.barrier(against=real_b))
    assert toys.hand_barrier(alphas, np.linspace(1.0, 0.5, 21)) == 0.0  # a straight path: no barrier, never negative


# --------------------------------------------------------------------------- figures


def _path(method: str, loss: list[float], label: str | None = None) -> InterpolationResult:
    alphas = np.linspace(0, 1, len(loss))
    return InterpolationResult(alphas=alphas, loss=np.array(loss), accuracy=np.full(len(loss), 0.5),
                               label=label or method, method=method)


def test_the_barrier_chart_measures_every_path_against_the_real_b() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ccatoolkit.plots.landscape import plot_barriers_against
    from ccatoolkit.plots.style import method_color

    naive = _path("none", [0.3, 1.5, 0.3], "naive")
    permute = _path("permute", [0.3, 0.35, 0.3])
    cca = _path("cca", [0.3, 0.31, 0.32])  # ends at B', worse than B: no barrier against its own end
    fig, ax = plt.subplots()
    plot_barriers_against([naive, permute, cca], naive, ax=ax)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["naive\nvs B", "permute\nvs B", "cca\nvs B", "cca\nvs its own end B'"]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [1.2, 0.05, 0.02, 0.0], atol=1e-12)
    assert heights[2] == pytest.approx(cca.barrier(against=naive)) and heights[3] == pytest.approx(cca.barrier())
    colours = [matplotlib.colors.to_hex(p.get_facecolor()[:3]) for p in ax.patches]
    assert colours == [method_color("naive"), method_color("permute"), method_color("cca"), method_color("cca")]
    assert ax.patches[3].get_hatch() == "//" and not ax.patches[2].get_hatch()
    plt.close(fig)


def test_the_plane_levels_are_round_and_cover_the_losses() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = np.array([[0.31, 0.42], [0.4243, 4.2]])
    levels = toys.readable_levels(loss)
    assert levels[0] <= loss.min() and levels[-1] >= loss.max()
    np.testing.assert_allclose(levels, [0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0])
    mantissa = levels / 10.0 ** np.floor(np.log10(levels) + 1e-9)
    assert set(np.round(mantissa, 6)) <= {1.0, 1.5, 2.0, 3.0, 5.0, 7.0}
    with pytest.raises(ValueError):
        toys.readable_levels([np.nan, -1.0])
    fig, ax = plt.subplots()
    cs = ax.contourf(np.arange(2), np.arange(2), loss, levels=levels)
    bar = fig.colorbar(cs, ax=ax)
    toys.label_levels(bar.ax, levels)
    fig.canvas.draw()
    texts = [t.get_text() for t in bar.ax.get_yticklabels()]
    assert texts == ["0.3", "0.5", "0.7", "1", "1.5", "2", "3", "5"]
    plt.close(fig)


# --------------------------------------------------------------------------- the notebook's helpers


def test_given_end_labels_the_path_and_interpolates_to_the_model_given() -> None:
    from ccatoolkit import interpolate
    from ccatoolkit.zoo.models import MLP

    torch.manual_seed(0)
    a, b, b_prime = (MLP(depth=1, width=8, in_shape=(1, 2, 2), num_classes=3).eval() for _ in range(3))
    data = [(torch.randn(16, 1, 2, 2), torch.randint(0, 3, (16,)))]
    path = interpolate(a, b, data, alphas=3, align=toys.given_end("cca_unrepaired", b_prime), progress=False)
    direct = interpolate(a, b_prime, data, alphas=3, progress=False)
    assert path.method == path.label == "cca_unrepaired"
    np.testing.assert_allclose(path.loss, direct.loss)


def test_threads_restores_the_number_of_threads() -> None:
    before = torch.get_num_threads()
    with toys.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), toys.threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_the_digits_convbn_nets_train_and_their_data_is_the_packages_split() -> None:
    train, test = toys.digits_batches(128)
    assert sum(len(y) for _, y in train) == 1437 and sum(len(y) for _, y in test) == 360
    x, y = train[0]
    assert x.shape == (128, 1, 8, 8) and x.dtype == torch.float32 and abs(float(x.mean())) < 0.5
    with toys.threads(1):
        a, b, train2, test2 = toys.digits_convbn_pair(width=8, epochs=2, cache=False)
        assert torch.equal(train2[0][0], x)
        correct = sum(int((a(xb).argmax(1) == yb).sum()) for xb, yb in test2)
    assert not a.training and any(isinstance(m, torch.nn.BatchNorm2d) for m in a.modules())
    assert correct / 360 > 0.6                                     # two epochs of a small net: well above chance
    assert not torch.equal(a.conv1.weight, b.conv1.weight)         # two seeds, two models


# --------------------------------------------------------------------------- the notebook


def _cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text())["cells"]


def test_the_notebook_is_committed_clean_and_opens_the_widget_on_the_straight_line() -> None:
    cells = _cells()
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c["cell_type"] == "code")
    assert "parameters" in next(c for c in cells if c["cell_type"] == "code")["metadata"]["tags"]
    assert any('controls.alpha_widget(ctx, alpha=0.5, method="naive")' in c for c in code)
    assert any("plot_barriers_against(" in c for c in code)
    assert any("assert np.isclose(by_hand, naive.barrier())" in c for c in code)
    assert any("repair=False" in c and "digits_convbn_pair" not in c for c in code)
    assert any("digits_convbn_pair()" in c for c in code)
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert text.count("<details><summary>Solution</summary>") == 2 and "Your turn" in text
    # prose with measured numbers is written by the run (display(Markdown(f"..."))), not typed in
    assert sum("display(Markdown(" in c for c in code) >= 6


def _promised(check: str) -> str:
    """What the first cell must say for one expectation of the last cell (its range, written as in the prose)."""
    fmt = re.search(r'"(\{[^"]*\})"\),?\s*$', check)
    percent = fmt is not None and "%" in fmt.group(1)
    signed = fmt is not None and "+" in fmt.group(1)
    kind, args = re.search(r"(around|between|at_least|at_most)\(([^)]*)\)", check).groups()
    values = [float(v) for v in args.split(",")]
    g = lambda v: f"{100 * v:g}" if percent else f"{v:g}"  # noqa: E731
    if signed:  # a difference of accuracies: "at least 0.5 points", "at most 1 point below", "3 points below"
        return f"{g(abs(values[0]))} point"
    if kind == "around":
        return f"{g(values[0])}% (±{g(values[1])}%)" if percent else f"{g(values[0])} (±{g(values[1])})"
    if kind == "between":
        return f"{g(values[0])}-{g(values[1])}%" if percent else f"{g(values[0])}-{g(values[1])}"
    word = "at least" if kind == "at_least" else "at most"
    return f"{word} {g(values[0])}%" if percent else f"{word} {values[0]:g}".replace("0.0001", "1e-4")


def test_the_first_cell_promises_what_the_last_cell_checks() -> None:
    cells = _cells()
    intro = "".join(cells[0]["source"])
    last = "".join(cells[-1]["source"])
    assert "expect_results(S" in last and "Expected at default settings" in intro
    checks = [line for line in last.splitlines() if re.search(r"\b(around|between|at_least|at_most)\(", line)]
    assert len(checks) >= 20
    missing = [(line.strip(), _promised(line)) for line in checks if _promised(line) not in intro]
    assert not missing, missing
