"""ZipIt! feature matching (Stoica et al. 2024): merge correlated features across (and within) models.

Given the correlation matrix of all N models' features of one space (``N * size`` features,
model-major), features are grouped into ``size`` groups. A group's merged feature is the mean of
its members: ``f = sum_k M_k z_k`` with ``M_k[g, i] = 1/|g|`` for member ``i`` of model ``k``; the
unmerge copies it back, ``z_k ~ U_k f`` with ``U_k[i, g] = 1``. In the ``(out, inp)`` transform
convention this is ``out_k = N * M_k`` and ``inp_k = U_k``: averaging the N transformed models gives
exactly ``sum_k M_k W_k U_k`` for every weight.

Grouping rules (documented generalisation of the paper's N = 2 greedy pairing):

* ``allow_within_model=True`` (the paper's default): greedy agglomeration. Repeatedly merge the two
  groups with the highest average-linkage correlation, with group sizes capped at N, until ``size``
  groups remain. For N = 2 this is exactly the paper's "merge the most correlated pair, remove
  both" rule. If the cap blocks every remaining merge (possible for N > 2), the cap is lifted.
* ``allow_within_model=False``: groups hold at most one feature per model. The reference model's
  features seed the groups; every other model in turn is matched greedily (most correlated pair
  first) to the groups by average correlation with the group's members. For N = 2 this is the
  paper's cross-model-only greedy matching.
"""

from __future__ import annotations

import numpy as np

__all__ = ["zipit_groups", "zipit_transforms"]


def _clean_corr(corr: np.ndarray) -> np.ndarray:
    C = np.nan_to_num(np.asarray(corr, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"ZipIt needs a square correlation matrix, got shape {C.shape}")
    return 0.5 * (C + C.T)


def _greedy_agglomerate(C: np.ndarray, n_groups: int, cap: int) -> list[list[int]]:
    """Average-linkage agglomeration of all features into ``n_groups`` groups (size cap, lifted if stuck).

    Keeps each row's best partner cached, so a merge costs O(n) plus the rows whose partner changed.
    """
    n = C.shape[0]
    S = C.copy()
    np.fill_diagonal(S, -np.inf)
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    alive = np.ones(n, dtype=bool)
    counts = np.ones(n)
    limit = float(cap)
    best = np.full(n, -np.inf)
    arg = np.full(n, -1, dtype=np.int64)

    def refresh(r: int) -> None:
        valid = alive & (counts + counts[r] <= limit)
        valid[r] = False
        if not alive[r] or not valid.any():
            best[r], arg[r] = -np.inf, -1
            return
        row = np.where(valid, S[r], -np.inf)
        arg[r] = int(np.argmax(row))
        best[r] = row[arg[r]]

    for r in range(n):
        refresh(r)
    while len(members) > n_groups:
        i = int(np.argmax(best))
        if arg[i] < 0:
            if limit >= n:
                break  # cannot happen: every pair is mergeable without a cap
            limit = float(n)  # nothing mergeable under the cap: lift it
            for r in range(n):
                refresh(r)
            continue
        j = int(arg[i])
        ci, cj = counts[i], counts[j]
        row = (ci * S[i] + cj * S[j]) / (ci + cj)  # average linkage update
        S[i], S[:, i] = row, row
        S[i, i] = -np.inf
        S[j], S[:, j] = -np.inf, -np.inf
        alive[j] = False
        counts[i] = ci + cj
        members[i] = members[i] + members.pop(j)
        best[j], arg[j] = -np.inf, -1
        stale = np.flatnonzero(alive & ((arg == i) | (arg == j)))
        for r in stale:
            refresh(int(r))
        refresh(i)
        # rows that may now prefer the merged group i
        cand = alive & (counts + counts[i] <= limit) & (S[:, i] > best)
        cand[i] = False
        for r in np.flatnonzero(cand):
            best[r], arg[r] = S[r, i], i
    return [members[k] for k in sorted(members)]


def _greedy_match(score: np.ndarray) -> np.ndarray:
    """Greedy one-to-one matching on a square score matrix: most similar pair first. ``match[row] = col``."""
    n = score.shape[0]
    order = np.argsort(-score, axis=None, kind="stable")
    match = -np.ones(n, dtype=np.int64)
    col_used = np.zeros(n, dtype=bool)
    done = 0
    for flat in order:
        r, c = divmod(int(flat), n)
        if match[r] < 0 and not col_used[c]:
            match[r] = c
            col_used[c] = True
            done += 1
            if done == n:
                break
    return match


def _sequential_match(C: np.ndarray, n_models: int, size: int, reference: int) -> list[list[int]]:
    groups = [[reference * size + i] for i in range(size)]
    for k in range(n_models):
        if k == reference:
            continue
        cols = np.arange(k * size, (k + 1) * size)
        score = np.stack([C[g][:, cols].mean(axis=0) for g in groups])
        match = _greedy_match(score)
        for g, c in zip(groups, match):
            g.append(int(cols[c]))
    return groups


def zipit_groups(
    corr: np.ndarray, n_models: int, *, allow_within_model: bool = True, reference: int = 0
) -> list[list[int]]:
    """Group the ``n_models * size`` features (model-major indices) into ``size`` groups; see module doc."""
    C = _clean_corr(corr)
    if n_models < 2 or C.shape[0] % n_models:
        raise ValueError(f"correlation matrix of size {C.shape[0]} does not split into {n_models} models")
    size = C.shape[0] // n_models
    if allow_within_model:
        return _greedy_agglomerate(C, size, cap=n_models)
    return _sequential_match(C, n_models, size, reference)


def zipit_transforms(
    corr: np.ndarray, n_models: int, *, allow_within_model: bool = True, reference: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-model ``(out_k, inp_k) = (N * M_k, U_k)`` from the joint correlation matrix (see module doc)."""
    groups = zipit_groups(corr, n_models, allow_within_model=allow_within_model, reference=reference)
    size = len(groups)
    M = [np.zeros((size, size)) for _ in range(n_models)]
    U = [np.zeros((size, size)) for _ in range(n_models)]
    for g, group in enumerate(groups):
        for idx in group:
            k, i = divmod(idx, size)
            M[k][g, i] = 1.0 / len(group)
            U[k][i, g] = 1.0
    return [(n_models * M[k], U[k]) for k in range(n_models)]
