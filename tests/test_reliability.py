"""Issue 14: bad input never gives a silent wrong answer, and a finished training run is never lost.

Each test names the input that used to give a wrong answer (or a confusing failure deep inside
torch) and checks that it now gives the right answer or a clear error that names the fix.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ccatoolkit as cc
from ccatoolkit._utils import check_same_architecture
from ccatoolkit.merging.normalization import repair, reset_bn_stats
from ccatoolkit.zoo.cache import CacheError, atomic_save, cache_path, load_or_create
from toybox import Reiterable, digit_batches, fit


def _mlp(seed: int, width: int = 16, batchnorm: bool = False) -> nn.Sequential:
    """A user's own model: a plain nn.Sequential without ``.config`` (the merge graph is traced from data)."""
    torch.manual_seed(seed)
    norm = [nn.BatchNorm1d(width)] if batchnorm else []
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), *norm, nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


@pytest.fixture(scope="module")
def digits() -> tuple[list, list]:
    train, test = digit_batches(128)
    return train[:6], test[:2]


@pytest.fixture(scope="module")
def pair(digits: tuple[list, list]) -> tuple[nn.Module, nn.Module]:
    train, _ = digits
    return fit(_mlp(0), train, epochs=3, seed=0), fit(_mlp(1), train, epochs=3, seed=1)


def _same_state(a: nn.Module, b: nn.Module, atol: float = 0.0) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.allclose(sa[k].double(), sb[k].double(), atol=atol, rtol=0) for k in sa)


# ------------------------------------------------------------------ 1. data: generators, one-shot iterators


def test_one_shot_iterators_are_refused_where_several_passes_are_needed(digits, pair) -> None:
    train, test = digits
    a, b = pair
    gen = lambda: (batch for batch in train)  # noqa: E731
    with pytest.raises(TypeError, match="one-shot iterator.*list of batches.*DataLoader"):
        cc.merge([a, b], "cca", data=gen(), progress=False)
    with pytest.raises(TypeError, match="one-shot"):
        cc.merge([a, b], "average", data=iter(train), progress=False)
    with pytest.raises(TypeError, match="val_data is a one-shot"):
        cc.merge([a, b], "cca", data=train, val_data=gen(), progress=False)
    with pytest.raises(TypeError, match="one-shot"):
        repair(a, [a, b], gen(), progress=False)
    with pytest.raises(TypeError, match="one-shot"):  # aligned on data, then evaluated on it: two passes
        cc.interpolate(a, b, gen(), alphas=3, align="permute", progress=False)
    with pytest.raises(TypeError, match="one-shot"):  # one copy after another: a pass per point
        cc.interpolate(a, b, gen(), alphas=3, batched=False, progress=False)
    with pytest.raises(TypeError, match="bn_data is a one-shot"):
        cc.interpolate(a, b, test, alphas=3, repair=True, bn_data=gen(), progress=False)
    with pytest.raises(TypeError, match="one-shot"):
        cc.train_curve(a, b, gen(), epochs=1, cache=False, progress=False)


def test_one_pass_functions_take_a_generator_and_lose_no_batch(digits, pair) -> None:
    train, test = digits
    a, b = pair
    gen = lambda: (batch for batch in train)  # noqa: E731
    # the merge graph of a model without .config is traced from the first batch: it must not be consumed
    listed = cc.alignment_transforms(a, b, "cca", train, progress=False)
    streamed = cc.alignment_transforms(a, b, "cca", gen(), progress=False)
    assert all(torch.allclose(listed[s][0], streamed[s][0], atol=1e-9) for s in listed)
    stats = cc.collect_statistics([a, b], gen(), ["2"], progress=False)
    assert stats["2"].count == sum(len(x) for x, _ in train)
    curve = cc.interpolate(a, b, (batch for batch in test), alphas=3, progress=False)  # one batched pass
    assert np.allclose(curve.loss, cc.interpolate(a, b, test, alphas=3, progress=False).loss)
    bn = fit(_mlp(2, batchnorm=True), train, epochs=1)
    assert _same_state(reset_bn_stats(bn, gen(), progress=False), reset_bn_stats(bn, train, progress=False))


def test_merge_sees_the_same_batches_from_a_list_and_a_reiterable(digits, pair) -> None:
    train, _ = digits
    a, b = pair
    wrapped = Reiterable(train)
    for method in ("cca", "permute"):
        from_list = cc.merge([a, b], method, train, progress=False)
        from_wrapper = cc.merge([a, b], method, wrapped, progress=False)
        assert _same_state(from_list, from_wrapper, atol=1e-6), method
        assert from_list.merge_info["ridge"] == from_wrapper.merge_info["ridge"]
    assert wrapped.passes > 2


def test_a_tensor_passed_as_data_is_refused_with_the_fix(digits, pair) -> None:
    train, _ = digits
    a, b = pair
    x, y = train[0]
    with pytest.raises(TypeError, match=r"single tensor of shape \(128, 1, 8, 8\).*\[x\]"):
        cc.merge([a, b], "permute", data=x, progress=False)
    for call in (lambda: cc.evaluate(a, x), lambda: cc.collect_statistics([a, b], x, ["2"], progress=False),
                 lambda: cc.correlation_matrix(a, b, x, "2", progress=False)):
        with pytest.raises(TypeError, match="iterable of batches"):
            call()


# ------------------------------------------------------------------ 2. numerics: ridges, too few samples


def test_non_finite_ridges_are_refused_before_any_work(digits, pair) -> None:
    train, _ = digits
    a, b = pair
    for bad in (float("nan"), float("inf"), -1.0):
        data = Reiterable(train)
        with pytest.raises(ValueError, match="ridge must be a finite number"):
            cc.merge([a, b], "cca", data, ridge=bad, progress=False)
        with pytest.raises(ValueError, match="ridge_grid value must be a finite number"):
            cc.merge([a, b], "cca_multiview", data, ridge_grid=(0.1, bad), progress=False)
        with pytest.raises(ValueError, match="ridge must be a finite number"):
            cc.alignment_transforms(a, b, "cca", data, ridge=bad, progress=False)
        assert data.passes == 0  # refused up front, not deep inside the algebra


def test_tiny_ridge_or_too_few_samples_warn(digits, pair) -> None:
    train, _ = digits
    a, b = pair
    few = [(train[0][0][:3], train[0][1][:3])]  # 3 samples for 2 x 16 channels
    with pytest.warns(RuntimeWarning) as record:
        cc.merge([a, b], "cca", few, ridge=0.0, progress=False)
    messages = " | ".join(str(w.message) for w in record)
    assert "rank-deficient: 3 samples for 32 channels" in messages and "'2'" in messages
    assert "ridge=0 on ill-conditioned covariances" in messages and "ridge='auto'" in messages
    with pytest.warns(RuntimeWarning, match="rank-deficient"):
        cc.merge([a, b], "permute", few, progress=False)
    with warnings.catch_warnings():  # enough data and a sensible ridge: silent
        warnings.simplefilter("error", RuntimeWarning)
        cc.merge([a, b], "cca", train, ridge=1e-3, progress=False)


# ------------------------------------------------------------------ 3. the cache


def test_an_unwritable_cache_folder_is_found_before_the_work(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    order = []

    def create() -> dict:
        order.append("create")
        return {"w": torch.arange(4.0)}

    with pytest.warns(RuntimeWarning) as record:
        value = load_or_create("result", {"k": 1}, create, cache_dir=blocked)
    assert order == ["create"] and torch.equal(value["w"], torch.arange(4.0))
    message = str(record[0].message)
    assert str(blocked) in message and str(tmp_path / "tmp" / "ccatoolkit-cache") in message
    stored = tmp_path / "tmp" / "ccatoolkit-cache" / cache_path("result", {"k": 1}, blocked).name
    assert stored.is_file()
    with pytest.warns(RuntimeWarning):  # the result is found again in the fallback folder
        again = load_or_create("result", {"k": 1}, lambda: pytest.fail("recomputed"), cache_dir=blocked)
    assert torch.equal(again["w"], value["w"])

    with pytest.warns(RuntimeWarning, match="cannot be written"):
        model = cc.trained_model("mlp", {"depth": 1, "width": 8}, dataset="digits", epochs=1, progress=False,
                                 limit=100, cache_dir=blocked, device="cpu")  # trained, not lost
    assert Path(model.train_info["cache_file"]).parent == tmp_path / "tmp" / "ccatoolkit-cache"
    assert Path(model.train_info["cache_file"]).is_file()


def test_flipped_bytes_in_a_cache_file_raise(tmp_path: Path) -> None:
    value = {"state_dict": {"w": torch.linspace(-1, 1, 20000)}}
    load_or_create("model", {"k": 2}, lambda: value, cache_dir=tmp_path)
    path = cache_path("model", {"k": 2}, tmp_path)
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(255 - c for c in raw[middle : middle + 64])
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="checksum") as info:
        load_or_create("model", {"k": 2}, lambda: pytest.fail("recomputed"), cache_dir=tmp_path)
    assert str(path) in str(info.value)


def test_a_result_that_cannot_be_loaded_back_is_refused_when_saved(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"nn.Module|Linear.*state_dict\(\)"):
        load_or_create("model", {"k": 3}, lambda: nn.Linear(2, 2), cache_dir=tmp_path)
    assert not cache_path("model", {"k": 3}, tmp_path).exists()


def test_old_entries_without_a_checksum_still_load(tmp_path: Path) -> None:
    key = {"k": 4}
    path = cache_path("model", key, tmp_path)
    atomic_save(dict(format="ccatoolkit-cache-v1", kind="model", key=json.dumps(key, separators=(",", ":")),
                     value={"w": torch.ones(3)}), path)
    value = load_or_create("model", key, lambda: pytest.fail("recomputed"), cache_dir=tmp_path)
    assert torch.equal(value["w"], torch.ones(3))


# ------------------------------------------------------------------ 4. NaN / Inf weights


def test_non_finite_weights_are_refused_naming_model_and_tensor(digits, pair) -> None:
    train, test = digits
    a, b = pair
    bad = copy.deepcopy(b)
    with torch.no_grad():
        bad[3].weight[0, 0] = float("nan")
    for method in ("average", "permute_weight", "cca"):
        with pytest.raises(ValueError, match=r"model 1 has non-finite values in '3.weight' \(1 NaN"):
            cc.merge([a, bad], method, train, progress=False)
    with pytest.raises(ValueError, match="model_b has non-finite values in '3.weight'"):
        cc.interpolate(a, bad, test, alphas=3, progress=False)
    with pytest.raises(ValueError, match="non-finite values in '3.weight'"):
        cc.align_to(a, bad, "permute", train, progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        cc.alignment_transforms(a, bad, "permute_weight", progress=False)
    with pytest.raises(ValueError, match="B has non-finite"):
        cc.loss_plane(a, bad, copy.deepcopy(a), test, resolution=2, progress=False)
    with pytest.raises(ValueError, match="B has non-finite"):
        cc.simplex([a, bad, a], test, resolution=1, progress=False)
    with pytest.raises(ValueError, match="model_b has non-finite"):
        cc.train_curve(a, bad, train, epochs=1, cache=False, progress=False)


# ------------------------------------------------------------------ 5. dtypes


def test_mixed_dtypes_are_named_and_float32_data_serves_float64_models(digits, pair) -> None:
    train, test = digits
    a, b = pair
    b64 = copy.deepcopy(b).double()
    with pytest.raises(ValueError, match=r"different dtypes: '1.weight' is torch.float32 in model 0 but "
                                         r"torch.float64 in model 1.*model.float\(\)"):
        check_same_architecture([a, b64])
    with pytest.raises(ValueError, match="dtypes"):
        cc.merge([a, b64], "cca", train, progress=False)
    a64 = copy.deepcopy(a).double()
    for method in ("cca", "permute", "zipit"):
        merged = cc.merge([a64, b64], method, train, progress=False)  # float32 batches, float64 models
        assert next(merged.parameters()).dtype == torch.float64
        assert _same_state(merged, cc.merge([a, b], method, train, progress=False), atol=1e-3)
    cc.interpolate(a64, b64, test, alphas=3, align="cca", align_data=train, progress=False)
    bn = fit(_mlp(3, batchnorm=True), train, epochs=1).to(torch.bfloat16)
    assert cc.evaluate(reset_bn_stats(bn, train, progress=False), test)["n"] == sum(len(y) for _, y in test)
    merged = cc.merge([bn, copy.deepcopy(bn)], "permute", train, progress=False)
    assert next(merged.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------ 6. smaller ones


def test_correlation_matrix_between_layers_of_different_widths(digits) -> None:
    train, _ = digits
    narrow, wide = _mlp(0, width=8), _mlp(1, width=12)
    corr = cc.correlation_matrix(narrow, wide, train, "2", progress=False)
    assert corr.shape == (8, 12) and torch.isfinite(corr).all()
    rho = cc.canonical_correlations(narrow, wide, train, "2", progress=False)
    assert rho.shape == (8,)


def test_merge_inside_inference_mode(digits, pair) -> None:
    train, test = digits
    a, b = pair
    expected = cc.merge([a, b], "cca", train, progress=False)
    with torch.inference_mode():
        merged = cc.merge([a, b], "cca", train, progress=False)
    assert _same_state(merged, expected, atol=1e-6)
    assert not any(p.is_inference() for p in merged.parameters())


def test_wrapped_models_ask_for_model_module(digits, pair) -> None:
    train, test = digits
    a, b = pair
    wrapped = [nn.DataParallel(a), nn.DataParallel(b)]
    with pytest.raises(TypeError, match=r"wrapped in DataParallel.*model.module"):
        cc.merge(wrapped, "cca", train, progress=False)
    with pytest.raises(TypeError, match="model.module"):
        cc.interpolate(wrapped[0], b, test, alphas=3, progress=False)


def test_capture_without_layers_is_a_clear_type_error(pair) -> None:
    with pytest.raises(TypeError, match="layer name or a list of names"):
        with cc.capture(pair[0], None):
            pass


@pytest.mark.parametrize("alphas", ["0.5", "abc", True, np.array([[0.0, 0.5], [1.0, 1.0]]), [True, False]])
def test_alphas_that_would_be_reinterpreted_are_refused(digits, pair, alphas) -> None:
    _, test = digits
    with pytest.raises((TypeError, ValueError), match="alphas must be"):
        cc.interpolate(pair[0], pair[1], test, alphas=alphas, progress=False)


def test_targets_must_be_class_indices_within_the_outputs(digits, pair) -> None:
    train, test = digits
    a, b = pair
    x, y = test[0]
    for data, pattern in (([(x, y.float())], "integer class indices"), ([(x, y + 10)], r"in \[0, 10\)"),
                          ([(x, y - 1)], r"in \[0, 10\)")):
        with pytest.raises(ValueError, match=pattern):
            cc.evaluate(a, data)
        with pytest.raises(ValueError, match=pattern):
            cc.interpolate(a, b, data, alphas=2, progress=False)
        with pytest.raises(ValueError, match=pattern):
            cc.train(copy.deepcopy(a), data, epochs=1, progress=False, device="cpu")
