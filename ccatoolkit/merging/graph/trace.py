"""Derive a model's merge graph from a ``torch.fx`` trace: :func:`merge_graph`.

Every traced tensor gets a channel *space*; a Linear/Conv starts a new space, elementwise
operations, BatchNorm, pooling and dropout keep it, and residual additions unite the spaces they
join (union-find, :class:`_SpaceUnion`). Operations the rules do not understand are fine on
spaces that cannot be transformed anyway (the input, the output); on a hidden space they raise
:class:`GraphError` naming the operation and the way out (:meth:`MergeGraph.from_spec`).
Zoo models and a user's own MLPs, CNNs and small residual CNNs built from standard layers need no
hand-written spec. Depthwise convolutions, LayerNorm over channels and GroupNorm with one group
keep a space but allow only permutations of it (``Space.permutation_only``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ccatoolkit._utils import eval_mode, input_dtype_advice, wrapper_advice
from ccatoolkit.analysis.capture import (
    ACTIVATION_METHODS,
    FUNCTIONAL_ACTIVATIONS,
    capture_point,
    node_point_names,
)
from ccatoolkit.merging.graph.spec import SPEC_ADVICE, GraphError, MergeGraph, ParamRef, Space

__all__ = ["merge_graph"]

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
_CONCATS = {torch.cat, torch.concat, torch.concatenate}
# Operations that keep each channel where it is, so a concatenation's segments pass through them.
_CONCAT_SAFE_FUNCTIONS = (FUNCTIONAL_ACTIVATIONS | _FUNCTIONAL_PASSTHROUGH | _FUNCTIONAL_POOLS
                          | {torch.flatten, torch.reshape, torch.mean, torch.sum, torch.amax})
_CONCAT_SAFE_METHODS = (set(ACTIVATION_METHODS) | _PASSTHROUGH_METHODS
                        | {"flatten", "view", "reshape", "mean", "sum", "amax"})


@dataclass
class _Feat:
    """Where a traced tensor's channels live: its space, flatten block and channel axis."""

    space: int
    block: int | None = 1  # None: a Flatten whose block is resolved from the consuming Linear
    ndim: int | None = None  # known when shapes were propagated
    chdim: int = 1  # 1 for conv-style (N, C, ...), -1 for Linear outputs (..., F)
    parts: tuple[tuple[int, int], ...] = ()  # a concatenation: (space, channels) in order along dim 1

    def spaces(self) -> list[int]:
        """The spaces whose channels the tensor holds (several for a concatenation)."""
        return [space for space, _ in self.parts] if self.parts else [self.space]


class _DisjointSets:
    """Union-find over integer ids (path halving); an id joins at its first :meth:`find`."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        """The root of ``x``'s set."""
        parent = self.parent
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def link(self, root: int, other_root: int) -> None:
        """Join two sets by their roots: ``root`` becomes the root of both."""
        self.parent[other_root] = root


class _SpaceUnion:
    """Union-find over channel spaces. A *fixed* space (the input, the output, anything an
    unknown operation touched) cannot be transformed; uniting with one fixes the union."""

    def __init__(self) -> None:
        self.sets = _DisjointSets()
        self.fixed: list[bool] = []
        self.created_at: list[int] = []  # the node order that created each space: roots are the earliest
        self.why_permutation_only: dict[int, list[str]] = {}  # root -> the operations that allow only permutations
        self.group_width: dict[int, int] = {}  # root -> channels per block that permutations keep in place
        self.group_pairs: list[tuple[int, int, int, str]] = []  # (input, output, groups, conv): groups move together

    def new(self, order: int, fixed: bool = False) -> int:
        space = len(self.fixed)
        self.sets.find(space)
        self.fixed.append(fixed)
        self.created_at.append(order)
        return space

    def find(self, s: int) -> int:
        return self.sets.find(s)

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.created_at[rb] < self.created_at[ra]:
            ra, rb = rb, ra
        self.sets.link(ra, rb)
        self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        if rb in self.why_permutation_only:
            self.why_permutation_only.setdefault(ra, []).extend(self.why_permutation_only.pop(rb))
        if rb in self.group_width:
            width = self.group_width.pop(rb)
            self.group_width[ra] = math.gcd(self.group_width.get(ra, width), width)
        return ra

    def restrict(self, s: int, reason: str) -> None:
        """Mark ``s`` as a space that only permutations may transform (``reason``: the operation)."""
        self.why_permutation_only.setdefault(self.find(s), []).append(reason)

    def keep_groups(self, s: int, width: int, reason: str) -> None:
        """Allow only permutations of ``s`` that keep each block of ``width`` channels in place."""
        r = self.find(s)
        self.group_width[r] = math.gcd(self.group_width.get(r, width), width)
        self.restrict(r, reason)

    def link_groups(self, a: int, b: int, groups: int, conv: str) -> None:
        """Record that spaces ``a`` and ``b`` (a grouped convolution's input and output) may move whole groups,
        together: see :meth:`group_links`."""
        self.group_pairs.append((a, b, groups, conv))

    def group_links(self, sizes: dict[int, int]) -> dict[int, str]:
        """``{root: label}``: unions whose groups may move, each labelled by its first grouped convolution.

        Links chain (a space read by two grouped convolutions shares one block permutation with both
        outputs). A chain is left out (its spaces keep their groups in place, as before) when one of its
        spaces cannot be transformed or has other blocks than the convolution's groups (two grouped
        convolutions with different group counts read it): moving groups there would change the function.
        ``sizes``: each transformable root's channel count.
        """
        chains = _DisjointSets()  # over the unions' roots
        pairs = [(self.find(a), self.find(b), groups, conv) for a, b, groups, conv in self.group_pairs]
        for ra, rb, _, _ in pairs:
            root = chains.find(ra)
            chains.link(root, chains.find(rb))
        label: dict[int, str] = {}
        broken: set[int] = set()
        for ra, rb, groups, conv in pairs:  # in trace order: each chain is named by its first convolution
            label.setdefault(chains.find(ra), conv)
            for r in (ra, rb):
                width = self.group_width.get(r)
                if r not in sizes or not width or sizes[r] // width != groups:
                    broken.add(chains.find(r))
        return {r: label[chains.find(r)] for r in list(chains.parent)
                if chains.find(r) not in broken and r in sizes}

    def width(self, s: int) -> int | None:
        """Channels per block that a permutation of ``s`` keeps in place (None: no blocks)."""
        return self.group_width.get(self.find(s))

    def permutation_only(self, s: int) -> list[str]:
        """Why ``s`` admits permutations only (empty: any invertible map)."""
        return list(self.why_permutation_only.get(self.find(s), []))

    def is_fixed(self, s: int) -> bool:
        return self.fixed[self.find(s)]

    def groups(self) -> list[set[int]]:
        """The transformable unions, each a set of space ids, in the order their roots were created."""
        roots: dict[int, set[int]] = {}
        for s in range(len(self.fixed)):
            r = self.find(s)
            if not self.fixed[r]:
                roots.setdefault(r, set()).add(s)
        return [roots[r] for r in sorted(roots, key=lambda r: self.created_at[r])]


@dataclass(frozen=True)
class _PendingInput:
    """An input-side weight of a space, before its flatten block is known.

    ``block`` is None when a Flatten was traced without shapes: it is then read off the consuming
    layer's ``in_features`` when the graph is assembled (:meth:`_Builder.resolve`).
    """

    name: str
    axis: int
    block: int | None
    consumer: str
    start: int = 0  # a segment of a concatenation: the space's first channel, of ``of`` in all
    of: int | None = None
    groups: int = 1  # a grouped convolution's input
    last_axis_of: str = ""  # the Linear whose outputs were flattened without shapes: channels last unless 2-D


class _Site(NamedTuple):
    """A module (or one call of it: a capture point) that produces or activates a space, and its traced order."""

    space: int
    module: str
    order: int


class _Builder:
    """Walks the fx graph once, giving every node a :class:`_Feat`, and assembles the :class:`MergeGraph`."""

    def __init__(self, gm: torch.fx.GraphModule, has_shapes: bool, node_points: dict[str, str]) -> None:
        self.gm = gm
        self.node_points = node_points  # fx node name -> capture point (functional activations)
        self.modules = dict(gm.named_modules())
        self.has_shapes = has_shapes
        self.spaces = _SpaceUnion()
        self.feats: dict[torch.fx.Node, _Feat | None] = {}
        self.outputs: dict[int, list[ParamRef]] = {}
        self.inputs: dict[int, list[_PendingInput]] = {}
        self.activations: list[_Site] = []  # activation modules and functional activations (capture points)
        self.producers: list[_Site] = []  # Linear/Conv/BatchNorm modules (capture fallback)
        self.functional_nonlin: list[tuple[int, str]] = []  # (space, description) of F.relu & co
        self.unknown: list[tuple[list[int], str]] = []  # (spaces touched, description)
        # space -> (Linear, its input's shape): channels last, (N, ..., F), which statistics and flattens cannot follow
        self.channels_last: dict[int, tuple[str, tuple[int, ...] | None]] = {}
        self.calls: dict[str, int] = {}
        self.index = 0
        self.input_space = self.new_space(fixed=True)

    def new_space(self, fixed: bool = False) -> int:
        return self.spaces.new(self.index, fixed)

    # helpers ------------------------------------------------------------------------------
    def ndim(self, node: torch.fx.Node) -> int | None:
        meta = node.meta.get("tensor_meta")
        return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def shape(self, node: Any) -> tuple[int, ...] | None:
        if not isinstance(node, torch.fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def is_scalar(self, node: Any) -> bool:
        """Whether ``node`` is a tensor of one element and at most one axis (a parameter such as a temperature)."""
        if not isinstance(node, torch.fx.Node):
            return False
        shape = self.shape(node)
        if shape is None and node.op == "get_attr":
            value: Any = self.gm
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        return shape is not None and len(shape) <= 1 and math.prod(shape) == 1

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

    def unhandled(self, node: torch.fx.Node, reason: str = "") -> _Feat | None:
        """An operation the graph does not understand: fine on fixed spaces only (checked at the end)."""
        args = self.tensor_args(node)
        if args:
            self.unknown.append(([s for f in args for s in f.spaces()],
                                 self.describe(node) + (f": {reason}" if reason else "")))
        if self.is_non_tensor(node):
            return None
        return _Feat(self.new_space(fixed=True), 1, self.ndim(node))

    def keep_space(self, feat: _Feat, node: torch.fx.Node) -> _Feat:
        """The output of an operation that keeps its input's channels (an activation, a pooling, ...)."""
        return replace(feat, ndim=self.ndim(node) if self.has_shapes else feat.ndim)

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
                for space in feat.spaces():
                    self.spaces.union(space, self.input_space)
        else:  # pragma: no cover - fx has no other ops
            self.feats[node] = self.unhandled(node)

    def first_feat(self, node: torch.fx.Node) -> _Feat | None:
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None
        return self.feats.get(node.args[0])

    # One dispatch over module types, a branch per rule: the rules read best side by side.
    def visit_module(self, node: torch.fx.Node) -> _Feat | None:
        name = str(node.target)
        mod = self.modules[name]
        x = self.first_feat(node)
        if x is None or len(self.tensor_args(node)) != 1:
            return self.unhandled(node)
        if x.parts:
            return self.concat_module(node, name, mod, x)
        if isinstance(mod, nn.Linear):
            if x.ndim is not None and x.ndim > 2 and x.chdim == 1 and not self.spaces.is_fixed(x.space):
                return self.unhandled(node, "a Linear applied to the last axis of a conv feature map")
            if not (x.ndim is not None and x.ndim > 2 and x.chdim == 1):  # a fixed input's columns need no ref
                last_axis_of = self.producer_of(x.space) if x.block is None and x.chdim == -1 else ""
                self.inputs.setdefault(x.space, []).append(
                    _PendingInput(f"{name}.weight", 1, x.block, name, last_axis_of=last_axis_of))
            feat = self.produce(node, name, mod, chdim=-1)
            if x.ndim is not None and x.ndim > 2:  # over a sequence (N, L, F): its outputs are channels last
                self.channels_last[feat.space] = (name, self.shape(node.args[0]))
            return feat
        if isinstance(mod, _CONVS) and mod.groups != 1 and mod.groups == mod.in_channels == mod.out_channels:
            # depthwise: each channel has its own filter, so the channels stay one space; permuting them
            # permutes the filters (weight rows, bias), but a map that mixes channels cannot pass
            if not self.channel_first_ok(x):
                return self.unhandled(node, "a depthwise convolution of flattened features")
            refs = [ParamRef(f"{name}.weight", 0)] + ([ParamRef(f"{name}.bias", 0)] if mod.bias is not None else [])
            self.outputs.setdefault(x.space, []).extend(refs)
            self.spaces.restrict(x.space, f"depthwise convolution {name!r}")
            self.producers.append(_Site(x.space, name, self.index))
            return self.keep_space(x, node)
        if isinstance(mod, _CONVS) and mod.groups != 1:
            return self.grouped_conv(node, name, mod, x)
        if isinstance(mod, _CONVS + _CONV_TRANSPOSES):
            if mod.groups != 1:
                return self.unhandled(node, f"grouped transposed convolution (groups={mod.groups})")
            if not self.channel_first_ok(x):
                return self.unhandled(node, "a convolution of flattened features")
            in_axis, out_axis = (0, 1) if isinstance(mod, _CONV_TRANSPOSES) else (1, 0)
            self.inputs.setdefault(x.space, []).append(_PendingInput(f"{name}.weight", in_axis, 1, name))
            return self.produce(node, name, mod, chdim=1, out_axis=out_axis)
        if isinstance(mod, _BATCHNORMS):
            if not self.channel_first_ok(x):
                return self.unhandled(node, "BatchNorm of flattened features")
            refs = []
            if mod.affine:
                refs += [ParamRef(f"{name}.weight", 0), ParamRef(f"{name}.bias", 0)]
            if mod.track_running_stats and mod.running_mean is not None:
                refs += [ParamRef(f"{name}.running_mean", 0), ParamRef(f"{name}.running_var", 0)]
            self.outputs.setdefault(x.space, []).extend(refs)
            self.producers.append(_Site(x.space, name, self.index))
            return self.keep_space(x, node)
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
            return self.channel_norm(node, name, mod, x)
        if isinstance(mod, _ACTIVATIONS) or (isinstance(mod, nn.PReLU) and mod.num_parameters == 1):
            self.activations.append(_Site(x.space, capture_point(name, self.calls[name] - 1), self.index))
            return self.keep_space(x, node)
        if isinstance(mod, _PASSTHROUGH):
            return self.keep_space(x, node)
        if isinstance(mod, _POOLS):
            if not self.channel_first_ok(x):
                return self.unhandled(node, "pooling over flattened or channel-last features")
            return self.keep_space(x, node)
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, x, mod.start_dim, mod.end_dim)
        if isinstance(mod, nn.Unflatten):
            return self.unhandled(node)
        return self.unhandled(node)

    def grouped_conv(self, node: torch.fx.Node, name: str, mod: nn.Module, x: _Feat) -> _Feat | None:
        """A grouped convolution (not depthwise): output group g reads input group g only.

        A permutation passes it when it maps groups to groups; the graph allows those that keep
        every group in place and permute channels within it (on both sides), so its input and output
        spaces become permutation-only with ``Space.groups`` blocks. The input side is read per
        group of rows (``ParamRef.groups``). Moving whole groups keeps the function too when the two
        spaces move the same groups: they get one ``Space.group_link`` (:meth:`_SpaceUnion.group_links`),
        and activation matching searches those moves (``match_linked_groups``).
        """
        if not self.channel_first_ok(x):
            return self.unhandled(node, "a grouped convolution of flattened features")
        reason = f"grouped convolution {name!r} ({mod.groups} groups): permutations that keep its groups whole"
        self.inputs.setdefault(x.space, []).append(_PendingInput(f"{name}.weight", 1, 1, name, groups=mod.groups))
        self.spaces.keep_groups(x.space, mod.in_channels // mod.groups, reason)
        feat = self.produce(node, name, mod, chdim=1)
        self.spaces.keep_groups(feat.space, mod.out_channels // mod.groups, reason)
        self.spaces.link_groups(x.space, feat.space, mod.groups, name)
        return feat

    def channel_norm(self, node: torch.fx.Node, name: str, mod: nn.Module, x: _Feat) -> _Feat | None:
        """LayerNorm over the channel axis alone, or GroupNorm with one group: permutation-only spaces.

        Both normalise with statistics over all channels (permuting channels does not change them)
        and then scale and shift each channel with its own parameters, which a permutation moves
        along but a channel-mixing map cannot pass through. Other shapes (LayerNorm over spatial
        axes too, GroupNorm with several groups, whose permutations must keep the groups) are opaque.
        """
        if isinstance(mod, nn.LayerNorm):
            channels_last = x.chdim == -1 or x.ndim == 2
            if len(mod.normalized_shape) != 1 or not channels_last or x.block != 1:
                return self.unhandled(node, "a LayerNorm that normalises more than the channel axis")
        elif mod.num_groups != 1 or not self.channel_first_ok(x):
            return self.unhandled(node, f"a GroupNorm with {mod.num_groups} groups (permutations would have to keep "
                                     "each group together)")
        refs = [ParamRef(f"{name}.{p}", 0) for p in ("weight", "bias") if getattr(mod, p, None) is not None]
        self.outputs.setdefault(x.space, []).extend(refs)
        self.spaces.restrict(x.space, f"{type(mod).__name__} {name!r}")
        self.producers.append(_Site(x.space, name, self.index))
        return self.keep_space(x, node)

    def producer_of(self, space: int) -> str:
        """The layer whose weight rows make ``space`` (for messages)."""
        refs = self.outputs.get(space) or [ParamRef("?.weight", 0)]
        return refs[0].name.rsplit(".", 1)[0]

    def produce(self, node: torch.fx.Node, name: str, mod: nn.Module, chdim: int, out_axis: int = 0) -> _Feat:
        space = self.new_space()
        refs = [ParamRef(f"{name}.weight", out_axis)]
        if getattr(mod, "bias", None) is not None:
            refs.append(ParamRef(f"{name}.bias", 0))
        self.outputs[space] = refs
        self.producers.append(_Site(space, name, self.index))
        return _Feat(space, 1, self.ndim(node), chdim)

    def flatten(self, node: torch.fx.Node, x: _Feat, start: int, end: int) -> _Feat | None:
        nd = x.ndim
        if nd is None:  # no shapes: assume a flatten of (N, C, ...) and resolve the block later
            if start != 1 or end != -1:
                return self.unhandled(node, f"flatten(start_dim={start}, end_dim={end}) without shape information")
            # a Linear's outputs (channels last) flatten channel-major only when 2-D: resolve() checks
            return _Feat(x.space, None, None, -1 if x.chdim == -1 and x.block == 1 else 1)
        start, end = start % nd, end % nd
        if start >= end:  # nothing to flatten
            return self.keep_space(x, node)
        if start == 1 and end == nd - 1:
            if x.chdim == -1 and nd > 2:
                return self.unhandled(node, "flattening channel-last features")
            in_shape = self.shape(node.args[0])
            spatial = math.prod(in_shape[2:]) if in_shape is not None else None
            if spatial is None or x.block is None:
                return replace(x, block=None, ndim=2, chdim=1)
            return replace(x, block=x.block * spatial, ndim=2, chdim=1)
        if x.chdim == 1 and start >= 2 and x.block == 1:  # spatial dims only: channels stay on dim 1
            return self.keep_space(x, node)
        return self.unhandled(node, f"flatten(start_dim={start}, end_dim={end}) mixes the channel axis")

    # One dispatch over functions and methods, a branch per rule: the rules read best side by side.
    def visit_function(self, node: torch.fx.Node) -> _Feat | None:
        target = node.target
        feats = self.tensor_args(node)
        if not feats:  # sizes, shapes and constants built inside forward
            return None
        if target in _CONCATS:
            return self.concat(node)
        x = self.first_feat(node)
        is_method = node.op == "call_method"
        if is_method and target in _NON_TENSOR_METHODS:
            return None
        if target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "dtype", "device", "ndim"):
            return None
        if target is operator.getitem and x is not None and self.is_non_tensor(node.args[0]):
            return None
        if x is None:
            return self.unhandled(node)
        if any(f.parts for f in feats) and not (
            len(feats) == 1 and (target in _CONCAT_SAFE_FUNCTIONS or (is_method and target in _CONCAT_SAFE_METHODS))
        ):
            return self.unhandled(node, "an operation on concatenated channels other than an activation, pooling, "
                                     "dropout or flatten")
        if target in _ADDS or (is_method and target in ("add", "add_", "sub", "sub_")):
            if len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], torch.fx.Node):
                other = self.feats.get(node.args[1])
                if other is not None and other.block == x.block and (
                    other.chdim == x.chdim or 2 in (x.ndim, other.ndim) or None in (x.ndim, other.ndim)
                ):
                    self.spaces.union(x.space, other.space)
                    return self.keep_space(x, node)
            return self.unhandled(node, "an addition or subtraction that is not of two tensors of the same space layout")
        if target in _SCALES or (is_method and target in ("mul", "mul_", "div", "div_")):
            if len(feats) == 1 and len(node.args) == 2 and isinstance(node.args[1], (int, float)):
                return self.keep_space(x, node)
            if target in (operator.mul, torch.mul) and len(feats) == 1 and isinstance(node.args[0], (int, float)):
                return self.keep_space(self.feats[node.args[1]], node)  # type: ignore[index]
            # a one-element tensor (a learned temperature, logits / t) scales every channel alike: keeps the space
            if len(feats) == 2 and len(node.args) == 2 and not node.kwargs and self.is_scalar(node.args[1]):
                return self.keep_space(x, node)
            if target in (operator.mul, torch.mul) and len(feats) == 2 and len(node.args) == 2 and self.is_scalar(
                    node.args[0]) and isinstance(node.args[1], torch.fx.Node) and self.feats.get(node.args[1]):
                return self.keep_space(self.feats[node.args[1]], node)  # type: ignore[arg-type]
            return self.unhandled(node, "a product with a tensor (only scaling by a number or a one-element tensor "
                                     "keeps the space)")
        if len(feats) != 1:
            return self.unhandled(node)
        if target in FUNCTIONAL_ACTIVATIONS or (is_method and target in ACTIVATION_METHODS):
            point = self.node_points.get(node.name)
            if x.parts:  # concatenated channels: each segment is captured at its own producer or activation
                return self.keep_space(x, node)
            if point is None:  # pragma: no cover - the trace that names node points is the same trace
                self.functional_nonlin.append((x.space, self.describe(node)))
            else:
                self.activations.append(_Site(x.space, point, self.index))
            return self.keep_space(x, node)
        if target in _FUNCTIONAL_PASSTHROUGH or (is_method and target in _PASSTHROUGH_METHODS):
            return self.keep_space(x, node)
        if target in _FUNCTIONAL_POOLS:
            if not self.channel_first_ok(x):
                return self.unhandled(node, "pooling over flattened or channel-last features")
            return self.keep_space(x, node)
        if target is torch.flatten or (is_method and target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if not isinstance(start, int) or not isinstance(end, int):
                return self.unhandled(node)
            return self.flatten(node, x, start, end)
        if is_method and target in ("view", "reshape") or target is torch.reshape:
            return self.reshape(node, x)
        if target in (torch.mean, torch.sum, torch.amax) or (is_method and target in ("mean", "sum", "amax")):
            return self.reduce(node, x)
        return self.unhandled(node)

    def reshape(self, node: torch.fx.Node, x: _Feat) -> _Feat | None:
        src, dst = self.shape(node.args[0]), self.shape(node)
        if src is None or dst is None:
            return self.flatten(node, x, 1, -1) if not self.has_shapes else self.unhandled(node)
        if src == dst:
            return self.keep_space(x, node)
        if len(src) >= 2 and len(dst) == 2 and dst[0] == src[0] and dst[1] == math.prod(src[1:]):
            return self.flatten(node, x, 1, -1)
        return self.unhandled(node, f"a reshape from {src} to {dst} that is not a flatten of (N, C, ...)")

    def reduce(self, node: torch.fx.Node, x: _Feat) -> _Feat | None:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dims, int):
            dims = (dims,)
        if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims) or x.block != 1:
            return self.unhandled(node, "a reduction that may include the channel axis")
        nd = x.ndim
        if x.chdim != 1 or (nd is None and any(d < 2 for d in dims)):
            return self.unhandled(node, "a reduction that may include the channel axis")
        if nd is not None and any(d % nd in (0, 1) for d in dims):
            return self.unhandled(node, "a reduction over the batch or channel axis")
        return replace(x, block=1, ndim=self.ndim(node), chdim=1)

    # concatenation ------------------------------------------------------------------------
    def concat(self, node: torch.fx.Node) -> _Feat | None:
        """``torch.cat`` along the channel axis: a tensor whose channels are segments of the joined spaces.

        Each segment stays its own space: a later layer's weight columns (or a BatchNorm's entries)
        for it are a slice of the concatenated axis (``ParamRef.start``/``of``). Needs shapes to
        know each segment's length.
        """
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or not all(
            isinstance(t, torch.fx.Node) and self.feats.get(t) is not None for t in tensors
        ):
            return self.unhandled(node, "a concatenation of tensors the graph cannot follow")
        nd = self.ndim(node)
        shapes = [self.shape(t) for t in tensors]
        if nd is None or any(shape is None for shape in shapes):
            return self.unhandled(node, "a concatenation without shape information: pass example_input to merge_graph")
        feats = [self.feats[t] for t in tensors]
        if dim % nd != 1:
            if len({space for f in feats for space in f.spaces()}) == 1:  # along batch/space: one channel space
                return self.keep_space(feats[0], node)
            return self.unhandled(node, f"a concatenation along dim {dim}, not the channel axis, of different spaces")
        parts: list[tuple[int, int]] = []
        for feat, shape in zip(feats, shapes):
            if feat.block != 1 or (nd > 2 and feat.chdim != 1):
                return self.unhandled(node, "a concatenation of flattened or channel-last features")
            parts.extend(feat.parts or [(feat.space, int(shape[1]))])  # type: ignore[index]
        if len(parts) == 1:
            return _Feat(parts[0][0], 1, nd, 1)
        return _Feat(parts[0][0], 1, nd, 1, parts=tuple(parts))

    @staticmethod
    def segments(x: _Feat) -> list[tuple[int, int, int]]:
        """``(space, start, size)`` of each segment of a concatenated tensor."""
        result, start = [], 0
        for space, size in x.parts:
            result.append((space, start, size))
            start += size
        return result

    def concat_module(self, node: torch.fx.Node, name: str, mod: nn.Module, x: _Feat) -> _Feat | None:
        """A module applied to concatenated channels: consumers take a slice of columns per segment.

        A BatchNorm over the concatenation scales and shifts each segment with its own entries,
        which permutations move along but a channel-mixing map cannot pass through (they cannot
        be folded into the segment's producer, whose output other layers also read): the
        segment's space becomes permutation-only.
        """
        total = sum(size for _, size in x.parts)
        if isinstance(mod, (nn.Linear, *_CONVS, *_CONV_TRANSPOSES)):
            if isinstance(mod, nn.Linear):
                if x.ndim is not None and x.ndim > 2:
                    return self.unhandled(node, "a Linear applied to the last axis of a conv feature map")
                axis, out_axis, chdim = 1, 0, -1
            elif mod.groups != 1:
                return self.unhandled(node, f"a grouped convolution (groups={mod.groups}) of concatenated channels")
            elif x.block != 1:
                return self.unhandled(node, "a convolution of flattened features")
            else:
                axis, out_axis = (0, 1) if isinstance(mod, _CONV_TRANSPOSES) else (1, 0)
                chdim = 1
            for space, start, _ in self.segments(x):
                self.inputs.setdefault(space, []).append(
                    _PendingInput(f"{name}.weight", axis, x.block, name, start=start, of=total))
            return self.produce(node, name, mod, chdim=chdim, out_axis=out_axis)
        if isinstance(mod, _BATCHNORMS) and x.block == 1:
            leaves = (["weight", "bias"] if mod.affine else []) + (
                ["running_mean", "running_var"] if mod.track_running_stats and mod.running_mean is not None else [])
            for space, start, _ in self.segments(x):
                self.outputs.setdefault(space, []).extend(
                    ParamRef(f"{name}.{leaf}", 0, 1, start, total) for leaf in leaves)
                self.spaces.restrict(space, f"BatchNorm {name!r} over a concatenation")
            return self.keep_space(x, node)
        if isinstance(mod, _ACTIVATIONS + _PASSTHROUGH) or (isinstance(mod, nn.PReLU) and mod.num_parameters == 1):
            return self.keep_space(x, node)  # captured at each segment's own producer or activation
        if isinstance(mod, _POOLS) and x.block == 1:
            return self.keep_space(x, node)
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, x, mod.start_dim, mod.end_dim)
        return self.unhandled(node, "a module applied to concatenated channels that the graph cannot split")

    # result ---------------------------------------------------------------------------------
    def resolve(self, pending: _PendingInput, size: int, state: dict[str, torch.Tensor]) -> ParamRef:
        """The :class:`ParamRef` of an input-side weight, its flatten block read off the consumer when unknown."""
        if pending.block is not None:
            return ParamRef(pending.name, pending.axis, pending.block, pending.start, pending.of, pending.groups)
        features = int(state[pending.name].shape[pending.axis])
        if pending.last_axis_of and features != size:
            raise GraphError(_channels_last_message(
                pending.last_axis_of, None,
                f"{pending.consumer!r} reads them flattened ({features} features from {size} channels)"))
        if features % size:
            raise GraphError(
                f"{pending.consumer!r} takes {features} features from a flatten of {size} channels, "
                f"which is not a multiple; pass example_input to merge_graph. " + SPEC_ADVICE
            )
        return ParamRef(pending.name, pending.axis, features // size)

    def capture_layers(self, members: set[int], producer: str) -> list[str]:
        """The modules whose outputs are a space's activations: its activation modules, else its last producer."""
        acts = sorted((site.order, site.module) for site in self.activations if site.space in members)
        if acts:
            return [point for _, point in acts]
        nonlin = [desc for space, desc in self.functional_nonlin if space in members]
        if nonlin:
            raise GraphError(
                f"cannot choose the capture layer of the hidden space produced by {producer!r}: "
                f"its non-linearity is {nonlin[0]}. Statistics are taken from post-activation outputs of "
                "activation modules (an nn.ReLU may be called several times: its calls are captured as "
                "'relu', 'relu_1', ...), not from a functional call like F.relu: use an nn.Module such as "
                "self.relu = nn.ReLU(). " + SPEC_ADVICE
            )
        prods = sorted((site.order, site.module) for site in self.producers
                       if site.space in members and self.calls.get(site.module) == 1)
        return [prods[-1][1]] if prods else []

    def result(self, model: nn.Module) -> MergeGraph:
        for space, (linear, shape) in self.channels_last.items():
            if not self.spaces.is_fixed(space):
                raise GraphError(_channels_last_message(linear, shape, "they are hidden channels"))
        bad = [desc for spaces, desc in self.unknown if any(not self.spaces.is_fixed(s) for s in spaces)]
        if bad:
            more = f" (and {len(bad) - 1} more: {'; '.join(bad[1:4])})" if len(bad) > 1 else ""
            raise GraphError(
                f"cannot derive the merge graph of {type(model).__name__}: {bad[0]} acts on hidden channels "
                f"in a way the automatic graph does not support{more}. Supported are Linear, Conv (groups=1 or "
                "depthwise), grouped Conv (permuted within groups), BatchNorm, LayerNorm over channels, GroupNorm(1, C), "
                "elementwise activations, dropout, pooling, flatten, residual additions and channel concatenation. "
                + SPEC_ADVICE
            )
        state = model.state_dict()
        spaces: list[Space] = []
        used_names: set[str] = set()
        sizes: dict[int, int] = {}  # root -> channels, for the group links
        built = []
        for members in self.spaces.groups():
            outputs = [ref for s in sorted(members) for ref in self.outputs.get(s, [])]
            if not outputs:  # pragma: no cover - every transformable space starts at a producer
                continue
            first = next((ref for ref in outputs if not ref.is_segment), outputs[0])
            sizes[self.spaces.find(next(iter(members)))] = int(state[first.name].shape[first.axis])
            built.append((members, outputs, first))
        links = self.spaces.group_links(sizes)
        for members, outputs, first in built:
            root = self.spaces.find(next(iter(members)))
            size = sizes[root]
            inputs = [self.resolve(p, size, state) for s in sorted(members) for p in self.inputs.get(s, [])]
            producer = first.name.rsplit(".", 1)[0]
            capture = self.capture_layers(members, producer)
            name = capture[0] if capture else producer
            base, k = name, 1
            while name in used_names:
                k += 1
                name = f"{base}#{k}"
            used_names.add(name)
            reasons = self.spaces.permutation_only(next(iter(members)))
            width = self.spaces.width(next(iter(members)))
            spaces.append(Space(name=name, size=size, capture=capture, outputs=outputs, inputs=inputs,
                                permutation_only="; ".join(reasons), groups=size // width if width else 1,
                                group_link=links.get(root, "")))
        return MergeGraph(spaces)


def _channels_last_message(linear: str, shape: tuple[int, ...] | None, where: str) -> str:
    """Why a Linear applied over a sequence (its outputs channels last) has no automatic merge graph, and what to do."""
    applied = f"a tensor of shape {shape}" if shape is not None else "a tensor with more than two axes"
    return (
        f"cannot derive the merge graph: Linear {linear!r} is applied to the last axis of {applied}, as over a "
        f"sequence, so its outputs are channels last, (N, ..., features), and {where}. The merge graph and the "
        "activation statistics take channels on dim 1, and a flatten of channels-last features interleaves them, "
        "so a permutation of this layer's outputs cannot be expressed. Apply the layer channels first "
        "(nn.Conv1d(in_features, out_features, kernel_size=1) on (N, in_features, L) inputs is the same map) or "
        "merge with method='average'; to align the other layers, leave this one out of a spec by hand. " + SPEC_ADVICE
    )


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


def _example_failure(model: nn.Module, example: Any, err: Exception) -> str:
    """Why ``model`` failed on the example batch: its dtype, or torch's own message (not ShapeProp's wrapper)."""
    cause: BaseException = err
    while cause.__cause__ is not None and "ShapeProp error" in str(cause):
        cause = cause.__cause__
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    shape = tuple(getattr(example, "shape", ()))
    dtype = getattr(example, "dtype", type(example).__name__)
    advice = input_dtype_advice(example, model)
    problem = advice if advice is not None else (
        "the data does not fit the model: check the batches' shape (channels, image size, features) and dtype")
    return (
        f"{type(model).__name__} cannot run on the example batch of shape {shape} ({dtype}): "
        f"{type(cause).__name__}: {detail}. {problem[0].upper() + problem[1:]}. The example is the first batch of "
        "data= in merge/align_to, or example_input= of merge_graph."
    )


def merge_graph(model: nn.Module, example_input: torch.Tensor | None = None) -> MergeGraph:
    """Derive ``model``'s merge graph from a ``torch.fx`` trace (the model is not modified).

    ``example_input`` (a batch) lets shapes propagate, which fixes the flatten block of conv maps;
    zoo models build one from ``model.config['in_shape']``. Without shapes the block is read off the
    consuming Linear layer. Raises :class:`GraphError` with advice when the model cannot be traced
    or uses layers the automatic graph does not understand.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"merge_graph expects an nn.Module, got {type(model).__name__}")
    advice = wrapper_advice(model)
    if advice is not None:  # fx would blame data-dependent control flow
        raise TypeError(advice)
    # The trace shares the model's modules (no copy: a torchvision VGG is large); eval mode for the
    # block keeps BatchNorm's running statistics and dropout untouched by the shape pass.
    with eval_mode(model), torch.no_grad():
        try:
            gm = torch.fx.symbolic_trace(model)
        except Exception as err:  # fx raises many kinds of errors
            raise GraphError(
                f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}. "
                "Models with data-dependent control flow cannot be traced automatically. " + SPEC_ADVICE
            ) from err
        example = _example_input(model, example_input)
        has_shapes = False
        if example is not None:
            try:
                ShapeProp(gm).propagate(example)
            except Exception as err:
                raise GraphError(_example_failure(model, example, err)) from err
            has_shapes = True
        points = node_point_names(model)  # named by the trace of the same (eval) mode
    builder = _Builder(gm, has_shapes, points)
    for node in gm.graph.nodes:
        builder.visit(node)
    return builder.result(model).validate(model)
