"""Settings the notebooks share: one switch between tiny smoke-test sizes and the real ones.

Every notebook's first code cell (tagged ``parameters`` for papermill) holds ``SMOKE = None``,
``MODEL = None`` and ``DEVICE = None``; the next cell calls :func:`settings`. ``SMOKE = None`` reads
the environment variable ``CCATOOLKIT_SMOKE`` (``1``/``true``/``yes`` switch it on), so CI shrinks
the whole sequence with one variable, and a user with a GPU goes bigger by setting ``DEVICE`` and
``MODEL`` (or any field, e.g. ``settings(epochs=20)``).

The loaders and models a run uses at these sizes come from :mod:`ccatoolkit.app.inputs`; the last
cells' checks of the promised results from :mod:`ccatoolkit.app.expectations`.

Figures: :func:`save_figure` writes a PNG into ``$CCATOOLKIT_FIGURES`` when it is set (the notebook
runner sets it), and does nothing otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ccatoolkit._utils import default_device, progress_bar

__all__ = ["Settings", "settings", "prepare", "smoke_from_env", "save_figure", "figures_dir", "SMOKE_ENV", "FIGURES_ENV"]

SMOKE_ENV = "CCATOOLKIT_SMOKE"
FIGURES_ENV = "CCATOOLKIT_FIGURES"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}

# Model sizes: the default MLP trains a Fashion-MNIST epoch in seconds on a laptop CPU.
_MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "mlp": dict(depth=3, width=512),
    "vgg11": dict(width=0.25),
    "resnet20": dict(width=1),
}
_SMOKE_MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "mlp": dict(depth=3, width=64),
    "vgg11": dict(width=0.125),
    "resnet20": dict(width=1),
}


@dataclass
class Settings:
    """The sizes of a notebook run. ``smoke=True`` gives tiny sizes for CI; the defaults are the real ones."""

    smoke: bool = False
    model: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=lambda: dict(_MODEL_KWARGS["mlp"]))
    dataset: str = "fashion_mnist"
    device: str = "cpu"
    epochs: int = 5                 # training epochs of each zoo model
    limit: int | None = None        # training examples used (None: all 60,000)
    test_limit: int | None = None   # test examples used for evaluation (None: all 10,000)
    stats_limit: int = 5000         # examples used for activation statistics (alignment, merging)
    batch_size: int = 256
    n_models: int = 4               # models per data split (notebook 1)
    subsets: int | None = 3         # subsets of each size N merged in notebook 6, in rotation (None: all)
    n_parts: int = 5                # notebook 6: parts of the skewed split (two of ten classes each); N up to this
    seeds_per_part: int = 2         # notebook 6: models (seeds) per part, so that every N has several subsets
    n_seeds: int = 4                # models with different seeds on the full data (notebook 1)
    alphas: int = 21                # points along an interpolation path
    plane_resolution: int = 15      # grid points per side of a 2-D loss plane
    curve_epochs: int = 3           # epochs to train a mode-connectivity curve
    pam_rounds: int = 4             # PAM rounds in notebook 5: a permutation step, then one curve epoch
    pam_step: float = 64.0          # PAM's relative permutation step (notebook 5; halved up to 3 times)
    ridge: float | str = "auto"     # CCA regularisation (ridge * trace(S)/n per covariance); "auto": merge chooses
    seed: int = 0
    progress: bool = True           # tqdm progress bars in long loops
    threads: int | None = None      # torch CPU threads (None: torch's default; $CCATOOLKIT_THREADS overrides)

    def steps(self, items: Iterable[Any], desc: str) -> Any:
        """``items`` under one progress bar (``tqdm.auto``; none when ``progress`` is off): a cell that makes
        several long calls iterates over them with this bar and passes ``progress=False`` to each call, so it
        shows one bar instead of one per call."""
        return progress_bar(list(items), self.progress, desc=desc)

    def replace(self, **changes: Any) -> "Settings":
        """A copy with some fields changed (unknown names raise)."""
        return dataclasses.replace(self, **changes)

    def summary(self) -> str:
        """One line that says which sizes this run uses (printed by every notebook's first cell)."""
        mode = "SMOKE (tiny sizes for CI)" if self.smoke else "default"
        limit = "all" if self.limit is None else self.limit
        test = "all" if self.test_limit is None else self.test_limit
        kw = ", ".join(f"{k}={v}" for k, v in self.model_kwargs.items())
        return (f"[{mode}] model={self.model}({kw}) on {self.dataset}, device={self.device}, "
                f"epochs={self.epochs}, train examples={limit}, test examples={test}, n_models={self.n_models}")


def smoke_from_env(default: bool = False) -> bool:
    """``$CCATOOLKIT_SMOKE`` as a bool (``1``/``true``/``yes``/``on``; unset gives ``default``)."""
    raw = os.environ.get(SMOKE_ENV)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{SMOKE_ENV}={raw!r} is not a switch; set it to 1 (smoke mode) or 0 (default sizes)")


def _resolve_device(device: str | None) -> str:
    if device is not None:
        return str(device)
    env = os.environ.get("CCATOOLKIT_DEVICE")
    if env:
        return env
    return str(default_device())


def settings(smoke: bool | None = None, model: str | None = None, device: str | None = None,
             **overrides: Any) -> Settings:
    """The notebook sizes: smoke mode when ``smoke`` is True (None: read ``$CCATOOLKIT_SMOKE``).

    ``model`` picks the zoo model (``"mlp"`` default, ``"vgg11"``, ``"resnet20"``), ``device`` the
    device (None: ``$CCATOOLKIT_DEVICE`` or CUDA/MPS/CPU, whichever is there); any other field of
    :class:`Settings` can be overridden by keyword, e.g. ``settings(epochs=20, limit=None)``.
    """
    smoke = smoke_from_env() if smoke is None else bool(smoke)
    name = (model or "mlp").lower()
    table = _SMOKE_MODEL_KWARGS if smoke else _MODEL_KWARGS
    if name not in table:
        raise ValueError(f"unknown model {model!r}; valid names are: {', '.join(table)}")
    base = Settings(smoke=smoke, model=name, model_kwargs=dict(table[name]), device=_resolve_device(device))
    if smoke:
        base = base.replace(
            epochs=1, limit=2048, test_limit=512, stats_limit=512, batch_size=64, n_models=3, n_seeds=3, subsets=2, n_parts=3,
            alphas=5, plane_resolution=5, curve_epochs=1, progress=False, threads=1,
        )
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        valid = ", ".join(f.name for f in dataclasses.fields(Settings))
        raise TypeError(f"unknown setting(s) {', '.join(sorted(unknown))}; valid settings are: {valid}")
    env_threads = os.environ.get("CCATOOLKIT_THREADS")
    if env_threads:
        base = base.replace(threads=int(env_threads))
    return base.replace(**overrides)


def prepare(s: Settings) -> Settings:
    """Apply ``s`` to this process: seed torch with ``s.seed`` and set torch's CPU threads. Returns ``s``.

    Smoke mode uses one thread: tiny workloads gain nothing from more, and on a busy shared CPU
    (CI runners) oversubscribed threads make them many times slower.
    """
    import torch

    torch.manual_seed(s.seed)
    if s.threads is not None:
        if s.threads < 1:
            raise ValueError(f"threads must be >= 1, got {s.threads}")
        torch.set_num_threads(int(s.threads))
    return s


def figures_dir() -> Path | None:
    """The folder named by ``$CCATOOLKIT_FIGURES`` (created), or None when it is not set."""
    raw = os.environ.get(FIGURES_ENV)
    if not raw:
        return None
    path = Path(raw).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig: Any, name: str, dpi: int = 110) -> Path | None:
    """Save ``fig`` (a matplotlib Figure, or an Axes of one) as ``$CCATOOLKIT_FIGURES/<name>.png``.

    Returns the path written, or None when ``$CCATOOLKIT_FIGURES`` is unset (then nothing is written).
    """
    folder = figures_dir()
    if folder is None:
        return None
    fig = getattr(fig, "figure", fig)  # an Axes has .figure
    if not hasattr(fig, "savefig"):
        raise TypeError(f"save_figure needs a matplotlib Figure or Axes, got {type(fig).__name__}")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "figure"
    path = folder / f"{stem}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
