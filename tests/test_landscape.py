"""Interpolation curves, barriers, planes and simplices (ccatoolkit.landscape): tiny models on digits / synthetic data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from toybox import digit_batches, fit, loss_and_accuracy

from ccatoolkit.landscape.results import InterpolationResult, barrier
from ccatoolkit.landscape.paths import interpolate, loss_plane, plane_coefficients, simplex
from ccatoolkit.landscape.points import interpolated_model
from ccatoolkit.plots.analysis import confusion_matrix
from ccatoolkit.zoo.models import MLP, VGG11
from ccatoolkit.zoo.training import predict


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def digits() -> tuple[list, list]:
    return digit_batches()


def _permuted_mlp(model: MLP, seed: int = 1) -> MLP:
    """The same function with every hidden layer's units permuted (fc rows, bn entries, next layer's columns)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    depth = model.config["depth"]
    with torch.no_grad():
        for i in range(1, depth + 1):
            perm = torch.randperm(model.config["width"], generator=g)
            fc = getattr(out, f"fc{i}")
            fc.weight.copy_(fc.weight[perm])
            if fc.bias is not None:
                fc.bias.copy_(fc.bias[perm])
            if model.config["batchnorm"]:
                bn = getattr(out, f"bn{i}")
                for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                    t.copy_(t[perm])
            nxt = getattr(out, f"fc{i + 1}") if i < depth else out.head
            nxt.weight.copy_(nxt.weight[:, perm])
    return out


def _weight_matching(model_a: MLP, model_b: MLP) -> MLP:
    """A tiny exact aligner for the tests: match fc rows (given the previous layer's matching) by Hungarian."""
    out = copy.deepcopy(model_b)
    depth = model_a.config["depth"]
    with torch.no_grad():
        for i in range(1, depth + 1):  # columns of fc{i} already follow the previous layer's matching
            wa, fb = getattr(model_a, f"fc{i}").weight, getattr(out, f"fc{i}")
            _, perm = linear_sum_assignment(-(wa @ fb.weight.T).numpy())
            perm = torch.as_tensor(perm)
            fb.weight.copy_(fb.weight[perm])
            if fb.bias is not None:
                fb.bias.copy_(fb.bias[perm])
            nxt = getattr(out, f"fc{i + 1}") if i < depth else out.head
            nxt.weight.copy_(nxt.weight[:, perm])
    return out


@pytest.fixture(scope="module")
def trained_pair(digits) -> tuple[MLP, MLP]:
    train, _ = digits
    a = fit(MLP(depth=2, width=32, in_shape=(1, 8, 8)), train, seed=0, reinit=True)
    b = fit(MLP(depth=2, width=32, in_shape=(1, 8, 8)), train, seed=1, reinit=True)
    return a, b


# --------------------------------------------------------------------------- interpolation


def test_endpoints_equal_models_own_evaluation(trained_pair, digits):
    a, b = trained_pair
    _, test = digits
    result = interpolate(a, b, test, alphas=5, progress=False)
    assert isinstance(result, InterpolationResult)
    np.testing.assert_allclose(result.alphas, np.linspace(0, 1, 5))
    for idx, model in ((0, a), (-1, b)):
        loss, acc = loss_and_accuracy(model, test)
        assert result.loss[idx] == pytest.approx(loss, rel=1e-5)
        assert result.accuracy[idx] == pytest.approx(acc, abs=1e-9)
    assert result.loss[2] > min(result.loss[0], result.loss[-1])  # unaligned midpoint is worse


def test_barrier_of_model_with_itself_is_zero(trained_pair, digits):
    a, _ = trained_pair
    result = interpolate(a, copy.deepcopy(a), digits[1], alphas=7, progress=False)
    assert result.barrier("loss") == pytest.approx(0.0, abs=1e-6)
    assert result.barrier("accuracy") == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(result.loss, result.loss[0], rtol=1e-5)


def test_permuted_copy_has_barrier_until_aligned(trained_pair, digits):
    a, _ = trained_pair
    test = digits[1]
    permuted = _permuted_mlp(a)
    # the permuted copy computes the same function
    assert loss_and_accuracy(permuted, test)[0] == pytest.approx(loss_and_accuracy(a, test)[0], rel=1e-5)
    before = interpolate(a, permuted, test, alphas=11, progress=False)
    after = interpolate(a, permuted, test, alphas=11, align=_weight_matching, progress=False)
    assert before.barrier("loss") > 0.1
    assert before.barrier("accuracy") > 0.02
    assert after.barrier("loss") == pytest.approx(0.0, abs=1e-5)
    assert after.barrier("accuracy") == pytest.approx(0.0, abs=1e-9)
    assert after.method == "_weight_matching"
    assert before.label == "naive"


def test_output_gap_is_zero_for_a_permuted_copy_only(trained_pair, digits):
    from ccatoolkit.zoo.training import output_gap

    a, b = trained_pair
    test = digits[1]
    assert output_gap(a, _permuted_mlp(a), test) < 1e-4
    assert output_gap(a, b, test) > 0.1
    assert output_gap(a, b, test, max_batches=None) >= output_gap(a, b, test)
    with pytest.raises(ValueError, match="no batches"):
        output_gap(a, b, [])


def test_permute_alignment_through_merging(trained_pair, digits):
    a, _ = trained_pair
    train, test = digits
    permuted = _permuted_mlp(a)
    result = interpolate(a, permuted, test, alphas=5, align="permute", align_data=train, progress=False)
    assert result.method == "permute"
    assert result.barrier("loss") == pytest.approx(0.0, abs=1e-4)


def test_inputs_not_modified(trained_pair, digits):
    a, b = trained_pair
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    interpolate(a, b, digits[1], alphas=3, align=_weight_matching, progress=False)
    for m, sd in zip((a, b), before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k])


def _synthetic(shape: tuple[int, ...], n_batches: int = 3, batch: int = 32, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n_batches)]


def _make_bn_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = VGG11(width=0.0625, in_shape=(1, 8, 8))
    # non-trivial running statistics so eval-mode BatchNorm matters
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize(
    "kind, reset_bn", [("mlp", False), ("bn_mlp", False), ("bn_mlp", True), ("bn_cnn", False), ("bn_cnn", True)]
)
def test_batched_equals_loop(kind, reset_bn):
    if kind == "bn_cnn":
        a, b = _make_bn_cnn(0), _make_bn_cnn(1)
        data = _synthetic((1, 8, 8))
    else:
        bn = kind == "bn_mlp"
        a = MLP(depth=2, width=16, in_shape=(1, 8, 8), batchnorm=bn).eval()
        b = MLP(depth=2, width=16, in_shape=(1, 8, 8), batchnorm=bn).eval()
        data = _synthetic((1, 8, 8))
    alphas = [-0.25, 0.0, 0.3, 0.5, 1.0, 1.2]
    kw = dict(alphas=alphas, reset_bn=reset_bn, bn_data=data, progress=False)
    fast = interpolate(a, b, data, batched=True, chunk_size=4, **kw)  # two chunks
    slow = interpolate(a, b, data, batched=False, **kw)
    np.testing.assert_allclose(fast.loss, slow.loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast.accuracy, slow.accuracy, atol=1e-9)
    assert fast.reset_bn == (reset_bn and kind != "mlp")


def test_reset_bn_matches_recomputed_statistics():
    """After reset_bn the end point A is evaluated with its own population statistics on bn_data."""
    a, b = _make_bn_cnn(0), _make_bn_cnn(1)
    data = _synthetic((1, 8, 8))
    whole = [(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))]  # upstream layers see one batch
    result = interpolate(a, b, data, alphas=[0.0, 1.0], reset_bn=True, bn_data=whole, progress=False)
    ref = copy.deepcopy(a)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    with torch.no_grad():
        ref(whole[0][0])  # PyTorch's own statistics of the same batch
    assert result.loss[0] == pytest.approx(loss_and_accuracy(ref, data)[0], rel=1e-4)
    with pytest.raises(ValueError, match="bn_data"):
        interpolate(a, b, data, alphas=3, reset_bn=True, progress=False)


def test_empty_grid_is_an_error(trained_pair, digits):
    a, b = trained_pair
    with pytest.raises(ValueError, match="empty"):
        interpolate(a, b, digits[1], alphas=[], progress=False)
    with pytest.raises(ValueError):
        interpolate(a, b, digits[1], alphas=0, progress=False)


def test_extrapolation_allowed(trained_pair, digits):
    a, b = trained_pair
    result = interpolate(a, b, digits[1], alphas=[-0.5, 0.0, 1.0, 1.5], progress=False)
    assert result.loss.shape == (4,)
    assert np.isfinite(result.loss).all()


def test_different_architectures_name_the_parameter(digits):
    a = MLP(depth=2, width=16, in_shape=(1, 8, 8))
    b = MLP(depth=2, width=24, in_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="fc1.weight"):
        interpolate(a, b, digits[1], alphas=3, progress=False)
    c = MLP(depth=3, width=16, in_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="fc3.weight"):
        interpolate(a, c, digits[1], alphas=3, progress=False)


def test_non_finite_point_is_reported_not_raised(trained_pair, digits):
    a, _ = trained_pair
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.head.weight.fill_(1e38)
    result = interpolate(a, b, digits[1], alphas=[0.0, 0.5, 1.0], progress=False)
    assert np.isfinite(result.loss[0])
    assert not np.isfinite(result.loss[-1])
    assert not np.isfinite(result.barrier("loss"))


# --------------------------------------------------------------------------- barrier


def test_barrier_definition():
    assert barrier([1.0, 3.0, 1.0]) == pytest.approx(2.0)
    assert barrier([1.0, 2.0, 3.0]) == pytest.approx(0.0)  # on the line
    assert barrier([0.9, 0.5, 0.7], metric="accuracy") == pytest.approx(0.3)
    # line between unequal end points: L(0.5) = 3 vs line 1.5
    assert barrier([1.0, 3.0, 2.0], alphas=[0.0, 0.5, 1.0]) == pytest.approx(1.5)
    # extrapolated points are ignored, end points are found by value 0 and 1
    assert barrier([9.0, 1.0, 2.0, 1.0, 9.0], alphas=[-0.5, 0.0, 0.5, 1.0, 1.5]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="contain 0 and 1"):
        barrier([1.0, 2.0], alphas=[0.2, 0.8])
    with pytest.raises(ValueError, match="metric"):
        barrier([1.0, 2.0], metric="f1")


def test_barrier_against_another_paths_ends():
    grid = np.array([0.0, 0.5, 1.0])
    to_b = InterpolationResult(alphas=grid, loss=np.array([1.0, 3.0, 1.0]), accuracy=np.array([0.9, 0.5, 0.9]))
    # a path to a degraded aligned end B' (loss 2 instead of B's 1): flat against its own ends
    to_b_prime = InterpolationResult(alphas=grid, loss=np.array([1.0, 1.5, 2.0]), accuracy=np.array([0.9, 0.85, 0.8]))
    assert to_b_prime.ends() == (1.0, 2.0) and to_b_prime.ends("accuracy") == (0.9, 0.8)
    assert to_b_prime.barrier() == pytest.approx(0.0)
    assert to_b_prime.barrier(against=to_b) == pytest.approx(1.0)  # 1.5 - 0.5 at the midpoint, 2 - 1 at the end
    assert barrier(to_b_prime, "accuracy", against=to_b) == pytest.approx(0.1)
    assert to_b.barrier(against=to_b) == to_b.barrier()


# --------------------------------------------------------------------------- planes and simplices


def test_plane_coordinates_and_model_values(trained_pair, digits):
    a, b = trained_pair
    test = digits[1]
    c = fit(MLP(depth=2, width=32, in_shape=(1, 8, 8)), digits[0], epochs=3, seed=2, reinit=True)
    plane = loss_plane(a, b, c, test, resolution=5, margin=0.1, progress=False, labels=("A", "B", "C"))
    pa, pb, pc = (torch.cat([p.detach().reshape(-1) for p in m.parameters()]).double() for m in (a, b, c))
    np.testing.assert_allclose(plane.coords[0], [0.0, 0.0])
    assert plane.coords[1, 0] == pytest.approx(float((pb - pa).norm()), rel=1e-9)
    assert plane.coords[1, 1] == 0.0
    # C's coordinates: |C - A| preserved, and the plane point there is C's parameters
    assert float(np.hypot(*plane.coords[2])) == pytest.approx(float((pc - pa).norm()), rel=1e-9)
    w = plane_coefficients(plane.coords, *[plane.coords[1, 0], plane.coords[2, 0], plane.coords[2, 1]])
    np.testing.assert_allclose(w, np.eye(3), atol=1e-12)
    for i, m in enumerate((a, b, c)):
        loss, acc = loss_and_accuracy(m, test)
        assert plane.model_loss[i] == pytest.approx(loss, rel=1e-5)
        assert plane.model_accuracy[i] == pytest.approx(acc, abs=1e-9)
    assert plane.loss.shape == (5, 5) and np.isfinite(plane.loss).all()
    assert plane.xs[0] < 0 < plane.coords[1, 0] < plane.xs[-1]


def test_plane_rejects_collinear_models(trained_pair, digits):
    a, b = trained_pair
    mid = copy.deepcopy(a)
    with torch.no_grad():
        for pm, pa, pb in zip(mid.parameters(), a.parameters(), b.parameters()):
            pm.copy_((pa + pb) / 2)
    with pytest.raises(ValueError, match="one line"):
        loss_plane(a, b, mid, digits[1], resolution=3, progress=False)


def test_simplex_corners(trained_pair, digits):
    a, b = trained_pair
    c = _permuted_mlp(b)
    result = simplex([a, b, c], digits[1], resolution=4, progress=False)
    assert result.weights.shape == (15, 3)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0)
    for corner, m in zip(np.eye(3), (a, b, c)):
        idx = int(np.argmin(np.abs(result.weights - corner).sum(axis=1)))
        assert result.loss[idx] == pytest.approx(loss_and_accuracy(m, digits[1])[0], rel=1e-5)


# --------------------------------------------------------------------------- plots


def test_plots_draw_into_given_axis(trained_pair, digits):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ccatoolkit.plots.landscape import (
        path_end_label, plot_barriers, plot_interpolation, plot_plane, plot_plane_path, plot_simplex,
    )

    a, b = trained_pair
    test = digits[1]
    naive = interpolate(a, b, test, alphas=5, progress=False)
    aligned = interpolate(a, b, test, alphas=5, align=_weight_matching, progress=False)
    fig, axes = plt.subplots(1, 4)
    assert plot_interpolation([naive, aligned], ax=axes[0], metric="accuracy") is axes[0]
    assert len(axes[0].get_lines()) == 2
    # an aligned path ends at B aligned, not at B: the axis says so
    assert path_end_label([naive]) == "model B" and path_end_label([aligned]) == "B (aligned)"
    assert axes[0].get_xlabel() == "alpha (0 = model A, 1 = B or B (aligned))"
    assert plot_barriers([naive, aligned], ax=axes[1]) is axes[1]
    assert len(axes[1].patches) == 2
    plane = loss_plane(a, b, _permuted_mlp(b), test, resolution=4, progress=False, labels=("A", "B", "C (permuted)"))
    assert plot_plane(plane, ax=axes[2]) is axes[2]
    assert axes[2].get_xlabel() == "u (towards B)" and axes[2].get_ylabel() == "v (towards C (permuted), orthogonalised)"
    lines = len(axes[2].get_lines())
    assert plot_plane_path(plane, [[1, 0, 0], [0.25, 0.25, 0.5], [0, 1, 0]], ax=axes[2], label="path") is axes[2]
    np.testing.assert_allclose(axes[2].get_lines()[-1].get_xydata()[[0, -1]], plane.coords[:2])  # from A to B
    assert len(axes[2].get_lines()) == lines + 1
    with pytest.raises(ValueError, match="sum to 1"):
        plot_plane_path(plane, [[1, 1, 0]], ax=axes[2])
    assert plot_simplex(simplex([a, b, _permuted_mlp(a)], test, resolution=2, progress=False), ax=axes[3]) is axes[3]
    assert plot_interpolation(naive) is not None
    plt.close("all")


def test_shared_first_layer_is_exact(trained_pair, digits):
    """The MLP fast path (first layer computed once per anchor) equals plain vmapped evaluation."""
    from ccatoolkit.landscape.points import _SharedFirstLayer, evaluate_points, float_state

    a, b = trained_pair
    states = [float_state(a), float_state(b)]
    assert _SharedFirstLayer(a, states).ok
    assert not _SharedFirstLayer(_make_bn_cnn(0), states).ok  # not a Sequential
    coeffs = np.array([[1.0, 0.0], [0.4, 0.6], [-0.2, 1.2]])
    shared = evaluate_points(a, states, coeffs, digits[1], progress=False)
    plain = evaluate_points(a, states, coeffs, digits[1], progress=False, share_first_layer=False)
    np.testing.assert_allclose(shared[0], plain[0], rtol=1e-5)
    np.testing.assert_allclose(shared[1], plain[1])
    with pytest.raises(ValueError, match="shape"):  # the model's own input check still runs
        evaluate_points(a, states, coeffs, [(torch.zeros(4, 1, 9, 9), torch.zeros(4, dtype=torch.long))],
                        progress=False)


def test_confusion_matrices_come_from_the_same_pass(trained_pair, digits):
    """interpolate(confusion=True): each point's confusion counts, equal batched or not, and to the model's own."""
    a, b = trained_pair
    test = digits[1]
    batched = interpolate(a, b, test, alphas=3, confusion=True, progress=False)
    loop = interpolate(a, b, test, alphas=3, confusion=True, batched=False, progress=False)
    assert batched.confusion.shape == (3, 10, 10) and interpolate(a, b, test, alphas=2, progress=False).confusion is None
    np.testing.assert_array_equal(batched.confusion, loop.confusion)
    np.testing.assert_allclose(np.trace(batched.confusion, axis1=1, axis2=2) / batched.confusion.sum((1, 2)),
                               batched.accuracy)
    targets, preds, _ = predict(interpolated_model([a, b], [0.5, 0.5]), test)
    np.testing.assert_array_equal(batched.confusion[1], confusion_matrix(targets, preds, 10))


def test_repair_keeps_endpoints_and_lowers_the_barrier(trained_pair, digits):
    a, b = trained_pair
    train, test = digits
    plain = interpolate(a, b, test, alphas=5, progress=False)
    repaired = interpolate(a, b, test, alphas=5, repair=True, bn_data=train, progress=False)
    assert repaired.label == "naive + REPAIR"
    np.testing.assert_allclose(repaired.loss[[0, -1]], plain.loss[[0, -1]], rtol=1e-4)
    assert repaired.barrier("loss") < plain.barrier("loss")
    with pytest.raises(ValueError, match="bn_data"):
        interpolate(a, b, test, alphas=3, repair=True, progress=False)
