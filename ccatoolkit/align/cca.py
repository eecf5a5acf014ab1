"""CCA alignment of activation spaces (CCA Merge, Horoi et al. 2024) and a multi-view (MAXVAR) variant.

Everything here works on covariance matrices (float64 numpy), so it is cheap and testable without
models. Conventions: features are column vectors; a transform ``out`` maps a model's features ``z``
to ``out @ z`` in the target space, and ``inp`` is applied on the input side of the next layer
(``inp = inverse(out)``).

Regularisation is scale-free: ``S + ridge * trace(S) / n * I``, so one ``ridge`` serves every layer
and width. Matrix square roots use symmetric eigendecompositions with clamped eigenvalues, so
rank-deficient covariances (dead ReLUs) never give NaNs or crashes.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "regularize",
    "sym_power",
    "cca_transform",
    "cca_directions",
    "multiview_cca_transforms",
]

_EIG_FLOOR = 1e-12  # relative floor for eigenvalues before inverse powers


def _as_sym(S: np.ndarray) -> np.ndarray:
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {S.shape}")
    return 0.5 * (S + S.T)


def regularize(S: np.ndarray, ridge: float) -> np.ndarray:
    """``S + ridge * trace(S)/n * I`` (identity when ``S`` is all zero, so a dead layer stays finite)."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    S = _as_sym(S)
    n = S.shape[0]
    scale = float(np.trace(S)) / max(n, 1)
    if not np.isfinite(scale) or scale <= 0:
        return np.eye(n)
    return S + ridge * scale * np.eye(n)


def sym_power(S: np.ndarray, power: float) -> np.ndarray:
    """``S**power`` of a symmetric PSD matrix via eigh; eigenvalues clamped to ``1e-12 * max``."""
    S = _as_sym(S)
    vals, vecs = np.linalg.eigh(S)
    top = float(vals.max()) if vals.size else 0.0
    floor = _EIG_FLOOR * top if top > 0 else _EIG_FLOOR
    vals = np.clip(vals, floor, None)
    return (vecs * vals**power) @ vecs.T


def cca_directions(
    S_aa: np.ndarray, S_bb: np.ndarray, S_ab: np.ndarray, ridge: float = 1e-2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Regularised CCA: ``(P_a, P_b, rho)`` with canonical variates ``P_a.T z_a`` and ``P_b.T z_b``.

    ``K = S_aa^{-1/2} S_ab S_bb^{-1/2} = U diag(rho) V^T``, ``P_a = S_aa^{-1/2} U``, ``P_b = S_bb^{-1/2} V``.
    """
    S_aa_r, S_bb_r = regularize(S_aa, ridge), regularize(S_bb, ridge)
    S_ab = np.asarray(S_ab, dtype=np.float64)
    if S_ab.shape != (S_aa_r.shape[0], S_bb_r.shape[0]):
        raise ValueError(f"cross-covariance shape {S_ab.shape} does not fit {S_aa_r.shape} and {S_bb_r.shape}")
    ia, ib = sym_power(S_aa_r, -0.5), sym_power(S_bb_r, -0.5)
    K = ia @ S_ab @ ib
    U, rho, Vt = np.linalg.svd(K)
    return ia @ U, ib @ Vt.T, rho


def cca_transform(
    S_aa: np.ndarray, S_bb: np.ndarray, S_ab: np.ndarray, ridge: float = 1e-2
) -> tuple[np.ndarray, np.ndarray]:
    """The CCA Merge transform taking model B's features into model A's (reference) space.

    In the paper's row-vector convention ``X_b T ~ X_a`` with ``T = P_b P_a^{-1}``; in our column
    convention ``out = T^T = S_aa^{1/2} U V^T S_bb^{-1/2}`` (applied to B's output-side weights) and
    ``inp = out^{-1} = S_bb^{1/2} V U^T S_aa^{-1/2}`` (input side of the next layer). When B's features
    are an invertible linear function ``M`` of A's, ``out = M^{-1}`` (as ``ridge -> 0``).

    Returns ``(out, inp)`` as float64 arrays of shape ``(n, n)``.
    """
    S_aa_r, S_bb_r = regularize(S_aa, ridge), regularize(S_bb, ridge)
    S_ab = np.asarray(S_ab, dtype=np.float64)
    ia, ib = sym_power(S_aa_r, -0.5), sym_power(S_bb_r, -0.5)
    K = ia @ S_ab @ ib
    U, _rho, Vt = np.linalg.svd(K)
    R = U @ Vt  # orthogonal polar factor: unique even when canonical correlations tie
    out = sym_power(S_aa_r, 0.5) @ R @ ib
    inp = sym_power(S_bb_r, 0.5) @ R.T @ ia
    return out, inp


def multiview_cca_transforms(
    covs: list[list[np.ndarray]], reference: int = 0, ridge: float = 1e-2
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Align N models' features to one shared space by multi-view (MAXVAR / generalised) CCA.

    ``covs[k][l]`` is the (cross-)covariance of model k's and model l's features (all ``n x n``).
    Each view is whitened, ``W_k = S_kk^{-1/2}``; the top ``n`` eigenvectors ``E`` of the block
    matrix ``C[k, l] = W_k S_kl W_l`` (an ``Nn x Nn`` matrix with identity diagonal blocks) give the
    shared coordinates ``y_k = P_k^T z_k`` with ``P_k = W_k E_k`` (MAXVAR: the shared variates explain
    as much of all views' variance as possible). The shared space is computed from all models
    jointly and symmetrically.

    Scaling back to activation units: the shared coordinates are mapped into the neuron basis of
    model ``reference`` through its own exact inverse projection, ``z = P_ref^{-T} y``. So
    ``out_k = P_ref^{-T} P_k^T`` and ``out_ref = I``: the merged network's ReLUs act on real neurons
    with the reference's units (a rotated canonical basis would not commute with ReLU), while the
    correspondence of every model comes from the joint estimate rather than a pairwise one. For
    N = 2 it reduces to CCA Merge up to the ridge. ``inp_k = out_k^{-1}``.
    """
    N = len(covs)
    if N < 2 or any(len(row) != N for row in covs):
        raise ValueError("covs must be an N x N nested list of covariance blocks with N >= 2")
    if not 0 <= reference < N:
        raise ValueError(f"reference index {reference} out of range for {N} models")
    n = np.asarray(covs[0][0]).shape[0]
    whiten = [sym_power(regularize(covs[k][k], ridge), -0.5) for k in range(N)]
    C = np.zeros((N * n, N * n))
    for k in range(N):
        for l in range(N):
            block = np.eye(n) if k == l else whiten[k] @ np.asarray(covs[k][l], dtype=np.float64) @ whiten[l]
            C[k * n:(k + 1) * n, l * n:(l + 1) * n] = block
    C = 0.5 * (C + C.T)
    _vals, vecs = np.linalg.eigh(C)
    E = vecs[:, ::-1][:, :n]
    P = [whiten[k] @ E[k * n:(k + 1) * n] for k in range(N)]
    back = np.linalg.pinv(P[reference].T)  # shared coordinates -> reference activation units
    result = []
    for k in range(N):
        out = np.eye(n) if k == reference else back @ P[k].T
        inp = np.eye(n) if k == reference else np.linalg.pinv(out)
        result.append((out, inp))
    return result
