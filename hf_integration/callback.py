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

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from timm_autodecay.detector import SETTINGS, Decision, StageDetector
from timm_autodecay.torch_scheduler import check_decay_rate

from .lambda_lr import adopt_new_groups, initial_lrs, set_base_lrs
from .loss_logs import DivergenceWatch, read_loss_log
from .trainer_setup import check_logging, check_scheduler, setting_name

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
        self._divergence = DivergenceWatch()

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
        check_scheduler(args, lr_scheduler)
        self._scheduler, self._optimizer = lr_scheduler, optimizer
        self.last_decision = None
        self._divergence = DivergenceWatch()

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
                stacklevel=2,
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
        check_logging(args, state, self.detector)
        if self.detector.finished:
            warnings.warn(
                f"AutoDecayCallback: the last stage already ended at step {self.detector.update}; "
                "training continues at the final learning rate without further decisions",
                UserWarning,
                stacklevel=2,
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
                stacklevel=2,
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

    # -- the learning rate ------------------------------------------------------------------------
    def _rate_factor(self) -> float:
        """The current rate relative to each group's initial LR."""
        return self.decay_rate ** self.detector.stage

    def _apply_stage_lr(self) -> None:
        """base_lrs = initial LR x decay_rate ** stage, and the next step's LR with it. Idempotent: the
        same on a fresh start, after scheduler.pt was loaded, or after a decay."""
        scheduler = self._scheduler
        adopt_new_groups(scheduler, self._rate_factor())
        factor = self._rate_factor()
        set_base_lrs(scheduler, [lr * factor for lr in initial_lrs(scheduler)])

    # -- every step: new param groups, and a loss log wherever the detector must look --------------
    def on_optimizer_step(self, args, state, control, **kwargs):
        # between optimizer.step() and the scheduler's step, which fails on a group it does not know
        if self.detector is not None:
            adopt_new_groups(self._scheduler, self._rate_factor())
        return control

    def on_step_end(self, args, state, control, **kwargs):
        return self._ask_for_log(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._ask_for_log(state, control)

    def _ask_for_log(self, state, control):
        """A loss log at every checkpoint (the Trainer drops unlogged losses when it resumes, so a run
        resumed between logs would see a different loss) and at every budget boundary (a stage ends at
        its share of the budget exactly, whatever the logging interval). DefaultFlowCallback, first in
        the Trainer's list, has already decided should_save and should_log."""
        if self.detector is None or self.detector.finished:
            return control
        boundary = self._next_boundary()
        if control.should_save or state.global_step == boundary:
            control.should_log = True
        return control

    def _next_boundary(self) -> Optional[int]:
        """The step at which time alone ends the current stage (its share of the budget), if any."""
        detector = self.detector
        if detector.stage_budget is None:
            return None
        return max(detector.warmup_updates + 1, math.ceil(detector.stage_start + detector.stage_budget - 1e-9))

    # -- the signal --------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.detector is None or not logs or "loss" not in logs:
            return control  # eval logs, the closing summary (train_loss), or before training
        stage = self.detector.stage
        extra: Dict[str, Any] = {"autodecay/stage": stage}
        if self.detector.finished:
            self._annotate(state, logs, extra)
            return control
        count = state.global_step - self.detector.update
        if count <= 0:
            return control
        log = read_loss_log(logs)
        self._divergence.update(state.global_step, log)  # raises once the run has diverged
        if not log.trusted:
            self._leave_out(args, state, control, log, logs, extra)
            return control
        decision = self.detector.observe(log.loss, count)
        self.last_decision = decision
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
            if setting_name(args.save_strategy) != "no":
                control.should_save = True
        return control

    def _leave_out(self, args, state, control, log, logs, extra) -> None:
        """A log whose loss may hold the NaN filter's substitutes: not observed (its steps count with the
        next log), and no checkpoint of possibly non-finite weights."""
        extra["autodecay/ignored"] = log.describe()
        self._annotate(state, logs, extra)
        vetoed = ""
        if log.weights_suspect and control.should_save:
            control.should_save = False
            vetoed = "; no checkpoint is written at this step"
        logger.warning(
            f"AutoDecay: the loss log at step {state.global_step} is left out ({log.describe()}: some training "
            f"losses or the last gradient were non-finite){vetoed}"
        )

    @staticmethod
    def _annotate(state, logs, extra: Dict[str, Any]) -> None:
        logs.update(extra)
        # Trainer.log appended a copy of logs to log_history just before on_log.
        last = state.log_history[-1] if state.log_history else {}
        if last.get("step") == state.global_step and "loss" in last:
            last.update(extra)
