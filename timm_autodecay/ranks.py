"""One value for every rank: the mean over ranks that each face hands the detector for an evaluation, so that
every rank judges the same number at the same update."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

__all__ = ["collective_device", "mean_over_ranks"]


def mean_over_ranks(value: Union[float, torch.Tensor, None],
                    device: Optional[torch.device] = None) -> Optional[float]:
    """The mean of the ranks' values, the same float on every rank; ranks whose value is None are left out
    (None when no rank has one). Without ``torch.distributed``, the value itself. One collective on every
    rank, on ``device`` (default: the current GPU under NCCL, else the CPU)."""
    if value is not None:
        value = float(value)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return value
    device = device or collective_device()
    present = value is not None
    pair = torch.tensor([value if present else 0.0, float(present)], dtype=torch.float64, device=device)
    dist.all_reduce(pair)
    total, count = pair.tolist()
    return total / count if count else None


def collective_device() -> torch.device:
    """Where a collective of host numbers runs: the current GPU under NCCL (it reduces no CPU tensor), else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
