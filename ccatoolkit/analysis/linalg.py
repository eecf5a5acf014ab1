"""The linear algebra of CCA, shared by the analysis (canonical correlations) and CCA Merge.

One implementation, so ``cc.canonical_correlations`` and ``merge(method="cca")`` agree on every
layer, rank-deficient ones included. Everything is float64 torch on the covariances' device.

* Regularisation is scale-free: ``S + ridge * trace(S)/n * I``, so one ``ridge`` serves every
  layer and width.
* Powers of a symmetric PSD matrix come from one eigendecomposition. Negative powers are
  pseudo-inverses: eigenvalues at or below ``EIG_RTOL`` times the largest are treated as zero and
  their directions dropped, so dead neurons and too few samples give finite results instead of
  enormous inverse square roots. Positive powers clamp eigenvalues at zero.
* The canonical correlations are the singular values of the whitened cross-covariance
  ``K = S_aa^{-1/2} S_ab S_bb^{-1/2}``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "EIG_RTOL",
    "as_float64",
    "symmetrize",
    "regularize",
    "sym_powers",
    "RidgePath",
    "DiagonalPlusLowRank",
    "as_dense",
    "condition_number",
    "inverse_sqrt",
    "whitened_cross_covariance",
    "canonical_correlations_from_cov",
    "polar_factor",
]

#: Eigenvalues at or below this fraction of the largest are treated as zero by negative powers.
EIG_RTOL = 1e-10


def as_float64(S: Any, device: torch.device | None = None) -> torch.Tensor:
    """A float64 tensor from a tensor or array (kept on its device unless ``device`` is given)."""
    t = S.detach() if isinstance(S, torch.Tensor) else torch.as_tensor(np.asarray(S, dtype=np.float64))
    return t.to(device=device if device is not None else t.device, dtype=torch.float64)


def symmetrize(S: Any) -> torch.Tensor:
    """``(S + S^T) / 2`` in float64, checking that ``S`` is square and finite."""
    S = as_float64(S)
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(S.shape)}")
    if not bool(torch.isfinite(S).all()):
        raise ValueError("the covariance matrix has non-finite entries (NaN or Inf)")
    return 0.5 * (S + S.T)


def regularize(S: Any, ridge: float) -> torch.Tensor:
    """``S + ridge * trace(S)/n * I`` (the identity when ``S`` is all zero, so a dead layer stays finite)."""
    if not np.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    S = symmetrize(S)
    n = S.shape[0]
    scale = float(torch.trace(S)) / max(n, 1)
    eye = torch.eye(n, dtype=torch.float64, device=S.device)
    if not np.isfinite(scale) or scale <= 0:
        return eye
    return S + ridge * scale * eye if ridge else S


def _scaled_eigenvalues(vals: torch.Tensor, p: float, rtol: float) -> torch.Tensor:
    """``vals**p`` with the pseudo-inverse floor for negative ``p`` (see the module doc)."""
    top = float(vals.max()) if vals.numel() else 0.0
    if p >= 0:
        return vals.clamp_min(0.0) ** p
    keep = vals > rtol * top if top > 0 else torch.zeros_like(vals, dtype=torch.bool)
    safe = torch.where(keep, vals, torch.ones_like(vals))
    return torch.where(keep, safe**p, torch.zeros_like(vals))


def sym_powers(S: torch.Tensor, *powers: float, rtol: float = EIG_RTOL) -> list[torch.Tensor]:
    """``S**p`` of a symmetric PSD matrix for each ``p``, from one eigendecomposition (see the module doc)."""
    vals, vecs = torch.linalg.eigh(symmetrize(S))
    return [(vecs * _scaled_eigenvalues(vals, p, rtol)) @ vecs.T for p in powers]


class RidgePath:
    """One eigendecomposition of a covariance ``S`` that serves every ridge.

    ``S + ridge * trace(S)/n * I`` has ``S``'s eigenvectors and eigenvalues shifted by
    ``ridge * trace(S)/n``, so trying several ridges (``merge(ridge="auto")``) costs one ``eigh``
    instead of one per ridge: on a 4096-wide layer that is most of the time. :meth:`values` gives
    the regularised eigenvalues, :meth:`powers` the matrices :func:`sym_powers` would.

    ``rank_bound``: an upper bound on ``S``'s rank, such as the number of samples it was estimated
    from. When it is at most half the width (a 4096-wide layer seen on a few hundred images), only the
    eigenpairs that can be nonzero are computed (:func:`_range_eigenpairs`): ``vals`` and ``vecs``
    then hold ``rank_bound`` of them (ascending, as ``eigh`` gives them) and every other eigenvalue is
    zero (``partial``). That costs products of ``n x n`` by ``n x k`` instead of an ``n x n`` ``eigh``
    (docs/results.md, "Wide models on a CPU").
    """

    def __init__(self, S: Any, rank_bound: int | None = None) -> None:
        S = symmetrize(S)
        n = S.shape[0]
        partial = rank_bound is not None and 0 < 2 * int(rank_bound) <= n
        vals, vecs = _range_eigenpairs(S, int(rank_bound)) if partial else torch.linalg.eigh(S)  # type: ignore[arg-type]
        self._set(float(torch.trace(S)) / max(n, 1), vals, vecs, partial)

    def _set(self, scale: float, vals: torch.Tensor, vecs: torch.Tensor, partial: bool) -> None:
        """The path's state: ``trace(S)/n``, the computed eigenpairs (ascending) and whether they are all of them."""
        self.size, self.scale, self.vals, self.vecs, self.partial = vecs.shape[0], scale, vals, vecs, partial
        self.degenerate = not math.isfinite(scale) or scale <= 0  # an all-zero (dead) layer

    @classmethod
    def of_samples(cls, centred: torch.Tensor) -> RidgePath:
        """The path of ``S = X X^T / (m - 1)`` for ``m`` centred samples ``X`` (``n x m``, at most half as many as
        channels) from the thin SVD of ``X``, without the ``n x n`` matrix: its ``m`` eigenpairs that can be
        nonzero (``partial``)."""
        n, m = centred.shape
        if not 0 < 2 * m <= n:
            raise ValueError(f"of_samples needs at most half as many samples as channels, got {m} of {n}")
        X = centred.to(torch.float64)
        U, sv, _ = torch.linalg.svd(X, full_matrices=False)
        path = cls.__new__(cls)
        path._set(float((X * X).sum()) / max(m - 1, 1) / n, (sv * sv / max(m - 1, 1)).flip(0), U.flip(1), True)
        return path

    def rank(self, rtol: float = EIG_RTOL) -> int:
        """How many eigenvalues of ``S`` lie above ``rtol`` times the largest (what a pseudo-inverse keeps)."""
        top = float(self.vals.max()) if self.vals.numel() else 0.0
        return int((self.vals > rtol * top).sum()) if top > 0 else 0

    def _check(self, ridge: float) -> None:
        if not np.isfinite(ridge) or ridge < 0:
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")

    def values(self, ridge: float) -> torch.Tensor:
        """Eigenvalues of ``regularize(S, ridge)`` (all ones for an all-zero ``S``, as :func:`regularize`);
        the computed ones only when ``partial``."""
        self._check(ridge)
        if self.degenerate:
            return torch.ones_like(self.vals)
        return self.vals + ridge * self.scale if ridge else self.vals

    def scaled(self, ridge: float, p: float, rtol: float = EIG_RTOL) -> torch.Tensor:
        """The eigenvalues of ``regularize(S, ridge)**p`` (pseudo-inverse floor for ``p < 0``)."""
        return _scaled_eigenvalues(self.values(ridge), p, rtol)

    def scaled_null(self, ridge: float, p: float, rtol: float = EIG_RTOL) -> float:
        """What :meth:`scaled` gives a zero eigenvalue of ``S``: the regularised null space's ``value**p``."""
        self._check(ridge)
        if self.degenerate:
            return 1.0
        value = ridge * self.scale
        top = max(float(self.values(ridge).max()) if self.vals.numel() else 0.0, value)
        if p >= 0:
            return value**p
        return value**p if top > 0 and value > rtol * top else 0.0

    def powers(self, ridge: float, *powers: float, rtol: float = EIG_RTOL) -> list[torch.Tensor]:
        """``regularize(S, ridge)**p`` for each ``p``, without a new decomposition."""
        result = []
        for p in powers:
            matrix = (self.vecs * self.scaled(ridge, p, rtol)) @ self.vecs.T
            if self.partial:  # the null space's value times the projection onto it
                null = self.scaled_null(ridge, p, rtol)
                matrix += null * (torch.eye(self.size, dtype=matrix.dtype, device=matrix.device)
                                  - self.vecs @ self.vecs.T)
            result.append(matrix)
        return result


def _range_eigenpairs(S: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` eigenpairs of the symmetric PSD ``S`` that span its range when its rank is at most ``k``
    (ascending), by a randomized range finder (Halko, Martinsson and Tropp 2011) that is exact here.

    ``Y = S G`` for a Gaussian ``n x k`` matrix ``G`` spans ``S``'s range when ``rank(S) <= k`` (almost surely:
    ``V^T G`` is invertible), so with ``Q`` an orthonormal basis of ``Y`` the eigenpairs of ``Q^T S Q`` are
    ``S``'s nonzero ones. Directions whose eigenvalue is a small fraction of the largest still reach ``Y`` in
    proportion to it, which float64 resolves far below the pseudo-inverse floor ``EIG_RTOL``. The matrix
    ``G`` comes from a fixed seed, so a merge is repeatable.
    """
    n = S.shape[0]
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(n, k, generator=gen, dtype=torch.float64).to(S.device)
    Q = torch.linalg.qr(S @ G).Q
    vals, W = torch.linalg.eigh(symmetrize(Q.T @ (S @ Q)))
    return vals, Q @ W


class DiagonalPlusLowRank:
    """The ``n x n`` matrix ``diag(diagonal) + left @ right.T`` kept as its factors (``left``, ``right``:
    ``n x k``, float64).

    CCA Merge's map for a space seen on fewer samples than it has channels is the identity (scaled) outside
    the span of the two models' live subspaces (:class:`~ccatoolkit.merging.align.cca.CCAProblem`), so it is
    this with ``k`` at most twice the samples: a 4096-wide map on 384 samples holds 25 MB instead of 134 MB,
    and maps VGG's 4096 x 25088 classifier in ``2k/4096`` of a dense product's arithmetic. :meth:`dense`
    gives the matrix; a merge's consumers (its weight products, REPAIR's targets) use the factors.
    """

    def __init__(self, diagonal: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        if left.shape != right.shape or left.dim() != 2 or diagonal.shape != (left.shape[0],):
            raise ValueError(f"diagonal {tuple(diagonal.shape)}, left {tuple(left.shape)} and right "
                             f"{tuple(right.shape)} do not make an n x n matrix")
        self.diagonal, self.left, self.right = diagonal, left, right

    @property
    def shape(self) -> torch.Size:
        n = self.diagonal.shape[0]
        return torch.Size((n, n))

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype

    @property
    def device(self) -> torch.device:
        return self.left.device

    @property
    def T(self) -> DiagonalPlusLowRank:  # noqa: N802 (as torch.Tensor.T)
        return DiagonalPlusLowRank(self.diagonal, self.right, self.left)

    def to(self, *args: Any, **kwargs: Any) -> DiagonalPlusLowRank:
        """The factors moved or cast as ``torch.Tensor.to`` does."""
        return DiagonalPlusLowRank(*(t.to(*args, **kwargs) for t in (self.diagonal, self.left, self.right)))

    def dense(self) -> torch.Tensor:
        return torch.diag(self.diagonal).addmm_(self.left, self.right.T)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        """``self @ x`` for a vector or a matrix ``x`` of ``n`` rows, in ``x``'s dtype (a new tensor)."""
        if x.dim() == 1:
            return self.multiply_in_place(x[:, None].clone())[:, 0]
        return self.multiply_in_place(x.clone())

    def multiply_in_place(self, x: torch.Tensor) -> torch.Tensor:
        """``self @ x`` written into the matrix ``x`` (returned), with one ``k x m`` temporary: a large product
        without a second tensor of its size."""
        d, left, right = (t.to(x.dtype) for t in (self.diagonal, self.left, self.right))
        low = right.T @ x
        return x.mul_(d[:, None]).addmm_(left, low)

    def diagonal_of_congruence(self, G: torch.Tensor) -> torch.Tensor:
        """``diag(M G M^T)`` for a symmetric ``G`` without forming ``M``: a mapped channel's variance
        (``d_i^2 G_ii + 2 d_i (G R)_i . L_i + L_i . (R^T G R) L_i``)."""
        d, L, R = self.diagonal, self.left, self.right
        GR = G @ R
        return d * d * torch.diagonal(G) + 2 * d * (GR * L).sum(1) + ((L @ (R.T @ GR)) * L).sum(1)


def as_dense(matrix: Any) -> torch.Tensor:
    """A map as a dense tensor (a :class:`DiagonalPlusLowRank` multiplied out)."""
    return matrix.dense() if isinstance(matrix, DiagonalPlusLowRank) else torch.as_tensor(matrix)


def condition_number(S: Any) -> float:
    """Largest over smallest eigenvalue of a symmetric PSD matrix (``inf`` when singular, 1 when empty).

    How much a (pseudo-)inverse of ``S`` amplifies noise: what a ridge is there to bound.
    """
    vals = torch.linalg.eigvalsh(symmetrize(S))
    if vals.numel() == 0:
        return 1.0
    top, low = float(vals[-1]), float(vals[0])
    if top <= 0:
        return 1.0
    return top / low if low > 0 else math.inf


def inverse_sqrt(S: Any, ridge: float = 0.0, rtol: float = EIG_RTOL) -> torch.Tensor:
    """``(S + ridge * trace(S)/n * I)^(-1/2)`` of a symmetric PSD matrix (a pseudo-inverse below ``rtol``)."""
    return sym_powers(regularize(S, ridge), -0.5, rtol=rtol)[0]


def whitened_cross_covariance(
    S_aa: Any, S_bb: Any, S_ab: Any, ridge: float = 0.0
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``(K, [S_aa^{1/2}, S_aa^{-1/2}], [S_bb^{1/2}, S_bb^{-1/2}])`` with ``K = S_aa^{-1/2} S_ab S_bb^{-1/2}``.

    Both covariances are regularised with ``ridge`` first; their square roots come along because
    the CCA Merge transform needs them too.
    """
    S_aa_r, S_bb_r = regularize(S_aa, ridge), regularize(S_bb, ridge)
    S_ab = as_float64(S_ab, S_aa_r.device)
    if tuple(S_ab.shape) != (S_aa_r.shape[0], S_bb_r.shape[0]):
        raise ValueError(
            f"shape mismatch: S_aa {tuple(S_aa_r.shape)}, S_bb {tuple(S_bb_r.shape)}, S_ab {tuple(S_ab.shape)}"
        )
    roots_a = sym_powers(S_aa_r, 0.5, -0.5)
    roots_b = sym_powers(S_bb_r.to(S_aa_r.device), 0.5, -0.5)
    return roots_a[1] @ S_ab @ roots_b[1], roots_a, roots_b


def canonical_correlations_from_cov(
    s_aa: Any,
    s_bb: Any,
    s_ab: Any,
    ridge: float = 0.0,
    return_vectors: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical correlations from covariance blocks (descending, in [0, 1], ``min(n_a, n_b)`` of them).

    With ``return_vectors=True`` also returns the canonical directions ``A`` (``n_a x k``) and ``B``
    (``n_b x k``): ``A.T @ S_aa @ A = I`` and ``A.T @ S_ab @ B = diag(rho)`` on the non-degenerate part.
    """
    K, (_, w_a), (_, w_b) = whitened_cross_covariance(s_aa, s_bb, s_ab, ridge)
    if not return_vectors:
        return torch.linalg.svdvals(K).clamp(0.0, 1.0)
    u, rho, vh = torch.linalg.svd(K, full_matrices=False)
    return rho.clamp(0.0, 1.0), w_a @ u, w_b @ vh.T


#: ``polar_factor`` takes the eigendecomposition route when the smallest eigenvalue of ``A^T A`` is at least
#: this fraction of the largest (``A``'s condition number at most 1e4); an SVD otherwise.
POLAR_EIGH_RTOL = 1e-8


def polar_factor(A: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``U V^T`` of ``A = U S V^T`` (unique even when singular values tie).

    A well-conditioned square ``A`` (see :data:`POLAR_EIGH_RTOL`) takes ``A V diag(l)^(-1/2) V^T`` from the
    eigendecomposition ``A^T A = V diag(l) V^T``, then one Newton-Schulz step ``R (3 I - R^T R) / 2``, which
    makes it orthogonal to rounding (its error is squared): an ``eigh`` and five products cost about two
    thirds of an SVD on a CPU (a 2048-wide space: 1.3 s against 2.0 s on 2 cores). Others take the SVD.
    """
    if A.dim() == 2 and A.shape[0] == A.shape[1] and A.shape[0] > 0:
        vals, V = torch.linalg.eigh(A.T @ A)
        top = float(vals[-1])
        if top > 0 and float(vals[0]) >= POLAR_EIGH_RTOL * top:
            R = (A @ (V * vals.rsqrt())) @ V.T
            return 1.5 * R - 0.5 * (R @ (R.T @ R))
    U, _s, Vh = torch.linalg.svd(A)
    return U @ Vh


def top_eigenpairs(S: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenvalues of the symmetric ``S`` (descending) and their eigenvectors (columns).

    On the CPU only those ``k`` are computed (LAPACK's MRRR, ``scipy.linalg.eigh`` with
    ``subset_by_index``): for multi-view CCA's ``N n x N n`` block matrix, of which ``n`` are needed,
    it takes half the time of the full decomposition. Its BLAS threads are held to torch's count
    when ``threadpoolctl`` is installed, so it does not oversubscribe a shared machine. Other devices
    use ``torch.linalg.eigh``.
    """
    size = S.shape[0]
    if not 0 < k <= size:
        raise ValueError(f"k must lie in [1, {size}], got {k}")
    if S.device.type != "cpu" or k == size:
        vals, vecs = torch.linalg.eigh(S)
        return vals.flip(0)[:k], vecs.flip(1)[:, :k]
    import scipy.linalg

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it scipy's BLAS picks its own thread count
        threadpool_limits = None
    args = dict(subset_by_index=[size - k, size - 1], driver="evr", check_finite=False)
    if threadpool_limits is None:
        vals, vecs = scipy.linalg.eigh(S.numpy(), **args)
    else:
        with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
            vals, vecs = scipy.linalg.eigh(S.numpy(), **args)
    return torch.from_numpy(vals[::-1].copy()), torch.from_numpy(vecs[:, ::-1].copy())

