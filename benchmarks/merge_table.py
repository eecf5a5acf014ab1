"""Test accuracy of merged models: every merge method, with and without BN reset / REPAIR.

Trains (cached, via ``ccatoolkit.zoo.trained_models``) N models of a family on Fashion-MNIST, on
the full training set (different seeds) and on skewed class splits, and prints a markdown table:
the endpoints' test accuracy, the ensemble's, and each method's merge. The data for the
statistics, BN reset and REPAIR is the training set (without the validation part); the ridge of
the CCA methods is fixed (``--ridge``) or chosen on the validation split (``--ridge auto``).

    .venv/bin/python benchmarks/merge_table.py --families mlp --n 2 3 4 --epochs 5
    .venv/bin/python benchmarks/merge_table.py --families vgg11 --n 2 --epochs 10
    .venv/bin/python benchmarks/merge_table.py --smoke
"""

from __future__ import annotations

import argparse
import time

import torch

from ccatoolkit.data.loaders import get_loaders
from ccatoolkit.merging.api import METHODS, merge
from ccatoolkit.merging.normalization import has_batchnorm
from ccatoolkit.zoo.training import evaluate
from ccatoolkit.zoo.trained import trained_model, trained_models

FAMILY_KWARGS = {"mlp": {}, "vgg11": {"width": 0.25}, "resnet20": {"width": 1}}
MERGE_METHODS = [m for m in METHODS if m != "ensemble"]


def _acc(model: torch.nn.Module, loader) -> float:
    return 100.0 * float(evaluate(model, loader)["accuracy"])


def run(args: argparse.Namespace) -> list[str]:
    rows = []
    header = ["family", "split", "N", "endpoints", "ensemble"] + list(args.methods)
    rows.append("| " + " | ".join(header) + " |")
    rows.append("|" + "---|" * len(header))
    for family in args.families:
        kwargs = dict(FAMILY_KWARGS[family])
        if family == "mlp" and args.mlp_width:
            kwargs["width"] = args.mlp_width
        for split in args.splits:
            for n in args.n:
                t0 = time.time()
                common = dict(model=family, model_kwargs=kwargs, epochs=args.epochs, limit=args.limit, progress=False)
                if split == "full":  # same data for every model: reuse models across N (seeds 0..N-1)
                    models = [trained_model(split="full", n_models=1, seed=i, **common) for i in range(n)]
                else:
                    models = trained_models(n, split=split, **common)
                loaders = get_loaders("fashion_mnist", batch_size=args.batch_size, split="full", limit=args.limit)
                train, val, test = loaders["train"], loaders["val"], loaders["test"]
                ends = [_acc(m, test) for m in models]
                ens = _acc(merge(models, "ensemble"), test)
                variants = [("", True, False), ("R", True, True)]
                if has_batchnorm(models[0]):
                    variants = [("noBN", False, False)] + variants
                cells = []
                for method in args.methods:
                    parts = []
                    for label, reset_bn, rep in variants:
                        merged = merge(
                            models, method, train, reset_bn=reset_bn, repair=rep, ridge=args.ridge,
                            val_data=val, max_batches=args.max_batches, progress=False,
                        )
                        acc = _acc(merged, test)
                        parts.append(f"{acc:.1f}{label}" if label else f"{acc:.1f}")
                    cells.append(" / ".join(parts))
                row = [family, split, str(n), " ".join(f"{a:.1f}" for a in ends), f"{ens:.1f}"] + cells
                rows.append("| " + " | ".join(row) + " |")
                print(rows[-1], f"  ({time.time() - t0:.0f}s)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["mlp"], choices=sorted(FAMILY_KWARGS))
    p.add_argument("--splits", nargs="+", default=["full", "skewed"], choices=["full", "disjoint", "skewed"])
    p.add_argument("--n", nargs="+", type=int, default=[2, 3, 4], help="numbers of models merged")
    p.add_argument("--methods", nargs="+", default=MERGE_METHODS, choices=MERGE_METHODS)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-batches", type=int, default=40, help="batches for statistics / BN reset / REPAIR")
    p.add_argument("--ridge", default="1e-2", help="CCA ridge, or 'auto' (validation split)")
    p.add_argument("--limit", type=int, default=None, help="cap train/val/test sizes (smoke runs)")
    p.add_argument("--mlp-width", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny run: 2 models, 1 epoch, 3000 samples")
    args = p.parse_args()
    args.ridge = args.ridge if args.ridge == "auto" else float(args.ridge)
    if args.smoke:
        args.n, args.epochs, args.limit, args.max_batches = [2], 1, 3000, 4
        args.splits = args.splits[:1]
        args.mlp_width = args.mlp_width or 64
    torch.set_num_threads(args.threads)
    t0 = time.time()
    print(f"Fashion-MNIST test accuracy (%), {args.epochs} epochs; cell = merged / +R(EPAIR)"
          " [/ noBN = no BatchNorm reset]; ridge", args.ridge)
    rows = run(args)
    print()
    print("\n".join(rows))
    print(f"\n({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
