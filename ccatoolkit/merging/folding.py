"""Fold BatchNorm into the layer that feeds it, so that a general linear map transforms a space exactly.

A CCA (or ZipIt!) transform mixes channels. A per-channel BatchNorm cannot represent a mixed
channel: applying the transform to its weight, bias and running statistics as vectors is exact
only for (scaled) permutations. In eval mode, though, ``BN(W x + b)`` is itself an affine map
``diag(s) W x + c`` with ``s = gamma / sqrt(var + eps)`` and ``c = beta + s (b - mean)``. Folded
into the producing Linear/Conv, a space's output side is just rows of weights and a bias vector,
and ``out @ (W' x + c)`` is exact for any ``out``.

:func:`fold_batchnorm` keeps the architecture: the producer takes ``diag(s) W`` (its bias, if it
has one, becomes 0) and the BatchNorm becomes a neutral layer that adds ``c``: weight 1, running
mean 0, running variance ``1 - eps``, bias ``c``. The folded model has the same class and
state_dict keys and computes the same eval-mode function. :func:`folded_graph` drops the neutral
BatchNorm entries from each space's output side, so a transform touches only what it should.
After merging, :func:`ccatoolkit.merging.normalization.repair_batchnorm` gives the merged model's
BatchNorm layers statistics that mean something again.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ccatoolkit._utils import BATCHNORM_TYPES, LINEAR_LAYER_TYPES
from ccatoolkit.merging.graph import MergeGraph

__all__ = ["batchnorm_producers", "foldable_batchnorms", "fold_batchnorm", "folded_graph"]


def batchnorm_producers(model: nn.Module) -> dict[str, str]:
    """``{batchnorm module: the Linear/Conv module whose output is its only input}``, from a ``torch.fx`` trace.

    A BatchNorm that follows anything else (a residual sum, the network input, a pooling) is left
    out. An untraceable model gives ``{}``: nothing is folded.
    """
    try:
        gm = torch.fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception:  # fx raises many kinds of errors; the merge graph reports them where it matters
        return {}
    modules = dict(gm.named_modules())
    uses: dict[torch.fx.Node, int] = {}
    for node in gm.graph.nodes:
        for arg in node.all_input_nodes:
            uses[arg] = uses.get(arg, 0) + 1
    pairs: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[str(node.target)], BATCHNORM_TYPES):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(modules[str(source.target)], LINEAR_LAYER_TYPES)
            and uses.get(source, 0) == 1  # the raw producer output is not used elsewhere
        ):
            pairs[str(node.target)] = str(source.target)
    return pairs


def foldable_batchnorms(model: nn.Module, graph: MergeGraph) -> dict[str, str]:
    """The output-side BatchNorm layers of ``graph``'s spaces that can be folded exactly, with their producers.

    Exact folding needs running statistics (eval mode uses them) and a place for the shift: the
    BatchNorm's own bias (affine) or the producer's bias. The producer must belong to the same space.
    """
    modules = dict(model.named_modules())
    producers = batchnorm_producers(model)
    result: dict[str, str] = {}
    for space in graph.spaces:
        owners = {ref.name.rpartition(".")[0] for ref in space.outputs}
        for owner in owners:
            bn = modules.get(owner)
            producer = producers.get(owner)
            if not isinstance(bn, BATCHNORM_TYPES) or producer not in owners:
                continue
            if bn.running_mean is None or not bn.track_running_stats:
                continue
            if not bn.affine and getattr(modules[producer], "bias", None) is None:
                continue
            result[owner] = producer
    return result


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: dict[str, str], share_unchanged: bool = False) -> nn.Module:
    """A copy of ``model`` with each BatchNorm of ``pairs`` folded into its producer (see the module doc).

    ``pairs`` is ``{batchnorm: producer}`` (from :func:`foldable_batchnorms`). Exact in eval mode
    up to float rounding; ``model`` is not modified. ``share_unchanged``: the copy shares with
    ``model`` every parameter and buffer that folding leaves alone (a merge's read-only sources: a
    torchvision VGG's 0.5 GB classifier is not copied); never change such a copy in place.
    """
    memo: dict[int, Any] = {}
    if share_unchanged:
        changed = set(pairs) | set(pairs.values())
        tensors = itertools.chain(model.named_parameters(), model.named_buffers())
        memo = {id(t): t for name, t in tensors if name.rpartition(".")[0] not in changed}
    new = copy.deepcopy(model, memo)
    modules = dict(new.named_modules())
    for bn_name, producer_name in pairs.items():
        bn, producer = modules[bn_name], modules[producer_name]
        var, mean = bn.running_var.double(), bn.running_mean.double()
        gamma = bn.weight.double() if bn.affine else torch.ones_like(var)
        beta = bn.bias.double() if bn.affine else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + bn.eps)
        bias = producer.bias.double() if producer.bias is not None else torch.zeros_like(var)
        shift = beta + scale * (bias - mean)
        weight = producer.weight
        axis = 1 if isinstance(producer, nn.modules.conv._ConvTransposeNd) else 0
        shape = [1] * weight.dim()
        shape[axis] = -1
        weight.copy_((weight.double() * scale.view(shape)).to(weight.dtype))
        if bn.affine:
            if producer.bias is not None:
                producer.bias.zero_()
            bn.weight.fill_(1.0)
            bn.bias.copy_(shift.to(bn.bias.dtype))
        else:
            producer.bias.copy_(shift.to(producer.bias.dtype))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
    return new


def folded_graph(graph: MergeGraph, pairs: dict[str, str]) -> MergeGraph:
    """``graph`` without the neutral entries of folded BatchNorm layers (weight, running statistics).

    A folded BatchNorm only adds its bias, which transforms like any bias; its weight and running
    statistics must stay at 1, 0 and ``1 - eps``.
    """
    keep_leaf = {"bias"}
    spaces = []
    for space in graph.spaces:
        outputs = [
            ref for ref in space.outputs
            if ref.name.rpartition(".")[0] not in pairs or ref.name.rpartition(".")[2] in keep_leaf
        ]
        spaces.append(replace(space, outputs=outputs, capture=list(space.capture), inputs=list(space.inputs)))
    return MergeGraph(spaces)
