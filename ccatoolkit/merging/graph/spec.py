"""The merge graph's data model: spaces, the parameters each space's transform acts on, and validation.

A *space* is a set of channels that one linear transform acts on: the output side of the layer
that produces it (weight rows, bias, BatchNorm parameters and running statistics) and the input
side of the layers that consume it (weight columns). Tensors added together (residual
connections) share one space. Like git-re-basin's ``PermutationSpec``, a :class:`MergeGraph`
carries both indexes: space -> parameters (``Space.outputs``/``Space.inputs``) and
parameter -> spaces (:attr:`MergeGraph.param_spaces`). :mod:`ccatoolkit.merging.graph.trace`
derives it from a model; :meth:`MergeGraph.from_spec` takes one by hand.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from ccatoolkit.analysis.capture import UnknownLayerError, locate

__all__ = ["GraphError", "ParamRef", "Space", "MergeGraph", "SPEC_ADVICE"]


SPEC_ADVICE = (
    "Give the spec by hand instead: build MergeGraph(spaces=[Space(name, size, capture=[...], "
    "outputs=[ParamRef(...)], inputs=[ParamRef(...)]), ...]) or call MergeGraph.from_spec(model, "
    "{space_name: dict(capture=[module names or 'name_k' calls], outputs=[(param, axis), ...], "
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
    start: int = 0  # the space's first channel along the axis (a segment of a concatenation)
    of: int | None = None  # channels along the axis in all (a concatenation); None: the space's own size
    groups: int = 1  # >1: a grouped convolution's input axis, holding size/groups entries that rows of
    #                  group g (axis 0) read from channels g*size/groups ... (g+1)*size/groups - 1

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or self.block < 1:
            raise GraphError(f"ParamRef {self.name!r}: block must be an integer >= 1, got {self.block!r}")
        if not isinstance(self.groups, int) or self.groups < 1 or (self.groups > 1 and (self.of is not None or self.block > 1)):
            raise GraphError(f"ParamRef {self.name!r}: groups must be an integer >= 1, and a grouped input "
                             f"cannot also be a segment or a flatten block, got groups={self.groups!r}")
        if not isinstance(self.start, int) or self.start < 0 or (self.start and self.of is None):
            raise GraphError(f"ParamRef {self.name!r}: start must be an integer >= 0 and needs 'of' "
                             f"(the channels along the axis in all), got start={self.start!r}, of={self.of!r}")

    @property
    def is_segment(self) -> bool:
        """Whether the space owns only part of the axis (``start .. start + size`` of ``of`` channels)."""
        return self.of is not None


@dataclass
class Space:
    """A set of channels that one transform acts on (see the module docstring).

    ``permutation_only`` (non-empty: the reason, e.g. a depthwise convolution) marks a space whose
    channels only a permutation (or a positive rescaling) may transform: an operation in it acts on
    each channel separately with its own parameters, which a channel-mixing map cannot pass through.
    """

    name: str
    size: int
    capture: list[str] = field(default_factory=list)
    outputs: list[ParamRef] = field(default_factory=list)
    inputs: list[ParamRef] = field(default_factory=list)
    permutation_only: str = ""
    groups: int = 1  # >1: channels form this many contiguous equal blocks that a permutation keeps in place
    # non-empty: the spaces with this label (a grouped convolution's input and output) may also move whole
    # blocks, all by one shared permutation of the blocks (MergeGraph.group_links, match_linked_groups)
    group_link: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.groups, int) or self.groups < 1 or self.size % self.groups:
            raise GraphError(f"space {self.name!r}: groups={self.groups!r} must be a positive divisor of its "
                             f"size {self.size}")
        if self.group_link and self.groups < 2:
            raise GraphError(f"space {self.name!r} has group_link={self.group_link!r} but groups={self.groups}; "
                             "only a space in groups (groups > 1) can move its groups")
        if self.groups > 1 and not self.permutation_only:
            raise GraphError(f"space {self.name!r} has groups={self.groups} and must be permutation_only "
                             "(a map that mixes channels cannot pass a grouped convolution)")


@dataclass
class MergeGraph:
    """A model's transformable activation spaces, in forward order."""

    spaces: list[Space]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.spaces]

    @cached_property
    def param_spaces(self) -> dict[str, list[tuple[str, ParamRef]]]:
        """The parameter -> spaces index: ``{state_dict key: [(space name, ref), ...]}``, in forward order.

        A weight appears under the space of its rows (output side) and of its columns (input side).
        Built once per graph (treat a graph as immutable once built).
        """
        index: dict[str, list[tuple[str, ParamRef]]] = {}
        for space in self.spaces:
            for ref in space.outputs + space.inputs:
                index.setdefault(ref.name, []).append((space.name, ref))
        return index

    @property
    def group_links(self) -> dict[str, list[str]]:
        """``{label: [space names]}``: the spaces whose groups move together (:attr:`Space.group_link`)."""
        links: dict[str, list[str]] = {}
        for s in self.spaces:
            if s.group_link:
                links.setdefault(s.group_link, []).append(s.name)
        return links

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
            outs = ", ".join(r.name + _ref_detail(r, s.size) for r in s.outputs)
            ins = ", ".join(r.name + _ref_detail(r, s.size) for r in s.inputs)
            only = f" permutation only ({s.permutation_only})" if s.permutation_only else ""
            only += f" within {s.groups} groups" if s.groups > 1 else ""
            only += f", groups move with link {s.group_link!r}" if s.group_link else ""
            lines.append(f"{s.name} [{s.size}]{only} capture={s.capture} outputs=[{outs}] inputs=[{ins}]")
        return "\n".join(lines)

    def validate(self, model: nn.Module) -> MergeGraph:
        """Check the graph against ``model``: parameter names, axes (and their roles: a Linear/Conv weight's
        outputs on axis 0, inputs on axis 1), sizes, capture modules.

        Raises :class:`GraphError` naming the first problem; returns ``self`` so calls chain.
        """
        state = model.state_dict()
        modules = dict(model.named_modules())
        seen_names: set[str] = set()
        seen_refs: dict[tuple[str, int], list[tuple[int, int, str]]] = {}  # (param, axis) -> channel ranges
        for s in self.spaces:
            if s.name in seen_names:
                raise GraphError(f"two spaces are called {s.name!r}; space names must be unique")
            seen_names.add(s.name)
            if not isinstance(s.size, int) or s.size < 1:
                raise GraphError(f"space {s.name!r} has size {s.size!r}; it must be a positive integer")
            for point in s.capture:
                try:
                    locate(model, point, modules)
                except UnknownLayerError:
                    raise GraphError(
                        f"space {s.name!r} captures {point!r}, which is not a module of the model (or call "
                        "'name_k' of one)"
                    ) from None
            for side, refs in (("output", s.outputs), ("input", s.inputs)):
                for ref in refs:
                    _check_ref(state, s, side, ref)
                    _check_axis_role(modules, s, side, ref, state[ref.name].dim())
                    ranges = seen_refs.setdefault((ref.name, ref.axis % state[ref.name].dim()), [])
                    lo, hi = ref.start, ref.start + s.size
                    for a, b, other in ranges:
                        if lo < b and a < hi:
                            raise GraphError(
                                f"{ref.name!r} axis {ref.axis} is used by both space {other!r} and space "
                                f"{s.name!r}; each channel of a parameter axis may belong to one space only "
                                "(shared weights are not supported)"
                            )
                    ranges.append((lo, hi, s.name))
        self._validate_group_links()
        return self

    def _validate_group_links(self) -> None:
        """Linked spaces share their number of groups, and a grouped convolution whose input is linked has its
        output (the weight's rows) in the same link: moving groups on one side only would change its function."""
        by_name = {s.name: s for s in self.spaces}
        for label, names in self.group_links.items():
            counts = {by_name[n].groups for n in names}
            if len(counts) > 1:
                raise GraphError(f"group link {label!r}: spaces {names} have different numbers of groups "
                                 f"{sorted(counts)}; linked spaces move one shared permutation of their groups")
        for s in self.spaces:
            for ref in s.inputs:
                if ref.groups <= 1 or not s.group_link:
                    continue
                rows = [name for name, r in self.param_spaces.get(ref.name, []) if r in by_name[name].outputs
                        and r.axis == 0]
                if ref.groups != s.groups or not rows or any(by_name[n].group_link != s.group_link for n in rows):
                    raise GraphError(
                        f"space {s.name!r} (group link {s.group_link!r}) is read in {ref.groups} groups by "
                        f"{ref.name!r}, whose output space {rows[0] if rows else '(none)'!r} is not in the same link "
                        "with as many groups; give both sides of a grouped convolution one group_link, or none")

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
            unknown = set(entry) - {"capture", "outputs", "inputs", "size", "permutation_only", "groups", "group_link"}
            if unknown:
                raise GraphError(
                    f"spec for space {name!r} has unknown keys {sorted(unknown)}; "
                    "valid keys are capture, outputs, inputs, size, permutation_only, groups, group_link"
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
            only = entry.get("permutation_only", "")
            only = ("given in the spec" if only is True else "") if isinstance(only, bool) else str(only)
            spaces.append(Space(name=str(name), size=int(size), capture=capture, outputs=outputs, inputs=inputs,
                                permutation_only=only, groups=int(entry.get("groups", 1)),
                                group_link=str(entry.get("group_link", ""))))
        return cls(spaces).validate(model)


def _ref_detail(ref: ParamRef, size: int) -> str:
    """`` (block b)`` / `` [start:end of n]`` for :meth:`MergeGraph.describe`."""
    detail = f" (block {ref.block})" if ref.block > 1 else ""
    if ref.is_segment:
        detail += f" [{ref.start}:{ref.start + size} of {ref.of}]"
    if ref.groups > 1:
        detail += f" (in {ref.groups} groups)"
    return detail


def _ref_from_item(space: str, key: str, item: Any, with_block: bool) -> ParamRef:
    if isinstance(item, ParamRef):
        return item
    if isinstance(item, str) or not isinstance(item, Sequence) or len(item) not in ((2, 3) if with_block else (2,)):
        form = "(param, axis) or (param, axis, block)" if with_block else "(param, axis)"
        raise GraphError(f"space {space!r}: {key} items must be {form}, got {item!r}")
    name, axis, *rest = item
    block = rest[0] if rest else 1
    if not isinstance(name, str) or int(axis) != axis or int(block) != block or block < 1:
        raise GraphError(f"space {space!r}: bad {key} item {item!r} (want a parameter name, an int axis, block >= 1)")
    return ParamRef(name, int(axis), int(block))


# Layers whose weight holds (outputs, inputs, ...) and, transposed, (inputs, outputs, ...).
_WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED_WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _check_axis_role(modules: Mapping[str, nn.Module], space: Space, side: str, ref: ParamRef, ndim: int) -> None:
    """Refuse a Linear/Conv weight used along the wrong axis for its side.

    A square weight (a Linear(16, 16)) passes the size check with its axes swapped, and the
    transform would then move its inputs where its outputs are meant (a wrong merge, no error).
    """
    owner, _, leaf = ref.name.rpartition(".")
    module = modules.get(owner)
    if leaf != "weight" or not isinstance(module, _WEIGHT_LAYERS + _TRANSPOSED_WEIGHT_LAYERS):
        return
    out_axis, in_axis = (1, 0) if isinstance(module, _TRANSPOSED_WEIGHT_LAYERS) else (0, 1)
    want = out_axis if side == "output" else in_axis
    if ref.axis % ndim != want:
        raise GraphError(
            f"space {space.name!r}: {side} {ref.name!r} is given axis {ref.axis}, but the weight of "
            f"{type(module).__name__} {owner!r} holds its outputs along axis {out_axis} and its inputs along axis "
            f"{in_axis}; use ({ref.name!r}, {want}) among the space's {side}s"
        )


def _check_ref(state: Mapping[str, torch.Tensor], space: Space, side: str, ref: ParamRef) -> None:
    if ref.name not in state:
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
    if ref.is_segment and ref.start + space.size > ref.of:
        raise GraphError(f"space {space.name!r}: {side} {ref.name!r} holds channels {ref.start}..{ref.start + space.size - 1} "
                         f"of a concatenation of {ref.of}; the segment does not fit")
    channels = ref.of if ref.is_segment else space.size
    if ref.groups > 1 and (space.size % ref.groups or space.groups % ref.groups):
        raise GraphError(f"space {space.name!r}: {side} {ref.name!r} reads the space in {ref.groups} groups, "
                         f"but the space keeps {space.groups} groups of its {space.size} channels in place; "
                         "the groups must divide the space's")
    want = channels * ref.block // ref.groups
    if shape[ref.axis] != want:
        detail = f"{channels} channels x block {ref.block}" if ref.block > 1 else f"{channels} channels"
        raise GraphError(
            f"space {space.name!r}: {side} {ref.name!r} has {shape[ref.axis]} entries along axis {ref.axis} "
            f"(shape {shape}) but the space has {detail} = {want}; the sizes are inconsistent"
        )
