"""Output averaging: the ensemble of the models, the reference that a merge of them tries to reach."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from ccatoolkit.merging.prepare import check_models

__all__ = ["Ensemble", "ensemble"]


class Ensemble(nn.Module):
    """Output averaging: ``forward`` returns ``log(mean_k softmax(model_k(x)))`` (log-probabilities).

    Works with cross-entropy losses and ``argmax`` predictions like a single classifier's logits.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(copy.deepcopy(m) for m in models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(x), dim=-1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))


def ensemble(models: Sequence[nn.Module]) -> Ensemble:
    """An :class:`Ensemble` of copies of ``models`` (the inputs are not shared or modified)."""
    return Ensemble(check_models(models, min_models=1))
