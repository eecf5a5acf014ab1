"""PAM (Tatro et al. 2020): curve and permutation learned together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ccatoolkit.landscape import pam
from ccatoolkit.landscape.pam import _permutation_step, train_curve_pam
from ccatoolkit.merging.graph import merge_graph
from ccatoolkit.merging.transform import apply_permutations, random_permutations

from toybox import digit_batches, fit


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _seeded_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # biases too: the pair must not depend on what ran before
    return _mlp()


@pytest.fixture(scope="module")
def digits_pair() -> tuple:
    """benchmarks/pam.py's pair 0: two digits MLPs (seeds 0 and 1, 30 epochs) and the train/test batches."""
    train, test = digit_batches()
    a, b = (fit(_seeded_mlp(s), train, epochs=30, seed=s) for s in (0, 1))
    return a, b, train, test


def test_permutation_step_keeps_the_permutation_for_a_zero_step_and_moves_for_a_long_one() -> None:
    torch.manual_seed(0)
    model = _mlp()
    graph = merge_graph(model, example_input=torch.randn(2, 1, 8, 8))
    perms = {s.name: np.random.default_rng(1).permutation(s.size) for s in graph}
    current = apply_permutations(model, graph, {k: torch.as_tensor(v) for k, v in perms.items()}).state_dict()
    grads = {k: torch.randn_like(v) for k, v in model.named_parameters()}
    kept = _permutation_step(model.state_dict(), graph, perms, current, grads, step=0.0)
    assert all(np.array_equal(v, perms[k]) for k, v in kept.items())
    moved = _permutation_step(model.state_dict(), graph, perms, current, grads, step=30.0)  # random G: a long step
    assert any(not np.array_equal(v, perms[k]) for k, v in moved.items())


def test_pam_keeps_the_exact_permutation_of_a_permuted_copy(digits_pair: tuple) -> None:
    """B a permuted copy of A: alignment finds B's function-preserving permutation, and PAM stays there.

    A is trained to the end (30 epochs): were it not, a step away from A could lower the loss and descent keep it."""
    a, _, train, _ = digits_pair
    graph = merge_graph(a, example_input=train[0][0][:2])
    b = apply_permutations(a, graph, random_permutations(graph, torch.Generator().manual_seed(3)))
    result = train_curve_pam(a, b, train, start="permute", rounds=2, epochs=1, step=64.0, cache=False, progress=False)
    assert result.moved == [0.0, 0.0] and result.steps == [0.0, 0.0] and result.moved_from_start == 0.0
    assert len(result.losses) == 2 and all(np.isfinite(result.losses)) and result.midpoint == []
    x = train[0][0]
    with torch.no_grad():  # the curve's end is B permuted back onto A: A's function
        torch.testing.assert_close(result.curve.end_models()[1](x), a(x), atol=1e-5, rtol=1e-5)


def test_descent_keeps_the_alignment_and_moves_the_identity(digits_pair: tuple) -> None:
    """Tatro et al.'s claim on a digits pair (benchmarks/pam.py, pair 0): with descent, PAM keeps (almost all of)
    the aligned permutation, while from the identity it moves many neurons and ends below the curve trained with
    the identity held; without descent the same long steps move half the aligned neurons and worsen the curve."""
    a, b, train, test = digits_pair
    kw = dict(rounds=3, epochs=3, eval_data=test, cache=False, progress=False)
    aligned = train_curve_pam(a, b, train, start="permute", step=8.0, **kw)
    aligned_held = train_curve_pam(a, b, train, start="permute", step=0.0, **kw)
    aligned_plain = train_curve_pam(a, b, train, start="permute", step=8.0, descent=False, **kw)
    identity = train_curve_pam(a, b, train, start="identity", step=8.0, **kw)
    identity_held = train_curve_pam(a, b, train, start="identity", step=0.0, **kw)
    assert aligned_held.moved == [0.0, 0.0, 0.0] and identity_held.moved_from_start == 0.0
    assert len(identity.midpoint) == len(identity.moved) == len(identity.steps) == 3
    assert aligned.moved_from_start <= 0.10, aligned.moved
    assert abs(aligned.midpoint[-1] - aligned_held.midpoint[-1]) < 0.02
    assert aligned_plain.moved_from_start >= 0.3 and aligned_plain.midpoint[-1] > aligned_held.midpoint[-1] + 0.05
    assert identity.moved_from_start >= 0.15, identity.moved
    assert all(s in (0.0, 8.0, 4.0, 2.0, 1.0) for s in identity.steps) and max(identity.steps) > 0
    assert identity.midpoint[-1] < identity_held.midpoint[-1]
    assert aligned.midpoint[-1] < 0.5 * identity.midpoint[-1]  # nowhere near the aligned curve


def test_pam_results_are_cached(digits_pair: tuple, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, train, test = digits_pair
    kw = dict(start="identity", rounds=2, epochs=1, step=8.0, eval_data=test, cache_dir=str(tmp_path), progress=False)
    first = train_curve_pam(a, b, train, **kw)
    assert len(list(tmp_path.glob("pam-*.pt"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a cached PAM run was trained again")

    monkeypatch.setattr(pam, "train_control", no_training)
    again = train_curve_pam(a, b, train, **kw)
    assert again.moved == first.moved and again.midpoint == first.midpoint and again.steps == first.steps
    assert all(np.array_equal(again.perms[s], first.perms[s]) for s in first.perms)
    for k, v in first.curve.control.items():
        torch.testing.assert_close(again.curve.control[k], v)
    with pytest.raises(AssertionError, match="trained again"):  # another setting is another key
        train_curve_pam(a, b, train, **{**kw, "step": 4.0})


def test_pam_refuses_bad_settings_before_any_work(digits_pair: tuple) -> None:
    a, b, train, _ = digits_pair
    for bad in (dict(rounds=0), dict(epochs=0), dict(step=-1.0), dict(grad_batches=0), dict(start="cca")):
        with pytest.raises(ValueError):
            train_curve_pam(a, b, train, cache=False, progress=False, **bad)


def test_plot_pam_rounds_draws_moved_bars_and_midpoint_lines(digits_pair: tuple) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ccatoolkit.plots.landscape import plot_pam_rounds

    a, b, train, test = digits_pair
    kw = dict(rounds=2, epochs=1, eval_data=test, cache=False, progress=False)
    runs = {"from the alignment": train_curve_pam(a, b, train, start="permute", **kw),
            "from the identity": train_curve_pam(a, b, train, start="identity", **kw)}
    moved_ax, loss_ax = plot_pam_rounds(runs, colors={"from the identity": "#de8f05"})
    assert len(moved_ax.patches) == 4  # one bar per run and round, zeros included
    assert [t.get_text().endswith("%") for t in moved_ax.texts] == [True] * 4
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert set(lines) == set(runs) and lines["from the identity"].get_color() == "#de8f05"
    np.testing.assert_allclose(lines["from the alignment"].get_ydata(), runs["from the alignment"].midpoint)
    plt.close(moved_ax.figure)
