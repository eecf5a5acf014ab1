"""Time and peak memory of merging two torchvision CNNs with no hand-written graph (issue 11).

Each (model, method) runs in its own subprocess, so the peak resident memory (``ru_maxrss``) is
that merge's alone: two randomly initialised copies (BatchNorm statistics set on the data first,
as a trained model would have them) merged with ``cc.merge(..., progress=False)`` at the
defaults, on random images. Time covers the whole call: graph, statistics, alignment, BatchNorm
and REPAIR passes. Speed does not depend on training, so random weights measure it fairly.

Targets (2 CPU cores): resnet50 at 64x64 and vgg11_bn at 32x32, 512 images, ``permute`` and
``cca`` each under 60 s with peak memory under 3 GB. "before merge" is the process's resident memory
when ``merge`` is called (Python, torch, the two models and the data): the merge's own cost is
the difference.

    .venv/bin/python benchmarks/torchvision_merge.py
    .venv/bin/python benchmarks/torchvision_merge.py --models resnet18 --methods cca --images 128
    .venv/bin/python benchmarks/torchvision_merge.py --device cuda      # on a GPU: peak CUDA memory too
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SIZES = {"resnet18": 64, "resnet50": 64, "vgg11_bn": 32, "mobilenet_v2": 64, "densenet121": 64,
         "regnet_x_400mf": 64}
TARGET_SECONDS, TARGET_GB = 60.0, 3.0


def _rss_gb() -> float:
    """Resident memory now (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**30
    except OSError:
        return 0.0


def one(name: str, method: str, images: int, batch: int, device: str, threads: int) -> dict[str, float]:
    """Merge two random ``name`` models with ``method``; return seconds and peak memory (GB)."""
    import torch
    from torchvision import models

    import ccatoolkit as cc
    from ccatoolkit.merging.normalization import reset_bn_stats

    torch.set_num_threads(threads)
    size = SIZES.get(name, 64)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(images // batch)]
    pair = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = getattr(models, name)(num_classes=10).to(device)
        pair.append(reset_bn_stats(model, data[:2], progress=False, inplace=True).eval())
    del model  # (the loop variable would keep a third model alive through the merge)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _rss_gb()
    t0 = time.perf_counter()
    merged = cc.merge(pair, method, data, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "rss_before_gb": before, "ridge": merged.merge_info.get("ridge")}
    if device.startswith("cuda"):
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "vgg11_bn"], choices=sorted(SIZES))
    p.add_argument("--methods", nargs="+", default=["permute", "cca"])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(*args.child, args.images, args.batch, args.device, args.threads)))
        return
    rows = []
    print(f"{'model':16s} {'method':8s} {'seconds':>8s} {'peak RSS GB':>12s} {'before merge':>13s}  "
          f"target (<{TARGET_SECONDS:.0f} s, <{TARGET_GB:.0f} GB peak)", flush=True)
    for name in args.models:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--child", name, method, "--images", str(args.images),
                   "--batch", str(args.batch), "--device", args.device, "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{name:16s} {method:8s} FAILED: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                rows.append({"model": name, "method": method, "error": done.stderr[-2000:]})
                continue
            res = json.loads(done.stdout.strip().splitlines()[-1])
            ok = res["seconds"] < TARGET_SECONDS and res["peak_rss_gb"] < TARGET_GB
            extra = f"  cuda peak {res['peak_cuda_gb']:.2f} GB" if "peak_cuda_gb" in res else ""
            print(f"{name:16s} {method:8s} {res['seconds']:8.1f} {res['peak_rss_gb']:12.2f} {res['rss_before_gb']:13.2f}  "
                  f"{'met' if ok else 'MISSED'}{extra}", flush=True)
            rows.append({"model": name, "method": method, **res})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": args.images, "device": args.device, "threads": args.threads, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
