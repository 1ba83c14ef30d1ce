"""The rules about learning rates that every face applies, so that one fault gets one answer everywhere.

* The cooldown anneals each param group from its stage LR to its floor along ``cooldown_curve``; a floor
  above the stage LR is that LR: no decay or cooldown ever raises a learning rate.
* ``min_lr`` is the floor of the group with the highest initial LR; every other group anneals to the same
  share of its own LR (as timm's ``lr_scale`` and the Transformers schedulers' ``min_lr`` do), so a backbone
  at a tenth of the head's LR ends at a tenth of ``min_lr``, never above its own rate. A ``min_lr`` at or
  above the highest LR would leave nothing to anneal: an error that names it.
* A param group added while the run goes on (a backbone unfrozen mid-run) joins at the LR it was added with,
  as torch's ``ReduceLROnPlateau`` has it, and from there follows the other groups as if it had been in the run
  from the start: decays multiply it, a cooldown anneals it to the same share of that start.
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["annealed_lr", "cooldown_factor", "floor_share", "joining_initial_lr"]


def cooldown_factor(curve: str, progress: float) -> float:
    """Share of the way from the floor to the stage LR left at ``progress`` (0..1) of the cooldown."""
    progress = min(max(progress, 0.0), 1.0)
    if curve == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    if curve == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def annealed_lr(stage_lr: float, floor: float, curve: str, progress: float) -> float:
    """A group's LR at ``progress`` of the cooldown, from ``stage_lr`` down to ``floor`` (never above ``stage_lr``)."""
    floor = min(floor, stage_lr)
    return floor + (stage_lr - floor) * cooldown_factor(curve, progress)


def joining_initial_lr(lr: float, factor: float) -> float:
    """The initial LR of a group that joins where the schedule's factor (a group's LR over its initial LR) is
    ``factor``: as if it had been in the run from the start, it trains on at ``lr`` now and follows the other
    groups' curve from there, down to the same share of its initial LR. ``lr`` where the factor is 0."""
    return lr / factor if factor > 0 else lr


def floor_share(min_lr: float, initial_lrs: Sequence[float]) -> float:
    """The floor of every group as a share of its own initial LR: ``min_lr`` over the highest initial LR."""
    highest = max((float(lr) for lr in initial_lrs), default=0.0)
    if not min_lr:
        return 0.0
    if min_lr >= highest:
        raise ValueError(f"min_lr={min_lr!r} must be below the highest param group LR ({highest:g}): the cooldown "
                         "anneals every group from its LR down to its share of min_lr (lower min_lr, e.g. to a "
                         "hundredth of the LR)")
    return min_lr / highest
