"""torchvision CNNs merge with no hand-written graph (issue 11, first part: ResNets, whose blocks reuse one ReLU)."""

from __future__ import annotations

import pytest
import torch

from ccatoolkit.merging.api import merge
from ccatoolkit.merging.graph import merge_graph
from ccatoolkit.merging.normalization import reset_bn_stats
from ccatoolkit.merging.transform import apply_permutations, random_permutations

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
