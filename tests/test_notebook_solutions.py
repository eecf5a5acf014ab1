"""The hidden solutions of notebooks 5 and 7 run, on small models, and show what their text says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pandas as pd
import pytest
from types import SimpleNamespace

from toybox import digit_mlps, notebook_solutions

import ccatoolkit as cc
from ccatoolkit.landscape.curve_training import train_curve

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _run(code: str, namespace: dict) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, namespace)  # noqa: S102 - the notebook's own solution code
    return out.getvalue()


def test_notebook05_solutions_run(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("CCATOOLKIT_CACHE", str(tmp_path))  # the PAM runs are cached: not in the user's folder
    train, test = digits
    a, b = digit_mlps(train)
    pam_descent, curve_by_hand = notebook_solutions(NOTEBOOKS / "05_mode_connectivity.ipynb")
    from_al = cc.train_curve_pam(a, b, train, start="permute", rounds=2, epochs=1, step=0.5, eval_data=test,
                                 progress=False)
    namespace = dict(cc=cc, a=a, b=b, data={"train": train, "test": test}, S=SimpleNamespace(pam_step=0.5, progress=False),
                     from_al=from_al)
    printed = _run(pam_descent, namespace)
    plain = namespace["plain"]
    assert len(plain.moved) == 2 and len(plain.midpoint) == 2 and "moved per round" in printed

    curve = train_curve(a, b, train, align="permute", epochs=1, cache=False, progress=False)
    bent = {"permute": curve.evaluate(test, ts=5, progress=False)}
    line = {"permute": cc.interpolate(a, curve.end_models()[1], test, alphas=5, progress=False)}
    printed = _run(curve_by_hand, dict(a=a, curves={"permute": curve}, data={"test": test}, bent=bent, line=line,
                                       mid=2))
    by_hand = {name: float(loss) for name, loss in re.findall(r"^(curve|straight line) \{.*?'loss': ([0-9.e-]+)", printed,
                                                              flags=re.M)}
    assert by_hand["curve"] == pytest.approx(bent["permute"].loss[2], rel=1e-4)  # the text: "matches ... at t = 0.5"
    assert by_hand["straight line"] == pytest.approx(line["permute"].loss[2], rel=1e-4)
    assert by_hand["curve"] < by_hand["straight line"]  # "the curve's midpoint is lower"


def test_notebook07_solutions_run(digits):
    train, test = digits
    deeper_graph, all_three = notebook_solutions(NOTEBOOKS / "07_bring_your_own_model.ipynb")
    printed = _run(deeper_graph, dict(cc=cc))
    assert printed.startswith("20 activation spaces")  # the text: 3 + 4 + 6 + 3 blocks and 4 streams
    zoo = list(digit_mlps(train, seeds=(0, 1, 2)))
    per_pair = pd.DataFrame({"cca": [0.7, 0.71, 0.72]}, index=["A+B", "A+C", "B+C"])
    namespace = dict(cc=cc, zoo=zoo, data={"stats": train, "test": test}, per_pair=per_pair)
    printed = _run(all_three, namespace)
    merged = namespace["merged3"]
    assert "CCA Merge of all three:" in printed and "ensemble of all three:" in printed
    assert cc.evaluate(merged, test)["accuracy"] > 0.5  # three digit MLPs merge into a working model
