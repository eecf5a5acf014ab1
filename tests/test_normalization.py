"""BatchNorm statistics reset and REPAIR."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ccatoolkit.merging.graph.trace import merge_graph
from ccatoolkit.zoo.models import MLP, VGG11
from ccatoolkit.merging.normalization import (
    MomentSums,
    channel_moments,
    channel_stats,
    mapped_channel_stats,
    repair,
    repair_endpoints,
    reset_bn_stats,
)
from toybox import Reiterable


def _data(shape: tuple[int, ...], batches: int = 3, n: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(n, *shape) * 2 + 1, torch.randint(0, 10, (n,))) for _ in range(batches)]


def test_reset_bn_stats_equals_batch_statistics_by_hand() -> None:
    model = MLP(depth=2, width=8, in_shape=(5,), batchnorm=True)
    model.train()
    model.bn1.momentum = 0.3
    data = _data((5,))
    new = reset_bn_stats(model, data, progress=False)
    assert new is not model and new.training and new.bn1.momentum == 0.3  # flags and momentum restored
    assert torch.equal(model.bn1.running_mean, torch.zeros(8))  # input untouched
    with torch.no_grad():
        pre = [model.fc1(x) for x, _ in data]
    mean = torch.stack([p.mean(0) for p in pre]).mean(0)  # cumulative average of batch means
    var = torch.stack([p.var(0, unbiased=True) for p in pre]).mean(0)
    torch.testing.assert_close(new.bn1.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new.bn1.running_var, var, rtol=1e-5, atol=1e-6)
    assert int(new.bn1.num_batches_tracked) == len(data)


def test_reset_bn_stats_conv_max_batches_and_eval_flags() -> None:
    model = VGG11(width=0.125, in_shape=(1, 8, 8)).eval()
    data = _data((1, 8, 8), batches=4)
    new = reset_bn_stats(model, data, max_batches=1, progress=False)
    assert not new.training and not new.features.bn1.training
    with torch.no_grad():
        pre = model.features.conv1(data[0][0])
    torch.testing.assert_close(new.features.bn1.running_mean, pre.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new.features.bn1.running_var, pre.var((0, 2, 3)), rtol=1e-5, atol=1e-6)
    plain = nn.Sequential(nn.Linear(3, 2))
    assert reset_bn_stats(plain, [torch.randn(2, 3)]) is not plain  # no BatchNorm: a plain copy
    with pytest.raises(ValueError, match="no batches"):
        reset_bn_stats(model, [])


@pytest.mark.parametrize("batchnorm", [False, True])
def test_repair_matches_endpoint_statistics(batchnorm: bool) -> None:
    data = _data((6,))
    a = reset_bn_stats(MLP(depth=3, width=10, in_shape=(6,), batchnorm=batchnorm), data, progress=False).eval()
    b = reset_bn_stats(MLP(depth=3, width=10, in_shape=(6,), batchnorm=batchnorm), data, progress=False).eval()
    merged = copy.deepcopy(a)
    merged.load_state_dict({k: (v + b.state_dict()[k]) / 2 if v.is_floating_point() else v
                            for k, v in a.state_dict().items()})
    merged = reset_bn_stats(merged, data, progress=False)
    graph = merge_graph(a)
    endpoints = [n for ns in repair_endpoints(a, graph).values() for n in ns]
    assert endpoints == ([f"bn{i}" for i in (1, 2, 3)] if batchnorm else [f"fc{i}" for i in (1, 2, 3)])
    before = copy.deepcopy(merged.state_dict())
    fixed = repair(merged, [a, b], data, graph, progress=False)
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in before.items())  # input untouched
    sa, sb, sf = (channel_stats(m, endpoints, data) for m in (a, b, fixed))
    counted = Reiterable(data)  # the same targets given: no pass for them, one per module of the chain
    targets = {n: ((sa[n][0] + sb[n][0]) / 2, (sa[n][1] + sb[n][1]) / 2) for n in endpoints}
    again = repair(merged, None, counted, graph, progress=False, targets=targets)
    assert counted.passes == len(endpoints)  # exact after three passes (checked below), no confirming pass
    torch.testing.assert_close(again.state_dict(), fixed.state_dict())
    for n in endpoints:
        torch.testing.assert_close(sf[n][0], (sa[n][0] + sb[n][0]) / 2, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sf[n][1], (sa[n][1] + sb[n][1]) / 2, atol=1e-4, rtol=1e-4)
    sm = channel_stats(merged, endpoints, data)
    assert not torch.allclose(sm["fc3" if not batchnorm else "bn3"][1], sf["fc3" if not batchnorm else "bn3"][1])


def test_channel_stats_transform_and_conv_layout() -> None:
    model = VGG11(width=0.125, in_shape=(1, 8, 8)).eval()
    x = torch.randn(4, 1, 8, 8)
    flip = torch.eye(8).flip(0)
    plain = channel_stats(model, ["features.conv1"], [x])["features.conv1"]
    moved = channel_stats(model, ["features.conv1"], [x], transform={"features.conv1": flip})["features.conv1"]
    with torch.no_grad():
        out = model.features.conv1(x).double()
    torch.testing.assert_close(plain[0], out.mean((0, 2, 3)))
    torch.testing.assert_close(plain[1], out.std((0, 2, 3), unbiased=False))
    torch.testing.assert_close(moved[0], plain[0].flip(0))


def test_channel_moments_give_the_statistics_of_any_linear_map_without_a_pass() -> None:
    model = VGG11(width=0.125, in_shape=(1, 8, 8)).eval()
    data = [torch.randn(4, 1, 8, 8), torch.randn(3, 1, 8, 8)]
    mix = torch.randn(8, 8, dtype=torch.float64)
    moments = channel_moments(model, ["features.conv1"], data)["features.conv1"]
    measured = channel_stats(model, ["features.conv1"], data, transform={"features.conv1": mix})["features.conv1"]
    for got, want in zip(mapped_channel_stats(moments, mix), measured):
        torch.testing.assert_close(got, want)
    for got, want in zip(mapped_channel_stats(moments), channel_stats(model, ["features.conv1"], data)["features.conv1"]):
        torch.testing.assert_close(got, want)


def test_a_wide_module_on_few_samples_keeps_its_samples_for_its_moments(monkeypatch) -> None:
    """A 64-wide layer seen on 24 samples, "wide" here: its moments carry the samples (no 64 x 64 Gram), and
    give the same means, covariance and mapped statistics (dense maps and maps in factors) as a pass that
    measures them directly; past half the width the samples go into the Gram matrix."""
    import ccatoolkit.analysis.stats as stats_module
    from ccatoolkit.analysis.linalg import DiagonalPlusLowRank

    monkeypatch.setattr(stats_module, "LARGE_RUNNING_GRAM", 4 * 64 * 65 - 1)
    torch.manual_seed(0)
    model = MLP(depth=2, width=64, in_shape=(1, 8, 8)).eval()
    data = [torch.randn(8, 1, 8, 8) for _ in range(3)]
    sums = MomentSums(["fc1"])
    for x in data:
        with torch.no_grad():
            sums.add("fc1", model.fc1(x.flatten(1)))
    moments = sums.result()["fc1"]
    assert moments.gram is None and moments.samples is not None and moments.samples.shape == (64, 24)
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(64, 64, dtype=torch.float64, generator=g)
    factors = DiagonalPlusLowRank(torch.rand(64, dtype=torch.float64, generator=g),
                                  *(torch.randn(64, 3, dtype=torch.float64, generator=g) for _ in range(2)))
    for matrix in (None, dense, factors):
        measured = channel_stats(model, ["fc1"], data, transform={} if matrix is None else
                                 {"fc1": matrix if isinstance(matrix, torch.Tensor) else matrix.dense()})["fc1"]
        for got, want in zip(mapped_channel_stats(moments, matrix), measured):  # (float32 outputs)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    outputs = torch.cat([model.fc1(x.flatten(1)) for x in data]).detach().double()
    torch.testing.assert_close(moments.cov(), torch.cov(outputs.T, correction=0))
    sums.add("fc1", model.fc1(torch.randn(16, 64)).detach())  # 40 samples: past half the width
    assert sums.result()["fc1"].gram is not None


def test_channel_stats_of_a_scaled_permutation_equal_those_of_the_product() -> None:
    """A (scaled) permutation maps the sums instead of every sample: the same statistics as the dense product."""
    from ccatoolkit.merging.normalization import channel_stats

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU()).eval()
    data = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    perm = torch.randperm(6)
    matrix = torch.zeros(6, 6, dtype=torch.float64)
    matrix[torch.arange(6), perm] = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    sparse = channel_stats(model, ["0"], data, transform={"0": matrix})["0"]
    dense = channel_stats(model, ["0"], data, transform={"0": matrix + 1e-300})["0"]  # not a permutation any more
    plain = channel_stats(model, ["0"], data)["0"]
    torch.testing.assert_close(sparse[0], dense[0])
    torch.testing.assert_close(sparse[1], dense[1])
    torch.testing.assert_close(sparse[0], matrix @ plain[0])  # the mean of T y is T times the mean of y


def test_channel_moments_keep_the_variance_of_channels_with_large_means() -> None:
    """Each batch's Gram runs in float32 on features shifted by the first batch's means: a channel with
    mean 1e4 and std 1 keeps its std (an unshifted float32 E[y^2] - mean^2 would lose it to cancellation)."""
    layer = torch.nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(3))
        layer.bias.copy_(torch.tensor([1e4, -1e4, 0.0]))
    model = torch.nn.Sequential(layer).eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(64, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5]) + 0.3 for _ in range(3)]
    mean, cov = channel_moments(model, ["0"], data)["0"]
    with torch.no_grad():  # the model's own float32 outputs, counted in float64
        y = torch.cat([model(x) for x in data]).double()
    torch.testing.assert_close(mean, y.mean(0))
    torch.testing.assert_close(cov, torch.cov(y.T, correction=0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mapped_channel_stats((mean, cov))[1], y.std(0, unbiased=False), rtol=1e-5, atol=1e-6)


def test_repair_moments_recorded_in_the_statistics_passes_equal_a_pass_of_their_own() -> None:
    """A merge measures REPAIR's moments in its statistics passes (``RepairTargets.recorders``): split over two
    passes (fitting and held-out batches), in micro-batches, with the one-sample probe that sizes them not
    counted, they equal :func:`channel_moments`' own pass."""
    from ccatoolkit.merging.normalization import RepairTargets
    from ccatoolkit.merging.statistics import merge_statistics

    torch.manual_seed(0)
    models = [VGG11(width=0.125, in_shape=(1, 8, 8)).eval() for _ in range(2)]
    graph = merge_graph(models[0])
    data = [torch.randn(6, 1, 8, 8) for _ in range(4)]
    recorded = RepairTargets(models, graph, data, None, from_moments=True)
    merge_statistics(models, graph, data[:3], None, False, also=recorded.recorders())
    own_first = recorded.modules[0]
    fit_only = recorded.moments()[0][own_first].cov()  # a copy: the moments are the running sums
    merge_statistics(models, graph, data[3:], None, False, also=recorded.recorders())
    own = RepairTargets(models, graph, data, None, from_moments=True)
    assert recorded.modules == own.modules and len(own.modules) >= 8
    for got, want in zip(recorded.moments(), own.moments()):
        for name in own.modules:
            torch.testing.assert_close(got[name].mean(), want[name].mean(), rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(got[name].cov(), want[name].cov(), rtol=1e-6, atol=1e-8)
            mix = torch.randn(got[name].sum.shape[0], got[name].sum.shape[0], dtype=torch.float64)
            for a, b in zip(got[name].mapped(mix), want[name].mapped(mix)):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(fit_only, recorded.moments()[0][own_first].cov())
    from ccatoolkit.analysis.stats import StatisticsCollector  # micro-batches of one sample
    sums = [MomentSums(own.modules) for _ in models]
    collector = StatisticsCollector(models, {s.name: list(s.capture) for s in graph.spaces}, memory_budget=1,
                                    also=[m.hooks() for m in sums])
    with collector.attached():
        for x in data:
            collector.update(x)
    assert collector.micro_batch == 1
    for got, want in zip(sums, own.moments()):
        torch.testing.assert_close(got.result()[own.modules[-1]].cov(), want[own.modules[-1]].cov(), rtol=1e-6,
                                   atol=1e-8)
    with pytest.raises(ValueError, match="has no module 'nope'"):
        StatisticsCollector(models, ["features.conv1"], also=[{"nope": print}, {}])


class _ResidualMLP(nn.Module):
    """Not a chain: ``mix`` reads the stream that ``fc_in`` writes and adds back into it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in, self.mix, self.fc_out, self.head = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc_in(x))
        x = x + torch.relu(self.mix(x))
        return self.head(torch.relu(self.fc_out(x)))


def test_repair_in_forward_order_is_exact_on_a_residual_network_and_stops_each_pass_early() -> None:
    data = _data((6,))
    torch.manual_seed(0)
    merged = _ResidualMLP().eval()
    endpoints = ["fc_out", "mix", "fc_in"]  # not in forward order: the passes find it
    gen = torch.Generator().manual_seed(3)
    targets = {n: (torch.randn(m.out_features, generator=gen, dtype=torch.float64),
                   torch.rand(m.out_features, generator=gen, dtype=torch.float64) + 0.5)
               for n, m in merged.named_children() if n in endpoints}
    calls = {"head": 0}
    merged.head.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))
    fixed = repair(merged, None, data, progress=False, targets=targets, only=endpoints)
    # the head (after every module) ran once per batch in the first pass only (the copy keeps the hook):
    # the two later passes stopped at their module
    assert calls["head"] == len(data)
    stats = channel_stats(fixed, endpoints, data)
    for n in endpoints:
        torch.testing.assert_close(stats[n][0], targets[n][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats[n][1], targets[n][1], atol=1e-5, rtol=1e-5)


def test_a_reference_model_records_only_its_channels_variances() -> None:
    """A merge's reference is never mapped, so REPAIR needs only its channels' means and stds: its moments keep
    each channel's sum of squares instead of a C x C Gram, and give the same statistics (a map raises)."""
    from ccatoolkit.merging.normalization import RepairTargets
    from ccatoolkit.merging.statistics import merge_statistics

    torch.manual_seed(0)
    models = [VGG11(width=0.125, in_shape=(1, 8, 8)).eval() for _ in range(2)]
    graph = merge_graph(models[0])
    data = [torch.randn(6, 1, 8, 8) + 3.0 for _ in range(3)]  # large means: the shift matters
    lean = RepairTargets(models, graph, data, None, from_moments=True, reference=0)
    merge_statistics(models, graph, data, None, False, also=lean.recorders())
    full = RepairTargets(models, graph, data, None, from_moments=True)
    for name in full.modules:
        got, want = lean.moments()[0][name], full.moments()[0][name]
        assert got.gram.dim() == 1 and want.gram.dim() == 2  # C sums of squares against a C x C Gram
        for a, b in zip(got.mapped(), want.mapped()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
        assert lean.moments()[1][name].gram.dim() == 2  # the other model is mapped: its full moments
    with pytest.raises(ValueError, match="only their variances were recorded"):
        lean.moments()[0][full.modules[0]].mapped(torch.eye(lean.moments()[0][full.modules[0]].sum.shape[0]))
