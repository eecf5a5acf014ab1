"""Trained models in one call: build, train on the right data split, and cache the weights.

``trained_model(...)`` is what the notebooks use. The weights are cached (see
:mod:`ccatoolkit.zoo.cache`) under a key holding everything that determines them — model config,
data set, split, seeds, epochs and every training hyper-parameter — so the second call with the
same arguments loads in a moment. The device and the data folder are not part of the key.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from ccatoolkit._utils import resolve_device
from ccatoolkit.data import VAL_FRACTION, dataset_info, get_loaders
from ccatoolkit.data.datasets import canonical_name
from ccatoolkit.zoo.adversarial import PGD
from ccatoolkit.zoo.cache import CacheError, load_or_create, writable_cache_path
from ccatoolkit.zoo.models import build_model, model_config
from ccatoolkit.zoo.training import default_lr, evaluate, train

__all__ = ["trained_model", "trained_models", "DEFAULT_EPOCHS", "zoo_key", "CacheError"]

#: Epochs used when ``epochs`` is not given.
DEFAULT_EPOCHS: dict[str, int] = {"mlp": 10, "vgg11": 20, "resnet20": 20}
# 2: the initial weights are seeded by `seed` (version 1 built the network before seeding, so its
# initialisation depended on what the process had done before, and models could share one)
_ZOO_VERSION = 2


def zoo_key(
    model: nn.Module,
    dataset: str,
    split: str,
    n_models: int,
    model_index: int,
    seed: int,
    split_seed: int,
    major_fraction: float,
    val_fraction: float,
    limit: int | None,
    hyper: dict[str, Any],
) -> dict[str, Any]:
    """The cache key of a trained model. With ``split="full"`` every model sees the same data, so
    ``n_models``/``model_index`` are dropped from the key (the seed alone tells models apart);
    ``major_fraction`` only counts for ``"skewed"``."""
    key: dict[str, Any] = dict(
        zoo_version=_ZOO_VERSION,
        model=model_config(model),
        dataset=dataset,
        split=split,
        seed=seed,
        split_seed=split_seed,
        val_fraction=val_fraction,
        limit=limit,
        train=hyper,
    )
    if split != "full":
        key.update(n_models=n_models, model_index=model_index)
    if split == "skewed":
        key["major_fraction"] = major_fraction
    return key


def _initial_model(model: str, model_kwargs: dict[str, Any] | None, dataset: str, seed: int) -> nn.Module:
    """``model`` built for ``dataset``'s input shape and classes, its initial weights seeded by ``seed`` alone."""
    info = dataset_info(dataset)
    kwargs = dict(in_shape=info["in_shape"], num_classes=info["num_classes"])
    kwargs.update(model_kwargs or {})
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on `seed` alone, not on earlier work
        torch.manual_seed(seed)
        return build_model(model, **kwargs)


def _train_and_test(
    net: nn.Module, loaders: dict[str, Any], hyper: dict[str, Any], seed: int, device: torch.device,
    progress: bool, adversarial: PGD | None,
) -> dict[str, Any]:
    """Train ``net`` in place with the settings ``hyper`` and test it: the checkpoint (weights and a summary)."""
    start = time.perf_counter()
    train(net, loaders["train"], hyper["epochs"], lr=hyper["lr"], momentum=hyper["momentum"],
          weight_decay=hyper["weight_decay"], schedule=hyper["schedule"], label_smoothing=hyper["label_smoothing"],
          nesterov=hyper["nesterov"], seed=seed, device=device, progress=progress, adversarial=adversarial)
    seconds = time.perf_counter() - start
    test = evaluate(net, loaders["test"])
    summary = dict(test_accuracy=float(test["accuracy"]), test_loss=float(test["loss"]),
                   n_train=len(loaders["train"].dataset), seconds=seconds)
    if adversarial is not None:  # under the training attack
        robust = evaluate(net, loaders["test"], attack=adversarial)
        summary.update(robust_test_accuracy=float(robust["accuracy"]), robust_test_loss=float(robust["loss"]))
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return dict(state_dict=state, info=summary)


# Long by its 25 arguments and their docstring; the body is one sequence: build, key, train or load.
def trained_model(
    model: str = "mlp",
    model_kwargs: dict[str, Any] | None = None,
    dataset: str = "fashion_mnist",
    split: str | None = "full",
    n_models: int = 1,
    model_index: int = 0,
    seed: int = 0,
    split_seed: int = 0,
    major_fraction: float = 0.8,
    val_fraction: float = VAL_FRACTION,
    epochs: int | None = None,
    batch_size: int = 256,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "onecycle",
    label_smoothing: float = 0.0,
    nesterov: bool = True,
    augment: bool | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    root: str | os.PathLike[str] | None = None,
    adversarial: PGD | None = None,
) -> nn.Module:
    """A ``model`` trained on ``dataset`` (part ``model_index`` of an ``n_models`` ``split``), cached.

    The model is built with ``build_model(model, in_shape=..., num_classes=..., **model_kwargs)``
    (shape facts from :func:`ccatoolkit.data.dataset_info`) and trained with
    `ccatoolkit.zoo.training.train` on the training loader of :func:`ccatoolkit.data.get_loaders`
    (same meaning of ``split``, ``split_seed``, ``val_fraction``, ``augment``, ``limit``);
    ``seed`` seeds initialisation and shuffling. ``epochs`` defaults to :data:`DEFAULT_EPOCHS`,
    ``lr`` to `ccatoolkit.zoo.training.default_lr`. ``adversarial``: PGD adversarial training
    (a :class:`ccatoolkit.zoo.adversarial.PGD`; without its own mean/std it gets the data set's, so
    ``eps`` is in pixel units); the attack's settings are part of the cache key.

    Returns the model in eval mode on ``device`` (default: the best available), with
    ``model.train_info = dict(test_accuracy, test_loss, n_train, seconds, cache_file)`` (and
    ``robust_test_accuracy``, ``robust_test_loss`` under the training attack when ``adversarial``)
    (``seconds``: the training time when it was trained). A checkpoint that does not fit the
    model, or is damaged, raises :class:`ccatoolkit.zoo.cache.CacheError` naming the file. An
    unwritable cache folder is found before training: the weights then go to a temporary folder
    (with a warning naming both).
    """
    key_name = canonical_name(dataset)
    kind = "full" if split is None else split
    net = _initial_model(model, model_kwargs, key_name, seed)
    name = str(model_config(net).get("name", model)).lower()
    epochs = DEFAULT_EPOCHS.get(name, 10) if epochs is None else int(epochs)
    lr = default_lr(net) if lr is None else float(lr)
    if augment is None:
        augment = key_name in ("cifar10", "cifar100")
    hyper = dict(
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
        schedule=schedule, label_smoothing=label_smoothing, nesterov=nesterov, augment=bool(augment),
    )
    if adversarial is not None:  # standard models keep the keys they always had
        adversarial = adversarial.with_normalisation(key_name)
        hyper["adversarial"] = adversarial.key()
    key = zoo_key(net, key_name, kind, n_models, model_index, seed, split_seed, major_fraction,
                  val_fraction, limit, hyper)
    dev = resolve_device(device)

    def create() -> dict[str, Any]:
        loaders = get_loaders(
            key_name, batch_size=batch_size, split=kind, n_models=n_models, model_index=model_index,
            split_seed=split_seed, seed=seed, major_fraction=major_fraction, val_fraction=val_fraction,
            augment=augment, root=root, limit=limit, device=dev,
        )
        return _train_and_test(net, loaders, hyper, seed, dev, progress, adversarial)

    def validate(value: Any) -> None:
        if not isinstance(value, dict) or "state_dict" not in value:
            raise ValueError("not a zoo checkpoint (no state_dict)")
        net.load_state_dict(value["state_dict"])  # raises on missing keys or wrong shapes

    path = writable_cache_path("model", key, cache_dir)  # checked before training, so the run is never lost
    value = load_or_create("model", key, create, cache_dir=path.parent, validate=validate)
    net.to(dev).eval()
    net.train_info = dict(value.get("info", {}), cache_file=str(path))
    return net


def trained_models(n: int, split: str | None = "full", seed: int = 0, **kwargs: Any) -> list[nn.Module]:
    """``n`` models of one experiment: model ``i`` is ``trained_model(split=split, n_models=n,
    model_index=i, seed=seed + i, **kwargs)`` — different seeds, and with a ``"disjoint"`` or
    ``"skewed"`` split different parts of the data (all cut with the same ``split_seed``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [trained_model(split=split, n_models=n, model_index=i, seed=seed + i, **kwargs) for i in range(n)]

