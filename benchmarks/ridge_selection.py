"""CCA Merge's ridge: the label-free default against fixed values and against validation accuracy.

Trains (cached) a few models of one family on Fashion-MNIST and merges N of them with CCA for
every ridge of a grid, with ``ridge="auto"`` (the default: agreement with the ensemble on held-out
merge batches, no labels) and with ``ridge="auto"`` plus ``val_data`` (validation accuracy, the
way the reference code tunes it). Prints test accuracy (%) as mean +/- sd over model subsets.
The default family mirrors the paper's Fashion-MNIST setting: narrow VGG11s without BatchNorm.

    .venv/bin/python benchmarks/ridge_selection.py                       # VGG11 (width 0.25, no BN), N = 2, 3
    .venv/bin/python benchmarks/ridge_selection.py --family mlp --n 2
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from ccatoolkit.data import get_loaders
from ccatoolkit.merging.api import merge
from ccatoolkit.zoo.trained import trained_model
from ccatoolkit.zoo.training import evaluate

FAMILIES = {
    "vgg11_plain": dict(model="vgg11", model_kwargs={"width": 0.25, "batchnorm": False}, epochs=2, lr=0.02),
    "vgg11": dict(model="vgg11", model_kwargs={"width": 0.25}, epochs=1),
    "mlp": dict(model="mlp", model_kwargs={"depth": 3, "width": 512}, epochs=5),
}
GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="vgg11_plain", choices=sorted(FAMILIES))
    p.add_argument("--models", type=int, default=4, help="models trained (seeds 0..models-1)")
    p.add_argument("--n", nargs="+", type=int, default=[2, 3])
    p.add_argument("--subsets", type=int, default=3)
    p.add_argument("--max-batches", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", nargs="+", type=float, default=list(GRID), help="ridges tried (fixed, and by 'auto')")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    spec = FAMILIES[args.family]
    models = [trained_model(dataset="fashion_mnist", seed=s, progress=False, **spec) for s in range(args.models)]
    loaders = get_loaders("fashion_mnist", batch_size=256)
    train, val, test = loaders["train"], loaders["val"], loaders["test"]
    acc = lambda m: 100.0 * float(evaluate(m, test)["accuracy"])  # noqa: E731
    print(f"{args.family}: endpoints", " ".join(f"{acc(m):.1f}" for m in models), f"({time.time() - t0:.0f}s)")
    for n in args.n:
        rows: dict[str, list[float]] = {}
        chosen: dict[str, list[float]] = {}
        for group in list(itertools.combinations(models, n))[: args.subsets]:
            group = list(group)
            rows.setdefault("ensemble", []).append(acc(merge(group, "ensemble")))
            for r in args.grid:
                rows.setdefault(f"ridge {r:g}", []).append(
                    acc(merge(group, "cca", train, ridge=r, max_batches=args.max_batches, progress=False)))
            for label, extra in (("auto, label-free (default)", {}), ("auto, validation accuracy", {"val_data": val})):
                m = merge(group, "cca", train, max_batches=args.max_batches, progress=False,
                          ridge_grid=tuple(args.grid), **extra)
                rows.setdefault(label, []).append(acc(m))
                chosen.setdefault(label, []).append(m.merge_info["ridge"])
        print(f"\nN = {n}: CCA Merge test accuracy (%), mean ± sd over {len(rows['ensemble'])} subsets")
        print("| ridge | accuracy | chosen ridges |\n|---|---|---|")
        for label, values in rows.items():
            picks = " ".join(f"{c:g}" for c in chosen.get(label, []))
            print(f"| {label} | {np.mean(values):.2f} ± {np.std(values):.2f} | {picks} |")
    print(f"\n({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
