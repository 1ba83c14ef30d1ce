"""Training losses between two observations of the detector: summed where they live, averaged over all ranks
only when the detector wants a value. Every face that hands the detector losses keeps them here.

Losses on an accelerator are summed there (no device sync per update); host numbers (timm's ``train.py``
passes floats) and CPU tensors are summed in Python. Non-finite losses are left out of the sum and counted,
so one bad batch cannot poison a bucket; a face that knows a non-finite loss means the weights themselves
are non-finite (no finite loss since the last one) marks it ``diverged``. The state holds this rank's unread
totals, JSON-able, without a collective (a checkpoint may be written by one rank).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from .ranks import collective_device

__all__ = ["LossAccumulator", "UnreadLosses", "check_loss"]


def check_loss(loss: Any, what: str = "loss") -> Union[float, torch.Tensor]:
    """A training loss (or another scalar, ``what``) as a float (host numbers, CPU tensors) or a one-element
    tensor on its device."""
    if isinstance(loss, torch.Tensor):
        if loss.device.type == "meta":
            raise ValueError(f"the {what} is a tensor on the 'meta' device, which holds no value: pass the "
                             f"{what} computed on real data")
        if loss.numel() != 1:
            raise ValueError(f"the {what} must be a scalar (0-dim tensor or float), got shape {tuple(loss.shape)}")
        if loss.dtype == torch.bool or loss.is_complex():
            raise TypeError(f"the {what} must be a real number, got a tensor of {loss.dtype}")
        loss = loss.detach().reshape(())
        return float(loss) if loss.device.type == "cpu" else loss
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise TypeError(f"the {what} must be a float or a 0-dim tensor, got {type(loss).__name__} {loss!r}")
    return float(loss)


class UnreadLosses(NamedTuple):
    mean: float  # of the finite losses, over all ranks (NaN if there was none)
    finite: int  # all ranks together
    nonfinite: int
    diverged: int  # non-finite losses a face marked as the weights' own


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class LossAccumulator:
    """This rank's losses since the last ``read``: [sum of finite losses, finite count, count, diverged]."""

    def __init__(self) -> None:
        self._device: Optional[torch.Tensor] = None  # the totals of losses on an accelerator
        self._host = [0.0, 0.0, 0.0, 0.0]  # the totals of host losses, and a checkpoint's restored totals
        self.updates = 0  # calls to add since the last read

    def add(self, loss: Any, diverged: bool = False) -> None:
        if not isinstance(loss, float):
            loss = check_loss(loss)
        if isinstance(loss, float):
            finite = math.isfinite(loss)
            self._host[0] += loss if finite else 0.0
            self._host[1] += finite
            self._host[2] += 1.0
            self._host[3] += bool(diverged)
        else:
            loss = loss.to(torch.float32)
            finite = torch.isfinite(loss)
            zero = torch.zeros_like(loss)
            contribution = torch.stack([torch.where(finite, loss, zero), finite.to(loss.dtype), zero + 1, zero])
            self._device = contribution if self._device is None else self._device + contribution
        self.updates += 1

    def _totals(self) -> List[float]:
        if self._device is None:
            return list(self._host)
        return [a + b for a, b in zip(self._device.tolist(), self._host)]

    def read(self) -> UnreadLosses:
        """The losses since the last read, over all ranks (one collective under ``torch.distributed``, on the
        accelerator the losses live on, else the backend's device). Starts over."""
        if _distributed():
            device = self._device.device if self._device is not None else collective_device()
            totals = torch.tensor(self._host, dtype=torch.float64, device=device)
            if self._device is not None:
                totals = totals + self._device.to(torch.float64)
            dist.all_reduce(totals)
            loss_sum, finite, count, diverged = totals.tolist()
        else:
            loss_sum, finite, count, diverged = self._totals()
        self._device, self._host, self.updates = None, [0.0, 0.0, 0.0, 0.0], 0
        finite, count = int(round(finite)), int(round(count))
        return UnreadLosses(loss_sum / finite if finite else float("nan"), finite, count - finite,
                            int(round(diverged)))

    def state_dict(self) -> Dict[str, float]:
        loss_sum, finite, count, diverged = self._totals()
        return {"sum": loss_sum, "finite": finite, "count": count, "updates": self.updates, "diverged": diverged}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        """States are written by rank 0 and read by every rank: only rank 0 takes the unread losses back, so
        the next mean over ranks counts them once (exact in one process). ``diverged`` is absent from states
        of releases before it."""
        self._device, self._host = None, [0.0, 0.0, 0.0, 0.0]
        if not _distributed() or dist.get_rank() == 0:
            self._host = [float(state["sum"]), float(state["finite"]), float(state["count"]),
                          float(state.get("diverged", 0))]
        self.updates = int(state["updates"])
