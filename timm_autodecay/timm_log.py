"""What the timm scheduler tells train.py's log, in train.py's terms (epochs, flags, config keys), on the
primary rank: the run it was built for, each decision with the LRs it sets, a resume, the early end.

Kept apart from the scheduler so that the scheduler reads as the schedule; the texts read the scheduler's
public face (its shape, detector and LR rule) and change nothing.
"""
from __future__ import annotations

import logging
from typing import Any

from .timm_keys import PREFIX
from .timm_loop import is_primary

__all__ = ["log_created", "log_decision", "log_resumed", "log_stop", "stop_message"]

_logger = logging.getLogger("timm_autodecay")


def _stage_lr(scheduler: Any, stage: int) -> float:
    """Mean over param groups of a stage's LR (before ``lr_scale``)."""
    values = scheduler._get_lr(scheduler.warmup_t, stage)
    return sum(values) / len(values)


def log_decision(scheduler: Any, decision: Any) -> None:
    upe, detector = scheduler.updates_per_epoch, scheduler.detector
    epoch = decision.update / upe
    if decision.action == "decay":
        when = "from the next update" if not scheduler.t_in_epochs else "from the next epoch"
        _logger.info(
            f"AutoDecay: stage {decision.stage - 1} ended at update {decision.update} (epoch {epoch:.2f}, "
            f"{decision.reason}); LR {_stage_lr(scheduler, decision.stage - 1):.4g} -> "
            f"{_stage_lr(scheduler, decision.stage):.4g} {when}")
        return
    if decision.action == "cooldown":
        end = detector.cooldown_end
        _logger.info(
            f"AutoDecay: the last stage ({decision.stage}) ended at update {decision.update} (epoch "
            f"{epoch:.2f}, {decision.reason}); cooldown ({detector.cooldown_curve}) from LR "
            f"{_stage_lr(scheduler, decision.stage):.4g} to {scheduler.lr_min:g} at every update until update "
            f"{end} (epoch {end / upe:.2f})")
        return
    what = "the cooldown" if decision.reason == "cooldown" else f"the last stage ({decision.stage})"
    ending = ""
    if scheduler.end_training:
        interval = scheduler.shape.end_interval
        ending = ("; training ends at the end of this epoch" if interval == 1 else
                  f"; training ends at the next epoch boundary that is a multiple of {interval}")
    _logger.info(f"AutoDecay: {what} ended at update {decision.update} (epoch {epoch:.2f}, "
                 f"{decision.reason}){ending}")


def stop_message(scheduler: Any, t: int) -> str:
    last = scheduler.history[-1] if scheduler.history else {}
    at, reason = last.get("update"), last.get("reason")
    what = (f"the cooldown ended at update {at}" if reason == "cooldown" else
            f"the last learning stage ended at update {at} ({reason})")
    return (f"AutoDecay: training ends after epoch {t - 1} ({t} epochs, {scheduler.num_updates} updates): "
            f"{what}; no further batch is trained")


def log_stop(message: str) -> None:
    if is_primary():
        _logger.info(message)


def log_resumed(scheduler: Any, t: int, where: str, evaluation: Any) -> None:
    taken = "" if evaluation is None else f"; the checkpoint's evaluation ({evaluation!r}) is taken now"
    _logger.info(
        f"AutoDecay: resumed at epoch {t} (update {scheduler.num_updates}) from the state {where}: stage "
        f"{scheduler.stage}, finished {scheduler.finished}, LR {[g['lr'] for g in scheduler.optimizer.param_groups]}"
        f"{taken}")


def log_created(scheduler: Any, why: str) -> None:
    """The factory's account of the run it built, and of the evaluation signal (``why``: on or off, and why)."""
    detector, shape = scheduler.detector, scheduler.shape
    _logger.info(
        f"AutoDecay: {detector.num_stages} stage(s) over at most {shape.epochs} epochs ({shape.updates_per_epoch} "
        f"updates each), decay x{shape.decay_rate:g}, window {detector.window} updates, patience "
        f"{detector.patience}; its state travels in the optimizer's state, saved with every checkpoint")
    what = (f"on: {why}, {'lower' if detector.eval_mode == 'min' else 'higher'} is better (eval_mode "
            f"{detector.eval_mode}); the stable phase also ends after {detector.eval_patience} evaluations "
            f"without a new best (config key {PREFIX}eval_signal: false turns it off)" if scheduler.eval_signal else
            f"off: {why}")
    _logger.info(f"AutoDecay: evaluation signal {what}")
