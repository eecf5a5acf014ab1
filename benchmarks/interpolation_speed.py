"""How fast is a batched interpolation curve? (not a timed test; run by hand)

Evaluates a ``--points``-point interpolation curve between two models over the Fashion-MNIST test set
(10k images) three ways, on the same device:

* one plain evaluation pass of one model (the unit of cost),
* the plain loop over model copies (``interpolate(..., batched=False)``),
* the batched path (``interpolate(..., batched=True)``: stacked weights under ``torch.vmap``).

and prints the batched/loop speed-up and the batched curve's cost in plain evaluation passes
(target for the MLP on CPU: at most 8 passes for 21 points). Weights are random (speed does not
depend on training). CPU timings on a shared machine are noisy: each number is the best of
``--repeats`` runs.

    python benchmarks/interpolation_speed.py                  # MLP 3x512
    python benchmarks/interpolation_speed.py --model resnet20 # ResNet20, width 1
"""

from __future__ import annotations

import argparse
import gzip
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ccatoolkit.landscape import interpolate
from ccatoolkit.models import MLP, ResNet20


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_test(n: int) -> TensorDataset:
    """The Fashion-MNIST test set (via ccatoolkit.data when it can, else the local IDX files)."""
    root = Path(os.environ.get("CCATOOLKIT_DATA", "/usr/share/datasets/fashion-mnist"))
    images = next(p for p in (root / "t10k-images-idx3-ubyte.gz", root / "t10k-images-idx3-ubyte") if p.exists())
    labels = next(p for p in (root / "t10k-labels-idx1-ubyte.gz", root / "t10k-labels-idx1-ubyte") if p.exists())
    x = torch.tensor(_idx(images)[:n], dtype=torch.float32).div_(255.0).sub_(0.2860).div_(0.3530).unsqueeze(1)
    y = torch.tensor(_idx(labels)[:n], dtype=torch.long)
    return TensorDataset(x, y)


def plain_pass(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    """One ordinary evaluation pass (loss and accuracy), as a user would write it."""
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
    return loss / n


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "resnet20"], default="mlp")
    parser.add_argument("--points", type=int, default=21)
    parser.add_argument("--n", type=int, default=10000, help="test images")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=None, help="points per vmapped chunk (default: automatic)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def build(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = MLP(depth=3, width=512) if args.model == "mlp" else ResNet20(width=1)
        return model.to(device).eval()

    a, b = build(0), build(1)
    loader = DataLoader(fashion_mnist_test(args.n), batch_size=args.batch_size)
    kw = dict(alphas=args.points, progress=False, chunk_size=args.chunk_size)
    print(f"model={args.model} points={args.points} n={len(loader.dataset)} batch={args.batch_size} "
          f"device={device} threads={torch.get_num_threads()} (shared CPU: timings are noisy)")
    plain = best_of(args.repeats, lambda: plain_pass(a, loader, device))
    batched = best_of(args.repeats, lambda: interpolate(a, b, loader, batched=True, **kw))
    loop = best_of(max(1, args.repeats - 1), lambda: interpolate(a, b, loader, batched=False, **kw))
    fast = interpolate(a, b, loader, batched=True, **kw)
    slow = interpolate(a, b, loader, batched=False, **kw)
    print(f"plain evaluation pass, one model: {plain:8.3f} s")
    print(f"loop over {args.points} model copies:    {loop:8.3f} s  = {loop / plain:5.1f} passes "
          f"({loop / args.points / plain:.2f} per point)")
    print(f"batched (vmap):                   {batched:8.3f} s  = {batched / plain:5.1f} passes "
          f"({batched / args.points / plain:.2f} per point)")
    print(f"speed-up batched vs loop: {loop / batched:.2f}x; max |loss difference| = "
          f"{np.abs(fast.loss - slow.loss).max():.2e}")


if __name__ == "__main__":
    main()
