"""merge / align_to / alignment_transforms / ensemble on tiny models and synthetic data."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ccatoolkit.merging.graph.trace import merge_graph
from ccatoolkit.merging.api import METHODS, Ensemble, align_to, alignment_transforms, ensemble, merge
from ccatoolkit.zoo.models import MLP, VGG11, ResNet20
from ccatoolkit.merging.normalization import reset_bn_stats
from ccatoolkit.merging.transform import (
    apply_permutations,
    apply_transforms,
    random_permutations,
    random_scalings,
)


def _user_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )


FAMILIES = {
    "mlp": (lambda: MLP(depth=2, width=12, in_shape=(6,)), (6,)),
    "mlp_bn": (lambda: MLP(depth=2, width=12, in_shape=(6,), batchnorm=True), (6,)),
    "vgg11": (lambda: VGG11(width=0.125, in_shape=(1, 8, 8)), (1, 8, 8)),
    "resnet20": (lambda: ResNet20(in_shape=(1, 8, 8)), (1, 8, 8)),
    "user_cnn": (_user_cnn, (1, 8, 8)),
}


def _setup(family: str, batches: int = 4):
    build, shape = FAMILIES[family]
    torch.manual_seed(0)
    data = [torch.randn(48, *shape) for _ in range(batches)]
    model = reset_bn_stats(build(), data, progress=False).eval()
    graph = merge_graph(model, example_input=data[0][:2])
    return model, data, graph


def _copies(model, graph, n: int, scaled: bool) -> list[nn.Module]:
    """``n`` function-preserving copies: permuted (and positively rescaled) hidden neurons."""
    out = []
    for seed in range(1, n + 1):
        gen = torch.Generator().manual_seed(seed)
        copy_ = apply_permutations(model, graph, random_permutations(graph, gen))
        if scaled:
            copy_ = apply_transforms(copy_, graph, random_scalings(graph, gen))
        out.append(copy_.eval())
    return out


def _max_err(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merging_function_preserving_copies_gives_back_the_model(family: str) -> None:
    model, data, graph = _setup(family)
    x = data[0]
    with torch.no_grad():
        scale = float(model(x).abs().max())
    cases = [("cca", True, 1), ("permute", False, 1), ("cca", True, 2)]
    if family in ("mlp", "user_cnn"):
        cases += [("permute_weight", False, 1), ("zipit", False, 2), ("cca_multiview", True, 2)]
    if family == "resnet20":
        cases = [("cca", True, 1), ("permute_weight", False, 2)]
    for method, scaled, n_copies in cases:
        others = _copies(model, graph, n_copies, scaled)
        merged = merge([model, *others], method, data, ridge=1e-6, reset_bn=False, progress=False, graph=graph)
        err = _max_err(merged, model, x)
        tol = 2e-3 * scale if scaled else 1e-5 * scale
        assert err <= tol, f"{family}/{method}/{n_copies + 1} models: max output error {err:.3g} > {tol:.3g}"


def test_activation_matching_merge_of_permuted_copy_is_exact_with_bn_reset() -> None:
    model, data, graph = _setup("mlp_bn")
    (other,) = _copies(model, graph, 1, scaled=False)
    merged = merge([other, model], "permute_activation", data, progress=False)  # BN reset on by default
    ref = reset_bn_stats(other, data, progress=False)
    assert _max_err(merged, ref, data[1]) < 1e-4


def test_inputs_unchanged_and_result_is_a_new_model_of_the_same_class() -> None:
    model, data, graph = _setup("mlp_bn")
    (other,) = _copies(model, graph, 1, scaled=False)
    with torch.no_grad():
        other.fc1.weight.add_(0.1 * torch.randn_like(other.fc1.weight))
    before = [copy.deepcopy(m.state_dict()) for m in (model, other)]
    flags = [m.training for m in (model, other)]
    for method in ("average", "cca", "zipit", "permute_weight"):
        merged = merge([model, other], method, data, repair=True, progress=False)
        assert type(merged) is MLP and merged is not model and merged is not other
        assert merged.merge_info["method"] == method
        for m, state, flag in zip((model, other), before, flags):
            assert m.training == flag
            for key, value in state.items():
                assert torch.equal(m.state_dict()[key], value), f"{method} modified {key}"


def test_errors() -> None:
    model, data, graph = _setup("mlp")
    with pytest.raises(ValueError, match="unknown merge method 'foo'.*cca_multiview"):
        merge([model, model], "foo", data)
    with pytest.raises(ValueError, match="at least 2"):
        merge([model], "cca", data)
    with pytest.raises(ValueError, match="different architectures.*fc1"):
        merge([model, MLP(depth=2, width=10, in_shape=(6,))], "cca", data)
    with pytest.raises(ValueError, match="'auto'"):
        merge([model, model], "cca", data, ridge="best")
    with pytest.raises(ValueError, match="val_data"):
        merge([model, model], "cca", data, reference="best")
    with pytest.raises(ValueError, match="needs data"):
        merge([model, model], "cca")
    with pytest.raises(TypeError, match="allow_within_model"):
        merge([model, model], "zipit", data, allow_within=False)
    with pytest.raises(ValueError, match="zipit"):
        align_to(model, model, "zipit", data)
    assert set(METHODS) == {"average", "permute", "permute_weight", "c2m3", "zipit", "cca", "cca_multiview", "ensemble"}


def test_dead_relus_give_no_nan() -> None:
    model, data, graph = _setup("mlp")
    with torch.no_grad():
        model.fc1.weight[:4] = 0.0
        model.fc1.bias[:4] = -1.0  # four dead neurons
    other = MLP(depth=2, width=12, in_shape=(6,)).eval()
    with torch.no_grad():
        other.fc2.weight[:3] = 0.0
        other.fc2.bias[:3] = 0.0
    for method in ("cca", "cca_multiview", "permute", "zipit"):
        for ridge in (0.0, 1e-2):
            merged = merge([model, other], method, data, ridge=ridge, repair=True, progress=False)
            assert all(torch.isfinite(p).all() for p in merged.state_dict().values()), method
            with torch.no_grad():
                assert torch.isfinite(merged(data[0])).all()


def test_ridge_auto_uses_validation_data_and_reference_choice() -> None:
    model, data, graph = _setup("mlp")
    other = MLP(depth=2, width=12, in_shape=(6,)).eval()
    with torch.no_grad():
        labels = [model(x).argmax(1) for x in data]
    val = [(x, y) for x, y in zip(data, labels)]
    merged = merge([other, model], "cca", data, ridge="auto", val_data=val, progress=False,
                   ridge_grid=(1e-3, 1e-1))
    info = merged.merge_info
    assert set(info["ridge_scores"]) == {1e-3, 1e-1}
    assert info["ridge"] == max(info["ridge_scores"], key=info["ridge_scores"].get)
    best = merge([other, model], "average", data, reference="best", val_data=val, progress=False)
    assert best.merge_info["reference"] == 1  # `model` labels its own validation data perfectly
    assert merge([other, model], "permute", data, reference=1, progress=False).merge_info["reference"] == 1


def test_align_to_and_alignment_transforms() -> None:
    model, data, graph = _setup("user_cnn")
    (other,) = _copies(model, graph, 1, scaled=False)
    for method in ("permute", "permute_weight"):
        aligned = align_to(model, other, method, data, progress=False)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(aligned.state_dict()[key], value)
    transforms = alignment_transforms(model, other, "cca", data, ridge=1e-9, progress=False)
    assert set(transforms) == set(graph.names)
    for space in graph.spaces:
        out, inp = transforms[space.name]
        assert out.shape == (space.size, space.size)
        torch.testing.assert_close(out @ inp, torch.eye(space.size, dtype=torch.float64), atol=1e-6, rtol=0)
    ident = alignment_transforms(model, other, "average", data)
    assert all(torch.equal(o, torch.eye(o.shape[0], dtype=torch.float64)) for o, _ in ident.values())


def test_ensemble_is_log_mean_softmax() -> None:
    model, data, graph = _setup("mlp")
    other = MLP(depth=2, width=12, in_shape=(6,)).eval()
    ens = merge([model, other], "ensemble", data)
    assert isinstance(ens, Ensemble) and isinstance(ens, nn.Module)
    x = data[0]
    with torch.no_grad():
        expected = torch.log((model(x).softmax(1) + other(x).softmax(1)) / 2)
        torch.testing.assert_close(ens(x), expected)
        torch.testing.assert_close(ens(x).exp().sum(1), torch.ones(len(x)))
    assert ens.members[0] is not model
    with torch.no_grad():
        assert math.isclose(float(ensemble([model])(x).exp().sum(1).mean()), 1.0, rel_tol=1e-5)


def test_repair_in_merge_matches_endpoint_statistics() -> None:
    model, data, graph = _setup("mlp")
    other = MLP(depth=2, width=12, in_shape=(6,)).eval()
    from ccatoolkit.merging.normalization import channel_stats

    merged = merge([model, other], "permute", data, repair=True, progress=False)
    plain = merge([model, other], "permute", data, repair=False, progress=False)
    perms = alignment_transforms(model, other, "permute", data, progress=False)
    aligned = apply_transforms(other, graph, perms)
    for name in ("fc1", "fc2"):
        target = [channel_stats(m, [name], data)[name] for m in (model, aligned)]
        mean = (target[0][0] + target[1][0]) / 2
        std = (target[0][1] + target[1][1]) / 2
        got = channel_stats(merged, [name], data)[name]
        torch.testing.assert_close(got[0], mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[1], std, atol=1e-5, rtol=1e-4)
    before = channel_stats(plain, ["fc2"], data)["fc2"][1]
    assert not torch.allclose(before, std, atol=1e-3)  # repair changed something


def test_correlation_ridge_rule_scores_held_out_alignment_without_merging(monkeypatch) -> None:
    """ridge_rule="correlation" builds one merge, not one per ridge (the default rule builds one per ridge)."""
    import ccatoolkit.merging.api as api
    import ccatoolkit.merging.combine as combine

    torch.manual_seed(0)
    model, other = MLP(depth=2, width=12, in_shape=(6,)).eval(), MLP(depth=2, width=12, in_shape=(6,)).eval()
    data = [torch.randn(32, 6, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    built = []
    original = combine.merged_model
    for module in (api, combine):  # the final merge (api) and the ridge candidates (combine)
        monkeypatch.setattr(module, "merged_model", lambda *a, **k: built.append(1) or original(*a, **k))
    merged = merge([model, other], "cca", data, progress=False, ridge_grid=(1e-4, 1e-2, 1.0), ridge_rule="correlation")
    info = merged.merge_info
    assert info["ridge_selection"].startswith("correlation") and len(built) == 1
    built.clear()
    default = merge([model, other], "cca", data, progress=False, ridge_grid=(1e-4, 1e-2, 1.0))
    assert default.merge_info["ridge_selection"].startswith("agreement") and len(built) == 4  # 3 candidates + 1
    assert set(info["ridge_scores"]) == {1e-4, 1e-2, 1.0} and all(-1 <= v <= 1 for v in info["ridge_scores"].values())
    assert info["ridge"] == max(info["ridge_scores"], key=info["ridge_scores"].get)
    with pytest.raises(ValueError, match="ridge_rule must be one of"):
        merge([model, other], "cca", data, progress=False, ridge_rule="accuracy")


def test_held_out_correlation_equals_the_correlation_of_transformed_features() -> None:
    from ccatoolkit.analysis.stats import collect_statistics
    from ccatoolkit.merging.ridge import held_out_correlation

    torch.manual_seed(0)
    models = [MLP(depth=2, width=12, in_shape=(6,)).eval() for _ in range(2)]
    graph = merge_graph(models[0])
    data = [torch.randn(64, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    T = {s.name: (torch.randn(s.size, s.size, dtype=torch.float64), None) for s in graph}
    held = collect_statistics(models, data, {s.name: s.capture for s in graph}, progress=False)
    expected = []
    for space in graph:
        feats = [torch.cat([_captured(m, space.capture[0], x) for x in data]).double() for m in models]
        a, b = feats[0], feats[1] @ T[space.name][0].T
        a, b = a - a.mean(0), b - b.mean(0)
        denom = a.norm(dim=0) * b.norm(dim=0)  # a dead ReLU neuron counts as correlation 0
        expected.append(float(torch.where(denom > 0, (a * b).sum(0) / denom, torch.zeros_like(denom)).mean()))
    got = held_out_correlation(held, graph, 0, [None, T])
    assert math.isclose(got, sum(expected) / len(expected), rel_tol=1e-6)


def _captured(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    from ccatoolkit.analysis.capture import capture

    with capture(model, [layer]) as cache, torch.no_grad():
        model(x)
    return cache[layer].clone()


@pytest.mark.parametrize("batchnorm", [False, True])
def test_ridge_sweep_builds_merges_model_at_every_ridge(batchnorm: bool) -> None:
    """A RidgeSweep keeps the statistics; each ridge's model is the one merge() builds for it."""
    from ccatoolkit.merging.api import RidgeSweep
    from ccatoolkit.zoo.models import MLP

    torch.manual_seed(0)
    models = [MLP(depth=2, width=8, in_shape=(1, 4, 4), num_classes=3, batchnorm=batchnorm).eval() for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 1, 4, 4, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(3)]
    sweep = RidgeSweep(models, method="cca", data=data)
    for ridge in (0.01, 1.0):
        swept = sweep(ridge)
        direct = merge(models, method="cca", data=data, ridge=ridge, progress=False)
        for (name, p), q in zip(swept.state_dict().items(), direct.state_dict().values()):
            torch.testing.assert_close(p, q, msg=name)
        assert swept.merge_info["ridge"] == ridge and swept.merge_info["ridge_selection"] == "given"
    with pytest.raises(ValueError, match="CCA method"):
        RidgeSweep(models, method="permute", data=data)


def test_a_new_method_is_one_registry_entry_with_its_options_in_its_signature(monkeypatch) -> None:
    """A solver registered under a name merges through the whole pipeline; its keyword arguments are its options."""
    from ccatoolkit.merging import methods

    torch.manual_seed(0)
    models = [MLP(depth=2, width=8, in_shape=(6,)).eval() for _ in range(2)]
    data = [torch.randn(32, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    seen = {}

    def scaled_identity(problem: methods.AlignmentProblem, *, scale: float = 1.0) -> methods.Alignment:
        seen["scale"] = scale  # positive rescaling: exact through ReLU, so the merge is the plain average's
        eye = {s.name: (scale * torch.eye(s.size, dtype=torch.float64), torch.eye(s.size, dtype=torch.float64) / scale)
               for s in problem.graph.spaces}
        return methods.Alignment([None if k == problem.reference else eye for k in range(len(problem.models))])

    entry = methods.Method("scaled_identity", scaled_identity, "identity maps times a positive scale")
    monkeypatch.setitem(methods.REGISTRY, entry.name, entry)
    assert entry.options == ("scale",)
    merged = merge(models, "scaled_identity", data, repair=False, progress=False, scale=1.0)
    plain = merge(models, "average", data, repair=False, progress=False)
    assert merged.merge_info["method"] == "scaled_identity" and seen == {"scale": 1.0}
    for p, q in zip(merged.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(p, q)
    with pytest.raises(TypeError, match=r"unknown option\(s\) seed for method 'scaled_identity' \(its options: scale\); "
                                        r"'seed' is an option of permute_weight"):
        merge(models, "scaled_identity", data, progress=False, seed=1)


def test_every_method_declares_its_needs_and_refuses_others_options() -> None:
    from ccatoolkit.merging.methods import REGISTRY

    assert tuple(REGISTRY) + ("ensemble",) == METHODS
    assert {n for n, m in REGISTRY.items() if m.uses_ridge} == {"cca", "cca_multiview"}
    assert {n for n, m in REGISTRY.items() if m.mixes_channels} == {"cca", "cca_multiview", "zipit"}
    assert {n: m.statistics for n, m in REGISTRY.items() if m.statistics} == {
        "permute": "cross", "zipit": "joint", "cca": "joint", "cca_multiview": "joint"}
    assert REGISTRY["zipit"].options == ("allow_within_model",)
    assert REGISTRY["permute_weight"].options == ("max_iter", "seed")
    assert REGISTRY["cca"].options == ()
    torch.manual_seed(0)
    models = [MLP(depth=1, width=4, in_shape=(3,)).eval() for _ in range(2)]
    data = [torch.randn(8, 3) for _ in range(2)]
    with pytest.raises(TypeError, match="'allow_within_model' is an option of zipit"):
        merge(models, "cca", data, progress=False, allow_within_model=False)
    with pytest.raises(TypeError, match="'max_iter' is an option of permute_weight, c2m3"):
        align_to(*models, "permute", data, progress=False, max_iter=3)
    with pytest.raises(ValueError, match="ridge_grid is empty"):
        merge(models, "cca", data, progress=False, ridge_grid=())


@pytest.mark.parametrize("method", ["average", "permute", "permute_weight", "c2m3", "zipit", "cca", "cca_multiview"])
def test_a_merge_of_identical_batchnorm_models_is_the_model(method: str) -> None:
    """Reset BatchNorm statistics used to move the logits of a model merged with itself (by up to 0.70)."""
    torch.manual_seed(0)
    model = VGG11(width=0.125, in_shape=(1, 8, 8))
    data = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():  # running statistics that a reset on ``data`` would not reproduce
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    merged = merge([model, copy.deepcopy(model)], method, data, progress=False)
    x = torch.cat(data)
    assert torch.equal(merged(x), model(x)) and merged is not model
    assert merged.merge_info["identical_models"] and merged.merge_info["method"] == method


def test_repair_names_what_it_cannot_correct_once_per_merge() -> None:
    """A bias-free MLP: one warning per merge call (36 before), naming every layer REPAIR can only rescale."""
    import warnings

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU(),
                            nn.Linear(8, 3)).eval() for _ in range(2)]
    data = [torch.randn(32, 6, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge(models, "cca", data, progress=False)
    messages = [str(w.message) for w in caught if "REPAIR" in str(w.message)]
    assert messages == ["REPAIR can only rescale '0', '2' (no bias to shift the channel means)"]


def test_refitted_input_maps_invert_the_map_where_no_relu_bends_it() -> None:
    """Without a nonlinearity the aligned features are exactly T h, so the least-squares input map is T's inverse;
    through ReLUs it differs, and it is what keeps B' close to B (issue 28)."""
    from ccatoolkit.merging.refit import refit_input_maps

    torch.manual_seed(0)
    linear = [nn.Sequential(nn.Linear(6, 5), nn.Identity(), nn.Linear(5, 3)).eval() for _ in range(2)]
    data = [torch.randn(64, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    graph = merge_graph(linear[0])
    transforms = alignment_transforms(*linear, "cca", data, ridge=0.1, progress=False)
    refitted = refit_input_maps(linear[1], linear[1], graph, transforms, data, ridge=1e-9)
    for name, (out, inp) in refitted.items():
        torch.testing.assert_close(out, transforms[name][0])
        torch.testing.assert_close(inp, torch.linalg.inv(out), rtol=1e-5, atol=1e-6)
    relu = [nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval() for _ in range(2)]
    plain = align_to(*relu, "cca", data, repair=False, progress=False)
    repaired = align_to(*relu, "cca", data, progress=False)
    x = torch.cat(data)
    with torch.no_grad():  # B' closer to B's function (0.069 against 0.101 mean |difference| here)
        assert (repaired(x) - relu[1](x)).abs().mean() < 0.8 * (plain(x) - relu[1](x)).abs().mean()


@pytest.mark.parametrize("ridge", [0.1, "auto"])
def test_a_wide_space_on_few_samples_merges_with_its_maps_in_factors(monkeypatch, ridge) -> None:
    """A 512-wide MLP merged on 64 samples: CCA's maps of its hidden spaces stay in factors
    (DiagonalPlusLowRank) through the weight products and REPAIR's targets, and the merge equals the
    one made with the same maps multiplied out."""
    from ccatoolkit.analysis.linalg import DiagonalPlusLowRank
    from ccatoolkit.merging.align.cca import CCAProblem

    torch.manual_seed(0)
    models = [MLP(depth=2, width=512, in_shape=(1, 8, 8)) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 1, 8, 8, generator=gen) for _ in range(4)]
    compact = CCAProblem.transform
    made: list[bool] = []

    def spy(self, r, drop_constant=True, compact_maps=False):
        pair = compact(self, r, drop_constant, compact_maps)
        made.append(isinstance(pair[0], DiagonalPlusLowRank))
        return pair

    monkeypatch.setattr(CCAProblem, "transform", lambda self, r, drop_constant=True, compact=False:
                        spy(self, r, drop_constant, compact))
    in_factors = merge(models, "cca", data, ridge=ridge, progress=False)
    assert made and all(made)
    monkeypatch.setattr(CCAProblem, "transform", lambda self, r, drop_constant=True, compact=False:
                        spy(self, r, drop_constant, False))
    multiplied = merge(models, "cca", data, ridge=ridge, progress=False)
    assert not made[-1]
    assert in_factors.merge_info["ridge"] == multiplied.merge_info["ridge"]
    x = torch.randn(64, 1, 8, 8, generator=gen)
    with torch.no_grad():
        a, b = in_factors(x), multiplied(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_a_merge_that_keeps_a_wide_space_as_samples_equals_the_one_from_its_gram(monkeypatch) -> None:
    """The 512-wide MLP's spaces, seen on 64 samples, kept as samples (as vgg11_bn's 4096-wide ones are)
    through the ridge choice, its held-out statistics and the final merge: the same merge as from Gram sums.
    In float64: float32 Gram products would leave the covariances' null spaces at rounding level (1e-7 of
    the largest eigenvalue, above the pseudo-inverse floor), which the kept samples do not."""
    import ccatoolkit.analysis.stats as stats_module

    torch.manual_seed(0)
    models = [MLP(depth=2, width=512, in_shape=(1, 8, 8)).double() for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 1, 8, 8, generator=gen, dtype=torch.float64) for _ in range(4)]
    from_gram = merge(models, "cca", data, progress=False)
    kept: list[bool] = []
    result = stats_module.SpaceSums.result
    monkeypatch.setattr(stats_module.SpaceSums, "result",
                        lambda self, release=False: kept.append(self.sampling) or result(self, release))
    monkeypatch.setattr(stats_module, "LARGE_RUNNING_GRAM", 1 << 20)  # 2 x 512 channels are "wide" now
    from_samples = merge(models, "cca", data, progress=False)
    assert kept and all(kept)
    assert from_samples.merge_info["ridge"] == from_gram.merge_info["ridge"]
    x = torch.randn(64, 1, 8, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        a, b = from_samples(x), from_gram(x)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-8 * float(b.abs().max()))


def test_freed_cpu_memory_is_handed_back_before_each_merged_model_is_built(monkeypatch) -> None:
    """Before a large merged model's copy is made (each ridge candidate's and the final one) the memory that the
    previous phase freed is returned to the system on a CPU (glibc's malloc_trim), never for another device."""
    import ccatoolkit._utils as utils
    import ccatoolkit.merging.combine as combine

    trims: list[int] = []
    monkeypatch.setattr(utils, "_malloc_trim", lambda: lambda pad: trims.append(pad))
    utils.release_free_memory(torch.device("meta"))
    assert trims == []
    utils.release_free_memory(torch.device("cpu"))
    assert trims == [0]

    events: list[str] = []
    monkeypatch.setattr(combine, "release_free_memory", lambda device: events.append(f"release {device.type}"))
    torch.manual_seed(0)
    model, other = MLP(depth=2, width=12, in_shape=(6,)).eval(), MLP(depth=2, width=12, in_shape=(6,)).eval()
    data = [torch.randn(32, 6, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    merge([model, other], "cca", data, progress=False, ridge_grid=(1e-2, 1.0))
    assert events == []  # a small model's merge holds too little to be worth it
    monkeypatch.setattr(combine, "RELEASE_BEFORE_BYTES", 0)
    deepcopy = combine.copy.deepcopy
    monkeypatch.setattr(combine.copy, "deepcopy", lambda obj, *a: events.append("copy") or deepcopy(obj, *a))
    merge([model, other], "cca", data, progress=False, ridge_grid=(1e-2, 1.0))
    built = [i for i, e in enumerate(events) if e == "release cpu"]
    assert len(built) == 3  # two candidates and the final merge
    assert all(events[i + 1] == "copy" for i in built)  # each right before its model is copied
