"""Time and peak memory of merging two torchvision CNNs with no hand-written graph (issue 11).

Each (model, method) runs in its own subprocess, so the peak resident memory (``ru_maxrss``) is
that merge's alone: two randomly initialised copies (BatchNorm statistics set on the data first,
as a trained model would have them) merged with ``cc.merge(..., progress=False)`` at the
defaults, on random images. Time covers the whole call: graph, statistics, alignment, BatchNorm
and REPAIR passes. Speed does not depend on training, so random weights measure it fairly.

Targets (2 CPU cores): resnet50 at 64x64 and vgg11_bn at 32x32, 512 images, ``permute`` and
``cca`` each under 60 s with peak memory under 3 GB. "before merge" is the process's resident memory
when ``merge`` is called (Python, torch, the two models and the data): the merge's own cost is
the difference. Where a target is missed the line says why: the phase of the merge
(``merge_info["seconds"]``: graph, ridge selection, statistics, alignment, averaging and REPAIR) that
took the most time, and the phase in which memory peaked (resident memory sampled every 10 ms).

    .venv/bin/python benchmarks/torchvision_merge.py
    .venv/bin/python benchmarks/torchvision_merge.py --models resnet18 --methods cca --images 128
    .venv/bin/python benchmarks/torchvision_merge.py --methods cca --ridge 1   # CCA without the ridge selection
    .venv/bin/python benchmarks/torchvision_merge.py --device cuda      # on a GPU: peak CUDA memory too
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
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


class _RssSampler:
    """Resident memory sampled every ``period`` seconds in a thread: ``(time, GB)`` pairs."""

    def __init__(self, period: float = 0.01) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), _rss_gb()))
            self._stop.wait(period)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_by_phase(self, start: float, phases: dict[str, float]) -> dict[str, float]:
        """The highest sample within each phase (phases in the order they ran, each ``seconds`` long)."""
        out, t = {}, start
        for phase, seconds in phases.items():
            inside = [gb for when, gb in self.samples if t <= when <= t + seconds]
            out[phase] = max(inside, default=0.0)
            t += seconds
        return out


def _reason(res: dict) -> str:
    """Why a target was missed: the slowest phase, and the phase where memory peaked."""
    why = []
    phases = res.get("phases", {})
    if res["seconds"] >= TARGET_SECONDS and phases:
        slow = max(phases, key=phases.get)
        why.append(f"time: {slow} took {phases[slow]:.0f} of {res['seconds']:.0f} s"
                   + ("; a fixed ridge (--ridge 1) skips it" if slow == "ridge_selection" else ""))
    if res["peak_rss_gb"] >= TARGET_GB and res.get("peak_by_phase"):
        peaks = res["peak_by_phase"]
        high = max(peaks, key=peaks.get)
        why.append(f"memory: peak in {high}")
    return "; ".join(why)


def one(name: str, method: str, images: int, batch: int, device: str, threads: int,
        ridge: str = "auto") -> dict[str, float]:
    """Merge two random ``name`` models with ``method`` (CCA methods at ``ridge``: "auto" or a number);
    return seconds and peak memory (GB)."""
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
    with _RssSampler() as sampler:
        t0 = time.perf_counter()
        options = {} if ridge == "auto" or not method.startswith("cca") else {"ridge": float(ridge)}
        merged = cc.merge(pair, method, data, progress=False, **options)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    phases = {k: round(v, 2) for k, v in merged.merge_info["seconds"].items()}
    out = {"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "rss_before_gb": before, "ridge": merged.merge_info.get("ridge"), "phases": phases,
           "peak_by_phase": {k: round(v, 2) for k, v in sampler.peak_by_phase(t0, phases).items()}}
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
    p.add_argument("--ridge", default="auto", help="CCA's ridge: 'auto' (the default selection) or a number")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(*args.child, args.images, args.batch, args.device, args.threads, args.ridge)))
        return
    rows = []
    print(f"{'model':16s} {'method':8s} {'seconds':>8s} {'peak RSS GB':>12s} {'before merge':>13s}  "
          f"target (<{TARGET_SECONDS:.0f} s, <{TARGET_GB:.0f} GB peak)", flush=True)
    for name in args.models:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--child", name, method, "--images", str(args.images),
                   "--batch", str(args.batch), "--device", args.device, "--threads", str(args.threads), "--ridge", args.ridge]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{name:16s} {method:8s} FAILED: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                rows.append({"model": name, "method": method, "error": done.stderr[-2000:]})
                continue
            res = json.loads(done.stdout.strip().splitlines()[-1])
            ok = res["seconds"] < TARGET_SECONDS and res["peak_rss_gb"] < TARGET_GB
            label = method if args.ridge == "auto" or not method.startswith("cca") else f"{method}@{args.ridge}"
            extra = f"  cuda peak {res['peak_cuda_gb']:.2f} GB" if "peak_cuda_gb" in res else ""
            print(f"{name:16s} {label:8s} {res['seconds']:8.1f} {res['peak_rss_gb']:12.2f} {res['rss_before_gb']:13.2f}  "
                  f"{'met' if ok else 'MISSED (' + _reason(res) + ')'}{extra}", flush=True)
            print(f"{'':16s} phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["phases"].items())
                  + " | peak GB by phase: " + ", ".join(f"{k} {v:.2f}" for k, v in res["peak_by_phase"].items()),
                  flush=True)
            rows.append({"model": name, "method": method, **res})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": args.images, "device": args.device, "threads": args.threads, "ridge": args.ridge,
                       "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
