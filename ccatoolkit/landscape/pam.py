"""Proximal alternating minimisation (PAM): learn a curve and B's neuron permutation together (Tatro et al. 2020).

Neuron alignment fixes B's permutation once, then learns the curve. PAM alternates the two: a
*curve step* trains the control point with B permuted by the current permutations (as
:func:`~ccatoolkit.landscape.curve_training.train_curve` does, continuing from the last control point), and
a *permutation step* updates every space's permutation by a proximal linearised step,

    P <- argmin over permutations of  <G, W'(P)> + ||W'(P) - W'_current||^2 / (2 eta),

with ``G`` the gradient of the curve's expected loss (``t ~ U(0, 1)``) with respect to B's permuted
weights ``W'``. A permutation does not change ``||W'(P)||``, so this is weight matching of B to the
endpoint moved one gradient step, ``W'_current - eta G`` (space by space, the others held fixed, as
in Git Re-Basin). The proximal term keeps the permutation near the current one: with a small
``eta`` nothing moves. Tatro et al. use PAM to ask whether the permutation from neuron alignment
is locally optimal for the curve: started from it, does PAM move it?
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from ccatoolkit._utils import (
    batch_inputs,
    batch_targets,
    check_same_architecture,
    model_device,
    progress_bar,
    to_model,
)
from ccatoolkit.landscape.curve_training import train_control
from ccatoolkit.landscape.curves import CURVE_KINDS, Curve, curve_coefficients, training_copy
from ccatoolkit.landscape.points import float_state, frozen_copy
from ccatoolkit.merging.align.permutation import match_activations, matching_cost, weight_table
from ccatoolkit.merging.api import alignment_transforms
from ccatoolkit.merging.graph import MergeGraph, merge_graph
from ccatoolkit.merging.transform import apply_permutations

__all__ = ["PamResult", "train_curve_pam"]


@dataclass
class PamResult:
    """A curve learned by PAM and the path its permutations took.

    ``moved[r]``: the fraction of B's neurons (over all spaces) whose partner changed at the
    permutation step of round ``r``; ``losses[r]``: the curve step's training loss at the end of
    round ``r``; ``perms``: the final permutations (``perm[i]`` = B's neuron at A's position ``i``);
    ``moved_from_start``: the fraction that differs from the starting permutations at the end.
    """

    curve: Curve
    perms: dict[str, np.ndarray]
    start: str
    moved: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    moved_from_start: float = 0.0


def _start_permutations(model_a: nn.Module, model_b: nn.Module, graph: MergeGraph, start: str,
                        data: Iterable[Any]) -> dict[str, np.ndarray]:
    if start == "identity":
        return {s.name: np.arange(s.size) for s in graph}
    if start in ("permute", "permute_weight"):
        transforms = alignment_transforms(model_a, model_b, start, data, graph=graph, progress=False)
        return {name: out.argmax(1).cpu().numpy() for name, (out, _) in transforms.items()}
    raise ValueError(f"start must be 'permute', 'permute_weight' or 'identity', got {start!r}")


def _endpoint_gradient(curve: Curve, data: Iterable[Any], batches: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``d E_t[loss(theta(t))] / d theta_B`` over ``batches`` batches, one ``t ~ U(0, 1)`` each."""
    model = training_copy(curve.template)
    names = [n for n, _ in model.named_parameters()]
    end = {k: curve.end[k].detach().clone().requires_grad_(True) for k in names}
    grads = {k: torch.zeros_like(v) for k, v in end.items()}
    count = 0
    device = model_device(curve.template)
    for i, batch in enumerate(data):
        if i >= batches:
            break
        x, y = to_model(batch_inputs(batch), curve.template), batch_targets(batch).to(device)
        t = float(torch.rand(1, generator=gen))
        c = curve_coefficients(curve.kind, [t])[0]
        params = {k: float(c[0]) * curve.start[k] + float(c[1]) * curve.control[k] + float(c[2]) * end[k]
                  for k in names}
        loss = F.cross_entropy(functional_call(model, params, (x,)), y)
        for k, g in zip(names, torch.autograd.grad(loss, [end[k] for k in names])):
            grads[k] += g
        count += 1
    return {k: g / max(count, 1) for k, g in grads.items()}


def _permutation_step(
    state_b: dict[str, torch.Tensor], graph: MergeGraph, perms: dict[str, np.ndarray],
    current: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], step: float,
) -> dict[str, np.ndarray]:
    """One proximal linearised update of every space's permutation (the others held at ``perms``).

    Minimising ``<G, W'(P)> + ||W'(P) - W'_current||^2 / (2 eta)`` over permutations is, because
    ``||W'(P)||`` does not depend on ``P``, maximising ``<W'_current - eta G, W'(P)>``: weight
    matching of B to the endpoint moved one gradient step. ``eta = step * ||W'|| / ||G||``, so
    ``step`` is the relative length of that gradient step; ``step = 0`` keeps every permutation.
    """
    names = [k for k in grads if k in graph.param_spaces]
    g_norm = sum(float(grads[k].double().pow(2).sum()) for k in names) ** 0.5
    w_norm = sum(float(current[k].double().pow(2).sum()) for k in names) ** 0.5
    eta = step * w_norm / g_norm if g_norm > 0 else 0.0
    target = {k: current[k].detach().double().cpu() - eta * grads[k].detach().double().cpu() for k in names}
    table = weight_table(state_b, graph, set(names))
    model = {k: state_b[k].detach().double().cpu() for k in names}
    return {space.name: match_activations(matching_cost(target, model, table, perms, space.name, space.size),
                                          space.groups)
            for space in graph}


def _moved_fraction(perms: dict[str, np.ndarray], before: dict[str, np.ndarray]) -> float:
    """The fraction of neurons (over all spaces) whose partner differs between ``perms`` and ``before``."""
    changed = sum(int((perms[s] != before[s]).sum()) for s in perms)
    return changed / max(1, sum(len(p) for p in perms.values()))


def train_curve_pam(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    *,
    start: str = "permute",
    rounds: int = 4,
    epochs: int = 1,
    step: float = 0.1,
    kind: str = "bezier",
    lr: float = 0.05,
    momentum: float = 0.9,
    grad_batches: int = 8,
    seed: int = 0,
    graph: MergeGraph | None = None,
    progress: bool = True,
) -> PamResult:
    """Learn a curve from ``model_a`` to ``model_b`` and B's permutations together by PAM (see the module doc).

    ``start``: the permutations PAM starts from: ``"permute"`` (activation matching on ``data``),
    ``"permute_weight"`` or ``"identity"``. Each of ``rounds`` rounds trains the control point for
    ``epochs`` epochs (SGD, ``lr``, ``momentum``; the first round from the midpoint, later ones from the
    last control point), then takes one permutation step (gradient over ``grad_batches`` batches,
    relative gradient step ``step``, see :func:`_permutation_step`); a last curve step follows the last
    permutation step. The models are
    not modified; the returned curve ends at B permuted by the final permutations.
    """
    if kind not in CURVE_KINDS:
        raise ValueError(f"unknown curve kind {kind!r}; valid kinds are: {', '.join(CURVE_KINDS)}")
    if rounds < 0 or epochs < 1:
        raise ValueError(f"PAM needs rounds >= 0 and epochs >= 1, got rounds={rounds}, epochs={epochs}")
    check_same_architecture([model_a, model_b], ["model_a", "model_b"])
    if graph is None:
        first = next(iter(data))
        graph = merge_graph(model_a, example_input=to_model(batch_inputs(first)[:2], model_a))
    template = frozen_copy(model_a)
    a_state = {k: v.clone() for k, v in float_state(model_a).items()}
    initial = _start_permutations(model_a, model_b, graph, start, data)
    perms = dict(initial)
    moved: list[float] = []
    losses: list[float] = []
    gen = torch.Generator().manual_seed(seed)
    control: dict[str, torch.Tensor] | None = None
    state_b = model_b.state_dict()
    for r in progress_bar(range(rounds + 1), progress, desc=f"PAM rounds (from {start})"):  # one bar, not one per round
        end = {k: v.clone() for k, v in float_state(apply_permutations(model_b, graph, perms)).items()}
        control, history = train_control(template, a_state, end, kind, data, epochs, lr, momentum, 0.0,
                                         seed + r, False, control_init=control)
        losses.append(history[-1])
        curve = Curve(template=template, start=a_state, end=end, control=control, kind=kind, method=f"pam ({start})",
                      history=list(losses))
        if r == rounds:
            break
        grads = _endpoint_gradient(curve, data, grad_batches, gen)  # d loss / d W' in A's frame
        new = _permutation_step(state_b, graph, perms, end, grads, step)
        moved.append(_moved_fraction(new, perms))
        perms = new
    return PamResult(curve=curve, perms=perms, start=start, moved=moved, losses=losses,
                     moved_from_start=_moved_fraction(perms, initial))

