"""Matching algorithms on matrices: activation matching, weight matching, CCA, multi-view CCA, ZipIt!."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccatoolkit.merging.align import (
    cca_directions,
    cca_transform,
    match_activations,
    multiview_cca_transforms,
    permutation_matrix,
    weight_matching,
    zipit_groups,
    zipit_transforms,
)


def _features(n: int = 12, samples: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(n, n))
    return np.maximum(rng.normal(size=(samples, n)) @ mix, 0.0)  # ReLU-like, correlated features


def _cov(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    return Xc.T @ Yc / (len(X) - 1)


def _corr(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    return _cov(X, Y) / np.outer(X.std(0, ddof=1), Y.std(0, ddof=1))


def test_activation_matching_recovers_planted_permutation() -> None:
    A = _features()
    perm = np.random.default_rng(1).permutation(A.shape[1])
    B = A[:, np.argsort(perm)] + 0.01 * np.random.default_rng(2).normal(size=A.shape)  # B[:, perm[i]] ~ A[:, i]
    found = match_activations(_corr(A, B))
    np.testing.assert_array_equal(found, perm)
    P = permutation_matrix(found).numpy()
    np.testing.assert_allclose((P @ B.T).T, B[:, found])


def test_activation_matching_tolerates_nan_and_torch_input() -> None:
    C = torch.eye(4, dtype=torch.float64)[[2, 0, 3, 1]]
    C[0, 1] = float("nan")
    assert match_activations(C).tolist() == [2, 0, 3, 1]
    with pytest.raises(ValueError, match="square"):
        match_activations(np.zeros((2, 3)))


def test_cca_transform_inverts_an_invertible_linear_map() -> None:
    A = _features(n=8)
    rng = np.random.default_rng(3)
    M = rng.normal(size=(8, 8)) + 3 * np.eye(8)
    B = A @ M.T  # z_b = M z_a
    out, inp = cca_transform(_cov(A, A), _cov(B, B), _cov(A, B), ridge=1e-10)
    np.testing.assert_allclose(out, np.linalg.inv(M), atol=1e-5)
    np.testing.assert_allclose(out @ inp, np.eye(8), atol=1e-8)
    np.testing.assert_allclose((out @ B.T).T, A, atol=1e-4)


def test_cca_directions_give_unit_canonical_variates() -> None:
    A, B = _features(n=6, seed=4), _features(n=6, seed=5)
    B = B + A  # partly correlated
    P_a, P_b, rho = cca_directions(_cov(A, A), _cov(B, B), _cov(A, B), ridge=0.0)
    np.testing.assert_allclose(P_a.T @ _cov(A, A) @ P_a, np.eye(6), atol=1e-6)
    np.testing.assert_allclose(P_a.T @ _cov(A, B) @ P_b, np.diag(rho), atol=1e-6)
    assert np.all(np.diff(rho) <= 1e-12) and 0 <= rho.min() and rho.max() <= 1 + 1e-9


def test_cca_rank_deficient_and_dead_layers_are_finite() -> None:
    A = _features(n=10)
    A[:, [1, 4, 7]] = 0.0  # dead ReLUs
    B = A[:, ::-1].copy()
    for ridge in (0.0, 1e-8, 1e-2):
        out, inp = cca_transform(_cov(A, A), _cov(B, B), _cov(A, B), ridge=ridge)
        assert np.isfinite(out).all() and np.isfinite(inp).all()
    zero = np.zeros((5, 5))
    out, inp = cca_transform(zero, zero, zero, ridge=1e-2)  # a completely dead layer
    assert np.isfinite(out).all() and np.isfinite(inp).all()
    res = multiview_cca_transforms([[zero] * 3] * 3, ridge=1e-2)
    assert all(np.isfinite(o).all() and np.isfinite(i).all() for o, i in res)


def _full_svd_transform(S_aa: np.ndarray, S_bb: np.ndarray, S_ab: np.ndarray, ridge: float) -> np.ndarray:
    """CCA Merge's ``out`` written out with full matrices: ``S_aa^{1/2} polar(K) S_bb^{-1/2}``."""

    def powers(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        S = S + ridge * np.trace(S) / len(S) * np.eye(len(S))
        vals, vecs = np.linalg.eigh(S)
        return (vecs * np.sqrt(vals)) @ vecs.T, (vecs / np.sqrt(vals)) @ vecs.T

    (ra, wa), (_, wb) = powers(S_aa), powers(S_bb)
    U, _, Vh = np.linalg.svd(wa @ S_ab @ wb)
    return ra @ U @ Vh @ wb


@pytest.mark.parametrize("ridge", [1e-2, 1.0])
def test_cca_transform_with_fewer_samples_than_channels_solves_the_live_block_only(ridge: float) -> None:
    """60 samples of 200 channels: each covariance has rank 59.

    The reduced solve (an SVD of the live 59 x 59 block) must map every sample exactly as the full SVD
    does, keep ``inp`` the inverse of ``out``, and reach the same CCA objective; only the completion on
    the null spaces, which the data leave free, may differ."""
    from ccatoolkit.merging.align.cca import CCAProblem

    rng = np.random.default_rng(11)
    Z = rng.normal(size=(60, 20))
    A = np.maximum(Z @ rng.normal(size=(20, 200)) + 0.1 * rng.normal(size=(60, 200)), 0.0)
    B = np.maximum(Z @ rng.normal(size=(20, 200)) + 0.1 * rng.normal(size=(60, 200)), 0.0)
    S_aa, S_bb, S_ab = _cov(A, A), _cov(B, B), _cov(A, B)
    problem = CCAProblem(S_aa, S_bb, S_ab)
    assert problem.reduced and problem.rank == 59
    out, inp = (t.numpy() for t in problem.transform(ridge))
    full = _full_svd_transform(S_aa, S_bb, S_ab, ridge)
    Bc = B - B.mean(0)
    np.testing.assert_allclose(Bc @ out.T, Bc @ full.T, rtol=0, atol=1e-9 * np.abs(Bc @ full.T).max())
    np.testing.assert_allclose(inp @ out, np.eye(200), atol=1e-9)
    full_rank = CCAProblem(*(_cov(X, Y) for X, Y in ((A[:, :40], A[:, :40]), (B[:, :40], B[:, :40]),
                                                     (A[:, :40], B[:, :40]))))
    assert not full_rank.reduced  # 60 samples of 40 channels: the full SVD, as before


def _sample_poor_problem(samples: int = 60, width: int = 300, dead: int | None = None):
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(samples, 20))
    A = np.maximum(Z @ rng.normal(size=(20, width)) + 0.1 * rng.normal(size=(samples, width)), 0.0)
    B = np.maximum(Z @ rng.normal(size=(20, width)) + 0.1 * rng.normal(size=(samples, width)), 0.0)
    if dead is not None:
        A[:, dead] = 0.0
    return A, B, (_cov(A, A), _cov(B, B), _cov(A, B))


def test_ridge_path_with_a_rank_bound_finds_the_nonzero_eigenpairs_only() -> None:
    """60 samples of 200 channels: the range finder's 60 eigenpairs are the full eigh's top 60."""
    from ccatoolkit.analysis.linalg import RidgePath

    A, _, (S, _, _) = _sample_poor_problem()
    full, partial = RidgePath(S), RidgePath(S, rank_bound=60)
    assert partial.partial and not full.partial and partial.vecs.shape == (300, 60)
    assert partial.rank() == full.rank() == 59
    np.testing.assert_allclose(partial.vals[-59:], full.vals[-59:], rtol=1e-10, atol=1e-12 * float(full.vals[-1]))
    live = partial.vecs[:, -59:]
    np.testing.assert_allclose((live @ live.T).numpy(), (full.vecs[:, -59:] @ full.vecs[:, -59:].T).numpy(),
                               atol=1e-9)
    for ridge in (0.0, 0.1):
        for p in (0.5, -0.5):
            np.testing.assert_allclose(partial.powers(ridge, p)[0].numpy(), full.powers(ridge, p)[0].numpy(),
                                       atol=1e-7 * float(full.powers(ridge, p)[0].abs().max()))
    assert not RidgePath(S, rank_bound=151).partial  # more than half the width: the full eigh


@pytest.mark.parametrize("ridge", [1e-2, 1.0])
def test_cca_maps_null_spaces_by_the_direct_rotation_in_factors(ridge: float) -> None:
    """A space seen on fewer samples than its width: the map is c I + rank <= 2r, computed without an
    n x n eigendecomposition (``samples``), equal to the one from the full decomposition; B's null space goes
    isometrically onto A's, every direction outside both live subspaces stays put, ``inp`` inverts ``out``."""
    from ccatoolkit.analysis.linalg import DiagonalPlusLowRank
    from ccatoolkit.merging.align.cca import CCAProblem

    A, B, covs = _sample_poor_problem()
    problem = CCAProblem(*covs, samples=60)
    assert problem.a.partial and problem.reduced and problem.rank == 59
    out, inp = problem.transform(ridge, compact=True)
    assert isinstance(out, DiagonalPlusLowRank) and out.left.shape[1] <= 2 * 59
    dense_out, dense_inp = CCAProblem(*covs).transform(ridge)  # the full eigendecomposition
    np.testing.assert_allclose(out.dense().numpy(), dense_out.numpy(), atol=1e-8 * float(dense_out.abs().max()))
    np.testing.assert_allclose((inp.dense() @ out.dense()).numpy(), np.eye(300), atol=1e-9)
    Bc = torch.as_tensor(B - B.mean(0))
    full = torch.as_tensor(_full_svd_transform(*covs, ridge))
    np.testing.assert_allclose((out @ Bc.T).numpy(), (full @ Bc.T).numpy(), atol=1e-9 * float((full @ Bc.T).abs().max()))
    qa, qb, c = problem.qa, problem.qb, float(out.diagonal[0])
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.cat([qa, qb], 1)).Q
    outside = torch.randn(300, 5, dtype=torch.float64, generator=g)
    outside -= basis @ (basis.T @ outside)
    np.testing.assert_allclose((out @ outside).numpy(), c * outside.numpy(), atol=1e-12)
    null_b = torch.randn(300, 30, dtype=torch.float64, generator=g)
    null_b -= qb @ (qb.T @ null_b)
    moved = (out @ null_b) / c
    np.testing.assert_allclose((moved.T @ moved).numpy(), (null_b.T @ null_b).numpy(), atol=1e-10)  # an isometry
    assert float((qa.T @ moved).abs().max()) < 1e-12  # into A's null space


def test_compact_cca_maps_zero_constant_channels_and_stay_dense_when_wide() -> None:
    from ccatoolkit.merging.align.cca import CCAProblem

    _, _, covs = _sample_poor_problem(dead=7)
    problem = CCAProblem(*covs, samples=60)
    out, inp = problem.transform(0.1, compact=True)
    assert float(out.dense()[7].abs().max()) == 0.0 and float(inp.dense()[:, 7].abs().max()) == 0.0
    np.testing.assert_allclose(out.dense().numpy(), CCAProblem(*covs).transform(0.1)[0].numpy(), atol=1e-9)
    _, _, covs = _sample_poor_problem(samples=150)  # rank 149 of 300: factors would cost more than the matrix
    out, _ = CCAProblem(*covs, samples=150).transform(0.1, compact=True)
    assert isinstance(out, torch.Tensor)


def test_diagonal_plus_low_rank_products_equal_the_dense_matrix() -> None:
    from ccatoolkit.analysis.linalg import DiagonalPlusLowRank

    g = torch.Generator().manual_seed(1)
    d, L, R = (torch.randn(*shape, dtype=torch.float64, generator=g) for shape in ((30,), (30, 4), (30, 4)))
    M = DiagonalPlusLowRank(d, L, R)
    dense = torch.diag(d) + L @ R.T
    x = torch.randn(30, 7, dtype=torch.float64, generator=g)
    X = torch.randn(30, 50, dtype=torch.float64, generator=g)
    G = X @ X.T
    np.testing.assert_allclose(M.dense().numpy(), dense.numpy())
    np.testing.assert_allclose((M @ x).numpy(), (dense @ x).numpy(), atol=1e-12)
    np.testing.assert_allclose((M @ x[:, 0]).numpy(), (dense @ x[:, 0]).numpy(), atol=1e-12)
    np.testing.assert_allclose((M.T @ x).numpy(), (dense.T @ x).numpy(), atol=1e-12)
    np.testing.assert_allclose(M.diagonal_of_congruence(G).numpy(), torch.diagonal(dense @ G @ dense.T).numpy(),
                               rtol=1e-10)
    assert (M @ x.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="n x n"):
        DiagonalPlusLowRank(d, L, R[:, :3])


def test_multiview_cca_recovers_maps_for_three_views() -> None:
    A = _features(n=6, seed=6)
    rng = np.random.default_rng(7)
    Ms = [np.eye(6)] + [rng.normal(size=(6, 6)) + 3 * np.eye(6) for _ in range(2)]
    views = [A @ M.T for M in Ms]
    covs = [[_cov(X, Y) for Y in views] for X in views]
    res = multiview_cca_transforms(covs, reference=0, ridge=1e-10)
    np.testing.assert_allclose(res[0][0], np.eye(6))
    for M, (out, inp) in zip(Ms[1:], res[1:]):
        np.testing.assert_allclose(out, np.linalg.inv(M), atol=1e-4)
        np.testing.assert_allclose(out @ inp, np.eye(6), atol=1e-6)
    # another reference: everything lands in view 1's units
    res1 = multiview_cca_transforms(covs, reference=1, ridge=1e-10)
    np.testing.assert_allclose(res1[0][0], Ms[1], atol=1e-4)


@pytest.mark.parametrize("allow_within_model", [True, False])
@pytest.mark.parametrize("n_models", [2, 3])
def test_zipit_pairs_permuted_copies(allow_within_model: bool, n_models: int) -> None:
    A = _features(n=8, seed=8)
    rng = np.random.default_rng(9)
    perms = [np.arange(8)] + [rng.permutation(8) for _ in range(n_models - 1)]
    views = [A[:, np.argsort(p)] for p in perms]  # view k's neuron perms[k][i] is A's neuron i
    X = np.concatenate(views, axis=1)
    groups = zipit_groups(_corr(X, X), n_models, allow_within_model=allow_within_model)
    assert len(groups) == 8
    expected = sorted(sorted(k * 8 + perms[k][i] for k in range(n_models)) for i in range(8))
    assert sorted(sorted(g) for g in groups) == expected
    pairs = zipit_transforms(_corr(X, X), n_models, allow_within_model=allow_within_model)
    merged = sum((out / n_models) @ v.T for (out, _), v in zip(pairs, views))  # sum_k M_k z_k
    for (out, inp), v in zip(pairs, views):
        np.testing.assert_allclose((inp @ merged).T, v, atol=1e-12)  # unmerge gives each model back
        np.testing.assert_allclose(out.sum(1), 1.0)  # N * M_k rows: one member of each model per group


def test_zipit_within_model_merges_and_uncapped_fallback() -> None:
    rng = np.random.default_rng(10)
    base = rng.normal(size=(500, 3))
    a = np.concatenate([base[:, :1], base[:, :1] + 1e-3 * rng.normal(size=(500, 1)), base[:, 1:2]], axis=1)
    b = np.concatenate([base[:, 2:3], -base[:, 1:2], rng.normal(size=(500, 1))], axis=1)
    X = np.concatenate([a, b], axis=1)
    groups = zipit_groups(_corr(X, X), 2, allow_within_model=True)
    assert sorted(groups[0] + groups[1] + groups[2]) == list(range(6))
    assert [0, 1] in [sorted(g) for g in groups]  # the two near-identical features of model 0 merged
    # N = 3 with groups capped at 3 members: always ends with `size` groups covering every feature
    X3 = rng.normal(size=(300, 15))
    groups3 = zipit_groups(_corr(X3, X3), 3, allow_within_model=True)
    assert len(groups3) == 5 and sorted(sum(groups3, [])) == list(range(15))


def test_weight_matching_recovers_planted_permutation() -> None:
    from ccatoolkit.merging.graph.trace import merge_graph
    from ccatoolkit.zoo.models import MLP
    from ccatoolkit.merging.transform import apply_permutations, random_permutations

    model = MLP(depth=3, width=16, in_shape=(10,))
    graph = merge_graph(model)
    perms = random_permutations(graph, torch.Generator().manual_seed(3))
    permuted = apply_permutations(model, graph, perms)
    found = weight_matching(model.state_dict(), permuted.state_dict(), graph, seed=1)
    # found maps the permuted model back: permuted[found[i]] is model's neuron i
    back = apply_permutations(permuted, graph, {s: torch.as_tensor(p) for s, p in found.items()})
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value)


def test_multiview_cca_with_two_views_equals_pairwise_cca() -> None:
    A, B = _features(n=7, seed=11), _features(n=7, seed=12)
    B = B + 0.5 * A
    covs = [[_cov(X, Y) for Y in (A, B)] for X in (A, B)]
    out_mv, inp_mv = multiview_cca_transforms(covs, ridge=1e-2)[1]
    out, inp = cca_transform(covs[0][0], covs[1][1], covs[0][1], ridge=1e-2)
    np.testing.assert_allclose(out_mv, out, atol=1e-8)
    np.testing.assert_allclose(inp_mv, inp, atol=1e-8)
    A[:, 2] = 0.0  # a dead neuron: the null direction's map is arbitrary up to sign, but stays bounded
    covs = [[_cov(X, Y) for Y in (A, B)] for X in (A, B)]
    out_mv, inp_mv = multiview_cca_transforms(covs, ridge=1e-2)[1]
    live = np.ones(7, dtype=bool)
    live[2] = False
    np.testing.assert_allclose((out_mv @ inp_mv)[np.ix_(live, live)], np.eye(6), atol=1e-8)
    assert np.all(out_mv[2] == 0) and np.all(inp_mv[:, 2] == 0)  # nothing maps onto the dead neuron
    assert np.abs(out_mv).max() < 10 * np.abs(cca_transform(covs[0][0], covs[1][1], covs[0][1])[0]).max()


def test_polar_factor_uses_the_eigendecomposition_only_where_it_is_accurate() -> None:
    """Well conditioned: the eigh route (plus a Newton-Schulz step) gives the SVD's polar factor to 1e-12 and is
    orthogonal to rounding. Singular or ill-conditioned (cond > 1e4): the SVD itself, bit for bit."""
    from ccatoolkit.analysis.linalg import polar_factor

    g = torch.Generator().manual_seed(0)
    eye = torch.eye(60, dtype=torch.float64)
    Q1, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64, generator=g))

    def svd_polar(A: torch.Tensor) -> torch.Tensor:
        U, _, Vh = torch.linalg.svd(A)
        return U @ Vh

    well = Q1 @ torch.diag(torch.logspace(0, -3, 60, dtype=torch.float64)) @ Q2.T  # cond 1e3
    R = polar_factor(well)
    assert (R - Q1 @ Q2.T).abs().max() < 1e-12
    assert (R.T @ R - eye).abs().max() < 1e-13
    for low in (0.0, 1e-6):  # singular; cond 1e6
        A = Q1 @ torch.diag(torch.linspace(1.0, low, 60, dtype=torch.float64)) @ Q2.T
        assert torch.equal(polar_factor(A), svd_polar(A))
        assert (polar_factor(A).T @ polar_factor(A) - eye).abs().max() < 1e-12


def test_cca_from_samples_equals_cca_from_their_covariances() -> None:
    """``CCAProblem.of_samples`` (thin SVDs of the centred samples, no n x n matrix) gives the maps that the
    covariances give, dead channels included."""
    from ccatoolkit.merging.align.cca import CCAProblem

    A, B, covs = _sample_poor_problem(dead=5)
    from_samples = CCAProblem.of_samples(torch.as_tensor(A.T), torch.as_tensor(B.T))
    from_covs = CCAProblem(*covs, samples=60)
    assert from_samples.rank == from_covs.rank == 59 and from_samples.a.partial
    for ridge in (0.0, 0.1):
        for got, want in zip(from_samples.transform(ridge), from_covs.transform(ridge)):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-8 * float(want.abs().max()))
    with pytest.raises(ValueError, match="half as many samples"):
        CCAProblem.of_samples(torch.as_tensor(A[:, :100].T), torch.as_tensor(B[:, :100].T))
