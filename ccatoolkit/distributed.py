"""One merge over several processes (``torchrun``): each rank reads its own shard of the data.

Everything a merge learns from data is a sum over samples or batches: activation statistics, BatchNorm's
cumulative averages, REPAIR's channel moments, the ridge candidates' held-out scores. Under an initialised
``torch.distributed`` process group those sums are all-reduced where they are made, so every rank computes
the same transforms and returns the same merged model, equal (to float rounding) to one process given the
union of the shards. Without a process group every function here is the identity and costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["active", "rank", "all_reduce_sum", "sum_over_ranks", "broadcast"]


def active() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is running."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group): only rank 0 shows progress bars."""
    return torch.distributed.get_rank() if active() else 0


def _scalar_device() -> torch.device:
    """Where a collective on plain numbers runs: NCCL needs a CUDA tensor, gloo a CPU one."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise sums of ``tensors`` over all ranks (new tensors, each in its own dtype and device).

    The tensors travel packed in one float64 buffer on the first one's device: one collective, and sums of
    float32 values are not rounded to float32 on the way.
    """
    if not active() or not tensors:
        return list(tensors)
    device = tensors[0].device
    packed = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors])
    torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
    out, start = [], 0
    for t in tensors:
        out.append(packed[start:start + t.numel()].reshape(t.shape).to(t.dtype))
        start += t.numel()
    return out


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Plain numbers summed over all ranks (counts, scores)."""
    if not active():
        return [float(v) for v in values]
    buffer = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_scalar_device())
    torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
    return buffer.tolist()


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``tensor`` on every rank (a new tensor; ``tensor`` itself on a single process)."""
    if not active():
        return tensor
    out = tensor.detach().clone().contiguous()
    torch.distributed.broadcast(out, src=src)
    return out
