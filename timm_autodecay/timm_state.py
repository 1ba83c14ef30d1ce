"""The timm scheduler's saved state: its format, migration of older ones, and the checks of a state against
the run that resumes it, all done before any of it is applied (a resumed run must never continue on half a
state). Where the state is kept and found again is :mod:`~timm_autodecay.timm_resume`'s business.

The state is JSON-able: the detector's state, the LR bookkeeping, the decoder of train.py's running mean
and any losses not yet observed, and ``evaluated_epoch``: the epoch whose end's evaluation (the metric of
``step(epoch, metric)``) it judged last. train.py checkpoints between an epoch's last update and that call,
so the state in a checkpoint has not judged its epoch's evaluation yet; ``evaluated_epoch`` says so to the
run that resumes it, and says the opposite for a loop that checkpoints after ``step``.

Versions: the scheduler's state carries the detector's state version (as the PyTorch face's does) and is
checked by :func:`timm_autodecay.state.check_version`. Version 1 is release 0.1.0's (``"format": 1``), 2 is
release 0.2.0's; neither holds an evaluation still to take (those releases judged none, and later version-2
states were rewritten in their file once they had judged it).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

from .state import (EVALUATION_SETTINGS, STATE_VERSION, StateError, adopt_evaluation_settings, check_state_fields,
                    check_version, require)

__all__ = ["check_same_run", "check_state", "load_detector_first", "migrate_state",
           "scheduler_state", "settings_hint"]

EVALUATED_SINCE = 3  # the first version with "evaluated_epoch"
_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))
STATE_FIELDS = {
    "version": int, "num_updates": int, "evaluated_epoch": int, "updates_per_epoch": int, "t_in_epochs": bool,
    "decay_rate": _NUMBER, "lr_min": _NUMBER, "warmup_t": int, "warmup_lr_init": _NUMBER, "base_values": list,
    "running_mean": _OPTIONAL_NUMBER, "samples": int, "last_sample": _OPTIONAL_NUMBER,
    "every_update": (bool, type(None)), "awaiting_finite": bool, "pending_losses": dict, "detector": dict,
}
PENDING_FIELDS = {"sum": _NUMBER, "finite": _NUMBER, "count": _NUMBER, "updates": int, "diverged": _NUMBER}


def scheduler_state(scheduler: Any) -> Dict[str, Any]:
    """The state of an :class:`~timm_autodecay.timm_scheduler.AutoDecayScheduler`, new containers throughout
    (it is kept in the optimizer's state while the scheduler goes on)."""
    shape = scheduler.shape
    return {
        "version": STATE_VERSION,
        "num_updates": scheduler.num_updates,
        "evaluated_epoch": scheduler.evaluated_epoch,
        "updates_per_epoch": shape.updates_per_epoch,
        "t_in_epochs": shape.t_in_epochs,
        "decay_rate": shape.decay_rate,
        "lr_min": shape.lr_min,
        "warmup_t": shape.warmup_t,
        "warmup_lr_init": shape.warmup_lr_init,
        "base_values": list(scheduler.base_values),
        **scheduler.signal.state_dict(),
        "detector": scheduler.detector.state_dict(),
    }


def migrate_state(state: Any) -> Dict[str, Any]:
    """A scheduler state of release 0.1.0 or 0.2.0 in the current format (the argument is left untouched);
    the detector's own state is migrated by the detector."""
    check_state_fields(state, {"detector": dict}, "")
    version = check_version({"version": state.get("version", 1 if state.get("format") == 1 else None)})
    migrated = {key: value for key, value in state.items() if key != "format"}
    if version == 1:
        check_state_fields(state.get("pending_losses"), {"sum": _NUMBER, "finite": _NUMBER, "count": _NUMBER},
                           "pending_losses")
        pending = state["pending_losses"]
        migrated.update(every_update=None, awaiting_finite=False, pending_losses={
            "sum": pending["sum"], "finite": pending["finite"], "count": pending["count"],
            "updates": int(pending["count"]), "diverged": 0})
    elif version == 2:  # the timm face's own loss sums, before every face shared one accumulator
        check_state_fields(state.get("pending_losses"), {"sum": _NUMBER, "finite": int, "nonfinite": int,
                                                          "diverged": int}, "pending_losses")
        pending = state["pending_losses"]
        count = pending["finite"] + pending["nonfinite"]
        migrated["pending_losses"] = {"sum": pending["sum"], "finite": pending["finite"], "count": count,
                                      "updates": count, "diverged": pending["diverged"]}
    if version < EVALUATED_SINCE:  # no evaluation still to take (see the module docstring)
        check_state_fields(state, {"num_updates": int, "updates_per_epoch": int}, "")
        migrated["evaluated_epoch"] = state["num_updates"] // max(state["updates_per_epoch"], 1)
    migrated["version"] = STATE_VERSION
    return migrated


def load_detector_first(state_dict: Any, param_groups: int, shape: Any, detector: Any) -> Dict[str, Any]:
    """Check a scheduler's state whole and load its detector part into ``detector`` (which checks its own
    first); the migrated state, for the scheduler to take the rest. StateError names the bad key or the flag
    that differs, and then nothing has changed."""
    state = migrate_state(state_dict)
    check_state(state, param_groups)
    check_same_run(state, shape, detector)
    try:
        ours = {name: getattr(detector, name) for name in EVALUATION_SETTINGS}
        detector.load_state_dict(adopt_evaluation_settings(state["detector"], ours))
    except StateError as error:
        raise StateError(f"{error} (in the saved state's 'detector'{settings_hint(error)})") from None
    return state


def check_state(state: Dict[str, Any], param_groups: int) -> None:
    """Types and ranges of a (migrated) scheduler state; StateError names the bad key."""
    check_state_fields(state, STATE_FIELDS, "")
    check_state_fields(state["pending_losses"], PENDING_FIELDS, "pending_losses")
    for key in ("num_updates", "warmup_t", "samples", "evaluated_epoch"):
        require(state[key] >= 0, key, "must be >= 0", state[key])
    require(state["updates_per_epoch"] >= 1, "updates_per_epoch", "must be >= 1", state["updates_per_epoch"])
    completed = state["num_updates"] // state["updates_per_epoch"]
    require(state["evaluated_epoch"] <= completed, "evaluated_epoch",
            f"must be at most the epochs completed ({completed})", state["evaluated_epoch"])
    values = state["base_values"]
    require(len(values) == param_groups, "base_values",
            f"must hold one LR per param group of the optimizer ({param_groups})", values)
    for i, value in enumerate(values):
        require(not isinstance(value, bool) and isinstance(value, _NUMBER) and math.isfinite(value) and value >= 0,
                f"base_values[{i}]", "must be a finite LR >= 0", value)
    pending = state["pending_losses"]
    require(math.isfinite(pending["sum"]) and 0 <= pending["finite"] <= pending["count"] and pending["diverged"] >= 0
            and pending["updates"] >= 0, "pending_losses", "must hold a finite sum and counts >= 0", pending)
    for key in ("running_mean", "last_sample"):
        require(state[key] is None or math.isfinite(state[key]), key, "must be a finite number or null", state[key])


# -- a state against this run --------------------------------------------------------------------
# The shape's numbers that a resumed run must share with its checkpoint, and what sets them.
RUN_FLAGS = {
    "updates_per_epoch": "train.py's updates per epoch (the dataset, --batch-size, --grad-accum-steps)",
    "t_in_epochs": "--sched-on-updates", "decay_rate": "--decay-rate", "lr_min": "--min-lr",
    "warmup_t": "--warmup-epochs", "warmup_lr_init": "--warmup-lr",
}


def check_same_run(state: Dict[str, Any], shape: Any, detector: Any) -> None:
    """StateError naming the flag when a (migrated, checked) state was written by a run of another shape."""
    for key, flag in RUN_FLAGS.items():
        if state[key] != getattr(shape, key):
            raise StateError(
                f"AutoDecay: {key} is {getattr(shape, key)!r} in this run but {state[key]!r} in the saved state "
                f"({flag}); resume with the run's own settings")
    saved = state["detector"].get("settings")
    saved = saved if isinstance(saved, dict) else {}

    def describe(updates: Optional[int]) -> str:
        return "none" if updates is None else f"{updates} updates, {updates / shape.updates_per_epoch:g} epochs"

    for key, flag in (("total_updates", "--epochs"), ("warmup_updates", "--warmup-epochs")):
        then, now = saved.get(key, getattr(detector, key)), getattr(detector, key)
        if then != now:
            raise StateError(
                f"AutoDecay: the saved state's run had {key}={describe(then)}, this one {describe(now)}: "
                f"resume with the checkpoint's {flag}" + (" (and --warmup-prefix)" if shape.warmup_prefix else ""))


def settings_hint(error: StateError) -> str:
    """What sets the detector settings that a refused state names, in timm's terms."""
    if "'settings' differ" not in str(error):
        return ""
    return "; timm config keys: autodecay_<setting>" + (
        ", and eval_mode follows --eval-metric ('min' when its name holds 'loss')" if "eval_mode" in str(error) else "")
