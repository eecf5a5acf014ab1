"""Learned curves between two networks (ccatoolkit.curves): tiny MLPs on digits; a slow Fashion-MNIST check."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from toybox import fit, loss_and_accuracy

from ccatoolkit.landscape import curve_training
from ccatoolkit.landscape.compare import compare_paths
from ccatoolkit.landscape.curve_training import train_curve
from ccatoolkit.landscape.curves import Curve, CurveResult, curve_coefficients
from ccatoolkit.landscape.paths import interpolate
from ccatoolkit.zoo.cache import state_digest
from ccatoolkit.zoo.models import MLP


def test_coefficients():
    bez = curve_coefficients("bezier", [0.0, 0.5, 1.0])
    np.testing.assert_allclose(bez, [[1, 0, 0], [0.25, 0.5, 0.25], [0, 0, 1]])
    poly = curve_coefficients("polychain", [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(poly, [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.5, 0.5], [0, 0, 1]])
    np.testing.assert_allclose(curve_coefficients("bezier", np.linspace(0, 1, 7)).sum(1), 1.0)
    with pytest.raises(ValueError, match="bezier"):
        curve_coefficients("spline", [0.5])


def test_gradients_reach_only_the_control_point(pair, digits):
    a, b = pair
    curve = train_curve(a, b, digits[0], epochs=0, cache=False, progress=False)
    names = [n for n, _ in a.named_parameters()]
    curve.control = {k: (v.clone().requires_grad_(True) if k in names else v) for k, v in curve.control.items()}
    x, y = digits[0][0]
    curve.loss(x, y, t=0.3).backward()
    for k in names:
        assert curve.control[k].grad is not None and curve.control[k].grad.abs().sum() > 0
        assert curve.start[k].grad is None and not curve.start[k].requires_grad
        assert curve.end[k].grad is None and not curve.end[k].requires_grad
    assert all(p.grad is None for m in (a, b) for p in m.parameters())
    assert all(p.grad is None for p in curve.template.parameters())


def test_curve_endpoints_and_training_lowers_midpoint(pair, digits):
    a, b = pair
    train, test = digits
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    curve = train_curve(a, b, train, epochs=6, lr=0.05, cache=False, progress=False)
    assert isinstance(curve, Curve) and set(curve.control_point) == {n for n, _ in a.named_parameters()}
    for m, sd in zip((a, b), before):  # inputs untouched
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    result = curve.evaluate(test, ts=5, progress=False)
    assert isinstance(result, CurveResult) and result.kind == "bezier"
    np.testing.assert_allclose(result.t, np.linspace(0, 1, 5))
    for idx, m in ((0, a), (-1, b)):
        loss, acc = loss_and_accuracy(m, test)
        assert result.loss[idx] == pytest.approx(loss, rel=1e-5)
        assert result.accuracy[idx] == pytest.approx(acc, abs=1e-9)
    linear = interpolate(a, b, test, alphas=5, progress=False)
    assert result.loss[2] < linear.loss[2]
    assert result.barrier("loss") < linear.barrier("loss")
    assert len(curve.history) == 6
    # model_at is the same point
    assert loss_and_accuracy(curve.model_at(0.5), test)[0] == pytest.approx(result.loss[2], rel=1e-5)
    bez = curve.evaluate(test, ts=[0.5], batched=False, progress=False)
    assert bez.loss[0] == pytest.approx(result.loss[2], rel=1e-5)


def test_polychain_and_callable_alignment(pair, digits):
    a, b = pair
    train, test = digits
    curve = train_curve(a, b, train, kind="polychain", align=lambda ma, mb: copy.deepcopy(mb), epochs=1,
                        cache=False, progress=False)
    assert curve.kind == "polychain" and curve.method == "<lambda>"
    # at t = 0.5 the chain is at its control point
    assert loss_and_accuracy(curve.control_model(), test)[0] == pytest.approx(
        curve.evaluate(test, ts=[0.5], progress=False).loss[0], rel=1e-5)


def test_curve_cache_hits_on_second_call(pair, digits, tmp_path, monkeypatch):
    a, b = pair
    train = digits[0]
    first = train_curve(a, b, train, epochs=1, cache_dir=str(tmp_path), progress=False)

    def boom(*args, **kwargs):
        raise AssertionError("the curve was trained again instead of loaded from the cache")

    monkeypatch.setattr(curve_training, "train_control", boom)
    second = train_curve(a, b, train, epochs=1, cache_dir=str(tmp_path), progress=False)
    for k, v in first.control.items():
        assert torch.equal(v, second.control[k])
    assert second.history == pytest.approx(first.history)
    # a different seed is a different key
    with pytest.raises(AssertionError, match="trained again"):
        train_curve(a, b, train, epochs=1, seed=1, cache_dir=str(tmp_path), progress=False)


def test_the_alignment_of_a_curve_is_cached_and_its_check_repeated(pair, digits, tmp_path, monkeypatch):
    a, b = pair
    train = digits[0]
    checked = []
    monkeypatch.setattr(curve_training, "warn_if_endpoint_degraded", lambda *acc, **kw: checked.append(acc))
    first = train_curve(a, b, train, align="cca", epochs=1, cache_dir=str(tmp_path), progress=False)
    assert len(checked) == 1 and 0.0 < checked[0][0] <= 1.0  # B's and B''s accuracy on the alignment data

    def boom(*args, **kwargs):
        raise AssertionError("B was aligned again instead of read from the cache")

    monkeypatch.setattr(curve_training, "aligned_endpoint", boom)
    second = train_curve(a, b, train, align="cca", epochs=1, cache_dir=str(tmp_path), progress=False)
    assert all(torch.equal(v, second.end[k]) for k, v in first.end.items())
    assert all(torch.equal(v, second.control[k]) for k, v in first.control.items())
    assert checked == [checked[0], checked[0]]  # the degraded-end check runs on the cached accuracies too
    # another option, other data or no cache align again
    for kwargs in (dict(ridge=0.5), dict(align_data=digits[1]), dict(cache=False)):
        with pytest.raises(AssertionError, match="aligned again"):
            train_curve(a, b, train, align="cca", epochs=1, cache_dir=str(tmp_path), progress=False, **kwargs)


def test_state_digest_tracks_weights(pair):
    a, b = pair
    assert state_digest(a) == state_digest(copy.deepcopy(a))
    assert state_digest(a) != state_digest(b)


def test_batchnorm_curve_keeps_buffers_and_needs_bn_data(digits):
    train, test = digits
    a = fit(MLP(depth=1, width=16, in_shape=(1, 8, 8), batchnorm=True), train, epochs=3, seed=0, reinit=True)
    b = fit(MLP(depth=1, width=16, in_shape=(1, 8, 8), batchnorm=True), train, epochs=3, seed=1, reinit=True)
    buffers = {k: v.clone() for k, v in a.state_dict().items()}
    curve = train_curve(a, b, train, epochs=1, cache=False, progress=False)
    assert all(torch.equal(v, buffers[k]) for k, v in a.state_dict().items())
    np.testing.assert_array_equal(curve.control["bn1.running_mean"].numpy(),
                                  ((a.bn1.running_mean + b.bn1.running_mean) / 2).numpy())
    with pytest.raises(ValueError, match="bn_data"):
        curve.evaluate(test, ts=3, progress=False)
    fast = curve.evaluate(test, ts=3, bn_data=train, progress=False)
    slow = curve.evaluate(test, ts=3, bn_data=train, batched=False, progress=False)
    np.testing.assert_allclose(fast.loss, slow.loss, rtol=1e-4)
    assert fast.reset_bn
    mid = curve.model_at(0.5, bn_data=train)
    assert loss_and_accuracy(mid, test)[0] == pytest.approx(fast.loss[1], rel=1e-4)


def test_compare_paths_and_plot(pair, digits):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ccatoolkit.plots.landscape import plot_curve_paths

    a, b = pair
    train, test = digits
    results = compare_paths(a, b, train, test, aligns=(None,), epochs=1, ts=3, cache=False, progress=False)
    assert [r.label for r in results] == ["linear (naive)", "bezier (naive)"]
    np.testing.assert_allclose(results[0].loss[[0, -1]], results[1].loss[[0, -1]], rtol=1e-5)
    fig, ax = plt.subplots()
    assert plot_curve_paths(results, ax=ax, metric="accuracy") is ax
    assert len(ax.get_lines()) == 2
    plt.close(fig)


@pytest.mark.slow
def test_learned_curve_lowers_midpoint_loss_on_fashion_mnist(tmp_path):
    """Two small MLPs trained 1 epoch each on Fashion-MNIST: the Bezier curve's midpoint beats the linear path's."""
    from ccatoolkit.data.datasets import load_dataset
    from ccatoolkit.data.loaders import make_loader
    from ccatoolkit.zoo.training import train as train_model

    try:
        train_set = load_dataset("fashion_mnist", train=True, download=False)
        test_set = load_dataset("fashion_mnist", train=False, download=False)
    except FileNotFoundError as err:  # no local copy of the data
        pytest.skip(f"Fashion-MNIST not available: {err}")
    train_loader = make_loader(train_set, batch_size=250, shuffle=True, indices=range(10000))
    test_loader = make_loader(test_set, batch_size=1000, indices=range(2000))
    a, b = (
        train_model(MLP(depth=2, width=128), train_loader, epochs=1, seed=seed, device="cpu", progress=False).eval()
        for seed in (0, 1)
    )
    linear = interpolate(a, b, test_loader, alphas=3, progress=False)
    curve = train_curve(a, b, train_loader, epochs=2, lr=0.05, cache_dir=str(tmp_path), progress=False)
    result = curve.evaluate(test_loader, ts=3, progress=False)
    np.testing.assert_allclose(result.loss[[0, -1]], linear.loss[[0, -1]], rtol=1e-5)
    assert result.loss[1] < linear.loss[1]
