"""The model zoo: MLP, VGG11 and ResNet20 in the CIFAR style used by the model-merging papers.

Every model records the arguments that built it in ``model.config`` (so a trained model can be
cached, rebuilt and compared), checks the shape of its input with a clear error, and names its
submodules so that they read well in a layer dropdown (``fc1``, ``features.relu3``,
``layer2.1.relu2``). Every non-linearity is an ``nn.ReLU`` module (never ``F.relu``) so that its
output can be captured by name.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["MLP", "VGG11", "ResNet20", "BasicBlock", "torchvision_model", "build_model", "MODEL_NAMES", "model_config"]


def _install_input_check(model: nn.Module, in_shape: tuple[int, ...]) -> None:
    """Check every input's shape before ``forward`` runs (a hook, so ``torch.fx`` tracing is unaffected)."""

    def check(_module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(model).__name__} expects a tensor input, got {type(x).__name__}")
        if x.dim() == len(in_shape):
            raise ValueError(
                f"{type(model).__name__} expects a batch of shape (N, {', '.join(map(str, in_shape))}) "
                f"but got a single sample of shape {tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)"
            )
        if x.dim() != len(in_shape) + 1 or tuple(x.shape[1:]) != tuple(in_shape):
            raise ValueError(
                f"{type(model).__name__} expects input of shape (N, {', '.join(map(str, in_shape))}) "
                f"but got {tuple(x.shape)}; build the model with in_shape={tuple(x.shape[1:])} "
                "or resize the data"
            )

    model.register_forward_pre_hook(check)


class MLP(nn.Sequential):
    """A multi-layer perceptron: ``depth`` hidden layers of ``width`` ReLU units.

    Submodules: ``flatten``, then ``fc{i}`` (``bn{i}`` when ``batchnorm``) ``relu{i}`` for
    i = 1..depth, then ``head``.
    """

    def __init__(
        self,
        depth: int = 3,
        width: int = 512,
        in_shape: tuple[int, ...] = (1, 28, 28),
        num_classes: int = 10,
        batchnorm: bool = False,
    ) -> None:
        if depth < 1 or width < 1:
            raise ValueError(f"MLP needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        in_features = 1
        for d in in_shape:
            in_features *= int(d)
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        fan_in = in_features
        for i in range(1, depth + 1):
            layers[f"fc{i}"] = nn.Linear(fan_in, width, bias=not batchnorm)
            if batchnorm:
                layers[f"bn{i}"] = nn.BatchNorm1d(width)
            layers[f"relu{i}"] = nn.ReLU()
            fan_in = width
        layers["head"] = nn.Linear(fan_in, num_classes)
        super().__init__(layers)
        self.config = dict(
            name="mlp", depth=depth, width=width, in_shape=tuple(in_shape),
            num_classes=num_classes, batchnorm=batchnorm,
        )
        _install_input_check(self, tuple(in_shape))


_VGG11_PLAN: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG11 for small images (CIFAR style): eight 3x3 conv-BN-ReLU layers, five max-pools, one linear head.

    ``width`` multiplies every layer's channels (width=1 gives 64..512; width=0.25 gives 16..128).
    Pools use ``ceil_mode`` so both 28x28 (Fashion-MNIST) and 32x32 (CIFAR) inputs reach 1x1.
    Submodules: ``features.conv{i}``, ``features.bn{i}``, ``features.relu{i}``, ``features.pool{j}``,
    then ``flatten`` and ``head``. ``batchnorm=False`` gives the plain VGG11 of the CCA Merge paper's
    Fashion-MNIST experiments (conv layers with biases, no ``bn{i}``), initialised as the paper's
    reference code does (``init="xavier_relu"``, the default without BatchNorm: Xavier-uniform weights
    with ReLU gain, zero biases): PyTorch's default initialisation (``init="default"``, the default with
    BatchNorm) divides the mean square of the signal by about 6 per conv-ReLU layer, so without
    BatchNorm the eight layers start with almost no signal and SGD barely trains.
    """

    def __init__(
        self,
        width: float = 1.0,
        in_shape: tuple[int, ...] = (1, 28, 28),
        num_classes: int = 10,
        batchnorm: bool = True,
        init: str | None = None,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"VGG11 needs width > 0, got {width}")
        init = init or ("default" if batchnorm else "xavier_relu")
        if init not in ("default", "xavier_relu"):
            raise ValueError(f"VGG11 init must be 'default' or 'xavier_relu', got {init!r}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = int(in_shape[0])
        conv_i = pool_i = 0
        for item in _VGG11_PLAN:
            if item == "M":
                pool_i += 1
                layers[f"pool{pool_i}"] = nn.MaxPool2d(2, ceil_mode=True)
                continue
            conv_i += 1
            out = max(1, int(round(int(item) * width)))
            layers[f"conv{conv_i}"] = nn.Conv2d(channels, out, 3, padding=1, bias=not batchnorm)
            if batchnorm:
                layers[f"bn{conv_i}"] = nn.BatchNorm2d(out)
            layers[f"relu{conv_i}"] = nn.ReLU()
            channels = out
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(channels, num_classes)
        self.config = dict(name="vgg11", width=width, in_shape=tuple(in_shape), num_classes=num_classes)
        if not batchnorm:  # recorded only when off, so the keys of cached BatchNorm models stay the same
            self.config["batchnorm"] = False
        if init != "default":  # likewise
            self.config["init"] = init
            gain = nn.init.calculate_gain("relu")
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    nn.init.xavier_uniform_(module.weight, gain=gain)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        _install_input_check(self, tuple(in_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.features(x)))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (1x1 conv-BN when the shape changes), ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(out_channels),
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet20 for small images (He et al. 2016, CIFAR variant) with a width multiplier.

    Three stages of three basic blocks with 16, 32, 64 channels times ``width``. Submodules:
    ``stem.conv``, ``stem.bn``, ``stem.relu``, ``layer{s}.{b}.(conv1|bn1|relu1|conv2|bn2|shortcut|relu2)``,
    ``pool``, ``flatten``, ``head``. The ``relu2`` of every block lies on the residual stream.
    """

    def __init__(
        self,
        width: int = 1,
        in_shape: tuple[int, ...] = (1, 28, 28),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"ResNet20 needs an integer width >= 1, got {width}")
        c1, c2, c3 = 16 * width, 32 * width, 64 * width
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(int(in_shape[0]), c1, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(c1),
                relu=nn.ReLU(),
            )
        )
        self.layer1 = self._stage(c1, c1, stride=1)
        self.layer2 = self._stage(c1, c2, stride=2)
        self.layer3 = self._stage(c2, c3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c3, num_classes)
        self.config = dict(name="resnet20", width=width, in_shape=tuple(in_shape), num_classes=num_classes)
        _install_input_check(self, tuple(in_shape))

    @staticmethod
    def _stage(in_channels: int, out_channels: int, stride: int, blocks: int = 3) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(self.flatten(self.pool(x)))


def torchvision_model(
    arch: str = "resnet18",
    in_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
) -> nn.Module:
    """A torchvision classification model ``arch`` (randomly initialised, nothing downloaded) fitted to ``in_shape``.

    ``torchvision.models.get_model(arch, weights=None, num_classes=num_classes)`` with its first
    convolution rebuilt for ``in_shape[0]`` input channels when that differs from 3 (same kernel,
    stride and padding), so a ResNet takes Fashion-MNIST's 1-channel images as they are. Everything
    else is torchvision's own model (on 28 x 28 images a ResNet's stem and max-pool leave 7 x 7
    maps). ``model.config`` records ``name="torchvision"``, ``arch``, ``in_shape`` and
    ``num_classes``, so trained copies are cached by :func:`ccatoolkit.zoo.trained_model`
    (``model="torchvision", model_kwargs=dict(arch=...)``). An architecture that cannot take
    ``in_shape`` (e.g. too small for its down-sampling) raises a ``ValueError`` here.
    """
    from torchvision import models as tv_models

    try:
        net = tv_models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError as err:
        raise ValueError(f"unknown torchvision model {arch!r} ({err})") from None
    channels = int(in_shape[0])
    first = next(((name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError(f"torchvision model {arch!r} has no Conv2d to take {channels}-channel input")
    name, conv = first
    if conv.in_channels != channels:
        if conv.groups != 1:
            raise ValueError(f"the first convolution of {arch!r} ({name!r}) is grouped; cannot change its input channels")
        new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode)
        parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
        setattr(parent, name.rpartition(".")[2], new)
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(2, *in_shape))
    except RuntimeError as err:
        raise ValueError(f"torchvision model {arch!r} cannot take inputs of shape {tuple(in_shape)}: {err}") from None
    finally:
        net.train(was_training)
    net.config = dict(name="torchvision", arch=str(arch), in_shape=tuple(in_shape), num_classes=num_classes)
    _install_input_check(net, tuple(in_shape))
    return net


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP, "vgg11": VGG11, "resnet20": ResNet20, "torchvision": torchvision_model,
}
#: The zoo's own architectures (``build_model`` also takes ``"torchvision"``, see :func:`torchvision_model`).
MODEL_NAMES: tuple[str, ...] = ("mlp", "vgg11", "resnet20")


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name (``"mlp"``, ``"vgg11"``, ``"resnet20"``, or ``"torchvision"`` with
    ``arch=...``, see :func:`torchvision_model`) with its keyword arguments."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names are: {', '.join(_REGISTRY)}")
    try:
        return _REGISTRY[key](**kwargs)
    except TypeError as err:
        raise TypeError(f"cannot build model {name!r} with {kwargs}: {err}") from None


def model_config(model: nn.Module) -> dict[str, Any]:
    """The arguments that rebuild ``model`` (zoo models), or a description from its class and parameter shapes."""
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        return dict(config)
    shapes = {name: list(p.shape) for name, p in model.state_dict().items()}
    return {"name": f"{type(model).__module__}.{type(model).__qualname__}", "shapes": shapes}
