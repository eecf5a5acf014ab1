"""Evaluate many points of weight space at once: ``theta = sum_k c_k theta_k`` over a few anchor models.

Every point of a curve, plane or simplex is a weighted sum of a few *anchor* models' parameters
and buffers (:func:`combine`; ``num_batches_tracked`` and other integer buffers come from the
first anchor). :func:`evaluate_points` runs them **batched**: the stacked parameters of a chunk of
points go through ``torch.func.functional_call`` under ``torch.vmap``, so one data batch, moved to
the device once, serves every point (for an MLP the linear layers become batched matrix
products). ``batched=False`` runs the plain loop over model copies instead; both give the same
numbers to float tolerance. :func:`interpolated_model` builds one such point as a model.

Speed notes (measured by ``benchmarks/interpolation_speed.py``): for ``nn.Sequential`` models whose
first parametric layer is Linear/Conv (the zoo's MLP), that layer is computed once per anchor and
combined, since it is linear in its weights; each vmapped step holds at most ``_POINT_ROWS``
point-samples so the working set stays cache-sized. Convolutional models on CPU are evaluated
one point per step (vmap makes per-point conv weights a grouped convolution, which is slower on
CPU than separate ones); on GPUs they are chunked.

BatchNorm networks: an interpolated network's BatchNorm running statistics are not those of
its own activations, and its curve is wrong without re-estimating them (Jordan et al. 2022,
REPAIR). With ``reset_bn=True`` the statistics are recomputed at every point on ``bn_data``
(training data), batched too (:func:`ccatoolkit.merging.normalization.population_bn_statistics`):
a vmapped forward whose BatchNorm layers normalise with batch statistics returns, through hooks,
the per-channel sums of each BatchNorm input; they are accumulated in float64 into each point's
population mean and (unbiased) variance.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from ccatoolkit._utils import (
    batch_inputs,
    batch_targets,
    check_class_targets,
    check_data,
    check_logits,
    check_same_architecture,
    has_batchnorm,
    model_device,
    progress_bar,
    target_vector,
    to_model,
)
from ccatoolkit.merging.normalization import population_bn_statistics
from ccatoolkit.zoo.adversarial import PGD

__all__ = [
    "float_state", "combine", "point_model", "interpolated_model", "evaluate_points", "frozen_copy",
]

_PARAM_BUDGET_BYTES = 256 * 2**20  # stacked parameters of one chunk of points
_MAX_CHUNK = 8
_POINT_ROWS = 4096  # points x samples evaluated in one vmapped step (cache-friendly on CPU)


# --------------------------------------------------------------------------- states

def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point entries of ``model.state_dict()`` (parameters and buffers), detached."""
    return {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}


def combine(states: Sequence[dict[str, torch.Tensor]], coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stacked ``sum_k coeffs[:, k] * states[k]`` for every entry: a dict of ``(P, *shape)`` tensors.

    BatchNorm running variances are clamped at 0 (extrapolated points could make them negative).
    """
    out: dict[str, torch.Tensor] = {}
    for key, ref in states[0].items():
        c = coeffs.to(device=ref.device, dtype=torch.float64)
        acc = None
        for k, state in enumerate(states):
            term = c[:, k].reshape(-1, *([1] * ref.dim())) * state[key].to(torch.float64).unsqueeze(0)
            acc = term if acc is None else acc + term
        value = acc.to(ref.dtype)
        if key.endswith("running_var"):
            value = value.clamp_min(0.0)
        out[key] = value
    return out


def point_model(
    template: nn.Module, states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float],
    bn_data: Iterable[Any] | None = None,
) -> nn.Module:
    """A copy of ``template`` (eval mode) at the point ``sum_k weights[k] * states[k]``.

    ``states`` are the anchors' floating state dicts on the template's device. With ``bn_data``
    the point's BatchNorm running statistics are re-estimated there (its own, not the mix of its
    anchors'); without, they are the mix.
    """
    state = {k: v[0] for k, v in combine(states, torch.tensor([list(map(float, weights))], dtype=torch.float64)).items()}
    if bn_data is not None:
        population_bn_statistics(template, [state], bn_data)
    point = copy.deepcopy(template).eval()
    point.load_state_dict(state, strict=False)
    return point


def interpolated_model(
    models: Sequence[nn.Module], weights: Sequence[float], bn_data: Iterable[Any] | None = None
) -> nn.Module:
    """A new model at ``sum_k weights[k] * models[k]`` (floating parameters and buffers; integer buffers from the first).

    The same point :func:`evaluate_points` evaluates, as a model you can run, inspect or save (the
    notebooks' sliders use it). BatchNorm models need ``bn_data`` (training batches): the point's
    running statistics are re-estimated there, as an interpolated network's own statistics differ
    from the mix of its anchors'. The input models are not modified.
    """
    models = list(models)
    if len(weights) != len(models) or not models:
        raise ValueError(f"got {len(models)} models and {len(weights)} weights; pass one weight per model")
    check_same_architecture(models)
    device = model_device(models[0])
    states = [{k: v.to(device) for k, v in float_state(m).items()} for m in models]
    if has_batchnorm(models[0]) and bn_data is None:
        raise ValueError("this model has BatchNorm layers: pass bn_data (training batches) to re-estimate "
                         "the interpolated model's statistics")
    return point_model(models[0], states, weights, bn_data if has_batchnorm(models[0]) else None)


# --------------------------------------------------------------------------- batched evaluation


def _chunks(
    n_points: int, states: Sequence[dict[str, torch.Tensor]], chunk_size: int | None, template: nn.Module | None = None
) -> list[slice]:
    """Slices of the points evaluated together under vmap.

    Automatic size: as many points as fit ``_PARAM_BUDGET_BYTES`` of stacked weights, at most
    ``_MAX_CHUNK``; one point at a time for convolutional models on CPU, where vmap turns per-point
    convolution weights into grouped convolutions that are slower than separate ones (the data
    batch is still moved once and reused for every point).
    """
    if chunk_size is None and template is not None:
        conv = any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in template.modules())
        if conv and model_device(template).type == "cpu":
            chunk_size = 1
    if chunk_size is None:
        per_point = sum(v.numel() * v.element_size() for v in states[0].values())
        chunk_size = int(max(1, min(_MAX_CHUNK, _PARAM_BUDGET_BYTES // max(per_point, 1))))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [slice(i, min(i + chunk_size, n_points)) for i in range(0, n_points, chunk_size)]


class _SharedFirstLayer:
    """Compute a Sequential model's first (linear) layer once per anchor instead of once per point.

    A Linear or Conv layer's output is linear in its weights, so at the point ``sum_k c_k theta_k`` it is
    ``sum_k c_k layer_k(x)`` when its input ``x`` is the same for every point (only parameter-free
    modules before it, e.g. ``Flatten``). For an MLP on images the first layer holds most of the
    weights, so a curve costs ``K`` first-layer passes plus a cheap combination instead of ``P``.
    Applies to ``nn.Sequential`` models (the zoo's MLP) that keep ``Sequential.forward``.
    """

    def __init__(self, template: nn.Module, states: Sequence[dict[str, torch.Tensor]]) -> None:
        self.ok = False
        if not isinstance(template, nn.Sequential) or type(template).forward is not nn.Sequential.forward:
            return
        if template._forward_hooks or template._forward_hooks_with_kwargs or template._forward_pre_hooks_with_kwargs:
            return  # hooks on the whole model's output (or taking keyword arguments): the model runs whole
        items = list(template.named_children())
        for i, (name, module) in enumerate(items):
            if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
                continue
            if type(module) not in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) or i == len(items) - 1:
                return
            self.prefix = [m for _, m in items[:i]]
            self.first = module
            self.first_keys = {k: f"{name}.{k}" for k, _ in module.named_parameters()}
            self.rest = nn.Sequential(OrderedDict(items[i + 1 :]))
            rest_keys = set(self.rest.state_dict())
            self.rest_keys = [k for k in states[0] if k in rest_keys]
            self.anchors = [{k: st[full] for k, full in self.first_keys.items()} for st in states]
            self.hooks = list(template._forward_pre_hooks.values())
            self.template = template
            self.ok = True
            return

    def anchor_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """``(K, N, ...)``: the first layer of every anchor model on ``x``."""
        for hook in self.hooks:  # e.g. the zoo's input-shape check, or an input normalisation that returns x
            changed = hook(self.template, (x,))
            if changed is not None:
                x = changed[0] if isinstance(changed, tuple) else changed
        for module in self.prefix:
            x = module(x)
        return torch.stack([functional_call(self.first, anchor, (x,)) for anchor in self.anchors])

    def logits(self, coeffs: torch.Tensor, anchor_out: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(P, N, classes)`` for the chunk of points with weights ``coeffs`` (P, K) and stacked ``state``."""
        k = anchor_out.shape[0]
        z = (coeffs.to(anchor_out.dtype) @ anchor_out.reshape(k, -1)).reshape(-1, *anchor_out.shape[1:])
        rest_state = {key: state[key] for key in self.rest_keys}
        return vmap(lambda st, h: functional_call(self.rest, st, (h,)), in_dims=(0, 0))(rest_state, z)


class _Attacker:
    """Runs a forward pass on clean inputs, or on PGD examples against the same weights (random starts seeded once)."""

    def __init__(self, attack: PGD | None) -> None:
        self.attack = attack
        self.generator = torch.Generator().manual_seed(attack.seed) if attack is not None else None

    def __call__(self, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``run`` (inputs -> logits) on ``x``, or on its adversarial examples under the attack."""
        if self.attack is None:
            return run(x)
        return run(self.attack.perturb(run, x, y, generator=self.generator))


class _Tally:
    """Every point's running sums over the data: cross-entropy, correct predictions, confusion counts if asked."""

    def __init__(self, n_points: int, device: torch.device, confusion: bool) -> None:
        self.loss_sum = torch.zeros(n_points, dtype=torch.float64, device=device)
        self.correct = torch.zeros(n_points, dtype=torch.float64, device=device)
        self.confusion = confusion
        self.counts: torch.Tensor | None = None  # (points, classes * classes), made at the first batch

    def add_chunk(self, rows: slice, y: torch.Tensor, logits: torch.Tensor) -> None:
        """Add the logits ``(P, N, C)`` of the points ``rows`` on targets ``y``."""
        pc, n = int(logits.shape[0]), int(logits.shape[1])
        losses = F.cross_entropy(logits.reshape(pc * n, -1).float(), y.repeat(pc), reduction="none").view(pc, n)
        self.loss_sum[rows] += losses.to(torch.float64).sum(dim=1)
        self.correct[rows] += (logits.argmax(dim=-1) == y).sum(dim=1).to(torch.float64)
        if self.confusion:
            self._add_confusion(rows, y, logits)

    def add_point(self, i: int, y: torch.Tensor, logits: torch.Tensor) -> None:
        """Add the logits ``(N, C)`` of point ``i`` on targets ``y``."""
        self.loss_sum[i] += F.cross_entropy(logits.float(), y, reduction="sum").to(torch.float64)
        self.correct[i] += (logits.argmax(dim=-1) == y).sum().to(torch.float64)
        if self.confusion:
            self._add_confusion(slice(i, i + 1), y, logits.unsqueeze(0))

    def _add_confusion(self, rows: slice, y: torch.Tensor, logits: torch.Tensor) -> None:
        k = int(logits.shape[-1])
        if self.counts is None:
            self.counts = torch.zeros(self.loss_sum.shape[0], k * k, dtype=torch.int64, device=self.loss_sum.device)
        p = int(logits.shape[0])
        cells = y.unsqueeze(0) * k + logits.argmax(dim=-1)  # (P, N): flat (true, predicted) index
        cells = cells + torch.arange(p, device=cells.device).unsqueeze(1) * (k * k)  # one block per point
        self.counts[rows] += torch.bincount(cells.reshape(-1), minlength=p * k * k).view(p, k * k)

    def results(self, samples: int) -> tuple[np.ndarray, ...]:
        """Mean loss and accuracy per point (and the confusion counts ``(points, classes, classes)`` if kept)."""
        if samples == 0:
            raise ValueError("data yielded no samples; pass a non-empty data set")
        loss, acc = (self.loss_sum / samples).cpu().numpy(), (self.correct / samples).cpu().numpy()
        if not self.confusion:
            return loss, acc
        assert self.counts is not None
        k = int(round(self.counts.shape[1] ** 0.5))
        return loss, acc, self.counts.reshape(len(loss), k, k).cpu().numpy()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy in eval mode whose parameters need no gradients: the template that points' weights are loaded into."""
    template = copy.deepcopy(model).eval()
    for p in template.parameters():
        p.requires_grad_(False)
    return template


def _point_states(
    states: Sequence[dict[str, torch.Tensor]], coeffs: torch.Tensor, slices: list[slice], batched: bool
) -> list[dict[str, torch.Tensor]]:
    """The points' states: one stacked state per chunk (``batched``), else one state per point."""
    if batched:
        return [combine(states, coeffs[s]) for s in slices]
    return [{k: v[0] for k, v in combine(states, coeffs[i : i + 1]).items()} for i in range(coeffs.shape[0])]


def _chunk_logits(
    template: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, attacker: _Attacker
) -> torch.Tensor:
    """``(P, N, classes)``: the logits of a chunk's points (stacked ``state``) on ``x`` (attacked if asked)."""

    def forward(point: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return check_logits(functional_call(template, point, (inputs,)), template, "a path's points")

    n_points = next(iter(state.values())).shape[0]
    if n_points == 1:  # one point: a plain functional forward, no vmap overhead
        single = {k: v[0] for k, v in state.items()}
        return attacker(lambda z: forward(single, z), x, y).unsqueeze(0)
    if attacker.attack is None:
        return vmap(forward, in_dims=(0, None))(state, x)
    # each point attacked with its own weights: inputs (points, samples, ...)
    return attacker(lambda z: vmap(forward)(state, z), x.expand(n_points, *x.shape), y)


def _evaluate_batched(
    template: nn.Module,
    states: Sequence[dict[str, torch.Tensor]],
    coeffs: torch.Tensor,
    slices: list[slice],
    point_states: list[dict[str, torch.Tensor]],
    data: Iterable[Any],
    tally: _Tally,
    attacker: _Attacker,
    shared: _SharedFirstLayer | None,
    progress: bool,
    desc: str,
) -> int:
    """One pass over ``data`` for all points, chunk by chunk (``shared``: the first layer once per anchor).

    Returns the number of samples.
    """
    device = model_device(template)
    samples = 0
    for batch in progress_bar(data, progress, desc=desc, leave=False):
        x, y = to_model(batch_inputs(batch), template), target_vector(batch_targets(batch).to(device))
        anchor_out = shared.anchor_outputs(x) if shared is not None else None
        for s, state in zip(slices, point_states):
            rows = max(1, _POINT_ROWS // (s.stop - s.start))  # bound the working set: points x samples per step
            for lo in range(0, int(y.shape[0]), rows):
                yb = y[lo : lo + rows]
                if shared is not None:
                    logits = shared.logits(coeffs[s].to(device), anchor_out[:, lo : lo + rows], state)
                else:
                    logits = _chunk_logits(template, state, x[lo : lo + rows], yb, attacker)
                if s.start == 0:
                    check_class_targets(yb, logits[0])
                tally.add_chunk(s, yb, logits)
        samples += int(y.shape[0])
    return samples


def _evaluate_one_by_one(
    template: nn.Module,
    point_states: list[dict[str, torch.Tensor]],
    data: Iterable[Any],
    tally: _Tally,
    attacker: _Attacker,
    progress: bool,
    desc: str,
) -> int:
    """A pass over ``data`` per point, each with its own model copy. Returns the number of samples."""
    device = model_device(template)
    samples = 0
    for i in progress_bar(range(len(point_states)), progress, desc=desc, leave=False):
        model = copy.deepcopy(template)
        model.load_state_dict(point_states[i], strict=False)
        samples = 0
        for batch in data:
            x, y = to_model(batch_inputs(batch), model), target_vector(batch_targets(batch).to(device))
            logits = check_logits(attacker(model, x, y), model, "a path's points")
            check_class_targets(y, logits)
            tally.add_point(i, y, logits)
            samples += int(y.shape[0])
    return samples


def evaluate_points(
    template: nn.Module,
    states: Sequence[dict[str, torch.Tensor]],
    coeffs: torch.Tensor | np.ndarray,
    data: Iterable[Any],
    *,
    reset_bn: bool = False,
    bn_data: Iterable[Any] | None = None,
    batched: bool = True,
    chunk_size: int | None = None,
    progress: bool = True,
    desc: str = "points",
    share_first_layer: bool = True,
    attack: PGD | None = None,
    confusion: bool = False,
) -> tuple[np.ndarray, ...]:
    """Mean cross-entropy loss and accuracy on ``data`` at every point ``sum_k coeffs[p, k] * states[k]``.

    ``confusion=True`` also returns each point's confusion matrix, counts ``(points, classes, classes)``
    (rows: true class), from the same forward passes: what a widget needs to show any point of the
    grid without evaluating a model again.

    ``template`` gives the architecture (and any integer buffers); ``states`` are the anchors' floating
    state dicts. Non-finite losses are reported (NaN/inf), not raised. ``share_first_layer``: for
    Sequential models whose first parametric layer is Linear/Conv, compute it once per anchor and
    combine (exact up to float rounding; see :class:`_SharedFirstLayer`).

    ``attack`` (a :class:`ccatoolkit.zoo.adversarial.PGD`): the robust loss and accuracy instead; every
    point is attacked with its own weights (batched points: one vmapped attack for the chunk). The
    random starts are seeded by ``attack.seed``.
    """
    coeffs = torch.as_tensor(np.asarray(coeffs, dtype=np.float64))
    if coeffs.dim() != 2 or coeffs.shape[1] != len(states) or coeffs.shape[0] == 0:
        raise ValueError(f"coeffs must have shape (points, {len(states)}) with at least one point, got {tuple(coeffs.shape)}")
    template = frozen_copy(template)
    n_points = coeffs.shape[0]
    check_data(data, reiterable=not batched and n_points > 1)
    slices = _chunks(n_points, states, chunk_size, template)
    use_bn = reset_bn and has_batchnorm(template)
    if use_bn and bn_data is None:
        raise ValueError("reset_bn=True needs bn_data: pass the training data to re-estimate BatchNorm statistics")
    point_states = _point_states(states, coeffs, slices, batched)
    if use_bn:
        population_bn_statistics(template, point_states, bn_data, batched=batched, progress=progress)
    tally = _Tally(n_points, model_device(template), confusion)
    attacker = _Attacker(attack)
    with torch.no_grad():
        if batched:
            shared = _SharedFirstLayer(template, states) if share_first_layer and attack is None else None
            shared = shared if shared is not None and shared.ok else None
            samples = _evaluate_batched(template, states, coeffs, slices, point_states, data, tally, attacker,
                                        shared, progress, desc)
        else:
            samples = _evaluate_one_by_one(template, point_states, data, tally, attacker, progress, desc)
    return tally.results(samples)
