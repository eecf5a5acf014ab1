"""Learning a curve's control point (mode connectivity), with and without neuron alignment, cached on disk.

The control point ``theta_C`` of a :class:`~ccatoolkit.landscape.curves.Curve` starts at the midpoint
of A and B and is trained by sampling ``t ~ U(0, 1)`` for every batch and descending the loss at
``theta(t)`` (Garipov et al. 2018). Tatro et al. (2020) showed that aligning B's neurons to A's first
(``align="permute"``) gives flatter, easier curves; ``align="cca"`` (CCA alignment, a step beyond the
paper) is available too.

Trained curves are cached (:mod:`ccatoolkit.zoo.cache`) keyed by both end points' weights, the curve
kind, alignment, epochs, learning rate, seed and the training data; so is the alignment of B to A
(keyed by both models, the method, its data and options, and the alignment code), so a second call
loads both instantly.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ccatoolkit._utils import (
    batch_inputs,
    batch_targets,
    check_finite_parameters,
    check_passes,
    check_same_architecture,
    model_device,
    progress_bar,
    to_model,
)
from ccatoolkit.landscape.curves import CURVE_KINDS, Curve, training_copy
from ccatoolkit.landscape.paths import aligned_endpoint, method_name, mixes_channels, warn_if_endpoint_degraded
from ccatoolkit.landscape.points import float_state, frozen_copy
from ccatoolkit.zoo.adversarial import PGD
from ccatoolkit.zoo.cache import (
    UnkeyableDataError,
    describe_data,
    key_digest,
    load_or_create,
    source_digest,
    state_digest,
)
from ccatoolkit.zoo.training import evaluate

__all__ = ["train_curve", "train_control"]


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

    SGD with momentum and a cosine learning-rate decay over all steps, one ``t ~ U(0, 1)`` per batch.
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


def _check_arguments(
    model_a: nn.Module, model_b: nn.Module, data: Iterable[Any], kind: str, align: Any,
    align_data: Iterable[Any] | None, epochs: int,
) -> None:
    """Refuse what :func:`train_curve` cannot use, before any work: an unknown kind, negative epochs,
    models that differ in architecture or hold non-finite weights, data that cannot be read as often as needed."""
    if kind not in CURVE_KINDS:
        raise ValueError(f"unknown curve kind {kind!r}; valid kinds are: {', '.join(CURVE_KINDS)}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    check_same_architecture([model_a, model_b], ["model_a", "model_b"])
    check_finite_parameters([model_a, model_b], ["model_a", "model_b"])
    aligning = isinstance(align, str)
    alignment_passes = 1 + 2 * mixes_channels(align)  # B and B' are evaluated after a channel-mixing alignment
    check_passes([("data", data, max(epochs, 1) + 1 + (alignment_passes if aligning and align_data is None else 0)),
                  ("align_data", align_data, alignment_passes if aligning else 0)])


def _aligned_end(
    model_a: nn.Module, model_b: nn.Module, align: Any, align_data: Iterable[Any], progress: bool,
    align_options: dict[str, Any], cache: bool, cache_dir: str | None,
) -> dict[str, torch.Tensor]:
    """The curve's end: ``model_b`` aligned to ``model_a`` as ``align`` says, a floating state on A's device.

    An alignment by name is cached like the curve (:func:`_alignment_key`), so a second call reads B' instead
    of aligning again. A map that mixes channels (CCA) leaves a B' that is not B: a warning says so, on every
    call, when its accuracy on ``align_data`` is well below B's
    (:func:`~ccatoolkit.landscape.paths.warn_if_endpoint_degraded`)."""

    def create() -> dict[str, torch.Tensor]:
        options = {"progress": progress, **align_options} if isinstance(align, str) else align_options
        b_prime = aligned_endpoint(model_a, model_b, align, align_data, **options)
        check_same_architecture([model_a, b_prime], ["model_a", "aligned model_b"])
        accuracies = ([float(evaluate(m, align_data)["accuracy"]) for m in (model_b, b_prime)]
                      if mixes_channels(align) else [])
        return {"end": {k: v.detach().cpu().clone() for k, v in float_state(b_prime).items()},
                "accuracies": torch.tensor(accuracies, dtype=torch.float64)}

    key = _alignment_key(model_a, model_b, align, align_data, align_options) if cache else None
    stored = load_or_create("aligned-end", key, create, cache_dir=cache_dir) if key is not None else create()
    if len(stored["accuracies"]):
        warn_if_endpoint_degraded(*stored["accuracies"].tolist(), method=str(align), where="train_curve")
    return {k: v.to(model_device(model_a)).clone() for k, v in stored["end"].items()}


def _alignment_key(
    model_a: nn.Module, model_b: nn.Module, align: Any, align_data: Iterable[Any], align_options: dict[str, Any],
) -> dict[str, Any] | None:
    """The cache key of an alignment by name: both models' weights, the method, its data and options, the
    device, and the code that aligns (:func:`~ccatoolkit.zoo.cache.source_digest`); None (align every time)
    for no alignment, a callable, or data or options that cannot be keyed."""
    if not isinstance(align, str):
        return None
    try:
        key = {"align": align, "model_a": state_digest(model_a), "model_b": state_digest(model_b),
               "data": describe_data(align_data), "device": str(model_device(model_a)),
               "options": {k: v for k, v in align_options.items() if k != "progress"},
               "code": source_digest("merging", "analysis", "landscape")}
        key_digest(key)  # raises TypeError for options that are not JSON-able
    except (UnkeyableDataError, TypeError):
        return None
    return key


def _cache_key(
    model_a: nn.Module, end: dict[str, torch.Tensor], data: Iterable[Any], kind: str, method: str,
    adversarial: PGD | None, **training: float | int,
) -> dict[str, Any] | None:
    """A trained curve's cache key: both end points' weights (B as aligned: whatever the alignment read, its
    data, options and version, is in them), the kind, the training data and the ``training`` settings (epochs,
    lr, momentum, weight_decay, seed); None, with a warning, when the data cannot be keyed."""
    try:
        described = describe_data(data)
    except UnkeyableDataError as error:
        warnings.warn(f"train_curve does not cache this curve: {error}", RuntimeWarning, stacklevel=3)
        return None
    key = {
        "kind": kind, "align": method, "model_a": state_digest(model_a), "end": state_digest(end), **training,
        "data": described,
    }
    if adversarial is not None:  # clean curves keep the keys they always had
        key["adversarial"] = adversarial.key()
    return key


def _check_fits(stored: Any, start: dict[str, torch.Tensor]) -> None:
    """Refuse a cached curve whose end or control point has other shapes than ``start`` (model A's state)."""
    for part in ("end", "control"):
        shapes = {k: tuple(v.shape) for k, v in stored[part].items()}
        if shapes != {k: tuple(v.shape) for k, v in start.items()}:
            raise ValueError(f"the cached curve's {part} does not fit model_a's parameters")


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
    learning-rate decay, one ``t ~ U(0, 1)`` per batch (:func:`train_control`). With ``cache=True`` the
    aligned end point (an alignment by name) and the trained control point are stored under ``cache_dir``,
    and a second call with the same inputs loads them without aligning or training. The input models are not modified. ``adversarial``: train on the robust
    loss, the cross-entropy on PGD adversarial examples against ``theta(t)`` (for curves between
    adversarially trained models). The returned curve's ``history`` is the mean training loss of each epoch.
    """
    _check_arguments(model_a, model_b, data, kind, align, align_data, epochs)
    method = method_name(align)
    device = model_device(model_a)
    template = frozen_copy(model_a)
    start = {k: v.clone() for k, v in float_state(model_a).items()}

    end = _aligned_end(model_a, model_b, align, align_data if align_data is not None else data, progress,
                       align_options, cache, cache_dir)

    def create() -> dict[str, Any]:
        control, history = train_control(template, start, end, kind, data, epochs, lr, momentum, weight_decay,
                                          seed, progress, adversarial=adversarial)
        return {
            "end": {k: v.cpu() for k, v in end.items()},
            "control": {k: v.cpu() for k, v in control.items()},
            "history": torch.tensor(history, dtype=torch.float64),
        }

    key = _cache_key(model_a, end, data, kind, method, adversarial, epochs=int(epochs), lr=float(lr),
                     momentum=float(momentum), weight_decay=float(weight_decay), seed=int(seed)) if cache else None
    if key is not None:
        stored = load_or_create("curve", key, create, cache_dir=cache_dir,
                                validate=lambda value: _check_fits(value, start))
    else:
        stored = create()
    return Curve(
        template=template, start=start,
        end={k: v.to(device) for k, v in stored["end"].items()},
        control={k: v.to(device) for k, v in stored["control"].items()},
        kind=kind, method=method, history=[float(v) for v in torch.as_tensor(stored["history"]).tolist()],
    )
