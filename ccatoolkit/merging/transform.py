"""Apply per-space linear transforms to a model's weights, returning a new model.

Convention (docs/design.md): for a space with transform pair ``(out, inp)`` the model's features
``z`` become ``out @ z``. Output-side weights are left-multiplied by ``out`` along their axis
(BatchNorm ``running_var`` by ``out**2`` elementwise), input-side weights are right-multiplied by
``inp`` along their axis (a Flatten's ``block`` features of one channel move together).
``inp = out^-1`` keeps the function for permutations and positive rescalings.

BatchNorm divides by ``sqrt(running_var + eps)``, so a variance transforms exactly only together
with its ``eps``: ``running_var`` becomes ``out**2 @ (running_var + eps) - eps`` (clamped at 0).
That is exact for scaled permutations even when ``running_var`` is near ``eps``, and equals the
plain ``out**2 @ running_var`` for permutations.

Permutations: ``perm`` means "new channel ``i`` is old channel ``perm[i]``", i.e. the matrix
``P[i, perm[i]] = 1`` (see :func:`~ccatoolkit.merging.align.permutation.permutation_matrix`); :func:`apply_permutations` applies it
exactly by indexing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ccatoolkit._utils import model_device
from ccatoolkit.analysis.linalg import DiagonalPlusLowRank, as_dense
from ccatoolkit.merging.align.permutation import (
    axis_index,
    group_sources,
    grouped_view,
    permutation_transform,
    permute_axis,
    replace_segment,
    segment,
)
from ccatoolkit.merging.graph import MergeGraph, ParamRef, Space

__all__ = [
    "add_into",
    "add_transformed",
    "apply_transforms",
    "transformed_state",
    "transformed_tensors",
    "apply_permutations",
    "permutation_transforms",
    "random_permutations",
    "random_scalings",
]


def _variance_eps(model: nn.Module, ref: ParamRef) -> float | None:
    """The BatchNorm ``eps`` when ``ref`` is a running variance (0 for a non-BatchNorm owner), else None."""
    owner, _, leaf = ref.name.rpartition(".")
    if leaf != "running_var":
        return None
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return 0.0
    return float(getattr(module, "eps", 0.0)) if isinstance(module, nn.modules.batchnorm._NormBase) else 0.0


Map = torch.Tensor | DiagonalPlusLowRank  # one side of a space's transform: a matrix, or CCA's in factors

#: Dense transforms of tensors up to this many entries run in float64; larger ones in their own dtype.
_FLOAT64_ENTRIES = 1 << 22


def scaled_permutation_parts(matrix: Map) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(index, scale)`` with ``matrix[i, index[i]] = scale[i]`` the only nonzero of row ``i``, when
    ``matrix`` is a scaled permutation; None otherwise (a map that mixes channels)."""
    if isinstance(matrix, DiagonalPlusLowRank):  # a diagonal only when it has no low-rank term
        return scaled_permutation_parts(torch.diag(matrix.diagonal)) if matrix.left.shape[1] == 0 else None
    if matrix.shape[0] and int((matrix[0] != 0).sum()) != 1:  # a dense map, told by its first row
        return None
    nonzero = matrix != 0
    if not bool((nonzero.sum(1) == 1).all()):
        return None
    index = nonzero.to(torch.int8).argmax(1)
    if torch.unique(index).numel() != index.numel():
        return None
    return index, matrix.gather(1, index[:, None])[:, 0]


_Parts = tuple[torch.Tensor, torch.Tensor] | None  # scaled_permutation_parts of a map (None: it mixes channels)


def _left(tensor: torch.Tensor, ref: ParamRef, matrix: Map, sparse: _Parts, owned: bool = False,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """``matrix @ tensor`` along ``ref.axis``; channel-major blocks of ``ref.block`` entries move together.

    ``sparse`` is ``scaled_permutation_parts(matrix)``, found once per map by the caller (a map moves
    every tensor of its space). A (scaled) permutation is applied by indexing, exactly and in the tensor's own dtype (no dense
    product: a permuted 25088 x 4096 classifier costs a copy, not a 512 x 512 x 2M product); any
    other map by a product cast back to the tensor's dtype, in float64 up to ``_FLOAT64_ENTRIES``
    entries and in the tensor's own precision (at least float32) above: a CCA map on VGG's
    4096 x 25088 classifier is 8e11 multiply-adds, twice as fast and half the memory in float32,
    whose rounding (1e-7 relative) is far below what merging changes. A map in factors
    (:class:`~ccatoolkit.analysis.linalg.DiagonalPlusLowRank`) costs ``2k/n`` of the dense product, and works
    in place on a tensor an earlier step made (``owned``).

    Memory: a large tensor's input side (a channel axis after the first, with entries behind each channel,
    such as VGG's 25088 = 512 x 7 x 7 classifier inputs) is mapped as a batch of products on a view of it,
    not on a channel-major copy: one new tensor instead of two (0.4 GB less for that classifier).
    ``dtype``: the products' precision, when a block of a larger tensor is mapped (see :func:`add_transformed`).
    """
    if sparse is not None and ref.groups > 1:  # a grouped convolution's input: index within each group of rows
        index, scale = sparse
        out = permute_axis(tensor, index, ref)
        if not bool((scale == 1).all()):
            view = grouped_view(out, ref.groups)
            shape = (ref.groups, 1, -1, *([1] * (tensor.dim() - 2)))
            out = (view * scale.to(tensor).view(shape)).reshape(tensor.shape)
        return out
    if ref.groups > 1:
        raise ValueError(f"{ref.name!r} is a grouped convolution's input; only (scaled) permutations within each "
                         "group can transform it")
    if sparse is not None:
        index, scale = sparse
        out = tensor.index_select(ref.axis, axis_index(index, ref, tensor.shape[ref.axis], tensor.device))
        return _scale_axis(out, ref, scale)
    n = matrix.shape[1]
    part = segment(tensor, ref, n)
    dtype = dtype or _precision(part)
    outer = math.prod(part.shape[: ref.axis])
    inner = part.numel() // max(1, outer * n)
    if dtype != torch.float64 and ref.axis > 0 and inner > 1 and part.is_contiguous() \
            and not isinstance(matrix, DiagonalPlusLowRank):  # a batch of products on a view (see above)
        out = torch.matmul(matrix.to(dtype), part.view(outer, n, inner).to(dtype))
        return replace_segment(tensor, ref, out.to(tensor.dtype).view(part.shape))
    moved = part.movedim(ref.axis, 0)
    shape = moved.shape
    flat = moved.reshape(n, -1)
    if owned and isinstance(matrix, DiagonalPlusLowRank) and flat.dtype == dtype and not ref.is_segment:
        out = matrix.multiply_in_place(flat)  # the earlier step's tensor is overwritten: no new one
    else:
        out = (matrix.to(dtype) @ flat.to(dtype)).to(tensor.dtype)
    return replace_segment(tensor, ref, out.reshape(shape).movedim(0, ref.axis))


def _precision(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a dense map of ``tensor`` is computed in (see :func:`_left`)."""
    return torch.float64 if tensor.numel() <= _FLOAT64_ENTRIES else torch.promote_types(tensor.dtype, torch.float32)


def _scale_axis(out: torch.Tensor, ref: ParamRef, scale: torch.Tensor) -> torch.Tensor:
    """``out`` (a new tensor) with the space's channels along ``ref.axis`` multiplied by ``scale``, in place."""
    if bool((scale == 1).all()):
        return out
    full = torch.ones(out.shape[ref.axis], dtype=out.dtype, device=out.device)
    first = ref.start * ref.block
    full[first:first + scale.numel() * ref.block] = scale.to(out).repeat_interleave(ref.block)
    shape = [1] * out.dim()
    shape[ref.axis] = -1
    return out.mul_(full.view(shape))


# one transform acting on a tensor: (its ref, the map, the map's scaled_permutation_parts, a space's output?)
_Step = tuple[ParamRef, Map, _Parts, bool]


def _permuted_both_axes(tensor: torch.Tensor, steps: list[_Step]) -> torch.Tensor | None:
    """Rows and columns of ``tensor`` moved by two (scaled) permutations in one gather, or None when the
    steps are not that. Two ``index_select`` calls would hold two new copies at once: 0.8 GB for the
    first classifier layer of a torchvision VGG (4096 x 25088)."""
    if len(steps) != 2 or tensor.dim() < 2 or {ref.axis for ref, *_ in steps} != {0, 1}:
        return None
    if any(sparse is None or ref.groups > 1 for ref, _, sparse, _ in steps):  # (a running variance is 1-D)
        return None
    index = {ref.axis: axis_index(sparse[0], ref, tensor.shape[ref.axis], tensor.device)
             for ref, _, sparse, _ in steps}
    out = tensor[index[0][:, None], index[1][None, :]]
    for ref, _, sparse, _ in steps:  # in the steps' order: the same rounding as two steps
        out = _scale_axis(out, ref, sparse[1])
    return out


def _check_pair(space: Space, pair: object) -> tuple[Map, Map]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(
            f"transform for space {space.name!r} must be a pair (out, inp) of matrices, got {type(pair).__name__}"
        )
    out, inp = (m if isinstance(m, DiagonalPlusLowRank) else torch.as_tensor(m) for m in pair)
    for label, m in (("out", out), ("inp", inp)):
        if m.shape != (space.size, space.size):
            raise ValueError(
                f"transform {label!r} for space {space.name!r} has shape {tuple(m.shape)}, "
                f"expected ({space.size}, {space.size})"
            )
    return out, inp


def _is_scaled_permutation(matrix: torch.Tensor) -> bool:
    """Whether every row and column of ``matrix`` has at most one nonzero entry (a scaled permutation)."""
    nonzero = as_dense(matrix).abs() > 1e-12
    return bool((nonzero.sum(0) <= 1).all() and (nonzero.sum(1) <= 1).all())


def _space_of(graph: MergeGraph, name: str) -> Space:
    try:
        return graph.space(name)
    except KeyError as err:
        raise KeyError(str(err.args[0])) from None


def apply_transforms(
    model: nn.Module, graph: MergeGraph, transforms: Mapping[str, tuple[Map, Map]]
) -> nn.Module:
    """A copy of ``model`` with every space's ``(out, inp)`` transform applied (others unchanged).

    Permutations are applied by indexing, other maps in float64 on the model's device, cast back
    to each tensor's dtype (:func:`transformed_state`); ``model`` is never modified.
    """
    new = copy.deepcopy(model)
    new.load_state_dict(transformed_state(model, graph, transforms))
    return new


def _grouped_input_last(name: str, moves: list[tuple[ParamRef, torch.Tensor | None]]) -> list[int]:
    """The order in which to apply ``moves`` (``(ref, channel index or None for a dense map)``) to tensor
    ``name``: a grouped convolution's input last, after its rows, and only when both sides move the same
    whole groups (see :func:`~ccatoolkit.merging.align.permutation.permute_axis`)."""
    order = sorted(range(len(moves)), key=lambda i: moves[i][0].groups > 1)
    grouped = [i for i in order if moves[i][0].groups > 1]
    if not grouped:
        return order
    ref, index = moves[grouped[0]]
    if index is None:  # a dense map: refused with its own message by _left
        return order
    moved = group_sources(index, ref.groups)
    rows = [m for i, m in enumerate(moves) if i not in grouped and m[0].axis == 0]
    if rows and rows[0][1] is not None:
        kept = group_sources(rows[0][1], ref.groups)
    else:
        kept = torch.arange(ref.groups)
    if not torch.equal(moved.cpu(), kept.cpu()):
        raise ValueError(
            f"{name!r} is a grouped convolution's weight: its input channels move the groups to "
            f"{moved.tolist()} but its output channels to {kept.tolist()}; a grouped convolution keeps its function "
            "only when both sides move the same whole groups (one Space.group_link for both spaces, as "
            "merge_graph derives it)")
    return order


def transformed_state(
    model: nn.Module, graph: MergeGraph, transforms: Mapping[str, tuple[Map, Map]]
) -> dict[str, torch.Tensor]:
    """The state dict that :func:`apply_transforms` loads: transformed tensors are new, the others are
    ``model``'s own (not copied). See :func:`transformed_tensors`."""
    return {**model.state_dict(), **dict(transformed_tensors(model, graph, transforms))}


def transformed_tensors(
    model: nn.Module, graph: MergeGraph, transforms: Mapping[str, tuple[Map, Map]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for each state tensor the transforms change, one at a time, in state order.

    Every transform touching a tensor (its rows as a space's output, its columns as another's input)
    is applied before it is yielded, in the order of ``transforms``; each product runs in float64 up to
    ``_FLOAT64_ENTRIES`` entries (:func:`_left`) and is cast back to the tensor's dtype at once. Memory
    holds one transformed tensor (and its predecessor while it is made), not a transformed model: a
    merge averages a torchvision VGG11 (0.5 GB) without a second copy of it.
    """
    state, steps = _steps(model, graph, transforms)
    for name in [n for n in state if n in steps]:
        yield name, _transformed(model, state[name].detach(), steps[name], name)


def _steps(model: nn.Module, graph: MergeGraph,
           transforms: Mapping[str, tuple[Map, Map]]) -> tuple[dict[str, torch.Tensor], dict[str, list[_Step]]]:
    """The model's state and, per state tensor the transforms change, the steps that change it (checked)."""
    device = model_device(model)
    state = model.state_dict()
    steps: dict[str, list[_Step]] = {}
    for name, pair in transforms.items():
        space = _space_of(graph, name)
        out, inp = _check_pair(space, pair)
        if space.permutation_only and not _is_scaled_permutation(out):
            raise ValueError(
                f"space {space.name!r} admits only permutations ({space.permutation_only}), but its transform "
                "mixes channels; use a permutation (or positive rescaling) there"
            )
        out = out.to(device=device, dtype=torch.float64)
        inp = inp.to(device=device, dtype=torch.float64)
        out_parts, inp_parts = scaled_permutation_parts(out), scaled_permutation_parts(inp.T)
        for ref in space.outputs:
            steps.setdefault(ref.name, []).append((ref, out, out_parts, True))
        for ref in space.inputs:
            steps.setdefault(ref.name, []).append((ref, inp.T, inp_parts, False))
    missing = [n for n in steps if n not in state]
    if missing:
        raise KeyError(f"merge graph refers to {missing[0]!r}, which is not in the model's state_dict")
    return state, steps


def _transformed(model: nn.Module, tensor: torch.Tensor, steps: list[_Step], name: str) -> torch.Tensor:
    """``tensor`` (the state entry ``name``) with every step applied (see :func:`transformed_tensors`)."""
    both = _permuted_both_axes(tensor, steps)
    if both is not None:
        return both
    dtype = tensor.dtype
    order = _grouped_input_last(name, [(ref, None if sparse is None else sparse[0]) for ref, _, sparse, _ in steps])
    for step, (ref, matrix, sparse, is_output) in enumerate(steps[i] for i in order):
        eps = _variance_eps(model, ref) if is_output else None
        if eps is None:  # after the first step the tensor is this function's own
            tensor = _left(tensor, ref, matrix, sparse, owned=step > 0)
        else:  # a running variance: the diagonal of out C out^T, with BatchNorm's eps kept
            squared = None if sparse is None else (sparse[0], sparse[1] * sparse[1])
            dense = as_dense(matrix)
            var = _left(tensor.to(torch.float64) + eps, ref, dense * dense, squared) - eps
            tensor = var.clamp_min(0.0).to(dtype)
    return tensor


#: Entries of one block of rows when a large weight is mapped into a merged model block by block.
_BLOCK_ENTRIES = 1 << 22


def add_transformed(model: nn.Module, graph: MergeGraph, transforms: Mapping[str, tuple[Map, Map]],
                    into: Mapping[str, torch.Tensor], first: bool) -> set[str]:
    """Copy (``first``) or add each state tensor the transforms change into ``into[name]``; returns their names.

    What a merge's averaging does with :func:`transformed_tensors`, without holding a transformed copy of a
    large weight: one whose rows are moved by a (scaled) permutation or a map in factors, or not at all, is
    mapped and added a block of rows at a time (:func:`_add_by_rows`). Others go whole, one at a time.
    """
    state, steps = _steps(model, graph, transforms)
    changed = set()
    for name in [n for n in state if n in steps]:
        tensor, target = state[name].detach(), into[name]
        changed.add(name)
        if _add_by_rows(tensor, steps[name], target, first):
            continue
        add_into(target, _transformed(model, tensor, steps[name], name), first)  # freed before the next is made
    return changed


def add_into(target: torch.Tensor, value: torch.Tensor, first: bool) -> None:
    """Copy (``first``) or add ``value`` into ``target``, in ``target``'s dtype: one model's share of an average."""
    if first:
        target.copy_(value)
    else:
        target.add_(value.to(target.dtype))


def _add_by_rows(tensor: torch.Tensor, steps: list[_Step], target: torch.Tensor, first: bool) -> bool:
    """Map a large weight and copy or add it into ``target`` a block of rows at a time; False (nothing done)
    where that does not apply: a small or 1-D tensor, grouped or segmented steps, rows moved in blocks or by a
    dense map (whose every output row needs every input row mapped).

    The columns' maps act on each block of rows alone. Rows moved by a (scaled) permutation are gathered per
    block; a map in factors ``diag(d) + L R^T`` takes two passes over the source's blocks: ``R^T X`` summed over
    them, then each block's ``d X + L (R^T X)``, whose columns are then mapped.
    """
    if tensor.numel() <= _FLOAT64_ENTRIES or tensor.dim() < 2 or not torch.is_floating_point(target):
        return False
    if any(ref.groups > 1 or ref.is_segment for ref, *_ in steps):
        return False
    rows = [s for s in steps if s[0].axis == 0]
    cols = [s for s in steps if s[0].axis != 0]
    if len(rows) > 1 or (rows and rows[0][0].block != 1):
        return False
    row = rows[0] if rows else None
    if row is not None and row[2] is None and not isinstance(row[1], DiagonalPlusLowRank):
        return False
    dtype = _precision(tensor)
    per = max(1, _BLOCK_ENTRIES // max(1, tensor[0].numel()))
    blocks = [slice(r, min(r + per, tensor.shape[0])) for r in range(0, tensor.shape[0], per)]

    gathered = row is not None and row[2] is not None  # rows moved by a (scaled) permutation

    def mapped(part: torch.Tensor, owned: bool) -> torch.Tensor:  # a block of rows with its columns mapped
        for step, (ref, matrix, sparse, _) in enumerate(cols):
            part = _left(part, ref, matrix, sparse, owned=owned or step > 0, dtype=dtype)
        return part

    if row is None or gathered:  # each block of rows is its own
        for block in blocks:
            if gathered:
                part = mapped(tensor.index_select(0, row[2][0][block].to(tensor.device)), owned=True)
                part = _scale_axis(part, row[0], row[2][1][block])  # (the block's own rows: a segment never comes here)
            else:
                part = mapped(tensor[block], owned=False)
            add_into(target[block], part, first)
        return True
    # rows and columns map independently (M X C^T = (M X) C^T): the rows first, on the source's own blocks, so
    # the columns are mapped once per block
    factors = row[1].to(dtype=dtype)
    low = None  # R^T X, summed over the blocks
    for block in blocks:
        source, right = tensor[block].to(dtype).reshape(block.stop - block.start, -1), factors.right[block].T
        low = right @ source if low is None else low.addmm_(right, source)
    assert low is not None
    for block in blocks:
        source = tensor[block]
        rows_mapped = (factors.diagonal[block, None] * source.to(dtype).reshape(block.stop - block.start, -1))
        rows_mapped = rows_mapped.addmm_(factors.left[block], low).view(source.shape)
        add_into(target[block], mapped(rows_mapped, owned=True), first)
    return True


def permutation_transforms(perms: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{space: (P, P^T)}`` for :func:`apply_transforms` from ``{space: perm}``."""
    return {name: permutation_transform(perm) for name, perm in perms.items()}


def apply_permutations(model: nn.Module, graph: MergeGraph, perms: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with channels permuted per space (exact, by indexing; ``model`` unchanged).

    Same result as ``apply_transforms(model, graph, permutation_transforms(perms))``.
    """
    state = model.state_dict()
    moves: dict[str, list[tuple[ParamRef, torch.Tensor]]] = {}
    for name, perm in perms.items():
        space = _space_of(graph, name)
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.shape != (space.size,) or not torch.equal(
            torch.sort(perm.cpu()).values, torch.arange(space.size)
        ):
            raise ValueError(
                f"permutation for space {space.name!r} must be a permutation of 0..{space.size - 1} "
                f"(shape ({space.size},)), got shape {tuple(perm.shape)}"
            )
        for ref in space.outputs + space.inputs:
            if ref.name not in state:
                raise KeyError(f"merge graph refers to {ref.name!r}, which is not in the model's state_dict")
            moves.setdefault(ref.name, []).append((ref, perm))
    work: dict[str, torch.Tensor] = {}
    for pname, items in moves.items():
        tensor = state[pname]
        for i in _grouped_input_last(pname, items):
            tensor = permute_axis(tensor, items[i][1], items[i][0])
        work[pname] = tensor
    new = copy.deepcopy(model)
    if work:
        new.load_state_dict({**state, **work})
    return new


def random_permutations(graph: MergeGraph, generator: torch.Generator | None = None,
                        move_groups: bool = False) -> dict[str, torch.Tensor]:
    """A random permutation for every space (``{space: LongTensor}``), for function-preserving copies.

    A space read by a grouped convolution (``Space.groups > 1``) is permuted within its groups;
    ``move_groups``: linked spaces (:attr:`Space.group_link`) also move their groups, by one random
    permutation of the groups per link (what weight matching and C2M3, which keep groups in place,
    cannot undo)."""
    moved = {label: torch.randperm(graph.space(names[0]).groups, generator=generator) if move_groups
             else torch.arange(graph.space(names[0]).groups) for label, names in graph.group_links.items()}
    result = {}
    for s in graph.spaces:  # within each block a grouped convolution reads (one block: any permutation)
        b = s.size // s.groups
        sources = moved.get(s.group_link, torch.arange(s.groups))  # an unlinked space ("") keeps its groups
        result[s.name] = torch.cat([int(h) * b + torch.randperm(b, generator=generator) for h in sources])
    return result


def random_scalings(
    graph: MergeGraph,
    generator: torch.Generator | None = None,
    low: float = 0.5,
    high: float = 2.0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Positive diagonal rescalings ``{space: (diag(s), diag(1/s))}`` with ``s`` uniform in [low, high].

    Keep a ReLU network's function: spaces are followed by positively homogeneous operations
    (ReLU, max/avg pooling, BatchNorm whose weight, bias and running statistics scale along, exact
    in eval mode thanks to the ``eps``-aware variance rule of :func:`apply_transforms`).
    """
    if not 0 < low <= high:
        raise ValueError(f"random_scalings needs 0 < low <= high, got low={low}, high={high}")
    result = {}
    for s in graph.spaces:
        scale = low + (high - low) * torch.rand(s.size, generator=generator, dtype=torch.float64)
        result[s.name] = (torch.diag(scale), torch.diag(1.0 / scale))
    return result
