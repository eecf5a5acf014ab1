"""L-inf PGD: adversarial examples for adversarial training and for robust loss/accuracy.

Projected gradient descent with a random start (Madry et al. 2018): start at a uniform point of the
L-inf ball of radius ``eps`` around the input, take ``steps`` signed-gradient ascent steps on the
cross-entropy, and project back onto the ball (and onto the valid pixel range) after each.

The zoo's data sets are normalised (``x = (pixel - mean) / std`` per channel; Fashion-MNIST:
mean 0.2860, std 0.3530), and the attack runs in that normalised space. ``eps`` is given in pixel
units of [0, 1] images, as usual in the literature; :meth:`PGD.for_dataset` stores the data set's
mean and std, so the radius becomes ``eps / std`` per channel and perturbed images stay within the
normalised images of [0, 1] pixels. Without mean and std the inputs are taken as they are (radius
``eps``, no clipping), e.g. for toy data.

One attack serves every use: :func:`ccatoolkit.zoo.training.train` (``adversarial=``),
:func:`ccatoolkit.zoo.training.evaluate` (``attack=``) and the batched path evaluation of
:mod:`ccatoolkit.landscape` (``attack=``), which attacks every point of a path with its own weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.nn import functional as F

__all__ = ["PGD"]


@dataclass(frozen=True)
class PGD:
    """An L-inf PGD attack: radius ``eps`` (pixel units when ``std`` is set), ``steps`` steps of ``step_size``.

    ``step_size`` defaults to ``2.5 * eps / steps`` (Madry et al. 2018). ``random_start``: begin at a
    uniform point of the ball. ``mean``/``std``: the per-channel normalisation of the inputs (see
    :meth:`for_dataset`); None means the inputs are used as they are, with no range to clip to.
    ``seed`` seeds the random start when an evaluation makes its own generator.
    """

    eps: float
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.step_size is not None and not self.step_size >= 0:
            raise ValueError(f"step_size must be >= 0, got {self.step_size}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std (the inputs' normalisation) or neither")
        if self.std is not None and (len(self.std) != len(self.mean) or min(self.std) <= 0):
            raise ValueError(f"mean and std need one positive std per channel, got mean={self.mean}, std={self.std}")

    @classmethod
    def for_dataset(cls, dataset: str, eps: float, **options: Any) -> "PGD":
        """A PGD attack on a zoo data set's normalised inputs, ``eps`` in pixel units (e.g. 0.1 of [0, 1])."""
        from ccatoolkit.data.datasets import dataset_info

        info = dataset_info(dataset)
        return cls(eps=float(eps), mean=tuple(map(float, info["mean"])), std=tuple(map(float, info["std"])), **options)

    def with_normalisation(self, dataset: str) -> "PGD":
        """This attack with ``dataset``'s mean and std filled in when it has none (else itself)."""
        if self.std is not None:
            return self
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("mean", "std")}
        return PGD.for_dataset(dataset, **fields)

    @property
    def alpha(self) -> float:
        """The step size in pixel units: ``step_size``, or ``2.5 * eps / steps``."""
        if self.step_size is not None:
            return float(self.step_size)
        return 2.5 * float(self.eps) / max(self.steps, 1)

    def key(self) -> dict[str, Any]:
        """Everything that determines the attack, for cache keys (JSON-able)."""
        return dict(attack="pgd-linf", eps=float(self.eps), steps=int(self.steps), step_size=self.alpha,
                    random_start=bool(self.random_start), mean=self.mean and list(self.mean),
                    std=self.std and list(self.std), seed=int(self.seed))

    def describe(self) -> str:
        """A short label, e.g. ``"PGD eps=0.1 (10 steps)"``."""
        return f"PGD eps={self.eps:g} ({self.steps} steps)"

    def _per_channel(self, values: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
        """``values`` shaped to broadcast over ``x``'s channel axis (the third from the end, as in (..., C, H, W))."""
        t = torch.tensor(values, dtype=x.dtype, device=x.device)
        if t.numel() == 1:
            return t.reshape(())
        if x.dim() < 3 or x.shape[-3] != t.numel():
            raise ValueError(f"the attack has {t.numel()} channels but the inputs have shape {tuple(x.shape)}")
        return t.view(-1, 1, 1)

    def perturb(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Adversarial inputs for ``forward`` (a model, or any map from inputs to logits) at ``(x, y)``; detached.

        ``forward(x)`` may return logits with leading axes in front of the batch (``(P, N, classes)``
        for P models at once, ``x`` then ``(P, N, ...)``): the summed cross-entropy separates over
        models and samples, so each one's input gets its own gradient. Gradients reach the inputs only.
        """
        x = x.detach()
        if self.std is not None:
            std, mean = self._per_channel(self.std, x), self._per_channel(self.mean, x)
            radius, step = self.eps / std, self.alpha / std
            lower, upper = (0.0 - mean) / std, (1.0 - mean) / std
        else:
            radius = step = None
            lower = upper = None
        radius = torch.as_tensor(self.eps, dtype=x.dtype) if radius is None else radius
        step = torch.as_tensor(self.alpha, dtype=x.dtype) if step is None else step

        def project(candidate: torch.Tensor) -> torch.Tensor:
            out = torch.maximum(torch.minimum(candidate, x + radius), x - radius)
            if lower is not None:
                out = torch.maximum(torch.minimum(out, upper), lower)
            return out

        if self.random_start:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype,
                               device="cpu" if generator is not None else x.device)
            x_adv = project(x + (2 * noise.to(x.device) - 1) * radius)
        else:
            x_adv = x.clone()
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                logits = forward(x_adv)
                target = y.expand(logits.shape[:-1]).reshape(-1)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = project(x_adv.detach() + step * grad.sign())
        return x_adv.detach()
