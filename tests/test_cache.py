"""The on-disk cache and the zoo: hits, misses, damaged files, wrong architectures, atomic writes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from ccatoolkit.zoo import trained as zoo
from ccatoolkit.zoo.cache import CacheError, atomic_save, cache_dir, cache_path, key_digest, load_or_create
from ccatoolkit.zoo.trained import trained_model, trained_models


# ---------------------------------------------------------------------------------------- cache


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCATOOLKIT_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("CCATOOLKIT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "ccatoolkit"


def test_key_digest_is_stable() -> None:
    a = key_digest({"model": {"width": 8, "in_shape": (1, 8, 8)}, "seed": 0})
    b = key_digest({"seed": 0, "model": {"in_shape": [1, 8, 8], "width": 8}})
    assert a == b and len(a) == 20 and int(a, 16) >= 0
    assert key_digest({"seed": 1}) != key_digest({"seed": 0})
    assert key_digest({"lr": 0.1}) != key_digest({"lr": 0.10000001})
    with pytest.raises(TypeError, match="JSON-able"):
        key_digest({"f": object()})


def test_load_or_create_hit_and_miss(tmp_path: Path) -> None:
    calls = []

    def create() -> dict:
        calls.append(1)
        return {"w": torch.arange(3.0), "note": "hi"}

    first = load_or_create("thing", {"a": 1}, create, cache_dir=tmp_path)
    second = load_or_create("thing", {"a": 1}, create, cache_dir=tmp_path)
    assert len(calls) == 1 and torch.equal(first["w"], second["w"]) and second["note"] == "hi"
    load_or_create("thing", {"a": 2}, create, cache_dir=tmp_path)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [cache_path("thing", {"a": 1}, tmp_path).name, cache_path("thing", {"a": 2}, tmp_path).name]
    )
    with pytest.raises(ValueError, match="simple name"):
        cache_path("../evil", {}, tmp_path)


def test_damaged_files_raise_cache_error_naming_the_file(tmp_path: Path) -> None:
    key = {"a": 1}
    load_or_create("thing", key, lambda: {"w": torch.randn(1000)}, cache_dir=tmp_path)
    path = cache_path("thing", key, tmp_path)
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(CacheError) as info:
        load_or_create("thing", key, lambda: pytest.fail("must not recompute"), cache_dir=tmp_path)
    assert str(path) in str(info.value) and "delete" in str(info.value)
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CacheError, match="cannot be read"):
        load_or_create("thing", key, lambda: 0, cache_dir=tmp_path)
    torch.save({"w": 1}, path)  # a checkpoint, but not ours
    with pytest.raises(CacheError, match="not a ccatoolkit cache file"):
        load_or_create("thing", key, lambda: 0, cache_dir=tmp_path)


def test_wrong_key_and_validate_raise(tmp_path: Path) -> None:
    load_or_create("thing", {"a": 1}, lambda: 1, cache_dir=tmp_path)
    os.replace(cache_path("thing", {"a": 1}, tmp_path), cache_path("thing", {"a": 2}, tmp_path))
    with pytest.raises(CacheError, match="another key"):
        load_or_create("thing", {"a": 2}, lambda: 2, cache_dir=tmp_path)

    def reject(value: object) -> None:
        raise ValueError("too small")

    load_or_create("other", {"b": 1}, lambda: 1, cache_dir=tmp_path)
    with pytest.raises(CacheError, match="too small"):
        load_or_create("other", {"b": 1}, lambda: 1, cache_dir=tmp_path, validate=reject)


def test_atomic_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.pt"
    atomic_save({"w": torch.ones(2)}, target)
    assert [p.name for p in target.parent.iterdir()] == ["x.pt"]
    assert torch.equal(torch.load(target)["w"], torch.ones(2))
    with pytest.raises(Exception):
        atomic_save({"f": lambda: 0}, tmp_path / "sub" / "y.pt")  # cannot be pickled
    assert [p.name for p in target.parent.iterdir()] == ["x.pt"]
    atomic_save({"w": torch.zeros(2)}, target)  # overwrite
    assert torch.equal(torch.load(target)["w"], torch.zeros(2))


# ---------------------------------------------------------------------------------------- zoo

SMALL = dict(model="mlp", model_kwargs=dict(depth=1, width=32), dataset="digits", epochs=4, batch_size=64,
             lr=0.1, progress=False, device="cpu")


def test_trained_model_caches_and_learns(tmp_path: Path) -> None:
    first = trained_model(**SMALL, cache_dir=tmp_path)
    assert not first.training and first.train_info["test_accuracy"] > 0.8
    assert first.train_info["n_train"] == 1437 - round(0.1 * 1437)
    start = time.perf_counter()
    second = trained_model(**SMALL, cache_dir=tmp_path)
    assert time.perf_counter() - start < 1.0
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    assert second.train_info == first.train_info
    assert Path(first.train_info["cache_file"]).parent == tmp_path
    assert len(list(tmp_path.glob("model-*.pt"))) == 1
    other = trained_model(**{**SMALL, "seed": 1}, cache_dir=tmp_path)
    assert other.train_info["cache_file"] != first.train_info["cache_file"]
    assert not torch.equal(other.fc1.weight, first.fc1.weight)
    assert len(list(tmp_path.glob("model-*.pt"))) == 2


def test_full_split_ignores_model_index_and_disjoint_parts_differ(tmp_path: Path) -> None:
    a = trained_model(**SMALL, cache_dir=tmp_path, limit=200)
    b = trained_model(**SMALL, cache_dir=tmp_path, limit=200, n_models=3, model_index=2)
    assert a.train_info["cache_file"] == b.train_info["cache_file"]
    parts = trained_models(2, split="disjoint", **{**SMALL, "epochs": 1}, cache_dir=tmp_path)
    assert [m.train_info["n_train"] for m in parts] == [647, 646]
    assert parts[0].train_info["cache_file"] != parts[1].train_info["cache_file"]


def test_wrong_architecture_and_damaged_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = trained_model(**{**SMALL, "epochs": 1}, cache_dir=tmp_path)
    path = Path(model.train_info["cache_file"])
    entry = torch.load(path)
    value = {"state_dict": {"fc1.weight": torch.zeros(3, 3)}}  # another architecture, same key, old (v1) format
    atomic_save(dict(format="ccatoolkit-cache-v1", kind="model", key=entry["key"], value=value), path)
    with pytest.raises(CacheError) as info:
        trained_model(**{**SMALL, "epochs": 1}, cache_dir=tmp_path)
    assert str(path) in str(info.value)
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(CacheError, match="cannot be read"):
        trained_model(**{**SMALL, "epochs": 1}, cache_dir=tmp_path)
    monkeypatch.setattr(zoo, "train", lambda *a, **k: pytest.fail("a damaged file must not be retrained"))
    with pytest.raises(CacheError):
        trained_model(**{**SMALL, "epochs": 1}, cache_dir=tmp_path)


def test_trained_model_uses_env_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCATOOLKIT_CACHE", str(tmp_path))
    model = trained_model(**{**SMALL, "epochs": 1, "limit": 100})
    assert Path(model.train_info["cache_file"]).parent == tmp_path
    with pytest.raises(ValueError, match="resnet20"):
        trained_model(**{**SMALL, "model": "lenet"})


def test_a_seed_gives_the_same_model_whatever_ran_before(tmp_path: Path) -> None:
    """The initial weights come from ``seed`` alone: a trained model does not depend on the process's history."""
    torch.manual_seed(123)
    first = trained_model(**SMALL, cache_dir=tmp_path / "a")
    torch.rand(1000)  # another global random state
    second = trained_model(**SMALL, cache_dir=tmp_path / "b")  # trained again, in another cache
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    state = torch.random.get_rng_state()
    trained_model(**SMALL, cache_dir=tmp_path / "a")  # loading from the cache leaves the global RNG alone
    assert torch.equal(state, torch.random.get_rng_state())


def test_landscape_store_reads_paths_planes_and_curves_back(tmp_path, monkeypatch) -> None:
    """A notebook's second run reads its paths, planes and curves' paths back: equal arrays, the same result
    classes and labels; a changed model or option computes afresh; ``progress`` is not part of the key."""
    import numpy as np

    from ccatoolkit.app.store import LandscapeStore
    from ccatoolkit.landscape.curves import Curve
    from ccatoolkit.zoo.models import MLP

    monkeypatch.setenv("CCATOOLKIT_CACHE", str(tmp_path))
    torch.manual_seed(0)
    a, b, c = (MLP(depth=2, width=8, in_shape=(5,)).eval() for _ in range(3))
    data = [(torch.randn(16, 5), torch.randint(0, 10, (16,))) for _ in range(2)]
    curve = Curve(a, a.state_dict(), b.state_dict(), c.state_dict(), method="permute")
    first = LandscapeStore()
    path = first.interpolate(a, b, data, alphas=5, progress=False, label="straight line")
    plane = first.loss_plane(a, b, c, data, resolution=4, progress=False, labels=("A", "B", "C'"))
    bent = first.evaluate_curve(curve, data, ts=5, progress=False)
    assert first.loaded == 0
    second = LandscapeStore()
    path2 = second.interpolate(a, b, data, alphas=5, progress=True, label="straight line")
    plane2 = second.loss_plane(a, b, c, data, resolution=4, progress=False, labels=("A", "B", "C'"))
    bent2 = second.evaluate_curve(curve, data, ts=5, progress=False)
    assert second.loaded == 3
    assert type(path2) is type(path) and path2.label == "straight line"
    np.testing.assert_array_equal(path2.loss, path.loss)
    np.testing.assert_array_equal(path2.accuracy, path.accuracy)
    assert type(plane2) is type(plane) and tuple(plane2.labels) == ("A", "B", "C'")
    np.testing.assert_array_equal(plane2.loss, plane.loss)
    np.testing.assert_array_equal(plane2.coords, plane.coords)
    assert type(bent2).__name__ == "CurveResult" and bent2.kind == "bezier" and bent2.label == bent.label
    np.testing.assert_array_equal(bent2.loss, bent.loss)
    second.interpolate(a, c, data, alphas=5, progress=False, label="straight line")  # another model
    second.interpolate(a, b, data, alphas=3, progress=False, label="straight line")  # another option
    assert second.loaded == 3
    off = LandscapeStore(enabled=False)
    off.interpolate(a, b, data, alphas=5, progress=False, label="straight line")
    assert off.loaded == 0


def test_landscape_store_keys_an_attack_by_its_settings(tmp_path, monkeypatch) -> None:
    """Robust paths (notebook 5) are read back for the same PGD settings and computed afresh for others."""
    import numpy as np

    from ccatoolkit.app.store import LandscapeStore
    from ccatoolkit.zoo.adversarial import PGD
    from ccatoolkit.zoo.models import MLP

    monkeypatch.setenv("CCATOOLKIT_CACHE", str(tmp_path))
    torch.manual_seed(0)
    a, b = (MLP(depth=1, width=8, in_shape=(5,)).eval() for _ in range(2))
    data = [(torch.rand(16, 5), torch.randint(0, 10, (16,)))]
    first = LandscapeStore().interpolate(a, b, data, alphas=3, attack=PGD(eps=0.1, steps=2), progress=False)
    store = LandscapeStore()
    again = store.interpolate(a, b, data, alphas=3, attack=PGD(eps=0.1, steps=2), progress=False)
    assert store.loaded == 1
    np.testing.assert_array_equal(again.loss, first.loss)
    stronger = store.interpolate(a, b, data, alphas=3, attack=PGD(eps=0.3, steps=2), progress=False)
    assert store.loaded == 1 and not np.array_equal(stronger.loss, first.loss)  # computed afresh
