"""How AutoDecay sets the learning rate under the Trainer's ``LambdaLR`` (``lr = base_lr x lambda(step)``).

AutoDecay owns ``base_lrs`` (a group's ``initial_lr`` times the stage's factor, or the cooldown's rate) and
leaves the lambdas (the Trainer's warmup, or its annealing curve) running underneath. All of it is host
arithmetic on Python floats: no device sync.
"""
from __future__ import annotations

from typing import List

import torch
from torch.optim.lr_scheduler import LambdaLR

from timm_autodecay.lr_rules import joining_initial_lr

from .trainer_internals import publish_lrs


def set_base_lrs(scheduler: LambdaLR, base_lrs: List[float]) -> None:
    """Give the scheduler new base LRs and set the LR of the next step from them at once, so that the
    LR the Trainer logs for a step (``get_last_lr()``) is the LR that step uses."""
    scheduler.base_lrs = list(base_lrs)
    groups = scheduler.optimizer.param_groups
    for group, base, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        lr = base * fn(scheduler.last_epoch)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    publish_lrs(scheduler)


def initial_lrs(scheduler: LambdaLR) -> List[float]:
    """Each param group's LR before any schedule: what the stage factors and the cooldown multiply."""
    return [float(group["initial_lr"]) for group in scheduler.optimizer.param_groups]


def adopt_new_groups(scheduler: LambdaLR, factor: float) -> int:
    """Param groups added to the optimizer after the scheduler was built (a backbone unfrozen mid-run)
    join the schedule like torch's ``ReduceLROnPlateau`` has them join: the LR a group has when it is
    added is its rate for the current stage and step, and the Trainer's lambda and AutoDecay's decays
    apply to it from then on. Without this, ``LambdaLR.step()`` fails on the extra group. ``factor``: the
    current rate relative to the initial LR (``decay_rate ** stage``, or the cooldown's share).

    Returns how many groups were adopted (0 in all but the step after ``add_param_group``)."""
    groups = scheduler.optimizer.param_groups
    known = len(scheduler.base_lrs)
    if len(groups) <= known:
        return 0
    fn = scheduler.lr_lambdas[0]
    now = fn(scheduler.last_epoch)
    for group in groups[known:]:
        lr = float(group["lr"])
        # at lambda 0 (the very start of a warmup) there is nothing to divide by: the group's LR is
        # then its rate for the current stage, before the lambda
        group["initial_lr"] = joining_initial_lr(lr, now * factor if now > 0 else factor)
        scheduler.base_lrs.append(group["initial_lr"] * factor)
        scheduler.lr_lambdas.append(fn)
    publish_lrs(scheduler)
    return len(groups) - known
