"""Notebook 3's lesson: CCA Merge by hand (``ccatoolkit.app.by_hand``) equals ``cc.merge``, its figures and
prose helpers, and the notebook's shape (clean, numbers in prose from the run, solutions hidden)."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

import ccatoolkit as cc
from ccatoolkit.app import by_hand
from ccatoolkit.plots.style import method_color

from toybox import notebook_solutions

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "03_merging_two_models.ipynb"


# --------------------------------------------------------------------------- the method by hand


def test_mlp_layers_name_each_hidden_layer_and_refuse_other_models(pair):
    assert by_hand.mlp_layers(pair[0]) == [("relu1", "fc1", "fc2"), ("relu2", "fc2", "head")]
    with pytest.raises(ValueError, match="plain Linear"):
        by_hand.mlp_layers(cc.MLP(depth=2, width=8, in_shape=(1, 8, 8), batchnorm=True))


def test_layer_covariances_are_the_covariances_of_the_hidden_activations(digits, pair):
    train, _ = digits
    a, b = pair
    covs = by_hand.layer_covariances([a, b], train)
    assert list(covs) == ["relu1", "relu2"]
    with torch.no_grad():
        x = torch.cat([batch[0] for batch in train])
        z = torch.cat([m.relu1(m.fc1(m.flatten(x))) for m in (a, b)], 1).double()  # A's 32 neurons, then B's
    joint = torch.cov(z.T)
    S_AA, S_BB, S_AB = covs["relu1"]
    assert torch.allclose(S_AA, joint[:32, :32], atol=1e-6) and torch.allclose(S_BB, joint[32:, 32:], atol=1e-6)
    assert torch.allclose(S_AB, joint[:32, 32:], atol=1e-6)


@pytest.mark.parametrize("ridge", [0.01, 1.0])
def test_merge_by_hand_equals_cc_merge_without_repair(digits, pair, ridge):
    train, _ = digits
    a, b = pair
    b_before = {k: v.clone() for k, v in b.state_dict().items()}
    maps = by_hand.cca_maps(by_hand.layer_covariances([a, b], train), ridge)
    merged = by_hand.average_weights([a, by_hand.align_mlp(b, maps)])
    reference = cc.merge([a, b], "cca", train, repair=False, ridge=ridge, progress=False)
    assert by_hand.max_weight_difference(merged, reference) < 1e-5
    plain = cc.merge([a, b], "average", train, progress=False)  # the maps really moved B's weights
    assert by_hand.max_weight_difference(merged, plain) > 1e-3
    assert all(torch.equal(b_before[k], v) for k, v in b.state_dict().items())  # B itself is unchanged


def test_a_permutation_moves_b_exactly_and_cca_does_not(digits, pair):
    train, test = digits
    a, b = pair
    permutations = cc.alignment_transforms(a, b, "permute", train, progress=False)
    assert cc.output_gap(b, by_hand.align_mlp(b, permutations), test) < 1e-4  # ReLU(P h) = P ReLU(h)
    maps = by_hand.cca_maps(by_hand.layer_covariances([a, b], train), 0.1)
    assert cc.output_gap(b, by_hand.align_mlp(b, maps), test) > 1e-2  # ReLU(T h) != T ReLU(h)


def test_dead_neurons_are_counted_as_cca_leaves_them_out():
    S = torch.diag(torch.tensor([2.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    assert by_hand.dead_neurons(S) == 2 and by_hand.dead_neurons(torch.eye(3)) == 0


def test_average_weights_and_max_weight_difference(pair):
    a, b = pair
    mean = by_hand.average_weights([a, b])
    assert torch.allclose(mean.fc1.weight, (a.fc1.weight + b.fc1.weight) / 2)
    assert by_hand.max_weight_difference(a, a) == 0.0
    expected = float((a.head.bias - b.head.bias).detach().abs().max())
    assert by_hand.max_weight_difference(a, b) >= expected > 0


# --------------------------------------------------------------------------- honest comparisons


def test_a_difference_within_the_spread_is_not_a_ranking():
    assert by_hand.versus(0.002, 0.004) == "≈" and by_hand.versus(-0.004, 0.004) == "≈"
    assert by_hand.versus(0.01, 0.004) == "above" and by_hand.versus(-0.01, 0.004) == "below"
    assert by_hand.compared(0.001, 0.004) == "about as accurate as (≈)" and by_hand.compared(-0.02, 0.004) == "below"
    assert by_hand.noise_text(-0.002, 0.004) == "-0.2 pts, within the spread of ±0.4 pts"
    assert by_hand.noise_text(0.013, 0.004, "the noise") == "+1.3 pts, outside the noise of ±0.4 pts"
    with pytest.raises(ValueError, match="spread"):
        by_hand.versus(0.1, float("nan"))


def test_pair_endpoint_gaps_compare_a_merge_with_its_own_two_models():
    import pandas as pd

    runs = pd.DataFrame([dict(method="cca", n=2, subset=(0, 1), accuracy=0.85),
                         dict(method="cca", n=2, subset=(1, 2), accuracy=0.80),
                         dict(method="zipit", n=2, subset=(0, 1), accuracy=0.5)])
    gaps = by_hand.pair_endpoint_gaps(runs, [0.86, 0.84, 0.79], "cca")
    assert gaps["minus_better"].round(6).tolist() == [-0.01, -0.04]
    assert gaps["minus_worse"].round(6).tolist() == [0.01, 0.01]


# --------------------------------------------------------------------------- the ridge and the figures


def test_ridge_curve_merges_the_widget_ridges_once(digits, pair):
    from ccatoolkit.app import contexts

    train, test = digits
    ctx = contexts.MergeContext(list(pair), train, test, methods=["cca"], disk_cache=False)
    curve = by_hand.ridge_curve(ctx, "cca", ridges=[0.1, 10.0])
    assert list(curve) == [0.1, 10.0] and all(0.0 < v <= 1.0 for v in curve.values())
    assert contexts.precompute_ridges(ctx, [0.1, 10.0], progress=False) == 0  # the widget only looks them up
    merged = cc.merge(list(pair), "cca", train, ridge=10.0, progress=False)
    assert curve[10.0] == pytest.approx(cc.evaluate(merged, test)["accuracy"], abs=1e-9)


def test_pair_accuracy_bars_zoom_in_and_keep_the_method_colours():
    import matplotlib.pyplot as plt

    accuracies = {"A": 0.885, "B": 0.886, "average": 0.63, "permute": 0.872, "cca": 0.883, "ensemble": 0.888}
    ax = by_hand.plot_pair_accuracies(accuracies)
    low, high = ax.get_ylim()
    assert 0.8 < low < 0.872 and 0.888 < high < 0.95  # zoomed to where the bars differ, not 0 to 1
    texts = [t.get_text() for t in ax.texts]
    assert "63.0%\n(off scale)" in texts and "88.3%" in texts
    colours = [matplotlib.colors.to_hex(p.get_facecolor()) for p in ax.patches]
    assert colours == [method_color(n) for n in accuracies]
    plt.close(ax.figure)


def test_ridge_lesson_marks_the_label_free_choice():
    import matplotlib.pyplot as plt

    curve = {1e-4: 0.70, 1e-2: 0.86, 0.1: 0.875, 1.0: 0.88, 10.0: 0.879}
    scores = {0.01: -0.007, 0.1: -0.0053, 1.0: -0.0052, 10.0: -0.0057}
    left, right = by_hand.plot_ridge_lesson(curve, 1.0, scores, reference={"A": 0.885, "B": 0.886, "ensemble": 0.888})
    stars = [line for line in left.get_lines() if line.get_marker() == "*"]
    assert len(stars) == 1 and list(stars[0].get_xdata()) == [1.0] and list(stars[0].get_ydata()) == [0.88]
    assert left.get_ylim()[1] > 0.888 and left.get_ylim()[0] < 0.70  # every point and line is in view
    best = [line for line in right.get_lines() if line.get_marker() == "*"]
    assert list(best[0].get_xdata()) == [1.0]
    plt.close(left.figure)


def test_spread_axes_take_the_method_colours_and_points():
    import matplotlib.pyplot as plt
    import pandas as pd

    from ccatoolkit.plots import analysis as pa

    runs = pd.DataFrame([dict(method=m, subset=(i,), relative=v + 0.001 * i)
                         for m, v in (("permute", -0.013), ("cca", -0.004), ("average", -0.24)) for i in range(3)])
    ax = pa.plot_spread_bars(runs)
    for axis in [ax, *ax.child_axes]:
        names = [t.get_text() for t in axis.get_xticklabels()]
        bars = [p for p in axis.patches if isinstance(p, matplotlib.patches.Rectangle)]
        assert [matplotlib.colors.to_hex(b.get_facecolor()) for b in bars] == [method_color(n) for n in names]
        assert axis.yaxis.get_major_formatter()(-0.004, 0) == "-0.4"
    assert [t.get_text() for t in ax.child_axes[0].get_xticklabels()] == ["average"]
    plt.close(ax.figure)


# --------------------------------------------------------------------------- the notebook


def _notebook() -> dict:
    return json.loads(NOTEBOOK.read_text())


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def test_notebook_keeps_its_parameter_lines_widget_and_check():
    cells = _notebook()["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]  # clean, parameters, intro: test_notebook.py
    assert _source(code[0]).splitlines()[2:] == ["SMOKE = None", 'MODEL = None   # None: "mlp"',
                                                 'DEVICE = None  # None: CUDA, then MPS, then CPU']
    assert any(_source(c).startswith('controls.merge_widget(ctx, method="cca", ridge=merged.merge_info["ridge"])')
               for c in code)  # the widget opens on the merge of section 1
    assert "expect_results(" in _source(code[-1])


def test_numbers_in_prose_come_from_the_run():
    """Only the first cell states numbers (the expected ranges); every later sentence with a result is a
    ``display(Markdown(f"..."))`` of the run's variables."""
    cells = _notebook()["cells"]
    for cell in cells[1:]:
        if cell["cell_type"] == "markdown":
            text = re.sub(r"<details>.*?</details>", "", _source(cell), flags=re.S)
            assert not re.search(r"\d%|\bpts\b|\d\.\d+ points", text), text[:200]
    assert sum("display(Markdown(" in _source(c) for c in cells if c["cell_type"] == "code") >= 5


def test_the_first_cell_promises_what_the_check_table_checks():
    cells = _notebook()["cells"]
    first, check = _source(cells[0]), _source([c for c in cells if c["cell_type"] == "code"][-1])
    centres = [float(c) for c in re.findall(r"around\((-?[\d.]+),", check)]
    assert len(centres) >= 4
    for c in centres:
        written = f"{100 * c:.1f}%" if 0 < c < 1 else f"{c:+.1f}"
        assert written in first, (written, first)
    for bound in re.findall(r"at_most\((-?[\d.]+)\)", check):
        if float(bound) < 0:  # a loss in points, e.g. -20: "more than 20 points below"
            assert f"{-float(bound):g} points" in first
        elif float(bound) >= 1e-3:  # the ridge: "within 0.5 points"
            assert f"{float(bound):g} points" in first


def test_your_turn_solutions_are_hidden_and_run(digits, pair):
    train, test = digits
    cells = _notebook()["cells"]
    text = next(_source(c) for c in cells if c["cell_type"] == "markdown" and "## Your turn" in _source(c))
    solutions = re.findall(r"<details><summary>Solution</summary>(.*?)</details>", text, flags=re.S)
    assert 1 <= len(solutions) <= 2 and len(notebook_solutions(NOTEBOOK)) == len(solutions)  # one code block each
    a, b = pair
    namespace = dict(cc=cc, by_hand=by_hand, mlp_a=a, mlp_b=b, data={"stats": train},
                     ctx=SimpleNamespace(test_data=test), hand={"merged by hand (REPAIR off)": 0.5})
    for code in notebook_solutions(NOTEBOOK):
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, namespace)  # noqa: S102 - the notebook's own solution code
    assert cc.output_gap(b, namespace["mlp_b_permuted"], test) < 1e-4  # solution 1: the permuted B is B
