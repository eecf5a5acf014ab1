"""Pick the device work runs on: CUDA, then Apple MPS, then CPU (overridable everywhere)."""

from __future__ import annotations

import torch

__all__ = ["default_device", "resolve_device", "model_device"]


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


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer): where work on that model runs."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
