"""The two places where the callback reaches past the Trainer's public interface, because none exists for what
it needs; ``tests/test_hf_internals.py`` fails loudly if either framework changes under them.

* ``LambdaLR._last_lr``: ``get_last_lr()`` answers from it, and the Trainer logs ``learning_rate`` from
  ``get_last_lr()``. After AutoDecay sets new LRs between two scheduler steps (a decay, a group that joined),
  only this attribute makes the logged LR the one the next step uses.
* ``TrainerState.log_history[-1]``: ``Trainer.log`` appends a copy of ``logs`` to the history *before* it
  calls ``on_log`` (and an evaluation's entry before ``on_evaluate``), so a callback's additions to ``logs``
  reach the printer but not ``trainer_state.json``. The entry for this step is updated in place.
"""
from __future__ import annotations

from typing import Any, Dict

__all__ = ["annotate_logged_entry", "publish_lrs"]


def publish_lrs(scheduler: Any) -> None:
    """Make ``scheduler.get_last_lr()`` report the param groups' LRs as they are now."""
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def annotate_logged_entry(state: Any, key: str, extra: Dict[str, Any]) -> None:
    """Add ``extra`` to the history entry that ``Trainer.log`` just appended for this step (the one holding
    ``key``: ``loss`` for a loss log, the metric for an evaluation)."""
    last = state.log_history[-1] if state.log_history else {}
    if last.get("step") == state.global_step and key in last:
        last.update(extra)
