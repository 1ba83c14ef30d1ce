"""Where the scheduler meets timm's ``train.py`` loop: the loss it passes, and the stop.

``train.py`` passes ``losses_m.avg`` to ``step_update``: this rank's running mean of the training loss
over the epoch so far. :class:`RunningMeanDecoder` turns it back into per-update losses;
:class:`~timm_autodecay.losses.LossAccumulator` (every face's) sums them on the host and averages them over
all ranks when the detector wants a value; :class:`LossSignal` runs both and hands the detector what they
give. Their state is JSON-able, part of the scheduler's (:mod:`~timm_autodecay.timm_state`).
:func:`check_evaluation` reads the metric train.py passes to ``step(epoch, metric)``. :func:`arm_stop` ends
the loop gracefully once the run is over.

How train.py fills the mean (timm's ``train_one_epoch``)
------------------------------------------------------
* Every update adds its loss (the mean of its micro-batches, weighted by batch size) to the mean: in
  one process always, and on every rank since timm 1.0.12. With ``k`` updates into the epoch, the
  update's own loss is ``k * avg_k - (k - 1) * avg_(k-1)``, whatever its value (a loss equal to the
  mean so far leaves the mean unchanged and is still a loss).
* Under DDP, timm releases before 1.0.12 add the loss (already averaged over ranks) only every
  ``--log-interval`` updates and at the epoch's last batch: the mean changes only there, and each update
  in between stands for the latest logged loss. Under ``torch.distributed`` the decoder starts in this
  mode and switches to the first as soon as the mean changes at two consecutive updates before the
  epoch's last (a logged mean never does, unless it is logged at every update, which is the first mode).
* One non-finite loss makes the mean non-finite for the rest of the epoch. That update's loss is
  non-finite (counted as such); the later updates of the epoch carry no information at all: they are
  *missing*, neither losses nor non-finite ones. The next epoch's mean starts over. If its first
  loss is non-finite again, with no finite loss since, the weights themselves are non-finite: the run
  has *diverged*.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from .losses import LossAccumulator

LOSS, NONFINITE, MISSING, DIVERGED = "loss", "nonfinite", "missing", "diverged"
ADVICE = "Resume from a checkpoint before the losses turned non-finite, e.g. with a lower --lr or with --clip-grad"

_logger = logging.getLogger("timm_autodecay")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_primary() -> bool:
    return not distributed() or dist.get_rank() == 0


def json_number(value: float) -> Optional[float]:
    """JSON has no NaN: a non-finite mean is stored as null."""
    return value if math.isfinite(value) else None


def from_json_number(value: Optional[float]) -> float:
    return float("nan") if value is None else float(value)


class RunningMeanDecoder:
    """Per-update losses from train.py's running epoch mean (see the module docstring)."""

    def __init__(self, updates_per_epoch: int, every_update: Optional[bool] = None) -> None:
        self.updates_per_epoch = updates_per_epoch
        # True: every update adds its loss to the mean; None: not known yet (DDP), held means are no loss
        self.every_update = (True if not distributed() else None) if every_update is None else every_update
        self.running_mean = 0.0  # the mean train.py passed at the previous update
        self.samples = 0  # losses that mean holds
        self.last_sample = 0.0  # the latest of them
        self.awaiting_finite = False  # a non-finite loss was the latest loss this rank saw
        self._changed_at = -1  # the latest update at which the mean changed (not saved: detection only)

    def decode(self, update: int, mean: float) -> Tuple[str, float]:
        """``(kind, loss)`` for update ``update`` (counted from the start of training), given the mean
        train.py passed after it; ``kind`` is ``LOSS``, ``NONFINITE``, ``MISSING`` or ``DIVERGED`` (a
        non-finite loss with no finite one since the previous non-finite loss)."""
        index = (update - 1) % self.updates_per_epoch  # 0 at the first update of an epoch
        if index == 0:
            self.samples, self.running_mean = 0, 0.0
        if self.samples and not math.isfinite(self.running_mean):
            return MISSING, float("nan")
        changed = self.samples == 0 or mean != self.running_mean
        if changed and self._changed_at == update - 1 and index < self.updates_per_epoch - 1 and index > 0:
            self.every_update = True
        if changed:
            self._changed_at = update
        if changed or self.every_update:
            self.samples += 1
            self.last_sample = self.samples * mean - (self.samples - 1) * self.running_mean
            self.running_mean = mean
            if not math.isfinite(mean):
                self.last_sample = mean
                kind = DIVERGED if self.awaiting_finite else NONFINITE
                self.awaiting_finite = True
                return kind, mean
        self.awaiting_finite = False
        return LOSS, self.last_sample

    def state_dict(self) -> Dict[str, Any]:
        return {"running_mean": json_number(self.running_mean), "samples": self.samples,
                "last_sample": json_number(self.last_sample), "every_update": self.every_update,
                "awaiting_finite": self.awaiting_finite}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """``state`` has been validated by the caller."""
        self.running_mean = from_json_number(state["running_mean"])
        self.samples = state["samples"]
        self.last_sample = from_json_number(state["last_sample"])
        saved = state.get("every_update")
        self.every_update = True if not distributed() else saved
        self.awaiting_finite = state["awaiting_finite"]
        self._changed_at = -1


class LossSignal:
    """train.py's training loss on its way to ``detector``: per-update losses from what ``step_update`` gets
    (``metric_mode``: ``"epoch_mean"``, train.py's ``losses_m.avg``, or ``"update"``, that update's loss), summed
    on the host, averaged over all ranks only when the detector takes a value; ``device``: where the evaluation's
    mean over ranks runs."""

    def __init__(self, detector: Any, updates_per_epoch: int, metric_mode: str, device: torch.device) -> None:
        if metric_mode not in ("epoch_mean", "update"):
            raise ValueError(f"AutoDecay: metric_mode must be 'epoch_mean' or 'update', got {metric_mode!r}")
        self.detector, self.updates_per_epoch, self.metric_mode = detector, updates_per_epoch, metric_mode
        self.device = device
        self.decoder = RunningMeanDecoder(updates_per_epoch)
        self.losses = LossAccumulator()

    def record(self, n: int, metric: float) -> None:
        """What ``step_update(n, metric)`` got, as update ``n``'s loss (or none)."""
        if self.metric_mode == "update":
            kind, loss = (LOSS if math.isfinite(metric) else NONFINITE), metric
        else:
            kind, loss = self.decoder.decode(n, metric)
            if kind == NONFINITE and n % self.updates_per_epoch:  # on the rank that saw it
                epoch = (n - 1) // self.updates_per_epoch
                _logger.warning(
                    f"AutoDecay: train.py's running training loss turned non-finite at update {n} (epoch {epoch}): "
                    f"the rest of epoch {epoch} carries no loss and is skipped; if the losses are still "
                    "non-finite in the next epoch, the run has diverged and AutoDecay stops it")
        if kind != MISSING:
            self.losses.add(loss, diverged=kind == DIVERGED)

    def observe(self, n: int) -> Any:
        """Hand the detector the losses recorded since its clock, which reaches update ``n``; its decision.
        Every rank calls it at the same updates."""
        count = n - self.detector.update
        mean, finite, nonfinite, diverged = self.losses.read()  # over all ranks
        epoch = (n - 1) // self.updates_per_epoch
        if diverged:
            raise FloatingPointError(
                f"AutoDecay: the training loss is non-finite again in epoch {epoch} (update {n}), with no finite "
                f"loss since the non-finite batch before it: the run has diverged. {ADVICE}")
        if not finite and not nonfinite:  # no rank has a loss for these updates
            return self.skip(count)
        try:
            return self.detector.observe(mean, count, nonfinite)
        except FloatingPointError as error:
            raise FloatingPointError(f"{error} (at update {n}, epoch {epoch}). {ADVICE}") from None

    def flush(self, n: int) -> Any:
        """:meth:`observe` where the detector's clock is behind update ``n`` (None where it is not, or finished)."""
        return self.observe(n) if n > self.detector.update and not self.detector.finished else None

    def skip(self, count: int) -> Any:
        """Advance the detector's clock by ``count`` updates that carry no loss (its decision; None if none)."""
        return self.detector.skip(count) if count > 0 and not self.detector.finished else None

    def state_dict(self) -> Dict[str, Any]:
        return {**self.decoder.state_dict(), "pending_losses": self.losses.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """``state`` (the scheduler's) has been validated by the caller."""
        self.decoder.load_state_dict(state)
        self.losses.load_state_dict(state["pending_losses"])


# -- the evaluation ------------------------------------------------------------------------------
def check_evaluation(metric: Any) -> float:
    """The metric passed to ``step(epoch, metric)`` (a number or a one-element tensor) as a float."""
    if isinstance(metric, torch.Tensor):
        if metric.numel() != 1 or metric.dtype == torch.bool or metric.is_complex() or metric.device.type == "meta":
            raise ValueError(f"AutoDecay: the evaluation metric passed to step(epoch, metric) must be a real scalar, "
                             f"got a tensor of {metric.dtype}, shape {tuple(metric.shape)}, on {metric.device}")
        return float(metric.detach().reshape(()))
    if isinstance(metric, bool) or not isinstance(metric, numbers.Real):
        raise TypeError(f"AutoDecay: the evaluation metric passed to step(epoch, metric) must be a number, got "
                        f"{type(metric).__name__} {metric!r}")
    return float(metric)


# -- the stop --------------------------------------------------------------------------------------
class AutoDecayFinished(KeyboardInterrupt):
    """Raised by the optimizer's next ``zero_grad()``/``step()`` after the epoch boundary at which the
    last learning stage had ended: timm's ``train.py`` treats it like Ctrl-C and ends gracefully."""


def arm_stop(optimizer: torch.optim.Optimizer, message: str, on_stop: Callable[[], None]) -> None:
    """Make the optimizer's next ``zero_grad()`` or ``step()`` raise :class:`AutoDecayFinished`.

    ``train.py`` calls ``zero_grad()`` at the top of ``train_one_epoch``, before it loads a batch, and
    catches ``KeyboardInterrupt`` around its epoch loop; the step pre-hook serves loops that do not
    zero the gradients first. Both are removed when the stop fires, before ``on_stop()`` runs."""
    had_own = "zero_grad" in optimizer.__dict__
    own = optimizer.__dict__.get("zero_grad")
    handle = None

    def stop(*_args: Any, **_kwargs: Any) -> None:
        if had_own:
            optimizer.zero_grad = own
        else:
            optimizer.__dict__.pop("zero_grad", None)
        handle.remove()
        on_stop()
        raise AutoDecayFinished(message)

    optimizer.zero_grad = stop
    handle = optimizer.register_step_pre_hook(stop)
