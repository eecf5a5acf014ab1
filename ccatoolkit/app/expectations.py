"""The notebooks' last cells: each promised result beside its expected range, judged ok or NOT OK.

Each notebook's last cell passes the numbers its first cell promises to :func:`expect_results`,
which prints them beside the expected ranges and marks each one ok or NOT OK (at default settings
only: smoke sizes are too small for the numbers to mean anything). Nothing raises on a miss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ccatoolkit.app.settings import Settings

__all__ = ["Check", "Expectations", "expect_results", "between", "around", "at_least", "at_most"]


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


#: The heading of the ranges' column. A range is the value the first cell states with a tolerance for another
#: machine's arithmetic and another run's rounding; the "±" of the first cell is the spread over seeds or pairs.
ACCEPTED = "accepted range"


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
        head = dict(check="check", measured="measured", expected=ACCEPTED, status="status")
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
                f"<th>measured</th><th>{ACCEPTED}</th><th>status</th></tr></thead><tbody>{''.join(cells)}</tbody>"
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
