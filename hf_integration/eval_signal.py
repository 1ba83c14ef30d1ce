"""The evaluation signal under the Trainer: which metric, which way is better, whether it is on (the value is
averaged over ranks by ``timm_autodecay.ranks``).

The metric is the one the Trainer keeps the best model by: ``metric_for_best_model``, read from the
evaluation's metrics as ``EarlyStoppingCallback`` reads it (``eval_`` prefixed when missing), its direction
``greater_is_better`` as ``TrainingArguments`` resolves it (a name ending in ``loss`` is lower-better). A
user who sets ``eval_strategy`` and ``metric_for_best_model`` has said what they care about: the signal is
on by default there. ``eval_signal=True`` turns it on elsewhere (``eval_loss`` when no metric is named).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch

from timm_autodecay.settings import DEFAULTS
from timm_autodecay.state import EVALUATION_SETTINGS

from .trainer_setup import setting_name


@dataclass(frozen=True)
class EvalSignal:
    metric: str  # the key in the Trainer's evaluation metrics, e.g. "eval_accuracy"
    mode: str  # "max" when greater is better, else "min" (the detector's eval_mode)


def check_eval_signal(value: Any) -> Optional[bool]:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"eval_signal must be None (on when eval_strategy and metric_for_best_model are set), "
                         f"True or False, got {value!r}")
    return value


def resolve_eval_signal(requested: Optional[bool], args, settings: Mapping[str, Any]) -> Optional[EvalSignal]:
    """The signal this run uses (None: off), from ``eval_signal`` and the TrainingArguments. Raises when it is
    asked for without evaluations, or when an ``eval_mode`` passed disagrees with ``greater_is_better``."""
    strategy = setting_name(args.eval_strategy)
    if requested is None and (strategy == "no" or args.metric_for_best_model is None):
        return None
    if requested is False:
        return None
    if strategy == "no":
        raise ValueError(
            "AutoDecayCallback(eval_signal=True) reads the evaluation results, but eval_strategy='no': the Trainer "
            "never evaluates. Set eval_strategy='steps' (with eval_steps) or 'epoch' in TrainingArguments, or "
            "pass eval_signal=False"
        )
    name = args.metric_for_best_model or "loss"
    metric = name if name.startswith("eval_") else f"eval_{name}"
    greater = args.greater_is_better
    mode = ("max" if greater else "min") if greater is not None else ("min" if name.endswith("loss") else "max")
    given = settings.get("eval_mode")
    if given is not None and given != mode:
        said = (f"greater_is_better={greater}" if greater is not None
                else f"greater_is_better unset ({metric!r} is {'lower' if mode == 'min' else 'higher'}-better)")
        raise ValueError(
            f"AutoDecayCallback(eval_mode={given!r}) disagrees with the TrainingArguments' {said} for the "
            f"metric {metric!r}: the evaluation signal follows greater_is_better. Drop eval_mode, or set "
            "greater_is_better to what you mean"
        )
    return EvalSignal(metric, mode)


def unused_eval_settings(settings: Mapping[str, Any]) -> str:
    """The evaluation settings passed though the signal is off (a sentence), or ''."""
    passed = [f"{name}={settings[name]!r}" for name in EVALUATION_SETTINGS if name in settings]
    return ", ".join(passed)


def evaluation_settings(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """This run's evaluation settings, defaults filled in."""
    return {name: settings.get(name, DEFAULTS[name]) for name in EVALUATION_SETTINGS}


def read_metric(signal: EvalSignal, metrics: Optional[Mapping[str, Any]]) -> Optional[float]:
    """The metric's value in one evaluation's metrics (None when they lack it)."""
    value = (metrics or {}).get(signal.metric)
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"AutoDecayCallback: the evaluation metric {signal.metric!r} is "
                        f"{type(value).__name__} {value!r}, not a number")
    return float(value)
