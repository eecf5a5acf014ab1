"""Capture intermediate activations of any ``nn.Module`` by layer name, without changing the module.

``capture(model, ["fc1", "relu1"])`` is a context manager that adds forward hooks, yields an
:class:`ActivationCache` (name -> the layer's last output, in the style of TransformerLens) and
always removes its hooks, also when the body raises. ``capturable_layers(model)`` lists the names a
layer dropdown should offer. ``forward_hooks`` is the lower-level tool that the statistics code
builds on: it attaches one callback per capture point and guarantees the same clean-up.

A *capture point* is a module name (its first call in a forward pass) or, for a module called
several times per forward pass, ``name_k`` for its call number ``k`` (counting from 0), the way
``torch.fx`` and torchvision's ``get_graph_node_names`` name repeated calls: torchvision's
ResNet blocks call one ``self.relu`` twice, giving ``layer1.0.relu`` and ``layer1.0.relu_1``.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "ActivationCache",
    "UnknownLayerError",
    "capturable_layers",
    "capture",
    "forward_hooks",
    "resolve_layers",
    "capture_point",
    "split_capture_point",
]

# Modules that only group other modules: their output is some child's output.
_CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class UnknownLayerError(KeyError, ValueError):
    """A layer name that the model does not have (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would print the message inside quotes
        return str(self.args[0]) if self.args else ""


def capturable_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs can be captured, in registration (roughly forward) order.

    Leaf modules (Linear, Conv, BatchNorm, ReLU, pools, Flatten, Identity, ...) and modules that own
    parameters themselves are listed; the root and pure containers (``nn.Sequential``,
    ``nn.ModuleList``, ``nn.ModuleDict``) and blocks built only from children (a ResNet
    ``BasicBlock``, whose output is its last ReLU's) are not. A module that the forward pass calls
    several times (found by a ``torch.fx`` trace, when the model can be traced) is followed by its
    later calls, ``name_1``, ``name_2``, ... Any module name is still accepted by :func:`capture`;
    this list is what a dropdown should offer.
    """
    calls = _call_counts(model)
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, _CONTAINERS):
            continue
        is_leaf = next(iter(module.children()), None) is None
        owns_params = next(iter(module.parameters(recurse=False)), None) is not None
        if is_leaf or owns_params:
            names += [capture_point(name, k) for k in range(max(1, calls.get(name, 1)))]
    return names


def _call_counts(model: nn.Module) -> dict[str, int]:
    """How often the traced forward pass calls each module (``{}`` when ``torch.fx`` cannot trace it)."""
    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception:  # fx raises many kinds of errors; the list then has one entry per module
        return {}
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts


def capture_point(module: str, call: int) -> str:
    """The capture-point name of call number ``call`` of ``module`` (``module`` itself for the first call)."""
    return module if call == 0 else f"{module}_{call}"


def split_capture_point(model: nn.Module, name: str, modules: Mapping[str, nn.Module] | None = None) -> tuple[str, int]:
    """``(module name, call number)`` of a capture point of ``model`` (see the module doc).

    A name that is a module is its first call; ``name_k`` is call ``k`` of module ``name`` when
    ``name`` is a module and ``name_k`` is not. Raises :class:`UnknownLayerError` otherwise.
    """
    modules = dict(model.named_modules()) if modules is None else modules
    if name in modules and name:
        return name, 0
    base, sep, index = name.rpartition("_")
    if sep and index.isdigit() and base in modules and base and int(index) > 0:
        return base, int(index)
    close = difflib.get_close_matches(name, [m for m in modules if m], n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    valid = capturable_layers(model)
    raise UnknownLayerError(
        f"{type(model).__name__} has no layer {name!r}.{hint} "
        f"Capturable layers: {', '.join(valid) if valid else '(none)'}"
    )


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """Check layer names against ``model`` and return them as a list (duplicates removed, order kept).

    Raises :class:`UnknownLayerError` naming the unknown layer, the closest valid names and the
    capturable ones.
    """
    if not isinstance(layers, str) and not isinstance(layers, Iterable):
        raise TypeError(
            f"layers must be a layer name or a list of names from capturable_layers(model), got {type(layers).__name__}"
        )
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("no layers given; pass a layer name or a list of names from capturable_layers(model)")
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {type(name).__name__}: {name!r}")
        split_capture_point(model, name, modules)
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def forward_hooks(
    model: nn.Module, callbacks: Mapping[str, Callable[[nn.Module, Any, Any], None]]
) -> Iterator[None]:
    """Attach ``callbacks[point](module, inputs, output)`` for each capture point; remove them all on exit.

    ``point`` is a module name or ``name_k`` (call ``k`` of a module called several times per forward
    pass: calls are counted from the start of each forward pass of ``model``). Callbacks must not
    return a value (outputs are never replaced). Hooks are removed even when registering one of them
    or the body of the ``with`` block raises.
    """
    resolve_layers(model, list(callbacks))
    modules = dict(model.named_modules())
    by_module: dict[str, dict[int, Callable[[nn.Module, Any, Any], None]]] = {}
    for point, fn in callbacks.items():
        module, call = split_capture_point(model, point, modules)
        by_module.setdefault(module, {})[call] = fn
    calls: dict[str, int] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def reset(_module: nn.Module, _args: Any) -> None:
        calls.clear()

    def dispatch(name: str, table: dict[int, Callable[[nn.Module, Any, Any], None]]) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            k = calls.get(name, 0)
            calls[name] = k + 1
            fn = table.get(k)
            if fn is not None:
                fn(module, args, output)

        return hook

    try:
        handles.append(model.register_forward_pre_hook(reset))
        for name, table in by_module.items():
            handles.append(modules[name].register_forward_hook(dispatch(name, table)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class ActivationCache(Mapping[str, Any]):
    """Captured activations: layer name -> that layer's output from the last forward pass.

    A read-only mapping (``cache["relu1"]``, ``list(cache)``, ``cache.items()``), filled while the
    :func:`capture` context is open. Outputs are kept as the layer returned them (a tensor, or a
    tuple of tensors), detached when ``detach=True``. Reading an output that a later in-place
    operation overwrote (e.g. an ``nn.ReLU(inplace=True)``) raises, instead of returning wrong values.
    """

    def __init__(self, layers: Sequence[str]) -> None:
        self._layers = list(layers)
        self._store: dict[str, Any] = {}
        self._versions: dict[str, list[int]] = {}

    def _record(self, name: str, output: Any, detach: bool) -> None:
        if detach:
            output = _map_tensors(output, lambda t: t.detach())
        self._store[name] = output
        self._versions[name] = [t._version for t in _tensors(output)]

    def __getitem__(self, name: str) -> Any:
        if name not in self._store:
            if name in self._layers:
                raise KeyError(f"layer {name!r} has not run yet; call the model inside the capture context first")
            raise UnknownLayerError(
                f"layer {name!r} was not captured; captured layers: {', '.join(self._layers)}"
            )
        output = self._store[name]
        if [t._version for t in _tensors(output)] != self._versions[name]:
            raise RuntimeError(
                f"the output of {name!r} was modified in place after it was captured (an in-place "
                "operation such as nn.ReLU(inplace=True) ran later); capture the later layer instead, "
                "or make that operation out-of-place"
            )
        return output

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    @property
    def layers(self) -> list[str]:
        """The layers asked for (whether or not they have run yet)."""
        return list(self._layers)

    def to(self, device: torch.device | str) -> dict[str, Any]:
        """A plain dict of the captured outputs moved to ``device``."""
        return {name: _map_tensors(self[name], lambda t: t.to(device)) for name in self}

    def __repr__(self) -> str:
        parts = []
        for name in self._layers:
            value = self._store.get(name)
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            parts.append(f"{name}: {shape if name in self._store else 'not run'}")
        return f"ActivationCache({', '.join(parts)})"


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


@contextlib.contextmanager
def capture(model: nn.Module, layers: str | Sequence[str], detach: bool = True) -> Iterator[ActivationCache]:
    """Record the outputs of the named layers while the context is open.

    >>> with capture(model, ["fc1", "relu1"]) as cache:
    ...     model(x)
    >>> cache["relu1"].shape

    The model is not changed: hooks are added on entry and removed on exit (also after an
    exception). Each name maps to the layer's output from the most recent forward pass;
    ``detach=False`` keeps the autograd graph (for gradients through captured activations).
    """
    names = resolve_layers(model, layers)
    cache = ActivationCache(names)

    def recorder(name: str) -> Callable[[nn.Module, Any, Any], None]:
        return lambda _module, _args, output: cache._record(name, output, detach)

    with forward_hooks(model, {name: recorder(name) for name in names}):
        yield cache
