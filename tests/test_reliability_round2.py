"""Issue 26 (reliability, round two): caches, traces and unusual models never give a silent wrong answer, and a
full disk loses no finished result.

Each test names the input that used to give a wrong answer (or an error that hid its cause) and checks the
right answer or a clear error naming the fix. The wiring of these checks into ``merge``/``align_to`` is
tested beside the merge entry point.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import ccatoolkit as cc
from ccatoolkit._utils import check_class_targets, check_max_batches, check_same_architecture
from ccatoolkit.analysis.capture import capture
from ccatoolkit.analysis.stats import collect_statistics, warn_if_constant
from ccatoolkit.merging.graph.spec import GraphError, MergeGraph
from ccatoolkit.merging.graph.trace import merge_graph

ROOT = Path(__file__).resolve().parents[1]


class DropoutNet(nn.Module):
    """Functional ReLU and dropout: fx records ``self.training`` as the constant it was while tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.head = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.fc1(x)), 0.5, training=self.training)
        return self.head(h)


def _plain(model: DropoutNet, x: torch.Tensor) -> torch.Tensor:
    """``model``'s function in eval mode, computed by hand (no trace, no hooks)."""
    return model.head(F.relu(model.fc1(x)))


# ------------------------------------------------------------------ lost work: a full disk


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="needs resource limits (POSIX)")
def test_a_full_disk_returns_the_result_with_a_warning_and_leaves_no_entry(tmp_path: Path) -> None:
    """torch.save past RLIMIT_FSIZE fails as on a full disk (EFBIG, or torch's 'unexpected pos'): the result
    comes back, a warning says it was not cached and why, and the cache folder holds no file, not even a
    temporary one."""
    script = textwrap.dedent("""
        import json, resource, signal, sys, warnings
        import torch
        from ccatoolkit.zoo.cache import load_or_create
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))  # 64 KiB per file
        value = {"w": torch.arange(200_000, dtype=torch.float32)}  # 800 KB: does not fit
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = load_or_create("model", {"k": 1}, lambda: value, cache_dir=sys.argv[1])
        print(json.dumps({"same": bool(torch.equal(got["w"], value["w"])),
                          "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
    """)
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, "-c", script, str(cache)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["same"]
    assert len(report["warnings"]) == 1
    message = report["warnings"][0]
    assert message.startswith("RuntimeWarning: could not write the cache file")
    assert "returned but not cached" in message and "disk full" in message
    assert "unexpected pos" in message or "File too large" in message or "No space" in message  # the reason
    assert list(cache.iterdir()) == []  # no entry, no temporary file


# ------------------------------------------------------------------ traces: train/eval mode, copies


def test_a_trace_taken_in_train_mode_does_not_serve_eval_mode() -> None:
    torch.manual_seed(0)
    model, x = DropoutNet(), torch.randn(64, 8)
    model.train()
    assert "relu" in cc.capturable_layers(model)  # traced in train mode: dropout on
    with capture(model, ["relu"]):
        model(x)
    model.eval()
    with torch.no_grad():
        expected = _plain(model, x)
        with capture(model, ["relu"]) as cache:
            out = model(x)
        assert torch.equal(out, expected)  # was 0.7 away: the train-mode trace applied dropout
        assert torch.equal(cache["relu"], F.relu(model.fc1(x)))
        with capture(model, ["relu"]):  # switched inside the block: each call follows the model's flags
            model.train()
            assert not torch.equal(model(x), expected)
            model.eval()
            assert torch.equal(model(x), expected)
    assert model.training is False and "forward" not in model.__dict__


def test_merge_graph_names_node_points_from_the_eval_mode_trace() -> None:
    model = DropoutNet().train()
    cc.capturable_layers(model)  # a train-mode trace in the cache
    graph = merge_graph(model)
    assert [(s.name, s.capture, s.size) for s in graph] == [("relu", ["relu"], 32)]
    assert model.training  # flags restored


def test_a_deepcopy_inside_capture_is_a_plain_copy() -> None:
    torch.manual_seed(0)
    model, x = DropoutNet().eval(), torch.randn(16, 8)
    with torch.no_grad(), capture(model, ["relu", "fc1"]) as cache:
        model(x)
        seen = cache["fc1"].clone()
        duplicate = copy.deepcopy(model)
        duplicate.head = nn.Linear(32, 4)  # a head swapped in the copy is used
        assert torch.equal(duplicate(x), _plain(duplicate, x))
        assert torch.equal(cache["fc1"], seen)  # the copy does not record into this capture
        assert not {"forward", "__deepcopy__"} & set(duplicate.__dict__)
        assert len(duplicate._forward_pre_hooks) == 0 and len(duplicate.fc1._forward_hooks) == 0
        assert torch.equal(model(x), _plain(model, x))  # the model itself is still captured
    assert not {"forward", "__deepcopy__"} & set(model.__dict__)
    assert len(model._forward_pre_hooks) == 0 and len(model.fc1._forward_hooks) == 0


# ------------------------------------------------------------------ the merge graph


def _sequence_model() -> nn.Sequential:
    """A Linear over the last axis of (N, 8, 8) inputs, then flattened (channels last: l * 16 + c)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10))


def test_a_linear_over_a_sequence_is_refused_naming_the_layer() -> None:
    model = _sequence_model()
    # with data the graph was silently empty (a plain average); without, it assumed channels first
    with pytest.raises(GraphError, match=r"Linear '0' is applied to the last axis of a tensor of shape "
                                         r"\(4, 8, 8\).*channels last.*nn\.Conv1d.*method='average'"):
        merge_graph(model, example_input=torch.randn(4, 8, 8))
    with pytest.raises(GraphError, match=r"Linear '0' is applied to the last axis.*'3' reads them flattened "
                                         r"\(128 features from 16 channels\).*nn\.Conv1d"):
        merge_graph(model)


def test_a_linear_over_a_sequence_as_the_last_layer_or_after_a_flatten_is_fine() -> None:
    per_position = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    assert merge_graph(per_position, torch.randn(4, 8, 8)).names == ["2"]
    head_over_sequence = nn.Sequential(nn.Linear(8, 10))  # outputs only: nothing to align, nothing wrong
    assert len(merge_graph(head_over_sequence, torch.randn(4, 8, 8))) == 0


def test_an_empty_layer_list_does_not_blame_the_user() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match=r"layers is empty.*merge graph has no hidden space.*method='average'"):
        collect_statistics([model, model], [torch.randn(4, 1, 8, 8)], {}, progress=False)


def test_a_learned_temperature_on_the_logits_is_allowed() -> None:
    class Temperature(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.relu, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)
            self.temperature = nn.Parameter(torch.tensor(1.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.relu(self.fc1(x))) / self.temperature

    class Reciprocal(Temperature):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.temperature / self.relu(self.fc1(x)))  # 1/h is not a scaling: still refused

    for example in (None, torch.randn(2, 8)):
        graph = merge_graph(Temperature(), example)
        assert [(s.name, s.size, [r.name for r in s.outputs], [r.name for r in s.inputs]) for s in graph] == [
            ("relu", 16, ["fc1.weight", "fc1.bias"], ["fc2.weight"])]
        with pytest.raises(GraphError, match="truediv"):
            merge_graph(Reciprocal(), example)


def test_from_spec_refuses_the_swapped_axes_of_a_square_weight() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    good = dict(capture=["1"], outputs=[("0.weight", 0), ("0.bias", 0)], inputs=[("2.weight", 1)])
    assert MergeGraph.from_spec(model, {"h": good}).names == ["h"]
    swapped_out = dict(good, outputs=[("0.weight", 1), ("0.bias", 0)])
    with pytest.raises(GraphError, match=r"output '0\.weight' is given axis 1, but the weight of Linear '0' holds "
                                         r"its outputs along axis 0.*use \('0\.weight', 0\)"):
        MergeGraph.from_spec(model, {"h": swapped_out})
    with pytest.raises(GraphError, match=r"input '2\.weight' is given axis 0.*use \('2\.weight', 1\)"):
        MergeGraph.from_spec(model, {"h": dict(good, inputs=[("2.weight", 0)])})
    conv_t = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.ConvTranspose2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 1, 1))
    assert MergeGraph.from_spec(conv_t, {"h": dict(capture=["1"], outputs=[("0.weight", 0)],
                                                   inputs=[("2.weight", 0)])}).names == ["h"]  # transposed: rows in
    with pytest.raises(GraphError, match=r"ConvTranspose2d '2' holds its outputs along axis 1"):
        MergeGraph.from_spec(conv_t, {"h": dict(capture=["1"], outputs=[("0.weight", 0)], inputs=[("2.weight", 1)])})


# ------------------------------------------------------------------ models and arguments


def test_models_of_different_classes_with_equal_keys_are_refused() -> None:
    relu = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    tanh = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    assert relu.state_dict().keys() == tanh.state_dict().keys()
    with pytest.raises(ValueError, match=r"different architectures: module '1' is a ReLU .* in model 0 but a Tanh"):
        check_same_architecture([relu, tanh])

    def build(activation: str) -> nn.Module:
        class Net(nn.Module):  # the same class defined again (a re-run notebook cell): accepted
            def __init__(self) -> None:
                super().__init__()
                self.fc = nn.Linear(8, 4)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.fc(x)

        return Net()

    check_same_architecture([build("a"), build("b")])

    class ReluNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(F.relu(self.fc1(x)))

    class TanhNet(ReluNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.tanh(self.fc1(x)))

    with pytest.raises(ValueError, match=r"the model is a ReluNet .* in model 0 but a TanhNet"):
        check_same_architecture([ReluNet(), TanhNet()])


@pytest.mark.parametrize("value", [True, False, 1.5, 2.0, "2", 0, -1, [2]])
def test_max_batches_must_be_none_or_a_positive_integer(value) -> None:
    with pytest.raises(ValueError, match=rf"^max_batches must be None \(use all batches\) or an integer >= 1, "
                                         rf"got .*\({type(value).__name__}\); pass e\.g\. max_batches=2$"):
        check_max_batches(value)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="max_batches must be None"):
        collect_statistics([model, model], [torch.randn(8, 4)] * 3, ["1"], max_batches=value, progress=False)


def test_max_batches_takes_integers_and_counts_them() -> None:
    assert check_max_batches(None) is None and check_max_batches(3) == 3 and check_max_batches(np.int64(2)) == 2
    with pytest.raises(ValueError, match="max_samples must be None"):
        check_max_batches(True, "max_samples")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    stats = collect_statistics([model, model], [torch.randn(8, 4)] * 3, ["1"], max_batches=np.int64(2),
                               progress=False, warn=False)
    assert stats["1"].count == 16


def test_a_compiled_model_asks_for_orig_mod() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    compiled = torch.compile(model)  # not compiled until called: cheap
    with pytest.raises(TypeError, match=r"compiled by torch\.compile.*model\._orig_mod"):
        merge_graph(compiled)  # fx blamed data-dependent control flow
    with pytest.raises(TypeError, match=r"model 1 is compiled by torch\.compile.*model\._orig_mod"):
        check_same_architecture([model, compiled])


# ------------------------------------------------------------------ data that does not fit the model


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_a_batch_that_does_not_fit_the_model_names_its_shape_or_dtype() -> None:
    with pytest.raises(GraphError, match=r"cannot run on the example batch of shape \(2, 3, 8, 8\) "
                                         r"\(torch\.float32\): RuntimeError: .*expected input\[2, 3, 8, 8\] to have "
                                         r"1 channels.*does not fit the model"):
        merge_graph(_cnn(), torch.randn(2, 3, 8, 8))
    pixels = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(GraphError, match=r"inputs are torch\.uint8 but the model computes in torch\.float32: "
                                         r"convert them to floating point.*x\.float\(\) / 255"):
        merge_graph(_cnn(), pixels)


def test_evaluate_names_integer_inputs_and_other_outputs() -> None:
    model, y = _cnn(), torch.randint(0, 10, (6,))
    pixels = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"inputs are torch\.uint8 but the model computes in torch\.float32.*"
                                        r"x\.float\(\) / 255"):
        cc.evaluate(model, [(pixels, y)])  # was "mat1 and mat2 must have the same dtype" deep in torch
    embedding = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(12, 10))  # integer inputs still work
    assert cc.evaluate(embedding, [(torch.randint(0, 20, (6, 3)), y)])["n"] == 6

    class Pair(nn.Module):
        def __init__(self, inner: nn.Module, as_dict: bool) -> None:
            super().__init__()
            self.inner, self.as_dict = inner, as_dict

        def forward(self, x: torch.Tensor):
            logits = self.inner(x)
            return {"logits": logits, "features": x} if self.as_dict else (logits, x)

    x = torch.randn(6, 1, 8, 8)
    with pytest.raises(TypeError, match=r"evaluate needs a model whose forward returns a tensor of logits.*"
                                        r"Pair returned a tuple of 2 items.*\[0\]"):
        cc.evaluate(Pair(model, False), [(x, y)])
    with pytest.raises(TypeError, match=r"returned a dict with keys \['logits', 'features'\].*\['logits'\]"):
        cc.evaluate(Pair(model, True), [(x, y)])


def test_targets_in_one_column_are_read_as_a_vector() -> None:
    model, x, y = _cnn(), torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    assert cc.evaluate(model, [(x, y[:, None])]) == cc.evaluate(model, [(x, y)])  # was "multi-target not supported"
    with pytest.raises(ValueError, match=r"targets must be a vector of 6 class indices.*shape \(6, 2\)"):
        cc.evaluate(model, [(x, torch.stack([y, y], 1))])
    with pytest.raises(ValueError, match=r"one column: y\.squeeze\(1\)"):
        check_class_targets(y[:, None], model(x))


# ------------------------------------------------------------------ statistics without information


def test_all_constant_statistics_warn_that_they_carry_no_information() -> None:
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)) for _ in range(2)]
    blank = [torch.zeros(32, 1, 8, 8)] * 3
    with pytest.warns(RuntimeWarning, match=r"every channel of every model is constant on the data in every space "
                                            r"\(1\): the statistics carry no information.*Pass inputs that vary"):
        stats = collect_statistics(models, blank, ["2"], progress=False)
    assert stats["2"].constant()
    with pytest.warns(RuntimeWarning, match="constant on the merge data"):
        assert warn_if_constant(stats, "the merge data") == ["2"]
    real = collect_statistics(models, [torch.randn(32, 1, 8, 8)] * 3, ["2"], progress=False, warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_constant(real) == [] and not real["2"].constant()


# --- curve cache keys -------------------------------------------------------------------------------------------


def _curve_pair() -> tuple[nn.Module, nn.Module, list]:
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval() for _ in range(2))
    data = [(torch.randn(16, 6, generator=torch.Generator().manual_seed(i)), torch.randint(0, 3, (16,)))
            for i in range(4)]
    return a, b, data


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_cached_curve_is_keyed_by_the_alignment_data(tmp_path) -> None:
    """Aligned on other data, B' differs: the second call used to return the first call's curve."""
    a, b, data = _curve_pair()
    other = [(x.flip(0) * 2 + 1, y) for x, y in data]
    first = cc.train_curve(a, b, data, epochs=1, align="cca", align_data=data, cache_dir=str(tmp_path),
                           progress=False)
    second = cc.train_curve(a, b, data, epochs=1, align="cca", align_data=other, cache_dir=str(tmp_path),
                            progress=False)
    fresh = cc.train_curve(a, b, data, epochs=1, align="cca", align_data=other, cache=False, progress=False)
    assert any(not torch.equal(first.end[k], second.end[k]) for k in first.end)
    for k in fresh.end:
        assert torch.equal(second.end[k], fresh.end[k]) and torch.equal(second.control[k], fresh.control[k])
    again = cc.train_curve(a, b, data, epochs=1, align="cca", align_data=data, cache_dir=str(tmp_path),
                           progress=False)
    assert all(torch.equal(again.control[k], first.control[k]) for k in first.control)


def test_data_keys_name_the_sampler_and_the_transform() -> None:
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    from ccatoolkit.zoo.cache import UnkeyableDataError, describe_data

    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    dataset = TensorDataset(x, y)
    plain = describe_data(DataLoader(dataset, batch_size=5))
    assert describe_data(DataLoader(dataset, batch_size=5)) == plain
    assert describe_data(DataLoader(dataset, batch_size=5, sampler=SubsetRandomSampler(range(10)))) != plain
    assert describe_data(DataLoader(dataset, batch_size=5, shuffle=True)) != plain
    assert describe_data(DataLoader(dataset, batch_size=5, drop_last=True)) != plain

    class Transformed(TensorDataset):
        def __init__(self, transform: object) -> None:
            super().__init__(x, y)
            self.transform = transform

    class Scale:
        def __init__(self, factor: float) -> None:
            self.factor = factor

        def __repr__(self) -> str:
            return f"Scale(factor={self.factor})"

    assert describe_data(DataLoader(Transformed(Scale(2.0)), batch_size=5)) != describe_data(
        DataLoader(Transformed(Scale(3.0)), batch_size=5))
    with pytest.raises(UnkeyableDataError, match="transform .* cannot be part of a cache key"):
        describe_data(DataLoader(Transformed(lambda t: t * 2), batch_size=5))
    a, b, _ = _curve_pair()
    with pytest.warns(RuntimeWarning, match="does not cache this curve"):
        cc.train_curve(a, b, DataLoader(Transformed(lambda t: t), batch_size=5), epochs=1, progress=False)


@pytest.mark.parametrize("hook", ["pre", "forward"])
def test_batched_paths_run_the_models_own_hooks(hook: str) -> None:
    """An input normalisation (pre-hook) or a logit scaling (forward hook) on an nn.Sequential: batched
    interpolate and loss_plane used to skip them (alpha = 0 gave loss 1.248 where evaluate gave 1.832)."""
    torch.manual_seed(0)
    models = []
    for _ in range(3):
        model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        if hook == "pre":
            model.register_forward_pre_hook(lambda module, args: (args[0] * 3 + 1,))
        else:
            model.register_forward_hook(lambda module, args, out: out * 5)
        models.append(model)
    data = [(torch.randn(16, 6, generator=torch.Generator().manual_seed(i)), torch.randint(0, 3, (16,)))
            for i in range(3)]
    expected = [cc.evaluate(m, data)["loss"] for m in models[:2]]
    curve = cc.interpolate(models[0], models[1], data, alphas=2, progress=False)
    np.testing.assert_allclose(curve.loss, expected, rtol=1e-5)
    plane = cc.loss_plane(*models, data, resolution=3, progress=False)
    one_by_one = cc.interpolate(models[0], models[1], data, alphas=2, batched=False, progress=False)
    np.testing.assert_allclose(one_by_one.loss, expected, rtol=1e-5)
    assert np.isfinite(plane.loss).all()


def test_a_last_batch_of_one_sample_is_left_out_with_a_warning_not_an_error() -> None:
    """A DataLoader with a 1-sample last batch made every merge of a BatchNorm1d model fail."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval() for _ in range(2)]
    loader = DataLoader(TensorDataset(torch.randn(33, 6), torch.randint(0, 3, (33,))), batch_size=8)  # 8+8+8+8+1
    with pytest.warns(RuntimeWarning, match=r"left out 1 batch\(es\) of one sample.*drop_last=True"):
        reset = cc.reset_bn_stats(models[0], loader, progress=False)
    full = torch.cat([x for x, _ in loader][:4])
    with torch.no_grad():  # the four full batches' mean, the single sample left out
        torch.testing.assert_close(reset[1].running_mean, models[0][0](full).mean(0))
    for method in ("average", "permute", "cca"):
        with pytest.warns(RuntimeWarning, match="of one sample"):
            merged = cc.merge(models, method, loader, progress=False)
        assert torch.isfinite(merged(full)).all()
    curve = cc.interpolate(*models, loader, alphas=3, reset_bn=True, bn_data=loader, progress=False)
    assert np.isfinite(curve.loss).all()


def test_paths_read_one_column_targets_and_name_a_tuple_output() -> None:
    """interpolate used to fail with "repeat dims..." on (N, 1) targets and KeyError: 0 on a tuple output."""
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval() for _ in range(2))
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    column = cc.interpolate(a, b, [(x, y[:, None])], alphas=3, progress=False)
    vector = cc.interpolate(a, b, [(x, y)], alphas=3, progress=False)
    np.testing.assert_allclose(column.loss, vector.loss)
    np.testing.assert_allclose(column.accuracy, vector.accuracy)

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(6, 3)

        def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.body(inputs), inputs

    for batched in (True, False):
        with pytest.raises(TypeError, match="tuple of 2 items"):
            cc.interpolate(Pair(), Pair(), [(x, y)], alphas=2, batched=batched, progress=False)


def test_a_merge_names_a_tuple_output_where_it_reads_the_outputs() -> None:
    """cca's label-free ridge compares outputs: it failed with "expected Tensor ... got tuple"."""

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.relu, self.fc2 = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fc2(self.relu(self.fc1(x))), x  # logits and the inputs (no hidden space leaves)

    torch.manual_seed(0)
    models = [Pair().eval() for _ in range(2)]
    data = [torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with pytest.raises(TypeError, match="tuple of 2 items"):
        cc.merge(models, "cca", data, progress=False)
    assert cc.merge(models, "cca", data, ridge=0.1, progress=False) is not None  # no output read: it merges


def test_loss_plane_warns_for_a_degraded_cca_aligned_endpoint() -> None:
    """Issue 28: a plane through an unrepaired CCA-aligned B' of a BatchNorm CNN names B' against B; a plane
    through a permuted B (exact) says nothing, and B' made without a source (a copy) cannot be compared."""
    import copy
    import pickle
    import warnings

    from toybox import ConvBN, digit_batches, fit

    import ccatoolkit as cc

    train, test = digit_batches(128)
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(fit(ConvBN(width=6), train, epochs=2, seed=seed))
    a, b = nets
    b_cca = cc.align_to(a, b, "cca", data=train, repair=False, progress=False)
    assert b_cca.aligned_from.method == "cca" and b_cca.aligned_from.source is b
    with pytest.warns(RuntimeWarning, match=r"loss_plane \(B\): the cca-aligned endpoint B' reaches") as caught:
        plane = cc.loss_plane(a, b_cca, b, test, resolution=2, progress=False)
    message = str([w.message for w in caught if "loss_plane" in str(w.message)][0])
    b_accuracy = cc.evaluate(b, test)["accuracy"]
    assert f"{plane.model_accuracy[1]:.1%}" in message and f"{b_accuracy:.1%}" in message
    assert plane.model_accuracy[1] < b_accuracy - 0.02
    b_perm = cc.align_to(a, b, "permute", data=train, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cc.loss_plane(a, b_perm, b, test, resolution=2, progress=False)  # exact: no warning
    assert copy.deepcopy(b_cca).aligned_from.source is None  # copies keep the method only
    assert pickle.loads(pickle.dumps(b_cca.aligned_from)).method == "cca"
