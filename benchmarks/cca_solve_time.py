"""How long CCA Merge's own work takes once the statistics are in: the CCA solve and the weight transform.

    .venv/bin/python benchmarks/cca_solve_time.py --widths 1 2 4

For ResNet20 at each width: the statistics of two models are collected first (not timed), then the
per-space CCA solves (every space of the merge graph) and the weight transform of model B are
timed separately, as the median of a few repeats. The issue's target: well under a second.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from ccatoolkit.merging.align import cca_transform
from ccatoolkit._utils import default_device
from ccatoolkit.merging.graph.trace import merge_graph
from ccatoolkit.zoo.models import ResNet20
from ccatoolkit.analysis.stats import collect_statistics
from ccatoolkit.merging.transform import apply_transforms
from interpolation_speed import timings  # a sibling script: benchmarks/ is on sys.path when run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batches", type=int, default=4, help="random batches of 128 for the statistics")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    print("| ResNet20 width | spaces | largest space | CCA solves (s) | weight transform (s) | total (s) |")
    print("|---|---|---|---|---|---|")
    for width in args.widths:
        torch.manual_seed(width)
        a, b = (ResNet20(width=width).to(device).eval() for _ in range(2))
        graph = merge_graph(a)
        data = [torch.randn(128, 1, 28, 28, device=device) for _ in range(args.batches)]
        stats = collect_statistics([a, b], data, {s.name: s.capture for s in graph.spaces}, progress=False)
        covs = {
            name: tuple(st.cov(i, j).cpu().numpy() for i, j in ((0, 0), (1, 1), (0, 1)))
            for name, st in stats.items()
        }
        transforms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def solve() -> None:
            for name, (s_aa, s_bb, s_ab) in covs.items():
                out, inp = cca_transform(s_aa, s_bb, s_ab, ridge=1e-2)
                transforms[name] = (torch.from_numpy(np.asarray(out)), torch.from_numpy(np.asarray(inp)))

        t_solve = statistics.median(timings(args.repeats, solve))
        t_apply = statistics.median(timings(args.repeats, lambda: apply_transforms(b, graph, transforms)))
        largest = max(s.size for s in graph.spaces)
        print(f"| {width} | {len(graph.spaces)} | {largest} | {t_solve:.3f} | {t_apply:.3f} | {t_solve + t_apply:.3f} |")


if __name__ == "__main__":
    main()
