"""Drive the landscape notebook in a real browser: JupyterLab + headless Chromium (Playwright).

Starts JupyterLab on a free localhost port over a temporary copy of ``notebooks/`` (smoke mode,
a private model cache), opens a notebook, runs all cells from the Run menu, waits for the kernel to
finish, checks that no cell errored, moves a slider with the keyboard and checks that the widget
redrew (its title names the new value) and how long that took as the browser saw it: notebook 4's
alpha slider and notebook 3's CCA ridge slider. Screenshots are saved to ``reports/browser/`` (their
paths are printed). Skipped when Chromium or Playwright is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CCATOOLKIT_CHROMIUM", "/usr/bin/chromium")
RUN_TIMEOUT_S = int(os.environ.get("CCATOOLKIT_BROWSER_TIMEOUT", "240"))
ARTIFACTS = ROOT / "reports" / "browser"

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited early with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "api/status", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url} within {timeout:.0f} s")


@pytest.fixture
def lab(tmp_path: Path):
    """A JupyterLab server over a copy of the notebooks; yields its base URL."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (install Debian's chromium or set CCATOOLKIT_CHROMIUM)")
    pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed")
    root = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python",
    }))
    env = dict(os.environ)
    env.update(
        CCATOOLKIT_SMOKE="1",
        CCATOOLKIT_CACHE=str(tmp_path / "cache"),
        JUPYTER_PATH=os.pathsep.join(filter(None, [str(tmp_path / "jupyter"), env.get("JUPYTER_PATH")])),
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    env.pop("MPLBACKEND", None)  # the notebook picks the inline backend itself
    port = _free_port()
    log = open(tmp_path / "jupyter.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.token=",
         "--ServerApp.password=", "--ServerApp.ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
         f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--ServerApp.disable_check_xsrf=True"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for_server(url, proc)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def _errors(page) -> list[str]:
    """Texts of error outputs: error mime bundles, and stderr outputs holding a traceback or an ...Error."""
    found = []
    for el in page.query_selector_all('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'):
        text = el.inner_text()
        if "Traceback" in text or re.search(r"\b\w+Error\b", text):
            found.append(text[-1500:])
    for el in page.query_selector_all('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]'):
        found.append(el.inner_text()[-1500:])
    return found


def _wait_until_done(page, timeout_s: float) -> None:
    """Wait until every code cell has run: no busy ``[*]`` prompt and the last code cell numbered."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        prompts = [p.inner_text().strip() for p in page.query_selector_all(".jp-CodeCell .jp-InputArea-prompt")]
        if prompts and not any("*" in p for p in prompts) and re.search(r"\[\d+\]", prompts[-1]):
            return
        if _errors(page):
            return  # a failed cell stops "run all"; the caller reports it
        page.wait_for_timeout(1000)
    raise TimeoutError(f"the notebook did not finish within {timeout_s:.0f} s; prompts: {prompts}")


def _kernel_idle(page, timeout_ms: int) -> None:
    """Wait until the status bar says the kernel is idle ("Python 3 | Idle"), not starting or initializing."""
    page.wait_for_function("() => /\\|\\s*Idle/.test(document.body.innerText)", timeout=timeout_ms)


def _started(page) -> bool:
    prompts = [p.inner_text() for p in page.query_selector_all(".jp-CodeCell .jp-InputArea-prompt")]
    return any(re.search(r"\[(\*|\d+)\]", p) for p in prompts)


def _run_all(page, notebook: str, attempts: int = 3) -> None:
    """Run > Run All Cells once the kernel is idle; click again if no cell started (a kernel still connecting)."""
    for attempt in range(attempts):
        _kernel_idle(page, 120_000)
        page.click(".jp-Notebook .jp-Cell >> nth=0")  # make the notebook the current widget
        page.click(".lm-MenuBar-itemLabel:text-is('Run')")
        page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
        for _ in range(30):
            if _started(page):
                return
            page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / f"{Path(notebook).stem}_not_started_{attempt}.png"))
    raise TimeoutError(f"Run All Cells did not start any cell after {attempts} attempts")


def _widget_title(page) -> str:
    titles = page.query_selector_all(".widget-html-content b")
    return titles[-1].inner_text() if titles else ""


# A slider move, seen in the browser: the key press, the kernel's redraw (the target: 0.25 s on 2 CPU
# cores, benchmarks/widget_speed.py) and the new image and title over the websocket. Measured in this
# test on 2 idle cores: 0.11 s (alpha) and 0.10 s (ridge); the bound leaves room for a loaded CI machine.
REDRAW_BOUND_S = float(os.environ.get("CCATOOLKIT_BROWSER_REDRAW_S", "1.5"))


def _browser(p):
    return p.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--no-first-run", "--disable-dev-shm-usage"],
    )


def _open_and_run(browser, lab: str, notebook: str):
    """A page with ``notebook`` open and every cell run without an error."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(lab + "lab/tree/" + notebook, wait_until="domcontentloaded")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    _run_all(page, notebook)
    _wait_until_done(page, RUN_TIMEOUT_S)
    errors = _errors(page)
    assert not errors, "a cell failed:\n" + "\n---\n".join(errors)
    return page


def _press_and_time(page, handle, key: str) -> tuple[float, str]:
    """Press ``key`` on a slider handle; seconds until the widget's title changes, and the new title.

    The widget writes its image before its title, so a new title means the whole redraw arrived.
    """
    handle.scroll_into_view_if_needed()
    handle.focus()
    page.wait_for_timeout(300)  # let the focus settle, so the clock measures the redraw only
    before = _widget_title(page)
    t0 = time.perf_counter()
    page.keyboard.press(key)
    page.wait_for_function(
        "(before) => { const b = [...document.querySelectorAll('.widget-html-content b')].pop();"
        " return b && b.innerText !== before; }",
        arg=before, timeout=120_000, polling="raf",
    )
    return time.perf_counter() - t0, _widget_title(page)


def _screenshot(page, name: str) -> None:
    for button in page.query_selector_all(".jp-toast-button:has-text('No')"):
        button.click()  # the "Jupyter news?" toast, so the screenshot shows the plot
    page.wait_for_timeout(500)
    shot = ARTIFACTS / name
    page.screenshot(path=str(shot), full_page=False)
    print(f"\nbrowser screenshot: {shot}")


def test_landscape_notebook_runs_and_the_alpha_slider_redraws(lab: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = _open_and_run(browser, lab, "04_landscape.ipynb")
            slider = page.wait_for_selector(".widget-slider .noUi-handle", timeout=60_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.widget-html-content b')].some(b => b.innerText.includes('alpha'))",
                timeout=60_000,
            )
            before = _widget_title(page)
            assert "alpha = 0.50" in before, before
            readout = page.query_selector_all(".widget-slider .widget-readout")[-1]
            # one step along the path's grid (smoke: a coarse one); the readout names the value to expect
            seconds, after = _press_and_time(page, slider, "ArrowRight")
            target = readout.inner_text().strip()
            _screenshot(page, "04_landscape.png")
            print(f"alpha slider: one step redrawn in the browser in {seconds:.3f} s")
            assert target != "0.50" and after != before, (target, before, after)
            moved = re.search(r"alpha = (\d\.\d+)", after)
            assert moved and 0.5 < float(moved.group(1)) <= 1.0 and moved.group(1) == target, (after, target)
            assert re.search(r"accuracy \d+\.\d+%", after), after
            assert seconds < REDRAW_BOUND_S, f"the alpha slider took {seconds:.2f} s to redraw"
            assert not _errors(page)
        finally:
            browser.close()


def test_merging_notebook_runs_and_the_ridge_slider_redraws_at_once(lab: str) -> None:
    """Notebook 3's CCA ridge slider: its 11 ridges are merged before the widget shows, so a move is a look-up.
    The widget opens on the ridge the notebook's merge chose; one step moves it by half a decade."""
    from playwright.sync_api import sync_playwright

    from ccatoolkit.app.controls import RIDGE_EXPONENTS

    _, highest, step = RIDGE_EXPONENTS
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = _open_and_run(browser, lab, "03_merging_two_models.ipynb")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.widget-html-content b')].some(b => b.innerText.startsWith('cca (ridge '))",
                timeout=60_000,
            )
            before = _widget_title(page)
            start = float(re.match(r"cca \(ridge ([0-9.e+-]+)\): accuracy", before).group(1))
            key, factor = ("ArrowLeft", 10 ** -step) if start >= 10 ** highest * 0.999 else ("ArrowRight", 10 ** step)
            handle = page.query_selector_all(".widget-slider .noUi-handle")[-1]
            seconds, after = _press_and_time(page, handle, key)
            _screenshot(page, "03_merging_two_models.png")
            print(f"ridge slider: {start:g} -> {after!r} redrawn in the browser in {seconds:.3f} s")
            moved = re.fullmatch(r"cca \(ridge ([0-9.e+-]+)\): accuracy \d+\.\d+%", after)
            assert moved and float(moved.group(1)) == pytest.approx(start * factor, rel=1e-3), (before, after)
            assert seconds < REDRAW_BOUND_S, f"the ridge slider took {seconds:.2f} s to redraw"
            assert not _errors(page)
        finally:
            browser.close()
