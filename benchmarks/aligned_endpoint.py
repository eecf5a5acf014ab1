"""Is a CCA-aligned model still the model? B' against B per family, and the paths' barriers (issue 28).

``align_to(A, B, "cca")`` maps B's features into A's basis with a general linear map ``T``, which is not a
symmetry of a ReLU network. For every pair of three models per family this prints the test accuracy of B,
of B' as ``T`` and its inverse make it (``repair=False``), with its own statistics through ``T``
(``repair=False, reset_bn=True``, BatchNorm families) and repaired (the default: input maps refitted by
least squares, then the statistics), as mean +/- sd over the pairs; and the loss barrier of the path
A -> B' (repaired CCA), against its own end and against B's, and of A -> B permuted (activation matching,
exact).

    .venv/bin/python benchmarks/aligned_endpoint.py --families digits mlp vgg11 resnet20 --limit 10000
    .venv/bin/python benchmarks/aligned_endpoint.py --families digits --smoke      # seconds
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ccatoolkit as cc
from ccatoolkit._utils import has_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from toybox import ConvBN, digit_batches, fit  # noqa: E402  (the tests' Conv-BN net and digits batches)

FAMILY_KWARGS = {"mlp": {}, "vgg11": {"width": 0.25}, "resnet20": {"width": 1}}
VARIANTS = {"T as it is": {"repair": False}, "statistics": {"repair": False, "reset_bn": True}, "repaired": {}}


def family_models(family: str, args: argparse.Namespace) -> tuple[list[nn.Module], list, list]:
    """Three trained models of ``family`` and its (train batches, test data)."""
    if family == "digits":
        train, test = digit_batches(128)
        models = []
        for seed in range(3):
            torch.manual_seed(seed)
            models.append(fit(ConvBN(16), train, epochs=2 if args.smoke else 12, seed=seed))
        return models, train, test
    loaders = cc.get_loaders("fashion_mnist", split="full", limit=args.limit)
    models = [cc.trained_model(model=family, model_kwargs=FAMILY_KWARGS[family], epochs=args.epochs, seed=seed,
                               limit=args.limit, progress=False) for seed in range(3)]
    train = [batch for _, batch in zip(range(args.batches), loaders["train"])]
    return models, train, loaders["test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["digits", "mlp", "vgg11", "resnet20"],
                        choices=["digits", *FAMILY_KWARGS])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=10000, help="training and test images (Fashion-MNIST)")
    parser.add_argument("--batches", type=int, default=20, help="training batches for alignment and statistics")
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.limit, args.batches, args.points, args.epochs = 512, 2, 3, 1
    warnings.simplefilter("ignore", RuntimeWarning)  # the degraded-endpoint warning: what this script measures
    print(f"{torch.get_num_threads()} threads; accuracy in %, mean +/- sd over 3 pairs; barriers on the test set")
    print("| family | B | B', T as it is | B', statistics | B', repaired (default) | loss barrier A-B' (cca) "
          "| same, against B's end | loss barrier A-B (permute) | seconds per repaired B' |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family in args.families:
        models, train, test = family_models(family, args)
        reset = has_batchnorm(models[0])
        rows: dict[str, list[float]] = {"B": [], **{k: [] for k in VARIANTS}, "cca": [], "cca vs B": [],
                                        "permute": [], "time": []}
        for i, j in itertools.combinations(range(3), 2):
            a, b = models[i], models[j]
            rows["B"].append(100 * cc.evaluate(b, test)["accuracy"])
            for label, options in VARIANTS.items():
                if label == "statistics" and not reset:
                    continue
                start = time.perf_counter()
                aligned = cc.align_to(a, b, "cca", train, progress=False, **options)
                if label == "repaired":
                    rows["time"].append(time.perf_counter() - start)
                rows[label].append(100 * cc.evaluate(aligned, test)["accuracy"])
            paths = {align: cc.interpolate(a, b, test, alphas=args.points, align=align, align_data=train,
                                           reset_bn=reset, bn_data=train if reset else None, progress=False)
                     for align in ("cca", "permute")}
            rows["cca"].append(paths["cca"].barrier("loss"))  # against its own end, B'
            rows["cca vs B"].append(paths["cca"].barrier("loss", against=paths["permute"]))  # against B (exact ends)
            rows["permute"].append(paths["permute"].barrier("loss"))

        def cell(values: list[float], digits: int = 1) -> str:
            return f"{np.mean(values):.{digits}f} +/- {np.std(values):.{digits}f}" if values else "-"

        print(f"| {family} | {cell(rows['B'])} | {cell(rows['T as it is'])} | {cell(rows['statistics'])} | "
              f"{cell(rows['repaired'])} | {cell(rows['cca'], 3)} | {cell(rows['cca vs B'], 3)} | {cell(rows['permute'], 3)} | "
              f"{np.mean(rows['time']):.2f} |", flush=True)


if __name__ == "__main__":
    main()
