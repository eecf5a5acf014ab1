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
