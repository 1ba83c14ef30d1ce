"""AutoDecay as a PyTorch LR scheduler: ``sched.step(loss)`` after every ``optimizer.step()``."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LRScheduler

from .detector import Decision, FollowsDetector, StageDetector


def check_decay_rate(decay_rate: Any) -> float:
    if isinstance(decay_rate, bool) or not isinstance(decay_rate, (int, float)) or not 0 < decay_rate < 1:
        raise ValueError(f"decay_rate must be in (0, 1), got {decay_rate!r}")
    return float(decay_rate)


class LossAccumulator:
    """Sums per-update losses where they live (on the accelerator) and reads them back only when
    the detector wants a value, averaged over all ranks when ``torch.distributed`` is running.

    Non-finite losses are left out of the sum and counted, so one bad batch cannot poison a bucket.
    """

    def __init__(self) -> None:
        self._totals: Optional[torch.Tensor] = None  # [sum of finite losses, finite count, count]
        self._restored = (0.0, 0.0, 0.0)  # host-side totals from a checkpoint, added on the next loss
        self.updates = 0

    def add(self, loss: Union[float, torch.Tensor]) -> None:
        loss = torch.as_tensor(loss).detach()
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar (0-dim tensor or float), got shape {tuple(loss.shape)}")
        loss = loss.reshape(()).to(torch.float64 if loss.device.type == "cpu" else torch.float32)
        finite = torch.isfinite(loss)
        contribution = torch.stack(
            [torch.where(finite, loss, torch.zeros_like(loss)), finite.to(loss.dtype), torch.ones_like(loss)]
        )
        if self._totals is None:
            self._totals = contribution
            if any(self._restored):
                self._totals = contribution + torch.tensor(self._restored, dtype=loss.dtype).to(loss.device)
                self._restored = (0.0, 0.0, 0.0)
        else:
            self._totals += contribution
        self.updates += 1

    def read(self) -> Tuple[float, int]:
        """Mean finite loss since the last read over all ranks (NaN if there was none), and how
        many non-finite losses (all ranks together) were left out."""
        totals = self._totals
        if dist.is_available() and dist.is_initialized():
            totals = totals.clone()
            dist.all_reduce(totals)
        loss_sum, finite, count = totals.tolist()
        self._totals, self.updates = None, 0
        return (loss_sum / finite if finite > 0 else float("nan")), int(round(count - finite))

    def state_dict(self) -> Dict[str, float]:
        """This rank's unread totals, without any collective: a checkpoint may be written by one
        rank only."""
        loss_sum, finite, count = self._totals.tolist() if self._totals is not None else self._restored
        return {"sum": loss_sum, "finite": finite, "count": count, "updates": self.updates}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        """Checkpoints are usually written by rank 0 alone and read by every rank: only rank 0 takes
        the saved losses back, so the next mean over ranks counts them once (exact in one process)."""
        self._totals = None
        self._restored = (0.0, 0.0, 0.0)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            self._restored = (float(state["sum"]), float(state["finite"]), float(state["count"]))
        self.updates = int(state["updates"])


class AutoDecayLR(FollowsDetector, LRScheduler):
    """Multiplies every param group's learning rate by ``decay_rate`` when the training loss
    stops decreasing, at most ``num_stages - 1`` times; ``finished`` turns true at the last plateau.

    Pass the run's shape (``updates_per_epoch``, ``total_updates``) and nothing else: the
    detector's settings (``window``, ``patience``, ...) default from it. Call ``step(loss)`` once per
    optimizer update with the (0-dim tensor or float) training loss; the loss is accumulated on its
    device and read back only every few dozen updates.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        decay_rate: float = 0.1,
        num_stages: int = 3,
        updates_per_epoch: Optional[int] = None,
        total_updates: Optional[int] = None,
        warmup_updates: int = 0,
        **detector_settings: Any,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        for i, group in enumerate(optimizer.param_groups):
            if "lr" not in group:
                raise ValueError(f"optimizer param_groups[{i}] has no 'lr'; AutoDecay scales learning rates")
        self.decay_rate = check_decay_rate(decay_rate)
        self.detector = StageDetector(
            num_stages=num_stages,
            total_updates=total_updates,
            updates_per_epoch=updates_per_epoch,
            warmup_updates=warmup_updates,
            **detector_settings,
        )
        self.accumulator = LossAccumulator()
        self.last_decision: Optional[Decision] = None
        super().__init__(optimizer)

    # -- LRScheduler interface ---------------------------------------------------------------
    def get_lr(self) -> List[float]:
        factor = self.decay_rate ** self.detector.stage
        return [base_lr * factor for base_lr in self.base_lrs]

    def step(self, loss: Union[float, torch.Tensor, None] = None) -> None:  # type: ignore[override]
        """Record one optimizer update's training loss; decay when a stage has ended.

        ``LRScheduler.__init__`` calls ``step()`` once without a loss: that sets the initial LRs.
        """
        if loss is None:
            if self.last_epoch >= 0:
                raise TypeError("AutoDecayLR.step needs the training loss: sched.step(loss)")
            super().step()
            return
        self._step_count += 1
        self.last_epoch += 1
        if self.detector.finished:
            return
        self.accumulator.add(loss)
        if self.accumulator.updates < self.detector.next_observation_in:
            return
        count = self.accumulator.updates
        mean, nonfinite = self.accumulator.read()
        decision = self.detector.observe(mean, count, nonfinite)
        self.last_decision = decision
        if decision.action == "decay":
            self._apply_lr()

    def _apply_lr(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Detector state plus LR bookkeeping and the losses accumulated since the detector's last
        observation (read back once per checkpoint), so a resumed run decides as an unbroken one."""
        return {
            "decay_rate": self.decay_rate,
            "base_lrs": list(self.base_lrs),
            "last_epoch": self.last_epoch,
            "detector": self.detector.state_dict(),
            "pending_losses": self.accumulator.state_dict(),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict["decay_rate"] != self.decay_rate:
            raise ValueError(
                f"decay_rate {self.decay_rate} differs from the checkpoint's {state_dict['decay_rate']}"
            )
        self.detector.load_state_dict(state_dict["detector"])
        self.base_lrs = list(state_dict["base_lrs"])
        self.last_epoch = state_dict["last_epoch"]
        self.accumulator.load_state_dict(state_dict["pending_losses"])
        self._apply_lr()
