"""AutoDecay as a timm scheduler: ``train.py --sched autodecay``.

:class:`AutoDecayScheduler` is a ``timm.scheduler.Scheduler`` driven by the project's
:class:`~timm_autodecay.detector.StageDetector`; it follows timm's conventions: explicit time
(``step_update(num_updates, metric)`` after every optimizer update, ``step(epoch, metric)`` at every
epoch end with the number of completed epochs), ``t_in_epochs`` (LR changes at epoch boundaries
unless ``--sched-on-updates``), timm's warmup (``warmup_t``, ``warmup_lr_init``, ``warmup_prefix``),
``lr_scale`` in param groups, and ``--min-lr`` as a floor.

How it reads timm's ``train.py``
--------------------------------
* The signal: ``train.py`` passes ``losses_m.avg``, this rank's running mean of the training loss over
  the current epoch. With ``k`` updates into the epoch, the update's own loss is
  ``k * avg_k - (k - 1) * avg_(k-1)``. Those are summed on the device by
  :class:`~timm_autodecay.torch_scheduler.LossAccumulator` and read back, averaged over all ranks,
  only when the detector wants a value and at each epoch's last update; so every rank observes the
  same values at the same updates and takes the same decisions.
* Decisions: with ``--sched-on-updates`` a decay applies from the next update; otherwise (timm's
  default, ``t_in_epochs``) at the next epoch boundary, like timm's step schedule.
* The end: once the last stage has ended, the next epoch boundary at which ``train.py`` checkpoints
  (every ``--val-interval`` epochs) arms a stop: the first ``optimizer.zero_grad()`` (or
  ``optimizer.step()``) after it raises :class:`AutoDecayFinished`, a ``KeyboardInterrupt``.
  ``train.py`` calls ``zero_grad()`` at the top of ``train_one_epoch``, before it loads a batch, and
  catches ``KeyboardInterrupt`` around its epoch loop: the run ends there with exit code 0, after the
  epoch's summary row, checkpoint and result entry, without training another batch.
* Resume: at each epoch's last update the scheduler's state is written, atomically, to
  ``autodecay_state.json`` in the folder of ``train.py``'s checkpoints (one entry per completed epoch).
  ``--resume CHECKPOINT`` makes ``train.py`` call ``step(start_epoch)`` (or
  ``step_update(start_epoch * updates_per_epoch)``); the scheduler then loads the entry for that epoch
  from the file next to ``CHECKPOINT``: same stage, LR and detector state as the unbroken run.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from timm.scheduler.scheduler import Scheduler

from .detector import SETTINGS, Decision, FollowsDetector, StageDetector, check_int
from .torch_scheduler import LossAccumulator, check_decay_rate

__all__ = ["AutoDecayFinished", "AutoDecayScheduler", "STATE_FILE"]

_logger = logging.getLogger("timm_autodecay")

STATE_FILE = "autodecay_state.json"
PREFIX = "autodecay_"
# Detector settings that the run's shape fixes: they come from timm's own arguments.
FROM_RUN = {
    "total_updates": "--epochs (num_epochs): the budget",
    "updates_per_epoch": "train.py's batches per epoch (updates_per_epoch)",
    "warmup_updates": "--warmup-epochs (warmup_epochs)",
}


def _json_number(value: float) -> Optional[float]:
    """JSON has no NaN: a non-finite running mean (a NaN batch) is stored as null."""
    return value if math.isfinite(value) else None


def _from_json_number(value: Optional[float]) -> float:
    return float("nan") if value is None else value


class AutoDecayFinished(KeyboardInterrupt):
    """Raised by the optimizer's next ``zero_grad()``/``step()`` after the epoch boundary at which the
    last learning stage had ended: timm's ``train.py`` treats it like Ctrl-C and ends gracefully."""


def is_primary() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _check_lr(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"AutoDecay: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


class AutoDecayScheduler(FollowsDetector, Scheduler):
    """Step decay at the end of each learning stage, as a timm scheduler.

    Args:
        optimizer: the optimizer; every param group's ``lr`` (times its ``lr_scale``) is scheduled.
        updates_per_epoch: optimizer updates per epoch (required: it locates epoch boundaries).
        decay_rate: LR factor at the end of each stage (timm's ``--decay-rate``).
        t_initial: the budget (timm's ``--epochs``), in epochs, or in updates when
            ``t_in_epochs=False``; no stage outlasts its share of it. ``None``: no budget.
        lr_min: floor of the decayed LR (timm's ``--min-lr``).
        warmup_t, warmup_lr_init, warmup_prefix: timm's warmup (``--warmup-epochs``,
            ``--warmup-lr``, ``--warmup-prefix``), in the same unit as ``t_initial``; the detector
            ignores the warmup updates.
        t_in_epochs: ``True`` (timm's default): LR changes at epoch boundaries; ``False``
            (``--sched-on-updates``): at the update after a decision.
        metric_mode: what ``step_update``'s metric is: ``"epoch_mean"`` (train.py's ``losses_m.avg``,
            the running mean over the epoch so far) or ``"update"`` (that update's loss).
        end_training: arm the stop (:class:`AutoDecayFinished`) once the last stage has ended.
        end_interval: end only at boundaries ``t`` with ``t % end_interval == 0`` (train.py's
            ``--val-interval``: it checkpoints only there).
        state_dir: folder where ``autodecay_state.json`` is written at every epoch's end (rank 0).
        resume_from: a checkpoint path or folder whose ``autodecay_state.json`` is read when training
            starts past epoch 0 (``train.py --resume``).
        **detector_settings: :data:`timm_autodecay.detector.SETTINGS` other than the run's shape
            (``num_stages``, ``window``, ``patience``, ``significance``, ...).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        updates_per_epoch: int,
        decay_rate: float = 0.1,
        t_initial: Optional[int] = None,
        lr_min: float = 0.0,
        warmup_t: int = 0,
        warmup_lr_init: float = 0.0,
        warmup_prefix: bool = False,
        t_in_epochs: bool = True,
        metric_mode: str = "epoch_mean",
        end_training: bool = True,
        end_interval: int = 1,
        state_dir: Optional[str] = None,
        resume_from: Optional[str] = None,
        initialize: bool = True,
        **detector_settings: Any,
    ) -> None:
        self.updates_per_epoch = check_int("updates_per_epoch", updates_per_epoch, 1)
        try:
            self.decay_rate = check_decay_rate(decay_rate)
        except ValueError as error:
            raise ValueError(f"AutoDecay: {error} (--decay-rate)") from None
        self.lr_min = _check_lr("lr_min (--min-lr)", lr_min)
        self.warmup_t = check_int("warmup_t (--warmup-epochs)", warmup_t, 0)
        self.warmup_lr_init = _check_lr("warmup_lr_init (--warmup-lr)", warmup_lr_init)
        self.warmup_prefix = bool(warmup_prefix)
        self.t_initial = None if t_initial is None else check_int("t_initial (--epochs)", t_initial, 1)
        if metric_mode not in ("epoch_mean", "update"):
            raise ValueError(f"AutoDecay: metric_mode must be 'epoch_mean' or 'update', got {metric_mode!r}")
        self.metric_mode = metric_mode
        if not isinstance(end_training, bool):
            raise ValueError(f"AutoDecay: end_training must be true or false, got {end_training!r}")
        self.end_training = end_training
        self.end_interval = check_int("end_interval (--val-interval)", end_interval, 1)
        self.state_dir = state_dir
        self.resume_from = resume_from

        for name in detector_settings:
            if name in FROM_RUN:
                raise ValueError(f"AutoDecay: {name} is set from the run, by {FROM_RUN[name]}")
        unknown = sorted(set(detector_settings) - set(SETTINGS))
        if unknown:
            known = sorted(set(SETTINGS) - set(FROM_RUN))
            raise ValueError(f"AutoDecay: unknown detector setting(s) {unknown}; known: {known}")
        unit = self.updates_per_epoch if t_in_epochs else 1
        if self.t_initial is not None and not self.warmup_prefix and self.warmup_t >= self.t_initial:
            raise ValueError(
                f"AutoDecay: the warmup ({self.warmup_t}) must be shorter than the budget ({self.t_initial}) "
                f"({'epochs' if t_in_epochs else 'updates'}; --warmup-epochs and --epochs)")
        total = None
        if self.t_initial is not None:
            total = (self.t_initial + (self.warmup_t if self.warmup_prefix else 0)) * unit
        try:
            self.detector = StageDetector(
                total_updates=total,
                updates_per_epoch=self.updates_per_epoch,
                warmup_updates=self.warmup_t * unit,
                **detector_settings,
            )
        except (TypeError, ValueError) as error:
            name = str(error).split(" ", 1)[0]
            key = f" (config key {PREFIX}{name})" if name in SETTINGS and name not in FROM_RUN else ""
            raise ValueError(f"AutoDecay: bad setting{key}: {error}") from None

        super().__init__(optimizer, param_group_field="lr", t_in_epochs=t_in_epochs, initialize=initialize)
        self._set_warmup_steps()
        self.update_groups(self._get_lr(0))

        self.accumulator = LossAccumulator()
        self.num_updates = 0  # updates whose loss this scheduler has consumed
        self._running_mean = 0.0  # the epoch mean train.py passed at the previous update
        self._samples = 0  # losses that mean holds so far this epoch
        self._last_sample = 0.0  # the latest of them
        self.last_decision: Optional[Decision] = None
        self._saved: Optional[Dict[str, Any]] = None  # autodecay_state.json's entries, once read
        self._stop_armed = False
        self._stop_handle = None
        self._device = next(
            (p.device for group in optimizer.param_groups for p in group["params"]), torch.device("cpu"))

    # -- the schedule ------------------------------------------------------------------------
    def _set_warmup_steps(self) -> None:
        if self.warmup_t:
            self.warmup_steps = [(v - self.warmup_lr_init) / self.warmup_t for v in self.base_values]
        else:
            self.warmup_steps = [1.0 for _ in self.base_values]

    def _stage_lr(self, stage: int) -> float:
        """Mean over param groups of a stage's LR (before ``lr_scale``), for the log."""
        values = [max(v * self.decay_rate ** stage, min(self.lr_min, v)) for v in self.base_values]
        return sum(values) / len(values)

    def _get_lr(self, t: int) -> List[float]:
        """LRs (before ``lr_scale``) at time ``t`` (epochs, or updates if not ``t_in_epochs``)."""
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        factor = self.decay_rate ** self.detector.stage
        return [max(v * factor, min(self.lr_min, v)) for v in self.base_values]

    def step_update(self, num_updates: int, metric: Optional[float] = None) -> None:
        """After optimizer update ``num_updates`` (counted from the start of training), with the
        training loss (``metric``: train.py's running epoch mean ``losses_m.avg``)."""
        n = check_int("num_updates", num_updates, 0)
        if metric is None:
            if n == self.num_updates:
                return
            if self._fresh() and n > 0:  # train.py --sched-on-updates --resume
                self._resume(n)
                return
            raise TypeError(
                "AutoDecay: step_update needs the training loss: step_update(num_updates, metric=loss)")
        if n != self.num_updates + 1:
            raise ValueError(
                f"AutoDecay: step_update(num_updates={n}) after update {self.num_updates}: call it once "
                f"after every optimizer update, with num_updates={self.num_updates + 1}")
        self.metric = metric
        value = self._update_loss(n, float(metric))
        self.num_updates = n
        epoch_end = n % self.updates_per_epoch == 0
        if not self.detector.finished:
            dtype = torch.float64 if self._device.type == "cpu" else torch.float32
            self.accumulator.add(torch.full((), value, dtype=dtype, device=self._device))
            if epoch_end or self.accumulator.updates >= self.detector.next_observation_in:
                self._observe()
        if epoch_end:
            self._save_state(n // self.updates_per_epoch)
        if not self.t_in_epochs:
            self.update_groups(self._get_lr(n))

    def step(self, epoch: int, metric: Optional[float] = None) -> None:
        """At the end of an epoch, with the number of completed epochs (train.py: ``epoch + 1``).
        ``metric`` (the validation metric) is not used: AutoDecay reads the training loss."""
        t = check_int("epoch", epoch, 0)
        self.metric = metric
        n = t * self.updates_per_epoch
        if n != self.num_updates:
            if self._fresh() and n > 0:  # train.py --resume: step(start_epoch)
                self._resume(n)
            elif n - self.updates_per_epoch < self.num_updates < n:
                # a short epoch (a loader that gave fewer batches than updates_per_epoch): train.py
                # starts the next one at update n + 1, so the epoch ends here
                if self.accumulator.updates and not self.detector.finished:
                    self._observe()
                self.num_updates = n
                self._save_state(t)
            else:
                raise ValueError(
                    f"AutoDecay: step(epoch={t}) after update {self.num_updates} "
                    f"({self.num_updates / self.updates_per_epoch:g} epochs): call step() at the end of each "
                    f"epoch with the number of completed epochs, after that epoch's step_update() calls")
        if self.t_in_epochs:
            self.update_groups(self._get_lr(t))
        if self.detector.finished and t % self.end_interval == 0:
            self._arm_stop(t)

    def _update_loss(self, n: int, metric: float) -> float:
        """The latest single-update loss train.py's running epoch mean ``losses_m.avg`` reveals.

        In one process train.py adds every update's loss to the mean, so each update gives its own
        loss back. In a distributed run it adds the loss (already averaged over ranks) only every
        ``--log-interval`` updates: the mean then changes only there, and each update in between
        stands for the latest logged loss."""
        if self.metric_mode == "update":
            return metric
        if (n - 1) % self.updates_per_epoch == 0:  # first update of an epoch: the mean starts over
            self._samples, self._running_mean = 0, 0.0
        if self._samples == 0 or metric != self._running_mean:
            self._samples += 1
            self._last_sample = self._samples * metric - (self._samples - 1) * self._running_mean
            self._running_mean = metric
        return self._last_sample

    def _fresh(self) -> bool:
        return self.num_updates == 0 and self.detector.update == 0 and self.accumulator.updates == 0

    def _observe(self) -> None:
        count = self.accumulator.updates
        mean, nonfinite = self.accumulator.read()  # over all ranks
        decision = self.detector.observe(mean, count, nonfinite)
        self.last_decision = decision
        if decision.changed and is_primary():
            epoch = decision.update / self.updates_per_epoch
            if decision.action == "decay":
                when = "from the next update" if not self.t_in_epochs else "from the next epoch"
                _logger.info(
                    f"AutoDecay: stage {decision.stage - 1} ended at update {decision.update} "
                    f"(epoch {epoch:.2f}, {decision.reason}); LR {self._stage_lr(decision.stage - 1):.4g} -> "
                    f"{self._stage_lr(decision.stage):.4g} {when}")
            else:
                _logger.info(
                    f"AutoDecay: the last stage ({decision.stage}) ended at update {decision.update} "
                    f"(epoch {epoch:.2f}, {decision.reason})"
                    + (("; training ends at the end of this epoch" if self.end_interval == 1 else
                        f"; training ends at the next epoch boundary that is a multiple of {self.end_interval}")
                       if self.end_training else ""))

    # -- the end -----------------------------------------------------------------------------
    def _arm_stop(self, t: int) -> None:
        if not self.end_training or self._stop_armed:
            return
        self._stop_armed = True
        last = self.history[-1] if self.history else {}
        message = (
            f"AutoDecay: training ends after epoch {t - 1} ({t} epochs, {self.num_updates} updates): the last "
            f"learning stage ended at update {last.get('update')} ({last.get('reason')}); "
            f"no further batch is trained")
        optimizer = self.optimizer
        had_own = "zero_grad" in optimizer.__dict__
        own = optimizer.__dict__.get("zero_grad")

        def disarm() -> None:
            if had_own:
                optimizer.zero_grad = own
            else:
                optimizer.__dict__.pop("zero_grad", None)
            if self._stop_handle is not None:
                self._stop_handle.remove()
                self._stop_handle = None

        def stop(*_args: Any, **_kwargs: Any) -> None:
            disarm()
            if is_primary():
                _logger.info(message)
            raise AutoDecayFinished(message)

        optimizer.zero_grad = stop
        self._stop_handle = optimizer.register_step_pre_hook(stop)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """JSON-able: the detector, the LR bookkeeping and any losses not yet observed."""
        return {
            "format": 1,
            "num_updates": self.num_updates,
            "updates_per_epoch": self.updates_per_epoch,
            "t_in_epochs": self.t_in_epochs,
            "decay_rate": self.decay_rate,
            "lr_min": self.lr_min,
            "warmup_t": self.warmup_t,
            "warmup_lr_init": self.warmup_lr_init,
            "base_values": list(self.base_values),
            "running_mean": _json_number(self._running_mean),
            "samples": self._samples,
            "last_sample": _json_number(self._last_sample),
            "pending_losses": self.accumulator.state_dict(),
            "detector": self.detector.state_dict(),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        for key in ("updates_per_epoch", "t_in_epochs", "decay_rate", "lr_min", "warmup_t", "warmup_lr_init"):
            if state_dict[key] != getattr(self, key):
                raise ValueError(
                    f"AutoDecay: {key} is {getattr(self, key)!r} but the saved state has {state_dict[key]!r}; "
                    "resume with the run's own settings")
        try:
            self.detector.load_state_dict(state_dict["detector"])
        except ValueError as error:
            raise ValueError(str(error) if str(error).startswith("AutoDecay") else f"AutoDecay: {error}") from None
        if len(state_dict["base_values"]) != len(self.base_values):
            raise ValueError(
                f"AutoDecay: the optimizer has {len(self.base_values)} param groups but the saved state "
                f"{len(state_dict['base_values'])}")
        self.num_updates = state_dict["num_updates"]
        self._running_mean = _from_json_number(state_dict["running_mean"])
        self._samples = state_dict["samples"]
        self._last_sample = _from_json_number(state_dict["last_sample"])
        self.accumulator.load_state_dict(state_dict["pending_losses"])
        self.base_values = list(state_dict["base_values"])
        self._set_warmup_steps()
        t = self.num_updates // self.updates_per_epoch if self.t_in_epochs else self.num_updates
        self.update_groups(self._get_lr(t))

    def _resume(self, n: int) -> None:
        if n % self.updates_per_epoch:
            raise ValueError(
                f"AutoDecay: cannot start at update {n}, inside epoch {n // self.updates_per_epoch}: "
                "it resumes at epoch boundaries only")
        t = n // self.updates_per_epoch
        if not self.resume_from:
            raise ValueError(
                f"AutoDecay: training starts at epoch {t} but no saved AutoDecay state was given: resume "
                f"from a checkpoint of an autodecay run (train.py --resume CHECKPOINT; {STATE_FILE} must "
                "be next to it), or call load_state_dict() before the first step")
        folder = self.resume_from if os.path.isdir(self.resume_from) else os.path.dirname(self.resume_from)
        path = os.path.join(folder or ".", STATE_FILE)
        try:
            with open(path) as f:
                saved = json.load(f)
        except FileNotFoundError:
            raise ValueError(
                f"AutoDecay: cannot resume at epoch {t}: {path} does not exist; the stage, LR and detector "
                f"state of an autodecay run are saved there, next to its checkpoints") from None
        states = saved.get("epochs", {})
        if str(t) not in states:
            raise ValueError(
                f"AutoDecay: {path} holds no state for epoch {t} (it has epochs "
                f"{sorted(int(e) for e in states)}); resume from a checkpoint whose epoch it holds")
        self.load_state_dict(states[str(t)])
        if is_primary():
            _logger.info(
                f"AutoDecay: resumed at epoch {t} (update {n}) from {path}: stage {self.stage}, "
                f"finished {self.finished}, LR {[g['lr'] for g in self.optimizer.param_groups]}")
        if self.finished:
            self._arm_stop(t)

    def _save_state(self, t: int) -> None:
        if not self.state_dir or not is_primary():
            return
        path = os.path.join(self.state_dir, STATE_FILE)
        if self._saved is None:
            self._saved = {}
            try:
                with open(path) as f:
                    self._saved = json.load(f).get("epochs", {})
            except (FileNotFoundError, ValueError):
                pass
        # one entry per completed epoch; entries past t belong to a run this one has replaced
        self._saved = {e: s for e, s in self._saved.items() if int(e) < t}
        self._saved[str(t)] = self.state_dict()
        os.makedirs(self.state_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"format": "timm-autodecay-state", "version": 1, "epochs": self._saved}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
