"""A user's own Conv-BatchNorm-ReLU network on scikit-learn digits: every merge method at its defaults.

The case from the CCA-Merge-on-BatchNorm issue: three conv layers with BatchNorm, global pooling,
a linear head, trained with Adam from different seeds. Each pair of models is merged with
``cc.merge([a, b], method=..., data=train)`` and nothing else, and without REPAIR. Prints test
accuracy (%) as mean +/- sd over the pairs. Runs in a minute or two on 2 CPU cores.

    .venv/bin/python benchmarks/digits_bn_cnn.py --pairs 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import ccatoolkit as cc


class ConvBN(nn.Module):
    """conv(1->w)-BN-ReLU, conv(w->2w, stride 2)-BN-ReLU, conv(2w->2w, stride 2)-BN-ReLU, pool, linear."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(w, 2 * w, 3, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(2 * w, 2 * w, 3, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU()
        self.pool, self.flatten, self.head = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.head(self.flatten(self.pool(x)))


def digits(batch_size: int = 128) -> tuple[list, list]:
    """1400 training and 397 test digits as lists of (inputs, targets) batches (a fixed shuffle)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    cut = lambda lo, hi: [(x[i : min(i + batch_size, hi)], y[i : min(i + batch_size, hi)])  # noqa: E731
                          for i in range(lo, hi, batch_size)]
    return cut(0, 1400), cut(1400, len(y))


def fit(seed: int, width: int, train: list, epochs: int) -> nn.Module:
    """Adam (lr 3e-3) on cross-entropy from initialisation ``seed``."""
    torch.manual_seed(seed)
    model = ConvBN(width)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    train, test = digits()
    acc = lambda m: 100.0 * cc.evaluate(m, test)["accuracy"]  # noqa: E731
    rows: dict[str, list[float]] = {}
    for pair in range(args.pairs):
        a, b = (fit(2 * pair + i, args.width, train, args.epochs) for i in range(2))
        rows.setdefault("endpoints (mean of the two)", []).append((acc(a) + acc(b)) / 2)
        rows.setdefault("ensemble", []).append(acc(cc.ensemble([a, b])))
        for method in ("average", "permute", "permute_weight", "zipit", "cca", "cca_multiview"):
            rows.setdefault(method, []).append(acc(cc.merge([a, b], method=method, data=train, progress=False)))
            if method != "average":
                rows.setdefault(f"{method}, repair=False", []).append(
                    acc(cc.merge([a, b], method=method, data=train, repair=False, progress=False)))
        rows.setdefault("align_to(a, b, 'cca') on its own", []).append(acc(cc.align_to(a, b, "cca", train, progress=False)))
    print(f"digits Conv-BN-ReLU (width {args.width}, {args.epochs} epochs Adam), {args.pairs} pairs; test accuracy %")
    print("| merge | mean ± sd | per pair |\n|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {np.mean(values):.1f} ± {np.std(values):.1f} | {' '.join(f'{v:.1f}' for v in values)} |")
    print(f"\n({time.time() - t0:.0f}s, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
