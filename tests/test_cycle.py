"""Cycle-consistent N-model matching (C2M3): planted permutations, cycle consistency, the merge."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from ccatoolkit.merging.align.cycle import _best_step, _Problem, cycle_consistent_matching, cycle_objective
from ccatoolkit.merging.align.permutation import permutation_matrix
from ccatoolkit.merging.align.permutation import weight_matching
from ccatoolkit.merging.api import merge
from ccatoolkit.merging.graph import merge_graph
from ccatoolkit.merging.transform import apply_permutations, random_permutations

from toybox import ConvBN


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


def _permuted_copies(model: nn.Module, count: int) -> tuple[object, list[nn.Module], list[dict]]:
    graph = merge_graph(model, example_input=torch.randn(2, 6))
    planted = [{s.name: torch.arange(s.size) for s in graph}]
    copies = [model]
    for k in range(1, count):
        perms = random_permutations(graph, torch.Generator().manual_seed(k))
        planted.append(perms)
        copies.append(apply_permutations(model, graph, perms))
    return graph, copies, planted


@pytest.mark.parametrize("count", [3, 5])
def test_planted_permutations_are_recovered(count: int) -> None:
    graph, copies, planted = _permuted_copies(_mlp(0), count)
    perms, info = cycle_consistent_matching([m.state_dict() for m in copies], graph)
    for k in range(count):
        for space in graph.names:
            # copy k's neuron perms[k][u] goes to the reference's position u: it is the planted inverse
            np.testing.assert_array_equal(planted[k][space].numpy()[perms[k][space]], np.arange(graph.space(space).size))
    assert info["objective"] == pytest.approx(
        cycle_objective([m.state_dict() for m in copies], graph, perms), rel=1e-12)


def test_pairwise_maps_compose_to_the_identity_around_every_cycle() -> None:
    models = [_mlp(s) for s in range(4)]  # independent models: the maps are not planted ones
    graph = merge_graph(models[0], example_input=torch.randn(2, 6))
    perms, _ = cycle_consistent_matching([m.state_dict() for m in models], graph, max_iter=30)

    def pair(i: int, j: int, space: str) -> np.ndarray:  # index map: model j's neuron for model i's neuron
        return perms[j][space][np.argsort(perms[i][space])]

    for space in graph.names:
        for a, b, c in itertools.permutations(range(4), 3):
            around = pair(c, a, space)[pair(b, c, space)[pair(a, b, space)]]  # a -> b -> c -> a
            np.testing.assert_array_equal(around, np.arange(graph.space(space).size))
    assert not all(np.array_equal(perms[1][s], np.arange(graph.space(s).size)) for s in graph.names)


def test_objective_is_at_least_that_of_reference_weight_matching() -> None:
    models = [_mlp(s) for s in range(3)]
    graph = merge_graph(models[0], example_input=torch.randn(2, 6))
    states = [m.state_dict() for m in models]
    perms, info = cycle_consistent_matching(states, graph)
    pairwise = [{s.name: np.arange(s.size) for s in graph}] + [weight_matching(states[0], st, graph) for st in states[1:]]
    identity = [{s.name: np.arange(s.size) for s in graph}] * 3
    assert info["objective"] >= cycle_objective(states, graph, identity)
    assert info["objective"] >= cycle_objective(states, graph, pairwise) - 1e-9  # it starts there, never loses
    assert info["objective"] == pytest.approx(cycle_objective(states, graph, perms), rel=1e-12)


def test_c2m3_merge_of_permuted_copies_gives_back_the_model() -> None:
    torch.manual_seed(0)
    model = ConvBN().eval()
    x = torch.randn(32, 1, 8, 8)
    data = [x[:16], x[16:]]
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(64, 1, 8, 8))
        model.eval()
    graph = merge_graph(model, example_input=x[:2])
    copies = [model] + [apply_permutations(model, graph, random_permutations(graph, torch.Generator().manual_seed(k)))
                        for k in (1, 2, 3)]
    merged = merge(copies, "c2m3", data, reset_bn=False, repair=False, progress=False)
    with torch.no_grad():
        ref = model(x)
        assert float((merged(x) - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    assert merged.merge_info["method"] == "c2m3"
    assert merged.merge_info["cycle"]["iterations"] >= 1


@pytest.mark.parametrize("make", [lambda: _mlp(0), lambda: ConvBN()])
def test_objective_along_a_frank_wolfe_segment_is_the_polynomial_the_line_search_maximises(make) -> None:
    torch.manual_seed(0)
    models = [make().eval() for _ in range(3)]
    example = torch.randn(2, 6) if isinstance(models[0], nn.Sequential) else torch.randn(2, 1, 8, 8)
    graph = merge_graph(models[0], example_input=example)
    problem = _Problem([m.state_dict() for m in models], graph, None, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)

    def perms() -> dict[str, np.ndarray]:
        return {s.name: torch.randperm(s.size, generator=gen).numpy() for s in graph}

    # a relaxed point (mixtures of two permutations) and permutations to move towards; model 0 stays fixed
    start = [{s.name: torch.eye(s.size, dtype=torch.float64) for s in graph}] + [
        {s: 0.3 * torch.as_tensor(permutation_matrix(a[s])) + 0.7 * torch.as_tensor(permutation_matrix(b[s]))
         for s in graph.names} for a, b in [(perms(), perms()) for _ in range(2)]]
    targets = [None, perms(), perms()]
    poly = problem.along(start, targets)
    assert len(poly) == 5  # weights with two axes in spaces: degree 2 each, so f has degree 4
    for step in (0.0, 0.2, 0.5, 0.9, 1.0):
        point = [start[0]] + [{s: (1 - step) * start[i][s] + step * torch.as_tensor(permutation_matrix(targets[i][s]))
                               for s in graph.names} for i in (1, 2)]
        assert np.polynomial.polynomial.polyval(step, poly) == pytest.approx(problem.objective(point), rel=1e-10)
    best, value = _best_step(poly)
    grid = np.linspace(0, 1, 2001)
    assert 0.0 <= best <= 1.0 and value >= np.polynomial.polynomial.polyval(grid, poly).max() - 1e-9



class _Residual(nn.Module):
    """A stream whose block reads and writes it: ``mix.weight`` has both axes in one space."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in, self.mix, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc_in(x)
        x = x + torch.relu(self.mix(x))
        return self.out(x)


@pytest.mark.parametrize("make", [lambda: _mlp(0), _Residual])
def test_frank_wolfe_gradients_are_the_objectives_derivatives(make) -> None:
    torch.manual_seed(0)
    models = [make().eval() for _ in range(3)]
    graph = merge_graph(models[0], example_input=torch.randn(2, 6))
    problem = _Problem([m.state_dict() for m in models], graph, None, torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    P = [{s.name: torch.rand(s.size, s.size, dtype=torch.float64, generator=gen).requires_grad_(i != 0)
          for s in graph} for i in range(3)]
    value = 0.0
    for pname in problem.table:  # f = sum_{i<j} <U_i, U_j>, differentiable
        mapped = [problem.universe(i, pname, P) for i in range(3)]
        total = torch.stack(mapped).sum(0)
        value = value + 0.5 * ((total * total).sum() - sum((u * u).sum() for u in mapped))
    value.backward()
    grads = problem.gradients([{s: m.detach() for s, m in p.items()} for p in P], fixed=0)
    for i in (1, 2):
        for space in graph.names:
            torch.testing.assert_close(grads[i][space], P[i][space].grad, rtol=1e-10, atol=1e-10)
    assert all(float(g.abs().max()) == 0.0 for g in grads[0].values())  # the fixed model's stay zero
