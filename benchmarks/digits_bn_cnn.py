"""A user's own Conv-BatchNorm-ReLU network on scikit-learn digits: every merge method at its defaults.

The case from the CCA-Merge-on-BatchNorm issue: three conv layers with BatchNorm, global pooling,
a linear head, trained with Adam from different seeds (``tests/toybox.py``: the model and the
digits batches the tests use). Each pair of models is merged with
``cc.merge([a, b], method=..., data=train)`` and nothing else, and without REPAIR. Prints test
accuracy (%) as mean +/- sd over the pairs. Runs in a minute or two on 2 CPU cores.

    .venv/bin/python benchmarks/digits_bn_cnn.py --pairs 5
    .venv/bin/python benchmarks/digits_bn_cnn.py --n 2 3 4 5 --pairs 3 --no-repair-rows   # N models, C2M3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ccatoolkit as cc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from toybox import ConvBN, digit_batches, fit  # noqa: E402  (the same model and data the tests use)


METHODS = ("average", "permute", "permute_weight", "c2m3", "zipit", "cca", "cca_multiview")


def trained(seed: int, width: int, train: list, epochs: int) -> nn.Module:
    """A ConvBN trained with Adam from initialisation ``seed`` (``toybox.fit``)."""
    torch.manual_seed(seed)
    return fit(ConvBN(width), train, epochs=epochs, seed=seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=5, help="groups of models merged per N (disjoint seeds)")
    p.add_argument("--n", type=int, nargs="+", default=[2], help="numbers of models merged")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--no-repair-rows", action="store_true", help="skip the repair=False rows")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    train, test = digit_batches(128)
    acc = lambda m: 100.0 * cc.evaluate(m, test)["accuracy"]  # noqa: E731
    cache: dict[int, nn.Module] = {}
    for n in args.n:
        rows: dict[str, list[float]] = {}
        for group in range(args.pairs):
            seeds = range(n * group, n * group + n)
            models = [cache.setdefault(s, trained(s, args.width, train, args.epochs)) for s in seeds]
            rows.setdefault("endpoints (mean)", []).append(float(np.mean([acc(m) for m in models])))
            rows.setdefault("ensemble", []).append(acc(cc.ensemble(models)))
            for method in args.methods:
                rows.setdefault(method, []).append(acc(cc.merge(models, method=method, data=train, progress=False)))
                if method != "average" and not args.no_repair_rows:
                    rows.setdefault(f"{method}, repair=False", []).append(
                        acc(cc.merge(models, method=method, data=train, repair=False, progress=False)))
            if n == 2 and not args.no_repair_rows:
                rows.setdefault("align_to(a, b, 'cca') on its own", []).append(
                    acc(cc.align_to(models[0], models[1], "cca", train, progress=False)))
        label = "pairs" if n == 2 else f"groups of {n}"
        print(f"\ndigits Conv-BN-ReLU (width {args.width}, {args.epochs} epochs Adam), N = {n}, {args.pairs} {label} "
              "(disjoint seeds); test accuracy %")
        print("| merge | mean ± sd | per group |\n|---|---|---|")
        for name, values in rows.items():
            print(f"| {name} | {np.mean(values):.1f} ± {np.std(values):.1f} | {' '.join(f'{v:.1f}' for v in values)} |")
    print(f"\n({time.time() - t0:.0f}s, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
