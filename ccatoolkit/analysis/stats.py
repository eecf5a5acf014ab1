"""Streaming activation statistics of one or many models run on the same inputs.

For every activation *space* (one layer, or several layers whose outputs share channels, such as a
ResNet's residual stream) the models' activations are concatenated channel-wise (model 0's
channels, then model 1's, ...) and two sums are accumulated batch by batch on the models' device:
the sum of the samples and the sum of their outer products (a joint Gram matrix), in float64. A
convolutional output ``(N, C, H, W)`` gives ``N*H*W`` samples of ``C`` channels; a linear output
``(N, F)`` gives ``N`` samples of ``F`` features. Memory does not grow with the amount of data.

Speed: Gram matrices are computed in float32 (float64 for float64 models) on activations minus a
fixed per-channel shift (the first batch's mean), so float32 loses nothing that matters; a ones row
appended to the samples yields the sums in the same matrix product; only the upper block triangle
is computed (1/2 to 3/4 of the full product), in row chunks of 32 channels. The float32 running Gram
is flushed into the float64 totals every 2^17 samples.

Means, covariances, cross-covariances, correlations and canonical correlations come from the sums
(:class:`JointStats`). With ``torch.distributed`` initialised the sums are all-reduced, so ranks that
each see part of the data end with the statistics of all of it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ccatoolkit import distributed
from ccatoolkit._utils import (
    batch_count,
    batch_inputs,
    check_data,
    check_max_batches,
    check_same_architecture,
    eval_mode,
    model_device,
    model_dtype,
    progress_bar,
    to_model,
)
from ccatoolkit.analysis.capture import forward_hooks, resolve_layers
from ccatoolkit.analysis.linalg import EIG_RTOL, canonical_correlations_from_cov, inverse_sqrt

__all__ = [
    "JointStats",
    "SpaceSums",
    "Scratch",
    "StatisticsCollector",
    "collect_statistics",
    "warn_if_constant",
    "correlation_matrix",
    "canonical_correlations",
    "canonical_correlations_from_cov",
    "inverse_sqrt",
]

# A neuron whose variance is below this fraction of (its mean^2 + the largest variance of its model
# in that space) is constant: it gets correlation 0.
VAR_RTOL = 1e-10
# Rows of the batch matrix per Gram chunk: the upper block triangle is computed chunk by chunk. Fewer,
# larger products beat the extra triangle they compute up to about this size (docs/results.md, "Statistics
# capture": 32 rows cost the MLP 3.45x its forward passes, 128 rows 2.66x).
_CHUNK_ROWS = 128
#: The running Gram (a sum over at most this many samples, of shifted data) is flushed into float64
#: (here and in REPAIR's channel moments, ``merging.normalization.MomentSums``).
FLUSH_SAMPLES = 1 << 17
#: A space whose running Gram would be larger than this (bytes; a joint space of about 4096 channels) has
#: none: each batch's products go into the float64 sums chunk by chunk (vgg11_bn's two 4096-wide classifier
#: spaces would otherwise hold two such Grams throughout).
LARGE_RUNNING_GRAM = 64 << 20
#: The smallest default budget (bytes) for the activations held per forward pass, by device type: small
#: models take whole batches; on an accelerator larger micro-batches keep its kernels busy.
MIN_MICRO_BATCH_BYTES = {"cpu": 64 << 20, "other": 1 << 30}



def _offsets(sizes: Sequence[int]) -> list[int]:
    """Start of each model's channels in a joint vector of models of ``sizes`` channels (and one past the end)."""
    out = [0]
    for size in sizes:
        out.append(out[-1] + size)
    return out


class Scratch:
    """A reusable scratch matrix, shared by the spaces of one collector (processed one at a time)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device,
            column_major: bool = False) -> torch.Tensor:
        """A ``(rows, cols)`` matrix; ``column_major``: each column contiguous (a transposed view), so that
        ``(samples, channels)`` outputs are written into its columns without a transposing copy."""
        buf = self.buffer
        if buf is None or buf.numel() < rows * cols or buf.dtype != dtype or buf.device != device:
            buf = self.buffer = torch.empty(rows * cols, dtype=dtype, device=device)
        if column_major:
            return buf[: rows * cols].view(cols, rows).T
        return buf[: rows * cols].view(rows, cols)

    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()


# --------------------------------------------------------------------------------------------
# The statistics of one space
# --------------------------------------------------------------------------------------------


@dataclass
class JointStats:
    """Sums over the samples of one activation space, for all models' channels concatenated.

    ``count`` samples; ``sum`` (float64, length ``sum(sizes)``) and ``gram`` (float64,
    ``sum(sizes)`` square, the sum of outer products); ``sizes[i]`` channels of model ``i``.
    Covariances are unbiased (divided by ``count - 1``).

    *Cross-only* statistics (``reference`` set, ``gram`` None) hold just what matching every model
    to one reference needs: ``cross[k]``, the sum of ``x_ref x_k^T`` for each other model ``k``, and
    ``square_sum``, each channel's sum of squares (its variance). For two 4096-wide models that is a
    quarter of the joint Gram matrix. :meth:`cov` of any other pair of models raises.

    ``samples`` (full statistics of a wide space seen on few samples, ``gram`` None): the samples
    themselves, ``sum(sizes) x count`` float64; every block of the Gram matrix is made from them when
    asked for (see :class:`SpaceSums`' ``keep_samples``).
    """

    count: int
    sum: torch.Tensor
    gram: torch.Tensor | None
    sizes: list[int]
    layers: list[str] = field(default_factory=list)
    reference: int | None = None
    cross: dict[int, torch.Tensor] = field(default_factory=dict)
    square_sum: torch.Tensor | None = None
    samples: torch.Tensor | None = None

    def __post_init__(self) -> None:
        full = self.gram is not None or self.samples is not None
        if full == (self.reference is not None) or (self.gram is not None and self.samples is not None):
            raise ValueError("JointStats needs either a joint gram or the samples (full statistics) or a reference "
                             "(cross-only)")
        if self.reference is not None:
            missing = [k for k in range(len(self.sizes)) if k != self.reference and k not in self.cross]
            if missing or self.square_sum is None:
                raise ValueError(f"cross-only statistics lack the blocks of models {missing} or the squares")

    # ---- layout -------------------------------------------------------------------------
    @property
    def num_models(self) -> int:
        return len(self.sizes)

    @property
    def offsets(self) -> list[int]:
        """Start of each model's channels in the joint vector (and one past the end)."""
        return _offsets(self.sizes)

    def block(self, i: int) -> slice:
        """The slice of model ``i``'s channels in the joint vector."""
        if not -self.num_models <= i < self.num_models:
            raise IndexError(f"model index {i} out of range for statistics of {self.num_models} models")
        i %= self.num_models
        off = self.offsets
        return slice(off[i], off[i + 1])

    def _gram_block(self, i: int, j: int) -> torch.Tensor:
        """The sum of ``x_i x_j^T`` (a view, not a copy; a new matrix when the samples are kept)."""
        bi, bj = self.block(i), self.block(j)
        if self.gram is not None:
            return self.gram[bi, bj]
        if self.samples is not None:
            return self.samples[bi] @ self.samples[bj].T
        i, j = i % self.num_models, j % self.num_models
        if i == self.reference and j in self.cross:
            return self.cross[j]
        if j == self.reference and i in self.cross:
            return self.cross[i].T
        raise ValueError(
            f"these statistics are cross-only (collected with reference={self.reference}): they hold the "
            f"cross-covariances of model {self.reference} with each other model and every channel's variance, "
            f"not the covariance of models {i} and {j}; collect them with reference=None for that"
        )

    # ---- moments ------------------------------------------------------------------------
    def mean(self, i: int | None = None) -> torch.Tensor:
        """Mean activation of model ``i``'s channels (of all models' channels when ``i`` is None)."""
        if self.count < 1:
            raise ValueError("no samples were accumulated")
        m = self.sum / self.count
        return m if i is None else m[self.block(i)]

    def joint_cov(self) -> torch.Tensor:
        """Unbiased covariance of all models' channels concatenated (``sum(sizes)`` square)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        if self.gram is None and self.samples is None:
            raise ValueError("cross-only statistics have no joint covariance; collect them with reference=None")
        m = self.sum / self.count
        gram = self.gram if self.gram is not None else self.samples @ self.samples.T
        cov = (gram - self.count * torch.outer(m, m)) / (self.count - 1)
        return (cov + cov.T) / 2

    def cov(self, i: int, j: int | None = None) -> torch.Tensor:
        """Unbiased (cross-)covariance between model ``i``'s and model ``j``'s channels (``j`` defaults to ``i``)."""
        j = i if j is None else j
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        bi, bj = self.block(i), self.block(j)
        m = self.sum / self.count
        if self.samples is not None:  # the centred samples' products: no sum of squares cancels
            return ((self.samples[bi] - m[bi, None]) @ (self.samples[bj] - m[bj, None]).T).div_(self.count - 1)
        # in place on one copy of the block: a wide layer's float64 block is large
        out = self._gram_block(i, j).clone().addr_(m[bi], m[bj], alpha=-self.count)
        return out.div_(self.count - 1)

    def var(self, i: int) -> torch.Tensor:
        """Unbiased variance of model ``i``'s channels (never negative; the diagonal alone, not the covariance)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        b = self.block(i)
        m = self.sum[b] / self.count
        if self.samples is not None:
            return ((self.samples[b] - m[:, None]).square().sum(1) / (self.count - 1)).clamp_min(0.0)
        squares = torch.diagonal(self.gram[b, b]) if self.gram is not None else self.square_sum[b]  # type: ignore[index]
        return ((squares - self.count * m * m) / (self.count - 1)).clamp_min(0.0)

    def alive(self, i: int) -> torch.Tensor:
        """Boolean mask of model ``i``'s channels that vary (not dead or constant)."""
        var, mean = self.var(i), self.mean(i)
        scale = mean.square() + (var.max() if var.numel() else 0.0)
        return var > VAR_RTOL * scale

    def constant(self) -> bool:
        """Whether every channel of every model is constant on the samples (blank inputs, dead layers): then the
        statistics hold no information to match or correlate channels by. False below 2 samples (no variance)."""
        if self.count < 2:
            return False
        return not any(bool(self.alive(i).any()) for i in range(self.num_models))

    def corr(self, i: int, j: int) -> torch.Tensor:
        """Pearson correlations between model ``i``'s and model ``j``'s channels (``sizes[i] x sizes[j]``).

        Constant (e.g. dead ReLU) channels have correlation 0 with everything, never NaN.
        """
        c = self.cov(i, j)

        def inverse_std(k: int) -> torch.Tensor:  # 0 for constant channels: their correlations become 0
            sd = self.var(k).sqrt()
            return torch.where(self.alive(k) & (sd > 0), 1.0 / sd.clamp_min(1e-300), torch.zeros_like(sd))

        # scaled in place: no temporaries of the block's size (the peak memory of a wide layer's matching)
        return c.mul_(inverse_std(i)[:, None]).mul_(inverse_std(j)[None, :]).clamp_(-1.0, 1.0)

    def canonical_correlations(self, i: int = 0, j: int = 1, ridge: float = 0.0) -> torch.Tensor:
        """Canonical correlations between model ``i``'s and ``j``'s channels (descending, in [0, 1])."""
        self.warn_if_rank_deficient(ridge)
        return canonical_correlations_from_cov(self.cov(i), self.cov(j), self.cov(i, j), ridge=ridge)

    def warn_if_rank_deficient(self, ridge: float | None = None, space: str = "") -> bool:
        """Warn (and return True) when there are fewer samples than channels of all models together."""
        total = sum(self.sizes)
        if self.count > total:
            return False
        name = space or (self.layers[0] if self.layers else "this space")
        reg = (
            f"the regularization applied is ridge={ridge:g} times trace(S)/n on each covariance's diagonal"
            if ridge is not None
            else "pass ridge > 0 (added as ridge * trace(S)/n * I)"
        )
        warnings.warn(
            f"statistics of {name!r} are rank-deficient: {self.count} samples for {total} channels over "
            f"{self.num_models} model(s); eigenvalues below {EIG_RTOL:g} x the largest are dropped "
            f"(pseudo-inverse) and {reg}; use more data for reliable correlations",
            RuntimeWarning,
            stacklevel=3,
        )
        return True

    def nbytes(self) -> int:
        """Bytes these statistics hold: their sums, or the kept samples."""
        held = [self.sum, self.gram, self.samples, self.square_sum, *self.cross.values()]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    # ---- combining ------------------------------------------------------------------------
    def _tensors(self) -> list[torch.Tensor]:
        """The sums, in a fixed order (what adding, moving and all-reducing act on); kept samples become their
        Gram matrix."""
        if self.samples is not None:
            return [self.sum, self.samples @ self.samples.T]
        if self.gram is not None:
            return [self.sum, self.gram]
        assert self.square_sum is not None
        return [self.sum, self.square_sum] + [self.cross[k] for k in sorted(self.cross)]

    def _with(self, count: int, tensors: list[torch.Tensor]) -> JointStats:
        if self.reference is None:
            return JointStats(count, tensors[0], tensors[1], list(self.sizes), list(self.layers))
        keys = sorted(self.cross)
        return JointStats(count, tensors[0], None, list(self.sizes), list(self.layers), reference=self.reference,
                          cross=dict(zip(keys, tensors[2:])), square_sum=tensors[1])

    def __add__(self, other: JointStats) -> JointStats:
        """Statistics of the union of two disjoint sample sets (sums add)."""
        if list(self.sizes) != list(other.sizes):
            raise ValueError(f"cannot add statistics with channel sizes {self.sizes} and {other.sizes}")
        if self.reference != other.reference:
            raise ValueError(f"cannot add statistics of different kinds (reference {self.reference} and "
                             f"{other.reference}; None: full)")
        if self.samples is not None and other.samples is not None:  # still samples: side by side
            return JointStats(self.count + other.count, self.sum + other.sum, None, list(self.sizes),
                              list(self.layers), samples=torch.cat([self.samples, other.samples.to(self.samples)], 1))
        return self._with(self.count + other.count, [a + b for a, b in zip(self._tensors(), other._tensors())])

    def to(self, device: torch.device | str) -> JointStats:
        if self.samples is not None:
            return JointStats(self.count, self.sum.to(device), None, list(self.sizes), list(self.layers),
                              samples=self.samples.to(device))
        return self._with(self.count, [t.to(device) for t in self._tensors()])

    def all_reduce(self) -> JointStats:
        """Sum ``count`` and the sums over all ``torch.distributed`` ranks (in place; returns self)."""
        count, *reduced = distributed.all_reduce_sum(
            [torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)] + self._tensors())
        new = self._with(int(round(count.item())), reduced)
        self.count, self.sum, self.gram, self.samples = new.count, new.sum, new.gram, None
        self.cross, self.square_sum = new.cross, new.square_sum
        return self


# --------------------------------------------------------------------------------------------
# Accumulation
# --------------------------------------------------------------------------------------------


def _normalise_layers(layers: Mapping[str, Sequence[str]] | Sequence[str] | str) -> dict[str, list[str]]:
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, Mapping):
        spaces = {str(k): ([v] if isinstance(v, str) else list(v)) for k, v in layers.items()}
    else:
        spaces = {name: [name] for name in layers}
    if not spaces:
        raise ValueError(
            "no layers to collect statistics of (layers is empty): pass module names (see capturable_layers(model)) "
            "or {space: [names]}. From merge or align_to this means that the model's merge graph has no hidden "
            "space to align (merge_graph(model) is empty), so only method='average' applies"
        )
    seen: dict[str, str] = {}
    for space, names in spaces.items():
        if not names:
            raise ValueError(f"space {space!r} has no layers")
        for name in names:
            if name in seen:
                raise ValueError(f"layer {name!r} is listed in two spaces ({seen[name]!r} and {space!r})")
            seen[name] = space
    return spaces


class SpaceSums:
    """The running sums of one activation space (all models' channels of its capture layers).

    The joint samples of a batch are written into a matrix ``z`` (one column per sample: the
    channels minus a fixed shift, then a row of ones); its Gram matrix (upper block triangle; the
    ones row gives the sums) is added into a float32 running total that is flushed into the
    float64 sums every ``FLUSH_SAMPLES`` samples. A space whose running Gram would be larger than
    ``LARGE_RUNNING_GRAM`` bytes has none: each chunk's product of a batch is added to the float64
    sums at once (a buffer of one chunk of rows).

    With ``reference`` (cross-only statistics) only the products of the reference's rows with each
    other model's rows (one float64 block per model) and each channel's sum of squares are kept.

    ``start``: full statistics of other samples to go on from. Their tensors become these sums (re-expressed
    about the shift in place, so a wide space holds one Gram matrix, not two): a merge adds its held-out
    batches to the fitting batches' sums this way.

    ``keep_samples``: a wide space (one with no running Gram) keeps its samples themselves, not their Gram
    matrix, while it has seen at most half as many samples as it has channels: vgg11_bn's two 4096-wide
    classifier spaces on 512 images hold 2 x 17 MB of samples instead of 2 x 512 MB of Gram. Past that
    count the kept samples go into the Gram matrix and it goes on as above. The statistics then carry
    the samples (:attr:`JointStats.samples`).
    """

    def __init__(self, name: str, layers: list[str], num_models: int, reference: int | None = None,
                 start: JointStats | None = None, keep_samples: bool = False) -> None:
        if start is not None and reference is not None:
            raise ValueError("only full statistics (no reference) can go on from earlier ones")
        self.name, self.layers, self.num_models = name, layers, num_models
        self.reference = reference
        self.start = start
        self.keep_samples = keep_samples and reference is None
        self.sampling = False  # keeping samples now (set up for a wide space with keep_samples)
        self.kept: list[torch.Tensor] = []  # while sampling: the shifted samples, (dim, m) blocks in self.dtype
        self.cross: dict[int, torch.Tensor] = {}  # cross-only: model k -> float64 sum of (x_ref - k)(x_k - k)^T
        self.squares: torch.Tensor | None = None  # cross-only: float64 sum of (x - shift)^2 per channel
        self.sizes: list[int] | None = None
        self.dtype = torch.float32  # dtype of the blocks and of the running Gram
        self.shift: torch.Tensor | None = None  # per joint channel, in self.dtype
        self.s1: torch.Tensor | None = None  # float64 sum of (x - shift)
        self.s2: torch.Tensor | None = None  # float64 sum of (x - shift)(x - shift)^T, upper block part
        self.g: torch.Tensor | None = None  # running (dim, dim + 1) Gram since the last flush, self.dtype
        self.bad: torch.Tensor | None = None  # per joint channel: a non-finite value was seen
        self.count = 0
        self.unflushed = 0
        self.chunks: list[tuple[int, int]] = []

    @property
    def dim(self) -> int:
        return sum(self.sizes or [])

    @property
    def offsets(self) -> list[int]:
        """Start of each model's channels in the joint vector (and one past the end)."""
        return _offsets(self.sizes or [])

    def _samples(self, outs: list[torch.Tensor], scratch: Scratch, ones_row: bool) -> tuple[torch.Tensor, int]:
        """The batch as a ``(channels [+ 1], samples)`` matrix in ``scratch``: each model's channels minus the
        fixed shift, then (``ones_row``) a row of ones whose products give the sums. Returns it and the samples."""
        assert self.sizes is not None and self.shift is not None
        samples = _sample_count(outs[0])
        d = self.dim
        # (N, C) outputs (no spatial positions) hold each sample's channels together: copied into the columns
        # of a column-major matrix they need no transposing copy (a third of an MLP's statistics overhead)
        z = scratch.get(d + int(ones_row), samples, self.dtype, self.shift.device, column_major=outs[0].dim() == 2)
        off = self.offsets
        for i, out in enumerate(outs):
            part = out.transpose(0, 1)
            shift = self.shift[off[i] : off[i + 1]].view(-1, *([1] * (part.dim() - 1)))
            torch.sub(part, shift, out=z[off[i] : off[i + 1]].view(part.shape))
        if ones_row:
            z[d].fill_(1.0)
        return z, samples

    def setup(self, sizes: list[int], first: list[torch.Tensor], device: torch.device) -> None:
        self.sizes = sizes
        d = sum(sizes)
        # float32 Grams of shifted data, unless the models compute in float64 (then all is float64)
        self.dtype = torch.float64 if any(t.dtype == torch.float64 for t in first) else torch.float32
        shift = torch.cat([_channels_mean(t) for t in first]).to(self.dtype)
        self.shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        self.s1 = torch.zeros(d, dtype=torch.float64, device=device)
        self.sampling = self.keep_samples and self._wide()
        if self.start is not None:
            self._go_on(self.start, device)
            self.start = None
        elif self.reference is None:
            if not self.sampling:  # (a sampling space makes its Gram matrix when it stops sampling)
                self.s2 = torch.zeros(d, d, dtype=torch.float64, device=device)
        else:
            r = self.reference
            self.cross = {k: torch.zeros(sizes[r], size, dtype=torch.float64, device=device)
                          for k, size in enumerate(sizes) if k != r}
            self.squares = torch.zeros(d, dtype=torch.float64, device=device)
        self.g = None  # made by the first add(), never for a wide space (see add)
        self.bad = torch.zeros(d, dtype=torch.bool, device=device)
        # Row chunks: split at model boundaries and large blocks further, so that only the upper
        # block triangle of the Gram matrix is computed.
        bounds = [0]
        for size in sizes:
            pieces = max(1, round(size / _CHUNK_ROWS))
            start = bounds[-1]
            bounds += [start + (size * (p + 1)) // pieces for p in range(pieces)]
        self.chunks = [(r0, r1) for r0, r1 in zip(bounds[:-1], bounds[1:]) if r1 > r0]

    def _go_on(self, start: JointStats, device: torch.device) -> None:
        """Take over ``start``'s sums, re-expressed about the shift in place on its Gram matrix (what
        :meth:`result` undoes)."""
        assert self.sizes is not None and self.shift is not None
        if list(start.sizes) != list(self.sizes):
            raise ValueError(f"space {self.name!r}: cannot go on from statistics with channel sizes {start.sizes} "
                             f"(these have {self.sizes})")
        self.count = start.count
        if start.samples is not None:  # samples go on as samples (or into the Gram, past half the width)
            self.kept = [(start.samples.to(device) - self.shift.to(device, torch.float64)[:, None]).to(self.dtype)]
            start.samples = None
            if not self.sampling or self.count > self.dim // 2:
                self._to_gram(Scratch())
            return
        if start.gram is None:
            raise ValueError("only full statistics (no reference) can go on from earlier ones")
        self.sampling = False  # the Gram matrix is there already
        self.s1, self.s2 = reshift_sums(start.count, start.sum.to(device=device, dtype=torch.float64),
                                        start.gram.to(device=device, dtype=torch.float64),
                                        -self.shift.to(device=device, dtype=torch.float64), in_place=True)
        start.gram = None  # handed over (the caller's statistics are consumed)

    def _wide(self) -> bool:
        """Whether the running Gram would exceed ``LARGE_RUNNING_GRAM``: products then go straight into the sums."""
        d = self.dim
        return d * (d + 1) * self.dtype.itemsize > LARGE_RUNNING_GRAM

    def _keep(self, outs: list[torch.Tensor], scratch: Scratch) -> None:
        """Keep a batch's shifted samples (sampling, see the class doc)."""
        assert self.bad is not None
        z, samples = self._samples(outs, scratch, ones_row=False)
        block = z[:, :samples].clone()
        self.kept.append(block)
        self.count += samples
        self.bad |= ~torch.isfinite((block * block).sum(1))

    def _to_gram(self, scratch: Scratch) -> None:
        """Stop sampling: the kept samples' products go into new float64 sums."""
        assert self.shift is not None
        d, device = self.dim, self.shift.device
        self.sampling = False
        self.s2 = torch.zeros(d, d, dtype=torch.float64, device=device)
        kept, self.kept = self.kept, []
        for block in kept:
            z = scratch.get(d + 1, block.shape[1], self.dtype, device)
            z[:d].copy_(block)
            z[d].fill_(1.0)
            self._add_direct(z)

    def add(self, outs: list[torch.Tensor], scratch: Scratch) -> None:
        """Add one capture point's outputs of all models on one batch (each ``(N, C_i, *spatial)``)."""
        assert self.sizes is not None and self.shift is not None and self.s1 is not None, "statistics were released"
        d = self.dim
        if self.reference is not None:
            self._add_cross(outs, scratch)
            return
        if self.sampling:
            if self.count + _sample_count(outs[0]) <= d // 2:
                self._keep(outs, scratch)
                return
            self._to_gram(scratch)
        assert self.s2 is not None
        # a wide space has no running Gram: each chunk's product goes straight into the float64 sums
        direct = self._wide()
        if self.g is None and not direct:
            self.g = torch.zeros(d, d + 1, dtype=self.dtype, device=self.s2.device)
        z, samples = self._samples(outs, scratch, ones_row=True)
        self.count += samples
        if direct:
            self._add_direct(z)
            return
        assert self.g is not None
        for r0, r1 in self.chunks:
            self.g[r0:r1, r0:].addmm_(z[r0:r1], z[r0 : d + 1].T)
        self.unflushed += samples
        if self.unflushed >= FLUSH_SAMPLES:
            self.flush()

    def _add_direct(self, z: torch.Tensor) -> None:
        """Add the products of ``z`` (shifted samples and a row of ones) into the float64 sums, a chunk of rows
        at a time (a wide space's way: no running Gram)."""
        assert self.s1 is not None and self.s2 is not None and self.bad is not None
        d = self.dim
        rows = max(r1 - r0 for r0, r1 in self.chunks)
        buffer = torch.empty(rows * (d + 1), dtype=self.dtype, device=self.s2.device)
        for r0, r1 in self.chunks:
            block = buffer[: (r1 - r0) * (d + 1 - r0)].view(r1 - r0, d + 1 - r0)
            torch.mm(z[r0:r1], z[r0 : d + 1].T, out=block)
            self.s2[r0:r1, r0:] += block[:, : d - r0]
            self.s1[r0:r1] += block[:, d - r0]
            self.bad[r0:r1] |= ~torch.isfinite(torch.diagonal(block[:, : r1 - r0]))

    def _add_cross(self, outs: list[torch.Tensor], scratch: Scratch) -> None:
        """Cross-only: the reference's products with each other model, every channel's sum and square."""
        assert self.s1 is not None and self.squares is not None and self.bad is not None
        z, samples = self._samples(outs, scratch, ones_row=False)
        self.count += samples
        for r0 in range(0, self.dim, _CHUNK_ROWS):  # sums and squares in row chunks: no copy of z
            rows = z[r0 : r0 + _CHUNK_ROWS]
            self.s1[r0 : r0 + _CHUNK_ROWS] += rows.sum(1, dtype=torch.float64)
            self.squares[r0 : r0 + _CHUNK_ROWS] += (rows * rows).sum(1, dtype=torch.float64)
        self.bad |= ~torch.isfinite(self.squares)
        r = self.reference
        assert r is not None
        off = self.offsets
        z_ref = z[off[r] : off[r + 1]]
        for k, block in self.cross.items():
            block += torch.mm(z_ref, z[off[k] : off[k + 1]].T)

    def flush(self) -> None:
        """Move the running Gram into the float64 sums."""
        if not self.unflushed:
            return
        assert self.g is not None and self.s1 is not None and self.s2 is not None and self.bad is not None
        d = self.dim
        for r0, r1 in self.chunks:
            self.s2[r0:r1, r0:] += self.g[r0:r1, r0:d]
        self.s1 += self.g[:, d]
        self.bad |= ~torch.isfinite(torch.diagonal(self.g))
        self.g.zero_()
        self.unflushed = 0

    def check_finite(self, diagonal: torch.Tensor | None = None, layer: str | None = None) -> None:
        """Raise ``ValueError`` naming the layer(s) and model if a non-finite value reached the sums.

        Checks the flags set at flushes, or ``diagonal`` (of the running Gram) when given.
        """
        assert self.bad is not None and self.sizes is not None
        bad = self.bad if diagonal is None else ~torch.isfinite(diagonal[: self.dim])
        if not bool(bad.any()):
            return
        first = int(torch.nonzero(bad)[0])
        where = f"layer {layer!r}" if layer else f"space {self.name!r} (layers {', '.join(self.layers)})"
        off = 0
        for model, size in enumerate(self.sizes):
            if first < off + size:
                raise ValueError(
                    f"non-finite activations (NaN/Inf, or too large for {str(self.dtype).replace('torch.', '')}) "
                    f"in {where} of model {model} (channel {first - off}); check the model's weights and inputs"
                )
            off += size

    def shifted_sums(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(count, shift, sum, gram)`` so far, about the shift and without a copy (float64; the Gram's lower
        block triangle filled in place, which adds never touch): the tensors go on changing with every
        :meth:`add`. For cross-only statistics ``gram`` is its diagonal, each channel's sum of squares. What
        REPAIR's channel moments read (:class:`~ccatoolkit.merging.normalization.MomentSums`)."""
        self.flush()
        if self.sampling:  # the Gram matrix asked for: made from the kept samples, and gone on with
            self._to_gram(Scratch())
        assert self.s1 is not None and self.shift is not None
        if self.reference is not None:
            assert self.squares is not None
            return self.count, self.shift.to(torch.float64), self.s1, self.squares
        return self.count, self.shift.to(torch.float64), self.s1, self._full_gram()

    def shifted_samples(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(count, shift, sum, samples)`` of a sampling space (:attr:`sampling`): the kept samples minus the shift,
        ``dim x count`` in the outputs' precision (a new matrix), and their float64 sum."""
        assert self.sampling and self.shift is not None
        samples = torch.cat(self.kept, 1)
        return self.count, self.shift.to(torch.float64), samples.sum(1, dtype=torch.float64), samples

    def _full_gram(self) -> torch.Tensor:
        """The float64 Gram with its lower block triangle filled from the upper one, in place (flushes add only
        above the diagonal blocks)."""
        assert self.s2 is not None
        for r0, r1 in self.chunks:
            self.s2[r1:, r0:r1] = self.s2[r0:r1, r1:].T
        return self.s2

    def result(self, release: bool = False) -> JointStats:
        """The statistics so far. ``release``: hand the float64 sums over to the result instead of
        copying them (no further :meth:`add`); either way the running Gram is freed until the next batch.
        """
        self.flush()
        self.g = None  # re-created by the next add(); a wide space holds much less memory meanwhile
        if self.reference is not None:
            return self._cross_result(release)
        if self.sampling:
            return self._samples_result(release)
        assert self.s1 is not None and self.s2 is not None and self.shift is not None and self.sizes is not None
        self._full_gram()
        # undo the shift k: sums about k become sums about 0
        total, gram = reshift_sums(self.count, self.s1, self.s2, self.shift.to(torch.float64), in_place=release)
        if release:
            self.s2 = None
        return JointStats(self.count, total, gram, list(self.sizes), list(self.layers))

    def _samples_result(self, release: bool) -> JointStats:
        """The kept samples themselves, shift undone, as float64 (see the class doc)."""
        assert self.shift is not None and self.sizes is not None
        samples = torch.cat(self.kept, 1).to(torch.float64).add_(self.shift.to(torch.float64)[:, None])
        if release:
            self.kept = []
        return JointStats(self.count, samples.sum(1), None, list(self.sizes), list(self.layers), samples=samples)

    def _cross_result(self, release: bool) -> JointStats:
        """Cross-only statistics with the shift undone (see :meth:`result`)."""
        assert self.s1 is not None and self.squares is not None and self.shift is not None and self.sizes is not None
        r = self.reference
        assert r is not None
        k = self.shift.to(torch.float64)
        n = float(self.count)
        u = self.s1 + (n / 2) * k
        off = self.offsets
        ref = slice(off[r], off[r + 1])
        cross = {}
        for m, block in list(self.cross.items()):
            b = slice(off[m], off[m + 1])
            out = block if release else block.clone()
            cross[m] = out.addr_(k[ref], u[b]).addr_(u[ref], k[b])
        squares = self.squares + 2 * k * u
        if release:
            self.cross, self.squares = {}, None
        return JointStats(self.count, self.s1 + n * k, None, list(self.sizes), list(self.layers), reference=r,
                          cross=cross, square_sum=squares)

    def nbytes(self) -> int:
        """Bytes held by the sums (independent of the amount of data; the batch matrix is shared)."""
        tensors = [self.s1, self.s2, self.shift, self.bad, self.g, self.squares, *self.cross.values(), *self.kept]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def reshift_sums(count: int, total: torch.Tensor, gram: torch.Tensor, delta: torch.Tensor,
                 in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of ``y - a`` re-expressed as sums of ``y - b``, with ``delta = a - b`` (float64): ``S' = S + n delta``
    and ``G' = G + delta u^T + u delta^T`` with ``u = S + (n / 2) delta``; ``gram`` may be its diagonal alone
    (``G' = G + 2 delta u``). ``in_place``: ``gram`` is changed, no second matrix of its size is made."""
    u = total + (count / 2) * delta
    if gram.dim() == 1:
        gram = gram.add_(2 * delta * u) if in_place else gram + 2 * delta * u
    else:
        gram = gram.addr_(delta, u).addr_(u, delta) if in_place else torch.addr(gram, delta, u).addr_(u, delta)
    return total + count * delta, gram


def _sample_count(out: torch.Tensor) -> int:
    """How many samples an ``(N, C, *spatial)`` output holds: every spatial position is one."""
    return out.shape[0] * (out[:1].numel() // max(1, out.shape[1]))


def _channels_mean(t: torch.Tensor) -> torch.Tensor:
    dims = [0] + list(range(2, t.dim()))
    return t.detach().mean(dim=dims, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


class _Point:
    """One capture point (a module name) of a space: collects every model's output on a batch.

    Outputs are held by reference until all models have run (no copy). On the first batch they
    are also cloned and checked: a capture point whose output a later in-place operation changes
    (e.g. ``nn.ReLU(inplace=True)`` after a captured BatchNorm) is cloned on every batch.
    """

    def __init__(self, name: str, space: SpaceSums, num_models: int, scratch: Scratch) -> None:
        self.name, self.space, self.num_models, self.scratch = name, space, num_models, scratch
        self.outs: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # model -> (data, original, version)
        self.first = True
        self.clone = False

    def begin(self) -> None:
        self.outs = {}

    def hook(self, model: int, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            kind = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"layer {self.name!r} returns {kind}; statistics need a tensor of shape (N, C, ...) "
                "(channels on dimension 1)"
            )
        if model in self.outs:
            raise ValueError(
                f"layer {self.name!r} ran twice in one forward pass of model {model}; "
                "capture a module that is called once per forward"
            )
        out = out.detach()
        data = out.clone() if (self.first or self.clone) else out
        self.outs[model] = (data, out, out._version)

    def end(self, device: torch.device) -> None:
        missing = [i for i in range(self.num_models) if i not in self.outs]
        if missing:
            raise ValueError(f"layer {self.name!r} did not run in the forward pass of model {missing[0]}")
        changed = any(orig._version != version for _, orig, version in self.outs.values())
        if changed and not (self.first or self.clone):
            raise RuntimeError(
                f"the output of layer {self.name!r} was modified in place during the forward pass "
                "(only from this batch on); capture a layer whose output is not modified in place"
            )
        self.clone = self.clone or changed
        self.first = False
        outs = [self.outs[i][0] for i in range(self.num_models)]
        self.outs = {}
        space = self.space
        if space.sizes is None:
            space.setup([int(o.shape[1]) for o in outs], outs, device)
        assert space.sizes is not None
        for i, (o, size) in enumerate(zip(outs, space.sizes)):
            if o.shape[1] != size:
                raise ValueError(
                    f"layer {self.name!r} of model {i} has {o.shape[1]} channels but space {space.name!r} "
                    f"has {size} (from layer {space.layers[0]!r}); layers of one space must have the same channels"
                )
            if o.shape[0] != outs[0].shape[0] or o[:1].numel() // size != outs[0][:1].numel() // space.sizes[0]:
                raise ValueError(
                    f"layer {self.name!r} gives outputs of shape {tuple(o.shape)} in model {i} but "
                    f"{tuple(outs[0].shape)} in model 0; the models must produce the same number of samples"
                )
        space.add(outs, self.scratch)
        if device.type == "cpu":  # free without a device sync: name the exact layer at once
            # the running Gram's diagonal, or (just flushed into the sums) the flags the flush set
            space.check_finite(torch.diagonal(space.g) if space.unflushed else None, layer=self.name)  # type: ignore[arg-type]


class StatisticsCollector:
    """Streaming joint statistics of ``models`` over batches you feed it (what :func:`collect_statistics` runs).

    >>> collector = StatisticsCollector(models, {"stream": ["layer1.0.relu2", "layer1.1.relu2"]})
    >>> with collector.attached():
    ...     for x in batches:
    ...         collector.update(x)
    >>> stats = collector.result()   # {space: JointStats}

    ``attached()`` puts the models in eval mode and adds hooks; both are undone on exit.
    ``same_architecture=False`` accepts models that differ elsewhere (e.g. in width) as long as every
    model has the layers and they compute in one dtype. ``reference=r`` collects cross-only statistics
    (:class:`JointStats`): the covariances of model ``r`` with each other model and every channel's
    variance, all that matching to a reference needs, in a fraction of the memory and time.
    ``memory_budget``: bytes of activations held per forward pass (default: see :meth:`micro_batch_size`).
    ``also``: per model, ``{module name: fn(output)}``, called with the module's output in every forward
    pass the statistics make (each sample once; never in the one-sample pass that sizes micro-batches):
    another sum over the same data, such as REPAIR's channel moments, without a pass of its own.
    ``start``: per space, full statistics of other samples to go on from; they are consumed (their sums
    become the collector's, so a wide space holds one Gram matrix). The result covers both sample sets.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        layers: Mapping[str, Sequence[str]] | Sequence[str] | str,
        *,
        same_architecture: bool = True,
        reference: int | None = None,
        memory_budget: int | None = None,
        also: Sequence[Mapping[str, Callable[[Any], None]]] | None = None,
        start: Mapping[str, JointStats] | None = None,
    ) -> None:
        models = list(models)
        if not models:
            raise ValueError("no models given")
        if also is not None and len(also) != len(models):
            raise ValueError(f"also needs one mapping per model ({len(models)}), got {len(also)}")
        for i, fns in enumerate(also or ()):
            missing = sorted(set(fns) - {name for name, _ in models[i].named_modules()})
            if missing:
                raise ValueError(f"also: model {i} has no module {missing[0]!r}")
        if reference is not None:
            if isinstance(reference, bool) or not isinstance(reference, int) or not 0 <= reference < len(models):
                raise ValueError(f"reference must be a model index in [0, {len(models)}) or None, got {reference!r}")
            if len(models) < 2:
                raise ValueError("cross-only statistics (reference=...) need at least 2 models")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise TypeError(f"model {i} is a {type(m).__name__}, not an nn.Module")
        devices = [model_device(m) for m in models]
        for i, dev in enumerate(devices[1:], start=1):
            if dev != devices[0]:
                raise ValueError(
                    f"models are on different devices: model 0 on {devices[0]}, model {i} on {dev}; "
                    "move them to one device first (model.to(device))"
                )
        if same_architecture:
            check_same_architecture(models)
        else:
            dtypes = [model_dtype(m) for m in models]
            for i, dtype in enumerate(dtypes[1:], start=1):
                if dtype != dtypes[0]:
                    raise ValueError(
                        f"models compute in different dtypes: model 0 in {dtypes[0]}, model {i} in {dtype}; "
                        "convert them to one dtype first, e.g. model.float()"
                    )
        self.models = models
        self.device = devices[0]
        self.spaces_layers = _normalise_layers(layers)
        for names in self.spaces_layers.values():
            for model in models if not same_architecture else models[:1]:
                resolve_layers(model, names)
        k = len(models)
        start = dict(start or {})
        unknown = sorted(set(start) - set(self.spaces_layers))
        if unknown:
            raise ValueError(f"start: no space {unknown[0]!r} among {sorted(self.spaces_layers)}")
        self.spaces = {name: SpaceSums(name, names, k, reference, start.get(name), keep_samples=True)
                       for name, names in self.spaces_layers.items()}
        self.scratch = Scratch()
        self.points = [
            _Point(layer, self.spaces[s], k, self.scratch) for s, names in self.spaces_layers.items() for layer in names
        ]
        self.also = [dict(fns) for fns in also] if also is not None else [{} for _ in models]
        self.batches = 0
        self._active: int | None = None
        self._probing = False
        self.memory_budget = memory_budget
        self.micro_batch: int | None = None  # samples per forward pass, set on the first batch
        self.peak_held_bytes = 0  # the most activation bytes held at once (what micro-batches bound)

    def _callback(self, point: _Point, model: int) -> Any:
        def fn(_module: nn.Module, _args: Any, output: Any) -> None:
            if self._active == model:
                point.hook(model, output)

        return fn

    def _also_callback(self, model: int, fn: Callable[[Any], None]) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if self._active == model and not self._probing:
                fn(output)

        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator[StatisticsCollector]:
        """Eval mode, hooks and full float32 matmul precision for the block (all restored afterwards).

        The precision is PyTorch's default; it is pinned here (once, not per batch) so that a
        process that enabled TF32/bf16 shortcuts does not get them in the Gram products.
        """
        precision = torch.get_float32_matmul_precision()
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(eval_mode(*self.models))
                for i, model in enumerate(self.models):
                    stack.enter_context(forward_hooks(model, {p.name: self._callback(p, i) for p in self.points}))
                    modules = dict(model.named_modules())
                    for name, fn in self.also[i].items():  # every call of the module, as a plain hook sees it
                        stack.callback(modules[name].register_forward_hook(self._also_callback(i, fn)).remove)
                torch.set_float32_matmul_precision("highest")
                yield self
        finally:
            self._active = None
            torch.set_float32_matmul_precision(precision)

    @torch.no_grad()
    def update(self, inputs: torch.Tensor) -> None:
        """Run every model on ``inputs`` (moved to the models' device and dtype) and add the activations to the sums.

        The statistics are sums, so a batch is taken in micro-batches when holding every capture point's
        activations of every model for the whole batch would exceed the memory budget
        (:meth:`micro_batch_size`): memory then stays flat in the batch size. Runs outside
        ``torch.inference_mode`` (its tensors have no version counter, which the in-place check needs),
        so a caller inside an inference-mode block gets the same statistics.
        """
        x = to_model(inputs, self.models[0], non_blocking=True)
        if self.micro_batch is None:
            self.micro_batch = self.micro_batch_size(x)
        for part in x.split(self.micro_batch) if x.shape[0] > self.micro_batch else (x,):
            self._update_whole(part)

    def micro_batch_size(self, x: torch.Tensor) -> int:
        """Samples per forward pass: as many as keep the held activations within ``memory_budget`` bytes.

        One sample through every model measures what a sample holds (every capture point of every
        model) and the largest single activation. The default budget is twice that activation for the
        whole batch (about what a plain forward pass of one model holds at its widest layer), and at
        least ``MIN_MICRO_BATCH_BYTES`` for the device: a merge then holds about one more forward's worth.
        """
        held, widest = self._bytes_per_sample(x[:1])
        budget = self.memory_budget
        if budget is None:
            floor = MIN_MICRO_BATCH_BYTES["cpu" if x.device.type == "cpu" else "other"]
            budget = max(2 * widest * int(x.shape[0]), floor)
        return max(1, int(budget // max(held, 1)))

    def _bytes_per_sample(self, sample: torch.Tensor) -> tuple[int, int]:
        """``(bytes every capture point of every model holds for one sample, the largest single activation's)``."""
        self._probing = True
        try:
            self._run_models(sample)
        finally:
            self._probing = False
        sizes = [o[1].numel() * o[1].element_size() for p in self.points for o in p.outs.values()]
        for p in self.points:
            p.begin()  # measured only: nothing is added
        return sum(sizes), max(sizes, default=0)

    def _run_models(self, x: torch.Tensor) -> None:
        """Every model on ``x``, its capture points' outputs held by the points (see :class:`_Point`)."""
        for p in self.points:
            p.begin()
        try:
            with torch.inference_mode(False):
                for i, model in enumerate(self.models):
                    self._active = i
                    model(x)
        finally:
            self._active = None

    def _update_whole(self, x: torch.Tensor) -> None:
        self._run_models(x)
        held = sum(o[0].numel() * o[0].element_size() for p in self.points for o in p.outs.values())
        self.peak_held_bytes = max(self.peak_held_bytes, held)
        for p in self.points:
            p.end(self.device)
        self.batches += 1
        if self.device.type == "cpu" or self.batches % 16 == 0:
            self.check_finite()

    def check_finite(self) -> None:
        """Raise ``ValueError`` naming the space, layers and model if a non-finite activation was seen."""
        for space in self.spaces.values():
            if space.bad is not None:
                space.check_finite()

    def result(self, all_reduce: bool | None = None, *, release: bool = False) -> dict[str, JointStats]:
        """The statistics so far, per space (all-reduced over ranks when ``torch.distributed`` is initialised).

        ``release=True`` hands the collector's float64 sums to the result without a copy (half the
        peak memory of wide spaces); the collector cannot be updated afterwards.
        """
        if all_reduce is None:
            all_reduce = distributed.active()
        empty = [name for name, s in self.spaces.items() if s.count == 0]
        if empty:
            raise ValueError("no samples were collected (the data gave no batches)")
        for space in self.spaces.values():
            space.flush()
        self.check_finite()
        out = {name: space.result(release) for name, space in self.spaces.items()}
        if all_reduce:
            for stats in out.values():
                stats.all_reduce()
        return out

    def nbytes(self) -> dict[str, int]:
        """Bytes held: ``sums`` (the running sums; independent of the amount of data) and ``batch`` (the
        shared scratch matrix for one capture point's batch).

        Besides these, only the current batch's outputs are referenced until all models have run.
        """
        sums = sum(s.nbytes() for s in self.spaces.values())
        return {"sums": sums, "batch": self.scratch.nbytes()}


def _limited(data: Iterable[Any], max_batches: int | None, max_samples: int | None) -> Iterator[torch.Tensor]:
    seen = 0
    for b, batch in enumerate(data):
        if max_batches is not None and b >= max_batches:
            return
        x = batch_inputs(batch)
        if max_samples is not None:
            if seen >= max_samples:
                return
            x = x[: max_samples - seen]
        seen += x.shape[0]
        yield x


def collect_statistics(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    layers: Mapping[str, Sequence[str]] | Sequence[str],
    max_batches: int | None = None,
    progress: bool = True,
    *,
    max_samples: int | None = None,
    warn: bool = True,
    same_architecture: bool = True,
    reference: int | None = None,
    memory_budget: int | None = None,
    also: Sequence[Mapping[str, Callable[[Any], None]]] | None = None,
    start: Mapping[str, JointStats] | None = None,
) -> dict[str, JointStats]:
    """Joint activation statistics of ``models`` on the same inputs, per space.

    ``layers`` maps a space name to the module names whose outputs are samples of that space (their
    samples are pooled, e.g. a ResNet residual stream), or is a list of module names (each its own
    space). Every batch of ``data`` (a tensor, or a tuple/list whose first item is the inputs) runs
    through every model, in eval mode (restored afterwards), on the first model's device. At most
    ``max_batches`` batches / ``max_samples`` inputs are used. Returns ``{space: JointStats}``.
    Input models are not changed. With fewer samples than channels (over all models) a
    ``RuntimeWarning`` says the statistics are rank-deficient, and one says so when every channel of a
    space is constant (:func:`warn_if_constant`; ``warn=False`` silences both).
    One pass over ``data``: a generator works. ``same_architecture=False`` and ``reference`` (cross-only
    statistics), ``memory_budget`` (micro-batches), ``also`` (other modules' outputs for the caller's own
    sums, from the same forward passes) and ``start`` (statistics to go on from, consumed): see
    :class:`StatisticsCollector`.
    """
    max_batches = check_max_batches(max_batches)
    max_samples = check_max_batches(max_samples, "max_samples")
    check_data(data)
    collector = StatisticsCollector(models, layers, same_architecture=same_architecture, reference=reference,
                                    memory_budget=memory_budget, also=also, start=start)
    total = batch_count(data, max_batches)
    batches: Iterable[torch.Tensor] = _limited(data, max_batches, max_samples)
    if progress:
        batches = progress_bar(batches, total=total, desc="activation statistics", leave=False)
    with collector.attached():
        for x in batches:
            collector.update(x)
    empty_ranks = distributed.sum_over_ranks([collector.batches == 0])[0]  # every rank raises alike
    if empty_ranks:
        where = f" on {int(empty_ranks)} rank(s)" if distributed.active() else ""
        raise ValueError(f"the data gave no batches{where}; pass a non-empty DataLoader or iterable of batches")
    stats = collector.result(release=True)
    if warn:
        for name, s in stats.items():
            s.warn_if_rank_deficient(space=name)
        warn_if_constant(stats)
    return stats


def warn_if_constant(stats: Mapping[str, JointStats], what: str = "the data") -> list[str]:
    """Warn (``RuntimeWarning``) naming the spaces where every channel of every model is constant; returns them.

    Statistics of blank images (or of one input repeated) carry no information: correlations are all 0,
    so activation matching, CCA and ZipIt! align the channels arbitrarily, and a merge built on them is
    worse than plain averaging without any error. ``what`` names the data in the message.
    """
    constant = [name for name, s in stats.items() if s.constant()]
    if not constant:
        return []
    if len(constant) == len(stats):
        where = f"in every space ({len(stats)})"
    else:
        where = f"in space(s) {', '.join(map(repr, constant[:5]))}{' ...' if len(constant) > 5 else ''}"
    warnings.warn(
        f"every channel of every model is constant on {what} {where}: the statistics carry no information, so "
        "an alignment on them (permute, cca, zipit) is arbitrary. Pass inputs that vary, e.g. real training "
        "batches (blank or all-equal images, or a transform that erased them, give this)",
        RuntimeWarning,
        stacklevel=2,
    )
    return constant


def _layer_spec(layer: str | Sequence[str]) -> dict[str, list[str]]:
    names = [layer] if isinstance(layer, str) else list(layer)
    if not names:
        raise ValueError("no layer given")
    return {names[0]: names}


def correlation_matrix(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    layer: str | Sequence[str],
    max_batches: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Pearson correlations between ``model_a``'s and ``model_b``'s channels at ``layer`` (CPU, ``n_a x n_b``).

    ``layer`` is a module name, or a list of names whose samples are pooled. Constant channels give 0.
    The models may differ in width (or elsewhere): only the layer must exist in both.
    """
    stats = collect_statistics([model_a, model_b], data, _layer_spec(layer), max_batches, progress,
                               same_architecture=False, reference=0)
    return next(iter(stats.values())).corr(0, 1).cpu()


def canonical_correlations(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    layer: str | Sequence[str],
    ridge: float = 1e-4,
    max_batches: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Canonical correlations between two models' activations at ``layer`` (CPU, descending, in [0, 1]).

    ``ridge * trace(S)/n * I`` is added to each model's covariance (scale-free regularisation).
    The models may differ in width (or elsewhere): only the layer must exist in both.
    """
    stats = collect_statistics([model_a, model_b], data, _layer_spec(layer), max_batches, progress, warn=False,
                               same_architecture=False)
    s = next(iter(stats.values()))
    s.warn_if_rank_deficient(ridge, space=next(iter(stats)))
    return canonical_correlations_from_cov(s.cov(0), s.cov(1), s.cov(0, 1), ridge=ridge).cpu()
