"""AutoDecayLR's saved state: what it holds, how a release 0.1.0 state is read, and the checks that
refuse a damaged one before any of it is applied (the detector checks its own part the same way)."""
from __future__ import annotations

import math
from typing import Any, Dict

from .state import STATE_VERSION, check_state_fields, check_version, require

Number = (int, float)
SCHEDULER_FIELDS = {
    "version": int,
    "decay_rate": Number,
    "min_lr": Number,
    "warmup_start_factor": (int, float, type(None)),
    "base_lrs": list,
    "lrs": list,
    "cooldown_lrs": (list, type(None)),
    "last_epoch": int,
    "detector": dict,
    "pending_losses": dict,
}
PENDING_FIELDS = {"sum": Number, "finite": Number, "count": Number, "updates": int}


def scheduler_state(sched: Any) -> Dict[str, Any]:
    """The state of an AutoDecayLR, plain JSON types only."""
    return {
        "version": STATE_VERSION,
        "decay_rate": sched.decay_rate,
        "min_lr": sched.min_lr,
        "warmup_start_factor": sched.warmup_start_factor,
        "base_lrs": [float(lr) for lr in sched.base_lrs],
        "lrs": sched.get_last_lr(),
        "cooldown_lrs": None if sched.cooldown_lrs is None else list(sched.cooldown_lrs),
        "last_epoch": sched.last_epoch,
        "detector": sched.detector.state_dict(),
        "pending_losses": sched.accumulator.state_dict(),
    }


def migrate_scheduler_state(state: Any) -> Dict[str, Any]:
    """A state of any earlier format in the current one (the argument is left untouched).

    Release 0.1.0 (no ``version``) had neither a cooldown nor a warmup ramp, and set every group's LR
    to ``base_lr * decay_rate ** stage``."""
    check_state_fields(state, {"detector": dict}, "")
    version = check_version(state)
    if version > 1:
        return {**state, "version": STATE_VERSION}
    check_state_fields(state, {"decay_rate": Number, "base_lrs": list}, "")
    stage = state["detector"].get("stage")
    lrs = None
    if isinstance(stage, int) and not isinstance(stage, bool) and all(
            isinstance(lr, Number) and not isinstance(lr, bool) for lr in state["base_lrs"]):
        lrs = [lr * state["decay_rate"] ** stage for lr in state["base_lrs"]]  # else the checks name the key
    return {**state, "version": STATE_VERSION, "min_lr": 0.0, "warmup_start_factor": None,
            "lrs": lrs if lrs is not None else state["base_lrs"], "cooldown_lrs": None}


def _check_lrs(state: Dict[str, Any], key: str, groups: int) -> None:
    lrs = state[key]
    require(len(lrs) == groups, key, f"must hold one LR per param group: the checkpoint's optimizer had "
             f"{len(lrs)} group(s), this one has {groups}; build the optimizer with the groups it had when "
             "the checkpoint was saved, load the checkpoint, then add new groups", lrs)
    for i, lr in enumerate(lrs):
        require(isinstance(lr, Number) and not isinstance(lr, bool) and math.isfinite(lr) and lr >= 0,
                 f"{key}[{i}]", "must be a finite LR >= 0", lr)


def check_scheduler_state(sched: Any, state: Dict[str, Any]) -> None:
    """Raise StateError naming the first bad key of a (migrated) AutoDecayLR state, before anything
    is applied; the ``detector`` part is checked by the detector itself."""
    check_state_fields(state, SCHEDULER_FIELDS, "")
    check_state_fields(state["pending_losses"], PENDING_FIELDS, "pending_losses")
    for key in ("decay_rate", "min_lr", "warmup_start_factor"):
        saved, now = state[key], getattr(sched, key)
        require(saved == now, key, f"differs from this scheduler's ({now!r}); resume with the settings the "
                 "checkpoint was written with", saved)
    groups = len(sched.optimizer.param_groups)
    for key in ("base_lrs", "lrs") + (("cooldown_lrs",) if state["cooldown_lrs"] is not None else ()):
        _check_lrs(state, key, groups)
    pending = state["pending_losses"]
    require(pending["updates"] >= 0, "pending_losses.updates", "must be >= 0", pending["updates"])
    require(0 <= pending["finite"] <= pending["count"], "pending_losses.finite",
             f"must be in [0, count={pending['count']!r}]", pending["finite"])
    require(math.isfinite(pending["sum"]), "pending_losses.sum", "must be finite", pending["sum"])
    detector_update = state["detector"].get("update")
    if isinstance(detector_update, int) and not isinstance(detector_update, bool):
        least = detector_update + pending["updates"]
        require(state["last_epoch"] >= least, "last_epoch", f"must count at least the detector's updates and "
                 f"the pending ones ({least})", state["last_epoch"])
