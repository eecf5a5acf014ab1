"""Small helpers every part of the package uses: devices, batches, eval mode, BatchNorm, architecture checks.

Nothing here depends on another module of the package, so any module may import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "BATCHNORM_TYPES",
    "default_device",
    "resolve_device",
    "model_device",
    "batch_count",
    "batch_inputs",
    "batch_targets",
    "iterate_inputs",
    "progress_bar",
    "eval_mode",
    "has_batchnorm",
    "model_signature_mismatch",
    "check_same_architecture",
]

#: The BatchNorm layers whose running statistics the package re-estimates, folds and transforms.
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# --- devices ----------------------------------------------------------------------------------------


def default_device() -> torch.device:
    """The best available device: ``cuda`` if a GPU is visible, else ``mps`` (Apple), else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> :func:`default_device`; a string or ``torch.device`` -> that device (checked)."""
    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError as err:
            raise ValueError(
                f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:0', 'mps' or None for automatic"
            ) from err
    raise TypeError(f"device must be a str, torch.device or None, got {type(device).__name__}")


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer): where work on that model runs."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


# --- batches ----------------------------------------------------------------------------------------


def batch_count(data: Iterable[Any], max_batches: int | None = None) -> int | None:
    """How many batches a pass over ``data`` (capped at ``max_batches``) yields; None when unknown (a generator)."""
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return total if max_batches is None else min(total, max_batches)


def batch_inputs(batch: Any) -> torch.Tensor:
    """The inputs of a batch: the batch itself if it is a tensor, else its first item."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return batch[0]
    raise TypeError(
        f"a batch must be a tensor of inputs or a tuple/list (inputs, targets, ...), got {type(batch).__name__}"
    )


def batch_targets(batch: Any) -> torch.Tensor:
    """The targets of a batch: the second item of a tuple/list batch."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise ValueError(
        "this batch has no targets: a batch with labels must be a tuple/list (inputs, targets, ...); "
        f"got {type(batch).__name__}"
    )


def iterate_inputs(data: Iterable[Any]) -> Iterator[torch.Tensor]:
    """Yield the inputs of every batch of ``data``."""
    for batch in data:
        yield batch_inputs(batch)


class _PlainBar:
    """What :func:`progress_bar` returns without tqdm: the iterable, with tqdm's methods as no-ops."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable: Iterable[Any], enabled: bool = True, **options: Any) -> Any:
    """``tqdm.auto.tqdm(iterable, disable=not enabled, **options)``; without tqdm, the iterable as it is.

    tqdm is optional so that the core imports with torch, numpy and scipy alone (a bare GPU image);
    either way the result iterates like ``iterable`` and has ``set_postfix`` and ``close``.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the package's dependencies
        return _PlainBar(iterable)
    return tqdm(iterable, disable=not enabled, **options)


# --- modes and layers -------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the block and restore every submodule's own flag afterwards.

    Restoring per submodule (not ``model.train(flag)``) keeps mixed states, e.g. a model whose
    BatchNorm layers were deliberately left in eval mode while the rest trains.
    """
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, flag in saved:
            module.training = flag


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has any BatchNorm layer."""
    return any(isinstance(m, BATCHNORM_TYPES) for m in model.modules())


# --- architecture ---------------------------------------------------------------------------------


def model_signature_mismatch(models: Sequence[nn.Module], names: Sequence[str] | None = None) -> str | None:
    """The first state_dict difference (key or shape) between ``models[0]`` and the others, or None.

    ``names`` label the models in the message (default ``model 0``, ``model 1``, ...).
    """
    models = list(models)
    if len(models) < 2:
        return None
    labels = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    ref = models[0].state_dict()
    for label, model in zip(labels[1:], models[1:]):
        other = model.state_dict()
        for key, tensor in ref.items():
            if key not in other:
                return f"{labels[0]} has {key!r} of shape {tuple(tensor.shape)} but {label} has no {key!r}"
            if tuple(other[key].shape) != tuple(tensor.shape):
                return f"{key!r} has shape {tuple(tensor.shape)} in {labels[0]} but {tuple(other[key].shape)} in {label}"
        extra = [k for k in other if k not in ref]
        if extra:
            return f"{label} has {extra[0]!r} of shape {tuple(other[extra[0]].shape)} but {labels[0]} has no {extra[0]!r}"
    return None


def check_same_architecture(models: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
    """Raise ``ValueError("models of different architectures: ...")`` naming the first mismatch."""
    mismatch = model_signature_mismatch(models, names)
    if mismatch is not None:
        raise ValueError(f"models of different architectures: {mismatch}")
