"""One look for every notebook: a colour per method and percentage-point labels.

A method keeps its colour in every figure of the sequence (CCA Merge is always the same red), so a
participant who learned it in notebook 3 reads notebook 6 without a legend hunt. Colours come from
seaborn's colour-blind palette.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["METHOD_COLORS", "method_color", "method_palette", "points"]

# seaborn "colorblind" palette, written out so that the core imports without seaborn
_BLUE, _ORANGE, _GREEN, _RED, _PURPLE, _BROWN, _PINK, _GREY, _OLIVE, _CYAN = (
    "#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9")

#: The colour of each method, model and baseline in every figure.
METHOD_COLORS: dict[str, str] = {
    "cca": _RED, "cca_multiview": _RED, "cca_unrepaired": "#f4a582",
    "permute": _BLUE, "permute_weight": _CYAN, "identity": _GREY, "naive": _GREY,
    "none": _GREY,  # a path's method when B is not aligned: the straight line to B
    "zipit": _PURPLE, "c2m3": _BROWN,
    "average": _GREY, "ensemble": _GREEN,
    "A": "#333333", "B": "#777777",
    "pam": _ORANGE,
}


def method_color(name: str, default: str = "#000000") -> str:
    """``name``'s colour (``"cca@0.1"`` and ``"cca (repaired)"`` are CCA's); ``default`` (black) for an unknown name."""
    key = name.split("@")[0].split(" (")[0].strip()
    return METHOD_COLORS.get(key, METHOD_COLORS.get(key.lower(), default))


def method_palette(names: Iterable[str]) -> dict[str, str]:
    """``{name: colour}`` for a seaborn ``palette=`` argument."""
    return {name: method_color(name) for name in names}


def points(fraction: float, signed: bool = True, decimals: int = 1) -> str:
    """A difference of accuracies in percentage points: ``-0.004`` -> ``"-0.4 pts"``; a difference that rounds
    to zero is ``"+0.0 pts"``, never ``"-0.0 pts"``."""
    value = round(100 * fraction, decimals) + 0.0  # + 0.0: -0.0 becomes 0.0
    return f"{value:+.{decimals}f} pts" if signed else f"{value:.{decimals}f} pts"
