"""The mode-connectivity experiment: straight lines against learned curves, for each neuron alignment.

Does aligning B's neurons to A's (Tatro et al. 2020) make both the straight path and the learned curve
between them lower? :func:`compare_paths` trains one curve per alignment
(:func:`~ccatoolkit.landscape.curve_training.train_curve`) and evaluates it beside the line through
the same end points (:func:`~ccatoolkit.landscape.paths.interpolate`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from torch import nn

from ccatoolkit._utils import has_batchnorm
from ccatoolkit.landscape.curve_training import train_curve
from ccatoolkit.landscape.paths import alpha_grid, interpolate
from ccatoolkit.landscape.results import InterpolationResult
from ccatoolkit.zoo.adversarial import PGD

__all__ = ["compare_paths"]


def compare_paths(
    model_a: nn.Module,
    model_b: nn.Module,
    train_data: Iterable[Any],
    test_data: Iterable[Any],
    aligns: Sequence[str | Callable[[nn.Module, nn.Module], nn.Module] | None] = (None, "permute", "cca"),
    kind: str = "bezier",
    ts: int | Sequence[float] = 11,
    epochs: int = 5,
    lr: float = 0.05,
    seed: int = 0,
    align_data: Iterable[Any] | None = None,
    cache: bool = True,
    cache_dir: str | None = None,
    batched: bool = True,
    progress: bool = True,
    attack: PGD | None = None,
    adversarial: PGD | None = None,
    **align_options: Any,
) -> list[InterpolationResult]:
    """For each alignment in ``aligns``: the linear path and the learned curve from A to (aligned) B, on ``test_data``.

    Returns ``[linear (naive), bezier (naive), linear (permute), bezier (permute), ...]`` results (loss and
    accuracy along t), ready for ``plots.landscape.plot_curve_paths``. BatchNorm statistics are
    re-estimated per point on ``train_data``; alignments use ``align_data`` (default ``train_data``).
    ``attack``: both paths evaluated under this PGD attack (robust loss and accuracy); ``adversarial``:
    the curves trained on the robust loss (see :func:`train_curve`).
    """
    bn = has_batchnorm(model_a)
    grid = alpha_grid(ts, name="ts")
    results: list[InterpolationResult] = []
    for align in aligns:
        curve = train_curve(
            model_a, model_b, train_data, kind=kind, align=align, align_data=align_data, epochs=epochs, lr=lr,
            seed=seed, cache=cache, cache_dir=cache_dir, progress=progress, adversarial=adversarial, **align_options,
        )
        name = "naive" if align is None else curve.method
        _, b_prime = curve.end_models()
        linear = interpolate(
            model_a, b_prime, test_data, alphas=grid, reset_bn=bn, bn_data=train_data if bn else None,
            batched=batched, progress=progress, attack=attack,
            label=f"linear ({name}{', ' + attack.describe() if attack is not None else ''})",
        )
        linear.method = curve.method
        results.append(linear)
        results.append(curve.evaluate(test_data, ts=grid, bn_data=train_data if bn else None, batched=batched,
                                      progress=progress, attack=attack))
    return results
