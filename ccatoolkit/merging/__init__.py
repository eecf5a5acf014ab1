"""Merging models: the merge graph, the alignment algorithms, weight transforms, BatchNorm reset/REPAIR, ``merge()``.

``graph`` finds what each transform acts on, ``align`` holds the matching algorithms, ``transform`` applies
transforms, ``normalization`` repairs statistics. A merge's steps: ``prepare``, ``statistics``, ``ridge``,
``methods`` (the registry), ``combine``; ``api`` holds the public calls.
"""

from ccatoolkit.merging.api import METHODS, Ensemble, RidgeSweep, align_to, alignment_transforms, ensemble, merge
from ccatoolkit.merging.graph import GraphError, MergeGraph, ParamRef, Space, merge_graph
from ccatoolkit.merging.normalization import channel_stats, repair, repair_endpoints, reset_bn_stats
from ccatoolkit.merging.transform import apply_permutations, apply_transforms

__all__ = [
    "METHODS", "Ensemble", "RidgeSweep", "align_to", "alignment_transforms", "ensemble", "merge", "GraphError", "MergeGraph",
    "ParamRef", "Space", "merge_graph", "channel_stats", "repair", "repair_endpoints", "reset_bn_stats",
    "apply_permutations", "apply_transforms",
]
