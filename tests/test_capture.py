"""Capturing activations by layer name: names offered, values returned, hooks always removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ccatoolkit.analysis.capture import (
    ActivationCache,
    UnknownLayerError,
    capturable_layers,
    capture,
    forward_hooks,
)
from ccatoolkit.zoo.models import MLP, VGG11, ResNet20


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_capturable_layers_mlp_in_order() -> None:
    model = MLP(depth=2, width=8, in_shape=(1, 4, 4))
    assert capturable_layers(model) == ["flatten", "fc1", "relu1", "fc2", "relu2", "head"]


def test_capturable_layers_resnet_excludes_containers_and_blocks() -> None:
    names = capturable_layers(ResNet20(width=1, in_shape=(1, 8, 8)))
    for expected in ["stem.conv", "stem.bn", "stem.relu", "layer1.0.conv1", "layer1.0.relu2",
                     "layer1.0.shortcut", "layer2.0.shortcut.conv", "layer2.0.shortcut.bn", "pool", "flatten", "head"]:
        assert expected in names
    for container in ["", "stem", "layer1", "layer1.0", "layer2.0.shortcut"]:
        assert container not in names
    assert names.index("stem.conv") < names.index("layer1.0.conv1") < names.index("layer3.2.relu2") < names.index("head")
    assert len(names) == len(set(names))


def test_capturable_layers_vgg() -> None:
    names = capturable_layers(VGG11(width=0.125, in_shape=(1, 8, 8)))
    assert names[:4] == ["features.conv1", "features.bn1", "features.relu1", "features.pool1"]
    assert "features" not in names


def test_capture_values_match_manual_forward() -> None:
    model = MLP(depth=2, width=8, in_shape=(1, 4, 4)).eval()
    x = torch.randn(5, 1, 4, 4)
    with capture(model, ["fc1", "relu2"]) as cache:
        out = model(x)
    assert isinstance(cache, ActivationCache)
    assert set(cache) == {"fc1", "relu2"} and len(cache) == 2
    fc1 = model.fc1(x.flatten(1))
    relu2 = torch.relu(model.fc2(torch.relu(fc1)))
    torch.testing.assert_close(cache["fc1"], fc1.detach())
    torch.testing.assert_close(cache["relu2"], relu2.detach())
    torch.testing.assert_close(out, model.head(relu2))
    assert not cache["fc1"].requires_grad


def test_capture_single_name_and_last_output_kept() -> None:
    model = MLP(depth=1, width=4, in_shape=(3,)).eval()
    with capture(model, "relu1") as cache:
        model(torch.randn(2, 3))
        x = torch.randn(7, 3)
        model(x)
    assert cache["relu1"].shape == (7, 4)
    torch.testing.assert_close(cache["relu1"], torch.relu(model.fc1(x)).detach())


def test_capture_without_detach_keeps_graph() -> None:
    model = MLP(depth=1, width=4, in_shape=(3,))
    with capture(model, "fc1", detach=False) as cache:
        model(torch.randn(2, 3))
    assert cache["fc1"].requires_grad
    cache["fc1"].sum().backward()
    assert model.fc1.bias.grad is not None
    torch.testing.assert_close(model.fc1.bias.grad, torch.full((4,), 2.0))


def test_hooks_removed_after_context_and_after_exception() -> None:
    model = ResNet20(width=1, in_shape=(1, 8, 8))
    before = _hook_count(model)
    with capture(model, ["stem.relu", "layer1.0.relu2"]):
        assert _hook_count(model) == before + 2
        model(torch.randn(2, 1, 8, 8))
    assert _hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, ["stem.relu", "head"]):
            raise RuntimeError("boom")
    assert _hook_count(model) == before
    with pytest.raises(ValueError):  # the model's own input check raises inside the context
        with capture(model, "head"):
            model(torch.randn(2, 1, 9, 9))
    assert _hook_count(model) == before


def test_forward_hooks_removed_when_a_callback_raises() -> None:
    model = MLP(depth=1, width=4, in_shape=(3,))
    before = _hook_count(model)

    def bad(*_args: object) -> None:
        raise KeyError("inside hook")

    with pytest.raises(KeyError):
        with forward_hooks(model, {"fc1": bad}):
            model(torch.randn(1, 3))
    assert _hook_count(model) == before


def test_model_unchanged_by_capture() -> None:
    model = MLP(depth=2, width=8, in_shape=(1, 4, 4)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with capture(model, capturable_layers(model)) as cache:
        out_hooked = model(torch.ones(3, 1, 4, 4))
    assert model.training
    out_plain = model(torch.ones(3, 1, 4, 4))
    torch.testing.assert_close(out_hooked, out_plain)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert len(cache) == len(capturable_layers(model))


def test_unknown_layer_lists_valid_names_and_suggests() -> None:
    model = MLP(depth=2, width=8, in_shape=(1, 4, 4))
    with pytest.raises(UnknownLayerError) as info:
        with capture(model, ["fc1", "relu_1"]):
            pass
    message = str(info.value)
    assert "relu_1" in message and "Did you mean" in message and "'relu1'" in message
    assert "Capturable layers: flatten, fc1, relu1, fc2, relu2, head" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert _hook_count(model) == 0  # nothing was registered
    with pytest.raises(ValueError, match="no layers"):
        with capture(model, []):
            pass


def test_cache_errors_and_inplace_detection() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True))
    with capture(model, ["0", "1"]) as cache:
        with pytest.raises(KeyError, match="not run yet"):
            cache["0"]
        model(torch.randn(5, 3))
    with pytest.raises(KeyError, match="not captured"):
        cache["2"]
    assert (cache["1"] >= 0).all()
    with pytest.raises(RuntimeError, match="modified in place"):
        cache["0"]  # the in-place ReLU overwrote the Linear's output after capture
    assert "0: (5, 4)" in repr(cache)


def test_repeated_calls_of_one_module_are_separate_capture_points() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(3, 4), nn.Linear(4, 4), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc2(self.act(self.fc1(x)) - 1.0))

    model = Twice()
    x = torch.randn(5, 3)
    with capture(model, ["act", "act_1"]) as cache:
        out = model(x)
        model(x)  # call counts restart with every forward pass
    first = torch.relu(model.fc1(x))
    torch.testing.assert_close(cache["act"], first.detach())
    torch.testing.assert_close(cache["act_1"], out.detach())
    with pytest.raises(UnknownLayerError, match="act_x"):
        with capture(model, ["act_x"]):
            pass
