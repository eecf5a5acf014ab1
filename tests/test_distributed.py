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
