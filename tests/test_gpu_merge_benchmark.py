"""benchmarks/gpu_merge.py at its small sizes: every phase runs and the table's figures are real."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_gpu_merge_small_table(capsys: pytest.CaptureFixture[str]) -> None:
    import gpu_merge

    rows = gpu_merge.main(["--small", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert [r["config"] for r in rows] == ["resnet20 x2", "resnet20 x3"]
    for row, config in zip(rows, gpu_merge.SMALL):
        assert row["forward_s"] > 0 and row["statistics_s"] > 0
        assert row["precision"] < gpu_merge.TARGETS["precision"]  # float32 statistics against float64
        assert row["sums_gb"] > 0
        assert list(row["methods"]) == config.methods
        for method, result in row["methods"].items():
            assert result["seconds"] > 0
            phases = result["phases"]
            assert "graph" in phases and sum(phases.values()) <= result["seconds"] * 1.05, (method, phases)
    assert "ridge_selection" in rows[0]["methods"]["cca"]["phases"]  # the default ridge is chosen
    assert printed.count("time <=") == sum(len(c.methods) + 1 for c in gpu_merge.SMALL)  # a verdict per line
