"""Input maps refitted by least squares: what keeps a CCA-aligned model close to the model it came from.

CCA aligns a model's features ``h = ReLU(y)`` with a general linear map: its layers' output rows are
left-multiplied by ``T`` (so a layer computes ``T y``) and the next layers' input columns by ``T^-1``.
That is exact for permutations, but ``ReLU(T y)`` is not ``T ReLU(y)``: the next layer reads features
that ``T^-1`` no longer maps back, and the error grows layer after layer (a Conv-BatchNorm net on
digits fell to chance). Here each space's input map is instead the least-squares map ``M`` from the
aligned model's features ``h' = ReLU(T y)`` back to the model's own ``h`` (``M = E[h h'^T] (E[h' h'^T]
+ lambda I)^-1``), fitted in forward order so that each space reads the aligned model as the spaces
before it have already been refitted. Output rows keep ``T``: the aligned model's features are still
expressed in the reference's basis, which is what an interpolation path or a merge needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ccatoolkit._utils import progress_bar
from ccatoolkit.analysis.stats import collect_statistics
from ccatoolkit.merging.graph import MergeGraph
from ccatoolkit.merging.transform import apply_transforms

__all__ = ["refit_input_maps"]

#: Ridge of the least-squares fit, relative to the mean eigenvalue of ``E[h' h'^T]``.
FIT_RIDGE = 1e-3


def refit_input_maps(
    original: nn.Module,
    source: nn.Module,
    graph: MergeGraph,
    transforms: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    data: Iterable[Any],
    max_batches: int | None = None,
    *,
    ridge: float = FIT_RIDGE,
    progress: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``transforms`` with each space's input map replaced by the least-squares map (see the module doc).

    ``original``: the model whose features the aligned model should reproduce; ``source``: what the
    transforms act on through ``graph`` (``original`` itself, or its copy with BatchNorm folded and the
    folded graph). Permutation-only spaces keep their exact inverse. One pass over ``data`` per space,
    each running ``original`` and the aligned model so far side by side.
    """
    refitted = dict(transforms)
    spaces = [s for s in graph.spaces if s.name in transforms and not s.permutation_only]
    for space in progress_bar(spaces, progress, desc="refit input maps", leave=False):
        aligned = apply_transforms(source, graph, refitted)
        stats = collect_statistics([original, aligned], data, {space.name: list(space.capture)},
                                   max_batches=max_batches, progress=False, warn=False)[space.name]
        mean_h, mean_a = stats.mean(0), stats.mean(1)
        cross = stats.cov(0, 1) + torch.outer(mean_h, mean_a)  # E[h h'^T]
        gram = stats.cov(1, 1) + torch.outer(mean_a, mean_a)  # E[h' h'^T]
        lam = ridge * torch.trace(gram).clamp_min(1e-12) / gram.shape[0]
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        fitted = torch.linalg.solve(gram + lam * eye, cross.T).T  # h ~ fitted @ h'
        out = transforms[space.name][0]
        refitted[space.name] = (out, fitted.to(out.device, torch.float64))
        del aligned
    return refitted
