"""The model zoo: architectures (MLP, VGG11, ResNet20), training and evaluation, and a cache of trained models.

``models`` builds networks, ``adversarial`` makes PGD adversarial examples, ``training`` trains and evaluates
them, ``cache`` stores results on disk, ``trained`` ties them together.
"""

from ccatoolkit.zoo.adversarial import PGD
from ccatoolkit.zoo.cache import CacheError, load_or_create
from ccatoolkit.zoo.models import MLP, MODEL_NAMES, VGG11, ResNet20, build_model, model_config, torchvision_model
from ccatoolkit.zoo.trained import trained_model, trained_models, zoo_key
from ccatoolkit.zoo.training import default_lr, evaluate, predict, train

__all__ = [
    "CacheError", "load_or_create", "PGD", "MLP", "MODEL_NAMES", "VGG11", "ResNet20", "build_model", "model_config",
    "torchvision_model",
    "trained_model", "trained_models", "zoo_key", "default_lr", "evaluate", "predict", "train",
]
