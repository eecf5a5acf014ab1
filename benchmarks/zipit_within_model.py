"""Why does ZipIt! lead on ResNet20? How much of it merges features within one model (issue 10).

For ResNet20 pairs of ``merge_table.py``'s zoo (full split: three disjoint seed pairs; skewed split:
each model in turn as the reference), merges each pair with ZipIt! as it is, ZipIt! without
within-model merges (``allow_within_model=False``), activation matching and CCA Merge (defaults
otherwise), and reports, per activation space, the share of ZipIt!'s groups that join two features
of the same model. Test accuracy in %, mean ± sd, on all 10,000 test images.

    .venv/bin/python benchmarks/zipit_within_model.py                 # about 20 min on 2 CPU cores
    .venv/bin/python benchmarks/zipit_within_model.py --splits full --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ccatoolkit.analysis.stats import collect_statistics
from ccatoolkit.data import get_loaders
from ccatoolkit.merging.align.zipit import zipit_groups
from ccatoolkit.merging.api import merge
from ccatoolkit.merging.graph import merge_graph
from merge_table import _acc, full_subsets, zoo

VARIANTS = [
    ("zipit", "zipit", {}),
    ("zipit, no within-model merges", "zipit", {"allow_within_model": False}),
    ("permute", "permute", {}),
    ("cca", "cca", {}),
]


def within_model_share(models: list[torch.nn.Module], data: list, max_batches: int) -> dict[str, float]:
    """Per space: the fraction of ZipIt!'s groups (two models) whose two features come from one model."""
    graph = merge_graph(models[0])
    stats = collect_statistics(models, data, {s.name: list(s.capture) for s in graph.spaces},
                               max_batches=max_batches, progress=False, warn=False)
    shares = {}
    for space in graph.spaces:
        st = stats[space.name]
        corr = np.block([[st.corr(i, j).numpy() for j in range(2)] for i in range(2)])
        size = st.sizes[0]
        groups = zipit_groups(corr, 2)
        shares[space.name] = sum(len(g) == 2 and (g[0] < size) == (g[1] < size) for g in groups) / size
    return shares


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", nargs="+", default=["full", "skewed"], choices=["full", "skewed"])
    p.add_argument("--max-batches", type=int, default=8, help="batches of 256 for statistics, BatchNorm, REPAIR")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaders = get_loaders("fashion_mnist", batch_size=256, split="full")
    train, test = loaders["train"], loaders["test"]
    merge_data = list(iter(train))[: args.max_batches]  # the same batches for the share as for the merges' statistics
    results = {}
    for split in args.splits:
        t0 = time.time()
        models = zoo("resnet20", split, 2, False)
        groups = ([([models[i] for i in c], 0) for c in full_subsets(len(models), 2, 3)] if split == "full"
                  else [(models, r) for r in range(2)])
        cell: dict[str, list] = {}
        for group, ref in groups:
            cell.setdefault("endpoints", []).append(float(np.mean([_acc(m, test) for m in group])))
            for name, method, options in VARIANTS:
                merged = merge(group, method, train, reference=ref, max_batches=args.max_batches, progress=False,
                               **options)
                cell.setdefault(name, []).append(_acc(merged, test))
            shares = within_model_share(group, merge_data, args.max_batches)
            cell.setdefault("within-model share (mean over spaces)", []).append(float(np.mean(list(shares.values()))))
            cell.setdefault("within-model share (lowest space)", []).append(min(shares.values()))
            cell.setdefault("within-model share (highest space)", []).append(max(shares.values()))
        results[split] = cell
        print(f"resnet20, {split} split, {len(groups)} pairs, {time.time() - t0:.0f} s")
        for name, values in cell.items():
            print(f"  {name:40s} {np.mean(values):6.3f} ± {np.std(values):.3f}" if "share" in name
                  else f"  {name:40s} {np.mean(values):5.1f} ± {np.std(values):.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
