"""AutoDecay as a timm scheduler: ``train.py --sched autodecay``.

:class:`AutoDecayScheduler` is a ``timm.scheduler.Scheduler`` driven by the project's
:class:`~timm_autodecay.detector.StageDetector`. It keeps timm's contract: explicit time
(``step_update(num_updates, metric)`` after every optimizer update, ``step(epoch, metric)`` at every epoch end
with the number of completed epochs), the LR through ``_get_lr(t)`` and ``update_groups`` (``lr_scale`` in
param groups), ``t_in_epochs`` (LR changes at epoch boundaries unless ``--sched-on-updates``), timm's warmup,
and ``--min-lr`` as a floor. The run's shape comes from timm's arguments (:mod:`~timm_autodecay.timm_shape`).

How it reads timm's ``train.py``
--------------------------------
* The signal: ``train.py`` passes ``losses_m.avg``, this rank's running mean of the training loss over the
  current epoch; :class:`~timm_autodecay.timm_loop.LossSignal` turns it back into per-update losses (and says
  which updates carry none: the rest of an epoch after a NaN batch), averaged over all ranks only when the
  detector wants a value and at each epoch's last update, so every rank takes the same decisions.
* The evaluation signal (``eval_signal``): the metric ``train.py`` passes to ``step(epoch + 1, metric)`` after
  each evaluation also ends the stable phase once it has stopped improving (:mod:`~timm_autodecay.evaluations`),
  averaged over ranks; ``metric=None`` (an epoch without evaluation) changes nothing. Its direction is
  ``eval_mode`` (the factory takes timm's ``plateau_mode``).
* Decisions: with ``--sched-on-updates`` a decay applies from the next update; otherwise at the next epoch
  boundary, like timm's step schedule. With the cooldown shape the LR follows the detector's cooldown curve at
  every update, from the update that began it.
* The end: once the last stage (and its cooldown) has ended, the next epoch boundary at which ``train.py``
  checkpoints (every ``--val-interval`` epochs) arms a stop: the first ``optimizer.zero_grad()`` after it raises
  :class:`AutoDecayFinished`, a ``KeyboardInterrupt``, which ends ``train.py`` with exit code 0, after the
  epoch's summary row, checkpoint and result entry, without training another batch.

Resume: the state travels inside the optimizer's state (:mod:`~timm_autodecay.timm_resume`). At each epoch's
last update, and again after ``step(epoch, metric)``, the scheduler writes its JSON-able ``state_dict()`` into
``optimizer.param_groups[0]["autodecay_state"]``; train.py saves ``optimizer.state_dict()`` in every checkpoint,
in between, and loads it on ``--resume`` before it builds the scheduler. Its ``step(start_epoch)`` (or
``step_update(start_epoch * updates_per_epoch)``) on this fresh scheduler then loads that checkpoint's own
state, whichever checkpoint of the run it is, and, where the state has not taken that epoch's evaluation yet
(train.py checkpoints before it steps), takes the checkpoint's ``metric`` from the ``--resume`` file as the
unbroken run took it: the resumed run decides as the unbroken one. Checkpoints of releases 0.1.0 and 0.2.0
resume from the ``autodecay_state.json`` next to them. A state is checked whole before any of it is applied.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from timm.scheduler.scheduler import Scheduler

from .detector import Decision, FollowsDetector, check_int
from .lr_rules import floor_share, joining_initial_lr
from .ranks import mean_over_ranks
from .timm_log import log_decision, log_stop, stop_message
from .timm_loop import AutoDecayFinished, LossSignal, arm_stop, check_evaluation, is_primary
from .timm_resume import STATE_KEY, publish, resume
from .timm_shape import RunShape, check_flag
from .timm_state import load_detector_first, scheduler_state

__all__ = ["AutoDecayFinished", "AutoDecayScheduler", "STATE_KEY"]


class AutoDecayScheduler(FollowsDetector, Scheduler):
    """Step decay (or a cooldown) at the end of each learning stage, as a timm scheduler.

    The run's shape comes in a timm scheduler's terms (``updates_per_epoch`` ... ``end_interval``: see
    :meth:`RunShape.from_timm`) or as ``shape``, which the factory builds from train.py's arguments.
    ``metric_mode``: ``step_update``'s metric is train.py's ``losses_m.avg`` (``"epoch_mean"``) or the update's
    loss (``"update"``); ``eval_signal``: judge the metric passed to ``step(epoch, metric)``; ``end_training``: arm
    the stop (:class:`AutoDecayFinished`) once the last stage has ended; ``resume_from``: train.py's ``--resume``;
    ``state_file``: a release 0.1.0/0.2.0 ``autodecay_state.json`` kept elsewhere; ``detector_settings``: the rest.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, updates_per_epoch: Optional[int] = None,
                 decay_rate: float = 0.1, t_initial: Optional[int] = None, lr_min: float = 0.0, warmup_t: int = 0,
                 warmup_lr_init: float = 0.0, warmup_prefix: bool = False, t_in_epochs: bool = True,
                 end_interval: int = 1, *, shape: Optional[RunShape] = None, metric_mode: str = "epoch_mean",
                 eval_signal: bool = False, end_training: bool = True, resume_from: Optional[str] = None,
                 state_file: Optional[str] = None, initialize: bool = True, **detector_settings: Any) -> None:
        if shape is not None and updates_per_epoch is not None:
            raise TypeError("AutoDecay: give the run's shape or timm's arguments (updates_per_epoch, ...), not both")
        self.shape = shape or RunShape.from_timm(updates_per_epoch, t_initial, warmup_t, warmup_prefix, t_in_epochs,
                                                 decay_rate, lr_min, warmup_lr_init, end_interval)
        self.end_training, self.eval_signal = check_flag("end_training", end_training), check_flag(
            "eval_signal", eval_signal)
        self.resume_from, self.state_file = resume_from, state_file
        for name in ("updates_per_epoch", "decay_rate", "lr_min", "warmup_t", "warmup_lr_init", "warmup_prefix"):
            setattr(self, name, getattr(self.shape, name))  # as timm's own schedulers show them
        self.detector = self.shape.make_detector(detector_settings)
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=self.shape.t_in_epochs, initialize=initialize)
        self.floor_share = floor_share_of(self.lr_min, self.base_values)
        self.num_updates = 0  # updates this scheduler has been told of
        self.evaluated_epoch = 0  # the epoch whose end's evaluation was judged last (0: none yet)
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
        self.signal = LossSignal(self.detector, self.updates_per_epoch, metric_mode, device)
        self.last_decision, self._stop_armed = None, False  # the latest Decision; the stop, once armed
        self.update_groups(self._get_lr(0))

    # -- the schedule: timm's hooks ----------------------------------------------------------
    def _get_values(self, t: int, on_epoch: bool = True) -> Optional[List[float]]:
        """timm's rule, and at every update (``t`` counts updates there) during a cooldown, whatever the unit."""
        if not on_epoch and self.t_in_epochs and self.detector.in_cooldown:
            return self._get_lr(t // self.updates_per_epoch)
        return super()._get_values(t, on_epoch)

    def _get_lr(self, t: int, stage: Optional[int] = None) -> List[float]:
        """The one LR rule, per param group before ``lr_scale``, at timm's time ``t`` (epochs, or updates without
        ``t_in_epochs``): timm's warmup ramp, then the detector's LR (during a cooldown, after the latest update,
        whatever the unit), never below its floor; ``stage``: that stage's LR instead (for the log)."""
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * ((v - self.warmup_lr_init) / self.warmup_t) for v in self.base_values]
        _join_new_groups(self)
        lrs = []
        for v in self.base_values:
            floor = self.floor_share * v  # lr_rules: --min-lr is the highest group's floor, the others' its share
            lr = (v * self.decay_rate ** stage if stage is not None else
                  self.detector.lr_at(self.num_updates, v, self.decay_rate, floor))
            lrs.append(max(lr, floor))
        return lrs

    def step_update(self, num_updates: int, metric: Optional[float] = None) -> None:
        """After optimizer update ``num_updates`` (counted from the start of training), with the training loss
        (train.py's running epoch mean ``losses_m.avg``); without it, train.py's resume call."""
        n = check_int("num_updates", num_updates, 0)
        _join_new_groups(self)  # at the LRs they have now, set after update self.num_updates
        if metric is None:  # train.py's resume call with --sched-on-updates, or a repeated call (nothing to do)
            if n != self.num_updates and not (self._fresh() and n > 0):
                raise TypeError("AutoDecay: step_update needs the training loss: step_update(num_updates, metric=loss)")
            if n != self.num_updates:
                self._end_epoch(n // self.updates_per_epoch, resume(self, n, None))
            return
        if n != self.num_updates + 1:
            raise ValueError(f"AutoDecay: step_update(num_updates={n}) after update {self.num_updates}: call it once "
                             f"after every optimizer update, with num_updates={self.num_updates + 1}")
        self.metric, self.num_updates = metric, n
        epoch_end = n % self.updates_per_epoch == 0
        if not self.detector.finished:
            self.signal.record(n, float(metric))
            if epoch_end or n - self.detector.update >= self.detector.next_observation_in:
                self._take(self.signal.observe(n))
        if epoch_end:  # train.py checkpoints next, before step(): the checkpoint takes this state along
            publish(self.optimizer, self.state_dict())
        values = self._get_values(n, on_epoch=False)
        if values is not None:
            self.update_groups(values)

    def step(self, epoch: int, metric: Optional[float] = None) -> None:
        """At the end of an epoch, with the number of completed epochs (train.py: ``epoch + 1``) and the
        evaluation metric (``None``: no evaluation), which ``eval_signal`` judges."""
        t = check_int("epoch", epoch, 0)
        _join_new_groups(self)
        n = t * self.updates_per_epoch
        if n != self.num_updates and self._fresh() and n > 0:  # train.py --resume: step(start_epoch)
            metric = resume(self, n, metric)
        elif n - self.updates_per_epoch < self.num_updates < n:
            # a short epoch (fewer batches than updates_per_epoch): train.py starts the next one at update n + 1
            self._take(self.signal.flush(self.num_updates))
            self._take(self.signal.skip(n - self.num_updates))
            self.num_updates = n
        elif n != self.num_updates:
            raise ValueError(f"AutoDecay: step(epoch={t}) after update {self.num_updates} "
                             f"({self.num_updates / self.updates_per_epoch:g} epochs): call step() at the end of each "
                             "epoch with the number of completed epochs, after that epoch's step_update() calls")
        self._end_epoch(t, metric)

    def _end_epoch(self, t: int, metric: Any) -> None:
        """The end of epoch ``t`` (clock at update ``t * updates_per_epoch``): its evaluation, the LR, the state."""
        self.metric = metric
        if self.eval_signal:  # every rank meets in the mean, also one without a value (a checkpoint it cannot read)
            value = mean_over_ranks(None if metric is None else check_evaluation(metric), self.signal.device)
            if value is not None:
                self._take(self.signal.flush(self.num_updates))  # the losses first: the clock reaches this update
                self._take(self.detector.observe_eval(value))
                self.evaluated_epoch = t
        values = self._get_values(t, on_epoch=True)
        if values is not None:
            self.update_groups(values)
        publish(self.optimizer, self.state_dict())  # for a loop that checkpoints after step()
        if self.detector.finished and t % self.shape.end_interval == 0:
            self._arm_stop(t)

    def _arm_stop(self, t: int) -> None:
        if self.end_training and not self._stop_armed:
            self._stop_armed = True
            message = stop_message(self, t)
            arm_stop(self.optimizer, message, lambda: log_stop(message))

    def _take(self, decision: Optional[Decision]) -> None:
        if decision is not None:
            self.last_decision = decision
            if decision.changed and is_primary():
                log_decision(self, decision)

    def _fresh(self) -> bool:  # nothing seen yet: a step past 0 is train.py's resume call
        return self.num_updates == 0 and self.detector.update == 0

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """JSON-able: the detector, the LR bookkeeping, the loss signal's, the latest evaluation's epoch."""
        return scheduler_state(self)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a state of this release or an older one. Everything is checked first; a StateError (a
        ValueError) names the bad key or the flag that differs, and then nothing has changed."""
        state = load_detector_first(state_dict, len(self.optimizer.param_groups), self.shape, self.detector)
        self.num_updates, self.evaluated_epoch = state["num_updates"], state["evaluated_epoch"]
        self.signal.load_state_dict(state)
        self.base_values = [float(v) for v in state["base_values"]]
        self.update_groups(self._get_lr(self.num_updates // self.shape.unit))
        t, into_epoch = divmod(self.num_updates, self.updates_per_epoch)
        if self.detector.finished and not into_epoch and t % self.shape.end_interval == 0:
            self._arm_stop(t)  # as the unbroken run armed it at this boundary


def floor_share_of(lr_min: float, base_values: List[float]) -> float:
    try:
        return floor_share(lr_min, base_values)
    except ValueError as error:
        raise ValueError(f"AutoDecay: {error} (--min-lr)") from None


def _join_new_groups(scheduler: AutoDecayScheduler) -> None:
    """Param groups added since the LRs were last set (a backbone unfrozen mid-run) join at their LR, as if in the
    run from the start (``lr_rules``); timm's own schedulers leave such a group alone."""
    groups = scheduler.optimizer.param_groups
    if len(groups) <= len(scheduler.base_values):
        return
    factor = scheduler.detector.lr_at(scheduler.num_updates, 1.0, scheduler.decay_rate, scheduler.floor_share)
    for group in groups[len(scheduler.base_values):]:
        lr = float(group["lr"]) / group.get("lr_scale", 1.0)
        group.setdefault("initial_lr", lr)
        scheduler.base_values.append(joining_initial_lr(lr, factor))
