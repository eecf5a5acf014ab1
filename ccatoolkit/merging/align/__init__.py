"""Matching algorithms on activation statistics or weights: permutations, CCA, ZipIt!.

Pure functions on matrices (covariances, correlations, state dicts); :mod:`ccatoolkit.merging.api`
turns their results into ``{space: (out, inp)}`` transforms and merged models.
"""

from ccatoolkit.merging.align.cca import cca_directions, cca_transform, multiview_cca_transforms
from ccatoolkit.merging.align.permutation import (
    match_activations,
    permutation_matrix,
    permutation_transform,
    weight_matching,
)
from ccatoolkit.merging.align.zipit import zipit_groups, zipit_transforms

__all__ = [
    "cca_directions",
    "cca_transform",
    "multiview_cca_transforms",
    "match_activations",
    "permutation_matrix",
    "permutation_transform",
    "weight_matching",
    "zipit_groups",
    "zipit_transforms",
]
