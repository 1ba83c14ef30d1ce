"""The detector's settings: one table, read by every face (CLI flags, timm YAML keys, callback
arguments), and the checks that turn a bad value into an error naming it."""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

DECAY_SHAPES = ("step", "cooldown")
EVAL_MODES = ("min", "max")
COOLDOWN_CURVES = ("1-sqrt", "linear", "cosine")

# name -> (type, default, help). A default of None is resolved by the detector from the run's shape.
SETTINGS: Dict[str, Tuple[type, Any, str]] = {
    "num_stages": (int, None, "stages in the run (default: 3 with the step shape, 1 with the cooldown)"),
    "total_updates": (int, None, "budget in updates; no stage outlasts its share of it, the cooldown included"),
    "updates_per_epoch": (int, None, "sets the default window (2 epochs) when there is no budget"),
    "warmup_updates": (int, 0, "updates ignored at the start (learning-rate warmup)"),
    "window": (int, None, "updates over which the loss trend is fitted (default: a stage's share / 5)"),
    "patience": (int, None, "updates the plateau condition must hold (default: 0.4 windows)"),
    "significance": (float, 1.64, "standard errors of decrease needed to keep a stage going"),
    "min_progress": (float, 0.05, "a window's decrease, as a share of the stage's decrease, below which "
                                  "the stage has ended"),
    "min_points": (int, 8, "fewest buckets a window may hold"),
    "first_stage_patience": (float, None, "the first plateau must also last this fraction of the stage's age "
                                          "(default: 0.4 with the step shape, 0 with the cooldown)"),
    "decay_shape": (str, "cooldown", "what ends the last stage: 'cooldown' (anneal the LR to its floor, then "
                                     "finish) or 'step' (the paper's schedule: finish at once)"),
    "cooldown_fraction": (float, 0.2, "share of the whole run the cooldown takes (WSD's decay fraction; at most 0.5)"),
    "cooldown_curve": (str, "1-sqrt", "the cooldown's shape: '1-sqrt', 'linear' or 'cosine'"),
    "eval_mode": (str, "min", "direction of the evaluation metric, when one is given: 'min' (a loss) or 'max' "
                              "(an accuracy)"),
    "eval_patience": (int, 3, "evaluations without a new best (each the median of the last three) that end the "
                              "stable phase, when evaluations are given"),
}
DEFAULTS: Dict[str, Any] = {name: default for name, (_, default, _) in SETTINGS.items()}


def _plain(value: Any) -> Any:
    """A numpy or torch scalar as the Python number it holds (settings often come from arrays or tensors)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        return value.item()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def check_known(given: Iterable[str], known: Iterable[str], what: str = "AutoDecay setting(s)",
                error: type = ValueError, takes: str = "") -> None:
    """The one check of names nobody knows (a typo in a keyword, a YAML key, a flag): ``error`` naming them
    and what is known."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise error(f"unknown {what} {unknown}; {takes or 'known: ' + str(sorted(known))}")


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> Optional[int]:
    value = _plain(value)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, low: float, high: float = math.inf) -> float:
    value = _plain(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise ValueError(f"{name} must be a number in [{low}, {high}), got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
