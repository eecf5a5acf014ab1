"""Small models and data shared by several test files: digits batches, a quick trainer, user-style CNNs."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F


def digit_batches(batch_size: int = 256) -> tuple[list, list]:
    """scikit-learn digits as lists of (inputs, targets) batches: 1400 training images, the rest for testing."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    train = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, 1400, batch_size)]
    test = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(1400, len(y), batch_size)]
    return train, test


def fit(model: nn.Module, data: list, epochs: int = 8, seed: int = 0, reinit: bool = False) -> nn.Module:
    """Adam on cross-entropy for a few epochs (``reinit``: a fresh initialisation from ``seed`` first)."""
    torch.manual_seed(seed)
    if reinit:
        for p in model.parameters():
            if p.dim() > 1:
                nn.init.kaiming_uniform_(p, a=5**0.5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def loss_and_accuracy(model: nn.Module, data: list) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) over ``data``."""
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in data:
            out = model.eval()(x)
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
    return loss / n, correct / n


class SmallRes(nn.Module):
    """A user's residual CNN: one residual block, torch.flatten, every nonlinearity its own module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0, self.relu0 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(5, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu0(self.bn0(self.conv0(x)))
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = self.relu2(x + y)
        return self.fc(torch.flatten(self.pool(x), 1))


def user_cnn() -> nn.Sequential:
    """conv-bn-relu-pool, conv-relu, Flatten of a 4x4 map (block 16), linear-relu, linear."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 16, 10), nn.ReLU(), nn.Linear(10, 3),
    )


class ConvBN(nn.Module):
    """A user's Conv-BatchNorm-ReLU network (the CCA-on-BatchNorm issue's case): three conv layers, pooling, a head."""

    def __init__(self, width: int = 16) -> None:
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


def digit_mlps(train: list, seeds: tuple[int, ...] = (0, 1), width: int = 32) -> tuple[nn.Module, ...]:
    """Digits MLPs (2 hidden layers of ``width``) trained by :func:`fit` from a fresh initialisation per seed."""
    from ccatoolkit.zoo.models import MLP

    models = []
    for s in seeds:
        torch.manual_seed(s)  # the whole initialisation (biases too) depends on the seed alone
        models.append(fit(MLP(depth=2, width=width, in_shape=(1, 8, 8)), train, seed=s, reinit=True))
    return tuple(models)


class Reiterable:
    """Batches behind ``__iter__`` only (no ``len``): re-iterable like a DataLoader, counting the passes."""

    def __init__(self, batches: list) -> None:
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


class TinyResNeXt(nn.Module):
    """A residual block whose middle convolution has 2 groups (ResNeXt, RegNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.a, self.bn_a = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 12, 3, padding=1, groups=2), nn.BatchNorm2d(12)
        self.c, self.bn_c = nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.stem(x)))
        y = self.relu(self.bn_b(self.b(self.relu(self.bn_a(self.a(x))))))
        x = self.relu(self.bn_c(self.c(y)) + x)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def notebook_runner() -> ModuleType:
    """``scripts/run_notebooks.py`` imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("run_notebooks", Path(__file__).parents[1] / "scripts" / "run_notebooks.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner


def notebook_solutions(path: str | Path) -> list[str]:
    """The Python code of each hidden solution in a notebook's "Your turn" cell (``<details>`` blocks), in order."""
    cells = json.loads(Path(path).read_text())["cells"]
    turn = next("".join(c["source"]) for c in cells
                if c["cell_type"] == "markdown" and "## Your turn" in "".join(c["source"]))
    blocks = re.findall(r"<details><summary>Solution</summary>(.*?)</details>", turn, flags=re.S)
    return [code for block in blocks for code in re.findall(r"```python\n(.*?)```", block, flags=re.S)]
