"""Small helpers every part of the package uses: devices, batches, eval mode, BatchNorm, architecture checks.

Nothing here depends on another module of the package but ``distributed`` (torch alone), so any module
may import it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import itertools
import operator
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ccatoolkit import distributed

__all__ = [
    "PhaseClock",
    "BATCHNORM_TYPES",
    "LINEAR_LAYER_TYPES",
    "default_device",
    "resolve_device",
    "model_device",
    "model_dtype",
    "release_free_memory",
    "to_model",
    "check_data",
    "check_passes",
    "check_max_batches",
    "input_dtype_advice",
    "peek_first",
    "batch_count",
    "batch_inputs",
    "batch_targets",
    "progress_bar",
    "eval_mode",
    "has_batchnorm",
    "model_signature_mismatch",
    "check_same_architecture",
    "check_finite_parameters",
    "check_class_targets",
    "class_targets",
    "target_vector",
    "check_logits",
    "wrapper_advice",
]

#: The BatchNorm layers whose running statistics the package re-estimates, folds and transforms.
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: The layers that produce a space's channels as rows of a weight (what BatchNorm folds into, what REPAIR rescales).
LINEAR_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


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


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of a model's first floating parameter (or buffer): what its inputs are cast to; None if it has none."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library is another."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory(device: torch.device) -> None:
    """Give the memory of freed CPU tensors back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    The C allocator keeps freed blocks below its mmap threshold (which grows to 32 MB as large blocks are freed)
    for reuse, so after a phase that made and freed many such tensors (a ridge candidate's merge: maps, blocks
    of a classifier, a merged model) the process stays that much larger. A merge calls this before it builds a
    merged model: vgg11_bn's peak drops by 0.2-0.5 GB (docs/results.md, "Wide models on a CPU"). Nothing is
    done for an accelerator's memory, whose caching allocator is torch's own.
    """
    trim = _malloc_trim() if device.type == "cpu" else None
    if trim is not None:
        trim(0)


def to_model(x: torch.Tensor, model: nn.Module, non_blocking: bool = False) -> torch.Tensor:
    """``x`` on ``model``'s device, floating inputs cast to its floating dtype (float32 data for a float64 model).

    The one place inputs are moved to a model, so mixed dtypes never fail deep inside a layer.
    """
    dtype = model_dtype(model) if x.is_floating_point() else None
    return x.to(device=model_device(model), dtype=dtype, non_blocking=non_blocking)


# --- batches ----------------------------------------------------------------------------------------


def check_data(data: Any, what: str = "data", *, reiterable: bool = False) -> None:
    """Refuse ``data`` that would silently give a wrong answer: not an iterable, a bare tensor, or a one-shot iterator.

    Iterating a tensor yields single samples, not batches. ``reiterable``: the caller makes more than
    one pass over ``data``, which a generator or other iterator (``iter(data) is data``) cannot give;
    the second pass would find nothing. Checked without starting an iteration (no DataLoader workers).
    """
    fix = "a list of batches, e.g. [x] or [(x, y)], or a DataLoader"
    if isinstance(data, torch.Tensor):
        raise TypeError(
            f"{what} is a single tensor of shape {tuple(data.shape)}; {what} must be an iterable of batches: pass {fix}"
        )
    if data is None or not isinstance(data, Iterable):
        raise TypeError(f"{what} must be an iterable of batches ({fix}), got {type(data).__name__}")
    if reiterable and isinstance(data, Iterator):  # its __iter__ returns itself: a second pass finds it empty
        raise TypeError(
            f"{what} is a one-shot iterator ({type(data).__name__}), but this function makes several passes over it "
            f"and a second pass would find no batches; pass {fix} (e.g. list(generator))"
        )


def check_passes(uses: Sequence[tuple[str, Any, int]]) -> None:
    """:func:`check_data` for every ``(name, data, passes)`` (``data`` None skipped): data read more than once
    in all (one object given for several uses counts every use) must be re-iterable."""
    total: dict[int, int] = {}
    for _name, data, passes in uses:
        if data is not None:
            total[id(data)] = total.get(id(data), 0) + passes
    for name, data, _passes in uses:
        if data is not None:
            check_data(data, name, reiterable=total[id(data)] > 1)


def check_max_batches(value: Any, name: str = "max_batches") -> int | None:
    """``value`` as a batch (or sample) limit: None (no limit) or an integer >= 1, refused with one clear line otherwise.

    A bool (``True`` is 1 to Python), a float such as 1.5 or a string such as ``"2"`` would otherwise be
    reinterpreted or fail deep inside ``itertools.islice``; integer types of numpy are accepted.
    """
    if value is None:
        return None
    if not isinstance(value, (bool, float, str)):
        try:
            number = operator.index(value)
        except TypeError:
            number = None
        if number is not None and number >= 1:
            return number
    raise ValueError(
        f"{name} must be None (use all batches) or an integer >= 1, got {value!r} ({type(value).__name__}); "
        f"pass e.g. {name}=2"
    )


def input_dtype_advice(x: Any, model: nn.Module) -> str | None:
    """Why integer or boolean inputs (e.g. uint8 images) may not run through a floating-point ``model``, or None.

    They are not cast (:func:`to_model` casts floating inputs only): an embedding takes integer indices,
    and uint8 pixels cast as they are would be 255 times the normalised values the model was trained on.
    """
    dtype = model_dtype(model)
    if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() or dtype is None:
        return None
    return (
        f"the inputs are {x.dtype} but the model computes in {dtype}: convert them to floating point as in "
        "training (e.g. images x.float() / 255, then normalised), or use a transform such as "
        "torchvision's ToTensor() in the dataset"
    )


def peek_first(data: Iterable[Any]) -> tuple[Any, Iterable[Any]]:
    """``(first batch, data)`` without losing a batch: a one-shot iterator comes back with the first batch chained in front.

    Raises ``ValueError`` when ``data`` gives no batches.
    """
    it = iter(data)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("the data gave no batches; pass a non-empty DataLoader or iterable of batches") from None
    if it is data:
        return first, itertools.chain([first], it)
    return first, data


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

    Under ``torchrun`` only rank 0 shows bars (the others would repeat them).

    tqdm is optional so that the core imports with torch, numpy and scipy alone (a bare GPU image);
    either way the result iterates like ``iterable`` and has ``set_postfix`` and ``close``.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the package's dependencies
        return _PlainBar(iterable)
    return tqdm(iterable, disable=not enabled or distributed.rank() != 0, **options)


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


_WRAPPERS: tuple[type[nn.Module], ...] = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def wrapper_advice(model: Any, label: str = "the model") -> str | None:
    """What to pass instead of a wrapped ``model`` (``DataParallel``/``DistributedDataParallel``: ``model.module``;
    ``torch.compile``: ``model._orig_mod``), or None for a plain model.

    A wrapper's parameters are the wrapped model's under a prefix (``module.``, ``_orig_mod.``) and it
    cannot be traced, so graphs, statistics and merges need the model itself.
    """
    if isinstance(model, _WRAPPERS):
        return (f"{label} is wrapped in {type(model).__name__}; pass the model itself (model.module): "
                "the package runs it on its own device")
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return (f"{label} is compiled by torch.compile ({type(model).__name__}); pass the model itself "
                "(model._orig_mod), and compile the result if you like")
    return None


def _module_type(module: nn.Module) -> str:
    """A module's class by its qualified name (a class defined again, e.g. a re-run notebook cell, is the same)."""
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _module_type_mismatch(ref: nn.Module, other: nn.Module, labels: tuple[str, str]) -> str | None:
    """The first module (in ``ref``'s order) whose class differs between two models, or None.

    Models with equal state_dict keys may still compute different functions (an ``nn.ReLU`` where the
    other has an ``nn.Tanh``; another model class): merging them averages unrelated weights.
    """
    other_modules = dict(other.named_modules())
    for name, module in ref.named_modules():
        mine, theirs = _module_type(module), _module_type(other_modules[name]) if name in other_modules else None
        if theirs is None:
            return f"{labels[0]} has a module {name!r} ({type(module).__name__}) but {labels[1]} has none"
        if mine != theirs:
            where = f"module {name!r}" if name else "the model"
            return (f"{where} is a {type(module).__name__} ({mine}) in {labels[0]} but a "
                    f"{type(other_modules[name]).__name__} ({theirs}) in {labels[1]}; "
                    "models must be instances of one class built with the same layers")
    return None


def _signature_mismatch(models: Sequence[nn.Module], names: Sequence[str] | None) -> tuple[str, str] | None:
    """``(what differs, message)`` for the first state_dict difference, or None (see :func:`model_signature_mismatch`)."""
    models = list(models)
    if len(models) < 2:
        return None
    labels = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    ref = models[0].state_dict()
    for label, model in zip(labels[1:], models[1:]):
        other = model.state_dict()
        for key, tensor in ref.items():
            if key not in other:
                return "architectures", f"{labels[0]} has {key!r} of shape {tuple(tensor.shape)} but {label} has no {key!r}"
            if tuple(other[key].shape) != tuple(tensor.shape):
                return "architectures", (
                    f"{key!r} has shape {tuple(tensor.shape)} in {labels[0]} but {tuple(other[key].shape)} in {label}"
                )
        unmatched = [k for k in other if k not in ref]
        if unmatched:
            key = unmatched[0]
            return "architectures", f"{label} has {key!r} of shape {tuple(other[key].shape)} but {labels[0]} has no {key!r}"
        for key, tensor in ref.items():
            if other[key].dtype != tensor.dtype:
                return "dtypes", (
                    f"{key!r} is {tensor.dtype} in {labels[0]} but {other[key].dtype} in {label}; "
                    "convert the models to one dtype first, e.g. model.float()"
                )
        types = _module_type_mismatch(models[0], model, (labels[0], label))
        if types is not None:
            return "architectures", types
    return None


def model_signature_mismatch(models: Sequence[nn.Module], names: Sequence[str] | None = None) -> str | None:
    """The first difference (state_dict key, shape or dtype; module class) between ``models[0]`` and the others, or None.

    ``names`` label the models in the message (default ``model 0``, ``model 1``, ...).
    """
    found = _signature_mismatch(models, names)
    return None if found is None else found[1]


def check_same_architecture(models: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
    """Raise ``ValueError("models of different architectures: ...")`` (or ``dtypes``) naming the first mismatch.

    Besides the state_dict (keys, shapes, dtypes) the modules' classes must agree: a ReLU network and a
    Tanh network have the same keys. A model wrapped in ``DataParallel``/``DistributedDataParallel`` raises
    ``TypeError`` asking for ``model.module``, one compiled by ``torch.compile`` for ``model._orig_mod``.
    """
    models = list(models)
    labels = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    for label, model in zip(labels, models):
        advice = wrapper_advice(model, label)
        if advice is not None:
            raise TypeError(advice)
    found = _signature_mismatch(models, labels)
    if found is not None:
        raise ValueError(f"models of different {found[0]}: {found[1]}")


def check_finite_parameters(models: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` naming the model and tensor when a parameter or buffer holds NaN or Inf.

    A non-finite weight would turn every result built from the model (a merge, every point of a
    path, even alpha=0 since ``0 * nan`` is nan) into NaN without saying why.
    """
    labels = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    for label, model in zip(labels, models):
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point() or tensor.is_complex():
                if bool(torch.isfinite(tensor.sum())):
                    continue  # a finite sum means finite entries: one fast reduction (an overflow falls through)
                bad = ~torch.isfinite(tensor)
                if bool(bad.any()):
                    nans = int(torch.isnan(tensor).sum())
                    raise ValueError(
                        f"{label} has non-finite values in {key!r} ({nans} NaN, {int(bad.sum()) - nans} Inf of "
                        f"{tensor.numel()}); it probably diverged in training: retrain it or load a good checkpoint"
                    )


def check_class_targets(targets: torch.Tensor, logits: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``targets`` are integer class indices in ``[0, logits.shape[1])``.

    Cross-entropy would fail deep inside torch (or with a device-side assert on a GPU) otherwise.
    """
    classes = int(logits.shape[1]) if logits.dim() >= 2 else 0
    if logits.dim() == 2 and tuple(targets.shape) != (logits.shape[0],):
        squeeze = " (one column: y.squeeze(1))" if targets.dim() == 2 and targets.shape[1] == 1 else ""
        raise ValueError(
            f"targets must be a vector of {logits.shape[0]} class indices, one per sample, got shape "
            f"{tuple(targets.shape)}{squeeze}; one-hot targets: y.argmax(1)"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(
            f"targets must be integer class indices (torch.long), got {targets.dtype}; "
            "convert them with y.long() (one-hot targets: y.argmax(1))"
        )
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
        raise ValueError(
            f"targets must be class indices in [0, {classes}) for a model with {classes} outputs, "
            f"got values in [{int(targets.min())}, {int(targets.max())}]; check the labels or the model's num_classes"
        )


def target_vector(targets: torch.Tensor) -> torch.Tensor:
    """Targets in one column ``(N, 1)`` (labels read from a table) as the vector they hold; others as they are."""
    return targets[:, 0] if targets.dim() == 2 and targets.shape[1] == 1 else targets


def class_targets(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``targets`` as a vector of class indices for ``logits`` ``(N, classes)``, checked (:func:`check_class_targets`).

    A column ``(N, 1)`` is taken as the vector it holds (:func:`target_vector`).
    """
    if logits.dim() == 2 and targets.dim() == 2 and targets.shape[0] == logits.shape[0]:
        targets = target_vector(targets)
    check_class_targets(targets, logits)
    return targets


def check_logits(output: Any, model: nn.Module, what: str = "evaluate") -> torch.Tensor:
    """``output`` (a model's forward result) if it is a tensor of logits; a ``TypeError`` saying what it is otherwise.

    A forward returning a tuple or dict (e.g. logits and features) would fail deep inside the loss.
    """
    if isinstance(output, torch.Tensor) and output.dim() >= 1:
        return output
    if isinstance(output, torch.Tensor):
        kind = "a 0-d tensor"
    elif isinstance(output, Mapping):
        kind = f"a {type(output).__name__} with keys {list(output)[:5]}"
    elif isinstance(output, (tuple, list)):
        kind = f"a {type(output).__name__} of {len(output)} items"
    else:
        kind = f"a {type(output).__name__}"
    raise TypeError(
        f"{what} needs a model whose forward returns a tensor of logits (N, classes), but "
        f"{type(model).__name__} returned {kind}; wrap it in a module whose forward returns the logits "
        "(e.g. return self.model(x)[0], or self.model(x)['logits'] for a dict)"
    )


class PhaseClock:
    """Wall-clock seconds per phase of a merge, for ``merge_info["seconds"]``: where a slow merge spends its time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now
