"""The merge graph: a model's hidden activation spaces and the weights each space's transform acts on.

``spec`` holds the data model (:class:`MergeGraph`, :class:`Space`, :class:`ParamRef`) and hand-written specs; ``trace`` derives a graph with ``torch.fx``.
"""

from ccatoolkit.merging.graph.spec import SPEC_ADVICE, GraphError, MergeGraph, ParamRef, Space
from ccatoolkit.merging.graph.trace import merge_graph

__all__ = ["SPEC_ADVICE", "GraphError", "MergeGraph", "ParamRef", "Space", "merge_graph"]
