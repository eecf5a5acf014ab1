"""Is neuron alignment locally optimal for a learned curve? PAM from the alignment and from the identity.

Tatro et al. (2020) learn a curve and B's permutation together by proximal alternating minimisation
(:func:`ccatoolkit.landscape.pam.train_curve_pam`) and report that started from the neuron-alignment
permutation, PAM barely moves it. Here: two MLPs (64-32-32-10) trained on scikit-learn digits from
different seeds; PAM from ``start`` = permute (activation matching) and identity, for several
relative step lengths of the permutation step (0 = never move), 3 rounds of 3 curve epochs each.
Printed per run: the fraction of neurons moved at each permutation step and in all, the curve
step's training loss per round, and the test loss at the curve's midpoint and its maximum along t.

    .venv/bin/python benchmarks/pam.py
    .venv/bin/python benchmarks/pam.py --seeds 0 1 2 --steps 0 2 8
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

from ccatoolkit.landscape.pam import train_curve_pam  # noqa: E402


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _seeded_mlp(seed: int) -> nn.Module:
    """An MLP whose whole initialisation (weights and biases) comes from ``seed``, so runs repeat."""
    torch.manual_seed(seed)
    return mlp()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="pairs (seed, seed + 1) of models")
    p.add_argument("--steps", nargs="+", type=float, default=[0.0, 0.5, 2.0, 8.0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, test = digit_batches()
    print(f"{'pair':>5} {'start':>9} {'step':>5} {'moved per step':>22} {'moved':>6} {'mid loss':>9} {'max loss':>9}")
    for seed in args.seeds:
        a, b = (fit(_seeded_mlp(s), train, epochs=30, seed=s) for s in (seed, seed + 1))
        ends = [loss_and_accuracy(m, test)[0] for m in (a, b)]
        for start in ("permute", "identity"):
            for step in args.steps:
                t0 = time.time()
                r = train_curve_pam(a, b, train, start=start, rounds=3, epochs=3, step=step, progress=False)
                loss = r.curve.evaluate(test, ts=11, progress=False).loss
                moved = " ".join(f"{m:.2f}" for m in r.moved)
                print(f"{seed:>5} {start:>9} {step:>5g} {moved:>22} {r.moved_from_start:6.2f} {float(loss[5]):9.3f} "
                      f"{float(np.max(loss)):9.3f}  ({time.time() - t0:.1f}s; end losses {ends[0]:.3f}, {ends[1]:.3f})",
                      flush=True)


if __name__ == "__main__":
    main()
