"""What do streaming activation statistics cost? (not a timed test; run by hand)

For each model (ResNet20 width 1 and 2, the MLP 3x512), two randomly initialised copies run over the
same batches two ways, on the same device and in one run:

* plain: both models' forward passes (eval mode, no grad), the unit of cost;
* stats: ``collect_statistics`` of both models on every activation space: for ResNet20 the residual
  stream of each stage (stem/block outputs pooled) and every block's inner ReLU; for the MLP every ReLU.

and prints time(stats) / time(plain) against issue 25's targets: at most 2.2 on 2 CPU cores (measured on the
MLP with ``--batches 16 --batch-size 512``) and 2.0 on a GPU. Each time is the best of ``--repeats``
interleaved runs, and the median of the ratios of back-to-back runs is shown too (CPU timings on a shared
machine are noisy; compare ratios; on CPU the ratio of process CPU times is printed as well, which other
processes disturb less). Inputs are random 28x28 images (speed does not depend on the data or on training).

The floor: exact joint statistics must compute the upper triangle of each space's joint Gram matrix on
every batch. ``products`` times those products alone (the collector's own row chunks, on random data of
the same shapes) in the same run, so a line says how much of the ratio is the forward passes plus that
arithmetic and how much is everything else (the shifted copies, the float64 sums, the checks).

It also checks the memory claim: the float64 sums held by the collector have the same size after
one batch as after all batches (only one batch's float32 buffers are held besides).

    python benchmarks/capture_overhead.py                         # all three models, 8 batches of 128
    python benchmarks/capture_overhead.py --models resnet20x1 --batches 4 --threads 2 --naive
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ccatoolkit.analysis.stats import SpaceSums, StatisticsCollector, collect_statistics
from ccatoolkit.zoo.models import MLP, ResNet20


def resnet20_spaces(model: ResNet20) -> dict[str, list[str]]:
    """Residual stream of each stage (pooled capture points) plus each block's inner ReLU."""
    spaces: dict[str, list[str]] = {"stage1": ["stem.relu"], "stage2": [], "stage3": []}
    for s in (1, 2, 3):
        for b in range(len(getattr(model, f"layer{s}"))):
            spaces[f"stage{s}"].append(f"layer{s}.{b}.relu2")
            spaces[f"layer{s}.{b}.relu1"] = [f"layer{s}.{b}.relu1"]
    return spaces


def mlp_spaces(model: MLP) -> dict[str, list[str]]:
    return {name: [name] for name, m in model.named_modules() if isinstance(m, nn.ReLU)}


#: issue 25's targets for time(stats) / time(plain), by device type
TARGETS = {"cpu": 2.2, "gpu": 2.0}

BUILDERS: dict[str, Callable[[], tuple[nn.Module, nn.Module, dict[str, list[str]]]]] = {}


def _pair(build: Callable[[], nn.Module], spaces: Callable[[nn.Module], dict[str, list[str]]]):
    def make() -> tuple[nn.Module, nn.Module, dict[str, list[str]]]:
        a, b = build(), build()
        return a, b, spaces(a)

    return make


BUILDERS["resnet20x1"] = _pair(lambda: ResNet20(width=1), resnet20_spaces)
BUILDERS["resnet20x2"] = _pair(lambda: ResNet20(width=2), resnet20_spaces)
BUILDERS["mlp"] = _pair(lambda: MLP(depth=3, width=512), mlp_spaces)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain(models: list[nn.Module], batches: list[torch.Tensor], device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds of both models' forward passes over the batches."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for x in batches:
            x = x.to(device)
            for m in models:
                m(x)
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def stats(models: list[nn.Module], batches: list[torch.Tensor], spaces: dict[str, list[str]],
          device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds of collect_statistics of both models over the batches."""
    start, cpu = time.perf_counter(), time.process_time()
    collect_statistics(models, batches, spaces, progress=False, warn=False)
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def naive(models: list[nn.Module], batches: list[torch.Tensor], spaces: dict[str, list[str]],
          device: torch.device) -> tuple[float, float]:
    """The straightforward version, for comparison: capture, concatenate, float64 Gram per batch."""
    from ccatoolkit.analysis.capture import capture

    start, cpu = time.perf_counter(), time.process_time()
    layers = [name for names in spaces.values() for name in names]
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for x in batches:
            x = x.to(device)
            caches = []
            for m in models:
                with capture(m, layers) as cache:
                    m(x)
                caches.append(cache)
            for space, names in spaces.items():
                for name in names:
                    feats = [c[name].transpose(0, 1).reshape(c[name].shape[1], -1) for c in caches]
                    z = torch.cat(feats).double()
                    if space not in sums:
                        d = z.shape[0]
                        sums[space] = (torch.zeros(d, dtype=torch.float64, device=device),
                                       torch.zeros(d, d, dtype=torch.float64, device=device))
                    sums[space][0].add_(z.sum(1))
                    sums[space][1].addmm_(z, z.T)
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def products(models: list[nn.Module], batches: list[torch.Tensor], spaces: dict[str, list[str]],
             device: torch.device, repeats: int) -> float:
    """Seconds (best of ``repeats``) of the Gram products alone that the statistics of ``batches`` need (see the
    module doc)."""
    first = collect_statistics(models, batches[:1], spaces, progress=False, warn=False)
    work = []
    for name, st in first.items():
        sums = SpaceSums(name, spaces[name], len(models))
        sums.setup(list(st.sizes), [torch.randn(st.count, size, device=device) for size in st.sizes], device)
        z = torch.randn(sums.dim + 1, st.count, device=device)
        work.append((sums.chunks, z, torch.zeros(sums.dim, sums.dim + 1, device=device)))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in batches:
            for chunks, z, gram in work:
                for r0, r1 in chunks:
                    gram[r0:r1, r0:].addmm_(z[r0:r1], z[r0:].T)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def memory_check(models: list[nn.Module], batches: list[torch.Tensor], spaces: dict[str, list[str]]) -> str:
    collector = StatisticsCollector(models, spaces)
    with collector.attached():
        collector.update(batches[0])
        first = collector.nbytes()
        for x in batches[1:]:
            collector.update(x)
        last = collector.nbytes()
    same = "same" if first["sums"] == last["sums"] else "GREW"
    return (f"sums {first['sums'] / 2**20:.2f} MiB after 1 batch, {last['sums'] / 2**20:.2f} MiB after "
            f"{len(batches)} ({same}); one batch's buffers {last['batch'] / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet20x1,resnet20x2,mlp")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--naive", action="store_true", help="also time a naive hook + float64 matmul version")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    batches = [torch.randn(args.batch_size, 1, 28, 28) for _ in range(args.batches)]
    print(f"device {device} ({torch.get_num_threads()} CPU threads), {args.batches} batches of {args.batch_size}, "
          f"best of {args.repeats}")
    for name in args.models.split(","):
        a, b, spaces = BUILDERS[name]()
        models = [a.to(device).eval(), b.to(device).eval()]
        plain(models, batches[:1], device)  # warm-up
        stats(models, batches[:1], spaces, device)
        t_plain, t_stats = [], []
        for _ in range(args.repeats):
            t_plain.append(plain(models, batches, device))
            t_stats.append(stats(models, batches, spaces, device))
        p, s = min(t[0] for t in t_plain), min(t[0] for t in t_stats)
        pc, sc = min(t[1] for t in t_plain), min(t[1] for t in t_stats)
        paired = statistics.median(b[0] / a[0] for a, b in zip(t_plain, t_stats))
        cpu = f"  | CPU time: plain {pc:7.3f} s  stats {sc:7.3f} s  ratio {sc / pc:5.2f}" if device.type == "cpu" else ""
        print(f"{name:11s} wall: plain {p:7.3f} s  stats {s:7.3f} s  ratio {s / p:5.2f} "
              f"(median of paired runs {paired:5.2f}){cpu}  "
              f"({len(spaces)} spaces, {sum(map(len, spaces.values()))} capture points)")
        floor = products(models, batches, spaces, device, args.repeats)
        target = TARGETS["cpu" if device.type == "cpu" else "gpu"]
        verdict = "met" if s / p <= target else f"MISSED: all but the products and the forward take {(s - p - floor) * 1e3:.0f} ms"
        print(f"{'':11s} target <= {target:g}x: {verdict}. The forward plus the Gram products alone: "
              f"{(p + floor) / p:5.2f}x (products {floor * 1e3:.0f} ms)")
        if args.naive:
            t_naive = [naive(models, batches, spaces, device) for _ in range(args.repeats)]
            nw, nc = min(t[0] for t in t_naive), min(t[1] for t in t_naive)
            cpu = f"  | CPU time ratio {nc / pc:5.2f}" if device.type == "cpu" else ""
            print(f"{'':11s} naive hook + float64 matmul: wall {nw:7.3f} s  ratio {nw / p:5.2f}{cpu}")
        print(f"{'':11s} memory: {memory_check(models, batches[:3], spaces)}")


if __name__ == "__main__":
    main()
