"""Widget logic: render functions draw what they are asked for, and moving a control redraws."""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ccatoolkit as cc
from ccatoolkit.app import contexts, controls, experiments, render
from ccatoolkit.plots import analysis as pa
from ccatoolkit.zoo.models import MLP
from ccatoolkit.zoo.training import train


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 3, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, 1, 4, 4, generator=g)
    return TensorDataset(x, (x.flatten(1) @ teacher).argmax(1))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    train_set = _data(384, 0)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    stats = DataLoader(train_set, batch_size=128)
    test = DataLoader(_data(256, 1), batch_size=128)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        m = MLP(depth=2, width=12, in_shape=(1, 4, 4), num_classes=3)
        models.append(train(m, loader, epochs=4, lr=0.1, seed=seed, device="cpu", progress=False).eval())
    return dict(models=models, stats=stats, test=test)


def test_interpolated_model_ends_and_midpoint(setup):
    a, b = setup["models"][:2]
    for alpha, ref in ((0.0, a), (1.0, b)):
        m = cc.interpolated_model([a, b], [1 - alpha, alpha])
        for p, q in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q)
    mid = cc.interpolated_model([a, b], [1 - 0.5, 0.5])
    torch.testing.assert_close(mid.fc1.weight, (a.fc1.weight + b.fc1.weight) / 2)
    assert a.fc1.weight.data_ptr() != mid.fc1.weight.data_ptr()  # a new model


def test_interpolated_batchnorm_model_needs_data(setup):
    a = MLP(depth=1, width=4, in_shape=(1, 4, 4), num_classes=3, batchnorm=True).eval()
    b = MLP(depth=1, width=4, in_shape=(1, 4, 4), num_classes=3, batchnorm=True).eval()
    with pytest.raises(ValueError, match="bn_data"):
        cc.interpolated_model([a, b], [1 - 0.5, 0.5])
    m = cc.interpolated_model([a, b], [1 - 0.5, 0.5], bn_data=setup["stats"])
    x = torch.cat([batch[0] for batch in setup["stats"]]).flatten(1)
    torch.testing.assert_close(m.bn1.running_mean, m.fc1(x).mean(0).detach(), atol=1e-4, rtol=1e-4)


def test_render_correlation_follows_the_layer_and_alignment_helps(setup):
    models = {f"seed {i}": m for i, m in enumerate(setup["models"])}
    ctx = contexts.CorrelationContext(models, setup["stats"])
    assert ctx.layers == ["relu1", "relu2"] and ctx.pairs == [("seed 0", "seed 1"), ("seed 0", "seed 2")]
    fig1 = render.render_correlation(ctx, "relu1")
    fig2 = render.render_correlation(ctx, "relu2", ("seed 0", "seed 2"))
    assert "relu1" in render.figure_title(fig1) and "relu2" in render.figure_title(fig2) and "seed 2" in render.figure_title(fig2)
    assert len(fig1.axes[0].get_images()) == 1
    m1, m2 = fig1.axes[0].get_images()[0].get_array(), fig2.axes[0].get_images()[0].get_array()
    assert m1.shape == (12, 12) and not np.allclose(m1, m2)
    views = contexts.correlation_views(ctx, "relu1")
    original, permuted = np.diag(views["original"]).mean(), np.diag(views["after permutation alignment"]).mean()
    assert permuted > original  # matching puts the best-correlated neurons on the diagonal
    with pytest.raises(ValueError, match="unknown layer"):
        render.render_correlation(ctx, "fc9")


def test_correlation_widget_redraws_when_the_layer_changes(setup):
    ctx = contexts.CorrelationContext({"A": setup["models"][0], "B": setup["models"][1]}, setup["stats"])
    box = controls.correlation_widget(ctx)
    assert box.redraws == 1 and "relu1" in box.text and box.error is None
    first = box.figure.axes[0].get_images()[0].get_array().copy()
    box.controls["layer"].value = "relu2"
    assert box.redraws == 2 and "relu2" in box.text
    assert not np.allclose(first, box.figure.axes[0].get_images()[0].get_array())


def test_merge_widget_highlights_the_method_and_recomputes_for_a_new_ridge(setup):
    a, b = setup["models"][:2]
    ctx = contexts.MergeContext([a, b], setup["stats"], setup["test"], methods=("average", "permute", "cca", "ensemble"))
    box = controls.merge_widget(ctx, method="average", precompute=False)
    assert box.text.startswith("average") and box.error is None
    heights = [p.get_height() for p in box.figure.axes[0].patches]
    assert len(heights) == 4 and all(0.0 <= h <= 1.0 for h in heights)
    assert heights[3] == pytest.approx(contexts.merge_accuracy(ctx, "ensemble"))
    colors = [p.get_facecolor() for p in box.figure.axes[0].patches]
    box.controls["method"].value = "cca"
    assert box.text.startswith("cca (ridge") and box.redraws == 2
    new_colors = [p.get_facecolor() for p in box.figure.axes[0].patches]
    assert colors[0] != new_colors[0] and colors[2] != new_colors[2]  # the highlight moved
    n_cached = len(ctx.cache)
    box.controls["ridge"].value = 10.0
    assert len(ctx.cache) == n_cached + 1 and "ridge 10" in box.text  # only CCA recomputed
    assert ctx.endpoints().keys() == {"model A", "model B"}


def test_merge_widget_precomputes_every_slider_ridge_so_a_move_is_a_look_up(setup):
    a, b = setup["models"][:2]
    ctx = contexts.MergeContext([a, b], setup["stats"], setup["test"], methods=("average", "cca"))
    ridges = controls.ridge_slider_values()
    assert len(ridges) == 11 and ridges[0] == pytest.approx(1e-4) and ridges[-1] == pytest.approx(10.0)
    box = controls.merge_widget(ctx, method="cca")
    assert {key for key in ctx.cache if key[0] == "cca"} == {("cca", round(r, 6)) for r in ridges}
    n_cached = len(ctx.cache)
    for exponent in (-2.5, 1.0, -4.0):  # the values the slider sends
        box.controls["ridge"].value = 10.0**exponent
        assert f"ridge {10.0**exponent:g}" in box.text and box.error is None
    assert len(ctx.cache) == n_cached  # every move was a look-up
    assert contexts.merge_accuracy(ctx, "cca", 10.0**-2.5) == pytest.approx(
        cc.evaluate(cc.merge([a, b], "cca", setup["stats"], ridge=10.0**-2.5, progress=False), setup["test"])["accuracy"])
    again = contexts.MergeContext([a, b], setup["stats"], setup["test"], methods=("average", "cca"))
    assert contexts.precompute_ridges(again, ridges, progress=False) == 0  # all read back from the disk store
    assert again.store.loaded == len(ridges)


def test_alpha_slider_changes_the_displayed_accuracy(setup):
    a, b = setup["models"][:2]
    ctx = contexts.AlphaContext.from_models(a, b, setup["test"], methods=(None, "permute"), alphas=5,
                                            align_data=setup["stats"])
    assert ctx.methods == ["naive", "permute"] and ctx.curve().label == "permute"
    acc_a = float(np.mean(np.equal(*cc.predict(a, setup["test"])[:2])))
    assert contexts.alpha_point(ctx, 0.0)["accuracy"] == pytest.approx(acc_a)
    assert contexts.alpha_point(ctx, 0.0)["confusion"].sum() == 256
    mid_model = cc.interpolated_model([a, b], [0.5, 0.5])  # the naive path's midpoint, evaluated on its own
    targets, preds, _ = cc.predict(mid_model, setup["test"])
    np.testing.assert_array_equal(contexts.alpha_point(ctx, 0.5, "naive")["confusion"],
                                  pa.confusion_matrix(targets, preds, 3))
    with pytest.raises(ValueError, match="not on the grid"):
        contexts.alpha_point(ctx, 0.3)
    box = controls.alpha_widget(ctx, alpha=0.0)
    text0, png0 = box.text, box.image.value
    assert "alpha = 0.00" in text0 and f"{acc_a:.2%}" in text0 and png0[:4] == b"\x89PNG"
    box.controls["alpha"].value = 0.5
    assert box.image.value != png0  # the image shown was redrawn
    assert box.redraws == 2 and "alpha = 0.50" in box.text and box.text != text0
    mid = contexts.alpha_point(ctx, 0.5)
    assert f"{mid['accuracy']:.2%}" in box.text and "permute path" in box.text
    conf = box.figure.axes[1].get_images()[0].get_array()
    np.testing.assert_allclose(conf.sum(axis=1), 1.0)  # row-normalised confusion matrix of the model at 0.5
    box.controls["method"].value = "naive"
    naive_mid = contexts.alpha_point(ctx, 0.5, "naive")
    assert "naive path" in box.text and f"{naive_mid['accuracy']:.2%}" in box.text


def test_alpha_slider_moves_only_look_up_and_blit(setup, monkeypatch):
    """What makes a move fast: no model is evaluated and only the dynamic artists are drawn again."""
    import ccatoolkit.landscape.paths as paths
    import ccatoolkit.landscape.points as points

    a, b = setup["models"][:2]
    ctx = contexts.AlphaContext.from_models(a, b, setup["test"], methods=(None, "permute"), alphas=5,
                                            align_data=setup["stats"])
    box = controls.alpha_widget(ctx, alpha=0.0)
    view_draws = []

    def refuse(*args, **kwargs):
        raise AssertionError("a slider move evaluated a model")

    for module in (points, paths):
        monkeypatch.setattr(module, "evaluate_points", refuse)
    canvas = box.figure.canvas
    monkeypatch.setattr(canvas, "draw", lambda *args: view_draws.append(1))  # a full render would count here
    for alpha in (0.25, 0.5, 1.0, 0.75):
        box.controls["alpha"].value = alpha
    box.controls["method"].value = "naive"
    assert box.error is None and box.redraws == 6 and not view_draws
    assert "alpha = 0.75" in box.text and "naive path" in box.text
    star = box.figure.axes[0].get_lines()[-1]
    assert star.get_xdata()[0] == 0.75
    assert star.get_ydata()[0] == pytest.approx(contexts.alpha_point(ctx, 0.75, "naive")["accuracy"])


def test_merge_ridge_change_reuses_the_statistics(setup, monkeypatch):
    """A new ridge re-solves on kept statistics: the CCA covariances are not collected again, and the
    result is the same model merge() gives for that ridge."""
    import ccatoolkit.merging.api as api

    a, b = setup["models"][:2]
    ctx = contexts.MergeContext([a, b], setup["stats"], setup["test"], methods=("average", "cca"), disk_cache=False)
    first = contexts.merge_accuracy(ctx, "cca", 0.1)
    collected = []
    original = api.merge_statistics
    monkeypatch.setattr(api, "merge_statistics", lambda *args, **kw: collected.append(1) or original(*args, **kw))
    again = contexts.merge_accuracy(ctx, "cca", 1.0)
    assert not collected and len(ctx.sweeps) == 1
    reference = cc.merge([a, b], method="cca", data=setup["stats"], ridge=1.0, progress=False)
    assert again == pytest.approx(float(cc.evaluate(reference, setup["test"])["accuracy"]))
    swept = ctx.sweeps["cca"](1.0)
    for p, q in zip(swept.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    assert swept.merge_info["ridge"] == 1.0 and set(ctx.cache) == {("cca", 0.1), ("cca", 1.0)}
    assert 0.0 <= first <= 1.0


def test_n_models_widget(setup):
    zoos = {"full": setup["models"]}
    ctx = experiments.NModelsContext(zoos, setup["stats"], setup["test"], methods=("average", "cca", "ensemble"))
    assert list(ctx.ns) == [2, 3]
    fig = render.render_n_models(ctx, 3, "cca")
    assert "cca, N = 3" in render.figure_title(fig)
    assert set(ctx.results["full"]) == {"average", "cca", "ensemble"}
    lines = fig.axes[0].get_lines()
    np.testing.assert_allclose(lines[1].get_ydata(), [ctx.results["full"]["cca"][n] for n in (2, 3)])
    box = controls.n_models_widget(ctx, n=3, method="average")
    box.controls["n"].value = 2
    assert "average, N = 2" in box.text and box.redraws == 2
    with pytest.raises(ValueError, match="ns must lie"):
        experiments.NModelsContext(zoos, setup["stats"], setup["test"], ns=[2, 5])


def test_model_subsets_rotate_before_the_rest():
    assert experiments.model_subsets(4, 2) == [(0, 1), (1, 2), (2, 3), (0, 3), (0, 2), (1, 3)]  # all 6, windows first
    assert experiments.model_subsets(4, 2, limit=4) == [(0, 1), (1, 2), (2, 3), (0, 3)]  # each model twice
    assert experiments.model_subsets(3, 3) == [(0, 1, 2)]
    with pytest.raises(ValueError, match="size"):
        experiments.model_subsets(3, 4)


def test_n_models_context_merges_every_subset_and_reports_the_spread(setup):
    ctx = experiments.NModelsContext({"full": setup["models"]}, setup["stats"], setup["test"],
                                  methods=("average", "permute", "ensemble"), ns=[2])
    frame = ctx.frame()
    assert len(frame) == 3 * 3  # 3 pairs x 3 methods
    assert set(frame["subset"]) == {(0, 1), (1, 2), (0, 2)}
    pair = frame[(frame["method"] == "permute") & (frame["subset"] == (1, 2))].iloc[0]
    merged = cc.merge([setup["models"][1], setup["models"][2]], method="permute", data=setup["stats"], progress=False)
    assert pair["accuracy"] == pytest.approx(float(cc.evaluate(merged, setup["test"])["accuracy"]))
    ens = float(cc.evaluate(cc.ensemble(setup["models"][1:]), setup["test"])["accuracy"])
    assert pair["ensemble"] == pytest.approx(ens) and pair["relative"] == pytest.approx(pair["accuracy"] - ens)
    assert ctx.results["full"]["permute"][2] == pytest.approx(frame[frame["method"] == "permute"]["accuracy"].mean())
    limited = experiments.NModelsContext({"full": setup["models"]}, setup["stats"], setup["test"],
                                      methods=("average",), ns=[2], subsets=1)
    limited.compute()
    assert list(limited.runs["full"]["average"][2]) == [(0, 1)]


def test_n_models_results_come_back_from_the_disk_cache_only_for_the_same_inputs(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("CCATOOLKIT_CACHE", str(tmp_path))

    def run(zoo: list, cache: bool = True) -> experiments.NModelsContext:
        ctx = experiments.NModelsContext({"full": zoo}, setup["stats"], setup["test"], methods=("average", "permute"),
                                      ns=[2], cache=cache)
        ctx.compute()
        return ctx

    first = run(setup["models"])
    assert first.loaded == 0 and len(list(tmp_path.glob("merge-accuracy-*.pt"))) == 6  # 3 pairs x 2 methods
    again = run(setup["models"])
    assert again.loaded == 6 and again.runs == first.runs
    changed = [copy.deepcopy(m) for m in setup["models"]]
    with torch.no_grad():
        next(changed[2].parameters()).add_(0.01)
    third = run(changed)
    assert third.loaded == 2  # only the pair (0, 1) is the same: its two results are read, four computed
    assert third.runs["full"]["permute"][2][(0, 1)] == first.runs["full"]["permute"][2][(0, 1)]
    assert run(setup["models"], cache=False).loaded == 0
    assert len(list(tmp_path.glob("merge-accuracy-*.pt"))) == 10
    # the two-model widget's context shares the store: a numeric ridge (its sweep) is merge(..., ridge=r)
    pair = contexts.MergeContext(setup["models"][:2], setup["stats"], setup["test"], methods=("permute", "cca"))
    assert contexts.merge_accuracy(pair, "permute") == first.runs["full"]["permute"][2][(0, 1)]
    swept = contexts.merge_accuracy(pair, "cca", 1.0)
    again = contexts.MergeContext(setup["models"][:2], setup["stats"], setup["test"], methods=("cca",))
    assert contexts.merge_accuracy(again, "cca", 1.0) == swept and again.store.loaded == 1 and not again.sweeps


def test_best_methods_reads_the_winner_off_the_table():
    results = {"full": {"average": {2: 0.5, 3: 0.4}, "cca": {2: 0.8, 3: 0.7}, "ensemble": {2: 0.9, 3: 0.9}},
               "skewed": {"average": {2: 0.5, 3: 0.6}, "cca": {2: 0.5, 3: 0.55}, "ensemble": {2: 0.9, 3: 0.9}}}
    assert experiments.best_methods(results) == {"full": {2: "cca", 3: "cca"}, "skewed": {2: "average = cca", 3: "average"}}
    assert experiments.best_methods(results, exclude=())["full"] == {2: "ensemble", 3: "ensemble"}


def test_a_failing_redraw_shows_the_error_instead_of_raising(setup):
    ctx = contexts.MergeContext(setup["models"][:2], setup["stats"], [], methods=("average",))  # no test data
    box = controls.merge_widget(ctx)
    assert box.figure is None and "no samples" in box.error
    assert "no samples" in box.title.value


def test_curve_slider_moves_the_point_along_the_curve(setup):
    from ccatoolkit.landscape.curve_training import train_curve

    a, b = setup["models"][:2]
    curve = train_curve(a, b, setup["stats"], align="permute", epochs=1, progress=False, cache=False)
    start, end = curve.end_models()
    plane = cc.loss_plane(start, end, curve.control_model(), setup["test"], resolution=4, progress=False)
    ctx = contexts.CurveContext(curve, plane, setup["test"], paths=[curve.evaluate(setup["test"], ts=5, progress=False)])
    ends = [contexts.curve_point(ctx, t) for t in (0.0, 1.0)]
    np.testing.assert_allclose(ends[0]["xy"], plane.coords[0], atol=1e-9)  # t = 0 is A, t = 1 is B'
    np.testing.assert_allclose(ends[1]["xy"], plane.coords[1], atol=1e-9)
    assert ends[0]["loss"] == pytest.approx(cc.evaluate(a, setup["test"])["loss"], rel=1e-5)
    box = controls.curve_widget(ctx, t=0.0)
    text0 = box.text
    assert "t = 0.00" in text0 and box.image.value[:4] == b"\x89PNG"
    box.controls["t"].value = 0.5
    mid = contexts.curve_point(ctx, 0.5)
    assert box.redraws == 2 and "t = 0.50" in box.text and f"{mid['loss']:.3f}" in box.text
    assert mid["loss"] == pytest.approx(float(ctx.paths[0].loss[2]), rel=1e-4)  # the same point as the curve's t = 0.5


def test_a_widget_shows_its_figure_where_no_kernel_runs_it(tmp_path) -> None:
    """Issue 27: the HTML report showed bare controls. A widget's output carries its current figure as a PNG,
    and the report's pages show that PNG instead of the (dead) widget view."""
    import base64

    import ipywidgets as W
    import matplotlib.pyplot as plt
    import nbformat
    from toybox import notebook_runner

    from ccatoolkit.app.controls import InteractiveFigure

    def render(x: int):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, x], [0, 1])
        fig.suptitle(f"x = {x}")
        return fig

    widget = InteractiveFigure(render, {"x": W.IntSlider(value=3, min=1, max=5)})
    bundle = widget._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle  # JupyterLab still gets the live widget
    png = base64.b64decode(bundle["image/png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == bytes(widget.image.value)
    assert bundle["text/plain"] == "x = 3"
    widget.box.children[0].children[0].value = 5  # a redraw changes the picture the bundle carries
    assert base64.b64decode(widget._repr_mimebundle_()["image/png"]) != png

    runner = notebook_runner()
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("widget")
    cell.outputs = [nbformat.v4.new_output("display_data", data=bundle)]
    nb.cells = [cell]
    nbformat.write(nb, tmp_path / "w.ipynb")
    runner._to_html(tmp_path / "w.ipynb", tmp_path / "w.html")
    page = (tmp_path / "w.html").read_text()
    assert bundle["image/png"][:200] in page  # the figure, not an empty widget placeholder
    plt.close("all")
