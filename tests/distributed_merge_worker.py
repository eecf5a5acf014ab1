"""One rank of ``test_distributed.py``'s merges under ``torchrun`` (gloo, CPU).

Reads the models and batches the test saved, takes this rank's contiguous shard of every data list, runs
each case's ``cc.merge`` and saves the merged weights and ``merge_info`` for the test to compare with one
process given all the data.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_merge_worker.py CASES OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package
sys.path.insert(0, str(Path(__file__).resolve().parent))  # toybox

import ccatoolkit as cc  # noqa: E402


def shard(batches: list, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous part of ``batches`` (what a DistributedSampler without shuffling gives,
    up to the order of samples)."""
    per = len(batches) // world
    return batches[rank * per : (rank + 1) * per]


def build(family: str, states: list[dict]) -> list[torch.nn.Module]:
    """The models of a case from their saved weights (trained models carry hooks that do not pickle)."""
    from toybox import ConvBN

    from ccatoolkit.zoo.models import MLP

    make = {"convbn": lambda: ConvBN(width=6), "mlp": lambda: MLP(depth=2, width=16, in_shape=(1, 8, 8))}[family]
    models = []
    for state in states:
        model = make()
        model.load_state_dict(state)
        models.append(model.eval())
    return models


def run_cases(cases: dict, rank: int, world: int) -> dict[str, dict]:
    """Every case merged on this rank's shards: ``{name: {"state": ..., "ridge": ..., "scores": ...}}``."""
    results = {}
    for name, case in cases.items():
        options = dict(case["options"])
        if "val_data" in options:
            options["val_data"] = shard(options["val_data"], rank, world)
        models = build(case["family"], case["states"])
        merged = cc.merge(models, case["method"], shard(case["data"], rank, world), progress=False, **options)
        results[name] = {"state": merged.state_dict(), "ridge": merged.merge_info["ridge"],
                         "scores": merged.merge_info["ridge_scores"]}
    return results


def main() -> None:
    cases_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        results = run_cases(torch.load(cases_path, weights_only=False), rank, world)
        torch.save(results, out_dir / f"merged-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
