"""Checks of the Trainer's setup at train start: a scheduler AutoDecay can drive, and loss logs often enough."""
from __future__ import annotations

import math
import warnings

from torch.optim.lr_scheduler import LambdaLR

from timm_autodecay.detector import StageDetector

# The Trainer's lr_scheduler_type values that build a LambdaLR (transformers.optimization.get_scheduler)
LAMBDA_SCHEDULES = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt",
    "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)


def setting_name(value) -> str:
    return str(getattr(value, "value", value))


def check_scheduler(args, lr_scheduler) -> None:
    """AutoDecay scales a LambdaLR's ``base_lrs``; any other scheduler computes its LR from its own state
    and would undo (or fight) each decay."""
    if isinstance(lr_scheduler, LambdaLR):
        if not all("initial_lr" in group for group in lr_scheduler.optimizer.param_groups):
            raise ValueError("AutoDecayCallback: the optimizer's param groups lack 'initial_lr' (set by LRScheduler)")
        return
    name = type(lr_scheduler).__name__
    chosen = setting_name(args.lr_scheduler_type)
    if chosen in LAMBDA_SCHEDULES:
        got = f"a {name} passed to the Trainer (optimizers=(optimizer, scheduler))"
    else:
        got = f"lr_scheduler_type={chosen!r} ({name})"
    raise ValueError(
        f"AutoDecayCallback cannot drive {got}: AutoDecay decays the learning rate by scaling the base LRs "
        "of a LambdaLR (lr = base_lr x lambda(step)), and a scheduler that computes its LR from its own state "
        "would undo or fight each decay. Let the Trainer build its scheduler with "
        "lr_scheduler_type='constant_with_warmup' (warmup, then AutoDecay's stages) or 'constant'; the other "
        f"LambdaLR types ({', '.join(repr(t) for t in LAMBDA_SCHEDULES[2:])}) also compose, their curve "
        "multiplied by AutoDecay's decays. A schedule of your own goes in as a torch LambdaLR."
    )


def check_logging(args, state, detector: StageDetector) -> None:
    """AutoDecay reads the loss from the Trainer's logs: refuse no logging, warn when they are too sparse."""
    strategy = setting_name(args.logging_strategy)
    if strategy == "no":
        raise ValueError(
            "AutoDecayCallback reads the training loss from the Trainer's logs, but logging_strategy='no'; "
            "set logging_strategy='steps' and logging_steps"
        )
    if strategy == "epoch":
        interval = math.ceil(state.max_steps / max(state.num_train_epochs, 1))
        what = f"logging_strategy='epoch' ({interval} steps per log)"
    else:
        interval = state.logging_steps
        what = f"logging_steps={interval}"
    per_window = detector.window / interval
    if per_window >= detector.min_points or not state.is_local_process_zero:
        return
    needed = detector.window // detector.min_points
    stretched = detector.min_points * interval
    consequence = f"it stretches its window to {stretched} steps, so stages end later"
    if detector.stage_budget is not None and stretched >= detector.stage_budget - detector.patience:
        consequence = (
            f"a stretched window ({stretched} steps) does not fit in a stage's share of the budget "
            f"({detector.stage_budget:g} steps): stages end only at the budget, like StepDecay"
        )
    if detector.window >= detector.min_points:
        advice = (f"Set logging_steps <= {needed} in TrainingArguments (logging_strategy='steps'), "
                  "or pass window=... to AutoDecayCallback")
    else:
        advice = (f"The window is shorter than {detector.min_points} steps, too short even when logging "
                  f"every step: pass window=... (>= {detector.min_points} x logging_steps) to "
                  "AutoDecayCallback, or train longer")
    warnings.warn(
        f"AutoDecayCallback: {what} gives {per_window:.2g} loss logs per AutoDecay window of "
        f"{detector.window} steps; the detector needs >= {detector.min_points} (min_points), "
        f"{consequence}. {advice}",
        UserWarning,
        stacklevel=2,
    )
