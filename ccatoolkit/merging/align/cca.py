"""CCA alignment of activation spaces (CCA Merge, Horoi et al. 2024) and a multi-view (MAXVAR) variant.

Everything here works on covariance matrices (float64), so it is cheap and testable without
models. Conventions: features are column vectors; a transform ``out`` maps a model's features ``z``
to ``out @ z`` in the target space, and ``inp`` is applied on the input side of the next layer
(``inp = inverse(out)``).

The linear algebra (scale-free ridge ``S + ridge * trace(S)/n * I``, matrix powers with a
pseudo-inverse floor, the whitened cross-covariance) is :mod:`ccatoolkit.analysis.linalg`, the
same code that gives ``cc.canonical_correlations``, so rank-deficient covariances (dead ReLUs)
never give NaNs or crashes and the analysis and the merge agree.

Constant channels (dead ReLUs on the data) have no correlation with anything, so CCA leaves their
correspondence arbitrary (any rotation of the null spaces); mapping them anyway would mix a dead
neuron's (negative-bias) weights into live ones, or wake a dead one up. With ``drop_constant=True``
(the default) what maps to or from a constant channel is zeroed: a model's dead neuron contributes
nothing, and the reference's dead neuron keeps only the reference's own (averaged) weights.

The decompositions and products run in torch (float64), which respects ``torch.set_num_threads``;
numpy's BLAS oversubscribes shared machines badly for these small matrices. Inputs may be numpy
arrays or tensors; results are numpy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ccatoolkit.analysis.linalg import (
    DiagonalPlusLowRank,
    RidgePath,
    as_float64,
    canonical_correlations_from_cov,
    polar_factor,
    symmetrize,
    top_eigenpairs,
)

__all__ = [
    "CCAProblem",
    "cca_transform",
    "constant_channels",
    "cca_directions",
    "multiview_cca_transforms",
]

_DEAD_RTOL = 1e-10  # a channel whose variance is below this fraction of the largest is constant


def constant_channels(S: torch.Tensor) -> torch.Tensor:
    """Mask of channels with (numerically) zero variance: dead ReLUs on the data (``S``: a covariance, or
    the variances alone)."""
    var = (torch.diagonal(S) if S.dim() == 2 else S).clamp_min(0.0)
    top = float(var.max()) if var.numel() else 0.0
    return var <= _DEAD_RTOL * top if top > 0 else torch.ones_like(var, dtype=torch.bool)


def _drop_constant(
    out: torch.Tensor, inp: torch.Tensor, dead_target: torch.Tensor, dead_source: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero what maps to or from constant channels (their correspondence is arbitrary, see module doc)."""
    out, inp = out.clone(), inp.clone()
    out[:, dead_source] = 0.0
    out[dead_target, :] = 0.0
    inp[dead_source, :] = 0.0
    inp[:, dead_target] = 0.0
    return out, inp


def cca_directions(
    S_aa: np.ndarray, S_bb: np.ndarray, S_ab: np.ndarray, ridge: float = 1e-2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Regularised CCA: ``(P_a, P_b, rho)`` with canonical variates ``P_a.T z_a`` and ``P_b.T z_b``.

    ``K = S_aa^{-1/2} S_ab S_bb^{-1/2} = U diag(rho) V^T``, ``P_a = S_aa^{-1/2} U``, ``P_b = S_bb^{-1/2} V``.
    """
    rho, P_a, P_b = canonical_correlations_from_cov(S_aa, S_bb, S_ab, ridge=ridge, return_vectors=True)
    return P_a.cpu().numpy(), P_b.cpu().numpy(), rho.cpu().numpy()


class CCAProblem:
    """CCA Merge between two models' features at one layer, ready for any ridge.

    Decomposes ``S_aa = V_a diag(l_a) V_a^T`` and ``S_bb`` once (:class:`~ccatoolkit.analysis.linalg.RidgePath`)
    and rotates the cross-covariance into the eigenbases, ``M = V_a^T S_ab V_b``. A ridge then only
    shifts the eigenvalues: ``K = V_a diag(f_a) M diag(f_b) V_b^T`` with ``f = (l + ridge * tr/n)^(-1/2)``,
    so its polar factor is ``V_a polar(diag(f_a) M diag(f_b)) V_b^T`` and each ridge costs one SVD and
    four products instead of two eigendecompositions, an SVD and eight products (a ridge grid on a
    4096-wide layer: minutes less on a CPU).

    Fewer samples than channels (a 4096-wide classifier layer on a few hundred images) leave each
    covariance with a null space: eigenvalues at or below ``EIG_RTOL`` times the largest, the floor the
    pseudo-inverse uses (:mod:`~ccatoolkit.analysis.linalg`). ``M`` is zero on those rows and columns (a
    direction without variance covaries with nothing), so the matrix whose polar factor is taken is zero
    outside its top ``r x r`` block, ``r`` the larger of the two ranks (the *live* subspaces ``Q_a``, ``Q_b``).
    Its polar factor there is the block's own; on the null spaces any orthogonal map maximises CCA's
    objective equally (the data say nothing about them). The map taken there is the *direct rotation*
    of B's null space onto A's, the isometry between them closest to the identity (:func:`_null_map`): it is
    the identity outside the span of ``Q_a`` and ``Q_b``, so the whole transform is a scaled identity plus
    a term of rank at most ``2r`` (:class:`~ccatoolkit.analysis.linalg.DiagonalPlusLowRank`). A ridge then
    costs an ``r x r`` polar factor and products of ``n x r`` matrices.

    ``samples``: how many samples the covariances were estimated from. Their rank is below it, so when it is
    at most half the width only the eigenpairs that can be nonzero are computed (``RidgePath(rank_bound=)``);
    a 4096-wide space on 512 samples then costs products of ``4096 x 512`` matrices, no ``4096 x 4096``
    eigendecomposition. Full-rank spaces (``r = n``) take the full polar factor.
    """

    def __init__(self, S_aa: Any, S_bb: Any, S_ab: Any, samples: int | None = None) -> None:
        S_ab = as_float64(S_ab)
        bound = samples if S_ab.dim() == 2 and S_ab.shape[0] == S_ab.shape[1] else None  # (one space: square)
        a, b = RidgePath(S_aa, rank_bound=bound), RidgePath(S_bb, rank_bound=bound)
        S_ab = S_ab.to(a.vecs.device)
        if tuple(S_ab.shape) != (a.size, b.size):
            raise ValueError(
                f"shape mismatch: S_aa {(a.size, a.size)}, S_bb {(b.size, b.size)}, S_ab {tuple(S_ab.shape)}"
            )
        self._setup(a, b, lambda left, right: left.T @ S_ab @ right, as_float64(S_aa, S_ab.device),
                    as_float64(S_bb, S_ab.device))

    @classmethod
    def of_samples(cls, X_a: torch.Tensor, X_b: torch.Tensor) -> CCAProblem:
        """The problem of two models' samples of one space (``n x m`` each, the same ``m`` inputs; at most half as
        many as channels), without any ``n x n`` matrix: each covariance's eigenpairs from the thin SVD of its
        centred samples (:meth:`RidgePath.of_samples`), the cross-covariance only as ``Q_a^T S_ab Q_b``."""
        m = X_a.shape[1]
        Xa = X_a.to(torch.float64)
        Xb = X_b.to(device=Xa.device, dtype=torch.float64)
        Xa, Xb = Xa - Xa.mean(1, keepdim=True), Xb - Xb.mean(1, keepdim=True)
        problem = cls.__new__(cls)
        problem._setup(RidgePath.of_samples(Xa), RidgePath.of_samples(Xb),
                       lambda left, right: (left.T @ Xa) @ (Xb.T @ right) / max(m - 1, 1),
                       (Xa * Xa).sum(1) / max(m - 1, 1), (Xb * Xb).sum(1) / max(m - 1, 1))
        return problem

    def _setup(self, a: RidgePath, b: RidgePath, cross: Any, S_aa: torch.Tensor, S_bb: torch.Tensor) -> None:
        """From the two ridge paths, ``cross(L, R) = L^T S_ab R`` and the covariances (or variances) for the
        constant channels."""
        self.a, self.b = a, b
        n = a.size
        #: the size of the block outside which M is zero: the larger rank (eigenvalues ascend, so the last ones)
        self.rank = max(a.rank(), b.rank())
        self.reduced = self.rank < n and n == b.size
        if self.reduced:  # the live eigenvectors: the last `rank` of each basis
            self.qa, self.qb = a.vecs[:, -self.rank:], b.vecs[:, -self.rank:].to(a.vecs.device)
            #: the cross-covariance in the live eigenbases, ``Q_a^T S_ab Q_b``
            self.M = cross(self.qa, self.qb)
            self._null = _null_map(self.qa, self.qb)
        else:
            #: the cross-covariance in the eigenbases, ``V_a^T S_ab V_b``
            self.M = cross(a.vecs, b.vecs.to(a.vecs.device))
        # only the diagonals are read (RidgePath has checked the matrices)
        self.dead_a, self.dead_b = constant_channels(S_aa), constant_channels(S_bb.to(S_aa.device))

    def transform(self, ridge: float, drop_constant: bool = True,
                  compact: bool = False) -> tuple[torch.Tensor, torch.Tensor] | tuple[DiagonalPlusLowRank, DiagonalPlusLowRank]:
        """``(out, inp)`` float64 tensors: :func:`cca_transform` at ``ridge``. ``compact``: a reduced space's maps
        as :class:`~ccatoolkit.analysis.linalg.DiagonalPlusLowRank` (what a merge applies) when their rank is
        below half the width, where the factors cost less arithmetic than the matrix; multiplied out otherwise."""
        if not self.reduced:
            fa, fb = self.a.scaled(ridge, -0.5), self.b.scaled(ridge, -0.5)
            ga, gb = self.a.scaled(ridge, 0.5), self.b.scaled(ridge, 0.5)
            Va, Vb = self.a.vecs, self.b.vecs
            R = polar_factor(fa[:, None] * self.M * fb[None, :])  # in the eigenbases
            out = (Va * ga) @ R @ (fb[:, None] * Vb.T)  # S_aa^{1/2} R S_bb^{-1/2}
            inp = (Vb * gb) @ R.T @ (fa[:, None] * Va.T)  # S_bb^{1/2} R^T S_aa^{-1/2}
            if drop_constant and bool(self.dead_a.any() or self.dead_b.any()):
                out, inp = _drop_constant(out, inp, self.dead_a, self.dead_b)
            return out, inp
        return self._reduced_transform(ridge, drop_constant, compact)

    def _reduced_transform(self, ridge: float, drop_constant: bool,
                           compact: bool) -> tuple[DiagonalPlusLowRank, DiagonalPlusLowRank] | tuple[torch.Tensor, torch.Tensor]:
        """The maps of a reduced space: ``c N + Q_a (g_a P f_b) Q_b^T`` with ``N`` the direct rotation of the
        null spaces and ``c`` the regularised null eigenvalues' ``(ridge tr_a/n)^(1/2) (ridge tr_b/n)^(-1/2)``;
        ``inp`` likewise with ``N^T``, so that ``inp`` inverts ``out`` whenever ``ridge > 0``. Each map is
        multiplied out (unless ``compact`` and of low rank) before the next is made."""
        p, w = self._null  # N = I - Q_a Q_a^T + p w^T (see _null_map)
        r, n = self.rank, self.a.size
        keep = compact and 2 * (r + p.shape[1]) < n  # the factors' width: r + the turned angles
        fa, fb = self.a.scaled(ridge, -0.5)[-r:], self.b.scaled(ridge, -0.5)[-r:]
        ga, gb = self.a.scaled(ridge, 0.5)[-r:], self.b.scaled(ridge, 0.5)[-r:]
        c_out = self.a.scaled_null(ridge, 0.5) * self.b.scaled_null(ridge, -0.5)
        c_inp = self.b.scaled_null(ridge, 0.5) * self.a.scaled_null(ridge, -0.5)
        P = polar_factor(fa[:, None] * self.M * fb[None, :]) if r else self.M
        live_out = ga[:, None] * P * fb[None, :]  # out's live block: Q_a live_out Q_b^T
        live_inp = gb[:, None] * P.T * fa[None, :]  # inp's: Q_b live_inp Q_a^T
        qa, qb = self.qa, self.qb
        # what maps to or from a constant channel is dropped: out's rows and inp's columns of A's, out's
        # columns and inp's rows of B's (see _drop_constant)
        live_a = (~self.dead_a if drop_constant else torch.ones_like(self.dead_a)).to(qa.dtype)
        live_b = (~self.dead_b if drop_constant else torch.ones_like(self.dead_b)).to(qa.dtype)
        basis = torch.cat([qa, p], 1) * live_a[:, None]  # out's left factor and inp's right one: one tensor
        out = DiagonalPlusLowRank(c_out * live_a * live_b, basis,
                                  torch.cat([qb @ live_out.T - c_out * qa, c_out * w], 1) * live_b[:, None])
        if not keep:
            out = out.dense()
        inp = DiagonalPlusLowRank(c_inp * live_b * live_a,
                                  torch.cat([qb @ live_inp - c_inp * qa, c_inp * w], 1) * live_b[:, None], basis)
        return (out, inp) if keep else (out, inp.dense())


def _null_map(qa: torch.Tensor, qb: torch.Tensor, tol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, w)`` with ``N = I - Q_a Q_a^T + p w^T`` the direct rotation of B's null space (the orthogonal
    complement of ``span(Q_b)``) onto A's, and zero on ``span(Q_b)``.

    Principal vectors: ``Q_a^T Q_b = Y cos(theta) Z^T``, ``a_i = Q_a Y_i``, ``b_i = Q_b Z_i``. Where
    ``theta_i > 0``, ``p_i = (b_i - cos a_i) / sin`` is a unit vector in A's null space, and
    ``-sin a_i + cos p_i`` (in B's null space) is turned onto it; every direction orthogonal to both
    live subspaces stays where it is. So ``w_i = (cos_i - 1) p_i - sin_i a_i``. Angles below ``tol`` count
    as zero (the two subspaces share that direction).
    """
    if qa.shape[1] == 0:  # no live subspace (a dead layer): the identity
        return qa, qa
    Y, cos, Zh = torch.linalg.svd(qa.T @ qb)
    cos = cos.clamp(-1.0, 1.0)
    sin = (1.0 - cos * cos).clamp_min(0.0).sqrt()
    turned = sin > tol
    cos, sin = cos[turned], sin[turned]
    a = (qa @ Y)[:, turned]
    p = ((qb @ Zh.T)[:, turned] - a * cos) / sin
    return p, p * (cos - 1.0) - a * sin


def cca_transform(
    S_aa: np.ndarray, S_bb: np.ndarray, S_ab: np.ndarray, ridge: float = 1e-2, drop_constant: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The CCA Merge transform taking model B's features into model A's (reference) space.

    In the paper's row-vector convention ``X_b T ~ X_a`` with ``T = P_b P_a^{-1}``; in our column
    convention ``out = T^T = S_aa^{1/2} U V^T S_bb^{-1/2}`` (applied to B's output-side weights) and
    ``inp = out^{-1} = S_bb^{1/2} V U^T S_aa^{-1/2}`` (input side of the next layer), where
    ``U V^T`` is the polar factor of the whitened cross-covariance ``K = S_aa^{-1/2} S_ab S_bb^{-1/2}``
    (unique even when canonical correlations tie). When B's features are an invertible linear
    function ``M`` of A's, ``out = M^{-1}`` (as ``ridge -> 0``). For several ridges on one layer, build
    a :class:`CCAProblem` once.

    Returns ``(out, inp)`` as float64 arrays of shape ``(n, n)``.
    """
    out, inp = CCAProblem(S_aa, S_bb, S_ab).transform(ridge, drop_constant)
    return out.cpu().numpy(), inp.cpu().numpy()


def multiview_cca_transforms(
    covs: list[list[np.ndarray]], reference: int = 0, ridge: float = 1e-2, drop_constant: bool = True,
    ridge_paths: list[RidgePath] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Align N models' features to one shared space by multi-view (MAXVAR / generalised) CCA.

    ``covs[k][l]`` is the (cross-)covariance of model k's and model l's features (all ``n x n``).
    Each view is whitened, ``W_k = S_kk^{-1/2}``; the top ``n`` eigenvectors ``E`` of the block
    matrix ``C[k, l] = W_k S_kl W_l`` (an ``Nn x Nn`` matrix with identity diagonal blocks) give the
    shared coordinates ``y_k = P_k^T z_k`` with ``P_k = W_k E_k`` (MAXVAR: the shared variates explain
    as much of all views' variance as possible). The shared space is computed from all models
    jointly and symmetrically.

    Scaling back to activation units: the shared space is a whitened space; it is expressed in the
    neuron units of model ``reference`` by re-colouring with that model's covariance square root.
    Each model's whitened features are rotated onto the reference's by the orthogonal polar factor
    ``R_k`` of ``E_ref diag(lambda - 1)_+ E_k^T`` (their correspondence through the shared space,
    each shared variate weighted by its cross-view correlation ``lambda - 1``; for N = 2 this matrix
    is ``K / 2``, the pairwise CCA matrix), so
    ``out_k = S_ref^{1/2} R_k S_kk^{-1/2}`` and ``inp_k = S_kk^{1/2} R_k^T S_ref^{-1/2}`` (``out_ref = I``).
    The merged network's ReLUs thus act on real neurons with the reference's units (a rotated
    canonical basis would not commute with ReLU), while the correspondence of every model comes from
    the joint estimate rather than a pairwise one. The weighting makes uncorrelated (e.g. dead)
    directions, whose eigenvalues tie, irrelevant to the rotation. For N = 2 it equals CCA Merge
    (:func:`cca_transform`). ``ridge_paths``: each view's :class:`RidgePath` when several ridges are tried.
    """
    N = len(covs)
    if N < 2 or any(len(row) != N for row in covs):
        raise ValueError("covs must be an N x N nested list of covariance blocks with N >= 2")
    if not 0 <= reference < N:
        raise ValueError(f"reference index {reference} out of range for {N} models")
    n = as_float64(covs[0][0]).shape[0]
    paths = [RidgePath(as_float64(covs[k][k]).cpu()) for k in range(N)] if ridge_paths is None else ridge_paths
    roots = [path.powers(ridge, 0.5, -0.5) for path in paths]
    C = torch.zeros(N * n, N * n, dtype=torch.float64)
    for k in range(N):
        for l in range(N):
            block = torch.eye(n, dtype=torch.float64) if k == l else roots[k][1] @ as_float64(covs[k][l]).cpu() @ roots[l][1]
            C[k * n:(k + 1) * n, l * n:(l + 1) * n] = block
    vals, E = top_eigenpairs(0.5 * (C + C.T), n)
    weight = (vals - 1.0).clamp_min(0.0)  # each shared variate's cross-view correlation
    blocks = [E[k * n:(k + 1) * n] for k in range(N)]
    result = []
    for k in range(N):
        if k == reference:
            result.append((np.eye(n), np.eye(n)))
            continue
        R = polar_factor((blocks[reference] * weight) @ blocks[k].T)
        out = roots[reference][0] @ R @ roots[k][1]
        inp = roots[k][0] @ R.T @ roots[reference][1]
        if drop_constant:
            out, inp = _drop_constant(out, inp, constant_channels(symmetrize(covs[reference][reference]).cpu()),
                                      constant_channels(symmetrize(covs[k][k]).cpu()))
        result.append((out.numpy(), inp.numpy()))
    return result
