"""The detector's saved state: a format version, migration of older states, and validation of the
whole state before any of it is applied (a resumed run must never continue on half a state)."""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Mapping, Tuple, Union

from .settings import DEFAULTS

STATE_VERSION = 3  # 1: release 0.1.0 (no "version" key); 2: 0.2.0; 3: evaluations
EVALUATION_SETTINGS = ("eval_mode", "eval_patience")  # added in state version 3
_RETIRED_SETTINGS = {"min_relative_drop": "min_progress"}  # 0.1.0 name -> what replaced it

Number = (int, float)
Kinds = Union[type, Tuple[type, ...]]


class StateError(ValueError):
    """A saved AutoDecay state that cannot be resumed; the message names the bad key."""


def _kind_name(kinds: Kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def check_state_fields(state: Any, fields: Mapping[str, Kinds], where: str) -> None:
    """Raise StateError naming ``where.key`` for a missing key or a value of the wrong type."""
    if not isinstance(state, dict):
        raise StateError(f"AutoDecay state: {where or 'the state'} must be a dict, got {type(state).__name__}")
    prefix = f"{where}." if where else ""
    for key, kinds in fields.items():
        if key not in state:
            raise StateError(f"AutoDecay state: '{prefix}{key}' is missing")
        value = state[key]
        allowed = kinds if isinstance(kinds, tuple) else (kinds,)
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if wrong_bool or not isinstance(value, allowed):
            raise StateError(f"AutoDecay state: '{prefix}{key}' must be {_kind_name(kinds)}, got {value!r}")


def require(condition: bool, key: str, message: str, value: Any) -> None:
    """StateError naming ``key`` unless ``condition``: the one form of every face's state checks."""
    if not condition:
        raise StateError(f"AutoDecay state: '{key}' {message}, got {value!r}")


DETECTOR_FIELDS: Dict[str, Kinds] = {
    "version": int,
    "settings": dict,
    "update": int,
    "stage": int,
    "finished": bool,
    "stage_start": Number,
    "stage_reference": (int, float, type(None)),
    "cooldown_start": (int, type(None)),
    "cooldown_updates": (int, type(None)),
    "nonfinite_losses": int,
    "nonfinite_streak": int,
    "history": list,
    "bucket_sum": Number,
    "bucket_count": int,
    "points": list,
    "plateau_since": (int, type(None)),
    "evaluations": dict,
}
HISTORY_FIELDS: Dict[str, Kinds] = {"update": int, "action": str, "stage": int, "reason": str}


def check_version(state: Any) -> int:
    """The format version of a saved state (1 when it has none), or StateError if this release cannot read it."""
    version = state.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= STATE_VERSION:
        raise StateError(
            f"AutoDecay state: 'version' {version!r} is not one this release reads (1..{STATE_VERSION}); "
            "it was written by a newer timm-autodecay: upgrade to resume it"
        )
    return version


def migrate(state: Any) -> Dict[str, Any]:
    """A state of any earlier format in the current one (the argument is left untouched)."""
    check_state_fields(state, {"settings": dict}, "")
    version = check_version(state)
    state = dict(state)
    if version == 1:
        settings = dict(state["settings"])
        for old, new in _RETIRED_SETTINGS.items():
            if old in settings and settings.pop(old) != 0.01:
                warnings.warn(f"AutoDecay: the checkpoint's setting {old} no longer exists; {new} takes its "
                              f"place at its default ({DEFAULTS[new]})", RuntimeWarning, stacklevel=3)
        settings.setdefault("decay_shape", "step")  # the only shape 0.1.0 had
        for name, default in DEFAULTS.items():
            settings.setdefault(name, default)
        state.update(settings=settings, stage_reference=None, cooldown_start=None, cooldown_updates=None)
    if version < 3:  # no evaluations before: the evaluation settings at their defaults, no evaluation seen
        state["settings"] = {**{name: DEFAULTS[name] for name in EVALUATION_SETTINGS}, **state["settings"]}
        state["evaluations"] = {"recent": [], "count": 0, "best_smoothed": None, "best_at": None,
                                "best_value": None, "best_update": None, "nonfinite": 0}
    state["version"] = STATE_VERSION
    return state


def adopt_evaluation_settings(saved: Any, eval_settings: Mapping[str, Any]) -> Dict[str, Any]:
    """A detector state migrated, with this run's evaluation settings (``EVALUATION_SETTINGS``) where it has
    judged no evaluation (every state written before evaluations were added): they had no effect on it yet, so
    a run that now evaluates, in either direction, resumes it. Every face resumes through this."""
    state = migrate(saved)
    evaluations = state.get("evaluations")
    judged_none = (isinstance(evaluations, dict) and evaluations.get("count") == 0 and evaluations.get("recent") == []
                   and evaluations.get("best_value") is None and evaluations.get("nonfinite") == 0)
    if not judged_none:  # a malformed record is left for the detector's check to name
        return state
    return {**state, "settings": {**state["settings"], **eval_settings}}


def validate(state: Dict[str, Any], settings: Dict[str, Any]) -> None:
    """Check a (migrated) detector state against the detector's resolved settings, all of it."""
    check_state_fields(state, DETECTOR_FIELDS, "")
    saved = state["settings"]
    differing = sorted(k for k in set(saved) | set(settings) if saved.get(k, "<missing>") != settings.get(k))
    if differing:
        detail = ", ".join(f"{k}: {saved.get(k, '<missing>')!r} saved, {settings.get(k, '<missing>')!r} now"
                           for k in differing)
        hint = ("; the default shape is 'cooldown' since release 0.2.0: pass decay_shape='step' to resume a "
                "step-shaped run" if "decay_shape" in differing and saved.get("decay_shape") == "step" else "")
        raise StateError(f"AutoDecay state: 'settings' differ from this run's ({detail}); resume with the "
                         f"settings the checkpoint was written with{hint}")
    stages, update = settings["num_stages"], state["update"]
    require(update >= 0, "update", "must be >= 0", update)
    require(0 <= state["stage"] < stages, "stage", f"must be in [0, {stages})", state["stage"])
    latest_start = max(update, settings["warmup_updates"])  # during warmup the first stage starts ahead
    require(0 <= state["stage_start"] <= latest_start, "stage_start", f"must be in [0, {latest_start}]",
             state["stage_start"])
    for key in ("nonfinite_losses", "nonfinite_streak", "bucket_count"):
        require(state[key] >= 0, key, "must be >= 0", state[key])
    require(math.isfinite(state["bucket_sum"]), "bucket_sum", "must be finite", state["bucket_sum"])
    for i, point in enumerate(state["points"]):
        require(isinstance(point, list) and len(point) == 3 and all(
            isinstance(v, Number) and not isinstance(v, bool) and math.isfinite(v) for v in point),
            f"points[{i}]", "must be [update, mean loss, count] of finite numbers", point)
    for i, entry in enumerate(state["history"]):
        check_state_fields(entry, HISTORY_FIELDS, f"history[{i}]")
    cooling = state["cooldown_start"] is not None
    require(cooling == (state["cooldown_updates"] is not None), "cooldown_updates",
             "must be set exactly when 'cooldown_start' is", state["cooldown_updates"])
    require(not cooling or settings["decay_shape"] == "cooldown", "cooldown_start",
             "must be null with the step shape", state["cooldown_start"])
