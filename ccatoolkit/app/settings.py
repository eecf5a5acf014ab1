"""Settings the notebooks share: one switch between tiny smoke-test sizes and the real ones.

Every notebook's first code cell (tagged ``parameters`` for papermill) holds ``SMOKE = None``,
``MODEL = None`` and ``DEVICE = None``; the next cell calls :func:`settings`. ``SMOKE = None`` reads
the environment variable ``CCATOOLKIT_SMOKE`` (``1``/``true``/``yes`` switch it on), so CI shrinks
the whole sequence with one variable, and a user with a GPU goes bigger by setting ``DEVICE`` and
``MODEL`` (or any field, e.g. ``settings(epochs=20)``).

Expectations: each notebook's last cell passes the numbers its first cell promises to
:func:`expect_results`, which prints them beside the expected ranges and marks each one ok or NOT OK
(at default settings only: smoke sizes are too small for the numbers to mean anything).

Figures: :func:`save_figure` writes a PNG into ``$CCATOOLKIT_FIGURES`` when it is set (the notebook
runner sets it), and does nothing otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccatoolkit._utils import default_device
from ccatoolkit.data import get_loaders, load_dataset, make_loader
from ccatoolkit.zoo.trained import trained_model
from ccatoolkit.zoo.training import evaluate

__all__ = [
    "Settings", "settings", "prepare", "smoke_from_env", "save_figure", "figures_dir", "loaders", "zoo", "accuracy_table",
    "SMOKE_ENV", "FIGURES_ENV", "Check", "Expectations", "expect_results", "between", "around", "at_least", "at_most",
]

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
    n_models: int = 4               # models per data split (notebooks 1 and 6: merge up to this many)
    subsets: int | None = 3         # subsets of each size N merged in notebook 6, in rotation (None: all)
    n_seeds: int = 4                # models with different seeds on the full data (notebook 1)
    alphas: int = 21                # points along an interpolation path
    plane_resolution: int = 15      # grid points per side of a 2-D loss plane
    curve_epochs: int = 3           # epochs to train a mode-connectivity curve
    ridge: float | str = "auto"     # CCA regularisation (ridge * trace(S)/n per covariance); "auto": merge chooses
    seed: int = 0
    progress: bool = True           # tqdm progress bars in long loops
    threads: int | None = None      # torch CPU threads (None: torch's default; $CCATOOLKIT_THREADS overrides)

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
            epochs=1, limit=2048, test_limit=512, stats_limit=512, batch_size=64, n_models=3, n_seeds=3, subsets=2,
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


# --------------------------------------------------------------------------- data and models


@functools.lru_cache(maxsize=4)
def _dataset(name: str, train: bool) -> Any:
    return load_dataset(name, train=train)


def _subset(n: int, limit: int | None, seed: int) -> Any:
    import numpy as np

    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=int(limit), replace=False))


def loaders(s: Settings, split: str = "full", n_models: int = 1, model_index: int = 0) -> dict[str, Any]:
    """The loaders a notebook uses: ``train`` (this model's part of ``split``), ``test`` and ``stats``.

    ``stats`` holds ``s.stats_limit`` training examples (not shuffled, no augmentation): the data on
    which activation statistics for alignment and merging are measured. ``test`` holds
    ``s.test_limit`` test examples (all when None). Data sets are loaded once per process.
    """
    out = get_loaders(s.dataset, batch_size=s.batch_size, split=split, n_models=n_models,
                      model_index=model_index, seed=s.seed, limit=s.limit, device=s.device)
    train_set, test_set = _dataset(s.dataset, True), _dataset(s.dataset, False)
    eval_bs = 2 * s.batch_size
    out["test"] = make_loader(test_set, eval_bs, indices=_subset(len(test_set), s.test_limit, s.seed), device=s.device)
    stats_idx = _subset(len(train_set), s.stats_limit, s.seed + 1)
    out["stats"] = make_loader(train_set, eval_bs, indices=stats_idx, device=s.device)
    return out


def zoo(s: Settings, split: str = "full", n: int | None = None, seeds: Any = None) -> list[Any]:
    """Trained (cached) models of ``s.model`` on ``split``: ``n`` of them (default ``s.n_models``), in eval mode.

    ``split="full"``: the same data, seeds ``seeds`` (default ``0..n-1``); ``"disjoint"``/``"skewed"``:
    model ``i`` trains on part ``i`` of ``n`` parts (seed ``i``). A second call loads from the cache.
    """
    n = s.n_models if n is None else int(n)
    seeds = list(range(n)) if seeds is None else [int(v) for v in seeds]
    if len(seeds) != n:
        raise ValueError(f"{n} models need {n} seeds, got {len(seeds)}")
    models = []
    for i, seed in enumerate(seeds):
        part = dict(n_models=n, model_index=i) if split != "full" else {}
        model = trained_model(model=s.model, model_kwargs=dict(s.model_kwargs), dataset=s.dataset, split=split,
                              seed=seed, epochs=s.epochs, batch_size=s.batch_size, limit=s.limit,
                              device=s.device, progress=s.progress, **part)
        models.append(model.eval())
    return models


def accuracy_table(models: dict[str, Any], data: Any) -> Any:
    """A pandas DataFrame (or a list of rows without pandas): name, accuracy, loss of each model on ``data``."""
    rows = []
    for name, model in models.items():
        result = evaluate(model, data)
        rows.append({"model": name, "accuracy": float(result["accuracy"]), "loss": float(result["loss"])})
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas comes with the notebooks extra
        return rows
    return pd.DataFrame(rows).set_index("model")


# --------------------------------------------------------------------------- expected results


@dataclass(frozen=True)
class _Range:
    """An expected interval ``[low, high]`` (either end may be None) and how to write it."""

    low: float | None
    high: float | None
    text: str | None = None

    def contains(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


def between(low: float, high: float) -> _Range:
    """Expect a value in ``[low, high]``."""
    if low > high:
        raise ValueError(f"between({low}, {high}): low is above high")
    return _Range(float(low), float(high))


def around(target: float, tol: float) -> _Range:
    """Expect ``target ± tol`` (as REPAIR's notebooks say: "should reach 84.9% (+/-1%)")."""
    if tol < 0:
        raise ValueError(f"around({target}, {tol}): the tolerance is negative")
    return _Range(float(target) - float(tol), float(target) + float(tol), f"{target:g} ± {tol:g}")


def at_least(low: float) -> _Range:
    """Expect a value of at least ``low``."""
    return _Range(float(low), None)


def at_most(high: float) -> _Range:
    """Expect a value of at most ``high``."""
    return _Range(None, float(high))


def _as_range(expected: Any) -> _Range | bool:
    if isinstance(expected, (_Range, bool)):
        return expected
    if isinstance(expected, tuple) and len(expected) == 2:
        low, high = expected
        if low is not None and high is not None:
            return between(low, high)
        return _Range(None if low is None else float(low), None if high is None else float(high))
    raise TypeError(f"an expectation is a (low, high) pair, between/around/at_least/at_most(...) or True/False, "
                    f"got {expected!r}")


@dataclass
class Check:
    """One expected result: what it is, the value measured, the range expected, and whether it holds."""

    description: str
    value: Any
    expected: _Range | bool
    fmt: str = "{:.3f}"
    error: str = ""           # why the value could not be judged (not a number), if it could not

    @property
    def ok(self) -> bool:
        """The value lies in the expected range (a bool check: equals the expected bool). False if not a number."""
        if self.error:
            return False
        if isinstance(self.expected, bool):
            return bool(self.value) is self.expected
        return self.expected.contains(float(self.value))

    def measured_text(self) -> str:
        if self.error:
            return f"{self.value!r}"
        if isinstance(self.expected, bool):
            return "yes" if bool(self.value) else "no"
        return self.fmt.format(float(self.value))

    def expected_text(self) -> str:
        r = self.expected
        if isinstance(r, bool):
            return "yes" if r else "no"
        if r.text is not None:
            if "%" in self.fmt:  # around() of a fraction shown in percent: write it in percent too
                tol_fmt = self.fmt.replace("+", "")  # a signed format ("{:+.1%}") for the value, not the tolerance
                return f"{self.fmt.format(0.5 * (r.low + r.high))} ± {tol_fmt.format(0.5 * (r.high - r.low))}"
            return r.text
        if r.low is not None and r.high is not None:
            return f"{self.fmt.format(r.low)} to {self.fmt.format(r.high)}"
        if r.low is not None:
            return f">= {self.fmt.format(r.low)}"
        return f"<= {self.fmt.format(r.high)}"


def _check_value(value: Any, expected: _Range | bool) -> str:
    if isinstance(expected, bool):
        return ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "not a number"
    if number != number:
        return "NaN"
    return ""


class Expectations:
    """The checks of one notebook's last cell; ``print``, display it or read :attr:`failures`.

    At default settings every check is judged ok or NOT OK; in smoke mode the values are shown and
    not judged (the expectations are for default sizes). Nothing here raises on a missed expectation:
    a notebook that runs but misses one says so in its output, and :attr:`failures` records it.
    """

    def __init__(self, smoke: bool, checks: list[Check], title: str = "Expected results at default settings"):
        self.smoke = bool(smoke)
        self.checks = list(checks)
        self.title = title

    @property
    def failures(self) -> list[Check]:
        """The checks that missed (always empty in smoke mode, where nothing is judged)."""
        return [] if self.smoke else [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        """Every check holds (True in smoke mode, where nothing is judged)."""
        return not self.failures

    def _status(self, c: Check) -> str:
        if self.smoke:
            return "-"
        return "ok" if c.ok else "NOT OK"

    def summary(self) -> str:
        if self.smoke:
            return ("SMOKE MODE: these expectations apply to default settings only; the values measured at smoke "
                    "sizes are shown, not judged.")
        missed = self.failures
        if not missed:
            return f"All {len(self.checks)} expectations hold at default settings."
        return (f"NOT OK: {len(missed)} of {len(self.checks)} expectations missed at default settings: "
                + "; ".join(c.description for c in missed))

    def rows(self) -> list[dict[str, str]]:
        return [dict(check=c.description, measured=c.measured_text(), expected=c.expected_text(),
                     status=self._status(c)) for c in self.checks]

    def text(self) -> str:
        """A plain-text table: check, measured, expected, ok / NOT OK, and the summary line."""
        rows = self.rows()
        head = dict(check="check", measured="measured", expected="expected", status="status")
        width = {k: max(len(head[k]), *(len(r[k]) for r in rows)) if rows else len(head[k]) for k in head}
        line = lambda r: "  ".join([r["check"].ljust(width["check"]), r["measured"].rjust(width["measured"]),
                                    r["expected"].rjust(width["expected"]), r["status"]])
        out = [self.title, line(head), "  ".join("-" * width[k] for k in head)] + [line(r) for r in rows]
        return "\n".join(out + [self.summary()])

    __str__ = text

    def __repr__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        from html import escape

        red = "color:#c00000;font-weight:bold"
        cells = []
        for r in self.rows():
            style = f' style="{red}"' if r["status"] == "NOT OK" else ""
            cells.append(f"<tr><td style='text-align:left'>{escape(r['check'])}</td><td>{escape(r['measured'])}</td>"
                         f"<td>{escape(r['expected'])}</td><td{style}>{escape(r['status'])}</td></tr>")
        note_style = "font-weight:bold" if self.smoke else (red if self.failures else "color:#006000;font-weight:bold")
        return (f"<p><b>{escape(self.title)}</b></p><table><thead><tr><th style='text-align:left'>check</th>"
                f"<th>measured</th><th>expected</th><th>status</th></tr></thead><tbody>{''.join(cells)}</tbody>"
                f"</table><p style=\"{note_style}\">{escape(self.summary())}</p>")

    def to_frame(self) -> Any:
        """The table as a pandas DataFrame (check, measured, expected, status)."""
        import pandas as pd

        return pd.DataFrame(self.rows()).set_index("check")


def expect_results(s: Settings | bool, checks: list[tuple], title: str = "Expected results at default settings",
                   show: bool = True) -> Expectations:
    """Check a notebook's results against what its first cell promises; show the table and return it.

    ``s``: the notebook's :class:`Settings` (or a bool: smoke). ``checks``: tuples
    ``(description, measured value, expected)`` or ``(description, value, expected, fmt)``, where
    ``expected`` is ``(low, high)`` (an end may be None), :func:`between`, :func:`around`,
    :func:`at_least`, :func:`at_most`, or True/False for a yes/no result; ``fmt`` formats numbers
    (default ``"{:.3f}"``; ``"{:.1%}"`` for accuracies). A value that is not a number counts as NOT OK.

    At default settings each row says ok or NOT OK and a summary line names the misses (bold red in a
    notebook); in smoke mode the table says the expectations apply to default settings only and shows
    the values without judging them. Never raises for a missed expectation. ``show``: display it
    (HTML in a notebook, text otherwise).
    """
    smoke = s if isinstance(s, bool) else bool(s.smoke)
    made = []
    for item in checks:
        if not isinstance(item, tuple) or len(item) not in (3, 4):
            raise TypeError(f"a check is (description, value, expected) or (description, value, expected, fmt), "
                            f"got {item!r}")
        description, value, expected = item[:3]
        fmt = item[3] if len(item) == 4 else "{:.3f}"
        rng = _as_range(expected)
        made.append(Check(str(description), value, rng, fmt, _check_value(value, rng)))
    result = Expectations(smoke, made, title=title)
    if show:
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:  # pragma: no cover - IPython comes with the notebooks extra
            get_ipython = None
        if get_ipython is not None and get_ipython() is not None:
            display(result)
        else:
            print(result.text())
    return result
