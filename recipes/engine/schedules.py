"""One interface for every learning-rate schedule the recipes' loop trains with.

The loop knows only `Schedule` and never a schedule's name:

- `make_optimizer(model, cfg)`: the optimizer (SGD from the config; a peer that owns its optimizer
  builds its own);
- `start(optimizer, updates_per_epoch, total_updates)`: once the run's shape is known, before the first
  update (`total_updates` is the budget, `epochs x updates_per_epoch`);
- `after_update(loss)` after every optimizer step (the update's mean loss, a 0-dim tensor on the
  device) and `after_epoch(epochs_done, train_loss, metrics)` after every evaluation: how the LR
  evolves and what the schedule observes; either returns True to end the run there;
- `stage`: the number of stages ended so far; the loop marks (and checkpoints) a stage end when it grows;
- `evaluation(model, batches)`: a context the loop evaluates in (most schedules: nothing to do);
- `state_dict()` / `load_state_dict()`: what a checkpoint keeps so that a resumed run continues exactly;
- `summary()`: what the schedule adds to the run's `summary.json`.

Variation by overriding, as in timm's `scheduler/`: a per-epoch schedule overrides `after_epoch` and
leaves `after_update` alone. The peers that are not plain LR schedules (dlib's slope test, SASA+,
schedule-free) live in `slope_test.py` and `optimizer_schedules.py`; `peers.py` names them all.
"""
import contextlib
import functools
import math
import warnings

from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, MultiStepLR, ReduceLROnPlateau

from timm_autodecay import AutoDecayLR

from .config import ConfigError
from .optimizers import sgd_optimizer


def current_lr(optimizer) -> float:
    """The learning rate of the optimizer's first param group (every group follows the same schedule)."""
    return optimizer.param_groups[0]["lr"]


def scale_lr(optimizer, factor: float) -> None:
    """Multiply every param group's learning rate by `factor` (as `MultiStepLR` computes a decay)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor


class Schedule:
    """A constant learning rate, and the interface every schedule keeps (see the module docstring)."""

    def __init__(self):
        self.stage = 0
        self.optimizer = self.scheduler = None  # the scheduler, if any, is checkpointed with the schedule
        self.updates_per_epoch = self.total_updates = None
        self._last_lr = None  # the LR seen after the previous hook: a lower one ends a stage

    def make_optimizer(self, model, cfg):
        return sgd_optimizer(model, cfg)

    def start(self, optimizer, updates_per_epoch: int, total_updates: int) -> None:
        self.optimizer, self.updates_per_epoch, self.total_updates = optimizer, updates_per_epoch, total_updates
        self._last_lr = current_lr(optimizer)

    def after_update(self, loss) -> bool:
        return False

    def after_epoch(self, epochs_done: int, train_loss: float, metrics: dict) -> bool:
        return False

    def evaluation(self, model, batches):
        return contextlib.nullcontext()

    def summary(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        state = {"stage": self.stage, "last_lr": self._last_lr}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.stage, self._last_lr = state["stage"], state["last_lr"]
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def count_decay(self) -> None:
        """For schedules that decay in steps: an LR below the last one seen ends a stage."""
        lr = current_lr(self.optimizer)
        if lr < self._last_lr:
            self.stage += 1
        self._last_lr = lr


class TorchSchedule(Schedule):
    """A torch LR scheduler stepped after every update."""

    decays_in_steps = True  # False: the LR falls continuously, no update ends a stage

    def make_scheduler(self, optimizer, updates_per_epoch: int, total_updates: int):
        raise NotImplementedError

    def start(self, optimizer, updates_per_epoch, total_updates):
        self.scheduler = self.make_scheduler(optimizer, updates_per_epoch, total_updates)
        super().start(optimizer, updates_per_epoch, total_updates)

    def after_update(self, loss):
        self.scheduler.step()
        if self.decays_in_steps:
            self.count_decay()
        return False


class StepDecay(TorchSchedule):
    """x`decay_rate` at each of `milestones` (epochs), per update (torch `MultiStepLR`)."""

    def __init__(self, milestones: list, decay_rate: float):
        super().__init__()
        self.milestones, self.decay_rate = list(milestones), decay_rate

    def make_scheduler(self, optimizer, updates_per_epoch, total_updates):
        return MultiStepLR(optimizer, [epoch * updates_per_epoch for epoch in self.milestones], gamma=self.decay_rate)


class FixedLength(TorchSchedule):
    """A schedule that anneals the LR to 0 over a length fixed in advance and ends the run there: `updates`
    when given, else `budget_fraction` of the budget (the frontier's points: 40%, 60%, ... of it)."""

    decays_in_steps = False

    def __init__(self, budget_fraction: float = 1.0, updates: int = 0):
        super().__init__()
        self.budget_fraction, self.updates = budget_fraction, updates

    def start(self, optimizer, updates_per_epoch, total_updates):
        self.length = self.updates or round(self.budget_fraction * total_updates)
        if not 0 < self.length <= total_updates:
            raise ConfigError(f"schedule_updates: invalid value {self.length} (1 to the budget, {total_updates})")
        super().start(optimizer, updates_per_epoch, total_updates)

    def after_update(self, loss):
        super().after_update(loss)
        return self.scheduler.last_epoch >= self.length


class Cosine(FixedLength):
    """Cosine from the initial LR to 0 over its length, per update (torch `CosineAnnealingLR`)."""

    def make_scheduler(self, optimizer, updates_per_epoch, total_updates):
        return CosineAnnealingLR(optimizer, T_max=self.length)


def wsd_factor(update: int, length: int, cooldown: int) -> float:
    """Warmup-stable-decay without warmup: 1 until `length - cooldown` updates are done, then 1 - sqrt of
    the cooldown's progress, 0 at `length` (the "1-sqrt" cooldown of timm's and the Trainer's WSD)."""
    progress = (update - (length - cooldown)) / cooldown
    return 1.0 - math.sqrt(min(1.0, progress)) if progress > 0 else 1.0


class WSD(FixedLength):
    """Warmup-stable-decay: the initial LR (no warmup), then a 1-sqrt cooldown to 0 over the last
    `cooldown_fraction` of its length, per update."""

    def __init__(self, budget_fraction: float = 1.0, updates: int = 0, cooldown_fraction: float = 0.2):
        super().__init__(budget_fraction, updates)
        self.cooldown_fraction = cooldown_fraction

    def make_scheduler(self, optimizer, updates_per_epoch, total_updates):
        cooldown = max(1, round(self.cooldown_fraction * self.length))
        return LambdaLR(optimizer, functools.partial(wsd_factor, length=self.length, cooldown=cooldown))


def metric_mode(metric: str) -> str:
    """"min" for a metric whose name says loss, else "max" (as timm's train.py derives its plateau mode)."""
    return "min" if "loss" in metric else "max"


class Plateau(Schedule):
    """torch `ReduceLROnPlateau` on an epoch's `metric`: by default its mean training loss; an evaluation
    metric (`val_top1`, `val_loss`) read from the epoch's results, its mode from its name."""

    def __init__(self, patience: int, decay_rate: float, metric: str = "train_loss"):
        super().__init__()
        self.patience, self.decay_rate, self.metric = patience, decay_rate, metric

    def start(self, optimizer, updates_per_epoch, total_updates):
        self.scheduler = ReduceLROnPlateau(optimizer, mode=metric_mode(self.metric), factor=self.decay_rate,
                                           patience=self.patience)
        super().start(optimizer, updates_per_epoch, total_updates)

    def after_epoch(self, epochs_done, train_loss, metrics):
        self.scheduler.step(train_loss if self.metric == "train_loss" else eval_value(metrics, self.metric))
        self.count_decay()
        return False


def eval_value(metrics: dict, metric: str) -> float:
    """The epoch's `metric`; a missing one (no validation split) is a ConfigError naming the keys to set."""
    if metric not in metrics:
        raise ConfigError(f"eval_metric: no {metric!r} in the epoch's results (set val_samples to hold out a "
                          f"validation split; results: {', '.join(metrics)})")
    return metrics[metric]


class TimmPlateau(Plateau):
    """timm's `PlateauLRScheduler` stepped as timm's `train.py` steps it: `step(epoch + 1, eval metric)`, its
    mode from the metric's name (train.py's eval metric is validation top-1: mode max). Its whole inner
    `ReduceLROnPlateau` state is checkpointed (timm's own keeps `best` only)."""

    def __init__(self, decay_rate: float, metric: str = "val_top1", **plateau_settings):
        super().__init__(plateau_settings.get("patience_t", 10), decay_rate, metric)
        self.plateau_settings = plateau_settings

    def start(self, optimizer, updates_per_epoch, total_updates):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from timm.scheduler.plateau_lr import PlateauLRScheduler

            self.timm_scheduler = PlateauLRScheduler(optimizer, decay_rate=self.decay_rate,
                                                     mode=metric_mode(self.metric), **self.plateau_settings)
        self.scheduler = self.timm_scheduler.lr_scheduler
        Schedule.start(self, optimizer, updates_per_epoch, total_updates)

    def after_epoch(self, epochs_done, train_loss, metrics):
        self.timm_scheduler.step(epochs_done, eval_value(metrics, self.metric))
        self.count_decay()
        return False


class AutoDecay(Schedule):
    """`AutoDecayLR` given the run's shape and `settings` (decay_rate, num_stages, any detector setting),
    stepped with every update's loss; the run ends when it finishes. With `eval_metric`, it also hears that
    evaluation after every epoch (`step_eval`, `eval_mode` from the metric's name)."""

    def __init__(self, eval_metric: str = "", **settings):
        super().__init__()
        self.eval_metric, self.settings = eval_metric, settings

    def start(self, optimizer, updates_per_epoch, total_updates):
        evaluation = {"eval_mode": metric_mode(self.eval_metric)} if self.eval_metric else {}
        self.scheduler = AutoDecayLR(optimizer, updates_per_epoch=updates_per_epoch, total_updates=total_updates,
                                     **evaluation, **self.settings)
        super().start(optimizer, updates_per_epoch, total_updates)

    def count_stages(self) -> None:
        """Every transition that decays (a step, or the start of the cooldown) has ended a stage; one call of
        the scheduler may take two (`step_eval` first reads the losses not yet observed)."""
        self.stage = sum(entry["action"] in ("decay", "cooldown") for entry in self.scheduler.history)

    def after_update(self, loss):
        self.scheduler.step(loss)
        self.count_stages()
        return self.scheduler.finished

    def after_epoch(self, epochs_done, train_loss, metrics):
        if self.eval_metric:
            self.scheduler.step_eval(eval_value(metrics, self.eval_metric))
            self.count_stages()
        return self.scheduler.finished

    def summary(self):
        return {"autodecay_history": self.scheduler.history}
