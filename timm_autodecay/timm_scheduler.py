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
  the current epoch; :mod:`~timm_autodecay.timm_loop` turns it back into per-update losses (and says
  which updates carry none: the rest of an epoch after a NaN batch). They are summed on the host and
  averaged over all ranks only when the detector wants a value and at each epoch's last update, so
  every rank observes the same values at the same updates and takes the same decisions. Updates that
  carry no loss on any rank advance the detector's clock without a value.
* The evaluation signal (``eval_signal``): the metric ``train.py`` passes to ``step(epoch + 1, metric)`` after
  each evaluation (its ``--eval-metric`` on the validation split) also ends the stable phase, once it has
  stopped improving (:mod:`~timm_autodecay.evaluations`). The losses not yet observed are handed to the
  detector first, then the metric, averaged over ranks; ``metric=None`` (an epoch without evaluation)
  changes nothing. Its direction is ``eval_mode`` (the factory takes timm's ``plateau_mode``).
* Decisions: with ``--sched-on-updates`` a decay applies from the next update; otherwise (timm's
  default, ``t_in_epochs``) at the next epoch boundary, like timm's step schedule. With the cooldown
  shape the LR follows the detector's cooldown curve at every update, from the update that began it.
* The end: once the last stage (and its cooldown) has ended, the next epoch boundary at which
  ``train.py`` checkpoints (every ``--val-interval`` epochs) arms a stop: the first
  ``optimizer.zero_grad()`` after it raises :class:`AutoDecayFinished`, a ``KeyboardInterrupt``, which
  ends ``train.py`` with exit code 0, after the epoch's summary row, checkpoint and result entry,
  without training another batch.
* Resume: at each epoch's last update the scheduler's state is added to ``autodecay_state.json`` in
  the folder of ``train.py``'s checkpoints (:mod:`~timm_autodecay.timm_state`), tied to the checkpoint
  written next. ``--resume CHECKPOINT`` makes ``train.py`` call ``step(start_epoch)`` (or
  ``step_update(start_epoch * updates_per_epoch)``); the scheduler then loads that checkpoint's entry:
  same stage, LR and detector state (its evaluations too: the entry is rewritten once the epoch's
  evaluation is taken) as the unbroken run. The whole entry is checked before any of it is applied.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List, Optional

import torch
from timm.scheduler.scheduler import Scheduler

from .detector import SETTINGS, Decision, FollowsDetector, StageDetector, StateError, check_int
from .ranks import mean_over_ranks
from .settings import check_known
from .timm_keys import FROM_RUN, PREFIX
from .timm_loop import (LOSS, NONFINITE, AutoDecayFinished, RankLosses, RunningMeanDecoder, arm_stop,
                        check_evaluation, is_primary)
from .timm_state import (ENTRY_TAG, ENTRY_VERSION, STATE_FILE, WHAT_IT_IS, StateFile, adopt_evaluation_settings,
                         check_entry, check_same_run, find_entry, migrate_entry, settings_hint, what_to_do)

__all__ = ["AutoDecayFinished", "AutoDecayScheduler", "STATE_FILE"]

_logger = logging.getLogger("timm_autodecay")

def _check_lr(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"AutoDecay: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_decay_rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"AutoDecay: decay_rate must be in (0, 1), got {value!r} (--decay-rate)")
    return float(value)


class AutoDecayScheduler(FollowsDetector, Scheduler):
    """Step decay (or a cooldown) at the end of each learning stage, as a timm scheduler.

    Args:
        optimizer: the optimizer; every param group's ``lr`` (times its ``lr_scale``) is scheduled.
        updates_per_epoch: optimizer updates per epoch (required: it locates epoch boundaries).
        decay_rate: LR factor at the end of each stage (timm's ``--decay-rate``).
        t_initial: the budget (timm's ``--epochs``), in epochs, or in updates when
            ``t_in_epochs=False``; no stage outlasts its share of it. ``None``: no budget.
        lr_min: floor of the decayed LR, and the cooldown's end (timm's ``--min-lr``).
        warmup_t, warmup_lr_init, warmup_prefix: timm's warmup (``--warmup-epochs``,
            ``--warmup-lr``, ``--warmup-prefix``), in the same unit as ``t_initial``; the detector
            ignores the warmup updates.
        t_in_epochs: ``True`` (timm's default): LR changes at epoch boundaries; ``False``
            (``--sched-on-updates``): at the update after a decision.
        metric_mode: what ``step_update``'s metric is: ``"epoch_mean"`` (train.py's ``losses_m.avg``,
            the running mean over the epoch so far) or ``"update"`` (that update's loss).
        eval_signal: judge the metric passed to ``step(epoch, metric)`` (an evaluation result, better as
            ``eval_mode`` says) as the detector's evaluation signal; ``False``: ignore it.
        end_training: arm the stop (:class:`AutoDecayFinished`) once the last stage has ended.
        end_interval: end only at boundaries ``t`` with ``t % end_interval == 0`` (train.py's
            ``--val-interval``: it checkpoints only there).
        state_dir: folder where ``autodecay_state.json`` is written at every epoch's end (rank 0).
        resume_from: a checkpoint path or folder whose ``autodecay_state.json`` is read when training
            starts past epoch 0 (``train.py --resume``).
        state_file: the ``autodecay_state.json`` to resume from instead of the one next to ``resume_from``.
        **detector_settings: :data:`timm_autodecay.detector.SETTINGS` other than the run's shape
            (``num_stages``, ``window``, ``decay_shape``, ``cooldown_fraction``, ...).
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
        eval_signal: bool = False,
        end_training: bool = True,
        end_interval: int = 1,
        state_dir: Optional[str] = None,
        resume_from: Optional[str] = None,
        state_file: Optional[str] = None,
        initialize: bool = True,
        **detector_settings: Any,
    ) -> None:
        self.updates_per_epoch = check_int("updates_per_epoch", updates_per_epoch, 1)
        self.decay_rate = _check_decay_rate(decay_rate)
        self.lr_min = _check_lr("lr_min (--min-lr)", lr_min)
        self.warmup_t = check_int("warmup_t (--warmup-epochs)", warmup_t, 0)
        self.warmup_lr_init = _check_lr("warmup_lr_init (--warmup-lr)", warmup_lr_init)
        self.warmup_prefix = bool(warmup_prefix)
        self.t_initial = None if t_initial is None else check_int("t_initial (--epochs)", t_initial, 1)
        if metric_mode not in ("epoch_mean", "update"):
            raise ValueError(f"AutoDecay: metric_mode must be 'epoch_mean' or 'update', got {metric_mode!r}")
        self.metric_mode = metric_mode
        for name, value in (("end_training", end_training), ("eval_signal", eval_signal)):
            if not isinstance(value, bool):
                raise ValueError(f"AutoDecay: {name} must be true or false, got {value!r}")
        self.end_training, self.eval_signal = end_training, eval_signal
        self.end_interval = check_int("end_interval (--val-interval)", end_interval, 1)
        self.state_dir, self.resume_from, self.state_file = state_dir, resume_from, state_file
        self.detector = self._make_detector(t_in_epochs, detector_settings)

        super().__init__(optimizer, param_group_field="lr", t_in_epochs=t_in_epochs, initialize=initialize)
        self._set_warmup_steps()
        self.num_updates = 0  # updates this scheduler has been told of
        self.decoder = RunningMeanDecoder(self.updates_per_epoch)
        self.losses = RankLosses()
        self.last_decision: Optional[Decision] = None
        self._file: Optional[StateFile] = None
        self._stop_armed = False
        self._device = next(
            (p.device for group in optimizer.param_groups for p in group["params"]), torch.device("cpu"))
        self.update_groups(self._get_lr(0))

    def _make_detector(self, t_in_epochs: bool, settings: Dict[str, Any]) -> StageDetector:
        for name in settings:
            if name in FROM_RUN:
                raise ValueError(f"AutoDecay: {name} is set from the run, by {FROM_RUN[name]}")
        check_known(settings, set(SETTINGS) - set(FROM_RUN), "AutoDecay detector setting(s)")
        unit = self.updates_per_epoch if t_in_epochs else 1
        if self.t_initial is not None and not self.warmup_prefix and self.warmup_t >= self.t_initial:
            raise ValueError(
                f"AutoDecay: the warmup ({self.warmup_t}) must be shorter than the budget ({self.t_initial}) "
                f"({'epochs' if t_in_epochs else 'updates'}; --warmup-epochs and --epochs)")
        total = None
        if self.t_initial is not None:
            total = (self.t_initial + (self.warmup_t if self.warmup_prefix else 0)) * unit
        try:
            return StageDetector(total_updates=total, updates_per_epoch=self.updates_per_epoch,
                                 warmup_updates=self.warmup_t * unit, **settings)
        except (TypeError, ValueError) as error:
            name = str(error).split(" ", 1)[0]
            key = f" (config key {PREFIX}{name})" if name in SETTINGS and name not in FROM_RUN else ""
            flags = [flag for setting, flag in FROM_RUN.items() if setting in str(error)]
            key = key or (f" (from {'; '.join(flags)})" if flags else "")
            raise ValueError(f"AutoDecay: bad setting{key}: {error}") from None

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
        """LRs (before ``lr_scale``) at time ``t`` (epochs, or updates if not ``t_in_epochs``); during a
        cooldown, after the latest update, whatever the unit."""
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        if self.detector.in_cooldown:
            return [max(self.detector.lr_at(self.num_updates, v, self.decay_rate, min(self.lr_min, v)),
                        min(self.lr_min, v)) for v in self.base_values]
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
        self.num_updates = n
        epoch_end = n % self.updates_per_epoch == 0
        if not self.detector.finished:
            self._record(n, float(metric))
            if epoch_end or n - self.detector.update >= self.detector.next_observation_in:
                self._observe()
        if epoch_end:
            self._save_state(n // self.updates_per_epoch)
        if not self.t_in_epochs:
            self.update_groups(self._get_lr(n))
        elif self.detector.in_cooldown:
            self.update_groups(self._get_lr(n // self.updates_per_epoch))

    def step(self, epoch: int, metric: Optional[float] = None) -> None:
        """At the end of an epoch, with the number of completed epochs (train.py: ``epoch + 1``) and the
        evaluation metric (``None``: no evaluation), which ``eval_signal`` judges."""
        t = check_int("epoch", epoch, 0)
        self.metric = metric
        n = t * self.updates_per_epoch
        if n != self.num_updates:
            if self._fresh() and n > 0:  # train.py --resume: step(start_epoch)
                self._resume(n)
            elif n - self.updates_per_epoch < self.num_updates < n:
                # a short epoch (a loader that gave fewer batches than updates_per_epoch): train.py
                # starts the next one at update n + 1, so the epoch ends here
                if self.num_updates > self.detector.update and not self.detector.finished:
                    self._observe()
                if not self.detector.finished:
                    self._skip(n - self.num_updates)
                self.num_updates = n
                self._save_state(t)
            else:
                raise ValueError(
                    f"AutoDecay: step(epoch={t}) after update {self.num_updates} "
                    f"({self.num_updates / self.updates_per_epoch:g} epochs): call step() at the end of each "
                    f"epoch with the number of completed epochs, after that epoch's step_update() calls")
        if metric is not None and self.eval_signal:
            self._evaluate(check_evaluation(metric), t)
        if self.t_in_epochs:
            self.update_groups(self._get_lr(t))
        if self.detector.finished and t % self.end_interval == 0:
            self._arm_stop(t)

    # -- the signal --------------------------------------------------------------------------
    def _record(self, n: int, metric: float) -> None:
        if self.metric_mode == "update":
            kind, loss = (LOSS if math.isfinite(metric) else NONFINITE), metric
        else:
            kind, loss = self.decoder.decode(n, metric)
            if kind == NONFINITE and n % self.updates_per_epoch:
                epoch = (n - 1) // self.updates_per_epoch
                _logger.warning(
                    f"AutoDecay: train.py's running training loss turned non-finite at update {n} (epoch {epoch}): "
                    f"the rest of epoch {epoch} carries no loss and is skipped; if the losses are still "
                    "non-finite in the next epoch, the run has diverged and AutoDecay stops it")
        self.losses.add(kind, loss)

    def _fresh(self) -> bool:
        return self.num_updates == 0 and self.detector.update == 0

    def _observe(self) -> None:
        count = self.num_updates - self.detector.update
        mean, finite, nonfinite, diverged = self.losses.read(self._device)  # over all ranks
        epoch = (self.num_updates - 1) // self.updates_per_epoch
        advice = ("Resume from a checkpoint before the losses turned non-finite, e.g. with a lower --lr or with "
                  "--clip-grad")
        if diverged:
            raise FloatingPointError(
                f"AutoDecay: the training loss is non-finite again in epoch {epoch} (update {self.num_updates}), "
                f"with no finite loss since the non-finite batch before it: the run has diverged. {advice}")
        if not finite and not nonfinite:  # no rank has a loss for these updates
            self._skip(count)
            return
        try:
            self._take(self.detector.observe(mean, count, nonfinite))
        except FloatingPointError as error:
            raise FloatingPointError(f"{error} (at update {self.num_updates}, epoch {epoch}). {advice}") from None

    def _skip(self, count: int) -> None:
        """Advance the detector's clock by ``count`` updates that carry no loss."""
        if count > 0:
            self._take(self.detector.skip(count))

    def _evaluate(self, value: float, t: int) -> None:
        """train.py's evaluation after ``t`` epochs, judged as AutoDecayLR.step_eval judges it: the losses not
        yet observed first (the detector's clock reaches this update), then the value averaged over ranks.
        The entry saved for this epoch's checkpoint is then rewritten with it."""
        if self.num_updates > self.detector.update and not self.detector.finished:
            self._observe()
        self._take(self.detector.observe_eval(mean_over_ranks(value, self._device)))
        if self.num_updates == t * self.updates_per_epoch:
            self._save_state(t, again=True)

    def _take(self, decision: Decision) -> None:
        self.last_decision = decision
        if decision.changed and is_primary():
            self._log_decision(decision)

    def _log_decision(self, decision: Decision) -> None:
        epoch = decision.update / self.updates_per_epoch
        when = "from the next update" if not self.t_in_epochs else "from the next epoch"
        if decision.action == "decay":
            _logger.info(
                f"AutoDecay: stage {decision.stage - 1} ended at update {decision.update} (epoch {epoch:.2f}, "
                f"{decision.reason}); LR {self._stage_lr(decision.stage - 1):.4g} -> "
                f"{self._stage_lr(decision.stage):.4g} {when}")
            return
        if decision.action == "cooldown":
            end = self.detector.cooldown_end
            _logger.info(
                f"AutoDecay: the last stage ({decision.stage}) ended at update {decision.update} (epoch "
                f"{epoch:.2f}, {decision.reason}); cooldown ({self.detector.cooldown_curve}) from LR "
                f"{self._stage_lr(decision.stage):.4g} to {self.lr_min:g} at every update until update {end} "
                f"(epoch {end / self.updates_per_epoch:.2f})")
            return
        what = "the cooldown" if decision.reason == "cooldown" else f"the last stage ({decision.stage})"
        ending = ""
        if self.end_training:
            ending = ("; training ends at the end of this epoch" if self.end_interval == 1 else
                      f"; training ends at the next epoch boundary that is a multiple of {self.end_interval}")
        _logger.info(f"AutoDecay: {what} ended at update {decision.update} (epoch {epoch:.2f}, "
                     f"{decision.reason}){ending}")

    # -- the end -----------------------------------------------------------------------------
    def _arm_stop(self, t: int) -> None:
        if not self.end_training or self._stop_armed:
            return
        self._stop_armed = True
        last = self.history[-1] if self.history else {}
        at, reason = last.get("update"), last.get("reason")
        what = (f"the cooldown ended at update {at}" if reason == "cooldown" else
                f"the last learning stage ended at update {at} ({reason})")
        message = (f"AutoDecay: training ends after epoch {t - 1} ({t} epochs, {self.num_updates} updates): "
                   f"{what}; no further batch is trained")
        arm_stop(self.optimizer, message, lambda: _logger.info(message) if is_primary() else None)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """JSON-able: the detector, the LR bookkeeping, the decoder and any losses not yet observed."""
        return {
            "version": ENTRY_VERSION,
            "num_updates": self.num_updates,
            "updates_per_epoch": self.updates_per_epoch,
            "t_in_epochs": self.t_in_epochs,
            "decay_rate": self.decay_rate,
            "lr_min": self.lr_min,
            "warmup_t": self.warmup_t,
            "warmup_lr_init": self.warmup_lr_init,
            "base_values": list(self.base_values),
            **self.decoder.state_dict(),
            "pending_losses": self.losses.state_dict(),
            "detector": self.detector.state_dict(),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a state of this release or of 0.1.0. Everything is checked first; a StateError (a
        ValueError) names the bad key or the flag that differs, and then nothing has changed."""
        state = migrate_entry(state_dict)
        check_entry(state, len(self.optimizer.param_groups))
        check_same_run(state, self)
        try:
            self.detector.load_state_dict(adopt_evaluation_settings(state["detector"], self.detector))
        except StateError as error:
            raise StateError(f"{error} (in the saved state's 'detector'{settings_hint(error)})") from None
        self.num_updates = state["num_updates"]
        self.decoder.load_state_dict(state)
        self.losses.load_state_dict(state["pending_losses"])
        self.base_values = [float(v) for v in state["base_values"]]
        self._set_warmup_steps()
        t = self.num_updates // self.updates_per_epoch if self.t_in_epochs else self.num_updates
        self.update_groups(self._get_lr(t))

    def _resume(self, n: int) -> None:
        if n % self.updates_per_epoch:
            raise ValueError(
                f"AutoDecay: cannot start at update {n}, inside epoch {n // self.updates_per_epoch}: "
                "it resumes at epoch boundaries only")
        t = n // self.updates_per_epoch
        if not self.resume_from and not self.state_file:
            raise ValueError(
                f"AutoDecay: training starts at epoch {t} but no saved AutoDecay state was given: resume "
                f"from a checkpoint of an autodecay run (train.py --resume CHECKPOINT; {STATE_FILE} must "
                "be next to it), or call load_state_dict() before the first step")
        path = self.state_file
        if not path:
            folder = self.resume_from if os.path.isdir(self.resume_from) else os.path.dirname(self.resume_from)
            path = os.path.join(folder or ".", STATE_FILE)
        if not os.path.exists(path):
            raise ValueError(f"AutoDecay: cannot resume at epoch {t}: {path} does not exist. {WHAT_IT_IS} "
                             f"{what_to_do(t)}.")
        entry = find_entry(path, t, self.optimizer.param_groups[0].get(ENTRY_TAG))
        if entry["state"].get("num_updates") != n:
            raise StateError(f"AutoDecay: {path}, entry for epoch {t}: 'num_updates' must be {n}, "
                             f"got {entry['state'].get('num_updates')!r}")
        try:
            self.load_state_dict(entry["state"])
        except StateError as error:
            raise StateError(f"{error} (in {path}, the entry for epoch {t})") from None
        if is_primary():
            _logger.info(
                f"AutoDecay: resumed at epoch {t} (update {n}) from {path}: stage {self.stage}, "
                f"finished {self.finished}, LR {[g['lr'] for g in self.optimizer.param_groups]}")
        if self.finished:
            self._arm_stop(t)

    def _save_state(self, t: int, again: bool = False) -> None:
        """The entry for ``t`` epochs; ``again``: rewrite the one added for them (after their evaluation)."""
        if not self.state_dir or not is_primary():
            return
        if self._file is None:
            self._file = StateFile(self.state_dir)
        group = self.optimizer.param_groups[0]
        if not (again and self._file.replace(group.get(ENTRY_TAG), t, self.state_dict())):
            group[ENTRY_TAG] = self._file.add(t, self.state_dict())
