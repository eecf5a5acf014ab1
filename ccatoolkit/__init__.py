"""ccatoolkit: align, merge and explore neural networks.

The public names below are imported lazily, so ``import ccatoolkit`` is cheap and the core
needs only torch, numpy and scipy (tqdm draws progress bars when installed; matplotlib and ipywidgets load when plots or widgets do).

Subpackages, by concept: ``data`` (data sets, splits, loaders), ``zoo`` (models, training, the
cache of trained models), ``analysis`` (activation capture, statistics, CCA algebra), ``merging``
(the merge graph, alignment, transforms, BatchNorm reset/REPAIR, ``merge()``), ``landscape``
(batched paths, planes, learned curves), ``plots`` and ``app`` (what the notebooks run on).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # foundation
    "default_device": "ccatoolkit._utils",
    "resolve_device": "ccatoolkit._utils",
    "eval_mode": "ccatoolkit._utils",
    "get_loaders": "ccatoolkit.data.loaders",
    "make_loader": "ccatoolkit.data.loaders",
    "split_indices": "ccatoolkit.data.splits",
    "train_val_split": "ccatoolkit.data.splits",
    "dataset_info": "ccatoolkit.data.datasets",
    "load_dataset": "ccatoolkit.data.datasets",
    "DATASET_NAMES": "ccatoolkit.data.datasets",
    # the zoo
    "build_model": "ccatoolkit.zoo.models",
    "MLP": "ccatoolkit.zoo.models",
    "VGG11": "ccatoolkit.zoo.models",
    "ResNet20": "ccatoolkit.zoo.models",
    "torchvision_model": "ccatoolkit.zoo.models",
    "train": "ccatoolkit.zoo.training",
    "evaluate": "ccatoolkit.zoo.training",
    "predict": "ccatoolkit.zoo.training",
    "PGD": "ccatoolkit.zoo.adversarial",
    "output_gap": "ccatoolkit.zoo.training",
    "train_curve_pam": "ccatoolkit.landscape.pam",
    "PamResult": "ccatoolkit.landscape.pam",
    "warn_if_near_chance": "ccatoolkit.zoo.training",
    "load_or_create": "ccatoolkit.zoo.cache",
    "CacheError": "ccatoolkit.zoo.cache",
    "trained_model": "ccatoolkit.zoo.trained",
    "trained_models": "ccatoolkit.zoo.trained",
    # analysis
    "capture": "ccatoolkit.analysis.capture",
    "capturable_layers": "ccatoolkit.analysis.capture",
    "ActivationCache": "ccatoolkit.analysis.capture",
    "collect_statistics": "ccatoolkit.analysis.stats",
    "correlation_matrix": "ccatoolkit.analysis.stats",
    "canonical_correlations": "ccatoolkit.analysis.stats",
    "JointStats": "ccatoolkit.analysis.stats",
    "StatisticsCollector": "ccatoolkit.analysis.stats",
    "canonical_correlations_from_cov": "ccatoolkit.analysis.linalg",
    # merging
    "merge_graph": "ccatoolkit.merging.graph.trace",
    "MergeGraph": "ccatoolkit.merging.graph.spec",
    "Space": "ccatoolkit.merging.graph.spec",
    "ParamRef": "ccatoolkit.merging.graph.spec",
    "GraphError": "ccatoolkit.merging.graph.spec",
    "apply_transforms": "ccatoolkit.merging.transform",
    "apply_permutations": "ccatoolkit.merging.transform",
    "check_same_architecture": "ccatoolkit._utils",
    "merge": "ccatoolkit.merging.api",
    "RidgeSweep": "ccatoolkit.merging.api",
    "align_to": "ccatoolkit.merging.api",
    "ensemble": "ccatoolkit.merging.api",
    "Ensemble": "ccatoolkit.merging.api",
    "alignment_transforms": "ccatoolkit.merging.api",
    "METHODS": "ccatoolkit.merging.api",
    "reset_bn_stats": "ccatoolkit.merging.normalization",
    "repair": "ccatoolkit.merging.normalization",
    # landscape
    "interpolate": "ccatoolkit.landscape.paths",
    "loss_plane": "ccatoolkit.landscape.paths",
    "simplex": "ccatoolkit.landscape.paths",
    "interpolated_model": "ccatoolkit.landscape.points",
    "barrier": "ccatoolkit.landscape.results",
    "InterpolationResult": "ccatoolkit.landscape.results",
    "PlaneResult": "ccatoolkit.landscape.results",
    "SimplexResult": "ccatoolkit.landscape.results",
    "Curve": "ccatoolkit.landscape.curves",
    "CurveResult": "ccatoolkit.landscape.curves",
    "compare_paths": "ccatoolkit.landscape.compare",
    "train_curve": "ccatoolkit.landscape.curve_training",
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
