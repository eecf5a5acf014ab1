"""Training and evaluation: a short real run that learns, reproducibility, schedules, evaluate on lists."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from ccatoolkit.data.loaders import get_loaders, make_loader
from ccatoolkit.data.datasets import load_dataset
from ccatoolkit.zoo.models import build_model
from ccatoolkit.zoo.training import SCHEDULES, default_lr, evaluate, lr_factor, train, warn_if_near_chance


def _digits_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", depth=2, width=64, in_shape=(1, 8, 8))


def test_mlp_learns_digits_quickly() -> None:
    loaders = get_loaders("digits", batch_size=64)
    model = _digits_mlp()
    start = time.perf_counter()
    out = train(model, loaders["train"], epochs=5, lr=0.1, seed=0, device="cpu", progress=False)
    elapsed = time.perf_counter() - start
    assert out is model and model.training  # trained in place, flag restored
    result = evaluate(model, loaders["test"])
    assert result["n"] == 360 and result["accuracy"] > 0.9 and result["loss"] < 0.5
    assert elapsed < 20


def test_training_is_reproducible_from_seed() -> None:
    ds = load_dataset("digits")

    def run(seed: int) -> dict[str, torch.Tensor]:
        model = build_model("mlp", depth=1, width=16, in_shape=(1, 8, 8))
        loader = make_loader(ds, 128, shuffle=True, seed=123)
        train(model, loader, epochs=1, seed=seed, device="cpu", progress=False)
        return model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"])


def test_evaluate_on_a_list_of_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    model.train()
    result = evaluate(model, batches)
    assert model.training  # restored
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits = model(x)
    assert result["n"] == 15
    assert result["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, [])


def test_train_accepts_a_one_shot_iterator_and_constant_schedule() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y = (x.flatten(1).sum(1) > 0).long()
    model = build_model("mlp", depth=1, width=16, in_shape=(1, 8, 8), num_classes=2)
    before = evaluate(model, [(x, y)])["loss"]
    train(model, iter([(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]), epochs=20, lr=0.05,
          schedule="constant", progress=False, device="cpu")
    assert evaluate(model, [(x, y)])["loss"] < before


def test_schedules_and_defaults() -> None:
    assert lr_factor("constant", 5, 10) == 1.0
    assert lr_factor("cosine", 0, 10) == pytest.approx(1.0) and lr_factor("cosine", 10, 10) == pytest.approx(0.0)
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("onecycle", 0, 100) == 0.0 and lr_factor("onecycle", 20, 100) == pytest.approx(1.0)
    assert lr_factor("onecycle", 60, 100) == pytest.approx(0.5) and lr_factor("onecycle", 100, 100) == 0.0
    assert set(SCHEDULES) == {"onecycle", "cosine", "constant"}
    with pytest.raises(ValueError, match="onecycle"):
        lr_factor("step", 0, 10)
    with pytest.raises(ValueError, match="onecycle"):
        train(_digits_mlp(), [(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))], 1, schedule="linear")
    assert default_lr(build_model("resnet20")) > default_lr(build_model("mlp")) > 0


def test_divergence_is_reported() -> None:
    model = _digits_mlp()
    x = torch.randn(32, 1, 8, 8) * 1e3
    y = torch.zeros(32, dtype=torch.long)
    with pytest.raises(RuntimeError, match="lower the learning rate"):
        train(model, [(x, y)], epochs=5, lr=1e6, momentum=0.0, progress=False, device="cpu")


@pytest.mark.slow
def test_mlp_on_real_fashion_mnist() -> None:
    try:
        loaders = get_loaders("fashion_mnist", batch_size=256, download=False)
    except FileNotFoundError as err:
        pytest.skip(str(err).splitlines()[0])
    model = build_model("mlp", depth=2, width=256)
    train(model, loaders["train"], epochs=2, seed=0, device="cpu", progress=False)
    assert evaluate(model, loaders["test"])["accuracy"] > 0.8


def test_warn_if_near_chance() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_near_chance(0.9, 10) == []
        assert warn_if_near_chance({"A": 0.9, "B": 0.5}, 10) == []
    with pytest.warns(UserWarning, match=r"chance \(10% for 10 classes\) or below: B 8.5%"):
        assert warn_if_near_chance({"A": 0.9, "B": 0.085}, 10) == ["B"]
    with pytest.warns(UserWarning, match="model 17.0%"):
        assert warn_if_near_chance(0.17, 10) == ["model"]  # within 10 points above chance
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_near_chance(0.25, 10, margin=0.1) == [] and warn_if_near_chance(0.17, 10, margin=0.05) == []
    with pytest.warns(UserWarning, match="mean nothing"):
        assert warn_if_near_chance({"x": 0.52}, 2) == ["x"]
    with pytest.raises(ValueError, match="num_classes"):
        warn_if_near_chance(0.5, 1)
