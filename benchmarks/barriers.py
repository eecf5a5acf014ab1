"""Linear-interpolation barriers between two Fashion-MNIST models of each family: naive, permuted, CCA-aligned.

    .venv/bin/python benchmarks/barriers.py --families mlp vgg11 resnet20 --epochs 2

Two models per family are trained (cached, via ``ccatoolkit.zoo``) from seeds 0 and 1 on the full
training set. For each alignment (none, activation matching, weight matching, CCA) the path
``(1-a) A + a B'`` is evaluated on the test set at ``--points`` values of ``a``, with BatchNorm
statistics re-estimated at every point for BatchNorm networks (without that the curve is wrong).
Printed: the loss and accuracy barriers, and the accuracy of B' itself (CCA alignment is not an
exact symmetry, so B' can differ from B).
"""

from __future__ import annotations

import argparse
import time

import torch

from ccatoolkit.data.loaders import get_loaders
from ccatoolkit._utils import default_device
from ccatoolkit.landscape.paths import interpolate
from ccatoolkit.merging.normalization import has_batchnorm
from ccatoolkit.zoo.trained import trained_model

FAMILY_KWARGS = {"mlp": {}, "vgg11": {"width": 0.25}, "resnet20": {"width": 1}}
ALIGNS = (None, "permute", "permute_weight", "cca")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["mlp", "vgg11", "resnet20"], choices=sorted(FAMILY_KWARGS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--bn-batches", type=int, default=20, help="training batches per BatchNorm re-estimate")
    parser.add_argument("--limit", type=int, default=None, help="cap data sizes (smoke runs)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaders = get_loaders("fashion_mnist", split="full", limit=args.limit)
    train, test = loaders["train"], loaders["test"]
    bn_data = [batch for _, batch in zip(range(args.bn_batches), train)]
    print(f"Fashion-MNIST, {args.epochs} epochs per model, {args.points} points, device {default_device()}, "
          f"{torch.get_num_threads()} threads")
    print("| family | alignment | loss barrier | accuracy barrier | acc(A) | acc(B') | seconds |")
    print("|---|---|---|---|---|---|---|")
    for family in args.families:
        common = dict(model=family, model_kwargs=FAMILY_KWARGS[family], epochs=args.epochs, limit=args.limit,
                      progress=False)
        a, b = (trained_model(split="full", n_models=1, seed=s, **common) for s in (0, 1))
        reset = has_batchnorm(a)
        for align in ALIGNS:
            t0 = time.time()
            result = interpolate(
                a, b, test, alphas=args.points, align=align, align_data=bn_data, reset_bn=reset,
                bn_data=bn_data if reset else None, progress=False,
            )
            print(
                f"| {family} | {align or 'naive'} | {result.barrier('loss'):.3f} | "
                f"{100 * result.barrier('accuracy'):.1f} pts | {100 * result.accuracy[0]:.1f} | "
                f"{100 * result.accuracy[-1]:.1f} | {time.time() - t0:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
