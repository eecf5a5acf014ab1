"""Is neuron alignment locally optimal for a learned curve? PAM from the alignment and from the identity.

Tatro et al. (2020) learn a curve and B's permutation together by proximal alternating minimisation
(:func:`ccatoolkit.landscape.pam.train_curve_pam`) and report that started from the neuron-alignment
permutation, PAM barely moves it. Each PAM round takes a permutation step (round 0's at the straight
line), then trains the curve; with ``descent`` (the default) a step is kept only when it lowers the
curve's loss on held-out batches, halving it up to 3 times first.

Digits (default): two MLPs (64-32-32-10) trained on scikit-learn digits from different seeds; PAM from
``start`` = permute (activation matching) and identity, for several relative step lengths of the
permutation step (0 = never move), 3 rounds of 3 curve epochs each, with and without descent.

Fashion-MNIST (``--fashion``): notebook 05's settings on the zoo's 3 x 512 MLPs (pairs of seeds), the
results shared with the notebook through the cache: the identity with the permutation held (step 0),
PAM from the identity and PAM from the alignment, ``Settings.pam_rounds`` rounds of one epoch at
relative step ``Settings.pam_step``. Minutes per pair on a CPU (models of new seeds are trained first).

Printed per run: the fraction of neurons moved at each permutation step and in all, and the test loss
at the curve's midpoint after each round (digits: also its maximum along t at the end).

    .venv/bin/python benchmarks/pam.py
    .venv/bin/python benchmarks/pam.py --seeds 0 2 4 --steps 0 2 8
    .venv/bin/python benchmarks/pam.py --fashion --pairs 0:1 2:3 4:5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from toybox import digit_batches, fit, loss_and_accuracy  # noqa: E402

from ccatoolkit.landscape.pam import PamResult, train_curve_pam  # noqa: E402


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _seeded_mlp(seed: int) -> nn.Module:
    """An MLP whose whole initialisation (weights and biases) comes from ``seed``, so runs repeat."""
    torch.manual_seed(seed)
    return mlp()


def _row(result: PamResult) -> str:
    moved = " ".join(f"{m:.2f}" for m in result.moved)
    mids = " ".join(f"{m:.3f}" for m in result.midpoint)
    return f"moved per round [{moved}] in all {result.moved_from_start:.2f}; midpoint loss per round [{mids}]"


def digits(seeds: list[int], steps: list[float]) -> None:
    train, test = digit_batches()
    for seed in seeds:
        a, b = (fit(_seeded_mlp(s), train, epochs=30, seed=s) for s in (seed, seed + 1))
        ends = [loss_and_accuracy(m, test)[0] for m in (a, b)]
        print(f"pair {seed}: end losses {ends[0]:.3f}, {ends[1]:.3f}")
        for descent in (True, False):
            for start in ("permute", "identity"):
                for step in steps:
                    t0 = time.time()
                    r = train_curve_pam(a, b, train, start=start, rounds=3, epochs=3, step=step, descent=descent,
                                        eval_data=test, cache=False, progress=False)
                    top = float(np.max(r.curve.evaluate(test, ts=11, progress=False).loss))
                    print(f"  descent={descent!s:5} {start:>8} step {step:>4g}: {_row(r)}; max {top:.3f} "
                          f"({time.time() - t0:.1f}s)", flush=True)


def fashion(pairs: list[tuple[int, int]]) -> None:
    from ccatoolkit.app import inputs
    from ccatoolkit.app import settings as nb

    s = nb.prepare(nb.settings(False, progress=False))
    data = inputs.loaders(s)
    print(s.summary())
    print(f"PAM: {s.pam_rounds} rounds of 1 epoch, relative step {s.pam_step:g} (halved up to 3 times)")
    gaps = []
    for pair in pairs:
        a, b = inputs.zoo(s, "full", n=2, seeds=pair)
        runs = {}
        for name, start, step in (("identity, held", "identity", 0.0), ("PAM from identity", "identity", s.pam_step),
                                  ("PAM from alignment", "permute", s.pam_step)):
            t0 = time.time()
            runs[name] = train_curve_pam(a, b, data["train"], start=start, rounds=s.pam_rounds, epochs=1, step=step,
                                         eval_data=data["test"], progress=False)
            print(f"pair {pair}: {name:>18}: {_row(runs[name])} ({time.time() - t0:.0f}s)", flush=True)
        gap = np.subtract(runs["identity, held"].midpoint, runs["PAM from identity"].midpoint)
        gaps.append(gap)
        print(f"pair {pair}: PAM from identity lowers the midpoint loss by {' '.join(f'{g:+.3f}' for g in gap)} "
              f"(per round); from the alignment it stays {runs['PAM from alignment'].midpoint[-1]:.3f}")
    if len(gaps) > 1:
        g = np.array(gaps)
        print("mean ± sd over pairs of the lowering per round:",
              " ".join(f"{m:+.3f} ± {d:.3f}" for m, d in zip(g.mean(0), g.std(0, ddof=1))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="digits: pairs (seed, seed + 1) of models")
    p.add_argument("--steps", nargs="+", type=float, default=[0.0, 2.0, 8.0], help="digits: relative step lengths")
    p.add_argument("--fashion", action="store_true", help="notebook 05's settings on the zoo's Fashion-MNIST MLPs")
    p.add_argument("--pairs", nargs="+", default=["0:1"], help="--fashion: pairs of zoo seeds, as A:B")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for digits)")
    args = p.parse_args()
    if args.fashion:
        if args.threads:
            torch.set_num_threads(args.threads)
        fashion([tuple(int(v) for v in pair.split(":")) for pair in args.pairs])
    else:
        torch.set_num_threads(args.threads or 1)
        digits(args.seeds, args.steps)


if __name__ == "__main__":
    main()
