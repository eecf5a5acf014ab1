"""Does neuron alignment lower the robust loss barrier between adversarially trained models? (Tatro et al. 2020)

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/robust_connectivity.py
    .venv/bin/python benchmarks/robust_connectivity.py --eps 0 0.1 --seeds 0 1 --limit 2000   # quicker

The zoo's MLP (3 hidden layers of 512) on Fashion-MNIST, trained from ``--seeds`` for each training
radius in ``--eps`` (pixel units; 0 = standard training, otherwise L-inf PGD adversarial training with a
random start and ``--train-steps`` steps), all cached in the zoo. For every pair of seeds of one radius:
the straight line and a learned quadratic Bezier curve from A to B, without alignment and with B
permuted to A (activation matching, ``align="permute"``). Curves between robust models are trained
on their robust loss (PGD examples against each point, as their end points were), curves between
standard models on the clean loss. Every path is evaluated clean and under PGD (``--eval-steps``
steps at the models' training radius; standard models are attacked at the smallest non-zero radius)
on ``--test`` test images. Printed: per radius, path and alignment, the loss and accuracy barriers
(clean and PGD; :func:`ccatoolkit.landscape.barrier`) and the lowest robust accuracy along the path,
mean +- sd over the pairs. CPU sized: training uses ``--limit`` examples for ``--epochs`` epochs,
so the models are less accurate and less robust than fully trained ones. The default run took about 16 minutes
on one thread of a shared 2-core CPU (training 9 models and 18 curves, most of it PGD); the pairs of one radius
share models (3 seeds give 3 pairs), so their spread understates the spread over independent pairs.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from ccatoolkit.data import make_loader
from ccatoolkit.data.loaders import get_loaders
from ccatoolkit.landscape.compare import compare_paths
from ccatoolkit.zoo.adversarial import PGD
from ccatoolkit.zoo.trained import trained_model

DATASET = "fashion_mnist"


def robust_pair_paths(a, b, train, test, train_attack, eval_attack, epochs, ts, seed=0):
    """Clean and robust results of compare_paths (straight line and curve, naive and permuted) for one pair."""
    options = dict(aligns=(None, "permute"), ts=ts, epochs=epochs, seed=seed, progress=False, adversarial=train_attack)
    return {"clean": compare_paths(a, b, train, test, **options),
            "PGD": compare_paths(a, b, train, test, attack=eval_attack, **options)}


def fmt(values) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():6.3f} ± {v.std(ddof=1) if v.size > 1 else 0.0:5.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eps", nargs="+", type=float, default=[0.0, 0.05, 0.1], help="training radii (pixel units)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--limit", type=int, default=10000, help="training examples")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=3, help="PGD steps in adversarial training")
    p.add_argument("--eval-steps", type=int, default=10, help="PGD steps when evaluating")
    p.add_argument("--curve-epochs", type=int, default=2)
    p.add_argument("--test", type=int, default=500, help="test images the paths are evaluated on")
    p.add_argument("--points", type=int, default=7, help="points along each path")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    smallest = min([e for e in args.eps if e > 0], default=0.1)
    loaders = get_loaders(DATASET, batch_size=256, limit=args.limit, device="cpu")
    test_set = loaders["test"].dataset
    idx = np.sort(np.random.default_rng(0).choice(len(test_set), size=min(args.test, len(test_set)), replace=False))
    test = make_loader(test_set, 500, indices=idx, device="cpu")
    rows: dict[tuple[float, str, str], dict[str, list[float]]] = {}
    print(f"MLP(3x512) on {DATASET}: {args.limit} training examples, {args.epochs} epochs; PGD training "
          f"{args.train_steps} steps, evaluation {args.eval_steps} steps on {len(idx)} test images; "
          f"curves {args.curve_epochs} epochs; {args.points} points per path; {torch.get_num_threads()} thread(s)")
    for eps in args.eps:
        t0 = time.time()
        train_attack = PGD.for_dataset(DATASET, eps=eps, steps=args.train_steps) if eps > 0 else None
        eval_attack = PGD.for_dataset(DATASET, eps=eps if eps > 0 else smallest, steps=args.eval_steps)
        models = [trained_model("mlp", seed=s, epochs=args.epochs, limit=args.limit, device="cpu", progress=False,
                                adversarial=train_attack) for s in args.seeds]
        infos = [m.train_info for m in models]
        print(f"\neps {eps:g}: trained/loaded {len(models)} models in {time.time() - t0:.0f} s; test accuracy "
              f"{fmt([i['test_accuracy'] for i in infos])}"
              + (f", robust (training attack) {fmt([i['robust_test_accuracy'] for i in infos])}" if eps > 0 else ""),
              flush=True)
        for i, j in itertools.combinations(range(len(models)), 2):
            t1 = time.time()
            results = robust_pair_paths(models[i], models[j], loaders["train"], test, train_attack, eval_attack,
                                        args.curve_epochs, args.points)
            for kind, paths in results.items():
                for r in paths:
                    path = "curve" if hasattr(r, "kind") else "line"
                    row = rows.setdefault((eps, path, r.method), {})
                    row.setdefault(f"{kind} loss", []).append(r.barrier("loss"))
                    row.setdefault(f"{kind} acc", []).append(r.barrier("accuracy"))
                    row.setdefault(f"{kind} min acc", []).append(float(np.min(r.accuracy)))
                    row.setdefault(f"{kind} end acc", []).append(float(np.mean(r.ends("accuracy"))))
            print(f"  pair ({args.seeds[i]}, {args.seeds[j]}) in {time.time() - t1:.0f} s", flush=True)
    print("\nBarriers (mean ± sd over pairs): loss barrier and accuracy barrier (a fraction), clean and under PGD; "
          "lowest PGD accuracy along the path; mean PGD accuracy of the two ends.")
    head = ["train eps", "attack eps", "path", "align", "clean loss barrier", "clean acc barrier",
            "PGD loss barrier", "PGD acc barrier", "PGD acc min", "PGD acc ends"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (eps, path, method), row in rows.items():
        attack_eps = eps if eps > 0 else smallest
        cells = [f"{eps:g}", f"{attack_eps:g}", path, "permute" if method == "permute" else "none",
                 fmt(row["clean loss"]), fmt(row["clean acc"]), fmt(row["PGD loss"]), fmt(row["PGD acc"]),
                 fmt(row["PGD min acc"]), fmt(row["PGD end acc"])]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
