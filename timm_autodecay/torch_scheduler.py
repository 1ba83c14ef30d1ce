"""AutoDecay as a PyTorch LR scheduler: ``sched.step(loss)`` after every ``optimizer.step()``.

Like ``ReduceLROnPlateau``, AutoDecayLR only ever multiplies each param group's *current* learning
rate: a decay multiplies it by ``decay_rate``, its own warmup ramp (``warmup_start_factor``) by the
ramp's ratio from one update to the next. So it composes with torch's chainable schedulers stepped
side by side (a ``LinearLR`` warmup built before or after it), and a param group added later (a
backbone unfrozen mid-run) joins the schedule at the LR it was added with, its rate for the current
stage. The cooldown shape is the one exception: from the end of the last stage it sets every group's
LR at each update, annealing it from its LR at the cooldown's start to ``min_lr``.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Dict, List, Optional, Union

import torch
from torch.optim.lr_scheduler import LRScheduler

from .detector import SETTINGS, Decision, FollowsDetector, StageDetector, check_float
from .losses import LossAccumulator, check_loss
from .lr_rules import floor_share, joining_initial_lr
from .ranks import mean_over_ranks
from .settings import check_known
from .state import EVALUATION_SETTINGS, adopt_evaluation_settings
from .torch_state import check_scheduler_state, migrate_scheduler_state, scheduler_state

__all__ = ["AutoDecayLR", "check_decay_rate"]

FOR_A_WARMUP = (
    "For a warmup, step a torch scheduler and AutoDecayLR side by side, each once per update "
    "(warmup.step(); sched.step(loss)), or let AutoDecayLR ramp the LR itself: "
    "AutoDecayLR(optimizer, warmup_updates=N, warmup_start_factor=F)"
)
NEEDS_THE_LOSS = (
    "AutoDecayLR.step needs the training loss: call sched.step(loss) after each optimizer.step(). "
    "Wrappers that step their schedulers without arguments (SequentialLR, ChainedScheduler, a Trainer "
    "given the scheduler) cannot drive it. " + FOR_A_WARMUP
)
# step(loss) called this many times more (or less) often than the optimizer updates, and by at least
# this many updates, is not one call per update
CADENCE_RATIO = 2
CADENCE_SLACK = 16


def check_decay_rate(decay_rate: Any) -> float:
    """``decay_rate`` as a float in (0, 1); numpy and torch scalars are accepted."""
    try:
        value = check_float("decay_rate", decay_rate, 0.0, 1.0)
    except ValueError:
        value = 0.0
    if value == 0.0:
        raise ValueError(f"decay_rate must be in (0, 1), got {decay_rate!r}")
    return value


def _set_lr(group: Dict[str, Any], lr: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)  # a tensor LR (capturable, fused optimizers) keeps its identity
    else:
        group["lr"] = lr


def _innermost(optimizer: Any) -> Any:
    """The optimizer that really steps (Accelerate's AcceleratedOptimizer wraps one)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class AutoDecayLR(FollowsDetector, LRScheduler):
    """Keeps the learning rate until the training loss stops decreasing (or 80% of the budget), then
    anneals it to ``min_lr`` over a fifth of the run and sets ``finished`` (the default shape, WSD with the
    length found by the detector). With ``num_stages=k`` the first k-1 plateaus multiply every group's LR
    by ``decay_rate``; with ``decay_shape="step"`` (the paper's schedule) every plateau does, and the
    last one (of 3 by default) sets ``finished``.

    Pass the run's shape (``updates_per_epoch``, ``total_updates``) and nothing else: the detector's
    settings (``window``, ``patience``, ...) default from it. Call ``step(loss)`` once per optimizer
    update with the (0-dim tensor or float) training loss; a loss on an accelerator is accumulated
    there and read back only every few dozen updates.

    Warmup: ``warmup_updates=N`` keeps the first N losses out of the detector. The ramp itself comes
    either from AutoDecayLR (``warmup_start_factor=F``: the LR rises linearly from F times its value
    to its value over N updates, as ``LinearLR(optimizer, start_factor=F, total_iters=N)`` does) or
    from a torch scheduler stepped side by side with AutoDecayLR. ``SequentialLR`` and
    ``ChainedScheduler`` step their schedulers without the loss and are refused.

    Example::

        >>> sched = AutoDecayLR(optimizer, updates_per_epoch=len(loader), total_updates=90 * len(loader))
        >>> for batch in loader:
        >>>     loss = model(batch).loss
        >>>     loss.backward()
        >>>     optimizer.step()
        >>>     optimizer.zero_grad()
        >>>     sched.step(loss.detach())
        >>>     if sched.finished:
        >>>         break
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        decay_rate: float = 0.1,
        num_stages: Optional[int] = None,
        updates_per_epoch: Optional[int] = None,
        total_updates: Optional[int] = None,
        warmup_updates: int = 0,
        warmup_start_factor: Optional[float] = None,
        min_lr: float = 0.0,
        **detector_settings: Any,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        _check_extra_arguments(detector_settings)
        for i, group in enumerate(optimizer.param_groups):
            if "lr" not in group:
                raise ValueError(f"optimizer param_groups[{i}] has no 'lr'; AutoDecay scales learning rates")
        self.decay_rate = check_decay_rate(decay_rate)
        self.min_lr = check_float("min_lr", min_lr, 0.0)
        self.detector = StageDetector(num_stages=num_stages, total_updates=total_updates,
                                      updates_per_epoch=updates_per_epoch, warmup_updates=warmup_updates,
                                      **detector_settings)
        budget, epoch = self.detector.total_updates, self.detector.updates_per_epoch
        if budget is not None and epoch is not None and budget < epoch:
            warnings.warn(f"total_updates={budget} is less than one epoch (updates_per_epoch={epoch}): it counts "
                          f"optimizer updates, not epochs ({budget} epochs are total_updates={budget * epoch})",
                          RuntimeWarning, stacklevel=2)
        if self.min_lr and self.detector.decay_shape != "cooldown":
            raise ValueError(f"min_lr={min_lr!r} is the floor a cooldown anneals to; it needs "
                             "decay_shape='cooldown' (the step shape multiplies by decay_rate)")
        self.warmup_start_factor = None
        if warmup_start_factor is not None:
            self.warmup_start_factor = check_float("warmup_start_factor", warmup_start_factor, 0.0, 1.0 + 1e-12)
            if self.warmup_start_factor == 0.0 or not self.detector.warmup_updates:
                raise ValueError(f"warmup_start_factor={warmup_start_factor!r} needs warmup_updates > 0 and a "
                                 "factor in (0, 1]")
        self.optimizer = optimizer
        _claim(optimizer, self)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", float(group["lr"]))
        self.base_lrs: List[float] = [float(group["initial_lr"]) for group in optimizer.param_groups]
        self.floor_share = floor_share(self.min_lr, self.base_lrs)
        self.accumulator = LossAccumulator()
        self.last_decision: Optional[Decision] = None
        self.cooldown_lrs: Optional[List[float]] = None  # each group's LR when the cooldown began
        self._updates = 0
        self._step_count = 1
        if self.warmup_start_factor is not None:
            self._scale_lrs(self.warmup_start_factor)
        self._last_lr = self._current_lrs()
        self._cadence = _Cadence(optimizer)

    # -- torch's scheduler interface ---------------------------------------------------------
    @property
    def last_epoch(self) -> int:
        """Updates stepped so far (torch's name for a scheduler's step count)."""
        return self._updates

    @last_epoch.setter
    def last_epoch(self, value: int) -> None:
        # SequentialLR rewinds its schedulers' counts when it is built, and later steps them without a loss
        raise TypeError(f"AutoDecayLR's last_epoch cannot be set (to {value!r}). SequentialLR does this to the "
                        "schedulers it wraps, and steps them without the loss AutoDecayLR needs: it cannot "
                        f"hold AutoDecayLR. {FOR_A_WARMUP}")

    def get_lr(self) -> List[float]:
        return self._current_lrs()

    def step(self, loss: Union[float, torch.Tensor, None] = None) -> None:  # type: ignore[override]
        """Record one optimizer update's training loss; decay when a stage has ended."""
        if loss is None:
            raise TypeError(NEEDS_THE_LOSS)
        loss = check_loss(loss)
        self._updates += 1
        self._step_count += 1
        self._cadence.check(self.detector.bucket_size)
        self._join_new_groups(self._updates - 1)
        if not self.detector.finished:
            self.accumulator.add(loss)
            self._warmup_ramp()
            if self.accumulator.updates >= self.detector.next_observation_in:
                self._observe_pending_losses()
            if self.cooldown_lrs is not None:
                self._cool_down()

    def step_eval(self, value: Union[float, torch.Tensor, None]) -> None:
        """Record one evaluation result (a float or 0-dim tensor; ``eval_mode`` says which way is better):
        the stable phase also ends once the held-out metric has stopped improving. Call it after each
        evaluation, on every rank: ranks decide on the mean of their values. ``None`` (an evaluation that was
        skipped, as timm's ``train.py`` passes it) changes nothing."""
        if value is None:
            return
        value = check_loss(value, "evaluation result")
        if self.detector.finished:
            self.detector.observe_eval(mean_over_ranks(value))
            return
        if self.accumulator.updates:
            self._observe_pending_losses()  # the detector's clock reaches this update before it judges
        self._apply(self.detector.observe_eval(mean_over_ranks(value)))
        if self.cooldown_lrs is not None:
            self._cool_down()

    @property
    def eval_is_best(self) -> bool:
        """True right after ``step_eval`` when that evaluation is the run's best so far: save the model then,
        to keep the best one if the metric falls late in the run."""
        return self.detector.evaluations.is_best

    def _observe_pending_losses(self) -> None:
        count = self.accumulator.updates
        losses = self.accumulator.read()
        self._apply(self.detector.observe(losses.mean, count, losses.nonfinite))

    def _apply(self, decision: Decision) -> None:
        self.last_decision = decision
        if decision.action == "decay":
            self._scale_lrs(self.decay_rate)
        elif decision.action == "cooldown":
            self.cooldown_lrs = self._current_lrs()

    # -- what happens to the LRs -------------------------------------------------------------
    def _current_lrs(self) -> List[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def get_last_lr(self) -> List[float]:
        """Every group's LR now (other schedulers stepped side by side may have scaled it too)."""
        return self._current_lrs()

    def _scale_lrs(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].mul_(factor)  # in place, and without reading a device tensor back
            else:
                group["lr"] = group["lr"] * factor

    def _warmup_ramp(self) -> None:
        """LinearLR's ramp, as a ratio of the LR at this update to the LR at the previous one."""
        start, length, done = self.warmup_start_factor, self.detector.warmup_updates, self._updates
        if start is None or done > length:
            return
        previous, now = (start + (1.0 - start) * (t / length) for t in (done - 1, done))
        self._scale_lrs(now / previous)

    def _cool_down(self) -> None:
        for group, stage_lr, base_lr in zip(self.optimizer.param_groups, self.cooldown_lrs, self.base_lrs):
            # the group's LR at the cooldown's start is its stage LR, whatever scaled it before
            _set_lr(group, self.detector.lr_at(self._updates, stage_lr, 1.0, self.floor_share * base_lr))

    def _join_new_groups(self, update: int) -> None:
        """A param group added since the LRs were set for ``update`` joins at its LR (``lr_rules``)."""
        joining = self.optimizer.param_groups[len(self.base_lrs):]
        if not joining:  # every update but the one after add_param_group: nothing to compute
            return
        factor = self.detector.lr_at(update, 1.0, self.decay_rate, self.floor_share)
        for group in joining:
            group.setdefault("initial_lr", float(group["lr"]))
            self.base_lrs.append(joining_initial_lr(float(group["lr"]), factor))
            if self.cooldown_lrs is not None:
                self.cooldown_lrs.append(self.base_lrs[-1] * self.decay_rate ** self.detector.stage)

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Detector state, the LR of every group, and the losses accumulated since the detector's
        last observation (read back once per checkpoint), so a resumed run decides as an unbroken one.
        JSON-able (plain floats even for tensor LRs), versioned."""
        self._join_new_groups(self._updates)
        return scheduler_state(self)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a state written by this release or an older one. The whole state is checked before
        any of it is applied; a bad one raises ``StateError`` (a ValueError) naming the bad key. The
        optimizer must have as many param groups as when the state was saved."""
        self._join_new_groups(self._updates)
        state = migrate_scheduler_state(state_dict)
        check_scheduler_state(self, state)
        ours = {name: getattr(self.detector, name) for name in EVALUATION_SETTINGS}
        self.detector.load_state_dict(adopt_evaluation_settings(state["detector"], ours))  # checked whole first
        self.accumulator.load_state_dict(state["pending_losses"])
        self._updates = state["last_epoch"]
        self.base_lrs = [float(lr) for lr in state["base_lrs"]]
        self.cooldown_lrs = None if state["cooldown_lrs"] is None else [float(lr) for lr in state["cooldown_lrs"]]
        for group, lr in zip(self.optimizer.param_groups, state["lrs"]):
            _set_lr(group, float(lr))
        self._last_lr = self._current_lrs()


def _claim(optimizer: Any, sched: "AutoDecayLR") -> None:
    """Warns when another AutoDecayLR still drives this optimizer: stepping both would apply each decay twice."""
    inner = _innermost(optimizer)
    other = getattr(inner, "_autodecay_scheduler", None)
    if other is not None and other() is not None:
        warnings.warn("this optimizer already has an AutoDecayLR: stepping both applies every decay twice. Keep "
                      "one (to resume, build it once and call load_state_dict)", RuntimeWarning, stacklevel=3)
    inner._autodecay_scheduler = weakref.ref(sched)


def _check_extra_arguments(settings: Dict[str, Any]) -> None:
    if "last_epoch" in settings:
        raise TypeError("AutoDecayLR takes no last_epoch: to resume a run, build it as before and call "
                        "sched.load_state_dict(state) with the state saved in the checkpoint")
    check_known(settings, SETTINGS, "argument(s) of AutoDecayLR", TypeError,
                f"it takes decay_rate, warmup_start_factor, min_lr and the detector's settings {sorted(SETTINGS)}")


class _Cadence:
    """Warns once when ``step(loss)`` is not called once per optimizer update (once per epoch, say):
    AutoDecay counts time in updates, so its window and budget would be off by that factor."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer_updates = self.steps = 0
        self.warned = False
        this = weakref.ref(self)

        def count(*_: Any) -> None:
            cadence = this()
            if cadence is not None:
                cadence.optimizer_updates += 1

        try:
            self.handle = _innermost(optimizer).register_step_post_hook(count)
        except (AttributeError, RuntimeError):  # an optimizer without step hooks: nothing to compare
            self.handle = None

    def __getstate__(self) -> Dict[str, Any]:
        # a pickled or copied scheduler counts no optimizer updates: its hook stays with the original
        return {**self.__dict__, "handle": None}

    def check(self, bucket_size: int) -> None:
        self.steps += 1
        updates, steps = self.optimizer_updates, self.steps
        if self.warned or self.handle is None or not updates:
            return
        slack = max(CADENCE_SLACK, 2 * bucket_size)
        if updates >= CADENCE_RATIO * steps and updates - steps >= slack:
            what = "less often than the optimizer updates (once per epoch?)"
        elif steps >= CADENCE_RATIO * updates and steps - updates >= slack:
            what = ("more often than the optimizer updates (per micro-batch? Accelerate's prepare() steps a "
                    "scheduler once per process: keep AutoDecayLR out of prepare())")
        else:
            return
        self.warned = True
        warnings.warn(f"AutoDecayLR.step(loss) was called {steps} times while the optimizer took {updates} "
                      f"updates: {what}. Call it once after every optimizer.step(): AutoDecay counts time in "
                      "updates, so its window and budget are off otherwise.", RuntimeWarning, stacklevel=3)
