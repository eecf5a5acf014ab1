"""The merge graph derived by torch.fx: spaces, sizes, refs and errors with advice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ccatoolkit.merging.graph.spec import GraphError, MergeGraph, ParamRef, Space
from ccatoolkit.merging.graph.trace import merge_graph
from toybox import SmallRes, user_cnn

from ccatoolkit.zoo.models import MLP, VGG11, ResNet20


def _names(refs: list[ParamRef]) -> list[str]:
    return [r.name for r in refs]


def test_mlp_one_space_per_hidden_layer() -> None:
    g = merge_graph(MLP(depth=3, width=8))
    assert g.names == ["relu1", "relu2", "relu3"]
    assert [s.size for s in g] == [8, 8, 8]
    s = g.space("relu2")
    assert s.capture == ["relu2"]
    assert s.outputs == [ParamRef("fc2.weight", 0), ParamRef("fc2.bias", 0)]
    assert s.inputs == [ParamRef("fc3.weight", 1)]
    assert g.space("relu3").inputs == [ParamRef("head.weight", 1)]


def test_mlp_batchnorm_refs_follow_channels() -> None:
    g = merge_graph(MLP(depth=2, width=6, batchnorm=True))
    assert _names(g.space("relu1").outputs) == [
        "fc1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
    ]
    assert all(r.axis == 0 for r in g.space("relu1").outputs)


def test_vgg11_eight_spaces() -> None:
    g = merge_graph(VGG11(width=0.125))
    assert len(g) == 8
    assert [s.size for s in g] == [8, 16, 32, 32, 64, 64, 64, 64]
    assert g.names[0] == "features.relu1"
    last = g.space("features.relu8")
    assert last.inputs == [ParamRef("head.weight", 1, 1)]
    assert g.space("features.relu3").inputs == [ParamRef("features.conv4.weight", 1)]


def test_resnet20_residual_streams() -> None:
    g = merge_graph(ResNet20())
    assert len(g) == 12
    assert sorted(s.size for s in g) == [16] * 4 + [32] * 4 + [64] * 4
    stream1 = g.space("stem.relu")
    assert stream1.capture == ["stem.relu", "layer1.0.relu2", "layer1.1.relu2", "layer1.2.relu2"]
    outs = _names(stream1.outputs)
    for name in ["stem.conv.weight", "stem.bn.running_var", "layer1.0.conv2.weight", "layer1.2.bn2.bias"]:
        assert name in outs
    assert "layer2.0.shortcut.conv.weight" in _names(stream1.inputs)
    assert "layer2.0.conv1.weight" in _names(stream1.inputs)
    stream2 = g.space("layer2.0.relu2")
    assert stream2.capture == ["layer2.0.relu2", "layer2.1.relu2", "layer2.2.relu2"]
    assert "layer2.0.shortcut.conv.weight" in _names(stream2.outputs)
    assert "layer2.0.shortcut.bn.running_mean" in _names(stream2.outputs)
    assert "layer3.0.shortcut.conv.weight" in _names(stream2.inputs)
    assert g.space("layer3.0.relu2").inputs[-1] == ParamRef("head.weight", 1)
    for stage in (1, 2, 3):
        for block in range(3):
            s = g.space(f"layer{stage}.{block}.relu1")
            assert s.capture == [f"layer{stage}.{block}.relu1"]
            assert s.inputs == [ParamRef(f"layer{stage}.{block}.conv2.weight", 1)]


def test_user_residual_cnn() -> None:
    g = merge_graph(SmallRes())
    assert g.names == ["relu0", "relu1"]
    assert g.space("relu0").capture == ["relu0", "relu2"]
    assert "conv2.bias" in _names(g.space("relu0").outputs)
    assert _names(g.space("relu0").inputs) == ["conv1.weight", "fc.weight"]


def test_flatten_block_from_shapes_and_from_in_features() -> None:
    model = user_cnn()
    with_shapes = merge_graph(model, example_input=torch.zeros(2, 1, 8, 8))
    without = merge_graph(model)
    assert with_shapes == without
    assert [s.size for s in with_shapes] == [4, 6, 10]
    assert with_shapes.spaces[1].inputs == [ParamRef("7.weight", 1, 16)]
    assert with_shapes.spaces[0].capture == ["2"]


def test_space_without_activation_captures_last_module() -> None:
    g = merge_graph(nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)))
    assert len(g) == 1 and g.spaces[0].capture == ["0"] and g.spaces[0].size == 7


def test_model_not_modified_and_unknown_space() -> None:
    model = MLP(depth=1, width=4, batchnorm=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = merge_graph(model)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(KeyError, match="relu1"):
        g.space("nope")


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.relu, self.head = nn.Linear(4, 3), nn.Linear(4, 3), nn.ReLU(), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else x


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.relu(self.fc1(x)))


def test_concatenation_raises_with_advice() -> None:
    with pytest.raises(GraphError, match=r"cat.*MergeGraph\.from_spec"):
        merge_graph(Concat())


def test_untraceable_raises_with_fx_error_and_advice() -> None:
    with pytest.raises(GraphError, match=r"torch\.fx cannot trace.*MergeGraph\.from_spec"):
        merge_graph(DataDependent())


def test_functional_relu_is_a_node_capture_point() -> None:
    graph = merge_graph(Functional())
    assert [(s.name, s.capture, s.size) for s in graph] == [("relu", ["relu"], 4)]


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv2d(2, 4, 1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 1, 1)),
        nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.ConvTranspose2d(4, 4, 1, groups=2), nn.ReLU(),
                      nn.Conv2d(4, 1, 1)),
    ],
    ids=["groupnorm-2-groups", "grouped-transposed-conv"],
)
def test_unsupported_layers_name_the_module(model: nn.Module) -> None:
    with pytest.raises(GraphError, match=r"module '[12]'.*MergeGraph\(spaces="):
        merge_graph(model)


def test_unknown_ops_on_the_input_are_fine() -> None:
    model = nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert merge_graph(model).names == ["2"]


def test_a_reused_relu_gives_one_capture_point_per_call() -> None:
    """torchvision's blocks call one ``self.relu`` twice: its calls are captured as ``relu`` and ``relu_1``."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3, self.relu = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))

    graph = merge_graph(Shared())
    assert [s.capture for s in graph] == [["relu"], ["relu_1"]]
    assert [s.size for s in graph] == [4, 5]


def test_from_spec_matches_automatic_graph() -> None:
    model = MLP(depth=2, width=5)
    spec = {
        "relu1": dict(capture=["relu1"], outputs=[("fc1.weight", 0), ("fc1.bias", 0)], inputs=[("fc2.weight", 1)]),
        "relu2": dict(capture="relu2", outputs=[("fc2.weight", 0), ("fc2.bias", 0)], inputs=[("head.weight", 1, 1)]),
    }
    assert MergeGraph.from_spec(model, spec) == merge_graph(model)


@pytest.mark.parametrize(
    "entry, message",
    [
        (dict(outputs=[("fc1.wieght", 0)]),
         r"'fc1\.wieght' is not in the model's state_dict\. Did you mean 'fc1\.weight'"),
        (dict(outputs=[("fc1.weight", 2)]), "axis 2 is out of range"),
        (dict(outputs=[("fc1.weight", 0)], inputs=[("head.weight", 1, 2)]), "inconsistent"),
        (dict(outputs=[("fc1.weight", 0), ("fc1.bias", 0)], inputs=[("fc1.weight", 1)]), "inconsistent"),
        (dict(capture=["relu9"], outputs=[("fc1.weight", 0)]), "'relu9', which is not a module"),
        (dict(outputs=[("fc1.weight",)]), r"\(param, axis\)"),
        (dict(inputs=[("head.weight", 1)]), "give its 'size'"),
        (dict(outputs=[("fc1.weight", 0)], bogus=1), "unknown keys"),
    ],
)
def test_from_spec_errors(entry: dict, message: str) -> None:
    model = MLP(depth=1, width=5)
    with pytest.raises(GraphError, match=message):
        MergeGraph.from_spec(model, {"hidden": entry})


def test_validate_rejects_shared_axes_and_duplicate_names() -> None:
    model = MLP(depth=1, width=5)
    s = Space("a", 5, ["relu1"], [ParamRef("fc1.weight", 0)], [])
    with pytest.raises(GraphError, match="both space"):
        MergeGraph([s, Space("b", 5, [], [ParamRef("fc1.weight", 0)], [])]).validate(model)
    with pytest.raises(GraphError, match="unique"):
        MergeGraph([s, Space("a", 5, [], [ParamRef("fc1.bias", 0)], [])]).validate(model)
