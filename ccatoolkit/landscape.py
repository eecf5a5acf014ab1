"""Loss landscapes between networks: linear interpolation curves, barriers, 2-D planes, simplices.

The question these functions answer: is there a low-loss path between two networks, and does
aligning their neurons first (permutation or CCA alignment) make it flatter?

Every point of a curve, plane or simplex is a weighted sum of a few *anchor* models'
parameters and buffers, ``theta = sum_k c_k theta_k`` (``num_batches_tracked`` and other integer
buffers are taken from the first anchor). The points are evaluated **batched**: the stacked
parameters of a chunk of points go through ``torch.func.functional_call`` under ``torch.vmap``,
so one data batch, moved to the device once, serves every point (for an MLP the linear layers
become batched matrix products). ``batched=False`` runs the plain loop over model copies
instead; both give the same numbers to float tolerance.

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
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from ccatoolkit.data import batch_inputs, batch_targets
from ccatoolkit.device import model_device
from ccatoolkit.normalization import has_batchnorm

__all__ = [
    "InterpolationResult",
    "PlaneResult",
    "SimplexResult",
    "interpolate",
    "barrier",
    "loss_plane",
    "simplex",
    "evaluate_points",
    "check_compatible",
]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PARAM_BUDGET_BYTES = 256 * 2**20  # stacked parameters of one chunk of points
_MAX_CHUNK = 8
_POINT_ROWS = 4096  # points x samples evaluated in one vmapped step (cache-friendly on CPU)


# --------------------------------------------------------------------------- results


@dataclass
class InterpolationResult:
    """Loss and accuracy along a path between two models, at positions ``alphas`` (0 = A, 1 = B)."""

    alphas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    label: str = "linear"
    method: str = "none"
    reset_bn: bool = False

    def barrier(self, metric: str = "loss") -> float:
        """The barrier of this curve (see :func:`barrier`)."""
        return barrier(self, metric=metric)

    def values(self, metric: str = "loss") -> np.ndarray:
        """The array for ``metric`` (``"loss"`` or ``"accuracy"``)."""
        return getattr(self, _check_metric(metric))

    def plot(self, ax: Any = None, metric: str = "loss", **kwargs: Any) -> Any:
        """Draw this curve into ``ax`` (a new axis if None); returns the axis."""
        from ccatoolkit.plots.landscape import plot_interpolation

        return plot_interpolation([self], ax=ax, metric=metric, **kwargs)


@dataclass
class PlaneResult:
    """Loss and accuracy on the plane through three models (Garipov et al. 2018).

    ``xs``/``ys`` are the grid's coordinates along the orthonormal axes ``u`` (towards model B)
    and ``v`` (towards model C, orthogonalised); ``loss``/``accuracy`` have shape
    ``(len(ys), len(xs))``. ``coords`` are the three models' coordinates, ``model_loss`` and
    ``model_accuracy`` the values evaluated at exactly those points.
    """

    xs: np.ndarray
    ys: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    coords: np.ndarray  # (3, 2)
    labels: tuple[str, str, str] = ("A", "B", "C")
    model_loss: np.ndarray = field(default_factory=lambda: np.zeros(3))
    model_accuracy: np.ndarray = field(default_factory=lambda: np.zeros(3))
    reset_bn: bool = False

    def values(self, metric: str = "loss") -> np.ndarray:
        return getattr(self, _check_metric(metric))

    def plot(self, ax: Any = None, metric: str = "loss", **kwargs: Any) -> Any:
        """Contour plot with the three models marked; returns the axis."""
        from ccatoolkit.plots.landscape import plot_plane

        return plot_plane(self, ax=ax, metric=metric, **kwargs)


@dataclass
class SimplexResult:
    """Loss and accuracy on barycentric grid points ``weights`` (P, 3) of the simplex through three models."""

    weights: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    labels: tuple[str, str, str] = ("A", "B", "C")
    reset_bn: bool = False

    def values(self, metric: str = "loss") -> np.ndarray:
        return getattr(self, _check_metric(metric))

    def plot(self, ax: Any = None, metric: str = "loss", **kwargs: Any) -> Any:
        from ccatoolkit.plots.landscape import plot_simplex

        return plot_simplex(self, ax=ax, metric=metric, **kwargs)


def _check_metric(metric: str) -> str:
    if metric not in ("loss", "accuracy"):
        raise ValueError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
    return metric


# --------------------------------------------------------------------------- barrier


def barrier(
    result_or_values: InterpolationResult | Sequence[float] | np.ndarray,
    metric: str = "loss",
    alphas: Sequence[float] | np.ndarray | None = None,
) -> float:
    """The barrier along a curve: the largest gap between the curve and the straight line between its ends.

    Loss: ``max_a [L(a) - ((1-a) L(0) + a L(1))]``; accuracy: ``max_a [((1-a) acc(0) + a acc(1)) - acc(a)]``
    (Frankle et al. 2020, Entezari et al. 2022), over the grid points with ``0 <= a <= 1``. The grid must
    contain 0 and 1. ``result_or_values`` is an :class:`InterpolationResult` (or a curve result) or a
    sequence of values, then on ``alphas`` (default: evenly spaced from 0 to 1). A non-finite value
    on the path gives a non-finite barrier.
    """
    metric = _check_metric(metric)
    if isinstance(result_or_values, InterpolationResult):
        values = np.asarray(result_or_values.values(metric), dtype=np.float64)
        grid = np.asarray(result_or_values.alphas, dtype=np.float64)
    else:
        values = np.asarray(result_or_values, dtype=np.float64).reshape(-1)
        grid = np.linspace(0.0, 1.0, len(values)) if alphas is None else np.asarray(alphas, dtype=np.float64)
    if values.size == 0:
        raise ValueError("barrier needs at least the two end points, got no values")
    if grid.shape != values.shape:
        raise ValueError(f"barrier got {values.size} values but {grid.size} alphas; pass one alpha per value")
    start, end = np.flatnonzero(np.isclose(grid, 0.0)), np.flatnonzero(np.isclose(grid, 1.0))
    if start.size == 0 or end.size == 0:
        raise ValueError("the barrier is measured against the end points: the alpha grid must contain 0 and 1")
    inside = (grid >= -1e-12) & (grid <= 1 + 1e-12)
    a, v = grid[inside], values[inside]
    line = (1 - a) * values[start[0]] + a * values[end[0]]
    gap = v - line if metric == "loss" else line - v
    with np.errstate(invalid="ignore"):
        if np.isnan(gap).any():
            return float("nan")
        return float(max(0.0, np.max(gap)))


# --------------------------------------------------------------------------- model plumbing


def check_compatible(models: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` naming the first parameter/buffer where the models' architectures differ."""
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    ref = models[0].state_dict()
    for model, name in zip(models[1:], names[1:]):
        other = model.state_dict()
        for key, tensor in ref.items():
            if key not in other:
                raise ValueError(
                    f"{name} has no parameter {key!r} that {names[0]} has; paths between models need "
                    "two models of the same architecture"
                )
            if tuple(other[key].shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{name} differs from {names[0]} at parameter {key!r}: shape {tuple(other[key].shape)} vs "
                    f"{tuple(tensor.shape)}; paths between models need two models of the same architecture"
                )
        extra = [k for k in other if k not in ref]
        if extra:
            raise ValueError(
                f"{name} has parameter {extra[0]!r} that {names[0]} lacks; paths between models need "
                "two models of the same architecture"
            )


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
        self.bns = [(n, m) for n, m in self.model.named_modules() if isinstance(m, _BN_TYPES)]
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


def _estimate_bn(
    template: nn.Module,
    point_states: list[dict[str, torch.Tensor]],
    bn_data: Iterable[Any],
    batched: bool,
    device: torch.device,
    progress: bool,
) -> None:
    """Replace each point's BatchNorm running statistics by its own population statistics on ``bn_data``."""
    from tqdm.auto import tqdm

    stats = _BNStats(template)
    params_only = [{k: v for k, v in s.items() if "running_" not in k} for s in point_states]
    totals: list[list[torch.Tensor] | None] = [None] * len(point_states)
    count = [0] * len(stats.bns)
    for batch in tqdm(bn_data, desc="BatchNorm statistics", disable=not progress, leave=False):
        x = batch_inputs(batch).to(device)
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
) -> tuple[np.ndarray, np.ndarray]:
    """Mean cross-entropy loss and accuracy on ``data`` at every point ``sum_k coeffs[p, k] * states[k]``.

    ``template`` gives the architecture (and any integer buffers); ``states`` are the anchors' floating
    state dicts. Non-finite losses are reported (NaN/inf), not raised. ``share_first_layer``: for
    Sequential models whose first parametric layer is Linear/Conv, compute it once per anchor and
    combine (exact up to float rounding; see :class:`_SharedFirstLayer`).
    """
    from tqdm.auto import tqdm

    coeffs = torch.as_tensor(np.asarray(coeffs, dtype=np.float64))
    if coeffs.dim() != 2 or coeffs.shape[1] != len(states) or coeffs.shape[0] == 0:
        raise ValueError(f"coeffs must have shape (points, {len(states)}) with at least one point, got {tuple(coeffs.shape)}")
    device = model_device(template)
    template = copy.deepcopy(template).eval()
    for p in template.parameters():
        p.requires_grad_(False)
    n_points = coeffs.shape[0]
    slices = _chunks(n_points, states, chunk_size, template)
    use_bn = reset_bn and has_batchnorm(template)
    if use_bn and bn_data is None:
        raise ValueError("reset_bn=True needs bn_data: pass the training data to re-estimate BatchNorm statistics")

    if batched:
        point_states = [combine(states, coeffs[s]) for s in slices]
    else:
        point_states = [{k: v[0] for k, v in combine(states, coeffs[i : i + 1]).items()} for i in range(n_points)]
    if use_bn:
        _estimate_bn(template, point_states, bn_data, batched, device, progress)

    loss_sum = torch.zeros(n_points, dtype=torch.float64, device=device)
    correct = torch.zeros(n_points, dtype=torch.float64, device=device)
    total = 0

    def forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(template, state, (x,))

    with torch.no_grad():
        if batched:
            batched_forward = vmap(forward, in_dims=(0, None))
            shared = _SharedFirstLayer(template, states) if share_first_layer else None
            shared = shared if shared is not None and shared.ok else None
            for batch in tqdm(data, desc=desc, disable=not progress, leave=False):
                x, y = batch_inputs(batch), batch_targets(batch)
                x, y = x.to(device), y.to(device)
                anchor_out = shared.anchor_outputs(x) if shared is not None else None
                for s, state in zip(slices, point_states):
                    pc = s.stop - s.start
                    rows = max(1, _POINT_ROWS // pc)  # bound the working set: points x samples per step
                    for lo in range(0, int(y.shape[0]), rows):
                        yb = y[lo : lo + rows]
                        if shared is not None:
                            logits = shared.logits(coeffs[s].to(device), anchor_out[:, lo : lo + rows], state)
                        elif pc == 1:  # one point: a plain functional forward, no vmap overhead
                            logits = forward({k: v[0] for k, v in state.items()}, x[lo : lo + rows]).unsqueeze(0)
                        else:
                            logits = batched_forward(state, x[lo : lo + rows])
                        n = logits.shape[1]
                        losses = F.cross_entropy(
                            logits.reshape(pc * n, -1).float(), yb.repeat(pc), reduction="none"
                        ).view(pc, n)
                        loss_sum[s] += losses.to(torch.float64).sum(dim=1)
                        correct[s] += (logits.argmax(dim=-1) == yb).sum(dim=1).to(torch.float64)
                total += int(y.shape[0])
        else:
            for i in tqdm(range(n_points), desc=desc, disable=not progress, leave=False):
                model = copy.deepcopy(template)
                model.load_state_dict(point_states[i], strict=False)
                count = 0
                for batch in data:
                    x, y = batch_inputs(batch), batch_targets(batch)
                    x, y = x.to(device), y.to(device)
                    logits = model(x)
                    loss_sum[i] += F.cross_entropy(logits.float(), y, reduction="sum").to(torch.float64)
                    correct[i] += (logits.argmax(dim=-1) == y).sum().to(torch.float64)
                    count += int(y.shape[0])
                total = count
    if total == 0:
        raise ValueError("data yielded no samples; pass a non-empty data set")
    return (loss_sum / total).cpu().numpy(), (correct / total).cpu().numpy()


# --------------------------------------------------------------------------- interpolation


def _alpha_grid(alphas: int | Sequence[float] | np.ndarray) -> np.ndarray:
    if isinstance(alphas, (int, np.integer)) and not isinstance(alphas, bool):
        if alphas < 1:
            raise ValueError(f"alphas must be a positive number of points or a sequence, got {alphas}")
        return np.linspace(0.0, 1.0, int(alphas)) if alphas > 1 else np.zeros(1)
    grid = np.asarray(alphas, dtype=np.float64).reshape(-1)
    if grid.size == 0:
        raise ValueError("the alpha grid is empty; pass a number of points (e.g. alphas=11) or a non-empty sequence")
    if not np.isfinite(grid).all():
        raise ValueError("alphas must be finite numbers")
    return grid


def _method_name(align: Any) -> str:
    if align is None:
        return "none"
    if isinstance(align, str):
        return align
    return getattr(align, "__name__", type(align).__name__)


def aligned_endpoint(
    model_a: nn.Module,
    model_b: nn.Module,
    align: str | Callable[[nn.Module, nn.Module], nn.Module] | None,
    align_data: Iterable[Any] | None,
    **align_options: Any,
) -> nn.Module:
    """``model_b`` as it is (``align=None``), aligned to ``model_a`` by ``merging.align_to`` (a method name) or by ``align(model_a, model_b)``."""
    if align is None:
        return model_b
    if callable(align):
        return align(model_a, model_b)
    if isinstance(align, str):
        from ccatoolkit.merging import align_to

        return align_to(model_a, model_b, method=align, data=align_data, **align_options)
    raise TypeError(f"align must be None, a method name or a callable(model_a, model_b), got {type(align).__name__}")


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    alphas: int | Sequence[float] | np.ndarray = 11,
    align: str | Callable[[nn.Module, nn.Module], nn.Module] | None = None,
    align_data: Iterable[Any] | None = None,
    reset_bn: bool = False,
    bn_data: Iterable[Any] | None = None,
    batched: bool = True,
    progress: bool = True,
    chunk_size: int | None = None,
    label: str | None = None,
    repair: bool = False,
    **align_options: Any,
) -> InterpolationResult:
    """Loss and accuracy of ``(1-a) A + a B'`` on ``data`` for each ``a`` in ``alphas``.

    ``B'`` is ``model_b`` as it is (``align=None``), or aligned to ``model_a`` first: a method name
    for :func:`ccatoolkit.merging.align_to` (``"permute"``, ``"permute_weight"``, ``"cca"``, ...; its
    activations are measured on ``align_data``, default ``data``) or a callable ``(A, B) -> B'``.
    All floating parameters and buffers are interpolated. ``reset_bn=True`` re-estimates BatchNorm
    statistics at every point on ``bn_data`` (needed for BatchNorm networks). ``alphas`` is a number
    of evenly spaced points in [0, 1] (ends included) or any sequence (values outside [0, 1]
    extrapolate). ``batched=False`` evaluates one model copy after another (same numbers, slower).
    ``repair=True`` applies REPAIR (Jordan et al. 2023, :func:`ccatoolkit.normalization.repair`) at every
    point: its pre-activation channel means/stds are set to ``(1-a)`` A's plus ``a`` B''s, measured on
    ``bn_data`` (a per-point step, after the BatchNorm reset when ``reset_bn``); the repaired points are
    then evaluated batched.
    """
    grid = _alpha_grid(alphas)
    check_compatible([model_a, model_b], ["model_a", "model_b"])
    method = _method_name(align)
    if isinstance(align, str):
        align_options.setdefault("progress", progress)
    b_prime = aligned_endpoint(model_a, model_b, align, align_data if align_data is not None else data, **align_options)
    check_compatible([model_a, b_prime], ["model_a", "aligned model_b"])
    device = model_device(model_a)
    states = [float_state(model_a), {k: v.to(device) for k, v in float_state(b_prime).items()}]
    coeffs = np.stack([1.0 - grid, grid], axis=1)
    if repair:
        if bn_data is None:
            raise ValueError("repair=True needs bn_data: pass the training data to measure the channel statistics")
        states = _repaired_points(model_a, b_prime, states, coeffs, reset_bn, bn_data, progress)
        coeffs = np.eye(len(grid))
    loss, acc = evaluate_points(
        model_a, states, coeffs, data, reset_bn=reset_bn and not repair, bn_data=bn_data, batched=batched,
        chunk_size=chunk_size, progress=progress, desc=f"interpolate ({method})",
    )
    default = ("naive" if align is None else method) + (" + REPAIR" if repair else "")
    return InterpolationResult(
        alphas=grid, loss=loss, accuracy=acc, label=label or default,
        method=method, reset_bn=bool(reset_bn and has_batchnorm(model_a)),
    )


def _repaired_points(
    model_a: nn.Module,
    b_prime: nn.Module,
    states: list[dict[str, torch.Tensor]],
    coeffs: np.ndarray,
    reset_bn: bool,
    bn_data: Iterable[Any],
    progress: bool,
) -> list[dict[str, torch.Tensor]]:
    """Each point's state after REPAIR towards the interpolated end-point statistics (one point at a time)."""
    from tqdm.auto import tqdm

    from ccatoolkit.graph import merge_graph
    from ccatoolkit.normalization import channel_stats, repair, repair_endpoints

    graph = merge_graph(model_a)
    modules = [n for names in repair_endpoints(model_a, graph).values() for n in names]
    ends = [channel_stats(m, modules, bn_data) for m in (model_a, b_prime)]
    device = model_device(model_a)
    out: list[dict[str, torch.Tensor]] = []
    for row in tqdm(coeffs, desc="REPAIR", disable=not progress, leave=False):
        state = {k: v[0] for k, v in combine(states, torch.as_tensor(row[None, :])).items()}
        if reset_bn and has_batchnorm(model_a):
            _estimate_bn(model_a, [state], bn_data, False, device, False)
        point = copy.deepcopy(model_a).eval()
        point.load_state_dict(state, strict=False)
        wa, wb = float(row[0]), float(row[1])
        targets = {
            n: (wa * ends[0][n][0] + wb * ends[1][n][0], wa * ends[0][n][1] + wb * ends[1][n][1]) for n in modules
        }
        out.append(float_state(repair(point, None, bn_data, graph=graph, progress=False, targets=targets)))
    return out


# --------------------------------------------------------------------------- simplex


def simplex(
    models3: Sequence[nn.Module],
    data: Iterable[Any],
    resolution: int = 10,
    reset_bn: bool = False,
    bn_data: Iterable[Any] | None = None,
    batched: bool = True,
    progress: bool = True,
    labels: Sequence[str] = ("A", "B", "C"),
    chunk_size: int | None = None,
) -> SimplexResult:
    """Loss and accuracy at the barycentric grid points ``(i, j, k) / resolution`` (i + j + k = resolution) of three models."""
    if len(models3) != 3:
        raise ValueError(f"simplex needs exactly three models, got {len(models3)}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    check_compatible(models3, list(labels))
    device = model_device(models3[0])
    states = [{k: v.to(device) for k, v in float_state(m).items()} for m in models3]
    weights = np.array(
        [(i, j, resolution - i - j) for i in range(resolution, -1, -1) for j in range(resolution - i, -1, -1)],
        dtype=np.float64,
    ) / resolution
    loss, acc = evaluate_points(
        models3[0], states, weights, data, reset_bn=reset_bn, bn_data=bn_data, batched=batched,
        chunk_size=chunk_size, progress=progress, desc="simplex",
    )
    return SimplexResult(weights=weights, loss=loss, accuracy=acc, labels=tuple(labels),
                         reset_bn=bool(reset_bn and has_batchnorm(models3[0])))


# --------------------------------------------------------------------------- planes


def _param_vector(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in model.parameters() if p.is_floating_point()])


def plane_basis(model_a: nn.Module, model_b: nn.Module, model_c: nn.Module) -> tuple[float, float, float]:
    """``(|u|, c_x, |v|)``: the plane's Gram-Schmidt basis over all floating parameters.

    ``u = B - A``, ``v = (C - A) - c_x u / |u|`` with ``c_x = <C - A, u / |u|>``; B sits at
    ``(|u|, 0)`` and C at ``(c_x, |v|)``.
    """
    a, b, c = _param_vector(model_a), _param_vector(model_b), _param_vector(model_c).to(_param_vector(model_a).device)
    u = b.to(a.device) - a
    norm_u = float(u.norm())
    if norm_u == 0.0:
        raise ValueError("model_a and model_b have identical parameters; a plane needs three distinct models")
    w = c - a
    cx = float(w @ u) / norm_u
    v = w - cx * u / norm_u
    norm_v = float(v.norm())
    if norm_v <= 1e-5 * max(norm_u, float(w.norm())):  # float32 rounding of a point on the line
        raise ValueError("the three models lie on one line in weight space; pick a model_c off the line through A and B")
    return norm_u, cx, norm_v


def plane_coefficients(xy: np.ndarray, norm_u: float, cx: float, norm_v: float) -> np.ndarray:
    """Weights on (A, B, C) of the plane points ``A + x u_hat + y v_hat`` for rows ``(x, y)`` of ``xy``."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    wc = xy[:, 1] / norm_v
    wb = xy[:, 0] / norm_u - xy[:, 1] * cx / (norm_u * norm_v)
    return np.stack([1.0 - wb - wc, wb, wc], axis=1)


def loss_plane(
    model_a: nn.Module,
    model_b: nn.Module,
    model_c: nn.Module,
    data: Iterable[Any],
    resolution: int = 21,
    margin: float = 0.2,
    reset_bn: bool = False,
    bn_data: Iterable[Any] | None = None,
    batched: bool = True,
    progress: bool = True,
    labels: Sequence[str] = ("A", "B", "C"),
    chunk_size: int | None = None,
) -> PlaneResult:
    """Loss and accuracy on a ``resolution x resolution`` grid of the plane through three models (Garipov et al. 2018).

    Axes: orthonormal, by Gram-Schmidt on ``B - A`` and ``C - A`` over all floating parameters
    (buffers follow with the same weights). The grid spans the models' coordinates plus ``margin``
    times their extent on each side. Typical planes: A, aligned B and their merge; or A, B and a
    learned curve's control point.
    """
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    models = [model_a, model_b, model_c]
    check_compatible(models, list(labels))
    norm_u, cx, norm_v = plane_basis(model_a, model_b, model_c)
    coords = np.array([[0.0, 0.0], [norm_u, 0.0], [cx, norm_v]])
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = hi - lo
    xs = np.linspace(lo[0] - margin * span[0], hi[0] + margin * span[0], resolution)
    ys = np.linspace(lo[1] - margin * span[1], hi[1] + margin * span[1], resolution)
    gx, gy = np.meshgrid(xs, ys)
    xy = np.concatenate([np.stack([gx.ravel(), gy.ravel()], axis=1), coords], axis=0)
    coeffs = plane_coefficients(xy, norm_u, cx, norm_v)
    device = model_device(model_a)
    states = [{k: v.to(device) for k, v in float_state(m).items()} for m in models]
    loss, acc = evaluate_points(
        model_a, states, coeffs, data, reset_bn=reset_bn, bn_data=bn_data, batched=batched,
        chunk_size=chunk_size, progress=progress, desc="plane",
    )
    n = resolution * resolution
    return PlaneResult(
        xs=xs, ys=ys, loss=loss[:n].reshape(resolution, resolution), accuracy=acc[:n].reshape(resolution, resolution),
        coords=coords, labels=tuple(labels), model_loss=loss[n:], model_accuracy=acc[n:],
        reset_bn=bool(reset_bn and has_batchnorm(model_a)),
    )
