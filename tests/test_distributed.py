"""Statistics are sums: two gloo ranks that each see half the data get the statistics of all of it."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ccatoolkit.zoo.models import ResNet20
from ccatoolkit.analysis.stats import JointStats, collect_statistics

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"),
]

LAYERS = {"stream": ["stem.relu", "layer1.0.relu2"], "inner": ["layer2.1.relu1"], "head": ["head"]}


def _setup() -> tuple[list[torch.nn.Module], list[torch.Tensor]]:
    torch.manual_seed(0)
    models = [ResNet20(width=1, in_shape=(1, 8, 8)) for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 1, 8, 8, generator=g) for _ in range(4)]
    return models, batches


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        models, batches = _setup()
        stats = collect_statistics(models, batches[rank::world], LAYERS, progress=False, warn=False)
        torch.save({k: (s.count, s.sum, s.gram, s.sizes) for k, s in stats.items()}, Path(out_dir) / f"rank{rank}.pt")
        cross = collect_statistics(models, batches[rank::world], LAYERS, progress=False, warn=False, reference=1)
        torch.save({k: (s.cov(1, 0), s.var(0)) for k, s in cross.items()}, Path(out_dir) / f"cross{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    models, batches = _setup()
    assert not (dist.is_initialized())
    reference = collect_statistics(models, batches, LAYERS, progress=False, warn=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, ref in reference.items():
        for result in ranks:
            count, total, gram, sizes = result[name]
            assert count == ref.count and sizes == ref.sizes
            torch.testing.assert_close(total, ref.sum, rtol=1e-6, atol=1e-6 * ref.sum.abs().max().item())
            torch.testing.assert_close(gram, ref.gram, rtol=1e-6, atol=1e-6 * ref.gram.abs().max().item())
            stats = JointStats(count, total, gram, sizes)
            scale = ref.joint_cov().abs().max().item()
            torch.testing.assert_close(stats.joint_cov(), ref.joint_cov(), rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(ranks[0][name][2], ranks[1][name][2], rtol=0, atol=0)  # identical on all ranks
        for r in range(2):  # cross-only statistics are all-reduced too
            cov, var = torch.load(tmp_path / f"cross{r}.pt")[name]
            scale = ref.joint_cov().abs().max().item()
            torch.testing.assert_close(cov, ref.cov(1, 0), rtol=1e-5, atol=1e-6 * scale)
            torch.testing.assert_close(var, ref.var(0), rtol=1e-5, atol=1e-6 * scale)


# --- a whole merge under torchrun ---------------------------------------------------------------------------


def _merge_cases() -> dict[str, dict]:
    """Merges that read data in every way a merge does: statistics, the label-free ridge choice (held-out
    agreement), BatchNorm folded and set to REPAIR's targets, a plain BatchNorm reset, REPAIR on plain layers
    with CCA's channel moments, and the ridge chosen by validation accuracy. 16 batches: each of two ranks
    gets 8, so both hold out the batches one process holds out."""
    from toybox import ConvBN, digit_batches, digit_mlps, fit

    train, test = digit_batches(88)
    assert len(train) == 16
    convbn = []
    for seed in (0, 1):
        torch.manual_seed(seed)  # (fit reseeds: without this both nets would start alike)
        convbn.append(fit(ConvBN(width=6), train, epochs=2, seed=seed))
    mlps = list(digit_mlps(train, seeds=(0, 1, 2), width=16))
    val = [test[i % len(test)] for i in range(4)]
    families = {"convbn": [m.state_dict() for m in convbn], "mlp": [m.state_dict() for m in mlps]}
    cases = {
        "convbn_cca_auto": ("convbn", "cca", {}),
        "convbn_permute": ("convbn", "permute", {}),
        "mlp3_cca_auto": ("mlp", "cca", {}),
        "mlp3_cca_validation": ("mlp", "cca", {"val_data": val}),
    }
    return {name: {"family": family, "states": families[family], "method": method, "data": train, "options": options}
            for name, (family, method, options) in cases.items()}


@pytest.mark.slow
def test_merge_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    import subprocess

    import ccatoolkit as cc

    cases = _merge_cases()
    torch.save(cases, tmp_path / "cases.pt")
    worker = Path(__file__).with_name("distributed_merge_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
         str(tmp_path / "cases.pt"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"merged-rank{r}.pt", weights_only=False) for r in range(2)]
    for name, case in cases.items():
        from distributed_merge_worker import build

        one = cc.merge(build(case["family"], case["states"]), case["method"], case["data"], progress=False,
                       **case["options"])
        assert "identical_models" not in one.merge_info, name
        for rank, results in enumerate(ranks):
            got = results[name]
            assert got["ridge"] == one.merge_info["ridge"], (name, rank, got["scores"], one.merge_info["ridge_scores"])
            for key, value in one.state_dict().items():
                if torch.is_floating_point(value):
                    scale = max(value.abs().max().item(), 1e-3)
                    torch.testing.assert_close(got["state"][key], value, rtol=1e-4, atol=1e-4 * scale,
                                               msg=lambda m, k=key: f"{name} rank {rank} {k}: {m}")
                else:
                    assert torch.equal(got["state"][key], value), (name, rank, key)
        for key, value in ranks[0][name]["state"].items():  # every rank returns the same model
            assert torch.equal(ranks[1][name]["state"][key], value), (name, key)
