"""Looking inside networks: named activation capture, streamed joint statistics, correlations and CCA.

``capture`` hooks layers by name, ``stats`` accumulates means and (cross-)covariances, ``linalg`` is the CCA algebra merging shares.
"""

from ccatoolkit.analysis.capture import ActivationCache, UnknownLayerError, capturable_layers, capture
from ccatoolkit.analysis.linalg import canonical_correlations_from_cov, inverse_sqrt
from ccatoolkit.analysis.stats import (
    JointStats,
    StatisticsCollector,
    canonical_correlations,
    collect_statistics,
    correlation_matrix,
)

__all__ = [
    "ActivationCache", "UnknownLayerError", "capturable_layers", "capture", "canonical_correlations_from_cov",
    "inverse_sqrt", "JointStats", "StatisticsCollector", "canonical_correlations", "collect_statistics",
    "correlation_matrix",
]
