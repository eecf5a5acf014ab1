"""Test accuracy of merged models on Fashion-MNIST: every method, 2-4 models, full and skewed splits, with spread.

Trains (once, cached by ``ccatoolkit.zoo.trained_model``) a zoo per family, merges N of its models
with every method at the package's defaults and without REPAIR, and prints mean +/- sd tables:

* ``full`` split (models differ by seed): ``--subsets`` disjoint-as-possible subsets of the seed
  models for each N (seeds 0..5 give three pairs, two triples and a third one, three quadruples);
* ``skewed`` split (each model sees 80% of its data from its own classes; the split depends on
  N): the spread is over the choice of the reference model (each model in turn).

Numbers are test accuracy in %, on all 10,000 test images; the merge data (statistics,
BatchNorm statistics, REPAIR, the label-free ridge choice) is ``--max-batches`` batches of the
training split, never the test set. ``--json`` writes every single number.

    .venv/bin/python benchmarks/merge_table.py --families mlp
    .venv/bin/python benchmarks/merge_table.py --families vgg11 --splits full --n 2 3 4
    .venv/bin/python benchmarks/merge_table.py --smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Any

import numpy as np
import torch

from ccatoolkit._utils import has_batchnorm
from ccatoolkit.data import get_loaders
from ccatoolkit.merging.api import METHODS, merge
from ccatoolkit.zoo.trained import trained_model
from ccatoolkit.zoo.training import evaluate

# Zoos sized for 2 CPU cores (about 90 s per VGG11 and 100 s per ResNet20 on one thread).
ZOOS: dict[str, dict[str, Any]] = {
    "mlp": dict(model_kwargs={"depth": 3, "width": 512}, epochs=5, limit=None, batch_size=256),
    "vgg11": dict(model_kwargs={"width": 0.25}, epochs=1, limit=None, batch_size=256),
    "resnet20": dict(model_kwargs={"width": 1}, epochs=1, limit=15000, batch_size=32),
}
MERGE_METHODS = [m for m in METHODS if m != "ensemble"]
FULL_SEEDS = 6


def _acc(model: torch.nn.Module, loader: Any) -> float:
    return 100.0 * float(evaluate(model, loader)["accuracy"])


def zoo(family: str, split: str, n: int, smoke: bool) -> list[torch.nn.Module]:
    """The models of one experiment: seeds 0..5 on the full split, or the N models of an N-way skewed split."""
    spec = dict(ZOOS[family])
    if smoke:
        spec.update(epochs=1, limit=2000)
    common = dict(model=family, dataset="fashion_mnist", progress=False, **spec)
    if split == "full":
        return [trained_model(split="full", seed=s, **common) for s in range(min(FULL_SEEDS, 2 if smoke else 6))]
    return [trained_model(split=split, n_models=n, model_index=i, seed=i, split_seed=0, **common) for i in range(n)]


def full_subsets(count: int, n: int, k: int) -> list[tuple[int, ...]]:
    """``k`` subsets of size ``n`` of ``range(count)``: consecutive blocks first, then the most disjoint others."""
    blocks = [tuple(range(i, i + n)) for i in range(0, count - n + 1, n)]
    rest = [c for c in itertools.combinations(range(count), n) if c not in blocks]
    chosen = blocks[:k]
    while len(chosen) < k and rest:
        best = min(rest, key=lambda c: sum(len(set(c) & set(s)) for s in chosen))
        chosen.append(best)
        rest.remove(best)
    return chosen


def _save(results: dict[str, Any], path: str | None) -> None:
    """Write every number so far (after each cell, so an interrupted run keeps its finished cells)."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for family in args.families:
        for split in args.splits:
            for n in args.n:
                t0 = time.time()
                models = zoo(family, split, n, args.smoke)
                if split == "full":
                    groups = [([models[i] for i in c], 0, f"seeds {c}") for c in full_subsets(len(models), n, args.subsets)
                              if len(c) == n]
                else:
                    groups = [(models, r, f"reference {r}") for r in range(n)]
                limit = 2000 if args.smoke else None
                loaders = get_loaders("fashion_mnist", batch_size=256, split="full", limit=limit)
                train, test = loaders["train"], loaders["test"]
                cell: dict[str, list[float]] = {}
                for group, ref, label in groups:
                    cell.setdefault("endpoints", []).append(float(np.mean([_acc(m, test) for m in group])))
                    cell.setdefault("ensemble", []).append(_acc(merge(group, "ensemble"), test))
                    for method in args.methods:
                        variants = [("default", {})]
                        if method != "average":
                            variants.append(("no REPAIR", {"repair": False}))
                        for name, extra in variants:
                            merged = merge(group, method, train, reference=ref, max_batches=args.max_batches,
                                           progress=False, **extra)
                            cell.setdefault(f"{method} ({name})", []).append(_acc(merged, test))
                            if method == "cca" and name == "default":
                                cell.setdefault("cca ridge", []).append(merged.merge_info["ridge"])
                key = f"{family}/{split}/N={n}"
                results[key] = dict(cell=cell, groups=[g[2] for g in groups], seconds=time.time() - t0,
                                    batchnorm=has_batchnorm(models[0]), zoo=ZOOS[family])
                print(f"{key}: {len(groups)} groups in {time.time() - t0:.0f}s", flush=True)
                print(format_cell(cell), flush=True)
                _save(results, args.json)
    return results


def _ms(values: list[float]) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def format_cell(cell: dict[str, list[float]]) -> str:
    return "\n".join(f"  {name:28s} {_ms(v)}" for name, v in cell.items())


def table(results: dict[str, Any], methods: list[str]) -> str:
    """A markdown table: one row per (family, split, N), one column per method (default / no REPAIR)."""
    head = ["experiment", "groups", "endpoints", "ensemble"] + methods
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, res in results.items():
        cell = res["cell"]
        cols = [key, str(len(res["groups"])), _ms(cell["endpoints"]), _ms(cell["ensemble"])]
        for m in methods:
            parts = [_ms(cell[f"{m} (default)"])]
            if f"{m} (no REPAIR)" in cell:
                parts.append(_ms(cell[f"{m} (no REPAIR)"]))
            cols.append(" / ".join(parts))
        rows.append("| " + " | ".join(cols) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["mlp"], choices=sorted(ZOOS))
    p.add_argument("--splits", nargs="+", default=["full", "skewed"], choices=["full", "skewed"])
    p.add_argument("--n", nargs="+", type=int, default=[2, 3, 4], help="numbers of models merged")
    p.add_argument("--methods", nargs="+", default=MERGE_METHODS, choices=MERGE_METHODS)
    p.add_argument("--subsets", type=int, default=3, help="subsets of the seed models per N (full split)")
    p.add_argument("--max-batches", type=int, default=20, help="batches of 256 for statistics, BatchNorm, REPAIR")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write every number to this file")
    p.add_argument("--smoke", action="store_true", help="tiny run: 2 models, 1 epoch, 2000 samples")
    args = p.parse_args()
    if args.smoke:
        args.n, args.max_batches, args.subsets, args.splits = [2], 4, 1, args.splits[:1]
    torch.set_num_threads(args.threads)
    t0 = time.time()
    results = run(args)
    print("\nFashion-MNIST test accuracy (%), mean ± sd over the groups; cell = default / without REPAIR")
    print(table(results, args.methods))
    print(f"\n({time.time() - t0:.0f}s, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
