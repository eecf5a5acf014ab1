"""Notebook settings (smoke switch, overrides, figures) and the committed notebooks' shape."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from ccatoolkit.app import settings as nb

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9]*.ipynb"))


def test_smoke_switch_from_the_environment(monkeypatch):
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    assert nb.smoke_from_env() is False and nb.settings().smoke is False
    for value, expected in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv(nb.SMOKE_ENV, value)
        assert nb.smoke_from_env() is expected
    monkeypatch.setenv(nb.SMOKE_ENV, "1")
    assert nb.settings().smoke is True
    assert nb.settings(False).smoke is False  # an explicit papermill parameter wins over the environment
    monkeypatch.setenv(nb.SMOKE_ENV, "maybe")
    with pytest.raises(ValueError, match="CCATOOLKIT_SMOKE"):
        nb.settings()


def test_smoke_sizes_are_tiny_and_defaults_are_real(monkeypatch):
    monkeypatch.delenv("CCATOOLKIT_THREADS", raising=False)
    small, real = nb.settings(True, device="cpu"), nb.settings(False, device="cpu")
    assert small.epochs == 1 and small.limit is not None and small.limit <= 2048 and small.threads == 1
    assert real.limit is None and real.test_limit is None and real.epochs > small.epochs
    assert small.model_kwargs["width"] < real.model_kwargs["width"]
    assert real.n_models >= 3 and small.n_models >= 3  # notebook 6 needs N = 2, 3
    assert "SMOKE" in small.summary() and "default" in real.summary()


def test_overrides_model_and_device(monkeypatch):
    s = nb.settings(False, model="VGG11", device="cpu", epochs=20)
    assert s.model == "vgg11" and s.model_kwargs == {"width": 0.25} and s.epochs == 20 and s.device == "cpu"
    assert nb.settings(True, model="resnet20").model_kwargs == {"width": 1}
    with pytest.raises(ValueError, match="unknown model"):
        nb.settings(model="gpt")
    with pytest.raises(TypeError, match="epochz"):
        nb.settings(epochz=3)
    monkeypatch.setenv("CCATOOLKIT_THREADS", "2")
    assert nb.settings(True).threads == 2


def test_prepare_sets_threads_and_seed():
    before = torch.get_num_threads()
    try:
        s = nb.prepare(nb.settings(True, threads=1, seed=3))
        assert torch.get_num_threads() == 1 and s.seed == 3
        x = torch.rand(3)
        nb.prepare(s)
        assert torch.equal(x, torch.rand(3))
    finally:
        torch.set_num_threads(before)


def test_save_figure_only_when_asked(monkeypatch, tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    monkeypatch.delenv(nb.FIGURES_ENV, raising=False)
    assert nb.save_figure(fig, "x") is None
    monkeypatch.setenv(nb.FIGURES_ENV, str(tmp_path / "figs"))
    path = nb.save_figure(ax, "04 plane/alpha")
    assert path == tmp_path / "figs" / "04_plane_alpha.png" and path.read_bytes()[:4] == b"\x89PNG"
    plt.close(fig)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_are_committed_clean_with_a_parameters_cell(path):
    """Every notebook: no outputs, the papermill parameters cell first, and a first cell that says what to expect."""
    nb_json = json.loads(path.read_text())
    code = [c for c in nb_json["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "clear the outputs"
    first = code[0]
    assert first["metadata"].get("tags") == ["parameters"] and "SMOKE = None" in "".join(first["source"])
    intro = nb_json["cells"][0]
    assert intro["cell_type"] == "markdown" and "Expected at default settings" in "".join(intro["source"])
    assert nb_json["metadata"]["kernelspec"]["name"] == "python3"
    assert "nb.settings(SMOKE" in "".join(code[1]["source"])


#: A number stated in a markdown cell: a percentage, points of accuracy, or a decimal like 0.047.
_STATED_NUMBER = re.compile(r"\d%|\bpts\b|\b0\.\d\d+|\d\.\d+ points|\d points")


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name[:2] in ("01", "02", "06", "07")],
                         ids=lambda p: p.name[:2])
def test_numbers_in_prose_come_from_the_run(path):
    """Only the first cell states numbers (the expected results); every later sentence with a result is a
    ``display(Markdown(f"..."))`` of the run's variables (hidden exercise solutions aside)."""
    cells = json.loads(path.read_text())["cells"]
    for cell in cells[1:]:
        if cell["cell_type"] == "markdown":
            text = re.sub(r"<details>.*?</details>", "", "".join(cell["source"]), flags=re.S)
            assert not _STATED_NUMBER.search(text), text[:200]
    assert sum("display(Markdown(" in "".join(c["source"]) for c in cells if c["cell_type"] == "code") >= 3


def test_the_sequence_is_complete():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


def test_the_runner_times_the_sequence_and_keeps_the_appendix_apart():
    """``make demo`` runs the workshop (01-06); notebook 07 runs with ``--appendix`` or ``--all`` (``make prefetch``)."""
    from toybox import notebook_runner

    runner = notebook_runner()
    names = lambda paths: [p.name[:2] for p in paths]  # noqa: E731
    assert names(runner.select([])) == ["01", "02", "03", "04", "05", "06"]
    assert names(runner.select([], appendix=True)) == ["07"]
    assert names(runner.select([], everything=True)) == [p.name[:2] for p in NOTEBOOKS]
    assert names(runner.select(["07", "02"])) == ["02", "07"]
    makefile = (NOTEBOOKS[0].parents[1] / "Makefile").read_text()
    assert "run_notebooks.py --all --out reports/prefetch" in makefile  # a workshop's cache holds the appendix too
