"""Merged models' accuracies kept on disk, keyed by everything they depend on, the merge code included.

A notebook's second run (or a workshop prepared with ``make prefetch``) reads the numbers back
instead of merging again; a changed model, data set or library computes afresh.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ccatoolkit._utils import model_device
from ccatoolkit.zoo.cache import describe_data, load_or_create, state_digest

__all__ = ["merge_code_digest", "MergeResultStore"]


@functools.lru_cache(maxsize=1)
def merge_code_digest() -> str:
    """SHA-256 of the source that computes a merged model's accuracy (merging, analysis, evaluation).

    Part of the key of every cached merge result, so a result is only read back by the code that
    computed it: any change to the merge code computes it again.
    """
    root = Path(__file__).resolve().parents[1]
    files = sorted([*(root / "merging").rglob("*.py"), *(root / "analysis").rglob("*.py"),
                    root / "zoo" / "training.py", root / "_utils.py"])
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass
class MergeResultStore:
    """Merged models' test accuracies kept on disk (the zoo's cache folder), so a notebook's second run reads them.

    The key holds everything a number depends on: each model's weights, the statistics and test data
    (digests of their tensors), the method and its options, the device, and the merge code itself
    (:func:`merge_code_digest`). So ``make prefetch`` makes a workshop's run fast, and a changed
    model, data set or library computes afresh. ``enabled=False`` computes every time.
    """

    enabled: bool = True
    loaded: int = 0  # accuracies read back rather than computed
    _digests: dict[int, str] = field(default_factory=dict, repr=False)  # by id(): the caller keeps the objects

    def _digest(self, obj: Any, make: Callable[[Any], str]) -> str:
        if id(obj) not in self._digests:
            self._digests[id(obj)] = make(obj)
        return self._digests[id(obj)]

    def accuracy(self, models: Sequence[nn.Module], data: Iterable[Any], test_data: Iterable[Any], method: str,
                 options: Mapping[str, Any], compute: Callable[[], float]) -> float:
        """``compute()`` (the test accuracy of ``models`` merged by ``method``), or its stored value."""
        if not self.enabled:
            return compute()
        key = {
            "method": method, "options": repr(sorted(options.items())), "device": str(model_device(models[0])),
            "models": [self._digest(m, state_digest) for m in models], "data": self._digest(data, describe_data),
            "test": self._digest(test_data, describe_data), "code": merge_code_digest(),
        }
        computed = []

        def create() -> dict[str, torch.Tensor]:
            computed.append(True)
            return {"accuracy": torch.tensor(float(compute()), dtype=torch.float64)}

        value = load_or_create("merge-accuracy", key, create)
        self.loaded += not computed
        return float(value["accuracy"])
