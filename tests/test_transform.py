"""Weight transforms: permuted / rescaled copies keep the function; general transforms on linear nets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ccatoolkit.merging.graph.spec import ParamRef
from ccatoolkit.merging.graph.trace import merge_graph
from toybox import SmallRes, user_cnn

from ccatoolkit.zoo.models import MLP, VGG11, ResNet20
from ccatoolkit.analysis.linalg import as_dense
from ccatoolkit.merging.align.permutation import permutation_matrix
from ccatoolkit.merging.transform import (
    apply_permutations,
    apply_transforms,
    permutation_transforms,
    random_permutations,
    random_scalings,
)
from ccatoolkit._utils import check_same_architecture, model_signature_mismatch


class MixedOps(nn.Module):
    """ConvTranspose, view(N, -1) of a 8x8 map (block 64), a spatial mean feeding a second head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.r1 = nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()
        self.c2, self.r2 = nn.ConvTranspose2d(3, 4, 2, stride=2), nn.ReLU()
        self.c3, self.r3 = nn.Conv2d(4, 5, 1), nn.ReLU()
        self.fc, self.r4, self.fc2, self.fc3 = nn.Linear(5 * 64, 6), nn.ReLU(), nn.Linear(6, 2), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.r3(self.c3(self.r2(self.c2(self.r1(self.c1(x))))))
        h = self.r4(self.fc(y.view(y.size(0), -1)))
        return self.fc2(h) + self.fc3(y.mean((2, 3)))


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that the tests see them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model.eval()


CASES = {
    "mlp": (lambda: MLP(depth=3, width=16, in_shape=(1, 6, 6)), (4, 1, 6, 6), None),
    "mlp-bn": (lambda: MLP(depth=2, width=16, in_shape=(1, 6, 6), batchnorm=True), (4, 1, 6, 6), None),
    "vgg11": (lambda: VGG11(width=0.125, in_shape=(1, 16, 16)), (3, 1, 16, 16), None),
    "resnet20": (lambda: ResNet20(in_shape=(1, 12, 12)), (3, 1, 12, 12), None),
    "user-cnn": (user_cnn, (4, 1, 8, 8), (2, 1, 8, 8)),
    "user-res": (SmallRes, (4, 1, 6, 6), None),
    "mixed-ops": (MixedOps, (3, 2, 4, 4), (1, 2, 4, 4)),
}


def _setup(case: str) -> tuple[nn.Module, torch.Tensor, object]:
    build, shape, example = CASES[case]
    gen = torch.Generator().manual_seed(1)
    model = _randomize_bn(build(), gen)
    x = torch.randn(*shape, generator=gen)
    graph = merge_graph(model, example_input=None if example is None else torch.zeros(example))
    return model, x, graph


@pytest.mark.parametrize("case", list(CASES))
def test_permuted_and_rescaled_copies_keep_the_function(case: str) -> None:
    model, x, graph = _setup(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        y = model(x)
        perms = random_permutations(graph, gen)
        permuted = apply_permutations(model, graph, perms)
        torch.testing.assert_close(permuted(x), y, atol=1e-5, rtol=1e-5)
        # the permutation really moved the weights
        assert any(not torch.equal(permuted.state_dict()[k], v) for k, v in before.items())
        scaled = apply_transforms(permuted, graph, random_scalings(graph, gen, 0.5, 2.0))
        torch.testing.assert_close(scaled(x), y, atol=2e-5, rtol=2e-5)
        first = graph.spaces[0].outputs[0].name
        assert not torch.allclose(scaled.state_dict()[first].abs(), permuted.state_dict()[first].abs())
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("case", ["mlp-bn", "user-cnn", "resnet20"])
def test_permutation_by_matrices_equals_indexing(case: str) -> None:
    model, _, graph = _setup(case)
    perms = random_permutations(graph, torch.Generator().manual_seed(3))
    a = apply_permutations(model, graph, perms).state_dict()
    b = apply_transforms(model, graph, permutation_transforms(perms)).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_rows_and_columns_moved_in_one_gather_equal_two_steps(case: str, monkeypatch) -> None:
    """A weight between two permuted spaces is gathered once (no second copy); the values are the same."""
    import ccatoolkit.merging.transform as transform_module

    model, _, graph = _setup(case)
    gen = torch.Generator().manual_seed(4)
    perms = random_permutations(graph, gen)
    scales = random_scalings(graph, gen, 0.5, 2.0)
    scaled_perms = {name: (torch.as_tensor(scales[name][0]) @ P, Pinv @ torch.as_tensor(scales[name][1]))
                    for name, (P, Pinv) in permutation_transforms(perms).items()}
    gathered = []
    original = transform_module._permuted_both_axes

    def recording(tensor, steps):
        out = original(tensor, steps)
        gathered.append(out is not None)
        return out

    monkeypatch.setattr(transform_module, "_permuted_both_axes", recording)
    fused = transform_module.transformed_state(model, graph, scaled_perms)
    monkeypatch.setattr(transform_module, "_permuted_both_axes", lambda tensor, steps: None)
    stepwise = transform_module.transformed_state(model, graph, scaled_perms)
    assert any(gathered)  # some weight sits between two spaces and took the one-gather path
    for k in fused:
        torch.testing.assert_close(fused[k], stepwise[k], atol=0, rtol=0)


def test_scaling_is_exact_when_running_var_is_near_eps() -> None:
    """running_var -> s^2 (running_var + eps) - eps keeps BatchNorm's output exactly (not just up to eps)."""
    gen = torch.Generator().manual_seed(6)
    model = _randomize_bn(MLP(depth=1, width=8, in_shape=(5,), batchnorm=True), gen)
    model.bn1.running_var.fill_(2e-5)
    graph = merge_graph(model)
    x = torch.randn(6, 5, generator=gen)
    scale = torch.linspace(0.6, 3.0, 8, dtype=torch.float64)
    new = apply_transforms(model, graph, {"relu1": (torch.diag(scale), torch.diag(1 / scale))})
    assert (new.bn1.running_var >= 0).all()
    torch.testing.assert_close(new.bn1.running_var.double(), scale**2 * (2e-5 + 1e-5) - 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=1e-5)
    # a variance that would go negative is clamped at 0
    tiny = apply_transforms(model, graph, {"relu1": (0.1 * torch.eye(8), 10 * torch.eye(8))})
    assert torch.equal(tiny.bn1.running_var, torch.zeros(8))


def test_permutation_matrix_convention() -> None:
    perm = torch.tensor([2, 0, 1])
    z = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    assert torch.equal(permutation_matrix(perm) @ z, z[perm])
    with pytest.raises(ValueError, match="not a permutation"):
        permutation_matrix([0, 0, 1])


def test_general_invertible_transforms_on_linear_networks() -> None:
    """Without nonlinearities any invertible out with inp = out^-1 keeps the function (incl. a Flatten block)."""
    gen = torch.Generator().manual_seed(4)
    models = [
        (nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 6), nn.Dropout(), nn.Linear(6, 3)),
         torch.randn(4, 5, generator=gen)),
        (nn.Sequential(nn.Conv2d(2, 3, 3), nn.AvgPool2d(1), nn.Flatten(), nn.Linear(3 * 16, 5), nn.Linear(5, 2)),
         torch.randn(4, 2, 6, 6, generator=gen)),
    ]
    for model, x in models:
        model.eval()
        graph = merge_graph(model, example_input=x)
        transforms = {}
        for s in graph:
            out = torch.randn(s.size, s.size, generator=gen, dtype=torch.float64) + 3 * torch.eye(s.size)
            transforms[s.name] = (out, torch.linalg.inv(out))
        new = apply_transforms(model, graph, transforms)
        with torch.no_grad():
            torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(new[0].weight, model[0].weight)
    # the block-16 flatten input really was transformed channel-major
    assert graph.spaces[0].inputs[0].block == 16


def test_features_become_out_times_z() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    graph = merge_graph(model)
    out = torch.randn(4, 4, dtype=torch.float64)
    new = apply_transforms(model, graph, {"1": (out, torch.eye(4))})
    x = torch.randn(5, 3)
    with torch.no_grad():
        torch.testing.assert_close(new[0](x).double(), model[0](x).double() @ out.T, atol=1e-5, rtol=1e-5)


def test_transform_errors_name_the_space() -> None:
    model = MLP(depth=2, width=4)
    graph = merge_graph(model)
    with pytest.raises(ValueError, match=r"space 'relu2' has shape \(3, 3\), expected \(4, 4\)"):
        apply_transforms(model, graph, {"relu2": (torch.eye(3), torch.eye(3))})
    with pytest.raises(KeyError, match="relu1, relu2"):
        apply_transforms(model, graph, {"fc9": (torch.eye(4), torch.eye(4))})
    with pytest.raises(ValueError, match="relu1"):
        apply_permutations(model, graph, {"relu1": torch.tensor([0, 1, 2])})


def test_dtype_kept_and_unlisted_spaces_unchanged() -> None:
    model = MLP(depth=2, width=4).to(torch.float32)
    graph = merge_graph(model)
    new = apply_transforms(model, graph, {"relu1": (2 * torch.eye(4), 0.5 * torch.eye(4))})
    assert new.fc1.weight.dtype == torch.float32
    torch.testing.assert_close(new.fc1.weight, 2 * model.fc1.weight)
    torch.testing.assert_close(new.fc2.weight, 0.5 * model.fc2.weight)
    assert torch.equal(new.head.weight, model.head.weight)
    assert new is not model and new.config == model.config


def test_mixed_ops_graph() -> None:
    _, _, graph = _setup("mixed-ops")
    assert [s.size for s in graph] == [3, 4, 5, 6]
    assert graph.space("r2").outputs[0] == ParamRef("c2.weight", 1)  # ConvTranspose: (in, out, kh, kw)
    assert graph.space("r1").inputs == [ParamRef("c2.weight", 0)]
    assert graph.space("r3").inputs == [ParamRef("fc.weight", 1, 64), ParamRef("fc3.weight", 1)]


def _user_cnn_and_graph() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = user_cnn()
    return model, merge_graph(model)


def _factored_map(n: int, gen: torch.Generator):
    """A well-conditioned ``diag(d) + L R^T`` of rank 2, in factors."""
    from ccatoolkit.analysis.linalg import DiagonalPlusLowRank

    d = 1.0 + torch.rand(n, dtype=torch.float64, generator=gen)
    return DiagonalPlusLowRank(d, *(0.3 * torch.randn(n, 2, dtype=torch.float64, generator=gen) for _ in range(2)))


def test_large_tensors_take_the_low_memory_products_with_the_same_result(monkeypatch) -> None:
    """Above ``_FLOAT64_ENTRIES`` a Flatten's or a conv's input side is mapped as a batch of products on a view,
    and a map in factors works in place on the tensor an earlier step made: the same tensors as the products
    on channel-major copies, with maps given dense or in factors."""
    import ccatoolkit.merging.transform as transform_module
    from ccatoolkit.analysis.linalg import DiagonalPlusLowRank
    from ccatoolkit.merging.transform import transformed_state

    model, graph, gen = *_user_cnn_and_graph(), torch.Generator().manual_seed(3)
    factored = {}
    for space in graph.spaces:
        out = _factored_map(space.size, gen)
        factored[space.name] = (out, torch.linalg.inv(out.dense()))
    dense = {name: (out.dense(), inp) for name, (out, inp) in factored.items()}
    reference = transformed_state(model, graph, dense)  # every tensor below 4M entries: float64 products
    monkeypatch.setattr(transform_module, "_FLOAT64_ENTRIES", 0)  # every tensor "large" now
    calls = {"batched": 0, "in_place": 0}
    matmul, in_place = torch.matmul, DiagonalPlusLowRank.multiply_in_place
    monkeypatch.setattr(DiagonalPlusLowRank, "multiply_in_place",
                        lambda self, x: calls.__setitem__("in_place", calls["in_place"] + 1) or in_place(self, x))
    monkeypatch.setattr(transform_module.torch, "matmul",
                        lambda a, b: calls.__setitem__("batched", calls["batched"] + (b.dim() == 3)) or matmul(a, b))
    for transforms in (dense, factored):
        state = transformed_state(model, graph, transforms)
        for name, value in reference.items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6)
    assert calls["batched"] >= 2 and calls["in_place"] >= 1  # the Flatten's and conv2's inputs; a weight's rows


@pytest.mark.parametrize("rows", ["permuted", "factors", "dense"])
def test_a_large_weight_is_added_into_the_merged_model_a_block_of_rows_at_a_time(monkeypatch, rows: str) -> None:
    """``add_transformed`` (what a merge's averaging calls) maps a large weight block by block where its rows
    move by a permutation or a map in factors, and whole where a dense map moves them: the same tensors as
    ``transformed_state``, copied in, then added."""
    import ccatoolkit.merging.transform as transform_module
    from ccatoolkit.merging.transform import add_transformed, transformed_state

    model, graph, gen = *_user_cnn_and_graph(), torch.Generator().manual_seed(4)
    transforms = {}
    for space in graph.spaces:
        n = space.size
        if rows == "permuted":
            out = permutation_matrix(torch.randperm(n, generator=gen)).to(torch.float64)
            out = out * (0.5 + torch.rand(n, 1, dtype=torch.float64, generator=gen))
        else:
            out = _factored_map(n, gen)
            out = out if rows == "factors" else out.dense()
        transforms[space.name] = (out, torch.linalg.inv(as_dense(out)))
    reference = transformed_state(model, graph, transforms)
    monkeypatch.setattr(transform_module, "_FLOAT64_ENTRIES", 0)  # every weight "large"
    monkeypatch.setattr(transform_module, "_BLOCK_ENTRIES", 200)  # blocks of a few rows
    blocked = []
    by_rows = transform_module._add_by_rows
    def spy(tensor, steps, target, first):  # a weight's (whether its rows move, whether it went by blocks)
        went = by_rows(tensor, steps, target, first)
        if tensor.dim() > 1:
            blocked.append((any(ref.axis == 0 for ref, *_ in steps), went))
        return went

    monkeypatch.setattr(transform_module, "_add_by_rows", spy)
    into = {name: torch.zeros_like(value) for name, value in reference.items()}
    changed = add_transformed(model, graph, transforms, into, first=True)
    add_transformed(model, graph, transforms, into, first=False)
    assert changed == {n for n, v in reference.items() if not torch.equal(v, model.state_dict()[n])} | changed
    for name in changed:
        torch.testing.assert_close(into[name], 2 * reference[name], rtol=1e-5, atol=1e-5)
    rows_moved_by_blocks = [went for moves_rows, went in blocked if moves_rows]
    assert rows_moved_by_blocks and all(rows_moved_by_blocks) == (rows != "dense")
    assert any(went for moves_rows, went in blocked if not moves_rows)  # the last layer: its columns alone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transforms_on_cuda() -> None:
    model, x, graph = _setup("resnet20")
    model, x = model.cuda(), x.cuda()
    gen = torch.Generator().manual_seed(5)
    new = apply_transforms(apply_permutations(model, graph, random_permutations(graph, gen)), graph,
                           random_scalings(graph, gen))
    assert next(new.parameters()).is_cuda
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), atol=1e-4, rtol=1e-4)
    assert merge_graph(model) == graph


def test_signature_mismatch() -> None:
    a, b, c = MLP(depth=2, width=4), MLP(depth=2, width=4), MLP(depth=2, width=5)
    assert model_signature_mismatch([a, b]) is None
    check_same_architecture([a, b])
    msg = model_signature_mismatch([a, b, c])
    assert msg is not None and "'fc1.weight'" in msg and "model 2" in msg and "(5, 784)" in msg
    with pytest.raises(ValueError, match="models of different architectures: .*fc1.weight"):
        check_same_architecture([a, c])
    with pytest.raises(ValueError, match="fc3"):
        check_same_architecture([a, MLP(depth=3, width=4)])
