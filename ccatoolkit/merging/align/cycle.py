"""Cycle-consistent weight matching of N models (C2M3, Crisostomi et al., NeurIPS 2024).

Pairwise matching to one reference is not cycle-consistent: the map from model A to B composed
with B to C need not be the map from A to C. C2M3 instead gives every model ``i`` a permutation
``P_i`` per space into one shared *universe*; every pairwise map is ``P_j^T P_i`` and so every
cycle composes to the identity by construction. The permutations maximise the weight-matching
objective summed over all pairs of models,

    f(P) = sum_{i<j} sum_W < U_i(W), U_j(W) >,    U_i(W) = W_i with each of its axes mapped by P_i,

which Frank-Wolfe optimises over the relaxation to doubly stochastic matrices: each step takes
the gradient for every (model, space), solves one assignment problem per space (the linear
minimisation oracle, whose answer is a permutation), and moves all models towards theirs at
once, by the step that maximises ``f`` exactly (along the segment ``f`` is a polynomial in the step,
of degree twice the number of axes a weight has in spaces); at the end each matrix is rounded to
the nearest permutation. Unlike weight matching to a
reference, a model's permutation then depends on all the others, not on the reference alone. Data-free, like Git Re-Basin's weight matching
(:func:`ccatoolkit.merging.align.permutation.weight_matching`), whose ``channel_rows`` view of a weight
as ``(channels, rest)`` and flatten blocks this module shares.

Results are expressed in one model's frame (``reference``): model ``k``'s permutation is
``perm[u] =`` the neuron of model ``k`` that goes to the reference's position ``u``, the same
convention as the pairwise matchers, so the merge code treats both alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ccatoolkit.merging.align.permutation import (
    channel_rows,
    grouped_view,
    match_activations,
    permutation_matrix,
    permute_axis,
    replace_segment,
    segment,
    weight_matching,
    weight_table,
)

if TYPE_CHECKING:
    from ccatoolkit.merging.graph import ParamRef

__all__ = ["cycle_consistent_matching", "cycle_objective"]

def _apply(W: torch.Tensor, matrix: torch.Tensor, ref: ParamRef) -> torch.Tensor:
    """``matrix @ W`` along ``ref.axis`` (``block`` entries per channel move together; only ``ref``'s
    segment of a concatenated axis)."""
    if ref.groups > 1:  # block-diagonal ``matrix``: rows of group g read the g-th diagonal block
        view = grouped_view(W, ref.groups)
        b = view.shape[2]
        blocks = torch.stack([matrix[g * b:(g + 1) * b, g * b:(g + 1) * b] for g in range(ref.groups)])
        return torch.einsum("gij,goj...->goi...", blocks, view).reshape(W.shape)
    moved = segment(W, ref, matrix.shape[1]).movedim(ref.axis, 0)
    shape = moved.shape
    mapped = (matrix @ moved.reshape(matrix.shape[1], -1)).reshape(shape).movedim(0, ref.axis)
    return replace_segment(W, ref, mapped)


class _Problem:
    """The weights each space touches, for N models, in float64 on one device."""

    def __init__(self, states: Sequence[Mapping[str, torch.Tensor]], graph: Any, param_names: set[str] | None,
                 device: torch.device) -> None:
        self.table = weight_table(states[0], graph, param_names)
        self.sizes = {s.name: int(s.size) for s in graph.spaces}
        self.groups = {s.name: int(s.groups) for s in graph.spaces}  # blocks a permutation keeps in place
        self.weights = [{n: s[n].detach().to(device=device, dtype=torch.float64) for n in self.table} for s in states]
        self.device = device

    def universe(self, i: int, pname: str, P: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """Model ``i``'s weight ``pname`` with every axis mapped into the universe."""
        W = self.weights[i][pname]
        for space, ref in self.table[pname]:
            W = _apply(W, P[i][space], ref)
        return W

    def objective(self, P: Sequence[Mapping[str, torch.Tensor]]) -> float:
        total = 0.0
        for pname in self.table:
            mapped = [self.universe(i, pname, P) for i in range(len(P))]
            s = torch.stack(mapped).sum(0)
            # sum_{i<j} <U_i, U_j> = (|sum U|^2 - sum |U_i|^2) / 2
            total += 0.5 * (float((s * s).sum()) - sum(float((u * u).sum()) for u in mapped))
        return total

    def _coefficients(self, i: int, pname: str, P: Mapping[str, torch.Tensor],
                      Q: Mapping[str, np.ndarray] | None) -> list[torch.Tensor]:
        """``[c_0, c_1, ...]`` with ``U_i(W) = sum_d s^d c_d`` on the segment ``P + s (Q - P)`` (``Q`` None: ``P``).

        Each axis multiplies the polynomial by ``P + s D``: ``P`` is a dense product, ``Q`` (a
        permutation) an index, and ``D X = Q X - P X`` reuses the product.
        """
        coeffs = [self.weights[i][pname]]
        for space, ref in self.table[pname]:
            mapped = [_apply(c, P[space], ref) for c in coeffs]
            if Q is None:
                coeffs = mapped
                continue
            moved = [permute_axis(c, Q[space], ref) - m for c, m in zip(coeffs, mapped)]
            coeffs = [mapped[0]] + [mapped[d] + moved[d - 1] for d in range(1, len(coeffs))] + [moved[-1]]
        return coeffs

    def along(self, P: Sequence[Mapping[str, torch.Tensor]], Q: Sequence[Mapping[str, np.ndarray] | None]
              ) -> np.ndarray:
        """Coefficients (ascending powers of ``s``) of ``f((1 - s) P + s Q)``, a polynomial in ``s``.

        Each mapped weight is a polynomial of degree (its axes in spaces), so ``f`` is one of twice that
        degree; its coefficients are inner products of the weights' coefficients, from one pass over the
        weights (a third of the dense products of evaluating ``f`` once per axis and model more).
        """
        poly = np.zeros(1)
        for pname in self.table:
            coeffs = [self._coefficients(i, pname, P[i], Q[i]) for i in range(len(P))]
            degree = max(len(c) for c in coeffs)
            sums = [sum(c[d] for c in coeffs if d < len(c)) for d in range(degree)]
            term = np.zeros(2 * degree - 1)
            for d in range(degree):
                for e in range(degree):
                    own = sum(float((c[d] * c[e]).sum()) for c in coeffs if max(d, e) < len(c))
                    term[d + e] += 0.5 * (float((sums[d] * sums[e]).sum()) - own)
            poly = np.polynomial.polynomial.polyadd(poly, term)
        return poly

    def gradients(self, P: Sequence[Mapping[str, torch.Tensor]], fixed: int) -> list[dict[str, torch.Tensor]]:
        """``d f / d P_i[s]`` for every space and every model but ``fixed`` (whose entry stays zero).

        One term per axis of a weight in space ``s``, that axis left unmapped and the others mapped
        (the product rule, also when a weight has two axes in one space). The mapped prefixes of
        each weight are shared between its terms and its image ``U_i(W)``.
        """
        n = len(P)
        grads = [{s: torch.zeros(k, k, dtype=torch.float64, device=self.device) for s, k in self.sizes.items()}
                 for _ in range(n)]
        for pname, entries in self.table.items():
            # prefixes[i][j]: model i's weight with its first j axes mapped (the last one is U_i(W))
            prefixes = []
            for i in range(n):
                chain = [self.weights[i][pname]]
                for space, ref in entries:
                    chain.append(_apply(chain[-1], P[i][space], ref))
                prefixes.append(chain)
            total = torch.stack([chain[-1] for chain in prefixes]).sum(0)
            for i in range(n):
                if i == fixed:
                    continue
                others = total - prefixes[i][-1]  # sum_{j != i} U_j(W)
                for j, (space, ref) in enumerate(entries):
                    partial = prefixes[i][j]  # all axes mapped but this one: the prefix, then the axes after it
                    for later, later_ref in entries[j + 1:]:
                        partial = _apply(partial, P[i][later], later_ref)
                    size = self.sizes[space]
                    grads[i][space] += channel_rows(others, ref, size) @ channel_rows(partial, ref, size).T
        return grads


def _best_step(poly: np.ndarray) -> tuple[float, float]:
    """``(s, p(s))`` maximising the polynomial ``poly`` (ascending coefficients) over ``[0, 1]``:
    the better end or a real root of its derivative inside."""
    P = np.polynomial.polynomial
    candidates = [0.0, 1.0]
    if len(poly) > 2:
        candidates += [float(r.real) for r in P.polyroots(P.polyder(poly))
                       if abs(r.imag) <= 1e-9 * max(1.0, abs(r)) and 0.0 < r.real < 1.0]
    values = [float(P.polyval(c, poly)) for c in candidates]
    best = int(np.argmax(values))
    return candidates[best], values[best]


def _matrices(perms: Sequence[Mapping[str, np.ndarray]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Each model's permutations as matrices (:func:`permutation_matrix`) on ``device``."""
    return [{s: torch.as_tensor(permutation_matrix(p), device=device) for s, p in perm.items()} for perm in perms]


def cycle_objective(states: Sequence[Mapping[str, torch.Tensor]], graph: Any,
                    perms: Sequence[Mapping[str, np.ndarray]], param_names: set[str] | None = None) -> float:
    """The summed pairwise weight-matching objective of models mapped by ``perms`` (higher is better)."""
    device = next(iter(states[0].values())).device
    return _Problem(states, graph, param_names, device).objective(_matrices(perms, device))


def _oracle(
    problem: _Problem, P: list[dict[str, torch.Tensor]], reference: int
) -> tuple[list[dict[str, np.ndarray] | None], float]:
    """Frank-Wolfe's linear oracle at ``P``: per model the permutations that best follow the gradient (None for
    the reference), and the gap ``<grad, Q - P>``, an upper bound on how far the relaxed objective is below its
    maximum."""
    grads = problem.gradients(P, fixed=reference)
    gap = 0.0
    targets: list[dict[str, np.ndarray] | None] = []
    for i in range(len(P)):
        if i == reference:  # the gauge: f does not change when one permutation of the universe is
            targets.append(None)  # applied to every model, so the reference's stays the identity
            continue
        q = {}
        for s, G in grads[i].items():
            q[s] = match_activations(G, problem.groups[s])
            gap += float((G * (torch.as_tensor(permutation_matrix(q[s]), device=G.device) - P[i][s])).sum())
        targets.append(q)
    return targets, gap


def cycle_consistent_matching(
    states: Sequence[Mapping[str, torch.Tensor]],
    graph: Any,
    *,
    reference: int = 0,
    max_iter: int = 100,
    tol: float = 1e-4,
    param_names: set[str] | None = None,
) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """Permutations of every model into a shared universe, by Frank-Wolfe (see the module doc).

    ``states``: the models' state dicts (N >= 2); ``graph``: their :class:`MergeGraph`;
    ``param_names`` restricts the weights in the objective (default: every floating tensor the
    graph names except BatchNorm running statistics).

    The universe is the reference's frame (``f`` is invariant to one permutation of the universe applied
    to every model, so the reference's matrices stay the identity without loss). The others start from
    pairwise weight matching to the reference; each Frank-Wolfe step moves all of them towards the
    oracle's permutations (:func:`_oracle`) by the step in ``[0, 1]`` that maximises the relaxed objective
    exactly, until the gap falls below ``tol`` times the reference's squared weight norm (early, with no
    loss of merged accuracy: docs/design.md, "Measured"), no step improves, or ``max_iter`` steps. Rounding
    comes last; a rounded objective below the start's returns the start (never worse than pairwise matching).

    Returns ``(perms, info)``: ``perms[k][space]`` maps model ``k`` into ``reference``'s frame
    (``perms[reference]`` is the identity), ``info`` has the iterations, the final gap, the
    objective of the result and that of the start.
    """
    n = len(states)
    if n < 2:
        raise ValueError(f"cycle-consistent matching needs at least 2 models, got {n}")
    if not 0 <= reference < n:
        raise ValueError(f"reference index {reference} out of range for {n} models")
    device = next(iter(states[0].values())).device
    problem = _Problem(states, graph, param_names, device)
    start = [{s: np.arange(k) for s, k in problem.sizes.items()} if i == reference else
             weight_matching(states[reference], states[i], graph, param_names=param_names) for i in range(n)]
    P = _matrices(start, device)
    scale = max(1.0, sum(float((w * w).sum()) for w in problem.weights[0].values()))
    current, gap, it = problem.objective(P), float("inf"), 0
    for it in range(1, max_iter + 1):
        targets, gap = _oracle(problem, P, reference)
        if gap <= tol * scale:
            break
        # exact line search: f is a polynomial along the segment, maximised over [0, 1] (never a worse iterate)
        step, value = _best_step(problem.along(P, targets))
        if step == 0.0 or value <= current:
            break
        P = [P[i] if targets[i] is None else
             {s: (1.0 - step) * P[i][s] + step * torch.as_tensor(permutation_matrix(targets[i][s]), device=device)
              for s in P[i]} for i in range(n)]
        current = value
    # round each matrix to the permutation that overlaps it most (the reference's stay identities)
    perms = [{s: match_activations(P[i][s], problem.groups[s]) for s in problem.sizes} for i in range(n)]
    objective = problem.objective(_matrices(perms, device))
    initial = problem.objective(_matrices(start, device))
    if objective < initial:  # rounding lost what the relaxation gained: keep the start
        perms, objective = start, initial
    info = {"iterations": it, "gap": gap, "objective": objective, "start_objective": initial}
    return perms, info
