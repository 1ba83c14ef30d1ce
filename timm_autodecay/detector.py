"""The stage detector: decides from the training loss alone when a learning stage has ended.

Pure Python (no torch), deterministic, JSON-serialisable state, bounded memory. Every adapter
(PyTorch, timm, Transformers, recipes, replay) feeds it losses and applies its decisions.

The test, in plain words
------------------------
Time is counted in optimizer updates. Losses are averaged into buckets (``window / 25`` updates
each, or coarser if the caller observes coarser). Over the last ``window`` updates of the current
stage an ordinary least-squares line is fitted through the bucket means (weighted by their update
counts). Its slope is judged against the loss's own noise: the residual scatter around the line,
inflated for the lag-1 autocorrelation of the residuals (SGD noise is correlated over nearby
updates; without this the test would see trends in the wander of the loss). That gives

* ``t``: how many standard errors the loss is still falling per update, and
* ``drop``: how much the fitted line falls over one window, relative to the mean loss there.

The loss *has stopped decreasing at a rate that matters* when either there is no significant
decrease (``t < significance``), or the decrease is confidently small (``drop`` plus
``significance`` standard errors is below ``min_relative_drop``; this ends stages in runs so quiet
that any tiny slope is significant). Both are ratios of loss differences, so a loss of 7.0 behaves
exactly like one of 0.07. The condition must hold without a break for ``patience`` updates, and is
only looked at once the stage is a whole window old: the sharp drop right after a decay is a
strong, significant decrease and cannot end a stage. The first stage starts from random weights,
not from a plateau: its loss has a long tail, and the wander of the highest learning rate fakes
short plateaus, so its plateau must also last ``first_stage_patience`` of the stage's age.

On a plateau the detector answers ``decay``, or ``finish`` in the last stage. With a budget
(``total_updates``), no stage may outlast its share ``(total_updates - warmup_updates) / num_stages``
(the StepDecay milestone it replaces); reaching it ends the stage (reason ``budget``). So AutoDecay is
never slower than StepDecay and never ends at a high learning rate.

Defaults and why
----------------
* ``window``: a fifth of a stage's share of the budget (2 epochs of a 30-epoch run); without a budget,
  two epochs; without either, 500 updates. Long enough for a slope to stand out of SGD noise,
  short enough to notice a plateau well before the milestone.
* ``patience``: 0.4 windows, so one lucky window cannot end a stage.
* ``first_stage_patience``: 0.4 of the first stage's age (a plateau first seen at epoch 6 must hold
  until epoch 8.4). Ending the first stage early costs the most accuracy.
* ``significance``: 1.64 standard errors (95% one-sided): a stage goes on only while the loss is
  clearly still falling; a slow creep that the noise can hide is not worth the time.
* ``min_relative_drop``: 1% per window: a loss falling slower than that does not matter.
* ``min_points``: 8 buckets in a window at least, for a meaningful noise estimate; coarser observations
  stretch the window.
"""
from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Tuple

BUCKETS_PER_WINDOW = 25
DEFAULT_WINDOW_SHARE = 0.2
DEFAULT_WINDOW_EPOCHS = 2
DEFAULT_WINDOW_UPDATES = 500

# name -> (type, default, help): the single source of the detector's settings (CLI flags, timm
# YAML keys and callback arguments are generated from it).
SETTINGS: Dict[str, Tuple[type, Any, str]] = {
    "num_stages": (int, 3, "stages in the run; the last one's plateau ends training"),
    "total_updates": (int, None, "budget in updates; no stage outlasts (budget - warmup) / num_stages"),
    "updates_per_epoch": (int, None, "sets the default window (2 epochs) when there is no budget"),
    "warmup_updates": (int, 0, "updates ignored at the start (learning-rate warmup)"),
    "window": (int, None, "updates over which the loss trend is fitted (default: share / 5)"),
    "patience": (int, None, "updates the plateau condition must hold (default: 0.4 windows)"),
    "significance": (float, 1.64, "standard errors of decrease needed to keep a stage going"),
    "min_relative_drop": (float, 0.01, "relative decrease per window below which a stage has ended"),
    "min_points": (int, 8, "fewest buckets a window may hold"),
    "first_stage_patience": (float, 0.4, "the first plateau must also last this fraction of the stage's age"),
}


@dataclass(frozen=True)
class Decision:
    """What to do after an observation, and why."""

    action: str
    stage: int
    update: int
    reason: str = ""
    evidence: Dict[str, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.action != "continue"


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> Optional[int]:
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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise ValueError(f"{name} must be a number in [{low}, {high}), got {value!r}")
    return float(value)


def fit_trend(points: List[Tuple[float, float, float]]) -> Tuple[float, float, float]:
    """Weighted OLS of (time, value, weight) points: slope, its autocorrelation-aware standard
    error, and the weighted mean value."""
    total = sum(w for _, _, w in points)
    t_mean = sum(t * w for t, _, w in points) / total
    y_mean = sum(y * w for _, y, w in points) / total
    sxx = sum(w * (t - t_mean) ** 2 for t, _, w in points)
    sxy = sum(w * (t - t_mean) * (y - y_mean) for t, y, w in points)
    slope = sxy / sxx
    residuals = [(y - y_mean - slope * (t - t_mean), w) for t, y, w in points]
    rss = sum(w * r * r for r, w in residuals)
    n = len(points)
    variance = rss / (n - 2) / sxx
    lag1 = sum(a * b for (a, _), (b, _) in zip(residuals, residuals[1:]))
    sq = sum(r * r for r, _ in residuals)
    rho = min(max(lag1 / sq, 0.0), 0.9) if sq > 0 else 0.0
    return slope, math.sqrt(variance * (1 + rho) / (1 - rho)), y_mean


class FollowsDetector:
    """What every adapter shows of its ``self.detector``: the stage, whether the run is over, and
    the transitions so far."""

    detector: "StageDetector"

    @property
    def stage(self) -> int:
        return self.detector.stage

    @property
    def finished(self) -> bool:
        """True once the last learning stage has ended: training should stop."""
        return self.detector.finished

    @property
    def history(self) -> List[Dict[str, Any]]:
        return self.detector.history


class StageDetector:
    """Ends each learning stage once the training loss stops decreasing at a rate that matters.

    ``observe(value, count)`` takes the mean loss of ``count`` consecutive updates and returns a
    :class:`Decision`. See the module docstring for the test and its defaults.
    """

    SETTINGS = SETTINGS

    def __init__(
        self,
        num_stages: int = 3,
        total_updates: Optional[int] = None,
        updates_per_epoch: Optional[int] = None,
        warmup_updates: int = 0,
        window: Optional[int] = None,
        patience: Optional[int] = None,
        significance: float = 1.64,
        min_relative_drop: float = 0.01,
        min_points: int = 8,
        first_stage_patience: float = 0.4,
    ):
        self.num_stages = check_int("num_stages", num_stages, 1)
        self.total_updates = check_int("total_updates", total_updates, 1, allow_none=True)
        self.updates_per_epoch = check_int("updates_per_epoch", updates_per_epoch, 1, allow_none=True)
        self.warmup_updates = check_int("warmup_updates", warmup_updates, 0)
        self.significance = check_float("significance", significance, 0.0)
        self.min_relative_drop = check_float("min_relative_drop", min_relative_drop, 0.0, 1.0)
        self.min_points = check_int("min_points", min_points, 3)
        self.first_stage_patience = check_float("first_stage_patience", first_stage_patience, 0.0)
        if self.total_updates is not None:
            if self.warmup_updates >= self.total_updates:
                raise ValueError(
                    f"warmup_updates ({warmup_updates}) must be smaller than total_updates ({total_updates})"
                )
            self.stage_budget: Optional[float] = (self.total_updates - self.warmup_updates) / self.num_stages
        else:
            self.stage_budget = None
        self.window = check_int("window", window, 2, allow_none=True) or self._default_window()
        self.patience = check_int("patience", patience, 0, allow_none=True)
        if self.patience is None:
            self.patience = int(round(0.4 * self.window))
        self.bucket_size = max(1, self.window // BUCKETS_PER_WINDOW)
        self._reset_run()

    def _default_window(self) -> int:
        if self.stage_budget is not None:
            return max(2, int(round(DEFAULT_WINDOW_SHARE * self.stage_budget)))
        if self.updates_per_epoch is not None:
            return DEFAULT_WINDOW_EPOCHS * self.updates_per_epoch
        return DEFAULT_WINDOW_UPDATES

    def _reset_run(self) -> None:
        self.update = 0
        self.stage = 0
        self.finished = False
        self.stage_start = self.warmup_updates
        self.nonfinite_losses = 0
        self.nonfinite_streak = 0
        self.history: List[Dict[str, Any]] = []
        self._reset_stage()

    def _reset_stage(self) -> None:
        self._bucket_sum = 0.0
        self._bucket_count = 0
        self._points: Deque[Tuple[float, float, float]] = deque()
        self._plateau_since: Optional[int] = None

    # -- settings ---------------------------------------------------------------------------
    def settings(self) -> Dict[str, Any]:
        """All settings, resolved defaults included (JSON-able)."""
        return {name: getattr(self, name) for name in SETTINGS}

    @classmethod
    def from_settings(cls, settings: Dict[str, Any]) -> "StageDetector":
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown AutoDecay setting(s) {unknown}; known: {sorted(SETTINGS)}")
        return cls(**settings)

    @property
    def next_observation_in(self) -> int:
        """Updates until the detector next wants a value: its bucket is full or a budget boundary
        is reached. Adapters that accumulate on a device read it back only then."""
        if self.finished:
            return 0
        due = self.bucket_size - self._bucket_count
        if self.update < self.warmup_updates:
            due = self.warmup_updates - self.update
        if self.stage_budget is not None:
            boundary = math.ceil(self.stage_start + self.stage_budget - 1e-9)
            due = min(due, max(1, boundary - self.update))
        return max(1, due)

    # -- the decision ------------------------------------------------------------------------
    def observe(self, value: float, count: int = 1, nonfinite: int = 0) -> Decision:
        """Take the mean training loss of the next ``count`` updates; return the decision.

        ``nonfinite``: how many non-finite losses the caller left out of ``value`` (they are
        counted and reported, never judged)."""
        count = check_int("count", count, 1)
        if self.finished:
            raise RuntimeError("the last stage has ended; training should have stopped")
        value = float(value)
        self.update += count
        finite = math.isfinite(value)
        if not finite:
            self._observe_nonfinite(value, count, nonfinite or count)
        elif nonfinite:
            self._count_nonfinite(nonfinite)
        if self.update <= self.warmup_updates:
            return Decision("continue", self.stage, self.update, "warmup")
        if finite:
            self.nonfinite_streak = 0
            counted = min(count, self.update - self.warmup_updates)
            self._bucket_sum += value * counted
            self._bucket_count += counted
            if self._bucket_count >= self.bucket_size:
                self._add_point()
        age = self.update - self.stage_start
        if self.stage_budget is not None and age >= self.stage_budget - 1e-9:
            return self._end_stage("budget", {"age": age})  # time, not the loss, ends it
        if not finite:
            return Decision("continue", self.stage, self.update, "non-finite loss ignored")
        return self._test_plateau(age)

    def _count_nonfinite(self, losses: int) -> None:
        if not self.nonfinite_losses:
            warnings.warn(
                "AutoDecay is ignoring non-finite training losses: they never end a stage. "
                "Their count is `nonfinite_losses` in the scheduler's state.",
                RuntimeWarning,
                stacklevel=4,
            )
        self.nonfinite_losses += losses

    def _observe_nonfinite(self, value: float, count: int, losses: int) -> None:
        self._count_nonfinite(losses)
        self.nonfinite_streak += count
        if self.nonfinite_streak >= self.window:
            raise FloatingPointError(
                f"AutoDecay saw only non-finite training losses (last: {value}) for "
                f"{self.nonfinite_streak} updates, a whole window; the run has diverged"
            )

    def _add_point(self) -> None:
        count = self._bucket_count
        self._points.append((self.update - count / 2.0, self._bucket_sum / count, float(count)))
        self._bucket_sum, self._bucket_count = 0.0, 0
        while len(self._points) > self.min_points and (
            self.update - (self._points[1][0] - self._points[1][2] / 2.0) >= self.window
        ):
            self._points.popleft()

    def _test_plateau(self, age: float) -> Decision:
        if age < self.window or len(self._points) < self.min_points or self._bucket_count:
            return Decision("continue", self.stage, self.update)
        slope, stderr, level = fit_trend(list(self._points))
        t = -slope / stderr if stderr > 0 else (math.inf if slope < 0 else 0.0)
        scale = abs(level) if level != 0 else 1.0
        span = self.window
        drop = -slope * span / scale
        drop_upper = drop + self.significance * stderr * span / scale
        evidence = {"t": t, "relative_drop": drop, "relative_drop_upper": drop_upper}
        if t >= self.significance and drop_upper >= self.min_relative_drop:
            self._plateau_since = None
            return Decision("continue", self.stage, self.update, "", evidence)
        if self._plateau_since is None:
            self._plateau_since = self.update
        if self.update - self._plateau_since < self._required_patience():
            return Decision("continue", self.stage, self.update, "", evidence)
        return self._end_stage("plateau", evidence)

    def _required_patience(self) -> float:
        if self.stage > 0:
            return self.patience
        return max(self.patience, self.first_stage_patience * (self._plateau_since - self.stage_start))

    def _end_stage(self, reason: str, evidence: Dict[str, float]) -> Decision:
        last = self.stage == self.num_stages - 1
        action = "finish" if last else "decay"
        self.history.append({"update": self.update, "action": action, "stage": self.stage, "reason": reason})
        if last:
            self.finished = True
        else:
            self.stage += 1
            self.stage_start = self.update
            self._reset_stage()
        return Decision(action, self.stage, self.update, reason, evidence)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly where this detector is (JSON-able)."""
        return {
            "settings": self.settings(),
            "update": self.update,
            "stage": self.stage,
            "finished": self.finished,
            "stage_start": self.stage_start,
            "nonfinite_losses": self.nonfinite_losses,
            "nonfinite_streak": self.nonfinite_streak,
            "history": [dict(h) for h in self.history],
            "bucket_sum": self._bucket_sum,
            "bucket_count": self._bucket_count,
            "points": [list(p) for p in self._points],
            "plateau_since": self._plateau_since,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["settings"] != self.settings():
            raise ValueError(
                f"AutoDecay settings differ from the checkpoint's: {state['settings']} != {self.settings()}"
            )
        self.update = state["update"]
        self.stage = state["stage"]
        self.finished = state["finished"]
        self.stage_start = state["stage_start"]
        self.nonfinite_losses = state["nonfinite_losses"]
        self.nonfinite_streak = state["nonfinite_streak"]
        self.history = [dict(h) for h in state["history"]]
        self._bucket_sum = state["bucket_sum"]
        self._bucket_count = state["bucket_count"]
        self._points = deque(tuple(p) for p in state["points"])
        self._plateau_since = state["plateau_since"]
