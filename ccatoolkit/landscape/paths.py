"""Paths between networks: linear interpolation, the simplex through three models, 2-D loss planes.

The question these functions answer: is there a low-loss path between two networks, and does
aligning their neurons first (permutation or CCA alignment) make it flatter? Each builds the
weights of its points over a few anchor models and evaluates them with
:func:`ccatoolkit.landscape.points.evaluate_points` (batched, with per-point BatchNorm statistics).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ccatoolkit._utils import (
    check_finite_parameters,
    check_passes,
    check_same_architecture,
    has_batchnorm,
    model_device,
    progress_bar,
)
from ccatoolkit.landscape.points import evaluate_points, float_state, point_model
from ccatoolkit.landscape.results import InterpolationResult, PlaneResult, SimplexResult
from ccatoolkit.merging.api import align_to
from ccatoolkit.merging.methods import REGISTRY
from ccatoolkit.merging.normalization import MixtureRepair
from ccatoolkit.zoo.adversarial import PGD
from ccatoolkit.zoo.training import evaluate

__all__ = [
    "interpolate", "simplex", "loss_plane", "aligned_endpoint", "alpha_grid", "method_name",
    "plane_basis", "plane_coefficients",
]


# --------------------------------------------------------------------------- interpolation


def alpha_grid(alphas: int | Sequence[float] | np.ndarray, name: str = "alphas") -> np.ndarray:
    """The positions to evaluate: ``n`` evenly spaced points in [0, 1] for an int, else a 1-D sequence of numbers.

    Strings, booleans and multi-dimensional arrays are refused (they would be silently reinterpreted).
    ``name``: the argument's name in error messages (``"ts"`` along a curve).
    """
    if isinstance(alphas, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number of points or a 1-D sequence of numbers, got the bool {alphas!r}")
    if isinstance(alphas, (int, np.integer)):
        if alphas < 1:
            raise ValueError(f"{name} must be a positive number of points or a sequence, got {alphas}")
        return np.linspace(0.0, 1.0, int(alphas)) if alphas > 1 else np.zeros(1)
    if isinstance(alphas, (str, bytes)):
        raise TypeError(f"{name} must be a number of points or a 1-D sequence of numbers, got the string {alphas!r}")
    raw = np.asarray(alphas.detach().cpu() if isinstance(alphas, torch.Tensor) else alphas)
    if raw.ndim > 1:
        raise ValueError(f"{name} must be 1-D, got shape {raw.shape}; pass a flat sequence such as np.linspace(0, 1, 11)")
    if raw.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be numbers (int or float), got dtype {raw.dtype}: {alphas!r}")
    grid = raw.astype(np.float64).reshape(-1)
    if grid.size == 0:
        raise ValueError(f"the {name.rstrip('s')} grid is empty; pass a number of points (e.g. {name}=11) "
                         "or a non-empty sequence")
    if not np.isfinite(grid).all():
        raise ValueError(f"{name} must be finite numbers")
    return grid


def method_name(align: Any) -> str:
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
        return align_to(model_a, model_b, method=align, data=align_data, **align_options)
    raise TypeError(f"align must be None, a method name or a callable(model_a, model_b), got {type(align).__name__}")


#: An aligned B' this far below B's accuracy (a fraction) makes a path end at a model other than B: a warning.
ENDPOINT_TOLERANCE = 0.02


def mixes_channels(align: Any) -> bool:
    """Whether ``align`` names an alignment whose maps mix channels (CCA): not a symmetry, so B' is not B."""
    return isinstance(align, str) and str(align).lower() in {
        name for name, method in REGISTRY.items() if method.mixes_channels}


def warn_if_endpoint_degraded(b_accuracy: float, aligned_accuracy: float, method: str, where: str) -> None:
    """Warn when the aligned endpoint's accuracy on the evaluated data is more than ``ENDPOINT_TOLERANCE`` below B's."""
    if aligned_accuracy < b_accuracy - ENDPOINT_TOLERANCE:
        warnings.warn(
            f"{where}: the {method}-aligned endpoint B' reaches {aligned_accuracy:.1%} accuracy on the evaluated data "
            f"against B's {b_accuracy:.1%}. A map that mixes channels is not a symmetry of a ReLU network, so this "
            "path ends at a model worse than B: compare it with align='permute' (exact), and read its barrier "
            "against B'", RuntimeWarning, stacklevel=3)


# Long by its docstring (every option explained); the body is one straight sequence: checks, alignment, points.
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
    attack: PGD | None = None,
    confusion: bool = False,
    **align_options: Any,
) -> InterpolationResult:
    """Loss and accuracy of ``(1-a) A + a B'`` on ``data`` for each ``a`` in ``alphas``.

    ``B'`` is ``model_b`` as it is (``align=None``), or aligned to ``model_a`` first: a method name
    for :func:`ccatoolkit.merging.api.align_to` (``"permute"``, ``"permute_weight"``, ``"cca"``, ...; its
    activations are measured on ``align_data``, default ``data``) or a callable ``(A, B) -> B'``.
    All floating parameters and buffers are interpolated. ``reset_bn=True`` re-estimates BatchNorm
    statistics at every point on ``bn_data`` (needed for BatchNorm networks). ``alphas`` is a number
    of evenly spaced points in [0, 1] (ends included) or any sequence (values outside [0, 1]
    extrapolate). ``batched=False`` evaluates one model copy after another (same numbers, slower).
    ``repair=True`` applies REPAIR (Jordan et al. 2023, :func:`ccatoolkit.merging.normalization.repair`) at every
    point: its pre-activation channel means/stds are set to ``(1-a)`` A's plus ``a`` B''s, measured on
    ``bn_data`` (a per-point step, after the BatchNorm reset when ``reset_bn``); the repaired points are
    then evaluated batched.
    ``attack`` (a :class:`ccatoolkit.zoo.adversarial.PGD`): the robust loss and accuracy at every point,
    each point attacked with its own weights; the label gets the attack's description.
    ``confusion=True`` keeps every point's confusion matrix (``result.confusion``), counted in the
    same pass: a widget then shows any point of the path without evaluating it again.
    """
    grid = alpha_grid(alphas)
    check_same_architecture([model_a, model_b], ["model_a", "model_b"])
    check_finite_parameters([model_a, model_b], ["model_a", "model_b"])
    uses_bn = reset_bn and has_batchnorm(model_a)
    check_passes([
        ("data", data, (1 if batched else len(grid)) + (isinstance(align, str) and align_data is None)),
        ("align_data", align_data, int(isinstance(align, str))),
        ("bn_data", bn_data, 2 if repair else int(uses_bn)),
    ])
    method = method_name(align)
    if isinstance(align, str):
        align_options.setdefault("progress", progress)
    b_prime = aligned_endpoint(model_a, model_b, align, align_data if align_data is not None else data, **align_options)
    check_same_architecture([model_a, b_prime], ["model_a", "aligned model_b"])
    device = model_device(model_a)
    states = [float_state(model_a), {k: v.to(device) for k, v in float_state(b_prime).items()}]
    coeffs = np.stack([1.0 - grid, grid], axis=1)
    if repair:
        if bn_data is None:
            raise ValueError("repair=True needs bn_data: pass the training data to measure the channel statistics")
        states = _repaired_points(model_a, b_prime, states, coeffs, reset_bn, bn_data, progress)
        coeffs = np.eye(len(grid))
    check_end = mixes_channels(align) and attack is None and bool(np.any(grid == 1.0))
    if check_end:  # B itself as one more point of the same pass: is the path's end still B?
        states.append({k: v.to(device) for k, v in float_state(model_b).items()})
        coeffs = np.vstack([np.hstack([coeffs, np.zeros((len(coeffs), 1))]), np.eye(1, len(states), len(states) - 1)])
    loss, acc, *counts = evaluate_points(
        model_a, states, coeffs, data, reset_bn=reset_bn and not repair, bn_data=bn_data, batched=batched,
        chunk_size=chunk_size, progress=progress, desc=f"interpolate ({method})", attack=attack,
        confusion=confusion,
    )
    if check_end:
        warn_if_endpoint_degraded(float(acc[-1]), float(acc[:-1][grid == 1.0][0]), method, "interpolate")
        loss, acc, counts = loss[:-1], acc[:-1], [c[:-1] for c in counts]
    default = ("naive" if align is None else method) + (" + REPAIR" if repair else "")
    default += f", {attack.describe()}" if attack is not None else ""
    return InterpolationResult(
        alphas=grid, loss=loss, accuracy=acc, label=label or default,
        method=method, reset_bn=bool(reset_bn and has_batchnorm(model_a)), confusion=counts[0] if counts else None,
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
    repair_point = MixtureRepair([model_a, b_prime], bn_data)
    point_bn_data = bn_data if reset_bn and has_batchnorm(model_a) else None
    return [float_state(repair_point(point_model(model_a, states, row, point_bn_data), row))
            for row in progress_bar(coeffs, progress, desc="REPAIR", leave=False)]


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
    check_same_architecture(models3, list(labels))
    check_finite_parameters(models3, list(labels))
    n_points = (resolution + 1) * (resolution + 2) // 2
    check_passes([("data", data, 1 if batched else n_points),
                  ("bn_data", bn_data, int(reset_bn and has_batchnorm(models3[0])))])
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
    check_same_architecture(models, list(labels))
    check_finite_parameters(models, list(labels))
    check_passes([("data", data, 1 if batched else resolution * resolution + 3),
                  ("bn_data", bn_data, int(reset_bn and has_batchnorm(model_a)))])
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
    _warn_if_aligned_endpoint_degraded(models, list(labels), acc[n:], data)
    return PlaneResult(
        xs=xs, ys=ys, loss=loss[:n].reshape(resolution, resolution), accuracy=acc[:n].reshape(resolution, resolution),
        coords=coords, labels=tuple(labels), model_loss=loss[n:], model_accuracy=acc[n:],
        reset_bn=bool(reset_bn and has_batchnorm(model_a)),
    )


def _warn_if_aligned_endpoint_degraded(models: Sequence[nn.Module], labels: Sequence[str], accuracies: np.ndarray,
                                       data: Iterable[Any]) -> None:
    """For each plane model that :func:`~ccatoolkit.merging.api.align_to` made with a map that mixes channels,
    the warning :func:`interpolate` gives when it is more than ``ENDPOINT_TOLERANCE`` below its source model on
    ``data`` (one pass of the source; skipped when the source is gone or ``data`` is a one-shot iterator)."""
    for model, label, accuracy in zip(models, labels, accuracies):
        info = getattr(model, "aligned_from", None)
        source = getattr(info, "source", None)
        if source is None or not mixes_channels(info.method) or iter(data) is data:
            continue
        source_accuracy = float(evaluate(source, data)["accuracy"])
        warn_if_endpoint_degraded(source_accuracy, float(accuracy), info.method, f"loss_plane ({label})")
