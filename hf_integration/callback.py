"""AutoDecay for the Transformers `Trainer`: ``Trainer(..., callbacks=[AutoDecayCallback()])``.

How it works
------------
* **Signal.** The Trainer reports the training loss to callbacks only through ``on_log``: ``logs["loss"]``
  is the mean of the per-update losses since the previous loss log, already averaged over processes, so
  every rank sees the same value. The callback feeds it to the :class:`~timm_autodecay.StageDetector` with
  ``count`` = the steps since the detector's previous observation. No extra device sync is added.
  The detector needs at least ``min_points`` (8) loss logs per window; at train start the callback warns,
  with the values to set, when ``logging_steps`` is too coarse for that. A loss log is also asked for at
  every budget boundary and at the end of a cooldown, so they hold exactly under any logging interval.
* **Non-finite losses.** A log that may hold non-finite losses (``hf_integration.loss_logs``) is left out
  of the detector's input; at a step whose gradient was non-finite no decision is taken and no checkpoint
  is written; two logs in a row holding only non-finite losses stop the run with ``FloatingPointError``.
* **Schedule.** The Trainer's scheduler is a ``LambdaLR`` (``lr = base_lr * lambda(step)``). AutoDecay sets
  its ``base_lrs`` (``hf_integration.lambda_lr``): a decay multiplies them by ``decay_rate``, and with
  ``decay_shape="cooldown"`` the last stage's end starts a cooldown during which they follow the detector's
  ``lr_at`` at every step, down to ``min_lr`` (default 0). The Trainer's lambda keeps running underneath
  and the logged ``learning_rate`` is the LR used for that step. ``constant_with_warmup`` / ``constant`` is
  the natural pairing (warmup, then AutoDecay's stages); with ``linear`` / ``cosine`` the two multiply.
  Other schedulers (``reduce_lr_on_plateau``, a ``OneCycleLR`` of your own, DeepSpeed's) are refused.
* **Budget.** ``total_updates`` defaults to the Trainer's ``max_steps``, ``warmup_updates`` to its warmup
  steps: no stage outlasts its share of the steps after warmup (the cooldown's share set aside first).
* **Finish.** When the last stage (or its cooldown) ends, ``should_training_stop`` and ``should_save`` are
  set: training ends at that step with a checkpoint (unless ``save_strategy="no"``); with the evaluation
  signal on, ``should_evaluate`` too, so that ``load_best_model_at_end`` weighs the final model.
* **Logs.** ``autodecay/stage`` (the stage the logged step ran in, like ``learning_rate``) is added to
  every loss log; ``autodecay/decision`` and ``autodecay/reason`` when a stage ends (the decay applies
  from the next step); ``autodecay/ignored`` on a log left out. They reach ``trainer.state.log_history``
  (and ``trainer_state.json``) and the callbacks after this one (the progress bar / printer); reporting
  integrations (TensorBoard, W&B) run before user callbacks, they see the decays through ``learning_rate``.
* **Evaluations.** The metric the Trainer keeps the best model by also ends the stable phase once it has
  stopped improving (``timm_autodecay.evaluations``): ``metric_for_best_model`` (``eval_`` prefixed as the
  Trainer does), its direction ``greater_is_better``. It is on by default when ``eval_strategy`` and
  ``metric_for_best_model`` are both set (``load_best_model_at_end`` sets the metric to ``loss``);
  ``eval_signal=True`` asks for it elsewhere (``eval_loss`` when no metric is named), ``False`` turns it
  off (``hf_integration.eval_signal``). A loss log is asked for at every evaluation step, so the detector
  judges each evaluation at its own step; the value is averaged over processes (they agree already: the
  Trainer gathers its evaluation), so every rank decides alike. A decision is applied as a loss decision is
  and is added to the evaluation's log entry. Without ``load_best_model_at_end`` the final model may be past
  the best evaluation (a warning at train start says so).
* **Resume.** The detector's state is saved with every checkpoint in its ``trainer_state.json``
  (``stateful_callbacks``), so each checkpoint resumes on its own whatever was resumed before. On
  ``trainer.train(resume_from_checkpoint=...)`` the callback restores it itself in ``on_train_begin``,
  whether or not ``restore_callback_states_from_checkpoint`` is set (when it is, the Trainer replaces this
  callback object by a copy built from the checkpoint: look it up with :func:`find_autodecay_callback`).
  The entry is checked whole first (``hf_integration.saved_entry``; entries of release 0.1.0 are migrated).
  Settings that differ from the checkpoint's are an error naming each, as in every face (a resumed run
  continues exactly as the uninterrupted one, or not at all); whether evaluations are used is this run's
  choice (``eval_signal`` with ``eval_strategy`` and ``metric_for_best_model``). The Trainer forgets the
  losses since its last log when it resumes, so the callback asks for a loss log at every checkpoint step.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from timm_autodecay.detector import SETTINGS, Decision, StageDetector, check_float
from timm_autodecay.lr_rules import floor_share
from timm_autodecay.ranks import mean_over_ranks
from timm_autodecay.settings import check_known
from timm_autodecay.state import EVALUATION_SETTINGS, StateError
from timm_autodecay.torch_scheduler import check_decay_rate

from .eval_signal import (
    EvalSignal, check_eval_signal, evaluation_settings, read_metric, resolve_eval_signal,
    unused_eval_settings,
)
from .lambda_lr import adopt_new_groups, initial_lrs, set_base_lrs
from .loss_logs import DivergenceWatch, read_loss_log
from .saved_entry import SavedEntry, read_saved_entry
from .trainer_internals import annotate_logged_entry
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
    ended, and stops training (with a checkpoint) when the last stage has, or when the cooldown that
    ``decay_shape="cooldown"`` starts there has.

    Args:
        decay_rate: factor applied to the learning rate at each stage end (before the last), in (0, 1).
        min_lr: the floor a cooldown anneals to (``decay_shape="cooldown"`` only): the highest group's, every other
            group anneals to the same share of its own LR (``timm_autodecay.lr_rules``).
        eval_signal: whether evaluation results also end the stable phase. None (default): when
            ``eval_strategy`` and ``metric_for_best_model`` are set; True: also without
            ``metric_for_best_model`` (then ``eval_loss``; an error if ``eval_strategy="no"``); False: never.
            Their direction is ``greater_is_better``; ``eval_patience`` (3) evaluations without a new best end it.
        **settings: detector settings (``timm_autodecay.detector.SETTINGS``, e.g. ``decay_shape``,
            ``num_stages``, ``window``); ``total_updates`` defaults to the Trainer's ``max_steps`` and
            ``warmup_updates`` to its warmup steps. Pass nothing to use the defaults.
    """

    def __init__(self, decay_rate: float = 0.1, min_lr: float = 0.0, eval_signal: Optional[bool] = None,
                 **settings: Any):
        self.decay_rate = check_decay_rate(decay_rate)
        self.min_lr = check_float("min_lr", min_lr, 0.0)
        self.eval_signal = check_eval_signal(eval_signal)
        check_known(settings, SETTINGS)
        shape = StageDetector.from_settings(settings).decay_shape  # validates every value now, naming the bad one
        if self.min_lr and shape != "cooldown":
            raise ValueError(f"min_lr={min_lr!r} is the floor a cooldown anneals to; it needs "
                             "decay_shape='cooldown' (the step shape multiplies by decay_rate)")
        self.settings: Dict[str, Any] = settings
        self.detector: Optional[StageDetector] = None
        self.last_decision: Optional[Decision] = None
        self._pending_state: Optional[Dict[str, Any]] = None
        self._scheduler = None
        self._divergence = DivergenceWatch()
        self._eval: Optional[EvalSignal] = None  # the signal in use, resolved at train start
        self._floor_share = 0.0  # min_lr as a share of each group's initial LR, set at train start
        self._training = False
        self._missing_metric_said = False

    # -- ExportableState ----------------------------------------------------------------------
    def state(self) -> dict:
        args = {"decay_rate": self.decay_rate, "min_lr": self.min_lr, **self.settings}
        if self.eval_signal is not None:
            args["eval_signal"] = self.eval_signal
        return {"args": args, "attributes": {"detector_state": self.detector_state}}

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

    @property
    def eval_metric(self) -> Optional[str]:
        """The evaluation metric that also ends stages (e.g. ``eval_accuracy``); None when that signal is off.
        Set at train start."""
        return self._eval.metric if self._eval is not None else None

    @property
    def best_eval(self) -> Optional[Dict[str, float]]:
        """``{"value", "update"}``: the run's best evaluation of ``eval_metric`` and its step (None before one)."""
        return self.detector.best_eval if self.detector is not None else None

    # -- training begins: build or restore the detector, check the setup ------------------------
    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        key = type(self).__name__  # how the Trainer files ExportableState callbacks
        if isinstance(state.stateful_callbacks.get(key), list):
            raise ValueError("more than one AutoDecayCallback in the Trainer's callbacks; pass one")
        check_scheduler(args, lr_scheduler)
        self._scheduler = lr_scheduler
        self.last_decision = None
        self._divergence = DivergenceWatch()
        self._missing_metric_said = False

        settings = {"total_updates": state.max_steps, "warmup_updates": args.get_warmup_steps(state.max_steps),
                    **self.settings}
        self._eval = resolve_eval_signal(self.eval_signal, args, self.settings)
        if self._eval is not None:
            settings["eval_mode"] = self._eval.mode
        saved = self._saved_entry(state, evaluation_settings(settings))
        if saved is not None:
            self._restore(saved, settings, state.global_step, args.restore_callback_states_from_checkpoint)
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
        self._floor_share = floor_share(self.min_lr, initial_lrs(lr_scheduler))
        # Trainer._save_checkpoint indexes stateful_callbacks by class name: a checkpoint from a run
        # without this callback lacks the key and would fail at the next save.
        state.stateful_callbacks.setdefault(key, self.state())

        self._apply_lr(state.global_step)
        check_logging(args, state, self.detector)
        self._training = True
        if state.is_local_process_zero:
            self._explain_eval_signal(args)
        if self.detector.finished:  # resumed from the checkpoint the run finished at: nothing is left to train
            warnings.warn(
                f"AutoDecayCallback: this run already finished at step {self.detector.update} (its last stage and "
                "cooldown had ended); training stops, the checkpoint is the final model",
                UserWarning,
                stacklevel=2,
            )
            control.should_training_stop = True

    def _explain_eval_signal(self, args) -> None:
        """At train start: where the final model may be past the best evaluation, or eval settings go unused."""
        if self._eval is not None and not args.load_best_model_at_end:
            warnings.warn(
                f"AutoDecayCallback: {self._eval.metric} ends the stable phase once it stops improving, and the "
                "learning rate falls after it: the final model may be past the best evaluation (the metric can "
                "fall while the training loss does). Set load_best_model_at_end=True in TrainingArguments (with "
                "save_strategy matching eval_strategy) to end with the best checkpoint's model; "
                "callback.best_eval says where the best evaluation was",
                UserWarning,
                stacklevel=3,
            )
        unused = unused_eval_settings(self.settings)
        if self._eval is None and unused:
            why = ("eval_signal=False" if self.eval_signal is False
                   else "it is on with eval_strategy and metric_for_best_model set, or with eval_signal=True")
            warnings.warn(f"AutoDecayCallback: {unused} given, but the evaluation signal is off ({why})",
                          UserWarning, stacklevel=3)

    def _saved_entry(self, state, eval_settings: Dict[str, Any]) -> Optional[SavedEntry]:
        """The state to continue from, checked whole: the checkpoint's trainer_state.json entry when
        resuming, else one the Trainer's callback restore (or ``from_state``) set on this object."""
        stored = state.stateful_callbacks.get(type(self).__name__) if state.global_step > 0 else None
        if stored is None and self._pending_state is not None:
            stored = {"args": {"decay_rate": self.decay_rate, "min_lr": self.min_lr, "eval_signal": self.eval_signal},
                      "attributes": {"detector_state": self._pending_state}}
        if stored is None:
            return None
        return read_saved_entry(stored, state.global_step, eval_settings)

    def _restore(self, saved: SavedEntry, settings: Dict[str, Any], step: int, rebuilt: bool) -> None:
        """The checkpoint's schedule, if this run asks for the same one: settings that differ are an error
        naming each (the one resume policy of every face: a schedule never changes silently at a resume).
        ``rebuilt``: the Trainer built this callback from the checkpoint's own arguments (its
        ``restore_callback_states_from_checkpoint``), so only the budget, from ``TrainingArguments``, is this run's."""
        kept = saved.detector.settings()
        current = StageDetector.from_settings(settings).settings()
        ignored = set(EVALUATION_SETTINGS) if self._eval is None else set()  # unused by this run
        differ = {k: (kept.get(k), v) for k, v in current.items() if kept.get(k) != v and k not in ignored}
        for name in ("decay_rate", "min_lr"):
            if getattr(saved, name) != getattr(self, name):
                differ[name] = (getattr(saved, name), getattr(self, name))
        if rebuilt:  # defaults of the release that wrote it may differ from this one's: the checkpoint's hold
            differ = {k: v for k, v in differ.items() if k in ("total_updates", "warmup_updates")}
        if differ:
            listed = ", ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in sorted(differ.items()))
            hint = ("; the default shape is 'cooldown' since release 0.2.0: pass decay_shape='step' to resume a "
                    "step-shaped run" if differ.get("decay_shape", (None,))[0] == "step" else "")
            raise StateError(
                f"AutoDecayCallback cannot resume from checkpoint-{step}: its schedule's settings differ from this "
                f"run's ({listed}). Resume with the checkpoint's settings (AutoDecayCallback arguments; "
                "total_updates comes from max_steps / num_train_epochs, warmup_updates from warmup_steps / "
                "warmup_ratio), or delete the AutoDecayCallback entry from the checkpoint's trainer_state.json "
                f"stateful_callbacks to start a new schedule from its weights{hint}")
        self.decay_rate, self.min_lr, self.detector = saved.decay_rate, saved.min_lr, saved.detector

    # -- the learning rate ------------------------------------------------------------------------
    def _apply_lr(self, step: int) -> None:
        """base_lrs = each group's rate after ``step`` updates (initial LR x decay_rate ** stage, or the
        cooldown's), and the next step's LR with it. Idempotent: the same on a fresh start, after
        scheduler.pt was loaded, after a decay, or at any step of a cooldown."""
        scheduler = self._scheduler
        factor = self._lr_factor(step)
        adopt_new_groups(scheduler, factor)
        set_base_lrs(scheduler, [lr * factor for lr in initial_lrs(scheduler)])

    def _lr_factor(self, step: int) -> float:
        """Every group's LR after ``step`` updates as a share of its initial LR (``timm_autodecay.lr_rules``)."""
        return self.detector.lr_at(step, 1.0, self.decay_rate, self._floor_share)

    # -- every step: new param groups, the cooldown's LR, a loss log wherever the detector must look ---
    def on_optimizer_step(self, args, state, control, **kwargs):
        # between optimizer.step() and the scheduler's step, which fails on a group it does not know
        if self.detector is not None:
            adopt_new_groups(self._scheduler, self._lr_factor(state.global_step))
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.detector is not None and self.detector.in_cooldown and not self.detector.finished:
            self._apply_lr(state.global_step)  # after the scheduler's step: the next step's LR
        return self._ask_for_log(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._ask_for_log(state, control)

    def _ask_for_log(self, state, control):
        """A loss log at every checkpoint (the Trainer drops unlogged losses when it resumes, so a run
        resumed between logs would see a different loss), and where time alone ends a stage or the
        cooldown (so they end there exactly, whatever the logging interval). DefaultFlowCallback, first
        in the Trainer's list, has already decided should_save and should_log."""
        if self.detector is None or self.detector.finished:
            return control
        if control.should_save or state.global_step == self.detector.next_boundary:
            control.should_log = True
        if control.should_evaluate and self._eval is not None:  # the detector's clock at the evaluation's step
            control.should_log = True
        return control

    # -- the signal --------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.detector is None or not logs or "loss" not in logs:
            return control  # eval logs, the closing summary (train_loss), or before training
        extra: Dict[str, Any] = {"autodecay/stage": self.detector.stage}
        count = state.global_step - self.detector.update
        if self.detector.finished or count <= 0:
            self._annotate(state, logs, extra)
            return control
        log = read_loss_log(logs)
        self._divergence.update(state.global_step, log)  # raises once the run has diverged
        if log.trusted:
            decision = self.detector.observe(log.loss, count)
        else:
            self._leave_out(state, control, log, extra)
            if log.weights_suspect:  # no decision while the weights may be NaN: the steps wait for the next log
                self._annotate(state, logs, extra)
                return control
            decision = self.detector.skip(count)  # the run recovered: the clock runs on, the loss is unknown
        self.last_decision = decision
        if decision.changed:
            extra["autodecay/decision"] = decision.action
            extra["autodecay/reason"] = decision.reason
        self._annotate(state, logs, extra)
        self._act(args, control, decision, extra["autodecay/stage"])
        if decision.action == "finish" and self._eval is not None:
            control.should_evaluate = True  # the final model is judged too, so load_best_model_at_end weighs it
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """The Trainer evaluated (after its loss log at this step, before its checkpoint): the metric joins
        the detector's input. Every rank runs the same branches (their detectors hold the same state) and
        evaluates together, so the collective in ``mean_over_ranks`` meets on every rank."""
        if self.detector is None or self._eval is None or not self._training:
            return control  # an evaluation outside training (trainer.evaluate()), or the signal is off
        value = mean_over_ranks(read_metric(self._eval, metrics))
        if value is None:
            if not self._missing_metric_said and state.is_local_process_zero:
                logger.warning(f"AutoDecay: the evaluation at step {state.global_step} has no {self._eval.metric} "
                               f"(its metrics: {sorted(metrics or {})}); evaluations without it are not used")
            self._missing_metric_said = True
            return control
        stage = self.detector.stage
        decision = self.last_decision = self.detector.observe_eval(value)
        if decision.changed:
            extra = {"autodecay/decision": decision.action, "autodecay/reason": decision.reason}
            annotate_logged_entry(state, self._eval.metric, extra)  # the evaluation's entry
            self._act(args, control, decision, stage)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False  # trainer.evaluate() after training leaves the detector alone
        return control

    def _act(self, args, control, decision: Decision, stage: int) -> None:
        if decision.action in ("decay", "cooldown"):
            old = self._scheduler.get_last_lr()[0]
            self._apply_lr(decision.update)
            what = (f"learning rate {old:.4g} -> {self._scheduler.get_last_lr()[0]:.4g}" if decision.action == "decay"
                    else f"cooling down to {self.min_lr:g} over {self.detector.cooldown_updates} steps")
            logger.info(f"AutoDecay: stage {stage} ended at step {decision.update} ({decision.reason}); {what}")
        elif decision.action == "finish":
            best = self.best_eval if self._eval is not None else None
            said = f"; the best {self._eval.metric} was {best['value']:.6g} at step {best['update']}" if best else ""
            logger.info(f"AutoDecay: the run ended at step {decision.update} ({decision.reason}); stopping{said}")
            control.should_training_stop = True
            if setting_name(args.save_strategy) != "no":
                control.should_save = True

    def _leave_out(self, state, control, log, extra) -> None:
        """A log whose loss may hold non-finite losses or the NaN filter's substitutes is not observed; no
        checkpoint is written at its step when its last gradient was non-finite (the weights may be NaN)."""
        extra["autodecay/ignored"] = log.describe()
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
        annotate_logged_entry(state, "loss", extra)
