"""Train a classifier (SGD with momentum and a learning-rate schedule) and evaluate it.

``train`` is the one function in the package that changes its model in place: it is meant for
the caller's own freshly built model (see :func:`ccatoolkit.zoo.trained_model` for the cached
version). Everything else leaves its input models untouched.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ccatoolkit._utils import (
    batch_inputs,
    batch_targets,
    check_class_targets,
    check_data,
    check_logits,
    class_targets,
    eval_mode,
    input_dtype_advice,
    model_device,
    progress_bar,
    resolve_device,
    to_model,
)
from ccatoolkit.zoo.adversarial import PGD

__all__ = ["train", "evaluate", "output_gap", "warn_if_near_chance", "default_lr", "lr_factor", "SCHEDULES"]

SCHEDULES: tuple[str, ...] = ("onecycle", "cosine", "constant")
# peak learning rates that work for SGD + Nesterov momentum 0.9, batch 128-512, on these models
_DEFAULT_LR = {"mlp": 0.05, "vgg11": 0.05, "resnet20": 0.2}


def default_lr(model: nn.Module) -> float:
    """The default peak learning rate for ``model`` (by its ``config['name']``; 0.05 if unknown)."""
    name = str(getattr(model, "config", {}).get("name", "")).lower()
    return _DEFAULT_LR.get(name, 0.05)


def lr_factor(schedule: str, step: int, total: int, warmup: float = 0.2) -> float:
    """Learning-rate multiplier at ``step`` of ``total`` steps.

    ``onecycle``: linear warm-up from 0 to 1 over the first ``warmup`` fraction of steps, then
    linear decay to 0. ``cosine``: half a cosine from 1 to 0. ``constant``: 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules are: {', '.join(SCHEDULES)}")
    t = min(max(step / max(total, 1), 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if t < warmup:
        return t / warmup
    return max(0.0, (1.0 - t) / (1.0 - warmup))


def _reseed(data: Any, seed: int) -> None:
    """Make a DataLoader's shuffling depend only on ``seed``."""
    if isinstance(data, DataLoader):
        generator = data.generator if data.generator is not None else getattr(data.sampler, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(int(seed))


def train(
    model: nn.Module,
    data: Iterable[Any],
    epochs: int,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "onecycle",
    label_smoothing: float = 0.0,
    nesterov: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    adversarial: PGD | None = None,
) -> nn.Module:
    """Train ``model`` in place with SGD for ``epochs`` passes over ``data``; returns the model.

    ``data`` is a DataLoader or any re-iterable collection of ``(inputs, targets)`` batches.
    ``lr`` is the peak learning rate (default: :func:`default_lr`), stepped every batch by
    ``schedule`` (:func:`lr_factor`). The run is reproducible: it calls ``torch.manual_seed(seed)``
    and re-seeds a DataLoader's shuffling generator with ``seed``. The model is moved to
    ``device`` (default: :func:`ccatoolkit._utils.default_device`) and is trained in place — this
    is the one function that changes its model; its train/eval flag is restored at the end.
    A progress bar over epochs (and a nested one over batches) shows the loss and accuracy.

    ``adversarial``: PGD adversarial training (Madry et al. 2018): every batch is replaced by its
    adversarial examples against the current model (in train mode) before the SGD step, so the
    loss and accuracy shown are on those. It costs about ``steps + 1`` times a clean epoch.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules are: {', '.join(SCHEDULES)}")
    dev = resolve_device(device)
    lr = default_lr(model) if lr is None else float(lr)
    data, steps_per_epoch = _epoch_data(data, seed)
    total = epochs * steps_per_epoch
    model.to(dev)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov and momentum > 0
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(schedule, s, total))

    was_training = model.training
    model.train()
    try:
        epoch_bar = progress_bar(range(epochs), progress, desc="train", unit="epoch")
        for epoch in epoch_bar:
            epoch_loss, epoch_accuracy = _train_epoch(model, data, steps_per_epoch, dev, optimizer, scheduler,
                                                      label_smoothing, adversarial, check_targets=epoch == 0,
                                                      progress=progress, desc=f"epoch {epoch + 1}/{epochs}")
            if not math.isfinite(epoch_loss):
                raise RuntimeError(f"training diverged: the loss is {epoch_loss} in epoch {epoch + 1}; "
                                   f"lower the learning rate (lr={lr})")
            epoch_bar.set_postfix(loss=f"{epoch_loss:.4f}", acc=f"{epoch_accuracy:.3f}")
        epoch_bar.close()
    finally:
        model.train(was_training)
    return model


def _epoch_data(data: Iterable[Any], seed: int) -> tuple[Iterable[Any], int]:
    """``data`` ready to be read once per epoch (a one-shot iterator's batches kept in a list) and its batch count.

    Seeds torch and a DataLoader's shuffling with ``seed``, so the run repeats.
    """
    check_data(data)
    torch.manual_seed(int(seed))
    _reseed(data, seed)
    if not isinstance(data, DataLoader) and not hasattr(data, "__len__"):
        data = list(data)  # a one-shot iterator: keep its batches for every epoch
    steps = len(data)  # type: ignore[arg-type]
    if steps == 0:
        raise ValueError("cannot train on empty data (no batches)")
    return data, steps


def _train_epoch(
    model: nn.Module,
    data: Iterable[Any],
    steps: int,
    dev: torch.device,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    label_smoothing: float,
    adversarial: PGD | None,
    check_targets: bool,
    progress: bool,
    desc: str,
) -> tuple[float, float]:
    """One pass of SGD steps over the ``steps`` batches of ``data`` on device ``dev``, under a progress bar ``desc``.

    Returns the epoch's mean loss and accuracy (on the adversarial examples with ``adversarial``).
    ``check_targets``: check the labels (a device sync; the same labels come back every epoch).
    """
    non_blocking = dev.type == "cuda"
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    seen = 0
    batch_bar = progress_bar(data, progress, desc=desc, unit="batch", leave=False, total=steps)
    for i, batch in enumerate(batch_bar):
        x = to_model(batch_inputs(batch), model, non_blocking=non_blocking)
        y = torch.as_tensor(batch_targets(batch)).to(dev, non_blocking=non_blocking)
        if adversarial is not None:
            x = adversarial.perturb(model, x, y)
        logits = model(x)
        if check_targets:
            check_class_targets(y, logits)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            loss_sum += loss.detach().double() * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
        seen += int(y.shape[0])
        if progress and (i % 20 == 0 or i == steps - 1):
            batch_bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}")
    batch_bar.close()
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)


@torch.no_grad()
def predict(
    model: nn.Module,
    data: Iterable[Any],
    device: str | torch.device | None = None,
    progress: bool = False,
    attack: PGD | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(targets, predictions, mean cross-entropy)`` of ``model`` on labelled ``data``, in eval mode.

    ``data`` is a DataLoader or any iterable of ``(inputs, targets)`` batches. Runs without
    gradients on the model's own device (or on ``device``, using a copy of the model if it lives
    elsewhere); every submodule's train/eval flag is restored afterwards. Targets must be integer
    class indices below the model's number of outputs (checked, with a clear error; a column ``(N, 1)``
    is read as the vector it holds). The model must return a tensor of logits; integer inputs (uint8
    images) that it cannot take are refused naming the conversion.
    ``attack``: evaluate on the attack's adversarial examples instead (robust predictions and loss;
    the random start is seeded by ``attack.seed``, so the numbers repeat).
    """
    check_data(data)
    if device is not None and resolve_device(device) != model_device(model):
        model = copy.deepcopy(model).to(resolve_device(device))
    dev = model_device(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    targets, predictions = [], []
    generator = torch.Generator().manual_seed(attack.seed) if attack is not None else None
    with eval_mode(model):
        for batch in progress_bar(data, progress, desc="evaluate", unit="batch", leave=False):
            x = to_model(batch_inputs(batch), model)
            y = torch.as_tensor(batch_targets(batch)).to(dev)
            if attack is not None:
                x = attack.perturb(model, x, y, generator=generator)
            logits = check_logits(_forward(model, x), model)
            y = class_targets(y, logits)
            loss_sum += F.cross_entropy(logits.double(), y, reduction="sum")
            targets.append(y.cpu())
            predictions.append(logits.argmax(1).cpu())
    n = sum(int(t.numel()) for t in targets)
    if n == 0:
        raise ValueError("cannot evaluate on empty data (no samples)")
    return torch.cat(targets).numpy(), torch.cat(predictions).numpy(), loss_sum.item() / n


def _forward(model: nn.Module, x: torch.Tensor) -> Any:
    """``model(x)``; a failure on integer inputs (uint8 images) is re-raised as a ``TypeError`` naming the conversion."""
    try:
        return model(x)
    except (RuntimeError, TypeError) as err:
        advice = input_dtype_advice(x, model)
        if advice is None:
            raise
        raise TypeError(f"{type(model).__name__} cannot run on these inputs ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}): {advice}") from err


def evaluate(
    model: nn.Module,
    data: Iterable[Any],
    device: str | torch.device | None = None,
    progress: bool = False,
    attack: PGD | None = None,
) -> dict[str, float | int]:
    """Accuracy and mean cross-entropy of ``model`` over ``data``: ``dict(accuracy, loss, n)`` (see :func:`predict`).

    With ``attack`` (a :class:`ccatoolkit.zoo.adversarial.PGD`) they are the robust accuracy and loss.
    """
    targets, predictions, loss = predict(model, data, device=device, progress=progress, attack=attack)
    return dict(accuracy=float((targets == predictions).mean()), loss=loss, n=int(targets.size))


@torch.no_grad()
def output_gap(model: nn.Module, other: nn.Module, data: Iterable[Any], max_batches: int | None = 1) -> float:
    """``max |f(x) - g(x)|`` over the logits of two models on the first ``max_batches`` batches of ``data`` (eval mode).

    About 0 (float rounding) when ``other`` computes the same function as ``model``, e.g. a permuted
    copy; clearly above 0 for a CCA-aligned copy, whose linear map is exact only without the ReLUs.
    """
    check_data(data)
    gap, seen = 0.0, 0
    with eval_mode(model, other):
        for batch in data:
            if max_batches is not None and seen >= max_batches:
                break
            x = batch_inputs(batch)
            diff = (model(to_model(x, model)).double().cpu() - other(to_model(x, other)).double().cpu()).abs()
            gap = max(gap, float(diff.max())) if diff.numel() else gap
            seen += 1
    if seen == 0:
        raise ValueError("output_gap got no batches; pass non-empty data")
    return gap


def warn_if_near_chance(
    accuracy: float | Mapping[str, float] | Any, num_classes: int, margin: float = 0.1
) -> list[str]:
    """Warn (``UserWarning``) when any accuracy is within ``margin`` of chance (``1 / num_classes``) or below it.

    ``accuracy`` is one number or a mapping name -> accuracy (a dict, or a pandas Series such as an
    accuracy table's column). Returns the names (``"model"`` for a single number) near chance; such
    models have learned nothing, so their merges and barriers mean nothing either. Pass the trained
    models' accuracies: a merge at chance between two good models is a result, not a warning.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    items = dict(accuracy.items()) if hasattr(accuracy, "items") else {"model": accuracy}
    chance = 1.0 / num_classes
    near = [(str(name), float(acc)) for name, acc in items.items() if float(acc) <= chance + margin]
    if near:
        listed = ", ".join(f"{name} {acc:.1%}" for name, acc in near)
        warnings.warn(
            f"accuracy within {100 * margin:g} points of chance ({chance:.0%} for {num_classes} classes) or below: "
            f"{listed}. These models have not learned the task; numbers computed from them (merges, barriers) "
            "mean nothing.",
            UserWarning, stacklevel=2,
        )
    return [name for name, _ in near]
