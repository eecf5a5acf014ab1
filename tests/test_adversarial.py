"""PGD attacks and adversarial training (ccatoolkit.zoo.adversarial) and robust evaluation along paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


from ccatoolkit.landscape.curve_training import train_curve
from ccatoolkit.landscape.paths import interpolate
from ccatoolkit.zoo.adversarial import PGD
from ccatoolkit.zoo.models import MLP
from ccatoolkit.zoo.trained import trained_model
from ccatoolkit.zoo.training import evaluate

# digits from toybox are pixels in [0, 1] (not normalised): mean 0, std 1 keeps them in that range
PIXELS = dict(mean=(0.0,), std=(1.0,))


def test_pgd_raises_the_loss_and_lowers_accuracy(pair, digits) -> None:
    _, test = digits
    model = pair[0]
    clean = evaluate(model, test)
    weak = evaluate(model, test, attack=PGD(eps=0.05, steps=10, **PIXELS))
    strong = evaluate(model, test, attack=PGD(eps=0.2, steps=10, **PIXELS))
    assert clean["accuracy"] > 0.85  # a trained model (0.90 with these seeds)
    assert clean["loss"] < weak["loss"] < strong["loss"]
    assert strong["accuracy"] < weak["accuracy"] < clean["accuracy"]
    assert strong["accuracy"] < 0.5


def test_eps_zero_is_clean_and_a_step_stays_in_the_ball(pair, digits) -> None:
    _, test = digits
    clean = evaluate(pair[0], test)
    zero = evaluate(pair[0], test, attack=PGD(eps=0.0, steps=5, **PIXELS))
    assert zero["accuracy"] == clean["accuracy"]
    assert zero["loss"] == pytest.approx(clean["loss"], rel=1e-6)
    # Fashion-MNIST's normalisation: the radius is eps / std and the images stay images of [0, 1] pixels
    attack = PGD.for_dataset("fashion_mnist", eps=0.1, steps=3)
    assert attack.mean == pytest.approx((0.2860,)) and attack.std == pytest.approx((0.3530,))
    mlp = MLP(depth=1, width=16)
    x = (torch.rand(32, 1, 28, 28) - 0.2860) / 0.3530
    y = torch.randint(0, 10, (32,))
    x_adv = attack.perturb(mlp, x, y, generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 0.1 / 0.3530 + 1e-5
    assert (x_adv - x).abs().max() > 0.05 / 0.3530
    pixels = x_adv * 0.3530 + 0.2860
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="eps"):
        PGD(eps=-0.1)


def test_robust_accuracy_along_a_path_matches_the_models(pair, digits) -> None:
    _, test = digits
    a, b = pair
    attack = PGD(eps=0.1, steps=5, random_start=False, **PIXELS)  # deterministic: batched and looped agree
    batched = interpolate(a, b, test, alphas=[0.0, 0.5, 1.0], attack=attack, progress=False)
    looped = interpolate(a, b, test, alphas=[0.0, 0.5, 1.0], attack=attack, progress=False, batched=False)
    clean = interpolate(a, b, test, alphas=[0.0, 0.5, 1.0], progress=False)
    np.testing.assert_allclose(batched.loss, looped.loss, rtol=1e-4)
    np.testing.assert_allclose(batched.accuracy, looped.accuracy, atol=1.0 / 400)
    for end, model in ((0, a), (2, b)):
        alone = evaluate(model, test, attack=attack)
        assert batched.accuracy[end] == pytest.approx(alone["accuracy"], abs=1.0 / 400)
        assert batched.loss[end] == pytest.approx(alone["loss"], rel=1e-4)
    assert (batched.loss > clean.loss).all() and (batched.accuracy < clean.accuracy).all()
    assert "PGD eps=0.1" in batched.label


def test_robust_training_gives_robust_models_cached_by_attack(tmp_path: Path) -> None:
    small = dict(model="mlp", model_kwargs=dict(depth=1, width=64), dataset="digits", epochs=12, batch_size=64,
                 lr=0.1, progress=False, device="cpu", cache_dir=tmp_path)
    standard = trained_model(**small)
    robust = trained_model(**small, adversarial=PGD(eps=0.1, steps=3))
    files = {standard.train_info["cache_file"], robust.train_info["cache_file"]}
    assert len(files) == 2
    assert robust.train_info["robust_test_accuracy"] < robust.train_info["test_accuracy"]
    attack = PGD.for_dataset("digits", eps=0.1, steps=10)
    from ccatoolkit.data import get_loaders

    test = get_loaders("digits", batch_size=256, device="cpu")["test"]
    robust_acc = evaluate(robust, test, attack=attack)["accuracy"]
    standard_acc = evaluate(standard, test, attack=attack)["accuracy"]
    assert robust_acc > standard_acc + 0.15, (robust_acc, standard_acc)
    # the attack's settings are in the key: another eps is another model, the same one comes from the cache
    again = trained_model(**small, adversarial=PGD(eps=0.1, steps=3))
    assert again.train_info == robust.train_info
    other = trained_model(**{**small, "epochs": 1}, adversarial=PGD(eps=0.05, steps=3))
    assert other.train_info["cache_file"] not in files
    assert trained_model(**{**small, "epochs": 1}, adversarial=PGD(eps=0.1, steps=3)).train_info["cache_file"] \
        != other.train_info["cache_file"]


def test_curves_trained_on_the_robust_loss(pair, digits, tmp_path: Path) -> None:
    train, test = digits
    a, b = pair
    attack = PGD(eps=0.1, steps=3, **PIXELS)
    options = dict(align="permute", epochs=2, progress=False, cache_dir=str(tmp_path))
    clean = train_curve(a, b, train, **options)
    robust = train_curve(a, b, train, adversarial=attack, **options)
    assert len(list(tmp_path.glob("curve-*.pt"))) == 2  # the attack is part of the cache key
    assert len(robust.history) == 2 and min(robust.history) > max(clean.history)  # robust loss > clean loss
    on_clean = clean.evaluate(test, ts=5, progress=False, attack=attack)
    on_robust = robust.evaluate(test, ts=5, progress=False, attack=attack)
    assert on_robust.loss[2] < on_clean.loss[2]  # trained on the robust loss, the curve is more robust midway
    assert "PGD" in on_robust.label
