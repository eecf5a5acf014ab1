"""ccatoolkit: align, merge and explore neural networks.

The public names below are imported lazily, so ``import ccatoolkit`` is cheap and the core
needs only torch, numpy and scipy (matplotlib and ipywidgets load when plots or widgets do).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # foundation
    "default_device": "ccatoolkit.device",
    "resolve_device": "ccatoolkit.device",
    "get_loaders": "ccatoolkit.data",
    "split_indices": "ccatoolkit.data",
    "train_val_split": "ccatoolkit.data",
    "dataset_info": "ccatoolkit.data",
    "DATASET_NAMES": "ccatoolkit.data",
    "trained_models": "ccatoolkit.zoo",
    "load_or_create": "ccatoolkit.cache",
    "CacheError": "ccatoolkit.cache",
    "load_dataset": "ccatoolkit.data",
    "make_loader": "ccatoolkit.data",
    "build_model": "ccatoolkit.models",
    "MLP": "ccatoolkit.models",
    "VGG11": "ccatoolkit.models",
    "ResNet20": "ccatoolkit.models",
    "train": "ccatoolkit.training",
    "evaluate": "ccatoolkit.training",
    "trained_model": "ccatoolkit.zoo",
    # analysis
    "capture": "ccatoolkit.activations",
    "capturable_layers": "ccatoolkit.activations",
    "collect_statistics": "ccatoolkit.stats",
    "correlation_matrix": "ccatoolkit.stats",
    "canonical_correlations": "ccatoolkit.stats",
    "canonical_correlations_from_cov": "ccatoolkit.stats",
    "JointStats": "ccatoolkit.stats",
    "StatisticsCollector": "ccatoolkit.stats",
    "ActivationCache": "ccatoolkit.activations",
    # merging
    "merge_graph": "ccatoolkit.graph",
    "MergeGraph": "ccatoolkit.graph",
    "Space": "ccatoolkit.graph",
    "ParamRef": "ccatoolkit.graph",
    "GraphError": "ccatoolkit.graph",
    "apply_transforms": "ccatoolkit.transform",
    "apply_permutations": "ccatoolkit.transform",
    "check_same_architecture": "ccatoolkit.transform",
    "merge": "ccatoolkit.merging",
    "align_to": "ccatoolkit.merging",
    "ensemble": "ccatoolkit.merging",
    "Ensemble": "ccatoolkit.merging",
    "alignment_transforms": "ccatoolkit.merging",
    "METHODS": "ccatoolkit.merging",
    "reset_bn_stats": "ccatoolkit.normalization",
    "repair": "ccatoolkit.normalization",
    # landscape
    "interpolate": "ccatoolkit.landscape",
    "barrier": "ccatoolkit.landscape",
    "loss_plane": "ccatoolkit.landscape",
    "simplex": "ccatoolkit.landscape",
    "InterpolationResult": "ccatoolkit.landscape",
    "PlaneResult": "ccatoolkit.landscape",
    "Curve": "ccatoolkit.curves",
    "CurveResult": "ccatoolkit.curves",
    "compare_paths": "ccatoolkit.curves",
    "train_curve": "ccatoolkit.curves",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ccatoolkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
