"""Curves between two networks (mode connectivity): the curve, its points, and the loss along it.

A quadratic Bezier curve ``theta(t) = (1-t)^2 theta_A + 2t(1-t) theta_C + t^2 theta_B`` or a polygonal
chain ``A -> C -> B`` (bend at t = 0.5) joins two trained networks (Garipov et al. 2018). The end
points are fixed; the control point ``theta_C`` is learned (:mod:`ccatoolkit.landscape.curve_training`):
:meth:`Curve.loss` is the loss at ``theta(t)`` on one batch, differentiable with respect to the control
point only (``torch.func.functional_call``).

BatchNorm: while training, BatchNorm layers normalise with batch statistics and never update a
buffer (:func:`training_copy`); when evaluating, each point's statistics are re-estimated on training
data (``bn_data``).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from ccatoolkit._utils import has_batchnorm
from ccatoolkit.landscape.paths import alpha_grid
from ccatoolkit.landscape.points import combine, evaluate_points
from ccatoolkit.landscape.results import InterpolationResult
from ccatoolkit.merging.normalization import population_bn_statistics, use_batch_statistics
from ccatoolkit.zoo.adversarial import PGD

__all__ = ["Curve", "CurveResult", "training_copy", "curve_coefficients", "CURVE_KINDS"]

CURVE_KINDS = ("bezier", "polychain")


@dataclass
class CurveResult(InterpolationResult):
    """Loss and accuracy along a learned curve at positions ``t`` (stored in ``alphas``; 0 = A, 1 = B)."""

    kind: str = "bezier"

    @property
    def t(self) -> np.ndarray:
        return self.alphas


def curve_coefficients(kind: str, ts: Sequence[float] | np.ndarray) -> np.ndarray:
    """Weights ``(P, 3)`` on (A, control, B) of the curve's points at ``ts``."""
    t = np.asarray(ts, dtype=np.float64).reshape(-1)
    if kind == "bezier":
        return np.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2], axis=1)
    if kind == "polychain":
        first = t <= 0.5
        wa = np.where(first, 1 - 2 * t, 0.0)
        wc = np.where(first, 2 * t, 2 - 2 * t)
        wb = np.where(first, 0.0, 2 * t - 1)
        return np.stack([wa, wc, wb], axis=1)
    raise ValueError(f"unknown curve kind {kind!r}; valid kinds are: {', '.join(CURVE_KINDS)}")


@dataclass
class Curve:
    """A curve between two models: fixed end points ``start`` (A) and ``end`` (B, aligned if asked) and a control point.

    ``start``, ``end`` and ``control`` are floating state dicts (parameters and buffers); the
    control's buffers are the end points' midpoint (BatchNorm statistics are re-estimated per t).
    """

    template: nn.Module
    start: dict[str, torch.Tensor]
    end: dict[str, torch.Tensor]
    control: dict[str, torch.Tensor]
    kind: str = "bezier"
    method: str = "none"
    history: list[float] = field(default_factory=list)

    @property
    def control_point(self) -> dict[str, torch.Tensor]:
        """The trained control point's parameters (name -> tensor)."""
        names = {n for n, _ in self.template.named_parameters()}
        return {k: v for k, v in self.control.items() if k in names}

    def state_at(self, t: float) -> dict[str, torch.Tensor]:
        coeffs = curve_coefficients(self.kind, [t])
        return {k: v[0] for k, v in combine([self.start, self.control, self.end], torch.as_tensor(coeffs)).items()}

    def _model_from(self, state: dict[str, torch.Tensor]) -> nn.Module:
        model = copy.deepcopy(self.template)
        model.load_state_dict(state, strict=False)
        return model.eval()

    def model_at(self, t: float, bn_data: Iterable[Any] | None = None) -> nn.Module:
        """A new model at position ``t``; its BatchNorm statistics re-estimated on ``bn_data`` if given."""
        state = self.state_at(float(t))
        if has_batchnorm(self.template):
            if bn_data is not None:
                population_bn_statistics(self.template, [state], bn_data)
            elif 0.0 < t < 1.0:
                warnings.warn(
                    "this model has BatchNorm: pass bn_data (training data) to model_at so that the point's "
                    "statistics are re-estimated; without it they are interpolated and usually wrong",
                    stacklevel=2,
                )
        return self._model_from(state)

    def control_model(self) -> nn.Module:
        """The control point as a model (e.g. the third model of ``landscape.loss_plane(A, B, C)``)."""
        return self._model_from(dict(self.control))

    def end_models(self) -> tuple[nn.Module, nn.Module]:
        """The two end points as models (the second is B as aligned to A)."""
        return self._model_from(dict(self.start)), self._model_from(dict(self.end))

    def evaluate(
        self,
        data: Iterable[Any],
        ts: int | Sequence[float] = 11,
        bn_data: Iterable[Any] | None = None,
        batched: bool = True,
        progress: bool = True,
        label: str | None = None,
        attack: PGD | None = None,
    ) -> CurveResult:
        """Loss and accuracy along the curve at ``ts`` (a number of evenly spaced points, or positions).

        ``attack``: the robust loss and accuracy (each point attacked with its own weights).
        """
        grid = alpha_grid(ts, name="ts")
        bn = has_batchnorm(self.template)
        if bn and bn_data is None:
            raise ValueError(
                "this curve's model has BatchNorm: pass bn_data (training data) to evaluate so that every "
                "point's statistics are re-estimated"
            )
        loss, acc = evaluate_points(
            self.template, [self.start, self.control, self.end], curve_coefficients(self.kind, grid), data,
            reset_bn=bn, bn_data=bn_data, batched=batched, progress=progress, desc=f"{self.kind} curve",
            attack=attack,
        )
        name = "naive" if self.method == "none" else self.method
        name += f", {attack.describe()}" if attack is not None else ""
        return CurveResult(alphas=grid, loss=loss, accuracy=acc, label=label or f"{self.kind} ({name})",
                           method=self.method, reset_bn=bn, kind=self.kind)

    def loss(
        self, x: torch.Tensor, y: torch.Tensor, t: float, train_model: nn.Module | None = None,
        adversarial: PGD | None = None,
    ) -> torch.Tensor:
        """Cross-entropy at ``theta(t)`` on one batch, differentiable with respect to the control point only.

        ``adversarial``: on the batch's PGD adversarial examples against ``theta(t)`` (the robust loss).
        """
        model = train_model if train_model is not None else training_copy(self.template)
        coeffs = torch.as_tensor(curve_coefficients(self.kind, [t])[0], dtype=torch.float64)
        names = [n for n, _ in model.named_parameters()]
        params = {
            k: coeffs[0].item() * self.start[k] + coeffs[1].item() * self.control[k] + coeffs[2].item() * self.end[k]
            for k in names
        }
        if adversarial is not None:
            fixed = {k: v.detach() for k, v in params.items()}
            x = adversarial.perturb(lambda z: functional_call(model, fixed, (z,)), x, y)
        return F.cross_entropy(functional_call(model, params, (x,)), y)


def training_copy(template: nn.Module) -> nn.Module:
    """A copy in train mode whose BatchNorm layers use batch statistics and never write their buffers."""
    model = copy.deepcopy(template).train()
    use_batch_statistics(model, accumulate=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
