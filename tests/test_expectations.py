"""The notebooks' last cells: expect_results judges measured values at default settings, never raises."""

import math

import pytest

from ccatoolkit.app import expectations as ex
from ccatoolkit.app.settings import Settings


def _default():
    return Settings(smoke=False)


def test_values_in_range_are_ok(capsys):
    result = ex.expect_results(_default(), [
        ("accuracy of A", 0.885, ex.around(0.885, 0.01), "{:.1%}"),
        ("loss barrier", 0.30, (0.1, 0.5)),
        ("gap", 1e-7, ex.at_most(1e-5), "{:.1e}"),
        ("correlation", 0.95, ex.at_least(0.9)),
        ("curve lower than line", True, True),
        ("merge - ensemble", -0.004, ex.around(-0.004, 0.003), "{:+.1%}"),
    ])
    out = capsys.readouterr().out
    assert result.ok and result.failures == []
    assert [r["status"] for r in result.rows()] == ["ok"] * 6
    assert "All 6 expectations hold at default settings." in out
    assert "-0.4% ± 0.3%" in out  # the sign is the value's, not the tolerance's
    assert "NOT OK" not in out
    assert "88.5% ± 1.0%" in out  # around() of a percentage is written in percent
    assert "0.100 to 0.500" in out and "<= 1.0e-05" in out and ">= 0.900" in out
    # the column is a tolerance, not the spread over seeds the first cell's "±" gives: named so
    assert "accepted range" in out and "<th>accepted range</th>" in result._repr_html_()


def test_values_out_of_range_are_reported_not_raised(capsys):
    result = ex.expect_results(_default(), [
        ("accuracy of A", 0.80, ex.around(0.885, 0.01), "{:.1%}"),
        ("loss barrier", 0.30, ex.between(0.1, 0.5)),
        ("curve lower than line", False, True),
        ("not measured", None, (0, 1)),
        ("diverged", math.nan, (0, 1)),
    ])
    out = capsys.readouterr().out
    assert not result.ok
    assert [c.description for c in result.failures] == ["accuracy of A", "curve lower than line", "not measured",
                                                        "diverged"]
    assert [r["status"] for r in result.rows()] == ["NOT OK", "ok", "NOT OK", "NOT OK", "NOT OK"]
    assert "NOT OK: 4 of 5 expectations missed at default settings: accuracy of A;" in out
    html = result._repr_html_()
    assert html.count("color:#c00000;font-weight:bold") == 5  # four rows and the summary in bold red


def test_bounds_are_inclusive_and_one_sided_pairs_work():
    result = ex.expect_results(False, [("low end", 0.1, (0.1, 0.5)), ("high end", 0.5, (0.1, 0.5)),
                                       ("no upper", 7.0, (1, None)), ("no lower", -3.0, (None, 0))], show=False)
    assert result.ok


def test_smoke_mode_shows_values_without_judging(capsys):
    result = ex.expect_results(Settings(smoke=True), [
        ("accuracy of A", 0.12, ex.around(0.885, 0.01), "{:.1%}"),
        ("curve lower than line", False, True),
    ])
    out = capsys.readouterr().out
    assert result.smoke and result.ok and result.failures == []
    assert "apply to default settings only" in out
    assert "12.0%" in out and "NOT OK" not in out and "ok" not in out.split("\n")[-1]
    assert [r["status"] for r in result.rows()] == ["-", "-"]
    assert "color:#c00000" not in result._repr_html_()


def test_bad_specifications_raise_at_once():
    with pytest.raises(TypeError):
        ex.expect_results(False, [("no range", 1.0)], show=False)
    with pytest.raises(TypeError):
        ex.expect_results(False, [("a string range", 1.0, "0.5-1")], show=False)
    with pytest.raises(ValueError):
        ex.between(1, 0)


def test_table_as_a_frame():
    pd = pytest.importorskip("pandas")
    frame = ex.expect_results(False, [("x", 2.0, (1, 3))], show=False).to_frame()
    assert isinstance(frame, pd.DataFrame) and frame.loc["x", "status"] == "ok"
