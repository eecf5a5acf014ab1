"""How fast do the notebooks' widgets redraw? (not a timed test; run by hand)

Builds each widget's context at default settings the way notebooks 03, 04 and 06 do (cached zoo
models: run ``make prefetch`` first, or the models are trained) and times, per widget:

* the build (the context's precomputation, not counted against the targets),
* the first draw (a full render of the figure),
* a slider move to a value not shown before, and back to one already shown,
* a method change, and (merge widget) a CCA ridge change (the widget merges at every slider ridge
  when it is built, so a change is a look-up) and the cost of one ridge that was not precomputed.

Targets (issue 12): a slider move under 0.25 s, a ridge change under 1 s, on 2 CPU cores. Each
redraw is timed once through the widget itself (``control.value = ...``: render, PNG, image), so
the numbers are what a user waits for; on a shared machine they are noisy, so the CPU seconds of
the process are printed beside them (the work itself; with one torch thread, what the wall clock
would read on a free core) and the load average after them.

    python benchmarks/widget_speed.py             # default sizes (the notebooks' default run)
    python benchmarks/widget_speed.py --smoke     # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import torch

import ccatoolkit as cc
from ccatoolkit.app import contexts, controls, experiments, inputs
from ccatoolkit.app import settings as nb

SLIDER_TARGET = 0.25  # s, a slider move (alpha, N) or a method change
RIDGE_TARGET = 1.0  # s, a new CCA ridge


def timed(action: Callable[[], Any]) -> tuple[float, float]:
    """``(wall-clock, CPU)`` seconds of ``action``: what the user waits, and the work, whatever else runs on the cores."""
    c0, t0 = time.process_time(), time.perf_counter()
    action()
    return time.perf_counter() - t0, time.process_time() - c0


def set_value(box: controls.InteractiveFigure, name: str, value: Any) -> Callable[[], None]:
    def act() -> None:
        box.controls[name].value = value
        if box.error:
            raise RuntimeError(box.error)

    return act


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script, not the targets)")
    args = parser.parse_args()
    S = nb.prepare(nb.settings(args.smoke, progress=False))
    print(S.summary(), f"| torch threads {torch.get_num_threads()}")
    data = inputs.loaders(S)
    a, b = inputs.zoo(S, "full", n=2)
    rows: list[tuple[str, str, float, float, float | None]] = []  # widget, action, wall s, CPU s, target

    # 04: the alpha widget over the paths of the notebook (naive, permutation, CCA)
    actx: contexts.AlphaContext | None = None

    def build_alpha() -> None:
        nonlocal actx
        actx = contexts.AlphaContext.from_models(a, b, data["test"], methods=(None, "permute", "cca"), alphas=S.alphas,
                                                 align_data=data["stats"],
                                                 class_names=cc.dataset_info(S.dataset)["classes"])

    rows.append(("alpha (04)", f"build: 3 paths x {S.alphas} points", *timed(build_alpha), None))
    assert actx is not None
    box: controls.InteractiveFigure | None = None

    def first() -> None:
        nonlocal box
        box = controls.alpha_widget(actx, alpha=0.5)

    rows.append(("alpha (04)", "first draw", *timed(first), None))
    assert box is not None
    grid = [float(x) for x in actx.alphas]
    rows.append(("alpha (04)", "slider to a new point", *timed(set_value(box, "alpha", grid[-1])), SLIDER_TARGET))
    rows.append(("alpha (04)", "slider to a shown point", *timed(set_value(box, "alpha", grid[len(grid) // 2])),
                 SLIDER_TARGET))
    rows.append(("alpha (04)", "method change", *timed(set_value(box, "method", "naive")), SLIDER_TARGET))

    # 03: the merge widget (method dropdown, CCA ridge slider) on one pair
    # (no disk store: the build is timed cold, every merge and the slider's 11 ridges computed)
    mctx = contexts.MergeContext([a, b], data["stats"], data["test"],
                                 methods=["average", "permute", "permute_weight", "zipit", "cca", "ensemble"],
                                 disk_cache=False)

    def first_merge() -> None:
        nonlocal box
        box = controls.merge_widget(mctx, method="cca", ridge=0.1)

    rows.append(("merge (03)", "build + first draw (all merges, 11 ridges)", *timed(first_merge), None))
    rows.append(("merge (03)", "method change", *timed(set_value(box, "method", "permute")), SLIDER_TARGET))
    box.controls["method"].value = "cca"
    rows.append(("merge (03)", "ridge change (precomputed)", *timed(set_value(box, "ridge", 1.0)), RIDGE_TARGET))
    rows.append(("merge (03)", "ridge change (precomputed)", *timed(set_value(box, "ridge", 10 ** -2.5)),
                 RIDGE_TARGET))
    # what each precomputed ridge cost: a ridge off the slider's grid (CCA solve, averaging, REPAIR, evaluation)
    rows.append(("merge (03)", "one more ridge (0.05, not precomputed)",
                 *timed(lambda: contexts.merge_accuracy(mctx, "cca", 0.05)), None))

    # 06: the N-models widget on precomputed results (one subset per N: the redraw, not the merges, is timed)
    zoos = {split: inputs.zoo(S, split, n=S.n_models) for split in ("full", "skewed")}
    nctx = experiments.NModelsContext(zoos, data["stats"], data["test"], methods=["average", "permute", "cca", "ensemble"],
                                   ridge=0.1, subsets=1)
    rows.append(("N models (06)", "build (merges)", *timed(nctx.compute), None))

    def first_n() -> None:
        nonlocal box
        box = controls.n_models_widget(nctx, method="cca")

    rows.append(("N models (06)", "first draw", *timed(first_n), None))
    rows.append(("N models (06)", "N slider", *timed(set_value(box, "n", min(nctx.ns))), SLIDER_TARGET))
    rows.append(("N models (06)", "method change", *timed(set_value(box, "method", "permute")), SLIDER_TARGET))
    rows.append(("N models (06)", "split change", *timed(set_value(box, "split", "skewed")), None))

    print(f"\n{'widget':<15} {'action':<42} {'seconds':>8} {'cpu s':>7} {'target':>7}  ok")
    for widget, action, seconds, cpu, target in rows:
        mark = "" if target is None else ("yes" if seconds <= target else "NO")
        shown = "" if target is None else f"{target:.2f}"
        print(f"{widget:<15} {action:<42} {seconds:8.3f} {cpu:7.3f} {shown:>7}  {mark}")
    print(f"load average over the last minute: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(above the core count, the wall-clock seconds include waiting for a core)")


if __name__ == "__main__":
    main()
