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

A functional call in ``forward`` (``F.relu(x)``, ``torch.relu``, ``x.relu()``, ``x + y``) has no
module to hook, so it is a *node point* of the model's ``torch.fx`` trace, named as torchvision
names graph nodes: the innermost module's path and the operation (``block.relu``; ``relu`` at the
top level), with ``_1``, ``_2`` for repeats, and never a name a module call already has. While
hooks on node points are attached, the model's forward runs through its traced graph with an
identity *tap* after each such node (same modules, same parameters; restored on exit).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import operator
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "FUNCTIONAL_ACTIVATIONS",
    "ACTIVATION_METHODS",
    "CapturePoint",
    "locate",
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

_F = torch.nn.functional
#: Elementwise non-linearities called as functions: their outputs are node points a space captures.
FUNCTIONAL_ACTIVATIONS = frozenset({
    _F.relu, _F.leaky_relu, _F.gelu, _F.elu, _F.selu, _F.silu, _F.mish, _F.relu6, _F.softplus, _F.hardtanh,
    _F.hardswish, _F.hardsigmoid, torch.relu, torch.tanh, torch.sigmoid, _F.tanh, _F.sigmoid,
})
#: The same called as tensor methods (``x.relu()``).
ACTIVATION_METHODS = frozenset({"relu", "relu_", "tanh", "sigmoid", "tanh_", "sigmoid_"})
# Function nodes offered by capturable_layers besides activations: residual additions.
_LISTED_FUNCTIONS = FUNCTIONAL_ACTIVATIONS | {operator.add, operator.iadd, torch.add}


@dataclass(frozen=True)
class CapturePoint:
    """Where a capture point's output comes from: call ``call`` of ``module``, or the fx ``node``."""

    name: str
    module: str | None = None
    call: int = 0
    node: str | None = None  # the traced graph's node name (a function or method call)


class _Trace:
    """A model's fx trace and the names of its capture points (module calls and function nodes)."""

    def __init__(self, model: nn.Module) -> None:
        self.graph = torch.fx.Tracer().trace(model)
        self.calls: dict[str, int] = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                self.calls[str(node.target)] = self.calls.get(str(node.target), 0) + 1
        taken = {capture_point(m, k) for m, count in self.calls.items() for k in range(count)}
        taken |= {name for name, _ in model.named_modules()}
        self.nodes: dict[str, str] = {}  # point name -> fx node name
        self.listed: list[tuple[str, str]] = []  # (point, module scope) of the activations and additions
        for node in self.graph.nodes:
            if node.op not in ("call_function", "call_method"):
                continue
            stack = node.meta.get("nn_module_stack") or {}
            scope = str(next(reversed(stack))) if stack else ""
            base = re.sub(r"_\d+$", "", node.name)
            qualified = f"{scope}.{base}" if scope else base
            point, k = qualified, 0
            while point in taken:
                k += 1
                point = f"{qualified}_{k}"
            taken.add(point)
            self.nodes[point] = node.name
            is_listed = node.target in _LISTED_FUNCTIONS if node.op == "call_function" else node.target in ACTIVATION_METHODS
            if is_listed:
                self.listed.append((point, scope))


def _trace_key(model: nn.Module) -> tuple[tuple[str, type, bool], ...]:
    """What a model's trace depends on besides its weights: every module's name, class and ``training`` flag.

    fx records ``self.training`` as the constant it was while tracing (``F.dropout(x, training=self.training)``
    or ``if self.training:`` in a forward), so a trace taken in train mode must not serve eval mode; and a
    module replaced by one of another class may be traced differently (a custom module's forward is inlined).
    """
    return tuple((name, type(module), module.training) for name, module in model.named_modules())


# model -> {trace key: trace}: one trace per combination of train/eval flags the model was captured in
_TRACES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[tuple[str, type, bool], ...], _Trace]] = (
    weakref.WeakKeyDictionary())


def _trace(model: nn.Module) -> _Trace | None:
    """The model's :class:`_Trace` in its current train/eval flags (cached while its modules are unchanged,
    see :func:`_trace_key`), None when fx cannot trace it."""
    key = _trace_key(model)
    traces = _TRACES.get(model, {})
    if key in traces:
        return traces[key]
    try:
        trace = _Trace(model)
    except Exception:  # fx raises many kinds of errors; such a model has module points only
        return None
    structure = [(name, kind) for name, kind, _ in key]
    traces = {k: t for k, t in traces.items() if [(name, kind) for name, kind, _ in k] == structure}
    traces[key] = trace  # traces of an older module structure are dropped
    _TRACES[model] = traces
    return trace


def node_point_names(model: nn.Module) -> dict[str, str]:
    """``{fx node name: capture point}`` for the function and method calls of ``model``'s trace."""
    trace = _trace(model)
    return {} if trace is None else {node: point for point, node in trace.nodes.items()}


class UnknownLayerError(KeyError, ValueError):
    """A layer name that the model does not have (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would print the message inside quotes
        return str(self.args[0]) if self.args else ""


def capturable_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs can be captured, in registration (roughly forward) order.

    Leaf modules (Linear, Conv, BatchNorm, ReLU, pools, Flatten, Identity, ...) and modules that own
    parameters themselves are listed, and functional activations and additions called in
    ``forward`` as node points (``block.relu``, see the module doc); the root and pure containers (``nn.Sequential``,
    ``nn.ModuleList``, ``nn.ModuleDict``) and blocks built only from children (a ResNet
    ``BasicBlock``, whose output is its last ReLU's) are not. A module that the forward pass calls
    several times (found by a ``torch.fx`` trace, when the model can be traced) is followed by its
    later calls, ``name_1``, ``name_2``, ... Any module name is still accepted by :func:`capture`;
    this list is what a dropdown should offer.
    """
    trace = _trace(model)
    calls = trace.calls if trace is not None else {}
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, _CONTAINERS):
            continue
        is_leaf = next(iter(module.children()), None) is None
        owns_params = next(iter(module.parameters(recurse=False)), None) is not None
        if is_leaf or owns_params:
            names += [capture_point(name, k) for k in range(max(1, calls.get(name, 1)))]
    if trace is not None:  # functional activations and additions, after the last module of their scope
        for point, scope in trace.listed:
            after = [i for i, n in enumerate(names) if scope and (n == scope or n.startswith(scope + "."))]
            names.insert(after[-1] + 1 if after else len(names), point)
    return names


def capture_point(module: str, call: int) -> str:
    """The capture-point name of call number ``call`` of ``module`` (``module`` itself for the first call)."""
    return module if call == 0 else f"{module}_{call}"


def locate(model: nn.Module, name: str, modules: Mapping[str, nn.Module] | None = None) -> CapturePoint:
    """Where capture point ``name`` of ``model`` comes from (see the module doc).

    A name that is a module is its first call; a node point of the trace is that node; ``name_k``
    is call ``k`` of module ``name``. Raises :class:`UnknownLayerError` otherwise.
    """
    modules = dict(model.named_modules()) if modules is None else modules
    if name in modules and name:
        return CapturePoint(name, module=name)
    base, sep, index = name.rpartition("_")
    module_call = bool(sep and index.isdigit() and base in modules and base and int(index) > 0)
    trace = _trace(model) if isinstance(model, nn.Module) else None
    if trace is not None and name in trace.nodes:
        return CapturePoint(name, node=trace.nodes[name])
    if module_call:
        return CapturePoint(name, module=base, call=int(index))
    close = difflib.get_close_matches(name, [m for m in modules if m], n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    valid = capturable_layers(model)
    raise UnknownLayerError(
        f"{type(model).__name__} has no layer {name!r}.{hint} "
        f"Capturable layers: {', '.join(valid) if valid else '(none)'}"
    )


def split_capture_point(model: nn.Module, name: str, modules: Mapping[str, nn.Module] | None = None) -> tuple[str, int]:
    """``(module name, call number)`` of a module capture point (a ``ValueError`` for a node point)."""
    point = locate(model, name, modules)
    if point.module is None:
        raise ValueError(f"{name!r} is a function call of the traced graph, not a module call")
    return point.module, point.call


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
        locate(model, name, modules)
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def forward_hooks(
    model: nn.Module, callbacks: Mapping[str, Callable[[nn.Module, Any, Any], None]]
) -> Iterator[None]:
    """Attach ``callbacks[point](module, inputs, output)`` for each capture point; remove them all on exit.

    ``point`` is a module name or ``name_k`` (call ``k`` of a module called several times per forward
    pass: calls are counted from the start of each forward pass of ``model``). Callbacks must not
    return a value (outputs are never replaced). Hooks are removed even when registering one of them
    or the body of the ``with`` block raises. A ``copy.deepcopy`` of the model made inside the block is
    a plain copy: without these hooks, with the model's own forward.
    """
    resolve_layers(model, list(callbacks))
    modules = dict(model.named_modules())
    by_module: dict[str, dict[int, Callable[[nn.Module, Any, Any], None]]] = {}
    by_node: dict[str, Callable[[nn.Module, Any, Any], None]] = {}
    for point, fn in callbacks.items():
        where = locate(model, point, modules)
        if where.node is not None:
            by_node[where.node] = fn
        else:
            assert where.module is not None
            by_module.setdefault(where.module, {})[where.call] = fn
    calls: dict[str, int] = {}
    handles: list[tuple[str, torch.utils.hooks.RemovableHandle]] = []

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

    with _attached(model) as attached:
        try:
            handles.append(("", model.register_forward_pre_hook(reset)))
            for name, table in by_module.items():
                handles.append((name, modules[name].register_forward_hook(dispatch(name, table))))
            attached.handles.extend(handles)
            with _node_taps(model, by_node):
                yield
        finally:
            for entry in handles:
                entry[1].remove()
                if entry in attached.handles:
                    attached.handles.remove(entry)


# What the open capture contexts set on a model instance (restored when the last one closes).
_OVERRIDES = ("forward", "__deepcopy__")


class _Attached:
    """The capture contexts open on one model: their hooks, and a ``__deepcopy__`` that leaves them out.

    ``copy.deepcopy`` would copy the hooks (and the tapped forward, :class:`_Taps`) into the copy, so the
    copy would record into this capture and ignore a layer replaced in it. Instead the copy is made as
    outside any capture (``copy.deepcopy`` reads ``__deepcopy__`` from the instance first).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = weakref.ref(model)
        self.depth = 0
        self.handles: list[tuple[str, torch.utils.hooks.RemovableHandle]] = []  # (module name, hook handle)
        self.previous = {k: model.__dict__[k] for k in _OVERRIDES if k in model.__dict__}

    def deepcopy(self, memo: dict[int, Any]) -> nn.Module:
        """``copy.deepcopy(model)`` as outside the capture: its own forward, none of the capture's hooks."""
        model = self.model()
        assert model is not None  # the model holds this bound method
        saved = {k: model.__dict__.pop(k) for k in _OVERRIDES if k in model.__dict__}
        model.__dict__.update(self.previous)
        try:
            duplicate = copy.deepcopy(model, memo)
        finally:
            for k in _OVERRIDES:
                model.__dict__.pop(k, None)
            model.__dict__.update(saved)
        copies = dict(duplicate.named_modules())
        for name, handle in self.handles:  # the copied hook tables hold the same ids
            module = copies.get(name)
            if module is not None:
                for table in (module._forward_hooks, module._forward_pre_hooks):
                    table.pop(handle.id, None)
        return duplicate


_ATTACHED: weakref.WeakKeyDictionary[nn.Module, _Attached] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _attached(model: nn.Module) -> Iterator[_Attached]:
    """The model's :class:`_Attached` for the block (nested contexts share one), its ``__deepcopy__`` set."""
    attached = _ATTACHED.get(model)
    if attached is None:
        attached = _ATTACHED[model] = _Attached(model)
        model.__dict__["__deepcopy__"] = attached.deepcopy
    attached.depth += 1
    try:
        yield attached
    finally:
        attached.depth -= 1
        if attached.depth == 0:
            del _ATTACHED[model]
            for k in _OVERRIDES:
                model.__dict__.pop(k, None)
            model.__dict__.update(attached.previous)


class _Tap(nn.Identity):
    """Passes a traced function node's output on unchanged; capture callbacks hook it."""


class _Taps:
    """A model's traced graph with a :class:`_Tap` after every function node, run as its forward.

    One per model while any :func:`forward_hooks` context with node points is open (contexts nest:
    the same model may be captured for two roles at once); the model's own ``forward`` is back when
    the last one closes. Each call runs the trace of the model's current train/eval flags (traced when
    first needed; the taps, by fx node name, are shared), so dropout follows ``model.eval()`` as the
    model's own forward does.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = weakref.ref(model)
        self.taps: dict[str, _Tap] = {}  # fx node name -> its tap, in the graphs of every train/eval mode
        self.modules: dict[tuple[tuple[str, type, bool], ...], torch.fx.GraphModule] = {}
        self.depth = 0
        self.previous = model.__dict__.get("forward")
        self.module_for(model)

    def module_for(self, model: nn.Module) -> torch.fx.GraphModule:
        """The tapped graph module of ``model``'s current train/eval flags (built on first use)."""
        key = _trace_key(model)
        module = self.modules.get(key)
        if module is not None:
            return module
        trace = _trace(model)
        assert trace is not None  # node points exist only for traceable models
        graph = copy.deepcopy(trace.graph)
        module = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
        tapped = set(trace.nodes.values())
        for i, node in enumerate([n for n in graph.nodes if n.name in tapped]):
            module.add_submodule(f"_ccatoolkit_tap{i}", self.tap(node.name))
            with graph.inserting_after(node):
                out = graph.call_module(f"_ccatoolkit_tap{i}", (node,))
            node.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
        module.recompile()
        self.modules[key] = module
        return module

    def tap(self, node: str) -> _Tap:
        """The tap after fx node ``node`` (one per name, whichever mode's graph runs it)."""
        return self.taps.setdefault(node, _Tap())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward through the tapped trace of its current train/eval flags."""
        model = self.model()
        assert model is not None  # the model holds this bound method
        return self.module_for(model).forward(*args, **kwargs)


_TAPS: weakref.WeakKeyDictionary[nn.Module, _Taps] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _node_taps(model: nn.Module, callbacks: Mapping[str, Callable[[nn.Module, Any, Any], None]]) -> Iterator[None]:
    """Run ``model`` through its tapped trace while the block runs, with ``callbacks[node]`` on the taps."""
    if not callbacks:
        yield
        return
    taps = _TAPS.get(model)
    if taps is None:
        taps = _TAPS[model] = _Taps(model)
        model.forward = taps.forward  # type: ignore[method-assign]  # restored by the last exit
    else:
        taps.module_for(model)  # a nested capture in other train/eval flags: its nodes get their taps now
    taps.depth += 1
    handles = [taps.tap(node).register_forward_hook(fn) for node, fn in callbacks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        taps.depth -= 1
        if taps.depth == 0:
            del _TAPS[model]
            if taps.previous is not None:
                model.forward = taps.previous  # type: ignore[method-assign]
            else:
                model.__dict__.pop("forward", None)


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
