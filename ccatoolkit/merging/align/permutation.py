"""Permutation alignment: activation matching (Hungarian on correlations) and weight matching (Git Re-Basin).

A permutation is an index array ``perm`` with ``perm[i]`` = the model's neuron that goes to the
reference's position ``i``. As a transform (column convention) it is ``out = P`` with
``P[i, perm[i]] = 1`` (so ``out @ z = z[perm]``) and ``inp = P^T``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "channel_index",
    "axis_index",
    "channel_rows",
    "grouped_view",
    "group_sources",
    "local_index",
    "match_activations",
    "match_linked_groups",
    "matching_cost",
    "permute_axis",
    "permutation_matrix",
    "permutation_transform",
    "replace_segment",
    "segment",
    "weight_matching",
    "weight_table",
]


def _cost_matrix(corr: np.ndarray | torch.Tensor) -> np.ndarray:
    """``-corr`` as float64 numpy, NaNs and infinities (constant neurons) as zero correlation."""
    C = corr.detach().cpu().double().numpy() if isinstance(corr, torch.Tensor) else np.asarray(corr, dtype=np.float64)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"activation matching needs a square correlation matrix, got shape {C.shape}")
    cost = np.nan_to_num(C, nan=0.0, posinf=0.0, neginf=0.0)
    np.negative(cost, out=cost)
    return cost


def match_activations(corr: np.ndarray | torch.Tensor, groups: int = 1) -> np.ndarray:
    """Hungarian assignment maximising the summed correlation between reference and model neurons.

    ``corr[i, j]`` is the correlation of the reference's neuron ``i`` with the model's neuron ``j``.
    NaNs (constant neurons) count as zero correlation. ``groups > 1`` (a space read by a grouped
    convolution, :attr:`Space.groups`): neurons are matched within each of ``groups`` contiguous
    equal blocks, so every block stays in place. Returns ``perm`` (see module doc).
    """
    # one private copy, made a cost in place (a 4096-wide layer's matrix is 134 MB; maximize=True would copy again)
    cost = _cost_matrix(corr)
    if groups < 1 or cost.shape[0] % groups:
        raise ValueError(f"groups={groups} does not divide the {cost.shape[0]} neurons into equal blocks")
    b = cost.shape[0] // groups
    perm = np.empty(cost.shape[0], dtype=np.int64)
    for g in range(groups):
        block = slice(g * b, (g + 1) * b)
        rows, cols = linear_sum_assignment(cost[block, block])
        perm[g * b + rows] = g * b + cols
    return perm


def match_linked_groups(corrs: Sequence[np.ndarray | torch.Tensor], groups: int) -> list[np.ndarray]:
    """Activation matching for spaces whose groups must move together, e.g. a grouped convolution's input
    and output (:attr:`Space.group_link`): one permutation of the ``groups`` blocks shared by all the
    spaces, and within each block each space's own permutation of its channels.

    A grouped convolution's output group g reads input group g only, so the function is kept when
    model group ``sigma(g)`` moves to position ``g`` on both sides at once. For every pair of blocks
    ``(g, h)`` and every space, the best within-block assignment of the model's block ``h`` to the
    reference's block ``g`` is found (Hungarian); their summed correlations over the spaces form a
    ``groups x groups`` score, and a last Hungarian assignment on it chooses ``sigma``. With one group
    this is :func:`match_activations` for each space. Returns one ``perm`` per space, in order.
    """
    costs = [_cost_matrix(c) for c in corrs]
    if not costs:
        return []
    if groups < 1 or any(c.shape[0] % groups for c in costs):
        raise ValueError(f"groups={groups} does not divide every linked space's neurons into equal blocks "
                         f"(sizes {[c.shape[0] for c in costs]})")
    widths = [c.shape[0] // groups for c in costs]
    total = np.zeros((groups, groups))
    local: list[dict[tuple[int, int], np.ndarray]] = [{} for _ in costs]
    for cost, b, best in zip(costs, widths, local):
        for g in range(groups):
            for h in range(groups):
                block = cost[g * b:(g + 1) * b, h * b:(h + 1) * b]
                rows, cols = linear_sum_assignment(block)  # square: rows is arange(b)
                best[g, h] = cols
                total[g, h] += block[rows, cols].sum()
    rows, sigma = linear_sum_assignment(total)  # a cost: minimised
    perms = []
    for b, best in zip(widths, local):
        perm = np.empty(b * groups, dtype=np.int64)
        for g, h in zip(rows, sigma):
            perm[g * b:(g + 1) * b] = h * b + best[g, h]
        perms.append(perm)
    return perms


def permutation_matrix(perm: torch.Tensor | Sequence[int] | np.ndarray) -> torch.Tensor:
    """The matrix ``P`` with ``P[i, perm[i]] = 1`` so that ``(P @ z)[i] = z[perm[i]]`` (float64, on ``perm``'s device)."""
    perm = torch.as_tensor(perm, dtype=torch.long)
    n = perm.numel()
    if perm.dim() != 1 or not torch.equal(torch.sort(perm.cpu()).values, torch.arange(n)):
        raise ValueError(f"not a permutation of 0..{n - 1}: {perm.tolist()[:20]}")
    P = torch.zeros(n, n, dtype=torch.float64, device=perm.device)
    P[torch.arange(n, device=perm.device), perm] = 1.0
    return P


def permutation_transform(perm: torch.Tensor | Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(out, inp)`` pair of a permutation: ``(P, P^T)``, the inverse a view of ``P`` (a 4096-wide space's
    matrix is 134 MB: held once, not twice; transforms are read, never written)."""
    P = permutation_matrix(perm)
    return P, P.T


# --- weight matching -------------------------------------------------------------------------------


def channel_index(perm: np.ndarray | torch.Tensor, block: int, device: torch.device | None = None) -> torch.Tensor:
    """The entries along an axis that a channel permutation ``perm`` selects, ``block`` entries per channel
    (channel ``c`` owns entries ``c*block .. c*block + block-1``, as after a channel-major flatten)."""
    idx = torch.as_tensor(perm, dtype=torch.long, device=device)
    if block > 1:
        idx = (idx[:, None] * block + torch.arange(block, device=idx.device)[None, :]).reshape(-1)
    return idx


def axis_index(perm: np.ndarray | torch.Tensor, ref: Any, length: int, device: torch.device | None = None
               ) -> torch.Tensor:
    """The index along ``ref``'s axis (``length`` entries) that permutes the space's channels by ``perm``.

    ``ref`` is a :class:`~ccatoolkit.merging.graph.ParamRef`: ``block`` entries per channel, and for a
    segment of a concatenation (``ref.start``) the other spaces' entries stay where they are.
    """
    idx = channel_index(perm, ref.block, device)
    if idx.numel() == length:
        return idx
    full = torch.arange(length, device=idx.device)
    first = ref.start * ref.block
    full[first:first + idx.numel()] = idx + first
    return full


def grouped_view(W: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped convolution's weight ``(C_out, C_in/groups, ...)`` as ``(groups, C_out/groups, C_in/groups, ...)``."""
    return W.reshape(groups, W.shape[0] // groups, *W.shape[1:])


def group_sources(perm: np.ndarray | torch.Tensor, groups: int, device: torch.device | None = None) -> torch.Tensor:
    """For each of the ``groups`` blocks of ``perm``, the block its entries come from (``perm`` must move
    whole blocks: every entry of block g from one block ``sigma(g)``); ``arange(groups)`` when it keeps them."""
    idx = torch.as_tensor(perm, dtype=torch.long, device=device).view(groups, -1)
    src = torch.div(idx, idx.shape[1], rounding_mode="floor")
    if not bool((src == src[:, :1]).all()):
        raise ValueError(f"the permutation moves channels between the {groups} groups of a grouped convolution "
                         "other than as whole groups; only permutations within each group, and moves of whole "
                         "groups shared by its input and output, keep its function")
    return src[:, 0]


def local_index(perm: np.ndarray | torch.Tensor, groups: int, device: torch.device | None = None) -> torch.Tensor:
    """``perm`` (which moves whole blocks, :func:`group_sources`) as a ``(groups, size/groups)`` index within
    each block: new block g's channel j is entry ``local[g, j]`` of old block ``sigma(g)``."""
    idx = torch.as_tensor(perm, dtype=torch.long, device=device).view(groups, -1)
    return idx - group_sources(idx, groups)[:, None] * idx.shape[1]


def permute_axis(W: torch.Tensor, perm: np.ndarray | torch.Tensor, ref: Any) -> torch.Tensor:
    """Index ``W`` along ``ref.axis`` by ``perm`` (a channel permutation of ``ref``'s space).

    A grouped convolution's input axis (``ref.groups > 1``) is indexed within each group of rows. When
    ``perm`` also moves whole groups, the rows must have been moved first (by the output space's
    permutation, which moves the same groups): row group g then holds the old group ``sigma(g)`` whose
    input channels ``perm`` brings to g (see ``transformed_tensors``, which orders the steps so).
    """
    if ref.groups > 1:
        view = grouped_view(W, ref.groups)
        local = local_index(perm, ref.groups, W.device)
        index = local.view(ref.groups, 1, -1, *([1] * (W.dim() - 2))).expand(*view.shape[:2], -1, *view.shape[3:])
        return view.gather(2, index).reshape(W.shape)
    return W.index_select(ref.axis, axis_index(perm, ref, W.shape[ref.axis], W.device))


def segment(W: torch.Tensor, ref: Any, size: int) -> torch.Tensor:
    """The entries of ``W`` along ``ref.axis`` that belong to ``ref``'s space of ``size`` channels (a view)."""
    if not ref.is_segment:
        return W
    return W.narrow(ref.axis, ref.start * ref.block, size * ref.block)


def replace_segment(W: torch.Tensor, ref: Any, values: torch.Tensor) -> torch.Tensor:
    """``W`` with ``ref``'s segment along its axis replaced by ``values`` (a new tensor; ``W`` unchanged)."""
    if not ref.is_segment:
        return values
    first = ref.start * ref.block
    rest = W.shape[ref.axis] - first - values.shape[ref.axis]
    return torch.cat([W.narrow(ref.axis, 0, first), values.to(W.dtype),
                      W.narrow(ref.axis, W.shape[ref.axis] - rest, rest)], dim=ref.axis)


def channel_rows(W: torch.Tensor, ref: Any, size: int) -> torch.Tensor:
    """``W`` as a ``(size, -1)`` matrix whose rows are the channels of ``ref``'s space."""
    if ref.groups > 1:  # channel g*b + j: entry j of the rows of group g
        view = grouped_view(W, ref.groups).movedim(2, 1)
        return view.reshape(size, -1)
    W = segment(W, ref, size).movedim(ref.axis, 0)
    if ref.block > 1:
        W = W.reshape(size, ref.block, *W.shape[1:])
    return W.reshape(size, -1)


WeightTable = dict[str, list[tuple[str, Any]]]


def weight_table(state: Mapping[str, torch.Tensor], graph: Any, param_names: set[str] | None = None) -> WeightTable:
    """``{weight name: [(space, ParamRef), ...]}``: the weights weight matching compares and their spaces.

    ``param_names`` restricts the weights (default: every floating tensor of ``state`` the graph
    names except BatchNorm running statistics).
    """
    names = set(param_names) if param_names is not None else {
        n for n, t in state.items()
        if torch.is_floating_point(t) and not n.endswith(("running_mean", "running_var"))
    }
    return {pname: list(entries) for pname, entries in graph.param_spaces.items() if pname in names}


def matching_cost(
    reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], table: WeightTable,
    perms: Mapping[str, np.ndarray], space: str, size: int,
) -> torch.Tensor:
    """Weight matching's cost for one space: ``sum_W rows_s(W_ref) @ rows_s(W_model)^T`` (``size x size``).

    Entry ``[i, j]``: how well the model's channel ``j`` fits the reference's channel ``i``, with the
    model's other axes permuted by the other spaces' ``perms``. Float64 on the tensors' device.
    """
    C: torch.Tensor | None = None
    for pname, entries in table.items():
        for s, ref in entries:
            if s != space:
                continue
            W = model[pname]
            for other, o_ref in entries:
                if o_ref.axis % W.dim() != ref.axis % W.dim():  # other segments of this axis are cut away by channel_rows
                    W = permute_axis(W, perms[other], o_ref)
            term = channel_rows(reference[pname], ref, size) @ channel_rows(W, ref, size).T
            C = term if C is None else C + term
    return C if C is not None else torch.zeros(size, size, dtype=torch.float64)


def weight_matching(
    reference_state: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    graph: Any,
    *,
    max_iter: int = 100,
    seed: int = 0,
    param_names: set[str] | None = None,
) -> dict[str, np.ndarray]:
    """Git Re-Basin weight matching: per-space permutations of ``model_state`` towards ``reference_state``.

    For a space ``s`` the cost is ``C_s = sum_W rows_s(W_ref) @ rows_s(W_model)^T`` over the weights
    touching ``s`` (its output-side rows and its input-side columns), with the other spaces' current
    permutations applied to the model's other axes. Coordinate descent over spaces in random order
    (Hungarian per space) until a full pass brings no improvement or ``max_iter`` passes.
    ``param_names`` restricts the weights used (default: every floating tensor the graph names
    except BatchNorm running statistics). Returns ``{space name: perm}``.
    """
    table = weight_table(reference_state, graph, param_names)
    sizes = {s.name: int(s.size) for s in graph.spaces}
    groups = {s.name: int(s.groups) for s in graph.spaces}
    perms = {s: np.arange(n) for s, n in sizes.items()}
    ref = {n: reference_state[n].detach().double().cpu() for n in table}
    mod = {n: model_state[n].detach().double().cpu() for n in table}
    rng = np.random.default_rng(seed)
    order = list(sizes)
    for _ in range(max_iter):
        improved = False
        for i in rng.permutation(len(order)):
            s = order[i]
            n = sizes[s]
            C = matching_cost(ref, mod, table, perms, s, n)
            Cn = C.numpy()
            new = match_activations(Cn, groups[s])
            gain = Cn[np.arange(n), new].sum() - Cn[np.arange(n), perms[s]].sum()
            if gain > 1e-12 * max(1.0, abs(Cn[np.arange(n), perms[s]].sum())):
                perms[s] = new
                improved = True
        if not improved:
            break
    return perms
