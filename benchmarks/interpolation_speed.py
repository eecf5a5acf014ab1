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
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ccatoolkit.landscape.paths import interpolate
from ccatoolkit.zoo.models import MLP, ResNet20


def fashion_mnist_test(n: int) -> Subset:
    """The first ``n`` images of the Fashion-MNIST test set (local files; nothing is downloaded)."""
    from ccatoolkit.data.datasets import load_dataset

    dataset = load_dataset("fashion_mnist", train=False, download=False)
    return Subset(dataset, range(min(n, len(dataset))))


def plain_pass(model: torch.nn.Module, loader: DataLoader) -> float:
    """One ordinary evaluation pass of one model (``ccatoolkit.training.evaluate``)."""
    from ccatoolkit.zoo.training import evaluate

    return evaluate(model, loader)["loss"]


def timings(repeats: int, fn) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` (CUDA work is waited for)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def best_of(repeats: int, fn) -> float:
    return min(timings(repeats, fn))


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
    loader = DataLoader(fashion_mnist_test(args.n), batch_size=args.batch_size)  # as ccatoolkit.data.make_loader
    kw = dict(alphas=args.points, progress=False, chunk_size=args.chunk_size)
    print(f"model={args.model} points={args.points} n={len(loader.dataset)} batch={args.batch_size} "
          f"device={device} threads={torch.get_num_threads()} (shared CPU: timings are noisy)")
    plain = best_of(args.repeats, lambda: plain_pass(a, loader))
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
