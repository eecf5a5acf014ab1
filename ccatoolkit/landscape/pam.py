"""Proximal alternating minimisation (PAM): learn a curve and B's neuron permutation together (Tatro et al. 2020).

Neuron alignment fixes B's permutation once, then learns the curve. PAM alternates the two. Each
round takes a *permutation step*, then a *curve step*: the control point trains with B permuted by the
current permutations (as :func:`~ccatoolkit.landscape.curve_training.train_curve` does; round 0 from the
midpoint, later rounds from the last control point). So round 0's permutation step sees the straight
line from A to B (the control point at the midpoint), as in Tatro et al.'s code, which updates the
permutation before the curve in each outer iteration. The permutation step updates every space's
permutation by a proximal linearised step,

    P <- argmin over permutations of  <G, W'(P)> + ||W'(P) - W'_current||^2 / (2 eta),

with ``G`` the gradient of the curve's expected loss (``t ~ U(0, 1)``) with respect to B's permuted
weights ``W'``. A permutation does not change ``||W'(P)||``, so this is weight matching of B to the
endpoint moved one gradient step, ``W'_current - eta G`` (space by space, the others held fixed, as
in Git Re-Basin). The proximal term keeps the permutation near the current one: with a small
``eta`` nothing moves. Tatro et al. use PAM to ask whether the permutation from neuron alignment
is locally optimal for the curve: started from it, does PAM move it?

Descent (``descent=True``, the default): the linearised step is only a proposal. Once the curve is
trained the endpoint gradient is mostly sampling noise (its norm falls like ``1 / sqrt(batches)``), so
a long step moves neurons from any start, and from the alignment those moves make the curve worse. A
step is therefore kept only when it lowers the curve's loss (control point held) on ``grad_batches``
batches the gradient did not see, at ``t = 0.25, 0.5, 0.75``; otherwise it is halved, up to
``backtracks`` times, and the permutation stays when no length helps. This is the sufficient-decrease
safeguard of proximal gradient methods (backtracking); it turns "does PAM move the permutation?" into
"does any step PAM proposes lower the curve's loss?". ``descent=False`` keeps every step (the plain
linearised PAM).

Results are cached (:mod:`ccatoolkit.zoo.cache`, kind ``pam``) keyed by both models' weights, the
data, the evaluation data and every setting, so a second call with the same inputs loads at once.
"""

from __future__ import annotations

import itertools
import warnings
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
from ccatoolkit.zoo.cache import UnkeyableDataError, describe_data, load_or_create, state_digest

__all__ = ["PamResult", "train_curve_pam"]


@dataclass
class PamResult:
    """A curve learned by PAM and the path its permutations took.

    One entry per round in each list. ``moved[r]``: the fraction of B's neurons (over all spaces) whose
    partner changed at the permutation step of round ``r``; ``steps[r]``: the relative step length kept
    there (0 when the permutation stayed); ``losses[r]``: the training loss of the last epoch of round
    ``r``'s curve step; ``midpoint[r]``: the loss at ``t = 0.5`` on ``eval_data`` after that curve step
    (empty without ``eval_data``);
    ``perms``: the final permutations (``perm[i]`` = B's neuron at A's position ``i``);
    ``moved_from_start``: the fraction that differs from the starting permutations at the end.
    """

    curve: Curve
    perms: dict[str, np.ndarray]
    start: str
    moved: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    moved_from_start: float = 0.0
    midpoint: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)


def _start_permutations(model_a: nn.Module, model_b: nn.Module, graph: MergeGraph, start: str,
                        data: Iterable[Any]) -> dict[str, np.ndarray]:
    if start == "identity":
        return {s.name: np.arange(s.size) for s in graph}
    if start in ("permute", "permute_weight"):
        transforms = alignment_transforms(model_a, model_b, start, data, graph=graph, progress=False)
        return {name: out.argmax(1).cpu().numpy() for name, (out, _) in transforms.items()}
    raise ValueError(f"start must be 'permute', 'permute_weight' or 'identity', got {start!r}")


def _endpoint_gradient(curve: Curve, batches: list[Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``d E_t[loss(theta(t))] / d theta_B`` over ``batches``, one ``t ~ U(0, 1)`` each."""
    model = training_copy(curve.template)
    names = [n for n, _ in model.named_parameters()]
    end = {k: curve.end[k].detach().clone().requires_grad_(True) for k in names}
    grads = {k: torch.zeros_like(v) for k, v in end.items()}
    count = 0
    device = model_device(curve.template)
    for batch in batches:
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


_CHECK_TS = (0.25, 0.5, 0.75)


def _curve_check_loss(curve: Curve, batches: list[Any]) -> float:
    """The curve's mean training-mode loss over ``batches`` at ``t`` = 0.25, 0.5 and 0.75 (no gradients)."""
    model = training_copy(curve.template)
    device = model_device(curve.template)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            x, y = to_model(batch_inputs(batch), curve.template), batch_targets(batch).to(device)
            for t in _CHECK_TS:
                total += float(curve.loss(x, y, t, train_model=model))
                count += 1
    return total / max(count, 1)


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


def _permuted_end(model_b: nn.Module, graph: MergeGraph, perms: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in float_state(apply_permutations(model_b, graph, perms)).items()}


def _midpoint_loss(curve: Curve, eval_data: Iterable[Any] | None, bn_data: Iterable[Any]) -> list[float]:
    if eval_data is None:
        return []
    return [float(curve.evaluate(eval_data, ts=[0.5], bn_data=bn_data, progress=False).loss[0])]


def train_curve_pam(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    *,
    start: str = "permute",
    rounds: int = 4,
    epochs: int = 1,
    step: float = 8.0,
    kind: str = "bezier",
    lr: float = 0.05,
    momentum: float = 0.9,
    grad_batches: int = 8,
    descent: bool = True,
    backtracks: int = 3,
    eval_data: Iterable[Any] | None = None,
    seed: int = 0,
    graph: MergeGraph | None = None,
    cache: bool = True,
    cache_dir: str | None = None,
    progress: bool = True,
) -> PamResult:
    """Learn a curve from ``model_a`` to ``model_b`` and B's permutations together by PAM (see the module doc).

    ``start``: the permutations PAM starts from: ``"permute"`` (activation matching on ``data``),
    ``"permute_weight"`` or ``"identity"``. Each of ``rounds`` rounds takes one permutation step
    (gradient over ``grad_batches`` batches, relative gradient step ``step``, see
    :func:`_permutation_step`; round 0's at the straight line), then trains the control point for
    ``epochs`` epochs (SGD, ``lr``, ``momentum``; round 0 from the midpoint, later rounds from the last
    control point). ``descent``: keep a step only when it lowers the curve's loss on ``grad_batches``
    other batches (halving it up to ``backtracks`` times first; see the module doc). ``eval_data``: the
    loss at ``t = 0.5`` after every curve step is recorded in :attr:`PamResult.midpoint`. With
    ``cache`` the result is stored under ``cache_dir`` (default ``$CCATOOLKIT_CACHE`` or
    ``~/.cache/ccatoolkit``) and a second call with the same inputs loads it. The models are not
    modified; the returned curve ends at B permuted by the final permutations.
    """
    if kind not in CURVE_KINDS:
        raise ValueError(f"unknown curve kind {kind!r}; valid kinds are: {', '.join(CURVE_KINDS)}")
    if rounds < 1 or epochs < 1:
        raise ValueError(f"PAM needs rounds >= 1 and epochs >= 1, got rounds={rounds}, epochs={epochs}")
    if step < 0 or backtracks < 0 or grad_batches < 1:
        raise ValueError(f"PAM needs step >= 0, backtracks >= 0 and grad_batches >= 1, got step={step}, "
                         f"backtracks={backtracks}, grad_batches={grad_batches}")
    if start not in ("permute", "permute_weight", "identity"):
        raise ValueError(f"start must be 'permute', 'permute_weight' or 'identity', got {start!r}")
    check_same_architecture([model_a, model_b], ["model_a", "model_b"])
    if graph is None:
        first = next(iter(data))
        graph = merge_graph(model_a, example_input=to_model(batch_inputs(first)[:2], model_a))
    template = frozen_copy(model_a)
    a_state = {k: v.clone() for k, v in float_state(model_a).items()}
    settings = dict(start=start, rounds=int(rounds), epochs=int(epochs), step=float(step), kind=kind, lr=float(lr),
                    momentum=float(momentum), grad_batches=int(grad_batches), descent=bool(descent),
                    backtracks=int(backtracks), seed=int(seed))

    def create() -> dict[str, Any]:
        return _run_pam(model_a, model_b, data, graph, template, a_state, eval_data, progress, **settings)

    key = _cache_key(model_a, model_b, data, eval_data, settings) if cache else None
    stored = load_or_create("pam", key, create, cache_dir=cache_dir) if key is not None else create()
    perms = {name: np.asarray(p.numpy(), dtype=np.int64) for name, p in stored["perms"].items()}
    device = model_device(model_a)
    end = {k: v.to(device) for k, v in _permuted_end(model_b, graph, perms).items()}
    losses = [float(v) for v in stored["losses"]]
    curve = Curve(template=template, start=a_state, end=end,
                  control={k: v.to(device) for k, v in stored["control"].items()}, kind=kind, method=f"pam ({start})",
                  history=list(losses))
    return PamResult(curve=curve, perms=perms, start=start, moved=[float(v) for v in stored["moved"]], losses=losses,
                     moved_from_start=float(stored["moved_from_start"]),
                     midpoint=[float(v) for v in stored["midpoint"]], steps=[float(v) for v in stored["steps"]])


def _cache_key(model_a: nn.Module, model_b: nn.Module, data: Iterable[Any], eval_data: Iterable[Any] | None,
               settings: dict[str, Any]) -> dict[str, Any] | None:
    """The cache key of a PAM run: both models' weights, the data, the evaluation data and the settings."""
    try:
        described = describe_data(data)
        evaluated = describe_data(eval_data) if eval_data is not None else None
    except UnkeyableDataError as error:
        warnings.warn(f"train_curve_pam does not cache this run: {error}", RuntimeWarning, stacklevel=3)
        return None
    return {"version": 2, "model_a": state_digest(model_a), "model_b": state_digest(model_b), "data": described,
            "eval_data": evaluated, **settings}


def _run_pam(
    model_a: nn.Module, model_b: nn.Module, data: Iterable[Any], graph: MergeGraph, template: nn.Module,
    a_state: dict[str, torch.Tensor], eval_data: Iterable[Any] | None, progress: bool, *, start: str, rounds: int,
    epochs: int, step: float, kind: str, lr: float, momentum: float, grad_batches: int, descent: bool,
    backtracks: int, seed: int,
) -> dict[str, Any]:
    """The PAM rounds of :func:`train_curve_pam`; returns what its cache stores."""
    initial = _start_permutations(model_a, model_b, graph, start, data)
    perms = dict(initial)
    moved: list[float] = []
    steps: list[float] = []
    losses: list[float] = []
    midpoint: list[float] = []
    gen = torch.Generator().manual_seed(seed)
    control: dict[str, torch.Tensor] | None = None
    state_b = model_b.state_dict()
    end = _permuted_end(model_b, graph, perms)
    curve = Curve(template=template, start=a_state, end=end, kind=kind,  # round 0's step sees the straight line
                  control={k: (a_state[k] + end[k]) / 2 for k in a_state})
    for r in progress_bar(range(rounds), progress, desc=f"PAM rounds (from {start})"):  # one bar, not one per round
        batches = list(itertools.islice(iter(data), 2 * grad_batches if descent else grad_batches))
        grads = _endpoint_gradient(curve, batches[:grad_batches], gen)  # d loss / d W' in A's frame
        new, kept = _permutation_step(state_b, graph, perms, end, grads, step), step
        if descent and step > 0:
            check = batches[grad_batches:] or batches  # batches the gradient did not see, when there are any
            current = _curve_check_loss(curve, check)
            for attempt in range(backtracks + 1):
                if attempt:
                    kept /= 2
                    new = _permutation_step(state_b, graph, perms, end, grads, kept)
                if _moved_fraction(new, perms) == 0.0:  # shorter steps move nothing either
                    break
                trial = Curve(template=template, start=a_state, end=_permuted_end(model_b, graph, new),
                              control=curve.control, kind=kind)
                if _curve_check_loss(trial, check) < current:
                    break
            else:
                new = perms  # no length lowered the loss: the permutation stays
        fraction = _moved_fraction(new, perms)
        moved.append(fraction)
        steps.append(kept if fraction > 0 else 0.0)
        perms = new
        end = _permuted_end(model_b, graph, perms)
        control, history = train_control(template, a_state, end, kind, data, epochs, lr, momentum, 0.0,
                                         seed + r, False, control_init=control)  # round 0: from the midpoint
        losses.append(history[-1])
        curve = Curve(template=template, start=a_state, end=end, control=control, kind=kind)
        midpoint += _midpoint_loss(curve, eval_data, data)
    return {
        "perms": {name: torch.as_tensor(np.asarray(p, dtype=np.int64)) for name, p in perms.items()},
        "control": {k: v.detach().cpu() for k, v in control.items()},
        "moved": moved, "steps": steps, "losses": [float(v) for v in losses], "midpoint": midpoint,
        "moved_from_start": _moved_fraction(perms, initial),
    }
