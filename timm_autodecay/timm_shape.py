"""The run's shape in updates: what timm's arguments fix about a ``sched="autodecay"`` run, checked once.

timm counts a schedule's time in epochs unless ``--sched-on-updates`` (``t_in_epochs``); the detector counts
updates. :class:`RunShape` is the one place where the one becomes the other (the budget, timm's warmup,
``--warmup-prefix``), so the scheduler, the detector and the number of epochs handed back to ``train.py``
cannot disagree. Its errors name ``train.py``'s flags: a user meets them as a bad command line, not as a
bad keyword of a function they never called.

Imports no timm: the factory uses it while timm's scheduler package is being imported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from .detector import SETTINGS, StageDetector
from .settings import check_int, check_known
from .timm_keys import FROM_RUN, PREFIX, RETIRED

__all__ = ["RunShape", "check_flag"]


def _check_lr(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"AutoDecay: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_decay_rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"AutoDecay: decay_rate must be in (0, 1), got {value!r} (--decay-rate)")
    return float(value)


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"AutoDecay: {name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class RunShape:
    """A run's shape: ``total_updates`` (the budget, timm's prefix warmup included; None: no budget) and
    ``warmup_updates`` in updates; ``t_in_epochs``: whether the LR changes at epoch boundaries only;
    ``end_interval``: epochs between the boundaries where train.py checkpoints, the only ones it may end at."""

    updates_per_epoch: int
    t_in_epochs: bool
    total_updates: Optional[int]
    warmup_updates: int
    warmup_prefix: bool
    warmup_lr_init: float
    decay_rate: float
    lr_min: float
    end_interval: int

    @classmethod
    def from_timm(cls, updates_per_epoch: Any, t_initial: Any = None, warmup_t: Any = 0, warmup_prefix: bool = False,
                  t_in_epochs: bool = True, decay_rate: Any = 0.1, lr_min: Any = 0.0, warmup_lr_init: Any = 0.0,
                  end_interval: Any = 1) -> "RunShape":
        """From a timm scheduler's arguments: ``t_initial`` and ``warmup_t`` in epochs, or in updates when
        ``t_in_epochs`` is False."""
        upe = check_int("updates_per_epoch", updates_per_epoch, 1)
        unit = upe if t_in_epochs else 1
        warmup = check_int("warmup_t (--warmup-epochs)", warmup_t, 0)
        budget = None if t_initial is None else check_int("t_initial (--epochs)", t_initial, 1)
        if budget is not None and not warmup_prefix and warmup >= budget:
            raise ValueError(
                f"AutoDecay: the warmup ({warmup}) must be shorter than the budget ({budget}) "
                f"({'epochs' if t_in_epochs else 'updates'}; --warmup-epochs and --epochs)")
        total = None if budget is None else (budget + (warmup if warmup_prefix else 0)) * unit
        return cls(updates_per_epoch=upe, t_in_epochs=bool(t_in_epochs), total_updates=total,
                   warmup_updates=warmup * unit, warmup_prefix=bool(warmup_prefix),
                   warmup_lr_init=_check_lr("warmup_lr_init (--warmup-lr)", warmup_lr_init),
                   decay_rate=_check_decay_rate(decay_rate), lr_min=_check_lr("lr_min (--min-lr)", lr_min),
                   end_interval=check_int("end_interval (--val-interval)", end_interval, 1))

    @classmethod
    def from_train_py(cls, arguments: Dict[str, Any], end_interval: Any) -> "RunShape":
        """From timm's ``create_scheduler_v2`` arguments (bound, with timm's defaults): train.py's flags."""
        upe = arguments.get("updates_per_epoch") or 0
        if isinstance(upe, bool) or not isinstance(upe, int) or upe < 1:
            raise ValueError(
                f"AutoDecay: sched='autodecay' needs updates_per_epoch (optimizer updates per epoch), got {upe!r}")
        epochs = check_int("num_epochs (--epochs)", arguments["num_epochs"], 1)
        warmup = check_int("warmup_epochs (--warmup-epochs)", arguments["warmup_epochs"], 0)
        unit = 1 if arguments["step_on_epochs"] else upe
        return cls.from_timm(upe, epochs * unit, warmup * unit, arguments["warmup_prefix"],
                             bool(arguments["step_on_epochs"]), arguments["decay_rate"], arguments["min_lr"],
                             arguments["warmup_lr"], end_interval)

    @property
    def unit(self) -> int:
        """Updates per unit of timm's time ``t``."""
        return self.updates_per_epoch if self.t_in_epochs else 1

    @property
    def warmup_t(self) -> int:
        """The warmup in timm's time (epochs, or updates without ``t_in_epochs``)."""
        return self.warmup_updates // self.unit

    @property
    def epochs(self) -> Optional[int]:
        """The epochs train.py runs (its ``num_epochs``): the budget, with a prefix warmup added as timm adds it."""
        return None if self.total_updates is None else -(-self.total_updates // self.updates_per_epoch)

    @property
    def evaluations(self) -> int:
        """How many times train.py evaluates in the budget (every ``end_interval`` epochs)."""
        return -(-(self.epochs or 0) // self.end_interval)

    def make_detector(self, settings: Dict[str, Any]) -> StageDetector:
        """The detector for this shape; ``settings`` are the rest (config keys without their prefix). Its
        errors name the config key, or the flags when the shape's own numbers do not fit together."""
        for name in settings:
            if name in FROM_RUN:
                raise ValueError(f"AutoDecay: {name} is set from the run, by {FROM_RUN[name]}")
            if PREFIX + name in RETIRED:
                raise ValueError(f"AutoDecay: {name} is no longer a setting: {RETIRED[PREFIX + name]}")
        check_known(settings, set(SETTINGS) - set(FROM_RUN), "AutoDecay detector setting(s)")
        try:
            return StageDetector(total_updates=self.total_updates, updates_per_epoch=self.updates_per_epoch,
                                 warmup_updates=self.warmup_updates, **settings)
        except (TypeError, ValueError) as error:
            name = str(error).split(" ", 1)[0]
            key = f" (config key {PREFIX}{name})" if name in SETTINGS and name not in FROM_RUN else ""
            flags = [flag for setting, flag in FROM_RUN.items() if setting in str(error)]
            key = key or (f" (from {'; '.join(flags)})" if flags else "")
            raise ValueError(f"AutoDecay: bad setting{key}: {error}") from None
