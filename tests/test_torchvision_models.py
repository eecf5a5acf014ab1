"""torchvision CNNs merge with no hand-written graph (issue 11, first part: ResNets, whose blocks reuse one ReLU)."""

from __future__ import annotations

import pytest
import torch

from ccatoolkit.merging.align.permutation import group_sources, match_activations, match_linked_groups
from ccatoolkit.merging.api import merge
from ccatoolkit.merging.graph import GraphError, MergeGraph, ParamRef, Space, merge_graph
from ccatoolkit.merging.normalization import reset_bn_stats
from ccatoolkit.merging.transform import (
    apply_permutations,
    apply_transforms,
    permutation_transforms,
    random_permutations,
)
from toybox import TinyResNeXt

models = pytest.importorskip("torchvision.models")


def _images(batches: int, size: int, n: int = 16) -> list[torch.Tensor]:
    return [torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(batches)]


@pytest.mark.parametrize(
    "name, methods, batches, size",
    [
        pytest.param("resnet18", ("permute", "cca"), 10, 64, marks=pytest.mark.slow),  # CCA: 640 samples in layer4
        pytest.param("resnet50", ("permute",), 2, 32, marks=pytest.mark.slow),
    ],
)
def test_torchvision_resnet_merges_with_a_permuted_copy_into_itself(name, methods, batches, size) -> None:
    data = _images(batches, size)
    torch.manual_seed(0)
    model = reset_bn_stats(getattr(models, name)(num_classes=10), data, progress=False).eval()
    graph = merge_graph(model, example_input=data[0][:2])
    points = [p for space in graph for p in space.capture]
    assert "layer1.0.relu" in points and "layer1.0.relu_1" in points  # one ReLU module, two calls
    other = apply_permutations(model, graph, random_permutations(graph, torch.Generator().manual_seed(1))).eval()
    with torch.no_grad():
        ref = model(data[0])
        assert float((other(data[0]) - ref).abs().max()) < 1e-3 * float(ref.abs().max())
    for method in methods:
        merged = merge([model, other], method, data, ridge=1e-6, reset_bn=False, repair=False, progress=False)
        with torch.no_grad():
            err = float((merged(data[0]) - ref).abs().max())
        assert err < 2e-3 * float(ref.abs().max()), (method, err)


def test_capturable_layers_lists_each_call_of_a_reused_module() -> None:
    from ccatoolkit.analysis.capture import capturable_layers, capture

    model = models.resnet18(num_classes=10).eval()
    names = capturable_layers(model)
    assert names.index("layer1.0.relu_1") == names.index("layer1.0.relu") + 1
    x = torch.randn(2, 3, 32, 32)
    with capture(model, ["layer1.0.relu", "layer1.0.relu_1"]) as cache:
        model(x)
    block = model.layer1[0]
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        inner = torch.relu(block.bn1(block.conv1(stem)))
        out = torch.relu(block.bn2(block.conv2(inner)) + stem)
    torch.testing.assert_close(cache["layer1.0.relu"], inner)
    torch.testing.assert_close(cache["layer1.0.relu_1"], out)


@pytest.mark.slow
def test_mobilenet_v2_merges_with_a_permuted_copy_into_itself() -> None:
    """Depthwise convolutions make their spaces permutation-only; MobileNetV2 then merges without a spec."""
    data = _images(2, 32)
    torch.manual_seed(0)
    model = reset_bn_stats(models.mobilenet_v2(num_classes=10), data, progress=False).eval()
    graph = merge_graph(model, example_input=data[0][:2])
    only = [s for s in graph if s.permutation_only]
    assert len(only) == 17 and all("depthwise" in s.permutation_only for s in only)
    other = apply_permutations(model, graph, random_permutations(graph, torch.Generator().manual_seed(1))).eval()
    merged = merge([model, other], "permute", data, reset_bn=False, repair=False, progress=False)
    with torch.no_grad():
        ref = model(data[0])
        assert float((merged(data[0]) - ref).abs().max()) < 2e-3 * float(ref.abs().max())


class DepthwiseNet(torch.nn.Module):
    """conv - depthwise conv - conv: the middle space can only be permuted."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1, self.relu1 = nn.Conv2d(3, 8, 1), nn.ReLU()
        self.dw, self.relu2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU()
        self.conv2, self.relu3 = nn.Conv2d(8, 6, 1), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.dw(self.relu1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(self.relu3(self.conv2(x))), 1))


def test_cca_uses_the_permutation_on_a_depthwise_space() -> None:
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    data = _images(4, 8)
    graph = merge_graph(model, example_input=data[0][:2])
    assert [bool(s.permutation_only) for s in graph] == [True, False]
    assert "permutation only (depthwise convolution 'dw')" in graph.describe()
    other = apply_permutations(model, graph, random_permutations(graph, torch.Generator().manual_seed(1))).eval()
    merged = merge([model, other], "cca", data, ridge=1e-6, reset_bn=False, repair=False, progress=False)
    assert list(merged.merge_info["permutation_only"]) == [graph.spaces[0].name]
    with torch.no_grad():
        ref = model(data[0])
        assert float((merged(data[0]) - ref).abs().max()) < 1e-3 * float(ref.abs().max())


def test_a_channel_mixing_map_is_refused_on_a_permutation_only_space() -> None:
    from ccatoolkit.merging.transform import apply_transforms

    model = DepthwiseNet().eval()
    graph = merge_graph(model, example_input=torch.randn(2, 3, 8, 8))
    mix = torch.eye(8, dtype=torch.float64) + 0.1
    with pytest.raises(ValueError, match="only permutations.*depthwise"):
        apply_transforms(model, graph, {graph.spaces[0].name: (mix, torch.linalg.inv(mix))})


def _assert_merges_back_from_a_permuted_copy(model: torch.nn.Module, graph, method: str, data: list,
                                             tol: float = 1e-3, move_groups: bool = False) -> None:
    """Merging ``model`` with a copy whose channels were permuted (every space; ``move_groups``: grouped
    convolutions' groups reordered too) gives ``model``'s function back."""
    perms = random_permutations(graph, torch.Generator().manual_seed(1), move_groups=move_groups)
    other = apply_permutations(model, graph, perms).eval()
    with torch.no_grad():  # the copy computes the same function (the premise of the test)
        assert float((other(data[0]) - model(data[0])).abs().max()) < 1e-4 * float(model(data[0]).abs().max())
    options = {"ridge": 1e-6} if method == "cca" else {}  # CCA: (almost) no ridge, so the map is exact
    merged = merge([model, other], method, data, reset_bn=False, repair=False, progress=False, **options)
    with torch.no_grad():
        ref = model(data[0])
        assert float((merged(data[0]) - ref).abs().max()) < tol * float(ref.abs().max())


class FunctionalBlock(torch.nn.Module):
    """A residual block written the tutorial way: F.relu calls, no activation modules."""

    def __init__(self, c: int) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.relu(self.bn1(self.conv1(x)))
        return torch.nn.functional.relu(self.bn2(self.conv2(y)) + x)


class FunctionalNet(torch.nn.Module):
    """Functional F.relu / torch.relu, and one nn.ReLU module reused for two different spaces."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.b1, self.b2 = FunctionalBlock(8), FunctionalBlock(8)
        self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b2(self.b1(self.act(self.stem(x))))
        x = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.act(x), 1), 1)
        return self.fc2(torch.relu(self.fc1(x)))


def test_functional_relu_is_captured_at_graph_nodes_named_like_torchvision() -> None:
    from ccatoolkit.analysis.capture import capturable_layers, capture

    model = reset_bn_stats(FunctionalNet(), _images(2, 8), progress=False).eval()
    names = capturable_layers(model)
    for point in ("b1.relu", "b1.add", "b1.relu_1", "b2.relu", "relu", "act", "act_1"):
        assert point in names, (point, names)
    x = _images(1, 8)[0]
    with capture(model, ["b1.relu", "b1.relu_1", "relu"]) as cache:
        out = model(x)
    assert "forward" not in model.__dict__  # the model's own forward is back
    with torch.no_grad():
        stem = model.act(model.stem(x))
        inner = torch.relu(model.b1.bn1(model.b1.conv1(stem)))
        block = torch.relu(model.b1.bn2(model.b1.conv2(inner)) + stem)
        torch.testing.assert_close(cache["b1.relu"], inner)
        torch.testing.assert_close(cache["b1.relu_1"], block)
        torch.testing.assert_close(model(x), out)
    graph = merge_graph(model, example_input=x[:2])
    assert graph.space("b1.relu").capture == ["b1.relu"]
    assert graph.spaces[0].capture == ["act", "b1.relu_1", "b2.relu_1", "act_1"]  # the residual stream


@pytest.mark.parametrize("method", ["permute", "cca", "permute_weight", "c2m3", "zipit"])
def test_functional_net_merges_with_a_permuted_copy_into_itself(method: str) -> None:
    data = _images(6, 8, n=32)
    torch.manual_seed(0)
    model = reset_bn_stats(FunctionalNet(), data, progress=False).eval()
    graph = merge_graph(model, example_input=data[0][:2])
    _assert_merges_back_from_a_permuted_copy(model, graph, method, data)


@pytest.mark.parametrize("norm", ["layernorm", "groupnorm"])
@pytest.mark.parametrize("method", ["permute", "cca", "zipit", "permute_weight"])
def test_channel_norms_make_permutation_only_spaces_that_merge_back(norm: str, method: str) -> None:
    """LayerNorm over features / GroupNorm(1, C) normalise over all channels, then scale each: permutations only."""
    nn = torch.nn
    torch.manual_seed(0)
    if norm == "layernorm":
        model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 3)).eval()
        data = [torch.randn(64, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    else:
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(1, 8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                              nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
        data = _images(4, 8)
    with torch.no_grad():  # non-trivial affine parameters, so that moving them matters
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    graph = merge_graph(model, example_input=data[0][:2])
    assert "permutation only" in graph.describe() and type(model[1]).__name__ in graph.spaces[0].permutation_only
    _assert_merges_back_from_a_permuted_copy(model, graph, method, data)


# --- concatenation (DenseNet, Inception) and grouped convolutions (ResNeXt, RegNet) -----------------


class TinyDenseNet(torch.nn.Module):
    """Two DenseNet layers (BatchNorm over the growing concatenation) and an Inception-style join."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem, self.stem_bn, self.relu = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        self.norm1, self.conv1 = nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, padding=1)
        self.norm2, self.conv2 = nn.BatchNorm2d(10), nn.Conv2d(10, 4, 3, padding=1)
        self.branch_a, self.branch_b = nn.Conv2d(14, 5, 1), nn.Conv2d(14, 3, 3, padding=1)
        self.fc = nn.Linear(8 * 4, 3)  # a flatten of the joined 2x2 maps: blocks of 4 per channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem_bn(self.stem(x)))
        x = torch.cat([x, self.conv1(self.relu(self.norm1(x)))], 1)
        x = torch.cat([x, self.conv2(torch.relu(self.norm2(x)))], 1)
        joined = torch.cat([torch.relu(self.branch_a(x)), torch.relu(self.branch_b(x))], dim=1)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(joined, 2), 1))


def _randomised(model: torch.nn.Module, data: list) -> torch.nn.Module:
    """``model`` with BatchNorm statistics from ``data`` and non-trivial affine parameters, in eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return reset_bn_stats(model, data, progress=False).eval()


def test_concatenated_channels_split_into_the_spaces_they_join() -> None:
    torch.manual_seed(0)
    model = TinyDenseNet().eval()
    graph = merge_graph(model, example_input=torch.randn(2, 3, 8, 8))
    assert [(s.name, s.size) for s in graph] == [("relu", 6), ("conv1", 4), ("conv2", 4), ("relu_3", 5),
                                                  ("relu_4", 3)]
    stem, grown = graph.space("relu"), graph.space("conv2")
    # the stem's channels are the first 6 of norm2's 10 and of both branches' 14 input channels
    assert ParamRef("norm2.weight", 0, 1, 0, 10) in stem.outputs
    assert ParamRef("branch_b.weight", 1, 1, 0, 14) in stem.inputs
    assert ParamRef("branch_a.weight", 1, 1, 10, 14) in grown.inputs
    assert "norm2" in graph.space("conv1").permutation_only  # a BatchNorm over a concatenation
    assert not grown.permutation_only  # read by convolutions only: any invertible map passes
    # the Inception-style join: 5 + 3 channels, 4 flattened features each, into fc
    assert graph.space("relu_3").inputs == [ParamRef("fc.weight", 1, 4, 0, 8)]
    assert graph.space("relu_4").inputs == [ParamRef("fc.weight", 1, 4, 5, 8)]
    assert "[5:8 of 8]" in graph.describe()


def test_overlapping_segments_are_refused() -> None:
    model = TinyDenseNet()
    graph = merge_graph(model, example_input=torch.randn(2, 3, 8, 8))
    overlapping = Space("x", 4, inputs=[ParamRef("norm2.weight", 0, 1, 5, 10)])  # channels 5..8; conv1 has 6..9
    with pytest.raises(GraphError, match="norm2.weight.*one space only"):
        MergeGraph([graph.space("conv1"), overlapping]).validate(model)
    with pytest.raises(GraphError, match="does not fit"):
        MergeGraph([Space("x", 4, inputs=[ParamRef("conv2.weight", 1, 1, 8, 10)])]).validate(model)


def test_grouped_convolutions_keep_their_groups() -> None:
    torch.manual_seed(0)
    model = TinyResNeXt().eval()
    graph = merge_graph(model, example_input=torch.randn(2, 3, 8, 8))
    middle, out = graph.space("relu_1"), graph.space("relu_2")  # the grouped conv's input and output
    assert (middle.size, middle.groups, out.size, out.groups) == (8, 2, 12, 2)
    assert "grouped convolution 'b'" in middle.permutation_only and "within 2 groups" in graph.describe()
    assert ParamRef("b.weight", 1, groups=2) in middle.inputs
    perms = random_permutations(graph, torch.Generator().manual_seed(3))
    assert sorted(perms["relu_1"][:4].tolist()) == [0, 1, 2, 3]  # within the first group
    corr = torch.eye(8, dtype=torch.float64)[:, [4, 5, 6, 7, 0, 1, 2, 3]]  # best match crosses the groups
    assert sorted(match_activations(corr, groups=2)[:4].tolist()) == [0, 1, 2, 3]
    # the two spaces of the grouped convolution move whole groups together (one link)
    assert graph.group_links == {"b": ["relu_1", "relu_2"]} and "groups move with link 'b'" in graph.describe()
    swap = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="both sides move the same whole groups"):
        apply_permutations(model, graph, {"relu_1": swap})  # the input side only
    with pytest.raises(ValueError, match="other than as whole groups"):
        apply_permutations(model, graph, {"relu_1": torch.tensor([0, 1, 2, 4, 3, 5, 6, 7])})
    x = torch.randn(4, 3, 8, 8)
    both = apply_permutations(model, graph, {"relu_1": swap, "relu_2": torch.tensor([9, 6, 7, 8, 10, 11, 0, 1, 2, 3,
                                                                                         5, 4])})
    with torch.no_grad():
        assert torch.allclose(both(x), model(x), atol=1e-5)
    # the same moves as dense maps (apply_transforms) give the same tensors
    perms = random_permutations(graph, torch.Generator().manual_seed(4), move_groups=True)
    assert sorted(group_sources(perms["relu_2"], 2).tolist()) == [0, 1]
    dense = apply_transforms(model, graph, permutation_transforms(perms))
    indexed = apply_permutations(model, graph, perms)
    for name, tensor in indexed.state_dict().items():
        assert torch.equal(tensor, dense.state_dict()[name]), name


def test_linked_groups_are_matched_by_one_permutation_of_the_groups() -> None:
    gen = torch.Generator().manual_seed(0)
    truth = {  # 3 groups of 4 and of 2 channels; model groups 1, 0, 2 go to 0, 1, 2, shuffled within
        "in": torch.cat([4 + torch.randperm(4, generator=gen), torch.randperm(4, generator=gen),
                         8 + torch.randperm(4, generator=gen)]),
        "out": torch.cat([2 + torch.randperm(2, generator=gen), torch.randperm(2, generator=gen),
                          4 + torch.randperm(2, generator=gen)]),
    }
    noise = lambda n: 0.05 * torch.rand(n, n, generator=gen, dtype=torch.float64)  # noqa: E731
    corrs = []
    for name in ("in", "out"):
        n = truth[name].numel()
        corr = noise(n)
        corr[torch.arange(n), truth[name]] = 1.0  # the model's neuron truth[i] is the reference's neuron i
        corrs.append(corr)
    found = match_linked_groups(corrs, groups=3)
    assert [p.tolist() for p in found] == [truth["in"].tolist(), truth["out"].tolist()]
    # the groups' move is chosen from both spaces together: "out" alone prefers keeping groups 0 and 1
    # in place a little, "in" prefers swapping them by far, so both swap
    weak = torch.eye(6, dtype=torch.float64) * 0.6 + torch.eye(6, dtype=torch.float64)[:, [2, 3, 0, 1, 4, 5]] * 0.5
    strong = torch.eye(12, dtype=torch.float64)[:, [4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11]]
    alone = match_linked_groups([weak], groups=3)[0]
    assert alone.tolist() == list(range(6))
    swapped_in, swapped_out = match_linked_groups([strong, weak], groups=3)
    assert swapped_in.tolist() == [4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11]
    assert swapped_out.tolist() == [2, 3, 0, 1, 4, 5]
    # one group: the plain assignment of each space
    assert match_linked_groups([strong], groups=1)[0].tolist() == match_activations(strong).tolist()
    with pytest.raises(ValueError, match="does not divide"):
        match_linked_groups([strong, weak], groups=4)


@pytest.mark.parametrize("method", ["permute", "cca", "permute_weight", "c2m3", "zipit"])
@pytest.mark.parametrize("net", [TinyDenseNet, TinyResNeXt])
def test_concatenation_and_grouped_nets_merge_with_a_permuted_copy_into_itself(net, method: str) -> None:
    data = _images(6, 8, n=32)
    torch.manual_seed(0)
    model = _randomised(net(), data)
    graph = merge_graph(model, example_input=data[0][:2])
    _assert_merges_back_from_a_permuted_copy(model, graph, method, data)


@pytest.mark.parametrize("method", ["permute", "cca", "zipit", "cca_multiview"])
def test_activation_matching_finds_reordered_groups(method: str) -> None:
    """A copy whose grouped convolution had its groups reordered (on both sides) merges back: activation
    matching searches whole-group moves on linked spaces, for every method that uses it there."""
    data = _images(6, 8, n=32)
    torch.manual_seed(0)
    model = _randomised(TinyResNeXt(), data)
    graph = merge_graph(model, example_input=data[0][:2])
    perms = random_permutations(graph, torch.Generator().manual_seed(1), move_groups=True)
    assert group_sources(perms["relu_1"], 2).tolist() == [1, 0]  # this seed swaps the two groups
    _assert_merges_back_from_a_permuted_copy(model, graph, method, data, move_groups=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, methods, batches, size",
    [
        ("densenet121", ("permute", "cca"), 10, 64),  # CCA: enough samples for the 2x2 last block
        ("regnet_x_400mf", ("permute", "cca"), 10, 64),
        ("vgg11_bn", ("permute",), 8, 32),  # CCA on the 4096-wide classifier needs > 4096 samples: benchmark only
    ],
)
def test_densenet_regnet_vgg_merge_with_a_permuted_copy_into_itself(name: str, methods, batches, size) -> None:
    """torchvision's DenseNet (concatenations), RegNet (grouped convolutions) and VGG need no spec."""
    data = _images(batches, size)
    torch.manual_seed(0)
    model = reset_bn_stats(getattr(models, name)(num_classes=10), data, progress=False).eval()
    graph = merge_graph(model, example_input=data[0][:2])
    move_groups = name.startswith("regnet")  # the copy also reorders the grouped convolutions' groups
    if move_groups:
        assert any(s.groups > 1 for s in graph) and graph.group_links
    if name.startswith("densenet"):
        assert any(ref.is_segment for s in graph for ref in s.inputs)
    # vgg11_bn: every conv space is recovered exactly, but at random initialisation many of the 4096
    # classifier neurons are silent on all but one or two of the 128 images; they correlate perfectly
    # with each other, so activation matching may swap them (measured: 444 and 556 of 4096 matched
    # differently, an output error of 0.2% of its scale; 0.9% with 32 images)
    tol = 1e-2 if name == "vgg11_bn" else 1e-3
    for method in methods:
        _assert_merges_back_from_a_permuted_copy(model, graph, method, data, tol, move_groups)


# --- torchvision models adapted to the zoo's data sets (notebook 7) -------------------------------------


def test_torchvision_model_takes_one_channel_images_and_records_its_config() -> None:
    from ccatoolkit.zoo.models import build_model, model_config, torchvision_model

    net = torchvision_model("resnet18", in_shape=(1, 28, 28), num_classes=10)
    assert isinstance(net, models.ResNet) and net.conv1.in_channels == 1
    assert (net.conv1.kernel_size, net.conv1.stride, net.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert net.training  # built as torchvision builds it (train mode)
    out = net.eval()(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert model_config(net) == dict(name="torchvision", arch="resnet18", in_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        net(torch.randn(2, 3, 28, 28))
    same = build_model("torchvision", arch="resnet18", in_shape=(3, 32, 32), num_classes=7)
    assert same.conv1.in_channels == 3 and same.fc.out_features == 7  # torchvision's own stem, untouched


def test_torchvision_model_errors_name_the_problem() -> None:
    from ccatoolkit.zoo.models import torchvision_model

    with pytest.raises(ValueError, match="unknown torchvision model 'resnet7'"):
        torchvision_model("resnet7")
    with pytest.raises(ValueError, match=r"cannot take inputs of shape \(1, 8, 8\)"):
        torchvision_model("vgg11", in_shape=(1, 8, 8))


def test_one_channel_torchvision_resnet_merges_a_permuted_copy_back() -> None:
    from ccatoolkit.zoo.models import torchvision_model

    data = [torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    torch.manual_seed(0)
    model = reset_bn_stats(torchvision_model("resnet18"), data, progress=False).eval()
    graph = merge_graph(model, example_input=data[0][:2])
    _assert_merges_back_from_a_permuted_copy(model, graph, "permute", data)


def test_trained_torchvision_model_is_cached_by_the_zoo(tmp_path) -> None:
    from ccatoolkit.zoo.trained import trained_model

    kwargs = dict(model="torchvision", model_kwargs=dict(arch="resnet18"), dataset="fashion_mnist", epochs=1,
                  batch_size=32, limit=64, seed=3, cache_dir=tmp_path, device="cpu", progress=False)
    a = trained_model(**kwargs)
    files = list(tmp_path.glob("model-*.pt"))
    assert len(files) == 1 and a.train_info["n_train"] == 64 and not a.training
    again = trained_model(**kwargs)
    assert list(tmp_path.glob("model-*.pt")) == files
    for (name, p), q in zip(a.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
