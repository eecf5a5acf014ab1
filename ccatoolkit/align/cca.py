"""CCA alignment of activation spaces (CCA Merge, Horoi et al. 2024) and a multi-view (MAXVAR) variant.

Everything here works on covariance matrices (float64), so it is cheap and testable without
models. Conventions: features are column vectors; a transform ``out`` maps a model's features ``z``
to ``out @ z`` in the target space, and ``inp`` is applied on the input side of the next layer
(``inp = inverse(out)``).

Regularisation is scale-free: ``S + ridge * trace(S) / n * I``, so one ``ridge`` serves every layer
and width. Matrix square roots use symmetric eigendecompositions with clamped eigenvalues, so
rank-deficient covariances (dead ReLUs) never give NaNs or crashes.

Constant channels (dead ReLUs on the data) have no correlation with anything, so CCA leaves their
correspondence arbitrary (any rotation of the null spaces); mapping them anyway would mix a dead
neuron's (negative-bias) weights into live ones, or wake a dead one up. With ``drop_constant=True``
(the default) what maps to or from a constant channel is zeroed: a model's dead neuron contributes
nothing, and the reference's dead neuron keeps only the reference's own (averaged) weights.

The decompositions and products run in torch (float64, CPU), which respects
``torch.set_num_threads``; numpy's BLAS oversubscribes shared machines badly for these small
matrices. Inputs may be numpy arrays or tensors; results are numpy arrays.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "regularize",
    "sym_power",
    "cca_transform",
    "cca_directions",
    "multiview_cca_transforms",
]

_EIG_FLOOR = 1e-12  # relative floor for eigenvalues before inverse powers
_DEAD_RTOL = 1e-10  # a channel whose variance is below this fraction of the largest is constant


def _t(S: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(S, torch.Tensor):
        return S.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(S, dtype=np.float64))


def _as_sym(S: np.ndarray | torch.Tensor) -> torch.Tensor:
    S = _t(S)
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(S.shape)}")
    return 0.5 * (S + S.T)


def _regularize(S: np.ndarray | torch.Tensor, ridge: float) -> torch.Tensor:
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    S = _as_sym(S)
    n = S.shape[0]
    scale = float(torch.trace(S)) / max(n, 1)
    eye = torch.eye(n, dtype=torch.float64)
    if not np.isfinite(scale) or scale <= 0:
        return eye
    return S + ridge * scale * eye


def _powers(S: torch.Tensor, *powers: float) -> list[torch.Tensor]:
    """``S**p`` for each ``p`` from one eigendecomposition (eigenvalues clamped to ``1e-12 * max``)."""
    vals, vecs = torch.linalg.eigh(S)
    top = float(vals.max()) if vals.numel() else 0.0
    floor = _EIG_FLOOR * top if top > 0 else _EIG_FLOOR
    vals = vals.clamp_min(floor)
    return [(vecs * vals**p) @ vecs.T for p in powers]


def _constant(S: torch.Tensor) -> torch.Tensor:
    """Mask of channels with (numerically) zero variance: dead ReLUs on the data."""
    var = torch.diagonal(S).clamp_min(0.0)
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


def _polar(A: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``U V^T`` of ``A = U S V^T``."""
    U, _s, Vh = torch.linalg.svd(A)
    return U @ Vh


def regularize(S: np.ndarray, ridge: float) -> np.ndarray:
    """``S + ridge * trace(S)/n * I`` (identity when ``S`` is all zero, so a dead layer stays finite)."""
    return _regularize(S, ridge).numpy()


def sym_power(S: np.ndarray, power: float) -> np.ndarray:
    """``S**power`` of a symmetric PSD matrix via eigh; eigenvalues clamped to ``1e-12 * max``."""
    return _powers(_as_sym(S), power)[0].numpy()


def cca_directions(
    S_aa: np.ndarray, S_bb: np.ndarray, S_ab: np.ndarray, ridge: float = 1e-2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Regularised CCA: ``(P_a, P_b, rho)`` with canonical variates ``P_a.T z_a`` and ``P_b.T z_b``.

    ``K = S_aa^{-1/2} S_ab S_bb^{-1/2} = U diag(rho) V^T``, ``P_a = S_aa^{-1/2} U``, ``P_b = S_bb^{-1/2} V``.
    """
    S_aa_r, S_bb_r = _regularize(S_aa, ridge), _regularize(S_bb, ridge)
    S_ab = _t(S_ab)
    if tuple(S_ab.shape) != (S_aa_r.shape[0], S_bb_r.shape[0]):
        raise ValueError(
            f"cross-covariance shape {tuple(S_ab.shape)} does not fit {tuple(S_aa_r.shape)} and {tuple(S_bb_r.shape)}"
        )
    (ia,), (ib,) = _powers(S_aa_r, -0.5), _powers(S_bb_r, -0.5)
    U, rho, Vh = torch.linalg.svd(ia @ S_ab @ ib)
    return (ia @ U).numpy(), (ib @ Vh.T).numpy(), rho.numpy()


def cca_transform(
    S_aa: np.ndarray, S_bb: np.ndarray, S_ab: np.ndarray, ridge: float = 1e-2, drop_constant: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The CCA Merge transform taking model B's features into model A's (reference) space.

    In the paper's row-vector convention ``X_b T ~ X_a`` with ``T = P_b P_a^{-1}``; in our column
    convention ``out = T^T = S_aa^{1/2} U V^T S_bb^{-1/2}`` (applied to B's output-side weights) and
    ``inp = out^{-1} = S_bb^{1/2} V U^T S_aa^{-1/2}`` (input side of the next layer). When B's features
    are an invertible linear function ``M`` of A's, ``out = M^{-1}`` (as ``ridge -> 0``).

    Returns ``(out, inp)`` as float64 arrays of shape ``(n, n)``.
    """
    S_aa_r, S_bb_r = _regularize(S_aa, ridge), _regularize(S_bb, ridge)
    S_ab = _t(S_ab)
    if tuple(S_ab.shape) != (S_aa_r.shape[0], S_bb_r.shape[0]):
        raise ValueError(
            f"cross-covariance shape {tuple(S_ab.shape)} does not fit {tuple(S_aa_r.shape)} and {tuple(S_bb_r.shape)}"
        )
    sa, ia = _powers(S_aa_r, 0.5, -0.5)
    sb, ib = _powers(S_bb_r, 0.5, -0.5)
    R = _polar(ia @ S_ab @ ib)  # U V^T: unique even when canonical correlations tie
    out, inp = sa @ R @ ib, sb @ R.T @ ia
    if drop_constant:
        out, inp = _drop_constant(out, inp, _constant(_as_sym(S_aa)), _constant(_as_sym(S_bb)))
    return out.numpy(), inp.numpy()


def multiview_cca_transforms(
    covs: list[list[np.ndarray]], reference: int = 0, ridge: float = 1e-2, drop_constant: bool = True
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
    (:func:`cca_transform`).
    """
    N = len(covs)
    if N < 2 or any(len(row) != N for row in covs):
        raise ValueError("covs must be an N x N nested list of covariance blocks with N >= 2")
    if not 0 <= reference < N:
        raise ValueError(f"reference index {reference} out of range for {N} models")
    n = _t(covs[0][0]).shape[0]
    regs = [_regularize(covs[k][k], ridge) for k in range(N)]
    roots = [_powers(r, 0.5, -0.5) for r in regs]
    C = torch.zeros(N * n, N * n, dtype=torch.float64)
    for k in range(N):
        for l in range(N):
            block = torch.eye(n, dtype=torch.float64) if k == l else roots[k][1] @ _t(covs[k][l]) @ roots[l][1]
            C[k * n:(k + 1) * n, l * n:(l + 1) * n] = block
    vals, vecs = torch.linalg.eigh(0.5 * (C + C.T))
    E = vecs.flip(1)[:, :n]
    weight = (vals.flip(0)[:n] - 1.0).clamp_min(0.0)  # each shared variate's cross-view correlation
    blocks = [E[k * n:(k + 1) * n] for k in range(N)]
    result = []
    for k in range(N):
        if k == reference:
            result.append((np.eye(n), np.eye(n)))
            continue
        R = _polar((blocks[reference] * weight) @ blocks[k].T)
        out = roots[reference][0] @ R @ roots[k][1]
        inp = roots[k][0] @ R.T @ roots[reference][1]
        if drop_constant:
            out, inp = _drop_constant(out, inp, _constant(_as_sym(covs[reference][reference])),
                                      _constant(_as_sym(covs[k][k])))
        result.append((out.numpy(), inp.numpy()))
    return result
