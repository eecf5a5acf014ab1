"""Small toys for notebook 4: why a CCA-aligned model is not B, what CCA's map can do that a permutation
cannot, and a pair of small BatchNorm CNNs on digits.

* :func:`relu_toy`: two hidden neurons, a permutation and a CCA-like map ``T``: ``ReLU(P z) = P ReLU(z)``
  always, ``ReLU(T z)`` is not ``T ReLU(z)``, so a network whose hidden layer is mapped by ``T`` (and
  un-mapped by ``T^-1`` in the next layer) computes another function.
* :func:`split_neuron_toy`: B's features are A's, reordered, except one B neuron that mixes two of A's.
  CCA's map recovers A's features from B's with a row that reads two of B's neurons (many-to-one);
  the best permutation cannot. Both are fitted on one sample and measured on another.
* :class:`DigitsConvBN` and :func:`digits_convbn_pair`: two Conv-BatchNorm-ReLU nets trained on
  scikit-learn's digits in seconds (cached), for the CNN half of the "is B' still B?" comparison.
* :func:`readable_levels` and :func:`label_levels`: round contour levels (1-1.5-2-3-5-7 per decade) for a loss
  plane, and its colour bar ticked at each, so it reads 0.5, 0.7, 1, 1.5 instead of log10 values like 0.4243.
* :func:`hand_barrier`: the loss barrier of a path written out in numpy (what ``barrier()`` computes).
* :func:`given_end`: an ``align=`` for ``interpolate`` that returns a B' computed before, under a method's name.
* :func:`threads`: a block run with a given number of torch threads (one for the tiny digits nets).

Everything here is small numpy/torch code with no plotting; the notebook draws.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "relu", "tiny_net", "map_hidden", "relu_toy", "SplitNeuronToy", "split_neuron_toy", "DigitsConvBN",
    "digits_batches", "digits_convbn_pair", "readable_levels", "label_levels", "hand_barrier", "given_end", "threads",
]


# --------------------------------------------------------------------------- toy (a): ReLU and a map


def relu(z: np.ndarray) -> np.ndarray:
    """``max(z, 0)`` elementwise."""
    return np.maximum(np.asarray(z, dtype=np.float64), 0.0)


def tiny_net(W1: np.ndarray, b1: np.ndarray, w2: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``w2 . ReLU(W1 x + b1)`` for each row of ``x`` (a one-hidden-layer network with one output)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    return relu(x @ np.asarray(W1).T + np.asarray(b1)) @ np.asarray(w2)


def map_hidden(W1: np.ndarray, b1: np.ndarray, w2: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, ...]:
    """The hidden layer moved into another basis as ``align_to`` does (``repair=False``): rows by ``T``, ``w2`` by ``T^-1``.

    Without the ReLU this would be the same function: ``w2 T^-1 T (W1 x + b1) = w2 (W1 x + b1)``.
    """
    T = np.asarray(T, dtype=np.float64)
    return T @ W1, T @ b1, np.asarray(w2) @ np.linalg.inv(T)


def relu_toy(z: Sequence[float] = (2.0, -1.0), T: Sequence[Sequence[float]] | None = None) -> dict[str, Any]:
    """Two hidden pre-activations ``z`` of model B, a permutation ``P`` and a mixing map ``T`` (a rotation).

    Returns the vectors of both orders of "map, then ReLU" (``ReLU(M z)``, ``M ReLU(z)``) for ``M = P`` and
    ``M = T``, and a tiny network B (2 inputs, these 2 hidden neurons, 1 output) with its outputs on a
    few inputs beside those of B mapped by ``P`` and by ``T``: the permuted B is B, the mapped one is not.
    """
    z = np.asarray(z, dtype=np.float64)
    P = np.array([[0.0, 1.0], [1.0, 0.0]])
    T = np.array([[0.8, 0.6], [-0.6, 0.8]]) if T is None else np.asarray(T, dtype=np.float64)
    maps = {"P": P, "T": T}
    commute = {name: dict(relu_after=relu(M @ z), relu_before=M @ relu(z)) for name, M in maps.items()}
    # B: hidden pre-activations z(x) = W1 x + b1; at x0 = (1, 0) they are exactly ``z``
    W1, b1, w2 = np.array([[1.5, 0.5], [-0.5, 1.0]]), np.array([0.5, -0.5]), np.array([1.0, -2.0])
    W1 = W1 + np.outer(z - (W1[:, 0] + b1), [1.0, 0.0])  # so that W1 @ (1, 0) + b1 = z
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5], [0.5, -1.0]])
    outputs = {"B": tiny_net(W1, b1, w2, x)}
    for name, M in maps.items():
        outputs[f"B mapped by {name}"] = tiny_net(*map_hidden(W1, b1, w2, M), x)
    return dict(z=z, P=P, T=T, commute=commute, W1=W1, b1=b1, w2=w2, x=x, outputs=outputs)


# --------------------------------------------------------------------------- toy (b): one neuron split over two


@dataclass
class SplitNeuronToy:
    """What :func:`split_neuron_toy` measured.

    ``mixing``: B's features as a function of A's (``h_B = mixing @ h_A`` before noise); ``T``: CCA's map
    from B's features into A's (``T @ h_B ~ h_A``), ``P``: the best permutation's; ``error_T``, ``error_P``:
    each A neuron's reconstruction error on the held-out samples (mean squared error over A's variance, 0 is
    perfect, 1 is no better than A's mean); ``train_error_T``: the same for ``T`` on the samples it was fitted on.
    """

    mixing: np.ndarray
    T: np.ndarray
    P: np.ndarray
    perm: np.ndarray
    error_T: np.ndarray
    error_P: np.ndarray
    train_error_T: np.ndarray
    split: tuple[int, int]      # the two A neurons mixed into one B neuron
    mixed: int                  # that B neuron
    n_train: int
    n_test: int


def _relative_error(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per neuron (column): mean squared error over the target's variance."""
    return ((pred - target) ** 2).mean(0) / target.var(0)


def split_neuron_toy(n_train: int = 2000, n_test: int = 2000, weights: tuple[float, float] = (0.6, 0.4),
                     noise: float = 0.05, ridge: float = 1e-3, seed: int = 0) -> SplitNeuronToy:
    """A's four ReLU features; B's are the same, reordered, except B's neuron 1 = ``w0 a0 + w1 a1``.

    B keeps ``a1`` as a neuron of its own, so A's ``a0 = (b1 - w1 a1) / w0`` is a linear function of two of B's
    neurons: a many-to-one row that CCA's map (:func:`ccatoolkit.merging.align.cca.cca_transform`, the one
    ``align_to`` uses) can hold and a permutation (activation matching, ``match_activations``) cannot.
    Both are fitted on ``n_train`` samples and measured on ``n_test`` others.
    """
    from ccatoolkit.merging.align.cca import cca_transform
    from ccatoolkit.merging.align.permutation import match_activations, permutation_matrix

    w0, w1 = weights
    # B's neurons: 0 = a3, 1 = w0 a0 + w1 a1 (the split neuron), 2 = a1, 3 = a2
    mixing = np.array([[0, 0, 0, 1], [w0, w1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float64)

    def sample(part: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([seed, part])  # the fitting and the held-out samples: independent streams
        h_a = relu(rng.normal(0.3, 1.0, size=(n, 4)))
        return h_a, h_a @ mixing.T + noise * rng.normal(size=(n, 4))

    (a_tr, b_tr), (a_te, b_te) = sample(0, n_train), sample(1, n_test)
    a_mean, b_mean = a_tr.mean(0), b_tr.mean(0)
    ca, cb = a_tr - a_mean, b_tr - b_mean
    S_aa, S_bb, S_ab = ca.T @ ca / n_train, cb.T @ cb / n_train, ca.T @ cb / n_train
    T, _ = cca_transform(S_aa, S_bb, S_ab, ridge=ridge)
    corr = S_ab / np.sqrt(np.outer(np.diag(S_aa), np.diag(S_bb)))
    perm = match_activations(corr)
    P = permutation_matrix(perm).numpy()

    def error(M: np.ndarray, h_a: np.ndarray, h_b: np.ndarray) -> np.ndarray:
        # the map acts on B's features around B's (fitted) mean, placed at A's, as a layer's bias carries it
        return _relative_error((h_b - b_mean) @ M.T + a_mean, h_a)

    return SplitNeuronToy(mixing=mixing, T=T, P=P, perm=perm, error_T=error(T, a_te, b_te),
                          error_P=error(P, a_te, b_te), train_error_T=error(T, a_tr, b_tr), split=(0, 1), mixed=1,
                          n_train=n_train, n_test=n_test)


# --------------------------------------------------------------------------- a small BatchNorm CNN on digits


class DigitsConvBN(nn.Module):
    """Conv-BatchNorm-ReLU x 3 (the second and third with stride 2), global average pooling, a linear head; 8x8 digits."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = int(width)
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(w, 2 * w, 3, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(2 * w, 2 * w, 3, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU()
        self.pool, self.flatten, self.head = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10)
        self.config = dict(name="digits_convbn", width=w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.head(self.flatten(self.pool(x)))


def digits_batches(batch_size: int = 128, seed: int = 0) -> tuple[list, list]:
    """scikit-learn's digits (the package's fixed 80/20 split, normalised) as lists of batches: (train, test).

    The training batches are shuffled once with ``seed``; the test batches keep their order.
    """
    from ccatoolkit.data import load_dataset

    parts = []
    for train in (True, False):
        ds = load_dataset("digits", train=train)
        images, labels = zip(*ds.__getitems__(range(len(ds))))  # normalised, no augmentation
        x, y = torch.stack(images).float(), torch.as_tensor(labels, dtype=torch.long)
        if train:
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
            x, y = x[order], y[order]
        parts.append([(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)])
    return parts[0], parts[1]


def _fit(model: nn.Module, batches: list, epochs: int, seed: int, lr: float = 3e-3) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def digits_convbn_pair(width: int = 16, epochs: int = 12, seeds: tuple[int, int] = (0, 1), batch_size: int = 128,
                       cache: bool = True) -> tuple[DigitsConvBN, DigitsConvBN, list, list]:
    """Two :class:`DigitsConvBN` nets trained from seeds ``seeds`` (Adam, ``epochs`` epochs): ``(A, B, train, test)``.

    A few seconds each on a CPU; with ``cache`` the weights are kept in the model cache
    (``ccatoolkit.zoo.cache``) and a second call loads them.
    """
    from ccatoolkit.zoo.cache import load_or_create

    train, test = digits_batches(batch_size)
    models = []
    for seed in seeds:
        def create(seed: int = seed) -> dict[str, torch.Tensor]:
            torch.manual_seed(seed)
            return _fit(DigitsConvBN(width), train, epochs, seed).state_dict()

        key = dict(toy="digits_convbn", version=1, width=int(width), epochs=int(epochs), seed=int(seed),
                   batch_size=int(batch_size), optimizer="adam", lr=3e-3)
        state = load_or_create("toy", key, create) if cache else create()
        model = DigitsConvBN(width)
        model.load_state_dict(state)
        models.append(model.eval())
    return models[0], models[1], train, test


# --------------------------------------------------------------------------- reading aids


def readable_levels(values: Any, steps: Sequence[float] = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)) -> np.ndarray:
    """Round contour levels spanning ``values``' finite range: ``steps`` times powers of ten (1-1.5-2-3-5-7).

    Consecutive levels grow by a roughly constant factor, so filled contours drawn on them (with a colour
    bar of uniform spacing, matplotlib's default for contours) read like a log scale with round ticks.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        raise ValueError("readable_levels needs at least one finite positive value")
    lo, hi = float(v.min()), float(v.max())
    grid = np.array(sorted({s * 10.0 ** k for k in range(int(np.floor(np.log10(lo))) - 1,
                                                       int(np.ceil(np.log10(hi))) + 2) for s in steps}))
    start = grid[grid <= lo].max()
    stop = grid[grid >= hi].min()
    levels = grid[(grid >= start) & (grid <= stop)]
    if levels.size < 2:
        levels = np.array([start, stop if stop > start else start * 1.5])
    return levels


def hand_barrier(alphas: Any, losses: Any, end_losses: tuple[float, float] | None = None) -> float:
    """``max_t [L(t) - ((1 - t) L(0) + t L(1))]`` over the grid, at least 0: the loss barrier, written out.

    ``end_losses``: the straight line's ends ``(L(A), L(B))`` (default: the path's own first and last values);
    pass the real B's loss to measure a path to an aligned B' against B.
    """
    t = np.asarray(alphas, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    first, last = (loss[0], loss[-1]) if end_losses is None else end_losses
    line = (1 - t) * first + t * last
    return float(max(0.0, np.max(loss - line)))


def given_end(name: str, model: nn.Module) -> Any:
    """An ``align=`` for :func:`ccatoolkit.landscape.interpolate` that returns ``model`` (an aligned B' computed
    before), named ``name``: the path is labelled ``name`` and takes its colour, and B' is not computed again."""

    def align(model_a: nn.Module, model_b: nn.Module) -> nn.Module:
        return model

    align.__name__ = align.__qualname__ = str(name)
    return align


def label_levels(colorbar_ax: Any, levels: Sequence[float]) -> Any:
    """Tick a contour plot's colour bar at every one of ``levels``, written plainly (``0.7``, ``1.5``, ``10``)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    axis = colorbar_ax.yaxis if colorbar_ax.get_position().height >= colorbar_ax.get_position().width \
        else colorbar_ax.xaxis
    axis.set_major_locator(FixedLocator(list(levels)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(FixedLocator([]))
    return colorbar_ax


@contextmanager
def threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads, then restore the number before.

    The digits nets are tiny: on a busy CPU several threads spend their time waiting for each other, and on idle
    cores a second thread gains little. Measured, notebook 4's Conv-BN cell (two alignments and four paths): on
    two shared cores 2.7 s on one thread and 91 s on two; on two idle cores 3.4 s on one and 3.2 s on two
    (``docs/results.md``, notebook run times).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
