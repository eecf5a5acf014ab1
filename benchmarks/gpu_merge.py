"""Merging torchvision models on one device, against a plain forward pass (issue 25's device check).

For each configuration: N randomly initialised torchvision models (BatchNorm statistics set on the data
first, as a trained model would have them) and random images made on the device. Measured in one process:
1. ``forward``: one plain no-grad pass of every model over all the images (after a warm-up batch), and the
   peak memory of one batch's forward above what the models and images already hold;
2. ``statistics``: the merge's activation statistics alone (``merge_statistics``, the CCA merge's graph),
   and their precision on the first two batches: the largest difference of every space's correlations
   from float64 sums of the same activations (target 1e-4), and, for scale, from a float64 run of the same
   models (whose forward passes round differently: vgg11_bn's 4096-wide classifier 3e-4 on a CPU);
3. each method through ``cc.merge(..., progress=False)``: seconds, phases (``merge_info["seconds"]``) and
   peak memory above the same baseline.
Time and memory are printed as multiples of the forward's, with each target of issue 25 as met or missed
(naming the slowest phase). Peak memory is CUDA's allocator peak on a GPU and resident memory sampled
every 10 ms on a CPU. The float64 sums a merge keeps (they do not depend on the batch size) are allowed on
top of twice the forward's peak.

    python benchmarks/gpu_merge.py                     # on a GPU: the full table, a few minutes on an H200
    python benchmarks/gpu_merge.py --small --device cpu  # ResNet20s on 16x16 images: what the test suite runs
    python benchmarks/gpu_merge.py --cpu-sizes --device cpu --threads 2  # no GPU: the CPU targets' sizes, ~6 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torchvision_merge import _rss_gb, _RssSampler  # noqa: E402  (resident memory, sampled in a thread)


@dataclass
class Config:
    """N ``model`` networks merged on ``images`` random ``size`` x ``size`` images in batches of ``batch``."""

    model: str
    n: int
    size: int
    images: int
    batch: int
    methods: list[str]
    #: the most a default-ridge CCA merge may cost, in forward passes (issue 25)
    cca_default_target: float = 6.0
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.model} x{self.n}"


FULL = [
    Config("resnet50", 2, 224, 4096, 128, ["permute", "cca@1", "cca", "zipit"]),
    Config("vgg11_bn", 2, 224, 2048, 128, ["permute", "cca@1", "cca"], cca_default_target=10.0),
    Config("resnet18", 4, 224, 2048, 128, ["permute", "cca@1", "cca_multiview@1"]),
]
#: the test suite's sizes: the package's ResNet20 (16-64 channels), so that a CPU runs every phase in seconds
SMALL = [
    Config("resnet20", 2, 16, 128, 32, ["permute", "cca@1", "cca"]),
    Config("resnet20", 3, 16, 64, 32, ["cca_multiview@1"]),
]
#: where no GPU is lent: issue 25's CPU sizes (torchvision_merge.py's images), for the ratios on 2 cores
CPU = [
    Config("resnet50", 2, 64, 512, 64, ["permute", "cca@1", "cca", "zipit"]),
    Config("vgg11_bn", 2, 32, 512, 64, ["permute", "cca@1", "cca"], cca_default_target=10.0),
    Config("resnet18", 4, 64, 512, 64, ["permute", "cca@1", "cca_multiview@1"]),
]
#: targets in forward passes: statistics, permute, CCA at a fixed ridge; memory in forward peaks
TARGETS = {"statistics": 2.0, "permute": 3.0, "cca@": 4.0, "memory": 2.0, "precision": 1e-4}
#: a forward's peak below this (resident memory on a CPU barely moves) leaves the memory ratio unjudged
MEASURABLE_GB = 0.01


class Meter:
    """Seconds and peak memory (GB above the baseline when it was made) of the code run inside ``measure``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.base = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device) / 2**30
        return _rss_gb()

    def measure(self, work) -> tuple[float, float, object]:
        """``(seconds, peak GB above the baseline, work's result)``."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = time.perf_counter()
            result = work()
            torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            with _RssSampler() as sampler:
                start = time.perf_counter()
                result = work()
                seconds = time.perf_counter() - start
            peak = max((gb for _, gb in sampler.samples), default=_rss_gb())
        return seconds, max(peak - self.base, 0.0), result


def make_models(config: Config, data: list[torch.Tensor], device: torch.device) -> list[torch.nn.Module]:
    """``config.n`` random torchvision models on ``device`` with BatchNorm statistics of ``data``'s first batches."""
    from torchvision import models

    from ccatoolkit.merging.normalization import reset_bn_stats

    from ccatoolkit.zoo.models import ResNet20

    out = []
    for seed in range(config.n):
        torch.manual_seed(seed)
        if config.model == "resnet20":
            model = ResNet20(in_shape=(3, config.size, config.size)).to(device)
        else:
            model = getattr(models, config.model)(num_classes=10).to(device)
        out.append(reset_bn_stats(model, data[:2], progress=False, inplace=True).eval())
    return out


@torch.no_grad()
def forward_all(models: list[torch.nn.Module], data: list[torch.Tensor]) -> None:
    for x in data:
        for model in models:
            model(x)


def statistics_precision(models: list[torch.nn.Module], data: list[torch.Tensor]) -> tuple[float, float]:
    """How far the merge statistics' correlations are (largest difference over every space, first two batches)
    from float64 sums of the same float32 activations (what the statistics compute: the target), and from a
    float64 run of the same models (float32 forward passes round too, so this one is larger)."""
    import copy
    from unittest import mock

    from ccatoolkit.analysis.stats import SpaceSums
    from ccatoolkit.merging.methods import get_method
    from ccatoolkit.merging.prepare import prepare
    from ccatoolkit.merging.statistics import merge_statistics

    prepared = prepare(get_method("cca"), models, data[:2])
    low = merge_statistics(prepared.models, prepared.graph, data[:2], None, False)
    setup = SpaceSums.setup

    def float64_sums(self: SpaceSums, sizes: list[int], first: list[torch.Tensor], device: torch.device) -> None:
        setup(self, sizes, [t.double() for t in first], device)  # float64 outputs: every sum in float64

    with mock.patch.object(SpaceSums, "setup", float64_sums):
        exact = merge_statistics(prepared.models, prepared.graph, data[:2], None, False)
    doubles = [copy.deepcopy(m).double() for m in prepared.models]
    high = merge_statistics(doubles, prepared.graph, [x.double() for x in data[:2]], None, False)

    def worst(reference: dict) -> float:
        return max(float((stats.corr(i, j) - reference[name].corr(i, j)).abs().max())
                   for name, stats in low.items() for i in range(stats.num_models) for j in range(i, stats.num_models))

    return worst(exact), worst(high)


def run_config(config: Config, device: torch.device, out: list[dict]) -> None:
    import ccatoolkit as cc
    from ccatoolkit.merging.methods import get_method
    from ccatoolkit.merging.prepare import prepare
    from ccatoolkit.merging.statistics import merge_statistics

    gen = torch.Generator(device=device).manual_seed(0)
    data = [torch.randn(config.batch, 3, config.size, config.size, generator=gen, device=device)
            for _ in range(config.images // config.batch)]
    models = make_models(config, data, device)
    forward_all(models, data[:1])  # warm-up: kernels chosen, allocator filled
    meter = Meter(device)
    one_batch = meter.measure(lambda: forward_all(models, data[:1]))[1]
    forward_s = meter.measure(lambda: forward_all(models, data))[0]
    row = {"config": config.name, "images": config.images, "batch": config.batch, "forward_s": forward_s,
           "forward_peak_gb": one_batch, "methods": {}}
    prepared = prepare(get_method("cca"), models, data)
    stats_s, stats_peak, stats = meter.measure(lambda: merge_statistics(prepared.models, prepared.graph, data,
                                                                        None, False))
    sums_gb = sum(s.nbytes() for s in stats.values()) / 2**30
    stats = prepared = None  # freed before the merges (the lambda above has run)
    precision, forward_rounding = statistics_precision(models, data)
    row.update(statistics_s=stats_s, statistics_peak_gb=stats_peak, sums_gb=sums_gb, precision=precision,
               precision_float64_forward=forward_rounding)
    _print_head(row)
    _print_line("statistics", stats_s, forward_s, TARGETS["statistics"], stats_peak, row, {},
                extra=f"correlations within {precision:.1e} of float64 sums "
                      f"({'met' if precision <= TARGETS['precision'] else 'MISSED'}; {forward_rounding:.1e} "
                      "of a float64 forward)")
    for method in config.methods:
        name, _, ridge = method.partition("@")
        options = {"ridge": float(ridge)} if ridge else {}
        seconds, peak, merged = meter.measure(lambda: cc.merge(models, name, data, progress=False, **options))
        phases = {k: round(v, 3) for k, v in merged.merge_info["seconds"].items()}
        del merged
        target = (TARGETS["permute"] if method == "permute" else TARGETS["cca@"] if ridge
                  else config.cca_default_target if name == "cca" else None)
        row["methods"][method] = {"seconds": seconds, "peak_gb": peak, "phases": phases}
        _print_line(method, seconds, forward_s, target, peak, row, phases)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out.append(row)


def _print_head(row: dict) -> None:
    print(f"\n{row['config']}: {row['images']} images in batches of {row['batch']}; plain forward "
          f"{row['forward_s']:.2f} s, one batch's forward peaks {row['forward_peak_gb']:.2f} GB; float64 sums "
          f"{row['sums_gb']:.2f} GB", flush=True)
    print(f"  {'what':18s} {'seconds':>8s} {'x forward':>10s} {'peak GB':>8s} {'x fwd peak':>10s}  targets",
          flush=True)


def _print_line(what: str, seconds: float, forward_s: float, target: float | None, peak: float, row: dict,
                phases: dict, extra: str = "") -> None:
    ratio = seconds / max(forward_s, 1e-9)
    peak_ratio = peak / max(row["forward_peak_gb"], 1e-9)
    verdicts = []
    if target is not None:
        if ratio <= target:
            verdicts.append(f"time <= {target:g}x met")
        else:
            slow = max(phases, key=phases.get) if phases else what
            verdicts.append(f"time <= {target:g}x MISSED ({slow} {phases.get(slow, seconds):.1f} s)")
    memory_bound = TARGETS["memory"] * row["forward_peak_gb"] + row["sums_gb"]
    if row["forward_peak_gb"] >= MEASURABLE_GB:
        verdicts.append(f"memory <= 2x + sums {'met' if peak <= memory_bound else 'MISSED'}")
    else:  # resident memory does not move for a tiny forward: no ratio to judge
        verdicts.append("memory: forward too small to measure")
    if extra:
        verdicts.append(extra)
    peak_text = f"{peak_ratio:10.1f}" if row["forward_peak_gb"] >= MEASURABLE_GB else f"{'-':>10s}"
    print(f"  {what:18s} {seconds:8.2f} {ratio:10.1f} {peak:8.2f} {peak_text}  " + "; ".join(verdicts),
          flush=True)
    if phases:
        print(f"  {'':18s} phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()), flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny sizes (CPU, the test suite)")
    p.add_argument("--cpu-sizes", action="store_true",
                   help="the CPU targets' sizes (64x64 and 32x32 images, 512 of them): ratios where no GPU is lent")
    p.add_argument("--only", nargs="+", default=None, help="configurations by model name, e.g. resnet50")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the figures to this file as well")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # random weights on few images: the merge's rank-deficiency warnings are expected and would bury the table
    warnings.filterwarnings("ignore", message="statistics of .* are rank-deficient", category=RuntimeWarning)
    preset = SMALL if args.small else CPU if args.cpu_sizes else FULL
    configs = [c for c in preset if not args.only or c.model in args.only]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    for config in configs:
        run_config(config, device, rows)
        if args.json:  # written as it goes: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
