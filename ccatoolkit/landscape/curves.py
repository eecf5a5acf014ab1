"""Learned low-loss curves between two networks (mode connectivity), with and without neuron alignment.

A quadratic Bezier curve ``theta(t) = (1-t)^2 theta_A + 2t(1-t) theta_C + t^2 theta_B`` or a polygonal
chain ``A -> C -> B`` (bend at t = 0.5) joins two trained networks (Garipov et al. 2018). The end
points are fixed; the control point ``theta_C`` starts at the midpoint of A and B and is trained by
sampling ``t ~ U(0, 1)`` for every batch and descending the loss at ``theta(t)``
(``torch.func.functional_call``: gradients reach ``theta_C`` only). Tatro et al. (2020) showed that
aligning B's neurons to A's first (``align="permute"``) gives flatter, easier curves; ``align="cca"``
(CCA alignment, a step beyond the paper) is available too.

BatchNorm: while training, BatchNorm layers normalise with batch statistics and never update a
buffer; when evaluating, each point's statistics are re-estimated on training data (``bn_data``).
Trained curves are cached (``ccatoolkit.zoo.cache``) keyed by both end points' weights, the curve kind,
alignment, epochs, learning rate, seed and the training data, so a second call loads instantly.
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from ccatoolkit._utils import (
    BATCHNORM_TYPES,
    batch_inputs,
    batch_targets,
    check_finite_parameters,
    check_passes,
    check_same_architecture,
    has_batchnorm,
    model_device,
    progress_bar,
    to_model,
)
from ccatoolkit.landscape.paths import aligned_endpoint, interpolate, method_name
from ccatoolkit.landscape.points import combine, estimate_bn_statistics, evaluate_points, float_state
from ccatoolkit.landscape.results import InterpolationResult
from ccatoolkit.zoo.adversarial import PGD
from ccatoolkit.zoo.cache import load_or_create

__all__ = [
    "Curve", "CurveResult", "train_curve", "train_control", "training_copy", "compare_paths", "curve_coefficients",
    "state_digest", "CURVE_KINDS",
]

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
                estimate_bn_statistics(self.template, [state], bn_data, False, model_device(self.template), False)
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
        grid = np.linspace(0.0, 1.0, ts) if isinstance(ts, (int, np.integer)) else np.asarray(ts, dtype=np.float64)
        if grid.size == 0:
            raise ValueError("the t grid is empty; pass a number of points (e.g. ts=11) or a non-empty sequence")
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
    for m in model.modules():
        if isinstance(m, BATCHNORM_TYPES):
            m.track_running_stats = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- cache keys


def state_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tensor_digest(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = torch.as_tensor(t).detach().cpu().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _dataset_digest(h: "hashlib._Hash", dataset: Any) -> bool:
    """Digest a dataset's in-memory tensors (TensorDataset, ccatoolkit ImageDataset, torchvision, Subset)."""
    if hasattr(dataset, "dataset") and hasattr(dataset, "indices"):  # a Subset
        _tensor_digest(h, torch.as_tensor(np.asarray(dataset.indices, dtype=np.int64)))
        return _dataset_digest(h, dataset.dataset)
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        for first, second in (("images", "targets"), ("data", "targets")):
            if hasattr(dataset, first) and hasattr(dataset, second):
                tensors = (getattr(dataset, first), getattr(dataset, second))
                break
    if tensors is None:
        return False
    h.update(f"{type(dataset).__name__}|{len(dataset)}|augment={getattr(dataset, 'augment', None)}|".encode())
    for attr in ("mean", "std"):
        if isinstance(getattr(dataset, attr, None), torch.Tensor):
            _tensor_digest(h, getattr(dataset, attr))
    for t in tensors:
        _tensor_digest(h, torch.as_tensor(np.asarray(t)) if not isinstance(t, torch.Tensor) else t)
    return True


def describe_data(data: Iterable[Any]) -> str:
    """A digest of a data set for cache keys: the dataset's tensors where reachable, else its batches' bytes."""
    h = hashlib.sha256()
    dataset = getattr(data, "dataset", None)
    if dataset is not None:
        h.update(f"loader|batch_size={getattr(data, 'batch_size', None)}|".encode())
        if _dataset_digest(h, dataset):
            return h.hexdigest()
    for batch in data:  # a plain iterable (e.g. a list of batches)
        for t in batch if isinstance(batch, (tuple, list)) else (batch,):
            _tensor_digest(h, t)
    return h.hexdigest()


# --------------------------------------------------------------------------- training


def train_control(
    template: nn.Module,
    start: dict[str, torch.Tensor],
    end: dict[str, torch.Tensor],
    kind: str,
    data: Iterable[Any],
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    seed: int,
    progress: bool,
    control_init: dict[str, torch.Tensor] | None = None,
    adversarial: PGD | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train a curve's control point (from ``control_init``, default the end points' midpoint).

    Returns the control point and the mean training loss of each epoch (on PGD examples with ``adversarial``).
    """
    device = model_device(template)
    model = training_copy(template)
    names = [n for n, _ in model.named_parameters()]
    if control_init is None:
        control = {k: ((start[k] + end[k]) / 2).detach().clone() for k in start}
    else:
        control = {k: control_init[k].detach().clone() for k in start}
    leaves = {k: control[k].clone().requires_grad_(True) for k in names}
    curve = Curve(template=template, start=start, end=end, control={**control, **leaves}, kind=kind)
    optimizer = torch.optim.SGD(list(leaves.values()), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n_batches = len(data) if hasattr(data, "__len__") else None
    total_steps = max(1, epochs * n_batches) if n_batches else None
    history: list[float] = []
    step = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        for epoch in progress_bar(range(epochs), progress, desc=f"training {kind} curve"):
            running, count = 0.0, 0
            for batch in data:
                x, y = to_model(batch_inputs(batch), template), batch_targets(batch).to(device)
                if total_steps:  # cosine decay of the learning rate over all steps
                    for group in optimizer.param_groups:
                        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
                t = float(torch.rand(1, generator=gen))
                loss = curve.loss(x, y, t, train_model=model, adversarial=adversarial)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running += float(loss.detach()) * int(y.shape[0])
                count += int(y.shape[0])
                step += 1
            history.append(running / max(count, 1))
    control.update({k: v.detach().clone() for k, v in leaves.items()})
    return control, history


def train_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    kind: str = "bezier",
    align: str | Callable[[nn.Module, nn.Module], nn.Module] | None = None,
    align_data: Iterable[Any] | None = None,
    epochs: int = 5,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    cache: bool = True,
    cache_dir: str | None = None,
    progress: bool = True,
    adversarial: PGD | None = None,
    **align_options: Any,
) -> Curve:
    """Train the control point of a curve from ``model_a`` to ``model_b`` (aligned to A first if ``align``) on ``data``.

    ``kind``: ``"bezier"`` (quadratic Bezier) or ``"polychain"`` (one bend at t = 0.5). ``align``: None,
    a :func:`ccatoolkit.merging.api.align_to` method name (``"permute"``, ``"cca"``, ...; activations on
    ``align_data``, default ``data``) or a callable ``(A, B) -> B'``. SGD with momentum and a cosine
    learning-rate decay, one ``t ~ U(0, 1)`` per batch. With ``cache=True`` the trained control point
    and aligned end point are stored under ``cache_dir`` and a second call with the same inputs loads them.
    The input models are not modified. ``adversarial``: train on the robust loss, the cross-entropy on
    PGD adversarial examples against ``theta(t)`` (for curves between adversarially trained models).
    The returned curve's ``history`` is the mean training loss of each epoch.
    """
    if kind not in CURVE_KINDS:
        raise ValueError(f"unknown curve kind {kind!r}; valid kinds are: {', '.join(CURVE_KINDS)}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    check_same_architecture([model_a, model_b], ["model_a", "model_b"])
    check_finite_parameters([model_a, model_b], ["model_a", "model_b"])
    check_passes([("data", data, max(epochs, 1) + 1 + (isinstance(align, str) and align_data is None)),
                  ("align_data", align_data, int(isinstance(align, str)))])
    method = method_name(align)
    device = model_device(model_a)
    template = copy.deepcopy(model_a).eval()
    for p in template.parameters():
        p.requires_grad_(False)
    start = {k: v.clone() for k, v in float_state(model_a).items()}

    def create() -> dict[str, Any]:
        if isinstance(align, str):
            align_options.setdefault("progress", progress)
        b_prime = aligned_endpoint(model_a, model_b, align, align_data if align_data is not None else data,
                                   **align_options)
        check_same_architecture([model_a, b_prime], ["model_a", "aligned model_b"])
        end = {k: v.to(device).clone() for k, v in float_state(b_prime).items()}
        control, history = train_control(template, start, end, kind, data, epochs, lr, momentum, weight_decay,
                                          seed, progress, adversarial=adversarial)
        return {
            "end": {k: v.cpu() for k, v in end.items()},
            "control": {k: v.cpu() for k, v in control.items()},
            "history": torch.tensor(history, dtype=torch.float64),
        }

    if cache and (isinstance(align, str) or align is None):  # a callable aligner has no stable cache key
        key = {
            "kind": kind, "align": method, "align_options": repr(sorted(align_options.items())),
            "model_a": state_digest(model_a), "model_b": state_digest(model_b), "epochs": int(epochs),
            "lr": float(lr), "momentum": float(momentum), "weight_decay": float(weight_decay), "seed": int(seed),
            "data": describe_data(data),
        }
        if adversarial is not None:  # clean curves keep the keys they always had
            key["adversarial"] = adversarial.key()
        def validate(value: Any) -> None:
            for part in ("end", "control"):
                shapes = {k: tuple(v.shape) for k, v in value[part].items()}
                if shapes != {k: tuple(v.shape) for k, v in start.items()}:
                    raise ValueError(f"the cached curve's {part} does not fit model_a's parameters")

        stored = load_or_create("curve", key, create, cache_dir=cache_dir, validate=validate)
    else:
        stored = create()
    history = [float(v) for v in torch.as_tensor(stored["history"]).tolist()]
    return Curve(
        template=template, start=start,
        end={k: v.to(device) for k, v in stored["end"].items()},
        control={k: v.to(device) for k, v in stored["control"].items()},
        kind=kind, method=method, history=history,
    )


def compare_paths(
    model_a: nn.Module,
    model_b: nn.Module,
    train_data: Iterable[Any],
    test_data: Iterable[Any],
    aligns: Sequence[str | Callable[[nn.Module, nn.Module], nn.Module] | None] = (None, "permute", "cca"),
    kind: str = "bezier",
    ts: int | Sequence[float] = 11,
    epochs: int = 5,
    lr: float = 0.05,
    seed: int = 0,
    align_data: Iterable[Any] | None = None,
    cache: bool = True,
    cache_dir: str | None = None,
    batched: bool = True,
    progress: bool = True,
    attack: PGD | None = None,
    adversarial: PGD | None = None,
    **align_options: Any,
) -> list[InterpolationResult]:
    """For each alignment in ``aligns``: the linear path and the learned curve from A to (aligned) B, on ``test_data``.

    Returns ``[linear (naive), bezier (naive), linear (permute), bezier (permute), ...]`` results (loss and
    accuracy along t), ready for ``plots.landscape.plot_curve_paths``. BatchNorm statistics are
    re-estimated per point on ``train_data``; alignments use ``align_data`` (default ``train_data``).
    ``attack``: both paths evaluated under this PGD attack (robust loss and accuracy); ``adversarial``:
    the curves trained on the robust loss (see :func:`train_curve`).
    """
    bn = has_batchnorm(model_a)
    grid = np.linspace(0.0, 1.0, ts) if isinstance(ts, (int, np.integer)) else np.asarray(ts, dtype=np.float64)
    results: list[InterpolationResult] = []
    for align in aligns:
        curve = train_curve(
            model_a, model_b, train_data, kind=kind, align=align, align_data=align_data, epochs=epochs, lr=lr,
            seed=seed, cache=cache, cache_dir=cache_dir, progress=progress, adversarial=adversarial, **align_options,
        )
        name = "naive" if align is None else curve.method
        _, b_prime = curve.end_models()
        linear = interpolate(
            model_a, b_prime, test_data, alphas=grid, reset_bn=bn, bn_data=train_data if bn else None,
            batched=batched, progress=progress, attack=attack,
            label=f"linear ({name}{', ' + attack.describe() if attack is not None else ''})",
        )
        linear.method = curve.method
        results.append(linear)
        results.append(curve.evaluate(test_data, ts=grid, bn_data=train_data if bn else None, batched=batched,
                                      progress=progress, attack=attack))
    return results
