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
(training data), batched too: a vmapped train-mode forward whose BatchNorm layers normalise
with batch statistics returns, through hooks, the per-channel sums of each BatchNorm input;
they are accumulated in float64 into each point's population mean and (unbiased) variance.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from ccatoolkit._utils import (
    BATCHNORM_TYPES,
    batch_inputs,
    batch_targets,
    check_class_targets,
    check_data,
    check_same_architecture,
    has_batchnorm,
    model_device,
    progress_bar,
    to_model,
)
from ccatoolkit.zoo.adversarial import PGD

__all__ = [
    "float_state", "combine", "point_model", "interpolated_model", "evaluate_points", "estimate_bn_statistics",
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
        estimate_bn_statistics(template, [state], bn_data, batched=False, device=model_device(template),
                               progress=False)
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


class _BNStats:
    """Hooks on a model copy whose BatchNorm layers normalise with batch statistics and record their inputs' sums."""

    def __init__(self, template: nn.Module) -> None:
        self.model = copy.deepcopy(template)
        self.model.eval()
        self.bns = [(n, m) for n, m in self.model.named_modules() if isinstance(m, BATCHNORM_TYPES)]
        for _, m in self.bns:
            m.train()
            m.track_running_stats = False  # use batch statistics, never touch buffers
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.counts: list[int] = []
        for _, m in self.bns:
            m.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        dims = [0] + list(range(2, x.dim()))
        xd = x.to(torch.float64)
        self.records.append((xd.sum(dim=dims), (xd * xd).sum(dim=dims)))
        self.counts.append(x.numel() // x.shape[1])

    def sums(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        """Per BatchNorm layer: [sum, sum of squares] of its input over batch (and spatial) positions."""
        self.records, self.counts = [], []
        functional_call(self.model, params, (x,))
        out: list[torch.Tensor] = []
        for s, q in self.records:
            out += [s, q]
        return out


def estimate_bn_statistics(
    template: nn.Module,
    point_states: list[dict[str, torch.Tensor]],
    bn_data: Iterable[Any],
    batched: bool,
    device: torch.device,
    progress: bool,
) -> None:
    """Replace each point's BatchNorm running statistics by its own population statistics on ``bn_data``."""
    stats = _BNStats(template)
    params_only = [{k: v for k, v in s.items() if "running_" not in k} for s in point_states]
    totals: list[list[torch.Tensor] | None] = [None] * len(point_states)
    count = [0] * len(stats.bns)
    check_data(bn_data, "bn_data")
    for batch in progress_bar(bn_data, progress, desc="BatchNorm statistics", leave=False):
        x = to_model(batch_inputs(batch), template).to(device)
        for i, params in enumerate(params_only):
            with torch.no_grad():
                if batched:
                    sums = vmap(stats.sums, in_dims=(0, None))(params, x)
                else:
                    sums = stats.sums(params, x)
            totals[i] = sums if totals[i] is None else [a + b for a, b in zip(totals[i], sums)]
        count = [c + n for c, n in zip(count, stats.counts)]
    if totals[0] is None:
        raise ValueError("bn_data yielded no batches; pass training data to re-estimate BatchNorm statistics")
    for state, sums in zip(point_states, totals):
        for j, (name, _) in enumerate(stats.bns):
            n = count[j]
            mean = sums[2 * j] / n
            var = (sums[2 * j + 1] / n - mean * mean).clamp_min(0.0) * (n / max(n - 1, 1))
            prefix = f"{name}." if name else ""
            ref = state[prefix + "running_mean"]
            state[prefix + "running_mean"] = mean.to(ref.dtype)
            state[prefix + "running_var"] = var.to(ref.dtype)


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
        for hook in self.hooks:  # e.g. the zoo's input-shape check
            hook(self.template, (x,))
        for module in self.prefix:
            x = module(x)
        return torch.stack([functional_call(self.first, anchor, (x,)) for anchor in self.anchors])

    def logits(self, coeffs: torch.Tensor, anchor_out: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(P, N, classes)`` for the chunk of points with weights ``coeffs`` (P, K) and stacked ``state``."""
        k = anchor_out.shape[0]
        z = (coeffs.to(anchor_out.dtype) @ anchor_out.reshape(k, -1)).reshape(-1, *anchor_out.shape[1:])
        rest_state = {key: state[key] for key in self.rest_keys}
        return vmap(lambda st, h: functional_call(self.rest, st, (h,)), in_dims=(0, 0))(rest_state, z)


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
    device = model_device(template)
    template = copy.deepcopy(template).eval()
    for p in template.parameters():
        p.requires_grad_(False)
    n_points = coeffs.shape[0]
    check_data(data, reiterable=not batched and n_points > 1)
    slices = _chunks(n_points, states, chunk_size, template)
    use_bn = reset_bn and has_batchnorm(template)
    if use_bn and bn_data is None:
        raise ValueError("reset_bn=True needs bn_data: pass the training data to re-estimate BatchNorm statistics")

    if batched:
        point_states = [combine(states, coeffs[s]) for s in slices]
    else:
        point_states = [{k: v[0] for k, v in combine(states, coeffs[i : i + 1]).items()} for i in range(n_points)]
    if use_bn:
        estimate_bn_statistics(template, point_states, bn_data, batched, device, progress)

    loss_sum = torch.zeros(n_points, dtype=torch.float64, device=device)
    correct = torch.zeros(n_points, dtype=torch.float64, device=device)
    counts: torch.Tensor | None = None  # (points, classes * classes) confusion counts, made at the first batch
    total = 0

    def add_confusion(rows: slice, yb: torch.Tensor, logits: torch.Tensor) -> None:
        """Add the predictions ``logits`` (P, N, C) of points ``rows`` to their confusion counts."""
        nonlocal counts
        k = int(logits.shape[-1])
        if counts is None:
            counts = torch.zeros(n_points, k * k, dtype=torch.int64, device=device)
        p = int(logits.shape[0])
        cells = yb.unsqueeze(0) * k + logits.argmax(dim=-1)  # (P, N): flat (true, predicted) index
        cells = cells + torch.arange(p, device=cells.device).unsqueeze(1) * (k * k)  # one block per point
        counts[rows] += torch.bincount(cells.reshape(-1), minlength=p * k * k).view(p, k * k)

    def forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(template, state, (x,))

    generator = torch.Generator().manual_seed(attack.seed) if attack is not None else None

    def attacked(run: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``run`` (inputs -> logits) on ``x``, or on its adversarial examples under ``attack``."""
        return run(x) if attack is None else run(attack.perturb(run, x, y, generator=generator))

    with torch.no_grad():
        if batched:
            batched_forward = vmap(forward, in_dims=(0, None))
            shared = _SharedFirstLayer(template, states) if share_first_layer and attack is None else None
            shared = shared if shared is not None and shared.ok else None
            for batch in progress_bar(data, progress, desc=desc, leave=False):
                x, y = to_model(batch_inputs(batch), template), batch_targets(batch).to(device)
                anchor_out = shared.anchor_outputs(x) if shared is not None else None
                for s, state in zip(slices, point_states):
                    pc = s.stop - s.start
                    rows = max(1, _POINT_ROWS // pc)  # bound the working set: points x samples per step
                    for lo in range(0, int(y.shape[0]), rows):
                        yb = y[lo : lo + rows]
                        if shared is not None:
                            logits = shared.logits(coeffs[s].to(device), anchor_out[:, lo : lo + rows], state)
                        elif pc == 1:  # one point: a plain functional forward, no vmap overhead
                            single = {k: v[0] for k, v in state.items()}
                            logits = attacked(lambda z: forward(single, z), x[lo : lo + rows], yb).unsqueeze(0)
                        elif attack is None:
                            logits = batched_forward(state, x[lo : lo + rows])
                        else:  # each point attacked with its own weights: inputs (points, samples, ...)
                            xb = x[lo : lo + rows]
                            logits = attacked(lambda z: vmap(forward)(state, z), xb.expand(pc, *xb.shape), yb)
                        if s.start == 0:
                            check_class_targets(yb, logits[0])
                        n = logits.shape[1]
                        losses = F.cross_entropy(
                            logits.reshape(pc * n, -1).float(), yb.repeat(pc), reduction="none"
                        ).view(pc, n)
                        loss_sum[s] += losses.to(torch.float64).sum(dim=1)
                        correct[s] += (logits.argmax(dim=-1) == yb).sum(dim=1).to(torch.float64)
                        if confusion:
                            add_confusion(s, yb, logits)
                total += int(y.shape[0])
        else:
            for i in progress_bar(range(n_points), progress, desc=desc, leave=False):
                model = copy.deepcopy(template)
                model.load_state_dict(point_states[i], strict=False)
                count = 0
                for batch in data:
                    x, y = to_model(batch_inputs(batch), model), batch_targets(batch).to(device)
                    logits = attacked(model, x, y)
                    check_class_targets(y, logits)
                    loss_sum[i] += F.cross_entropy(logits.float(), y, reduction="sum").to(torch.float64)
                    correct[i] += (logits.argmax(dim=-1) == y).sum().to(torch.float64)
                    if confusion:
                        add_confusion(slice(i, i + 1), y, logits.unsqueeze(0))
                    count += int(y.shape[0])
                total = count
    if total == 0:
        raise ValueError("data yielded no samples; pass a non-empty data set")
    loss, acc = (loss_sum / total).cpu().numpy(), (correct / total).cpu().numpy()
    if not confusion:
        return loss, acc
    assert counts is not None
    k = int(round(counts.shape[1] ** 0.5))
    return loss, acc, counts.reshape(n_points, k, k).cpu().numpy()
