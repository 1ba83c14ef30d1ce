"""AutoDecay for the Transformers `Trainer`: ``Trainer(..., callbacks=[AutoDecayCallback()])``.

How it works
------------
* **Signal.** The Trainer reports the training loss to callbacks only through ``on_log``: ``logs["loss"]``
  is the mean of the per-update losses since the previous loss log, already averaged over processes, so
  every rank sees the same value. The callback feeds it to the :class:`~timm_autodecay.StageDetector` with
  ``count`` = the steps since the detector's previous observation. No extra device sync is added.
  The detector needs at least ``min_points`` (8) loss logs per window; at train start the callback warns,
  with the values to set, when ``logging_steps`` is too coarse for that.
* **Schedule.** The Trainer's scheduler is a ``LambdaLR`` (``lr = base_lr * lambda(step)``). A decay
  multiplies its ``base_lrs`` by ``decay_rate`` (and the LR of the next step at once), so the Trainer's own
  schedule keeps running underneath and the logged ``learning_rate`` is the LR used for that step.
  ``constant`` / ``constant_with_warmup`` is the natural pairing (warmup, then AutoDecay's stages).
  With ``linear`` / ``cosine`` the two multiply: the LR follows the annealing curve *and* drops by
  ``decay_rate`` at each stage end. Other schedulers (``reduce_lr_on_plateau``, DeepSpeed's) are refused.
* **Budget.** ``total_updates`` defaults to the Trainer's ``max_steps``, ``warmup_updates`` to its warmup
  steps, ``num_stages`` to 3: no stage outlasts ``(max_steps - warmup) / num_stages`` steps.
* **Finish.** When the last stage ends, ``should_training_stop`` and ``should_save`` are set: training
  ends at that step with a checkpoint (unless ``save_strategy="no"``).
* **Logs.** ``autodecay/stage`` (the stage the logged step ran in, like ``learning_rate``) is added to
  every loss log; ``autodecay/decision`` and ``autodecay/reason`` when a stage ends (the decay applies
  from the next step). They reach ``trainer.state.log_history`` (and ``trainer_state.json``) and the
  callbacks after this one (the progress bar / printer); reporting integrations (TensorBoard, W&B) run
  before user callbacks, they see the decays through ``learning_rate``.
* **Resume.** The detector's state is saved with every checkpoint in ``trainer_state.json``
  (``stateful_callbacks``). On ``trainer.train(resume_from_checkpoint=...)`` the callback restores it
  itself in ``on_train_begin``, whether or not ``restore_callback_states_from_checkpoint`` is set (when
  it is, the Trainer replaces this callback object by a copy built from the checkpoint: look it up with
  :func:`find_autodecay_callback`). The checkpoint's settings win over the current ones (with a warning),
  so a resumed run continues exactly as the uninterrupted one. The Trainer forgets the losses since its
  last log when it resumes, so the callback asks for a loss log at every checkpoint step (one extra log
  per checkpoint when ``save_steps`` is not a multiple of ``logging_steps``).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from timm_autodecay.detector import SETTINGS, Decision, StageDetector
from timm_autodecay.torch_scheduler import check_decay_rate

logger = logging.get_logger(__name__)

__all__ = ["AutoDecayCallback", "find_autodecay_callback"]

def find_autodecay_callback(trainer) -> "AutoDecayCallback":
    """The trainer's AutoDecayCallback (after a resume with ``restore_callback_states_from_checkpoint``
    the Trainer holds a new object, not the one passed in ``callbacks``)."""
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AutoDecayCallback)]
    if len(found) != 1:
        raise ValueError(f"expected one AutoDecayCallback in the trainer, found {len(found)}")
    return found[0]


class AutoDecayCallback(TrainerCallback, ExportableState):
    """Decays the learning rate by ``decay_rate`` when the training loss shows that a learning stage has
    ended, and stops training (with a checkpoint) when the last stage has.

    Args:
        decay_rate: factor applied to the learning rate at each stage end, in (0, 1).
        **settings: detector settings (``timm_autodecay.detector.SETTINGS``, e.g. ``num_stages``,
            ``window``, ``significance``); ``total_updates`` defaults to the Trainer's ``max_steps`` and
            ``warmup_updates`` to its warmup steps. Pass nothing to use the defaults.
    """

    def __init__(self, decay_rate: float = 0.1, **settings: Any):
        self.decay_rate = check_decay_rate(decay_rate)
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown AutoDecay setting(s) {unknown}; known: {sorted(SETTINGS)}")
        StageDetector.from_settings(settings)  # validates every value now, naming the bad one
        self.settings: Dict[str, Any] = dict(settings)
        self.detector: Optional[StageDetector] = None
        self.last_decision: Optional[Decision] = None
        self._pending_state: Optional[Dict[str, Any]] = None
        self._scheduler = None
        self._optimizer = None

    # -- ExportableState ----------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "args": {"decay_rate": self.decay_rate, **self.settings},
            "attributes": {"detector_state": self.detector_state},
        }

    @property
    def detector_state(self) -> Optional[Dict[str, Any]]:
        """The detector's state (JSON-able); None before training starts."""
        if self.detector is not None:
            return self.detector.state_dict()
        return self._pending_state

    @detector_state.setter
    def detector_state(self, value: Optional[Dict[str, Any]]) -> None:
        # The Trainer's restore_callback_states_from_checkpoint sets this on a fresh object; the
        # detector itself is built in on_train_begin, when the run's shape is known.
        self._pending_state = value

    # -- what users look at -------------------------------------------------------------------
    @property
    def stage(self) -> int:
        return self.detector.stage if self.detector is not None else 0

    @property
    def finished(self) -> bool:
        return self.detector is not None and self.detector.finished

    @property
    def history(self) -> List[Dict[str, Any]]:
        return self.detector.history if self.detector is not None else []

    # -- training begins: build or restore the detector, check the setup ------------------------
    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        key = type(self).__name__  # how the Trainer files ExportableState callbacks
        if isinstance(state.stateful_callbacks.get(key), list):
            raise ValueError("more than one AutoDecayCallback in the Trainer's callbacks; pass one")
        self._check_scheduler(args, lr_scheduler)
        self._scheduler, self._optimizer = lr_scheduler, optimizer
        self.last_decision = None

        settings = {
            "total_updates": state.max_steps,
            "warmup_updates": args.get_warmup_steps(state.max_steps),
            **self.settings,
        }
        saved = self._saved_state(state)
        if saved is not None:
            self._restore(saved, settings, state)
        elif state.global_step > 0:
            # A checkpoint written without AutoDecay: start it now, with the remaining budget.
            warnings.warn(
                f"AutoDecayCallback: the checkpoint at step {state.global_step} holds no AutoDecay state; "
                "AutoDecay starts at this step and splits the remaining steps into its stages",
                UserWarning,
            )
            settings["warmup_updates"] = max(settings["warmup_updates"], state.global_step)
            self.detector = StageDetector.from_settings(settings)
        else:
            self.detector = StageDetector.from_settings(settings)
        self._pending_state = None
        # Trainer._save_checkpoint indexes stateful_callbacks by class name: a checkpoint from a run
        # without this callback lacks the key and would fail at the next save.
        state.stateful_callbacks.setdefault(key, self.state())

        self._apply_stage_lr()
        self._check_logging(args, state)
        if self.detector.finished:
            warnings.warn(
                f"AutoDecayCallback: the last stage already ended at step {self.detector.update}; "
                "training continues at the final learning rate without further decisions",
                UserWarning,
            )

    def _saved_state(self, state) -> Optional[Dict[str, Any]]:
        """The detector state to continue from: set by the Trainer's callback restore, or read from the
        checkpoint's trainer_state.json (``state.stateful_callbacks``) when resuming."""
        if self._pending_state is not None:
            return {"decay_rate": self.decay_rate, "detector": self._pending_state}
        if state.global_step <= 0:
            return None
        stored = state.stateful_callbacks.get(type(self).__name__)
        if not isinstance(stored, dict):
            return None
        detector_state = stored.get("attributes", {}).get("detector_state")
        if detector_state is None:
            return None
        return {"decay_rate": stored.get("args", {}).get("decay_rate", self.decay_rate), "detector": detector_state}

    def _restore(self, saved: Dict[str, Any], settings: Dict[str, Any], state) -> None:
        checkpoint_settings = dict(saved["detector"]["settings"])
        current = StageDetector.from_settings(settings).settings()
        differ = {k: (checkpoint_settings.get(k), v) for k, v in current.items() if checkpoint_settings.get(k) != v}
        if saved["decay_rate"] != self.decay_rate:
            differ["decay_rate"] = (saved["decay_rate"], self.decay_rate)
        if differ:
            listed = ", ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in sorted(differ.items()))
            warnings.warn(
                f"AutoDecayCallback: the checkpoint's settings differ from this run's ({listed}); the "
                "checkpoint's are kept so the run continues as it started",
                UserWarning,
            )
        self.decay_rate = check_decay_rate(saved["decay_rate"])
        detector = StageDetector.from_settings(checkpoint_settings)
        detector.load_state_dict(saved["detector"])
        if detector.update > state.global_step:
            raise ValueError(
                f"AutoDecay state from update {detector.update} does not belong to a checkpoint at step "
                f"{state.global_step}"
            )
        self.detector = detector

    def _check_scheduler(self, args, lr_scheduler) -> None:
        if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            name = type(lr_scheduler).__name__
            raise ValueError(
                f"AutoDecayCallback composes with LambdaLR schedules (lr_scheduler_type 'constant', "
                f"'constant_with_warmup', 'linear', 'cosine', ...), got lr_scheduler_type="
                f"{str(getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type))!r} ({name})"
            )
        if not all("initial_lr" in group for group in lr_scheduler.optimizer.param_groups):
            raise ValueError("AutoDecayCallback: the optimizer's param groups lack 'initial_lr' (set by LRScheduler)")

    def _check_logging(self, args, state) -> None:
        strategy = getattr(args.logging_strategy, "value", args.logging_strategy)
        if strategy == "no":
            raise ValueError(
                "AutoDecayCallback reads the training loss from the Trainer's logs, but logging_strategy='no'; "
                "set logging_strategy='steps' and logging_steps"
            )
        detector = self.detector
        if strategy == "epoch":
            interval = math.ceil(state.max_steps / max(state.num_train_epochs, 1))
            what = f"logging_strategy='epoch' ({interval} steps per log)"
        else:
            interval = state.logging_steps
            what = f"logging_steps={interval}"
        per_window = detector.window / interval
        if per_window < detector.min_points:
            needed = detector.window // detector.min_points
            stretched = detector.min_points * interval
            consequence = f"it stretches its window to {stretched} steps, so stages end later"
            if detector.stage_budget is not None and stretched >= detector.stage_budget - detector.patience:
                consequence = (
                    f"a stretched window ({stretched} steps) does not fit in a stage's share of the budget "
                    f"({detector.stage_budget:g} steps): stages end only at the budget, like StepDecay"
                )
            if detector.window >= detector.min_points:
                advice = (f"Set logging_steps <= {needed} in TrainingArguments (logging_strategy='steps'), "
                          "or pass window=... to AutoDecayCallback")
            else:
                advice = (f"The window is shorter than {detector.min_points} steps, too short even when logging "
                          f"every step: pass window=... (>= {detector.min_points} x logging_steps) to "
                          "AutoDecayCallback, or train longer")
            if state.is_local_process_zero:
                warnings.warn(
                    f"AutoDecayCallback: {what} gives {per_window:.2g} loss logs per AutoDecay window of "
                    f"{detector.window} steps; the detector needs >= {detector.min_points} (min_points), "
                    f"{consequence}. {advice}",
                    UserWarning,
                )

    # -- the learning rate ------------------------------------------------------------------------
    def _apply_stage_lr(self) -> None:
        """base_lrs = initial LR x decay_rate ** stage, and the next step's LR with it. Idempotent: the
        same on a fresh start, after scheduler.pt was loaded, or after a decay."""
        scheduler = self._scheduler
        factor = self.decay_rate ** self.detector.stage
        groups = scheduler.optimizer.param_groups
        scheduler.base_lrs = [group["initial_lr"] * factor for group in groups]
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(groups, lrs):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        scheduler._last_lr = [group["lr"] for group in groups]

    # -- the signal --------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        return self._log_before_save(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._log_before_save(control)

    def _log_before_save(self, control):
        # A checkpoint then always follows a loss log: the Trainer drops unlogged losses when it resumes,
        # so without this a run resumed from a checkpoint between logs would see a different loss.
        # (DefaultFlowCallback, first in the Trainer's list, has already decided should_save.)
        if control.should_save and self.detector is not None and not self.detector.finished:
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.detector is None or not logs or "loss" not in logs:
            return control  # eval logs, the closing summary (train_loss), or before training
        stage = self.detector.stage
        if self.detector.finished:
            self._annotate(state, logs, {"autodecay/stage": stage})
            return control
        count = state.global_step - self.detector.update
        if count <= 0:
            return control
        decision = self.detector.observe(logs["loss"], count)
        self.last_decision = decision
        extra: Dict[str, Any] = {"autodecay/stage": stage}
        if decision.changed:
            extra["autodecay/decision"] = decision.action
            extra["autodecay/reason"] = decision.reason
        self._annotate(state, logs, extra)
        if decision.action == "decay":
            old = self._scheduler.get_last_lr()[0]
            self._apply_stage_lr()
            logger.info(
                f"AutoDecay: stage {stage} ended at step {decision.update} ({decision.reason}); "
                f"learning rate {old:.4g} -> {self._scheduler.get_last_lr()[0]:.4g}"
            )
        elif decision.action == "finish":
            logger.info(f"AutoDecay: last stage ended at step {decision.update} ({decision.reason}); stopping")
            control.should_training_stop = True
            if getattr(args.save_strategy, "value", args.save_strategy) != "no":
                control.should_save = True
        return control

    @staticmethod
    def _annotate(state, logs, extra: Dict[str, Any]) -> None:
        logs.update(extra)
        # Trainer.log appended a copy of logs to log_history just before on_log.
        last = state.log_history[-1] if state.log_history else {}
        if last.get("step") == state.global_step and "loss" in last:
            last.update(extra)
