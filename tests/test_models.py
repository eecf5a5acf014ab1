"""The model zoo: forward shapes for 1- and 3-channel inputs at 28 and 32 px, names, configs, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ccatoolkit.zoo.models import MODEL_NAMES, build_model, model_config

SMALL = {"mlp": dict(depth=2, width=16), "vgg11": dict(width=0.125), "resnet20": dict(width=1)}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32), (1, 32, 32), (3, 28, 28)])
def test_forward_shape(name: str, in_shape: tuple[int, int, int]) -> None:
    model = build_model(name, in_shape=in_shape, num_classes=7, **SMALL[name])
    out = model(torch.randn(2, *in_shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert model.config["in_shape"] == in_shape and model.config["num_classes"] == 7


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_input_shape_error_names_both_shapes(name: str) -> None:
    model = build_model(name, in_shape=(1, 28, 28), **SMALL[name])
    with pytest.raises(ValueError) as info:
        model(torch.randn(2, 3, 32, 32))
    assert "(N, 1, 28, 28)" in str(info.value) and "(2, 3, 32, 32)" in str(info.value)
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.randn(1, 28, 28))


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        build_model("resnet50")
    for name in MODEL_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_config_rebuilds_same_architecture(name: str) -> None:
    model = build_model(name, in_shape=(3, 32, 32), num_classes=10, **SMALL[name])
    config = model_config(model)
    rebuilt = build_model(config.pop("name"), **config)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in rebuilt.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())


def test_readable_relu_module_names() -> None:
    names = {n for n, m in build_model("mlp").named_modules() if isinstance(m, nn.ReLU)}
    assert names == {"relu1", "relu2", "relu3"}
    vgg = dict(build_model("vgg11", width=0.125).named_modules())
    assert isinstance(vgg["features.relu3"], nn.ReLU) and len([m for m in vgg.values() if isinstance(m, nn.ReLU)]) == 8
    resnet = dict(build_model("resnet20").named_modules())
    assert isinstance(resnet["layer2.1.relu2"], nn.ReLU)
    assert len([m for m in resnet.values() if isinstance(m, nn.ReLU)]) == 19


def test_mlp_batchnorm_variant() -> None:
    model = build_model("mlp", depth=2, width=8, in_shape=(1, 8, 8), batchnorm=True)
    assert isinstance(dict(model.named_modules())["bn1"], nn.BatchNorm1d) and model.fc1.bias is None
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


@torch.no_grad()
def test_plain_vgg11_starts_with_signal_as_the_reference_code_initialises_it() -> None:
    """Without BatchNorm, PyTorch's default init shrinks the mean square ~6x per conv-ReLU layer (measured
    here: the eight layers keep 3e-4 of it); the paper's Xavier-ReLU init keeps about a tenth."""
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28)
    plain = build_model("vgg11", width=0.25, batchnorm=False).eval()
    assert model_config(plain)["init"] == "xavier_relu" and "init" not in model_config(build_model("vgg11"))
    kept = float(plain.features(x).pow(2).mean() / x.pow(2).mean())
    assert 0.02 < kept < 2.0
    assert all(float(m.bias.abs().max()) == 0.0 for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    for m in plain.modules():  # the default init, for comparison
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    assert float(plain.features(x).pow(2).mean() / x.pow(2).mean()) < kept / 50
    rebuilt = build_model("vgg11", **{k: v for k, v in model_config(plain).items() if k != "name"})
    assert model_config(rebuilt) == model_config(plain)
    with pytest.raises(ValueError, match="init must be"):
        build_model("vgg11", init="kaiming")
