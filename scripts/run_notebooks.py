#!/usr/bin/env python
"""Run the notebook sequence headless and write a report: executed notebooks, HTML pages and figures.

    .venv/bin/python scripts/run_notebooks.py --out reports            # default settings (``make demo``)
    .venv/bin/python scripts/run_notebooks.py --out reports --smoke    # tiny sizes, a few minutes in all
    .venv/bin/python scripts/run_notebooks.py --only 02 04             # some notebooks
    .venv/bin/python scripts/run_notebooks.py --appendix --out reports/appendix   # the appendix (notebook 7)
    .venv/bin/python scripts/run_notebooks.py --all                    # the sequence and the appendix

The workshop sequence is notebooks 01-06, a 3-hour session; notebook 07 (your own torchvision model) is an
appendix, homework outside the timed sequence: ``--appendix`` runs it, ``--all`` runs both, ``--only``
picks notebooks from both by prefix. Each notebook (in name order) is executed with papermill in a kernel of *this*
interpreter (a ``python3`` kernelspec written to a private ``JUPYTER_PATH`` that points at
``sys.executable``, so the venv's packages are used whatever else is installed), with the working
directory ``notebooks/``. Written under ``--out``:

* ``<name>.ipynb``: the executed notebook (also when a cell failed: it shows the error);
* ``<name>.html``: the same as a web page (nbconvert);
* ``figures/<name>_*.png``: figures the notebooks save (``$CCATOOLKIT_FIGURES``), and every PNG
  output of the notebook as ``figures/<name>/cell<i>_<k>.png``;
* ``summary.json`` and ``summary.md``: wall time and status of each notebook, and the total.

Default settings are the notebooks' real sizes (3x512 MLPs on all of Fashion-MNIST, 5 epochs;
minutes per notebook on a laptop CPU; a second run is much faster because trained models and
curves are cached in ``$CCATOOLKIT_CACHE``). ``--smoke`` sets ``CCATOOLKIT_SMOKE=1`` (about 2-3
minutes for the whole sequence on 2 CPU cores). The exit status is 1 when any notebook failed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
APPENDIX = ("07_",)  # name prefixes of the notebooks outside the timed workshop sequence


def select(only: list[str], appendix: bool = False, everything: bool = False) -> list[Path]:
    """The notebooks to run: the sequence (default), the appendix, both, or those named by prefix in ``only``."""
    notebooks = sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    if only:
        return [p for p in notebooks if any(p.name.startswith(o) for o in only)]
    if everything:
        return notebooks
    return [p for p in notebooks if p.name.startswith(APPENDIX) == appendix]


def _kernel_dir() -> Path:
    """A private JUPYTER_PATH with a ``python3`` kernelspec that runs this interpreter."""
    path = Path(tempfile.mkdtemp(prefix="ccatoolkit-kernels-"))
    spec = path / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ccatoolkit)",
        "language": "python",
    }))
    return path


def _extract_pngs(nb_path: Path, folder: Path) -> list[Path]:
    """Write every PNG output of an executed notebook to ``folder`` (``cell<i>_<k>.png``)."""
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    written = []
    for i, cell in enumerate(nb.cells):
        k = 0
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"cell{i:02d}_{k}.png"
                path.write_bytes(base64.b64decode(data["image/png"]))
                written.append(path)
                k += 1
    return written


def _to_html(nb_path: Path, html_path: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    from traitlets.config import Config

    # a static page has no kernel for a widget's controls: show the figure the widget opened on (its PNG)
    priority = [mime for mime in HTMLExporter().default_config.NbConvertBase.display_data_priority
                if mime != "application/vnd.jupyter.widget-view+json"]
    exporter = HTMLExporter(config=Config({"NbConvertBase": {"display_data_priority": priority}}))
    body, _ = exporter.from_notebook_node(nbformat.read(nb_path, as_version=4))
    html_path.write_text(body, encoding="utf-8")


def run(out: Path, smoke: bool, notebooks: list[Path], cell_timeout: int, html: bool) -> int:
    import papermill as pm

    out.mkdir(parents=True, exist_ok=True)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(_kernel_dir()), os.environ.get("JUPYTER_PATH")]))
    os.environ["CCATOOLKIT_FIGURES"] = str(figures.resolve())
    os.environ["CCATOOLKIT_SMOKE"] = "1" if smoke else "0"
    # the kernel imports this checkout even where the venv's install of it is stale or missing
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    mode = "smoke" if smoke else "default"
    print(f"running {len(notebooks)} notebooks ({mode} settings) into {out}/", flush=True)

    rows = []
    start_all = time.perf_counter()
    for index, path in enumerate(notebooks, start=1):
        target = out / path.name
        print(f"[{index}/{len(notebooks)}] {path.name} ...", flush=True)
        t0 = time.perf_counter()
        status, error = "ok", ""
        try:
            pm.execute_notebook(
                str(path), str(target), kernel_name="python3", cwd=str(NOTEBOOKS),
                progress_bar=sys.stderr.isatty(),  # one bar of executed cells per notebook, in a terminal
                execution_timeout=cell_timeout, parameters={"SMOKE": smoke},
            )
        except Exception as err:  # record it, go on with the others
            status, error = "failed", f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        seconds = time.perf_counter() - t0
        if target.exists():
            _extract_pngs(target, figures / path.stem)
            if html:
                _to_html(target, target.with_suffix(".html"))
        rows.append(dict(notebook=path.name, status=status, seconds=round(seconds, 1), error=error))
        print(f"  {path.name:<40} {status:>6}  {seconds:7.1f} s  {error}", flush=True)
    total = time.perf_counter() - start_all
    print(f"  {'total':<40} {'':>6}  {total:7.1f} s", flush=True)

    summary = dict(mode=mode, total_seconds=round(total, 1), notebooks=rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# Notebook run ({mode} settings)", "", "| notebook | status | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {r['notebook']} | {r['status']} | {r['seconds']} |" for r in rows]
    lines += [f"| total | | {total:.1f} |", ""]
    lines += [f"- {r['notebook']}: {r['error']}" for r in rows if r["error"]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    failed = [r["notebook"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"FAILED: {', '.join(failed)} (see the executed notebooks in {out}/)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports", help="report folder (default: reports/)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CCATOOLKIT_SMOKE=1): a few minutes in all")
    parser.add_argument("--only", nargs="*", default=[], metavar="PREFIX", help="run notebooks whose names start so")
    parser.add_argument("--appendix", action="store_true", help="run the appendix (notebook 07) instead of 01-06")
    parser.add_argument("--all", action="store_true", help="run the sequence and the appendix")
    parser.add_argument("--cell-timeout", type=int, default=1800, help="seconds one cell may run (default 1800)")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML pages")
    args = parser.parse_args(argv)
    notebooks = select(args.only, appendix=args.appendix, everything=args.all)
    if not notebooks:
        print(f"no notebooks matched {args.only or 'notebooks/[0-9]*.ipynb'}", file=sys.stderr)
        return 2
    return run(args.out, args.smoke, notebooks, args.cell_timeout, not args.no_html)


if __name__ == "__main__":
    sys.exit(main())
