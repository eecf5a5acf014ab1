"""PAM (Tatro et al. 2020): curve and permutation learned together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ccatoolkit.landscape.pam import _permutation_step, train_curve_pam
from ccatoolkit.merging.graph import merge_graph
from ccatoolkit.merging.transform import apply_permutations, random_permutations

from toybox import digit_batches, fit


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


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


def test_pam_keeps_the_exact_permutation_of_a_permuted_copy() -> None:
    """B a permuted copy of A: alignment finds B's function-preserving permutation, and PAM stays there."""
    train, _ = digit_batches()
    a = fit(_mlp(), train, epochs=3, seed=0)
    graph = merge_graph(a, example_input=train[0][0][:2])
    b = apply_permutations(a, graph, random_permutations(graph, torch.Generator().manual_seed(3)))
    result = train_curve_pam(a, b, train, start="permute", rounds=1, epochs=1, progress=False)
    assert result.moved == [0.0] and result.moved_from_start == 0.0
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    x = train[0][0]
    with torch.no_grad():  # the curve's end is B permuted back onto A: A's function
        torch.testing.assert_close(result.curve.end_models()[1](x), a(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_pam_leaves_the_alignment_alone_and_does_not_reach_it_from_the_identity() -> None:
    """Tatro et al.'s claim on digits MLPs (benchmarks/pam.py, 3 pairs): with moderate steps PAM does not move the
    aligned permutation; long steps move many neurons, but no identity-started curve reaches the aligned one."""
    train, test = digit_batches()
    torch.manual_seed(0)  # biases too: the pair must not depend on what ran before
    a, b = fit(_mlp(), train, epochs=30, seed=0, reinit=True), fit(_mlp(), train, epochs=30, seed=1, reinit=True)
    kw = dict(rounds=3, epochs=3, progress=False)
    aligned = train_curve_pam(a, b, train, start="permute", step=2.0, **kw)
    assert aligned.moved_from_start <= 0.05
    runs = [train_curve_pam(a, b, train, start="identity", step=step, **kw) for step in (0.0, 8.0)]
    assert runs[0].moved_from_start == 0.0 and runs[1].moved_from_start > 0.2
    mid = [float(r.curve.evaluate(test, ts=3, progress=False).loss[1]) for r in [aligned, *runs]]
    assert mid[0] < min(mid[1:]), mid
