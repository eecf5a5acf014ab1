"""Notebooks 6 and 7 as lessons: winners named only outside the spread (``experiments.best_methods``), a zoo with
several seeds per part of a split and its subsets, every merge beside the single models it was made of, a
readable accuracy-against-N figure, and the two notebooks' shape (clean, numbers in prose from the run,
takeaways and hidden solutions)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

import ccatoolkit as cc
from ccatoolkit.app import experiments
from ccatoolkit.plots import analysis as pa
from ccatoolkit.plots.style import method_color

from toybox import notebook_solutions

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NB06 = NOTEBOOKS / "06_n_models.ipynb"
NB07 = NOTEBOOKS / "07_bring_your_own_model.ipynb"


# --------------------------------------------------------------------------- winners and spreads


def test_a_lead_inside_the_spread_names_no_winner():
    # issue 27's table: the skewed split at N = 3, ZipIt! 78.7 +/- 1.9 against CCA Merge 78.2 +/- 2.2
    results = {"skewed": {"zipit": {3: 0.787}, "cca": {3: 0.782}, "average": {3: 0.40}, "ensemble": {3: 0.85}}}
    spread = {"skewed": {"zipit": {3: 0.019}, "cca": {3: 0.022}, "average": {3: 0.05}, "ensemble": {3: 0.01}}}
    assert experiments.best_methods(results, spread=spread) == {"skewed": {3: "zipit ≈ cca"}}
    clear = {"full": {"cca": {2: 0.80}, "zipit": {2: 0.78}, "ensemble": {2: 0.81}}}
    tight = {"full": {"cca": {2: 0.005}, "zipit": {2: 0.008}, "ensemble": {2: 0.0}}}
    assert experiments.best_methods(clear, spread=tight) == {"full": {2: "cca"}}  # a lead of 2 pts, spreads < 1 pt
    wide = {"full": {"cca": {2: 0.005}, "zipit": {2: 0.021}, "ensemble": {2: 0.0}}}  # the larger spread counts
    assert experiments.best_methods(clear, spread=wide) == {"full": {2: "cca ≈ zipit"}}
    assert experiments.best_methods(clear, exclude=(), spread=tight)["full"][2] == "ensemble"


def test_one_subset_has_no_spread_and_says_so():
    results = {"skewed": {"cca": {4: 0.79}, "zipit": {4: 0.78}}}
    spread = {"skewed": {"cca": {4: float("nan")}, "zipit": {4: float("nan")}}}
    assert experiments.best_methods(results, spread=spread) == {"skewed": {4: "cca (no spread)"}}
    # without spreads only exact ties count, as before
    assert experiments.best_methods({"s": {"a": {2: 0.5}, "b": {2: 0.5}}}) == {"s": {2: "a = b"}}


# --------------------------------------------------------------------------- zoos with several seeds per part


def test_subsets_take_one_model_of_each_part():
    groups = [0, 1, 0, 1]  # two parts, two seeds each: parts 0, 1, then 0, 1 again
    assert experiments.model_subsets(4, 2, groups=groups) == [(0, 1), (1, 2), (2, 3), (0, 3)]
    with pytest.raises(ValueError, match="groups"):
        experiments.model_subsets(4, 3, groups=groups)
    with pytest.raises(ValueError, match="labels"):
        experiments.model_subsets(4, 2, groups=[0, 1])
    five = [k % 5 for k in range(10)]
    every = experiments.model_subsets(10, 5, groups=five)
    assert len(every) == 2 ** 5 and all(sorted(five[i] for i in s) == [0, 1, 2, 3, 4] for s in every)
    assert experiments.model_subsets(10, 5, limit=3, groups=five) == [(0, 1, 2, 3, 4), (1, 2, 3, 4, 5), (2, 3, 4, 5, 6)]
    assert experiments.model_subsets(4, 2) == [(0, 1), (1, 2), (2, 3), (0, 3), (0, 2), (1, 3)]  # no groups: as before


def test_zoo_by_part_orders_parts_then_seeds(monkeypatch):
    calls = []

    def fake_zoo(s, split, n=None, seeds=None):
        calls.append((split, n, list(seeds)))
        return [f"{split}:part{i}:seed{seed}" for i, seed in enumerate(seeds)]

    monkeypatch.setattr(experiments.inputs, "zoo", fake_zoo)
    models, parts = experiments.zoo_by_part(None, "skewed", parts=3, seeds_per_part=2)
    assert calls == [("skewed", 3, [0, 1, 2]), ("skewed", 3, [3, 4, 5])]
    assert models[4] == "skewed:part1:seed4" and parts == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="seeds_per_part"):
        experiments.zoo_by_part(None, "skewed", parts=3, seeds_per_part=0)


@pytest.fixture(scope="module")
def parts_zoo(digits):
    """Four digits MLPs: two parts of the training batches, two seeds each (parts 0, 1, 0, 1)."""
    from toybox import fit

    train, _ = digits
    halves = [train[0::2], train[1::2]]
    zoo = [fit(cc.MLP(depth=2, width=16, in_shape=(1, 8, 8)), halves[k % 2], epochs=3, seed=k, reinit=True)
           for k in range(4)]
    return zoo, [0, 1, 0, 1]


def test_every_merge_stands_beside_the_single_models_it_was_made_of(digits, parts_zoo):
    train, test = digits
    zoo, groups = parts_zoo
    ctx = experiments.NModelsContext({"parts": zoo}, train, test, methods=("average", "ensemble"), cache=False,
                                     groups={"parts": groups})
    assert list(ctx.ns) == [2] and ctx.largest_n("parts") == 2  # two parts: N = 2 at most, on 4 subsets
    frame = ctx.frame()
    assert set(frame["subset"]) == {(0, 1), (1, 2), (2, 3), (0, 3)}
    singles = [float(cc.evaluate(m, test)["accuracy"]) for m in zoo]
    assert ctx.single_accuracies("parts") == pytest.approx(singles)
    row = frame[(frame["method"] == "average") & (frame["subset"] == (1, 2))].iloc[0]
    assert row["best_single"] == pytest.approx(max(singles[1], singles[2]))
    assert row["mean_single"] == pytest.approx((singles[1] + singles[2]) / 2)
    assert row["vs_best"] == pytest.approx(row["accuracy"] - row["best_single"])
    sd = ctx.spreads()["parts"]["average"][2]
    assert sd == pytest.approx(frame[frame["method"] == "average"]["accuracy"].std())
    with pytest.raises(ValueError, match="ns must lie"):
        experiments.NModelsContext({"parts": zoo}, train, test, ns=[3], groups={"parts": groups})
    with pytest.raises(ValueError, match="labels 2 models"):
        experiments.NModelsContext({"parts": zoo}, train, test, groups={"parts": [0, 1]})


def test_mean_sd_table_writes_percent_with_the_spread_and_the_best_single_model():
    runs = pd.DataFrame([dict(split="skewed", method="cca", n=2, subset=(0, 1), accuracy=0.80, best_single=0.75, vs_best=0.05),
                         dict(split="skewed", method="cca", n=2, subset=(1, 2), accuracy=0.78, best_single=0.74, vs_best=0.04),
                         dict(split="skewed", method="zipit", n=2, subset=(0, 1), accuracy=0.79, best_single=0.75, vs_best=0.04),
                         dict(split="skewed", method="zipit", n=2, subset=(1, 2), accuracy=0.77, best_single=0.74, vs_best=0.03)])
    table = experiments.mean_sd_table(runs)
    assert table.loc[("skewed", "cca"), 2] == "79.0 ± 1.4" and table.loc[("skewed", "best single model"), 2] == "74.5 ± 0.7"
    assert list(experiments.mean_sd_table(runs, "vs_best").index.get_level_values("method")) == ["cca", "zipit"]
    assert experiments.mean_sd_table(runs, "vs_best").loc[("skewed", "zipit"), 2] == "3.5 ± 0.7"


def test_part_table_splits_each_models_accuracy_into_its_own_classes_and_the_rest(digits, parts_zoo):
    from ccatoolkit.zoo.training import predict

    _, test = digits
    zoo, _ = parts_zoo
    table = experiments.part_table(zoo[:2], [0, 1], test, num_classes=10)  # parts 0-4 and 5-9, as split_indices cuts
    assert table["classes"].tolist() == ["0, 1, 2, 3, 4", "5, 6, 7, 8, 9"]
    targets, predictions, _ = predict(zoo[1], test)
    own = targets >= 5
    assert table.loc[1, "own"] == pytest.approx(float((targets == predictions)[own].mean()))
    assert table.loc[1, "others"] == pytest.approx(float((targets == predictions)[~own].mean()))
    assert table.loc[1, "accuracy"] == pytest.approx(float(cc.evaluate(zoo[1], test)["accuracy"]))


# --------------------------------------------------------------------------- the figure


def _runs() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for method, mean in (("permute", -0.03), ("zipit", 0.01), ("cca", 0.02), ("ensemble", 0.06), ("average", -0.4)):
        for n in (2, 3, 4):
            for k in range(3):
                rows.append(dict(method=method, n=n, vs_best=mean + rng.normal(0, 0.01)))
    return pd.DataFrame(rows)


def test_accuracy_against_n_is_readable_in_points_and_the_shared_colours():
    import matplotlib.pyplot as plt

    fig, (ax, side) = plt.subplots(1, 2, figsize=(6, 4), width_ratios=[3, 1])
    pa.plot_spread_vs_n(_runs(), ax=ax, y="vs_best", exclude=(), collapsed_ax=side, reference="best single model")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["permute", "zipit", "cca", "ensemble"]
    colours = [matplotlib.colors.to_hex(line.get_color()) for line in ax.get_legend().get_lines()]
    assert colours == [method_color(m) for m in labels]
    assert [t.get_text() for t in side.get_legend().get_texts()] == ["average"] and not ax.child_axes
    assert ax.yaxis.get_major_formatter()(-0.004, 0) == "-0.4" and ax.yaxis.get_major_formatter()(0.0, 0) == "0"
    assert "points" in ax.get_ylabel() and any(t.get_text() == "best single model" for t in ax.texts)
    fig.canvas.draw()
    texts = [t for a in (ax, side) for t in [*a.get_xticklabels(), *a.get_yticklabels(), *a.texts,
                                              *a.get_legend().get_texts()] if t.get_text()]
    assert min(t.get_fontsize() for t in texts) >= 9
    plt.close(fig)
    fig, (ax, side) = plt.subplots(1, 2, width_ratios=[3, 1])
    pa.plot_spread_vs_n(_runs()[lambda f: f["method"] != "average"], ax=ax, y="vs_best", collapsed_ax=side)
    assert not side.axison  # nothing collapsed: the spare panel is hidden
    plt.close(fig)


# --------------------------------------------------------------------------- the notebooks


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


@pytest.mark.parametrize("path", [NB06, NB07], ids=["06", "07"])
def test_notebook_promises_a_spread_and_ends_with_its_check(path):
    cells = _cells(path)
    code = [c for c in cells if c["cell_type"] == "code"]  # clean, parameters, intro: test_notebook.py
    assert "±" in _source(cells[0])
    assert "expect_results(" in _source(code[-1])


@pytest.mark.parametrize("path", [NB06, NB07], ids=["06", "07"])
def test_the_lesson_ends_with_takeaways_and_hidden_solutions(path):
    cells = _cells(path)
    sources = [_source(c) for c in cells]
    heading = next(i for i, s in enumerate(sources) if s.startswith("## Takeaways"))
    tree = ast.parse(sources[heading + 1])  # the next cell: takeaways = [...], shown with display(Markdown(...))
    lists = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
             and any(getattr(t, "id", None) == "takeaways" for t in node.targets)]
    assert len(lists) == 1 and 3 <= len(lists[0].elts) <= 5 and "display(Markdown(" in sources[heading + 1]
    turn = next(s for s in sources if s.startswith("## Your turn"))
    solutions = re.findall(r"<details><summary>Solution</summary>(.*?)</details>", turn, flags=re.S)
    assert 1 <= len(solutions) <= 2 and all("```python" in s for s in solutions)
    assert turn.count("**") // 2 >= len(solutions)


def test_notebook06_centres_on_the_skewed_split_and_judges_winners_by_the_spread():
    code = "\n".join(_source(c) for c in _cells(NB06) if c["cell_type"] == "code")
    assert "zoo_by_part(S, \"skewed\"" in code and "groups=" in code
    assert "best_methods(results, spread=ctx.spreads())" in code
    assert "vs_best" in code and "sharey" not in code
    assert 'nb.save_figure(fig, "06_accuracy_vs_n", dpi=100)' in code


def test_notebook06_first_solution_runs_on_a_runs_table():
    import contextlib
    import io

    code = notebook_solutions(NB06)[0]
    rows = [dict(split="skewed", n=n, subset=(k, k + 1), method=m, accuracy=0.75 + 0.01 * k + (0.005 if m == "cca" else 0))
            for n in (2, 3) for k in range(3) for m in ("cca", "zipit", "ensemble")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {"runs": pd.DataFrame(rows)})  # noqa: S102 - the notebook's own solution code
    assert "0.5" in out.getvalue()  # CCA Merge - ZipIt!: +0.5 points on every subset
