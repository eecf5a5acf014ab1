"""The merge graph: a model's hidden activation spaces and the weights each space's transform acts on.

A *space* is a set of channels that one linear transform acts on: the output side of the layer
that produces it (weight rows, bias, BatchNorm parameters and running statistics) and the input
side of the layers that consume it (weight columns). Tensors added together (residual
connections) share one space. :func:`merge_graph` derives the spaces from the model itself with a
``torch.fx`` symbolic trace, so zoo models and a user's own MLPs, CNNs and small residual CNNs built
from standard layers need no hand-written spec; :meth:`MergeGraph.from_spec` builds one by hand for
anything else.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["GraphError", "ParamRef", "Space", "MergeGraph", "merge_graph", "SPEC_ADVICE"]


SPEC_ADVICE = (
    "Give the spec by hand instead: build MergeGraph(spaces=[Space(name, size, capture=[...], "
    "outputs=[ParamRef(...)], inputs=[ParamRef(...)]), ...]) or call MergeGraph.from_spec(model, "
    "{space_name: dict(capture=[module names], outputs=[(param, axis), ...], "
    "inputs=[(param, axis, block), ...])})."
)


class GraphError(ValueError):
    """The merge graph of a model cannot be derived (or a hand-written spec is invalid)."""


@dataclass(frozen=True)
class ParamRef:
    """One state_dict entry that a space's transform acts on, and the axis indexing its channels."""

    name: str  # key in model.state_dict(), e.g. "features.conv1.weight"
    axis: int  # the axis that indexes the space's channels
    block: int = 1  # >1 when a Flatten turned C channels into C*block features (channel-major)


@dataclass
class Space:
    """A set of channels that one transform acts on (see the module docstring)."""

    name: str
    size: int
    capture: list[str] = field(default_factory=list)
    outputs: list[ParamRef] = field(default_factory=list)
    inputs: list[ParamRef] = field(default_factory=list)


@dataclass
class MergeGraph:
    """A model's transformable activation spaces, in forward order."""

    spaces: list[Space]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.spaces]

    def space(self, name: str) -> Space:
        """The space called ``name`` (a ``KeyError`` listing the valid names otherwise)."""
        for s in self.spaces:
            if s.name == name:
                return s
        raise KeyError(f"no space {name!r} in the merge graph; spaces are: {', '.join(self.names) or '(none)'}")

    def __iter__(self) -> Iterator[Space]:
        return iter(self.spaces)

    def __len__(self) -> int:
        return len(self.spaces)

    def describe(self) -> str:
        """A readable one-line-per-space summary (for notebooks and error messages)."""
        lines = []
        for s in self.spaces:
            outs = ", ".join(r.name for r in s.outputs)
            ins = ", ".join(r.name + (f" (block {r.block})" if r.block > 1 else "") for r in s.inputs)
            lines.append(f"{s.name} [{s.size}] capture={s.capture} outputs=[{outs}] inputs=[{ins}]")
        return "\n".join(lines)

    def validate(self, model: nn.Module) -> MergeGraph:
        """Check the graph against ``model``: parameter names, axes, sizes, capture modules.

        Raises :class:`GraphError` naming the first problem; returns ``self`` so calls chain.
        """
        state = model.state_dict()
        modules = dict(model.named_modules())
        seen_names: set[str] = set()
        seen_refs: dict[tuple[str, int], str] = {}
        for s in self.spaces:
            if s.name in seen_names:
                raise GraphError(f"two spaces are called {s.name!r}; space names must be unique")
            seen_names.add(s.name)
            if not isinstance(s.size, int) or s.size < 1:
                raise GraphError(f"space {s.name!r} has size {s.size!r}; it must be a positive integer")
            for mod in s.capture:
                if mod not in modules:
                    raise GraphError(f"space {s.name!r} captures {mod!r}, which is not a module of the model")
            for side, refs in (("output", s.outputs), ("input", s.inputs)):
                for ref in refs:
                    _check_ref(state, s, side, ref)
                    key = (ref.name, ref.axis % state[ref.name].dim())
                    if key in seen_refs:
                        raise GraphError(
                            f"{ref.name!r} axis {ref.axis} is used by both space {seen_refs[key]!r} and space "
                            f"{s.name!r}; each parameter axis may belong to one space only (shared weights "
                            "are not supported)"
                        )
                    seen_refs[key] = s.name
        return self

    @classmethod
    def from_spec(cls, model: nn.Module, spec: Mapping[str, Mapping[str, Any]]) -> MergeGraph:
        """Build and validate a graph from ``{space_name: dict(capture, outputs, inputs[, size])}``.

        ``outputs`` items are ``(param, axis)``; ``inputs`` items are ``(param, axis)`` or
        ``(param, axis, block)``. ``size`` defaults to the first output's length along its axis.
        """
        state = model.state_dict()
        spaces = []
        for name, entry in spec.items():
            if not isinstance(entry, Mapping):
                raise GraphError(f"spec for space {name!r} must be a dict, got {type(entry).__name__}")
            unknown = set(entry) - {"capture", "outputs", "inputs", "size"}
            if unknown:
                raise GraphError(
                    f"spec for space {name!r} has unknown keys {sorted(unknown)}; "
                    "valid keys are capture, outputs, inputs, size"
                )
            capture = entry.get("capture", [])
            capture = [capture] if isinstance(capture, str) else list(capture)
            outputs = [_ref_from_item(name, "outputs", item, with_block=False) for item in entry.get("outputs", [])]
            inputs = [_ref_from_item(name, "inputs", item, with_block=True) for item in entry.get("inputs", [])]
            size = entry.get("size")
            if size is None:
                if not outputs:
                    raise GraphError(f"space {name!r} has no outputs; give its 'size' explicitly")
                first = outputs[0]
                if first.name not in state:
                    _check_ref(state, Space(name, 1), "output", first)
                tensor = state[first.name]
                if not -tensor.dim() <= first.axis < tensor.dim():
                    _check_ref(state, Space(name, 1), "output", first)
                size = int(tensor.shape[first.axis])
            spaces.append(Space(name=str(name), size=int(size), capture=capture, outputs=outputs, inputs=inputs))
        return cls(spaces).validate(model)


def _ref_from_item(space: str, key: str, item: Any, with_block: bool) -> ParamRef:
    if isinstance(item, ParamRef):
        return item
    if isinstance(item, str) or not isinstance(item, Sequence) or len(item) not in ((2, 3) if with_block else (2,)):
        form = "(param, axis) or (param, axis, block)" if with_block else "(param, axis)"
        raise GraphError(f"space {space!r}: {key} items must be {form}, got {item!r}")
    name, axis, *rest = item
    block = int(rest[0]) if rest else 1
    if not isinstance(name, str) or int(axis) != axis or block < 1:
        raise GraphError(f"space {space!r}: bad {key} item {item!r} (want a parameter name, an int axis, block >= 1)")
    return ParamRef(name, int(axis), block)


def _check_ref(state: Mapping[str, torch.Tensor], space: Space, side: str, ref: ParamRef) -> None:
    if ref.name not in state:
        import difflib

        close = difflib.get_close_matches(ref.name, list(state), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise GraphError(f"space {space.name!r}: {ref.name!r} is not in the model's state_dict.{hint}")
    shape = tuple(state[ref.name].shape)
    if not -len(shape) <= ref.axis < len(shape):
        raise GraphError(
            f"space {space.name!r}: axis {ref.axis} is out of range for {ref.name!r} of shape {shape}"
        )
    if ref.block < 1 or (side == "output" and ref.block != 1):
        raise GraphError(f"space {space.name!r}: {side} {ref.name!r} has block {ref.block}; "
                         "only input-side refs may have block > 1")
    want = space.size * ref.block
    if shape[ref.axis] != want:
        detail = f"{space.size} channels x block {ref.block}" if ref.block > 1 else f"{space.size} channels"
        raise GraphError(
            f"space {space.name!r}: {side} {ref.name!r} has {shape[ref.axis]} entries along axis {ref.axis} "
            f"(shape {shape}) but the space has {detail} = {want}; the sizes are inconsistent"
        )


# ---------------------------------------------------------------------------------------------
# Deriving the graph with torch.fx
# ---------------------------------------------------------------------------------------------

_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.Mish,
    nn.ReLU6, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink, nn.Softsign, nn.LogSigmoid,
)
_PASSTHROUGH: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                             nn.AlphaDropout, nn.Identity)
_POOLS: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

_F = torch.nn.functional
_FUNCTIONAL_ACTIVATIONS = {
    _F.relu, _F.leaky_relu, _F.gelu, _F.elu, _F.selu, _F.silu, _F.mish, _F.relu6, _F.softplus, _F.hardtanh,
    _F.hardswish, _F.hardsigmoid, torch.relu, torch.tanh, torch.sigmoid, _F.tanh, _F.sigmoid,
}
_ACTIVATION_METHODS = {"relu", "relu_", "tanh", "sigmoid", "tanh_", "sigmoid_"}
_FUNCTIONAL_PASSTHROUGH = {_F.dropout, _F.dropout2d, _F.dropout1d, _F.dropout3d, _F.alpha_dropout}
_FUNCTIONAL_POOLS = {
    _F.max_pool1d, _F.max_pool2d, _F.max_pool3d, _F.avg_pool1d, _F.avg_pool2d, _F.avg_pool3d,
    _F.adaptive_avg_pool1d, _F.adaptive_avg_pool2d, _F.adaptive_avg_pool3d,
    _F.adaptive_max_pool1d, _F.adaptive_max_pool2d, _F.adaptive_max_pool3d,
}
_PASSTHROUGH_METHODS = {"contiguous", "clone", "detach", "float", "double", "half", "to", "type_as"}
_NON_TENSOR_METHODS = {"size", "dim", "numel", "ndimension", "element_size", "is_contiguous", "get_device"}
_ADDS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_SCALES = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul}


@dataclass
class _Feat:
    """Where a traced tensor's channels live: its space, flatten block and channel axis."""

    space: int
    block: int | None = 1  # None: a Flatten whose block is resolved from the consuming Linear
    ndim: int | None = None  # known when shapes were propagated
    chdim: int = 1  # 1 for conv-style (N, C, ...), -1 for Linear outputs (..., F)


class _Builder:
    """Union-find over channel spaces of the fx nodes."""

    def __init__(self, gm: torch.fx.GraphModule, has_shapes: bool) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.has_shapes = has_shapes
        self.parent: list[int] = []
        self.fixed: list[bool] = []
        self.created_at: list[int] = []
        self.feats: dict[torch.fx.Node, _Feat | None] = {}
        self.outputs: dict[int, list[ParamRef]] = {}
        self.inputs: dict[int, list[tuple[ParamRef, str]]] = {}  # (ref, consuming module) ; block maybe None
        self.activations: list[tuple[int, str, int]] = []  # (space, module name, node index)
        self.producers: list[tuple[int, str, int]] = []
        self.functional_nonlin: list[tuple[int, str]] = []
        self.unknown: list[tuple[list[int], str]] = []
        self.calls: dict[str, int] = {}
        self.index = 0
        self.input_space = self.new_space(fixed=True)

    # union-find --------------------------------------------------------------------------
    def new_space(self, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.fixed.append(fixed)
        self.created_at.append(self.index)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.created_at[rb] < self.created_at[ra]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        return ra

    # helpers ------------------------------------------------------------------------------
    def ndim(self, node: torch.fx.Node) -> int | None:
        meta = node.meta.get("tensor_meta")
        return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def shape(self, node: Any) -> tuple[int, ...] | None:
        if not isinstance(node, torch.fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def is_non_tensor(self, node: torch.fx.Node) -> bool:
        return self.has_shapes and node.meta.get("tensor_meta") is None

    def tensor_args(self, node: torch.fx.Node) -> list[_Feat]:
        found: list[_Feat] = []

        def visit(a: torch.fx.Node) -> torch.fx.Node:
            feat = self.feats.get(a)
            if feat is not None:
                found.append(feat)
            return a

        torch.fx.node.map_arg((node.args, node.kwargs), visit)
        return found

    def describe(self, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            mod = self.modules[str(node.target)]
            return f"module {node.target!r} ({type(mod).__name__})"
        if node.op == "call_method":
            return f"method .{node.target}() at node {node.name!r}"
        target = getattr(node.target, "__name__", str(node.target))
        return f"function {target}() at node {node.name!r}"

    def opaque(self, node: torch.fx.Node, reason: str = "") -> _Feat | None:
        """An operation the graph does not understand: fine on fixed spaces only (checked at the end)."""
        args = self.tensor_args(node)
        if args:
            self.unknown.append(([f.space for f in args], self.describe(node) + (f": {reason}" if reason else "")))
        if self.is_non_tensor(node):
            return None
        return _Feat(self.new_space(fixed=True), 1, self.ndim(node))

    def same(self, feat: _Feat, node: torch.fx.Node) -> _Feat:
        return _Feat(feat.space, feat.block, self.ndim(node) if self.has_shapes else feat.ndim, feat.chdim)

    def channel_first_ok(self, feat: _Feat) -> bool:
        """True when the channel axis is dim 1 (conv-style or 2-D features) and not flattened."""
        return feat.block == 1 and (feat.ndim is None or feat.ndim <= 2 or feat.chdim == 1)

    # node rules ----------------------------------------------------------------------------
    def visit(self, node: torch.fx.Node) -> None:
        self.index += 1
        op = node.op
        if op == "placeholder":
            self.feats[node] = _Feat(self.input_space, 1, self.ndim(node))
        elif op == "get_attr":
            self.feats[node] = _Feat(self.new_space(fixed=True), 1, self.ndim(node))
        elif op == "call_module":
            self.calls[str(node.target)] = self.calls.get(str(node.target), 0) + 1
            self.feats[node] = self.visit_module(node)
        elif op in ("call_function", "call_method"):
            self.feats[node] = self.visit_function(node)
        elif op == "output":
            for feat in self.tensor_args(node):
                self.union(feat.space, self.input_space)
        else:  # pragma: no cover - fx has no other ops
            self.feats[node] = self.opaque(node)

    def first_feat(self, node: torch.fx.Node) -> _Feat | None:
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None
        return self.feats.get(node.args[0])

    def visit_module(self, node: torch.fx.Node) -> _Feat | None:
        name = str(node.target)
        mod = self.modules[name]
        x = self.first_feat(node)
        if x is None or len(self.tensor_args(node)) != 1:
            return self.opaque(node)
        if isinstance(mod, nn.Linear):
            if x.ndim is not None and x.ndim > 2 and x.chdim == 1:
                return self.opaque(node, "a Linear applied to the last axis of a conv feature map")
            self.inputs.setdefault(x.space, []).append((ParamRef(f"{name}.weight", 1, x.block or 0), name))
            return self.produce(node, name, mod, chdim=-1)
        if isinstance(mod, _CONVS + _CONV_TRANSPOSES):
            if mod.groups != 1:
                return self.opaque(node, f"grouped convolution (groups={mod.groups})")
            if not self.channel_first_ok(x):
                return self.opaque(node, "a convolution of flattened features")
            in_axis, out_axis = (0, 1) if isinstance(mod, _CONV_TRANSPOSES) else (1, 0)
            self.inputs.setdefault(x.space, []).append((ParamRef(f"{name}.weight", in_axis), name))
            return self.produce(node, name, mod, chdim=1, out_axis=out_axis)
        if isinstance(mod, _BATCHNORMS):
            if not self.channel_first_ok(x):
                return self.opaque(node, "BatchNorm of flattened features")
            refs = []
            if mod.affine:
                refs += [ParamRef(f"{name}.weight", 0), ParamRef(f"{name}.bias", 0)]
            if mod.track_running_stats and mod.running_mean is not None:
                refs += [ParamRef(f"{name}.running_mean", 0), ParamRef(f"{name}.running_var", 0)]
            self.outputs.setdefault(x.space, []).extend(refs)
            self.producers.append((x.space, name, self.index))
            return self.same(x, node)
        if isinstance(mod, _ACTIVATIONS) or (isinstance(mod, nn.PReLU) and mod.num_parameters == 1):
            self.activations.append((x.space, name, self.index))
            return self.same(x, node)
        if isinstance(mod, _PASSTHROUGH):
            return self.same(x, node)
        if isinstance(mod, _POOLS):
            if not self.channel_first_ok(x):
                return self.opaque(node, "pooling over flattened or channel-last features")
            return self.same(x, node)
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, x, mod.start_dim, mod.end_dim)
        if isinstance(mod, nn.Unflatten):
            return self.opaque(node)
        return self.opaque(node)

    def produce(self, node: torch.fx.Node, name: str, mod: nn.Module, chdim: int, out_axis: int = 0) -> _Feat:
        space = self.new_space()
        refs = [ParamRef(f"{name}.weight", out_axis)]
        if getattr(mod, "bias", None) is not None:
            refs.append(ParamRef(f"{name}.bias", 0))
        self.outputs[space] = refs
        self.producers.append((space, name, self.index))
        return _Feat(space, 1, self.ndim(node), chdim)

    def flatten(self, node: torch.fx.Node, x: _Feat, start: int, end: int) -> _Feat | None:
        nd = x.ndim
        if nd is None:  # no shapes: assume a flatten of (N, C, ...) and resolve the block later
            if start != 1 or end != -1:
                return self.opaque(node, f"flatten(start_dim={start}, end_dim={end}) without shape information")
            return _Feat(x.space, None, None, 1)
        start, end = start % nd, end % nd
        if start >= end:  # nothing to flatten
            return self.same(x, node)
        if start == 1 and end == nd - 1:
            if x.chdim == -1 and nd > 2:
                return self.opaque(node, "flattening channel-last features")
            in_shape = self.shape(node.args[0])
            spatial = math.prod(in_shape[2:]) if in_shape is not None else None
            if spatial is None or x.block is None:
                return _Feat(x.space, None, 2, 1)
            return _Feat(x.space, x.block * spatial, 2, 1)
        if x.chdim == 1 and start >= 2 and x.block == 1:  # spatial dims only: channels stay on dim 1
            return self.same(x, node)
        return self.opaque(node, f"flatten(start_dim={start}, end_dim={end}) mixes the channel axis")

    def visit_function(self, node: torch.fx.Node) -> _Feat | None:
        target = node.target
        feats = self.tensor_args(node)
        if not feats:  # sizes, shapes and constants built inside forward
            return None
        x = self.first_feat(node)
        is_method = node.op == "call_method"
        if is_method and target in _NON_TENSOR_METHODS:
            return None
        if target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "dtype", "device", "ndim"):
            return None
        if target is operator.getitem and x is not None and self.is_non_tensor(node.args[0]):
            return None
        if x is None:
            return self.opaque(node)
        if target in _ADDS or (is_method and target in ("add", "add_", "sub", "sub_")):
            if len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], torch.fx.Node):
                other = self.feats.get(node.args[1])
                if other is not None and other.block == x.block and (
                    other.chdim == x.chdim or 2 in (x.ndim, other.ndim) or None in (x.ndim, other.ndim)
                ):
                    self.union(x.space, other.space)
                    return self.same(x, node)
            return self.opaque(node, "an addition or subtraction that is not of two tensors of the same space layout")
        if target in _SCALES or (is_method and target in ("mul", "mul_", "div", "div_")):
            if len(feats) == 1 and len(node.args) == 2 and isinstance(node.args[1], (int, float)):
                return self.same(x, node)
            if target in (operator.mul, torch.mul) and len(feats) == 1 and isinstance(node.args[0], (int, float)):
                return self.same(self.feats[node.args[1]], node)  # type: ignore[index]
            return self.opaque(node, "a product with a tensor (only scaling by a number keeps the space)")
        if len(feats) != 1:
            return self.opaque(node)
        if target in _FUNCTIONAL_ACTIVATIONS or (is_method and target in _ACTIVATION_METHODS):
            self.functional_nonlin.append((x.space, self.describe(node)))
            return self.same(x, node)
        if target in _FUNCTIONAL_PASSTHROUGH or (is_method and target in _PASSTHROUGH_METHODS):
            return self.same(x, node)
        if target in _FUNCTIONAL_POOLS:
            if not self.channel_first_ok(x):
                return self.opaque(node, "pooling over flattened or channel-last features")
            return self.same(x, node)
        if target is torch.flatten or (is_method and target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if not isinstance(start, int) or not isinstance(end, int):
                return self.opaque(node)
            return self.flatten(node, x, start, end)
        if is_method and target in ("view", "reshape") or target is torch.reshape:
            return self.reshape(node, x)
        if target in (torch.mean, torch.sum, torch.amax) or (is_method and target in ("mean", "sum", "amax")):
            return self.reduce(node, x)
        return self.opaque(node)

    def reshape(self, node: torch.fx.Node, x: _Feat) -> _Feat | None:
        src, dst = self.shape(node.args[0]), self.shape(node)
        if src is None or dst is None:
            return self.flatten(node, x, 1, -1) if not self.has_shapes else self.opaque(node)
        if src == dst:
            return self.same(x, node)
        if len(src) >= 2 and len(dst) == 2 and dst[0] == src[0] and dst[1] == math.prod(src[1:]):
            return self.flatten(node, x, 1, -1)
        return self.opaque(node, f"a reshape from {src} to {dst} that is not a flatten of (N, C, ...)")

    def reduce(self, node: torch.fx.Node, x: _Feat) -> _Feat | None:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dims, int):
            dims = (dims,)
        if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims) or x.block != 1:
            return self.opaque(node, "a reduction that may include the channel axis")
        nd = x.ndim
        if x.chdim != 1 or (nd is None and any(d < 2 for d in dims)):
            return self.opaque(node, "a reduction that may include the channel axis")
        if nd is not None and any(d % nd in (0, 1) for d in dims):
            return self.opaque(node, "a reduction over the batch or channel axis")
        return _Feat(x.space, 1, self.ndim(node), 1)

    # result ---------------------------------------------------------------------------------
    def result(self, model: nn.Module) -> MergeGraph:
        bad = [desc for spaces, desc in self.unknown if any(not self.fixed[self.find(s)] for s in spaces)]
        if bad:
            more = f" (and {len(bad) - 1} more: {'; '.join(bad[1:4])})" if len(bad) > 1 else ""
            raise GraphError(
                f"cannot derive the merge graph of {type(model).__name__}: {bad[0]} acts on hidden channels "
                f"in a way the automatic graph does not support{more}. Supported are Linear, Conv (groups=1), "
                "BatchNorm, elementwise activations, dropout, pooling, flatten and residual additions. "
                + SPEC_ADVICE
            )
        roots: dict[int, list[int]] = {}
        for s in range(len(self.parent)):
            r = self.find(s)
            if not self.fixed[r]:
                roots.setdefault(r, []).append(s)
        state = model.state_dict()
        spaces: list[Space] = []
        used_names: set[str] = set()
        for root in sorted(roots, key=lambda r: self.created_at[r]):
            members = set(roots[root])
            outputs = [ref for s in sorted(members) for ref in self.outputs.get(s, [])]
            if not outputs:  # pragma: no cover - every transformable space starts at a producer
                continue
            first = outputs[0]
            size = int(state[first.name].shape[first.axis])
            inputs = []
            for s in sorted(members):
                for ref, consumer in self.inputs.get(s, []):
                    if ref.block == 0:  # block resolved from the consumer's in_features
                        features = int(state[ref.name].shape[ref.axis])
                        if features % size:
                            raise GraphError(
                                f"{consumer!r} takes {features} features from a flatten of {size} channels, "
                                f"which is not a multiple; pass example_input to merge_graph. " + SPEC_ADVICE
                            )
                        ref = ParamRef(ref.name, ref.axis, features // size)
                    inputs.append(ref)
            acts = sorted((i, n) for s, n, i in self.activations if s in members and self.calls.get(n) == 1)
            capture = [n for _, n in acts]
            shared = sorted({n for s, n, _ in self.activations if s in members and self.calls.get(n, 0) > 1})
            nonlin = [d for s, d in self.functional_nonlin if s in members]
            if not capture and (nonlin or shared):
                culprit = f"activation module(s) {shared} called more than once" if shared else nonlin[0]
                raise GraphError(
                    "cannot choose the capture layer of the hidden space produced by "
                    f"{first.name.rsplit('.', 1)[0]!r}: "
                    f"its non-linearity is {culprit}. Statistics are taken from post-activation outputs, so every "
                    "non-linearity must be its own nn.Module instance (e.g. self.relu1 = nn.ReLU(), used once), "
                    "not a functional call like F.relu. " + SPEC_ADVICE
                )
            if not capture:
                prods = sorted((i, n) for s, n, i in self.producers if s in members and self.calls.get(n) == 1)
                capture = [prods[-1][1]] if prods else []
            name = capture[0] if capture else first.name.rsplit(".", 1)[0]
            base, k = name, 1
            while name in used_names:
                k += 1
                name = f"{base}#{k}"
            used_names.add(name)
            spaces.append(Space(name=name, size=size, capture=capture, outputs=outputs, inputs=inputs))
        return MergeGraph(spaces)


def _example_input(model: nn.Module, example_input: Any) -> torch.Tensor | None:
    if example_input is not None:
        param = next(iter(model.parameters()), None)
        if isinstance(example_input, torch.Tensor) and param is not None:
            return example_input.to(param.device)
        return example_input
    config = getattr(model, "config", None)
    in_shape = config.get("in_shape") if isinstance(config, dict) else None
    if not in_shape:
        return None
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros((2, *map(int, in_shape)), device=device, dtype=dtype)


def merge_graph(model: nn.Module, example_input: torch.Tensor | None = None) -> MergeGraph:
    """Derive ``model``'s merge graph from a ``torch.fx`` trace (the model is not modified).

    ``example_input`` (a batch) lets shapes propagate, which fixes the flatten block of conv maps;
    zoo models build one from ``model.config['in_shape']``. Without shapes the block is read off the
    consuming Linear layer. Raises :class:`GraphError` with advice when the model cannot be traced
    or uses layers the automatic graph does not understand.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"merge_graph expects an nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model).eval()
    try:
        gm = torch.fx.symbolic_trace(work)
    except Exception as err:  # fx raises many kinds of errors
        raise GraphError(
            f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}. "
            "Models with data-dependent control flow cannot be traced automatically. " + SPEC_ADVICE
        ) from err
    example = _example_input(model, example_input)
    has_shapes = False
    if example is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(example)
        except Exception as err:
            raise GraphError(
                f"running {type(model).__name__} on an example input of shape "
                f"{tuple(getattr(example, 'shape', ()))} failed: {type(err).__name__}: {err}. "
                "Pass example_input=<a batch the model accepts> to merge_graph."
            ) from err
        has_shapes = True
    builder = _Builder(gm, has_shapes)
    for node in gm.graph.nodes:
        builder.visit(node)
    return builder.result(model).validate(model)
