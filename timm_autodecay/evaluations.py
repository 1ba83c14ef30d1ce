"""The evaluation signal: has the held-out metric the user keeps stopped improving?

The training loss is a proxy for held-out quality that fails where a model can memorise: on small
data, with noisy labels and when fine-tuning, the loss keeps falling while the validation metric has
peaked. When the user passes evaluation results (``step_eval`` in the PyTorch face, timm's eval
metric, the Trainer's ``metric_for_best_model``), they end the stable phase too.

Evaluations are few (5 to 60 in a run), each noisy (a finite evaluation set) and not monotone (they
peak, then fall as the model memorises). The test, in plain words: each evaluation is smoothed with
the two before it (the median of three, so one bad evaluation, however far off, is outvoted by its
neighbours), and the phase ends once ``eval_patience`` evaluations have passed without a new best
smoothed value, as ``EarlyStoppingCallback`` counts them, and no fewer than a third of the stage's
evaluations (``PATIENCE_SHARE``). A falling metric sets no new best, so it ends an early phase after
exactly ``eval_patience`` evaluations; a flat, noisy one still sets a chance best now and then (ever
more rarely), so it ends the phase later. Only order comparisons are used: ``a * metric + b`` (a > 0)
takes the same decisions as the metric. One bad evaluation moves the best smoothed value by at most
one evaluation, and so the decision by at most two (the share stretches one to one and a half). A
stage's series starts afresh at each decay (the step shape); evaluations during warmup or the
cooldown are recorded, never judged.

Why the share: a run evaluated 100 times must not stop on a pause of 3 evaluations in the noise of a
metric still rising (simulated: a saturating metric with noise 3% of its rise, evaluated 100 times,
ended at a third of the run with a fixed patience of 3, at the budget with the share); and on small
data (1,500 MNIST-1D samples, 500 for validation) a three-evaluation dip at epoch 10 of 60 ended two
of three stable phases with a quarter, none with a third.

The best evaluation of the whole run (raw, not smoothed) is kept with its update, so a face can
point the user to the best model when the metric falls during the cooldown.
"""
from __future__ import annotations

import math
import warnings
from statistics import median
from typing import Any, Dict, List, Optional

from .state import StateError, check_state_fields

SMOOTHING = 3  # evaluations in the running median
PATIENCE_SHARE = 1 / 3  # of the stage's evaluations: the least patience, however many evaluations a run has

EVALUATION_FIELDS = {
    "recent": list,
    "count": int,
    "best_smoothed": (int, float, type(None)),
    "best_at": (int, type(None)),
    "best_value": (int, float, type(None)),
    "best_update": (int, type(None)),
    "nonfinite": int,
}


def required_patience(patience: int, count: int) -> float:
    """Evaluations without a new best that end a stage after its ``count``-th evaluation."""
    return max(patience, PATIENCE_SHARE * count)


def first_ending(best_count: int, patience: int) -> int:
    """The evaluation (counted from 1 in the stage) that ends the stage when its best smoothed value came at
    ``best_count`` and no better one follows."""
    count = best_count + patience
    while count - best_count < required_patience(patience, count):
        count += 1
    return count


class EvaluationSeries:
    """The evaluations of the current stage, oriented so that higher is better, and the run's best."""

    def __init__(self, mode: str, patience: int):
        self.sign = 1.0 if mode == "max" else -1.0
        self.patience = patience
        self.best_value: Optional[float] = None  # the run's best evaluation, as the user passed it
        self.best_update: Optional[int] = None
        self.nonfinite = 0
        self.is_best = False  # the last evaluation recorded is the run's best so far
        self.start_stage()

    def start_stage(self) -> None:
        self.recent: List[float] = []  # the last SMOOTHING - 1 oriented evaluations
        self.count = 0  # evaluations judged in this stage
        self.best_smoothed: Optional[float] = None
        self.best_at: Optional[int] = None  # the count at which it was set

    def record(self, value: float, update: int) -> bool:
        """Keep the run's best; False if the value is not finite (counted, never judged)."""
        self.is_best = False
        if not math.isfinite(value):
            if not self.nonfinite:
                warnings.warn("AutoDecay is ignoring non-finite evaluation results: they never end a stage. "
                              "Their count is `evaluations.nonfinite` in the detector's state.", RuntimeWarning,
                              stacklevel=4)
            self.nonfinite += 1
            return False
        if self.best_value is None or self.sign * value > self.sign * self.best_value:
            self.best_value, self.best_update, self.is_best = value, update, True
        return True

    def has_stopped_improving(self, value: float) -> Dict[str, float]:
        """Judge a finite evaluation of the stable phase; the evidence, with ``stale`` (evaluations since the
        best smoothed one) reaching ``patience`` when the stage has ended."""
        window = self.recent + [self.sign * value]
        self.recent = window[-(SMOOTHING - 1):]
        self.count += 1
        if len(window) < SMOOTHING:
            return {"evaluations": float(self.count)}
        smoothed = median(window)
        if self.best_smoothed is None or smoothed > self.best_smoothed:
            self.best_smoothed, self.best_at = smoothed, self.count
        return {"evaluations": float(self.count), "stale": float(self.count - self.best_at)}

    def ended(self, evidence: Dict[str, float]) -> bool:
        return evidence.get("stale", 0.0) >= required_patience(self.patience, self.count)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"recent": list(self.recent), "count": self.count, "best_smoothed": self.best_smoothed,
                "best_at": self.best_at, "best_value": self.best_value, "best_update": self.best_update,
                "nonfinite": self.nonfinite}

    @staticmethod
    def check_state(state: Any) -> None:
        check_state_fields(state, EVALUATION_FIELDS, "evaluations")
        recent = state["recent"]
        if len(recent) >= SMOOTHING or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in recent):
            raise StateError(f"AutoDecay state: 'evaluations.recent' must hold at most {SMOOTHING - 1} finite "
                             f"numbers, got {recent!r}")
        for key in ("count", "nonfinite"):
            if state[key] < 0:
                raise StateError(f"AutoDecay state: 'evaluations.{key}' must be >= 0, got {state[key]!r}")
        if (state["best_smoothed"] is None) != (state["best_at"] is None):
            raise StateError("AutoDecay state: 'evaluations.best_at' must be set exactly when 'best_smoothed' "
                             f"is, got {state['best_at']!r}")
        if (state["best_value"] is None) != (state["best_update"] is None):
            raise StateError("AutoDecay state: 'evaluations.best_update' must be set exactly when 'best_value' "
                             f"is, got {state['best_update']!r}")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.recent = [float(v) for v in state["recent"]]
        self.count, self.best_at, self.best_update = state["count"], state["best_at"], state["best_update"]
        self.best_smoothed, self.best_value = state["best_smoothed"], state["best_value"]
        self.nonfinite = state["nonfinite"]
        self.is_best = False
