"""Matching algorithms on activation statistics or weights: permutations, CCA, ZipIt!.

Pure functions on matrices (covariances, correlations, state dicts); :mod:`ccatoolkit.merging`
turns their results into ``{space: (out, inp)}`` transforms and merged models.
"""

from ccatoolkit.align.cca import cca_directions, cca_transform, multiview_cca_transforms, regularize, sym_power
from ccatoolkit.align.permutation import (
    match_activations,
    permutation_matrix,
    permutation_transform,
    weight_matching,
)
from ccatoolkit.align.zipit import zipit_groups, zipit_transforms

__all__ = [
    "cca_directions",
    "cca_transform",
    "multiview_cca_transforms",
    "regularize",
    "sym_power",
    "match_activations",
    "permutation_matrix",
    "permutation_transform",
    "weight_matching",
    "zipit_groups",
    "zipit_transforms",
]
