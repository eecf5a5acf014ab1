"""Streaming activation statistics against numpy/scipy on all activations held at once."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from ccatoolkit.analysis.capture import UnknownLayerError, capture
from ccatoolkit.zoo.models import MLP, ResNet20
from ccatoolkit.analysis.stats import (
    JointStats,
    StatisticsCollector,
    canonical_correlations,
    canonical_correlations_from_cov,
    collect_statistics,
    correlation_matrix,
    inverse_sqrt,
)


def _samples(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N * prod(spatial), C): every position a sample of C channels."""
    return t.transpose(0, 1).reshape(t.shape[1], -1).T if t.dim() > 2 else t


def _all_activations(models: list[nn.Module], batches: list[torch.Tensor], layers: list[str]) -> np.ndarray:
    """Joint samples (rows) of all models' channels (columns), pooled over ``layers``, held at once."""
    rows = []
    for x in batches:
        caches = []
        for m in models:
            m.eval()
            with capture(m, layers) as cache, torch.no_grad():
                m(x)
            caches.append(cache)
        for name in layers:
            rows.append(torch.cat([_samples(c[name]) for c in caches], dim=1).double())
    return torch.cat(rows).numpy()


def _resnets(dtype: torch.dtype = torch.float32) -> list[nn.Module]:
    torch.manual_seed(1)
    return [ResNet20(width=1, in_shape=(1, 8, 8)).to(dtype) for _ in range(2)]


def _batches(n: int, shape: tuple[int, ...], size: int = 6, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(size, *shape, generator=g, dtype=dtype) + 0.5 for _ in range(n)]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_means_and_covariances_equal_numpy_conv_pooled(dtype: torch.dtype, tol: float) -> None:
    models = _resnets(dtype)
    batches = _batches(2, (1, 8, 8), dtype=dtype)
    layers = {"stream": ["stem.relu", "layer1.0.relu2", "layer1.1.relu2"], "inner": ["layer2.0.relu1"]}
    stats = collect_statistics(models, batches, layers, progress=False)
    for space, names in layers.items():
        z = _all_activations(models, batches, names)
        s = stats[space]
        assert s.count == z.shape[0]
        assert s.sizes == [z.shape[1] // 2] * 2
        assert s.sum.dtype == torch.float64 and s.gram.dtype == torch.float64
        scale = np.abs(np.cov(z.T)).max()
        np.testing.assert_allclose(s.mean().numpy(), z.mean(0), atol=tol * scale)
        np.testing.assert_allclose(s.joint_cov().numpy(), np.cov(z.T), atol=tol * scale)
        np.testing.assert_allclose(s.gram.numpy(), z.T @ z, rtol=tol, atol=tol * np.abs(z.T @ z).max())
        c = s.sizes[0]
        np.testing.assert_allclose(s.cov(0, 1).numpy(), np.cov(z.T)[:c, c:], atol=tol * scale)
        np.testing.assert_allclose(s.mean(1).numpy(), z[:, c:].mean(0), atol=tol * scale)


def test_spatial_positions_are_samples() -> None:
    models = _resnets()
    batches = _batches(2, (1, 8, 8), size=5)
    stats = collect_statistics(models, batches, ["stem.relu", "layer2.0.relu1", "layer3.2.relu2", "head"],
                               progress=False, warn=False)
    assert stats["stem.relu"].count == 2 * 5 * 8 * 8
    assert stats["layer2.0.relu1"].count == 2 * 5 * 4 * 4
    assert stats["layer3.2.relu2"].count == 2 * 5 * 2 * 2
    assert stats["head"].count == 2 * 5
    assert stats["layer3.2.relu2"].sizes == [64, 64]
    assert stats["head"].gram.shape == (20, 20)


def test_mlp_linear_features_and_correlations_match_numpy() -> None:
    torch.manual_seed(3)
    models = [MLP(depth=2, width=12, in_shape=(5,)).double() for _ in range(3)]
    batches = _batches(4, (5,), size=16, dtype=torch.float64)
    stats = collect_statistics(models, batches, ["relu1", "fc2"], progress=False)
    z = _all_activations(models, batches, ["relu1"])
    s = stats["relu1"]
    assert s.count == 64 and s.sizes == [12, 12, 12] and s.num_models == 3
    np.testing.assert_allclose(s.cov(2).numpy(), np.cov(z[:, 24:].T), atol=1e-12)
    ref = np.corrcoef(z.T)[:12, 12:24]
    alive_a = z[:, :12].std(0) > 0
    alive_b = z[:, 12:24].std(0) > 0
    ref = np.where(alive_a[:, None] & alive_b[None, :], np.nan_to_num(ref), 0.0)
    corr = s.corr(0, 1).numpy()
    assert np.isfinite(corr).all()
    np.testing.assert_allclose(corr, ref, atol=1e-10)


def test_dead_neurons_give_zero_correlation_not_nan() -> None:
    torch.manual_seed(4)
    models = [MLP(depth=1, width=6, in_shape=(4,)) for _ in range(2)]
    with torch.no_grad():
        models[0].fc1.weight[2].zero_()
        models[0].fc1.bias[2] = -1.0  # dead ReLU: always 0
        models[1].fc1.weight[4].zero_()
        models[1].fc1.bias[4] = 0.7  # constant 0.7
    s = collect_statistics(models, _batches(3, (4,), size=20), ["relu1"], progress=False)["relu1"]
    corr = s.corr(0, 1)
    assert torch.isfinite(corr).all()
    assert (corr[2] == 0).all() and (corr[:, 4] == 0).all()
    assert not s.alive(0)[2] and s.alive(0).sum() == 5 and not s.alive(1)[4]
    rho = s.canonical_correlations(0, 1)
    assert torch.isfinite(rho).all() and rho.shape == (6,) and rho.min() >= 0 and rho.max() <= 1
    corr_same = collect_statistics([models[0], models[0]], _batches(2, (4,), size=20), ["relu1"],
                                   progress=False)["relu1"].corr(0, 1)
    torch.testing.assert_close(torch.diagonal(corr_same), torch.tensor([1.0, 1, 0, 1, 1, 1], dtype=torch.float64))


def test_canonical_correlations_match_subspace_angles() -> None:
    """Canonical correlations = cosines of the principal angles between the centred data's column spaces."""
    rng = np.random.default_rng(0)
    n, a, b = 400, 5, 4
    shared = rng.normal(size=(n, 3))
    xa = shared @ rng.normal(size=(3, a)) + 0.5 * rng.normal(size=(n, a)) + 3.0
    xb = shared @ rng.normal(size=(3, b)) + 0.8 * rng.normal(size=(n, b)) - 1.0
    ca, cb = xa - xa.mean(0), xb - xb.mean(0)
    expected = np.sort(np.cos(scipy.linalg.subspace_angles(ca, cb)))[::-1]
    joint = np.concatenate([xa, xb], 1)
    stats = JointStats(n, torch.tensor(joint.sum(0)), torch.tensor(joint.T @ joint), [a, b])
    rho = canonical_correlations_from_cov(stats.cov(0), stats.cov(1), stats.cov(0, 1))
    assert rho.shape == (b,) and torch.all(rho[:-1] >= rho[1:])
    np.testing.assert_allclose(rho.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(stats.canonical_correlations(0, 1).numpy(), expected, atol=1e-6)
    # the canonical directions whiten and diagonalise
    rho2, dir_a, dir_b = canonical_correlations_from_cov(stats.cov(0), stats.cov(1), stats.cov(0, 1),
                                                         return_vectors=True)
    np.testing.assert_allclose((dir_a.T @ stats.cov(0) @ dir_a).numpy(), np.eye(b), atol=1e-8)
    np.testing.assert_allclose((dir_a.T @ stats.cov(0, 1) @ dir_b).numpy(), np.diag(rho2.numpy()), atol=1e-8)


def test_canonical_correlations_of_models_match_subspace_angles() -> None:
    models = _resnets(torch.float64)
    batches = _batches(3, (1, 8, 8), dtype=torch.float64)
    layer = "layer1.2.relu1"  # 16 channels, 3*6*8*8 = 1152 samples
    rho = canonical_correlations(models[0], models[1], batches, layer, ridge=0.0, progress=False)
    z = _all_activations(models, batches, [layer])
    z = z - z.mean(0)
    expected = np.sort(np.cos(scipy.linalg.subspace_angles(z[:, :16], z[:, 16:])))[::-1]
    assert rho.device.type == "cpu" and rho.shape == (16,)
    np.testing.assert_allclose(rho.numpy(), expected, atol=1e-6)
    same = canonical_correlations(models[0], models[0], batches, layer, ridge=0.0, progress=False)
    np.testing.assert_allclose(same.numpy(), 1.0, atol=1e-6)
    corr = correlation_matrix(models[0], models[1], batches, layer, progress=False)
    np.testing.assert_allclose(corr.numpy(), np.corrcoef(z.T)[:16, 16:], atol=1e-8)


def test_ridge_is_scale_free_and_shrinks() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6))
    y = x[:, :4] + 0.3 * rng.normal(size=(300, 4))
    cov = np.cov(np.concatenate([x, y], 1).T)
    blocks = [torch.tensor(cov[:6, :6]), torch.tensor(cov[6:, 6:]), torch.tensor(cov[:6, 6:])]
    r0 = canonical_correlations_from_cov(*blocks, ridge=0.0)
    r1 = canonical_correlations_from_cov(*blocks, ridge=0.1)
    r1_scaled = canonical_correlations_from_cov(*[b * 1e4 for b in blocks], ridge=0.1)
    torch.testing.assert_close(r1, r1_scaled)
    assert torch.all(r1 < r0)
    with pytest.raises(ValueError, match="ridge"):
        canonical_correlations_from_cov(*blocks, ridge=-1.0)


def test_rank_deficient_statistics_warn_and_stay_finite() -> None:
    torch.manual_seed(5)
    models = [MLP(depth=1, width=32, in_shape=(3,)) for _ in range(2)]
    batches = _batches(1, (3,), size=10)  # 10 samples, 64 channels, rank 3 inputs
    with pytest.warns(RuntimeWarning, match="rank-deficient"):
        stats = collect_statistics(models, batches, ["relu1"], progress=False)
    s = stats["relu1"]
    w = inverse_sqrt(s.cov(0))
    assert torch.isfinite(w).all()
    with pytest.warns(RuntimeWarning, match=r"ridge=0\.01"):
        rho = canonical_correlations(models[0], models[1], batches, "relu1", ridge=0.01, progress=False)
    assert torch.isfinite(rho).all() and rho.min() >= 0 and rho.max() <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rho0 = canonical_correlations_from_cov(s.cov(0), s.cov(1), s.cov(0, 1), ridge=0.0)
    assert torch.isfinite(rho0).all() and rho0.max() <= 1


def test_sums_combine_across_data_splits_and_limits() -> None:
    models = _resnets()
    batches = _batches(4, (1, 8, 8))
    full = collect_statistics(models, batches, ["layer2.1.relu2"], progress=False)["layer2.1.relu2"]
    a = collect_statistics(models, batches[:2], ["layer2.1.relu2"], progress=False)["layer2.1.relu2"]
    b = collect_statistics(models, batches[2:], ["layer2.1.relu2"], progress=False)["layer2.1.relu2"]
    both = a + b
    assert both.count == full.count
    torch.testing.assert_close(both.gram, full.gram, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(both.cov(0, 1), full.cov(0, 1), rtol=1e-5, atol=1e-7)
    limited = collect_statistics(models, batches, ["head"], max_batches=3, progress=False, warn=False)["head"]
    assert limited.count == 18
    limited = collect_statistics(models, batches, ["head"], max_samples=8, progress=False, warn=False)["head"]
    assert limited.count == 8
    with pytest.raises(ValueError, match="max_batches"):
        collect_statistics(models, batches, ["head"], max_batches=0)


def test_statistics_go_on_from_earlier_ones_in_their_own_sums() -> None:
    """``start``: the second half's statistics added into the first half's sums (their Gram matrix taken
    over, not copied) equal one pass over all the data; cross-only statistics cannot go on."""
    models = _resnets()
    batches = _batches(4, (1, 8, 8))
    layers = {"stream": ["layer2.1.relu2"], "head": ["head"]}
    full = collect_statistics(models, batches, layers, progress=False, warn=False)
    second = collect_statistics(models, batches[2:], layers, progress=False, warn=False)
    first = collect_statistics(models, batches[:2], layers, progress=False, warn=False)
    added = {name: first[name] + second[name] for name in layers}
    gram = first["stream"].gram
    both = collect_statistics(models, batches[2:], layers, progress=False, warn=False, start=first)
    assert both["stream"].gram.data_ptr() == gram.data_ptr() and first["stream"].gram is None  # taken over
    for name in layers:
        assert both[name].count == full[name].count
        # the same float32 batch products as adding two sets of statistics: equal to float64 rounding
        torch.testing.assert_close(both[name].sum, added[name].sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(both[name].gram, added[name].gram, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(both[name].cov(0, 1), full[name].cov(0, 1), rtol=1e-5, atol=1e-7)
    cross = collect_statistics(models, batches[:2], layers, progress=False, warn=False, reference=0)
    with pytest.raises(ValueError, match="only full statistics"):
        collect_statistics(models, batches[2:], layers, progress=False, warn=False, start=cross)
    with pytest.raises(ValueError, match="no space 'other'"):
        collect_statistics(models, batches[2:], layers, progress=False, warn=False,
                           start={"other": full["head"]})


def test_models_unchanged_eval_during_collection_modes_restored() -> None:
    seen: list[bool] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(self.training)
            return x

    models = []
    for seed in (6, 7):
        torch.manual_seed(seed)
        models.append(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), Probe(), nn.ReLU()).train())
    models[1][1].eval()  # a mixed mode must be restored exactly
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    collect_statistics(models, _batches(2, (3,), size=8), ["1", "3"], progress=False)
    assert seen and not any(seen)
    assert models[0].training and models[0][1].training and models[1].training and not models[1][1].training
    for m, state in zip(models, states):
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())  # BN running stats untouched
        assert sum(len(mod._forward_hooks) for mod in m.modules()) == 0


def test_inplace_modified_outputs_are_copied() -> None:
    torch.manual_seed(8)
    models = [nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True)) for _ in range(2)]
    batches = _batches(3, (3,), size=10)
    s = collect_statistics(models, batches, ["0"], progress=False)["0"]
    pre = torch.cat([torch.cat([m[0](x) for m in models], 1) for x in batches]).detach().double()
    torch.testing.assert_close(s.mean(), pre.mean(0), rtol=1e-5, atol=1e-6)
    assert (s.mean() < 0).any()  # the pre-ReLU values were used, not the in-place ReLU'd ones


def test_statistics_memory_does_not_grow() -> None:
    models = _resnets()
    batches = _batches(5, (1, 8, 8))
    collector = StatisticsCollector(models, {"stream": ["layer1.0.relu2", "layer1.1.relu2"]})
    with collector.attached():
        collector.update(batches[0])
        first = collector.nbytes()
        for x in batches[1:]:
            collector.update(x)
        assert collector.nbytes() == first
    assert first["sums"] == 8 * (32 * 32 + 32) + 4 * 32 * 33 + 4 * 32 + 32  # s2, s1, float32 Gram, shift, flags
    assert collector.result()["stream"].count == 5 * 6 * 64 * 2


def test_a_wide_space_adds_into_the_float64_sums_without_a_running_gram(monkeypatch) -> None:
    """Wide spaces (vgg11_bn's 4096-wide classifier) hold no running Gram; the sums are the same."""
    import ccatoolkit.analysis.stats as stats_module

    models = _resnets()
    batches = _batches(4, (1, 8, 8))
    layers = {"stream": ["layer1.0.relu2", "layer1.1.relu2"], "inner": ["layer2.0.relu1"]}
    kept = collect_statistics(models, batches, layers, progress=False)
    monkeypatch.setattr(stats_module, "LARGE_RUNNING_GRAM", 4 * 32 * 33)  # "inner" (32 + 32 channels), not "stream" (16 + 16)
    collector = StatisticsCollector(models, layers)
    with collector.attached():
        for x in batches:
            collector.update(x)
            assert collector.spaces["inner"].g is None and collector.spaces["stream"].g is not None
    freed = collector.result()
    for name in layers:
        torch.testing.assert_close(freed[name].gram, kept[name].gram, rtol=1e-5, atol=1e-5)  # float32 sums, flushed apart
        torch.testing.assert_close(freed[name].sum, kept[name].sum, rtol=1e-5, atol=1e-5)
    broken = ResNet20(width=1, in_shape=(1, 8, 8))
    broken.load_state_dict(models[1].state_dict())
    with torch.no_grad():
        broken.layer2[0].conv1.weight[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*layer2\.0\.relu1.*model 1"):  # found at the flush
        collect_statistics([models[0], broken], batches, layers, progress=False)


def test_a_wide_space_on_few_samples_keeps_them_instead_of_their_gram(monkeypatch) -> None:
    """A wide space seen on at most half as many samples as it has channels keeps the samples (an MLP's
    2 x 64 hidden channels on 24 inputs): its covariances, correlations and variances equal numpy's on all
    activations; past half the width the kept samples go into the Gram matrix and it goes on; statistics
    that go on from kept samples, and two such sets added, stay samples."""
    import ccatoolkit.analysis.stats as stats_module

    monkeypatch.setattr(stats_module, "LARGE_RUNNING_GRAM", 4 * 128 * 129 - 1)  # 2 x 64 channels: "wide"
    torch.manual_seed(0)
    models = [MLP(depth=2, width=64, in_shape=(1, 8, 8)) for _ in range(2)]
    batches = _batches(9, (1, 8, 8), size=8)
    few, more = batches[:3], batches  # 24 samples (<= 64: kept), 72 (> 64 at the 9th batch: a Gram matrix)
    for data in (few, more):
        st = collect_statistics(models, data, ["relu1"], progress=False, warn=False)["relu1"]
        X = _all_activations(models, data, ["relu1"])
        assert (st.samples is not None) == (data is few) and (st.gram is None) == (data is few)
        np.testing.assert_allclose(st.cov(0, 1).numpy(), np.cov(X.T)[:64, 64:], atol=1e-6)
        np.testing.assert_allclose(st.joint_cov().numpy(), np.cov(X.T), atol=1e-6)
        np.testing.assert_allclose(st.var(1).numpy(), X[:, 64:].var(0, ddof=1), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(st.mean(0).numpy(), X[:, :64].mean(0), rtol=1e-6, atol=1e-7)
    collector = StatisticsCollector(models, ["relu1"])
    with collector.attached():
        for x in few:
            collector.update(x)
    sums = collector.spaces["relu1"]
    assert sums.sampling and sums.s2 is None and sums.nbytes() < 128 * 128 * 8 / 4
    assert collector.result()["relu1"].nbytes() == 128 * 24 * 8 + 128 * 8  # the samples and their sum
    first = collect_statistics(models, batches[:2], ["relu1"], progress=False, warn=False)
    assert first["relu1"].samples is not None
    both = collect_statistics(models, batches[2:3], ["relu1"], progress=False, warn=False, start=first)["relu1"]
    assert both.samples is not None and both.count == 24 and first["relu1"].samples is None  # consumed
    np.testing.assert_allclose(both.cov(0, 1).numpy(), np.cov(_all_activations(models, few, ["relu1"]).T)[:64, 64:],
                               atol=1e-6)
    a, b = (collect_statistics(models, part, ["relu1"], progress=False, warn=False)["relu1"]
            for part in (batches[:2], batches[2:3]))
    added = a + b
    assert added.samples is not None and added.count == 24
    torch.testing.assert_close(added.cov(1), both.cov(1))
    past = collect_statistics(models, batches[3:], ["relu1"], progress=False, warn=False,
                              start={"relu1": added})["relu1"]  # 24 + 48 samples: into the Gram matrix
    assert past.gram is not None and past.samples is None and past.count == 72
    np.testing.assert_allclose(past.cov(0, 1).numpy(), np.cov(_all_activations(models, more, ["relu1"]).T)[:64, 64:],
                               atol=1e-5)


def test_errors_for_bad_inputs() -> None:
    models = _resnets()
    batches = _batches(1, (1, 8, 8))
    with pytest.raises(ValueError, match=r"stem\.conv\.weight.*\(16, 1, 3, 3\) in model 0 but \(32, 1, 3, 3\) in model 1"):
        collect_statistics([models[0], ResNet20(width=2, in_shape=(1, 8, 8))], batches, ["stem.relu"])
    with pytest.raises(ValueError, match="model 1 has no"):
        collect_statistics([models[0], MLP(depth=1, width=4, in_shape=(1, 8, 8))], batches, ["head"])
    with pytest.raises(UnknownLayerError, match=r"stem\.rellu.*Did you mean 'stem\.relu'.*Capturable layers"):
        collect_statistics(models, batches, ["stem.rellu"])
    with pytest.raises(ValueError, match="no batches"):
        collect_statistics(models, [], ["stem.relu"], progress=False)
    with pytest.raises(ValueError, match="different devices"):
        collect_statistics([models[0], ResNet20(width=1, in_shape=(1, 8, 8)).to("meta")], batches, ["head"])
    with pytest.raises(ValueError, match="two spaces"):
        collect_statistics(models, batches, {"a": ["stem.relu"], "b": ["stem.relu"]})
    with pytest.raises(TypeError, match="batch"):
        collect_statistics(models, [{"x": batches[0]}], ["head"], progress=False)
    broken = ResNet20(width=1, in_shape=(1, 8, 8))
    broken.load_state_dict(models[1].state_dict())
    with torch.no_grad():
        broken.layer2[0].conv1.weight[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*layer2\.0\.relu1.*model 1"):
        collect_statistics([models[0], broken], batches, ["stem.relu", "layer2.0.relu1"], progress=False)


def test_top_eigenpairs_are_those_of_the_full_decomposition() -> None:
    from ccatoolkit.analysis.linalg import top_eigenpairs

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(60, 40, dtype=torch.float64, generator=gen)
    S = A @ A.T  # rank 40: twenty zero eigenvalues below the top ones
    vals, vecs = torch.linalg.eigh(S)
    top_vals, top_vecs = top_eigenpairs(S, 12)
    assert top_vals.shape == (12,) and top_vecs.shape == (60, 12)
    assert bool((top_vals[:-1] >= top_vals[1:]).all())  # descending
    torch.testing.assert_close(top_vals, vals.flip(0)[:12], rtol=1e-10, atol=1e-10)
    ref = vecs.flip(1)[:, :12]
    torch.testing.assert_close(top_vecs @ top_vecs.T, ref @ ref.T, rtol=0, atol=1e-9)  # same subspace, any signs
    torch.testing.assert_close(S @ top_vecs, top_vecs * top_vals, rtol=0, atol=1e-8)
    all_vals, _ = top_eigenpairs(S, 60)
    torch.testing.assert_close(all_vals, vals.flip(0))
    with pytest.raises(ValueError, match="k must lie"):
        top_eigenpairs(S, 0)


@pytest.mark.parametrize("reference", [0, 2])
def test_cross_only_statistics_equal_the_joint_ones_where_they_exist(reference: int) -> None:
    """``reference=r``: the covariances of model r with each other model and every variance, as the full
    statistics give them, in less memory; every other block is refused with a message naming the fix."""
    torch.manual_seed(1)
    models = [ResNet20(width=1, in_shape=(1, 8, 8)) for _ in range(3)]
    batches = _batches(4, (1, 8, 8))
    layers = {"stream": ["stem.relu", "layer1.0.relu2"], "inner": ["layer2.0.relu1"], "head": ["head"]}
    full = collect_statistics(models, batches, layers, progress=False, warn=False)
    collector = StatisticsCollector(models, layers, reference=reference)
    with collector.attached():
        for x in batches:
            collector.update(x)
    cross_bytes = collector.nbytes()["sums"]
    stats = collector.result()
    others = [k for k in range(3) if k != reference]
    for name, s in stats.items():
        f = full[name]
        assert s.gram is None and s.reference == reference and sorted(s.cross) == others and s.count == f.count
        torch.testing.assert_close(s.mean(), f.mean(), rtol=1e-6, atol=1e-6)
        for k in range(3):
            torch.testing.assert_close(s.var(k), f.var(k), rtol=1e-5, atol=1e-6)
        for k in others:
            torch.testing.assert_close(s.cov(reference, k), f.cov(reference, k), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s.cov(k, reference), f.cov(k, reference), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s.corr(reference, k), f.corr(reference, k), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match=rf"cross-only \(collected with reference={reference}\).*reference=None"):
            s.cov(others[0], others[1])
        with pytest.raises(ValueError, match="cross-only"):
            s.cov(reference)
        with pytest.raises(ValueError, match="reference=None"):
            s.joint_cov()
    full_collector = StatisticsCollector(models, layers)
    with full_collector.attached():
        full_collector.update(batches[0])
    assert cross_bytes < 0.5 * full_collector.nbytes()["sums"]
    # sums over two halves add up; kinds do not mix
    a = collect_statistics(models, batches[:2], layers, progress=False, warn=False, reference=reference)
    b = collect_statistics(models, batches[2:], layers, progress=False, warn=False, reference=reference)
    both = (a["inner"] + b["inner"]).to("cpu")
    torch.testing.assert_close(both.cov(reference, others[1]), full["inner"].cov(reference, others[1]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="different kinds"):
        a["inner"] + full["inner"]
    with pytest.raises(ValueError, match="reference must be a model index"):
        StatisticsCollector(models, layers, reference=3)


def test_micro_batches_bound_the_held_activations_and_keep_the_statistics() -> None:
    """A merge's statistics pass used to hold every capture point of every model for the whole batch (issue 25)."""
    from ccatoolkit.analysis.stats import StatisticsCollector

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()).eval() for _ in range(2)]
    layers = {"a": ["1"], "b": ["3"]}
    per_sample = 2 * 2 * 8 * 16 * 16 * 4  # two points, two models, 8 x 16 x 16 float32 values
    peaks, results = [], []
    for batch in (16, 64, 256):
        x = torch.randn(512, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        collector = StatisticsCollector(models, layers, memory_budget=8 * per_sample)
        with collector.attached():
            for chunk in x.split(batch):
                collector.update(chunk)
        assert collector.micro_batch == 8
        peaks.append(collector.peak_held_bytes)
        results.append(collector.result())
    assert peaks == [8 * per_sample] * 3  # flat in the batch size
    whole = StatisticsCollector(models, layers)  # the default budget takes these small batches whole
    with whole.attached():
        whole.update(x)
    assert whole.micro_batch >= 512 and whole.peak_held_bytes == 512 * per_sample
    for stats in results:
        for name in layers:
            torch.testing.assert_close(stats[name].joint_cov(), whole.result()[name].joint_cov(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(stats[name].mean(), whole.result()[name].mean(), rtol=1e-5, atol=1e-6)
