"""Does a merge's peak memory stay flat in the batch size? (issue 25: statistics in micro-batches)

For each batch size, in a fresh process each: two randomly initialised torchvision models (random
BatchNorm statistics, so that no forward pass has run before the measurement), one batch of random
images, and
1. a plain no-grad forward of both models on the batch,
2. ``cc.merge([a, b], method, [batch])`` at the defaults, with the statistics in micro-batches (now),
3. the same merge with whole batches (before: every capture point of every model held for the batch).
Reported: the peak resident memory above the process's memory before the call (Python, torch, the models
and the data), in GB, sampled every 10 ms, and the merge's peak as a multiple of the forward's. Target:
at most 2x the forward's peak (plus the float64 sums, which do not depend on the batch).

    .venv/bin/python benchmarks/merge_memory.py                          # resnet50, 224 x 224, batch 8 16 32
    .venv/bin/python benchmarks/merge_memory.py --model resnet18 --size 64 --batches 8 16   # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torchvision_merge import _rss_gb, _RssSampler  # noqa: E402  (resident memory, sampled in a thread)


def child(model_name: str, size: int, batch: int, method: str, mode: str) -> dict[str, float]:
    """One measurement in this process: ``mode`` is forward, merge (micro-batches) or whole (whole batches)."""
    import torch
    import torchvision

    import ccatoolkit as cc
    import ccatoolkit.analysis.stats as stats

    torch.set_num_threads(2)
    torch.manual_seed(0)
    images = [torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))]
    models = [getattr(torchvision.models, model_name)(weights=None).eval() for _ in range(2)]
    with torch.no_grad():  # running statistics set without a forward pass: the allocator starts cold
        for model in models:
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
    if mode == "whole":
        stats.MIN_MICRO_BATCH_BYTES = {"cpu": 1 << 62, "other": 1 << 62}  # nothing exceeds it: whole batches
    before = _rss_gb()
    start = time.perf_counter()
    with _RssSampler() as sampler:
        if mode == "forward":
            with torch.no_grad():
                for model in models:
                    model(images[0])
        else:
            cc.merge(models, method, images, progress=False)
    peak = max(gb for _, gb in sampler.samples) if sampler.samples else _rss_gb()
    return {"peak_gb": peak - before, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--method", default="permute")
    parser.add_argument("--child", nargs=2, metavar=("BATCH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.size, int(args.child[0]), args.method, args.child[1])))
        return
    print(f"{args.model} at {args.size}x{args.size}, method {args.method}, 2 threads; peak resident memory above "
          "the process's before the call (GB)")
    print("| batch | plain forward (both models) | merge, micro-batches | ratio | merge, whole batches (before) "
          "| ratio | seconds: forward / merge / before |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        got = {}
        for mode in ("forward", "merge", "whole"):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--size", str(args.size),
                                  "--method", args.method, "--child", str(batch), mode],
                                 capture_output=True, text=True, check=True)
            got[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        fwd = max(got["forward"]["peak_gb"], 1e-3)
        print(f"| {batch} | {got['forward']['peak_gb']:.2f} | {got['merge']['peak_gb']:.2f} | "
              f"{got['merge']['peak_gb'] / fwd:.1f}x | {got['whole']['peak_gb']:.2f} | {got['whole']['peak_gb'] / fwd:.1f}x | "
              f"{got['forward']['seconds']:.1f} / {got['merge']['seconds']:.1f} / {got['whole']['seconds']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
