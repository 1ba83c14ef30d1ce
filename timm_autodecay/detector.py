"""The stage detector: decides from the training loss alone when a learning stage has ended.

Pure Python (no torch), deterministic, JSON-serialisable state, bounded memory. Every adapter
(PyTorch, timm, Transformers, recipes, replay) feeds it losses and applies its decisions.

The test, in plain words
------------------------
Time is counted in optimizer updates. Losses are averaged into buckets (``window / 25`` updates
each, or coarser if the caller observes coarser). Over the last ``window`` updates of the current
stage a line is fitted through the bucket means (``trend.py``: robust to a bad batch, then weighted
least squares). Its slope is judged against the loss's own noise: the residual scatter around the
line, inflated for the lag-1 autocorrelation of the residuals (SGD noise is correlated over nearby
updates; without this the test would see trends in the wander of the loss). That gives

* ``t``: how many standard errors the loss is still falling per update, and
* ``progress``: how much the fitted line falls over the window (plus ``significance`` standard
  errors), as a share of how far the stage's loss has fallen since the stage's first window.

The loss *has stopped decreasing at a rate that matters* when either there is no significant
decrease (``t < significance``), or the decrease is confidently small next to what the stage has
already achieved (``progress < min_progress``: diminishing returns, which ends stages in runs so
quiet that any tiny slope is significant). Both are ratios of loss differences, so the decisions do
not change when the loss is replaced by ``a * loss + b`` (a > 0): a loss of 7.0 behaves like 0.07,
and label smoothing, an entropy floor or a regulariser in the loss change nothing. The condition
must hold without a break for ``patience`` updates, and is only looked at once the stage is a whole
window old: the sharp drop right after a decay is a strong, significant decrease and cannot end a
stage. The first stage starts from random weights, not from a plateau: its loss has a long tail,
and the wander of the highest learning rate fakes short plateaus, so its plateau must also last
``first_stage_patience`` of the stage's age.

Evaluation results, when the user gives them (``observe_eval``), also end a stage: once the held-out
metric has stopped improving (``evaluations.py``). On a plateau the detector answers ``decay``, and
at the end of the last stage ``finish`` (step shape) or ``cooldown`` (cooldown shape: the LR anneals
to its floor over ``cooldown_fraction`` of the whole run, then ``finish``). With a budget
(``total_updates``), no stage may outlast its share of the budget left after warmup and cooldown (the
StepDecay milestone it replaces); reaching it ends the stage (reason ``budget``). So AutoDecay is
never slower than the schedule it replaces and never ends at a high learning rate. ``lr_at`` turns
the decisions into a learning rate, for every face.

Defaults and why
----------------
* ``window``: a fifth of a stage's share of the budget (2 epochs of a 30-epoch run); without a budget,
  two epochs; without either, 500 updates. Long enough for a slope to stand out of SGD noise,
  short enough to notice a plateau well before the milestone.
* ``patience``: 0.4 windows, so one lucky window cannot end a stage.
* ``first_stage_patience``: with the step shape, 0.4 of the first stage's age (a plateau first seen at
  epoch 6 must hold until epoch 8.4): ending the first stage early costs the most accuracy. With the
  cooldown shape 0: the stable phase's window, 2.4 times longer, already outlasts fake plateaus.
* ``significance``: 1.64 standard errors (95% one-sided): a stage goes on only while the loss is
  clearly still falling; a slow creep that the noise can hide is not worth the time.
* ``min_progress``: 5%: a window that adds less than a twentieth of the stage's decrease so far is
  not worth its time. A loss falling in a straight line never trips it within its budget share
  (there the last window is at least a quarter of the stage's decrease).
* ``min_points``: 8 buckets in a window at least, for a meaningful noise estimate; coarser observations
  stretch the window.
* ``decay_shape``: ``cooldown``: WSD whose length the detector chooses, on or above the cosine/WSD
  frontier with SGD on a CNN and with AdamW on a transformer (see the README's benchmarks); ``step``,
  the paper's schedule, for studying learning stages.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Tuple

from . import state as saved_state
from .evaluations import EvaluationSeries
from .follows import FollowsDetector
from .lr_rules import annealed_lr
from .settings import (
    COOLDOWN_CURVES, DECAY_SHAPES, DEFAULTS, EVAL_MODES, SETTINGS, check_choice, check_float, check_int, check_known,
)
from .state import STATE_VERSION, StateError, check_state_fields
from .trend import fit_trend

__all__ = ["Decision", "FollowsDetector", "SETTINGS", "STATE_VERSION", "StageDetector", "StateError",
           "check_float", "check_int", "check_state_fields"]

BUCKETS_PER_WINDOW = 25
DEFAULT_WINDOW_SHARE = 0.2
DEFAULT_WINDOW_EPOCHS = 2
DEFAULT_WINDOW_UPDATES = 500
DEFAULT_PATIENCE_WINDOWS = 0.4
DEFAULT_STAGES = {"step": 3, "cooldown": 1}
# The first stage's extra patience guards against the fake short plateaus that a step-shape window (a fifth of
# a third of the budget) sees in the wander of the highest LR. The cooldown shape's one stage is the whole
# stable phase, so its window is 2.4 times longer (4.8 epochs of a 30-epoch run, not 2) and averages that
# wander out by itself.
DEFAULT_FIRST_STAGE_PATIENCE = {"step": 0.4, "cooldown": 0.0}
MAX_COOLDOWN_FRACTION = 0.5  # WSD's cooldowns are 10-20% of the run; past half, the stable phase is the tail
ROUNDING = 1e-9  # budget shares are fractions of updates; compare them with this slack


@dataclass(frozen=True)
class Decision:
    """What to do after an observation, and why."""

    action: str  # continue | decay | cooldown | finish
    stage: int
    update: int
    reason: str = ""
    evidence: Dict[str, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.action != "continue"


class StageDetector:
    """Ends each learning stage once the training loss stops decreasing at a rate that matters.

    ``StageDetector(**settings)`` with the names of ``SETTINGS`` (all optional; pass the run's shape:
    ``total_updates``, ``updates_per_epoch``). ``observe(value, count)`` takes the mean loss of
    ``count`` consecutive updates and returns a :class:`Decision`. See the module docstring.
    """

    SETTINGS = SETTINGS

    def __init__(self, **settings: Any):
        check_known(settings, SETTINGS)
        given = {**DEFAULTS, **settings}
        self.decay_shape = check_choice("decay_shape", given["decay_shape"], DECAY_SHAPES)
        self.cooldown_curve = check_choice("cooldown_curve", given["cooldown_curve"], COOLDOWN_CURVES)
        self.cooldown_fraction = check_float("cooldown_fraction", given["cooldown_fraction"], 0.0, 1.0)
        if not 0.0 < self.cooldown_fraction <= MAX_COOLDOWN_FRACTION:
            raise ValueError(f"cooldown_fraction must be in (0, {MAX_COOLDOWN_FRACTION}], got "
                             f"{self.cooldown_fraction!r}: the cooldown is that share of the whole run, so above "
                             "half of it a short stable phase (a few losses) would set the run's length")
        stages = given["num_stages"]
        self.num_stages = DEFAULT_STAGES[self.decay_shape] if stages is None else check_int("num_stages", stages, 1)
        self.total_updates = check_int("total_updates", given["total_updates"], 1, allow_none=True)
        self.updates_per_epoch = check_int("updates_per_epoch", given["updates_per_epoch"], 1, allow_none=True)
        self.warmup_updates = check_int("warmup_updates", given["warmup_updates"], 0)
        self.significance = check_float("significance", given["significance"], 0.0)
        self.min_progress = check_float("min_progress", given["min_progress"], 0.0, 1.0)
        self.min_points = check_int("min_points", given["min_points"], 3)
        first_patience = given["first_stage_patience"]
        self.first_stage_patience = (DEFAULT_FIRST_STAGE_PATIENCE[self.decay_shape] if first_patience is None
                                     else check_float("first_stage_patience", first_patience, 0.0))
        self.eval_mode = check_choice("eval_mode", given["eval_mode"], EVAL_MODES)
        self.eval_patience = check_int("eval_patience", given["eval_patience"], 1)
        self.stage_budget = self._stage_budget()
        self.window = check_int("window", given["window"], 2, allow_none=True) or self._default_window()
        patience = check_int("patience", given["patience"], 0, allow_none=True)
        self.patience = int(round(DEFAULT_PATIENCE_WINDOWS * self.window)) if patience is None else patience
        self.bucket_size = max(1, self.window // BUCKETS_PER_WINDOW)
        self._reset_run()

    def _stage_budget(self) -> Optional[float]:
        if self.total_updates is None:
            return None
        stable = self.total_updates * (1.0 - self.cooldown_fraction if self.decay_shape == "cooldown" else 1.0)
        if self.decay_shape == "cooldown":  # the cooldown gets an update at least: the budget is a hard bound
            stable = min(stable, self.total_updates - 1)
        if self.warmup_updates >= stable:
            what = "total_updates" if self.decay_shape == "step" else "the budget before the cooldown"
            raise ValueError(f"warmup_updates ({self.warmup_updates}) must be smaller than {what} "
                             f"({stable:g} of total_updates={self.total_updates})")
        if self.num_stages > stable - self.warmup_updates:
            raise ValueError(f"num_stages ({self.num_stages}) exceeds the updates the budget leaves for stages "
                             f"({stable - self.warmup_updates:g}): raise total_updates or lower num_stages")
        return (stable - self.warmup_updates) / self.num_stages

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
        self.cooldown_start: Optional[int] = None
        self.cooldown_updates: Optional[int] = None
        self.nonfinite_losses = 0
        self.nonfinite_streak = 0
        self.history: List[Dict[str, Any]] = []
        self.evaluations = EvaluationSeries(self.eval_mode, self.eval_patience)
        self._reset_stage()

    def _reset_stage(self) -> None:
        self._bucket_sum = 0.0
        self._bucket_count = 0
        self._points: Deque[Tuple[float, float, float]] = deque()
        self._plateau_since: Optional[int] = None
        self._stage_reference: Optional[float] = None  # fitted loss one window into the stage
        self.evaluations.start_stage()

    # -- settings ---------------------------------------------------------------------------
    def settings(self) -> Dict[str, Any]:
        """All settings, resolved defaults included (JSON-able)."""
        return {name: getattr(self, name) for name in SETTINGS}

    @classmethod
    def from_settings(cls, settings: Dict[str, Any]) -> "StageDetector":
        return cls(**settings)

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_start is not None

    @property
    def cooldown_end(self) -> Optional[int]:
        """The update at which the cooldown ends and with it the run (None before the cooldown)."""
        return None if self.cooldown_start is None else self.cooldown_start + self.cooldown_updates

    @property
    def next_observation_in(self) -> int:
        """Updates until the detector next wants a value: its bucket is full, a budget boundary or
        the end of the cooldown is reached. Adapters that accumulate on a device read it back only then."""
        if self.finished:
            return 0
        if self.in_cooldown:  # bucket by bucket still: losses that turn non-finite to its end are seen as such
            return max(1, min(self.bucket_size, self.cooldown_end - self.update))
        due = self.bucket_size - self._bucket_count
        if self.update < self.warmup_updates:
            due = self.warmup_updates - self.update
        if self.stage_budget is not None:
            due = min(due, max(1, self.next_boundary - self.update))
        return max(1, due)

    @property
    def next_boundary(self) -> Optional[int]:
        """The update at which time alone ends the current stage (its budget share) or the cooldown."""
        if self.in_cooldown or self.stage_budget is None:
            return self.cooldown_end  # None without a budget
        return max(self.warmup_updates + 1, math.ceil(self.stage_start + self.stage_budget - ROUNDING))

    def lr_at(self, update: int, base_lr: float, decay_rate: float, min_lr: float = 0.0) -> float:
        """The learning rate after ``update`` updates: ``base_lr * decay_rate ** stage``, and during
        the cooldown on its curve from there down to ``min_lr``, which never raises it (the floor of a
        stage LR already below ``min_lr`` is that LR)."""
        stage_lr = base_lr * decay_rate ** self.stage
        if not self.in_cooldown:
            return stage_lr
        return annealed_lr(stage_lr, min_lr, self.cooldown_curve, self.cooldown_progress(update))

    def cooldown_progress(self, update: int) -> float:
        return 0.0 if not self.in_cooldown else (update - self.cooldown_start) / self.cooldown_updates

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
        if finite and (self.in_cooldown or self.update > self.warmup_updates):
            self.nonfinite_streak = 0
        if self.in_cooldown:
            return self._cooldown_step()
        if self.update <= self.warmup_updates:
            return Decision("continue", self.stage, self.update, "warmup")
        if finite:
            counted = min(count, self.update - self.warmup_updates)
            self._bucket_sum += value * counted
            self._bucket_count += counted
            if self._bucket_count >= self.bucket_size:
                self._add_point()
        age = self.update - self.stage_start
        if self.stage_budget is not None and age >= self.stage_budget - ROUNDING:
            return self._end_stage("budget", {"age": age})  # time, not the loss, ends it
        if not finite:
            return Decision("continue", self.stage, self.update, "non-finite loss ignored")
        return self._test_plateau(age)

    def observe_eval(self, value: float) -> Decision:
        """Take one evaluation result (oriented by ``eval_mode``); return the decision. The stable phase
        (each stage, with the step shape) ends once the metric has stopped improving (``evaluations.py``)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"an evaluation result must be a real number, got {type(value).__name__} {value!r}")
        value = float(value)
        judged = self.evaluations.record(value, self.update)
        if not judged or self.finished or self.in_cooldown or self.update <= self.warmup_updates:
            return Decision("continue", self.stage, self.update, "evaluation recorded")
        evidence = self.evaluations.has_stopped_improving(value)
        if self.evaluations.ended(evidence):
            return self._end_stage("evaluation", evidence)
        return Decision("continue", self.stage, self.update, "", evidence)

    @property
    def best_eval(self) -> Optional[Dict[str, float]]:
        """The run's best evaluation so far and the update it was taken at (None before the first)."""
        if self.evaluations.best_value is None:
            return None
        return {"value": self.evaluations.best_value, "update": self.evaluations.best_update}

    def skip(self, count: int) -> Decision:
        """Advance the clock by ``count`` updates that carry no loss (missing information, e.g. the
        rest of an epoch whose running mean a NaN batch spoiled): never judged, but budget boundaries
        and the cooldown's end still fall where they are due."""
        count = check_int("count", count, 1)
        if self.finished:
            raise RuntimeError("the last stage has ended; training should have stopped")
        self.update += count
        if self.in_cooldown:
            return self._cooldown_step()
        age = self.update - self.stage_start
        if self.update > self.warmup_updates and self.stage_budget is not None and age >= self.stage_budget - ROUNDING:
            return self._end_stage("budget", {"age": age})
        return Decision("continue", self.stage, self.update, "no loss")

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
        trend = fit_trend(list(self._points))
        t = -trend.slope / trend.stderr if trend.stderr > 0 else (math.inf if trend.slope < 0 else 0.0)
        if self._stage_reference is None:
            self._stage_reference = trend.end
        window_drop = (-trend.slope + self.significance * trend.stderr) * self.window
        stage_drop = self._stage_reference - trend.end
        progress = window_drop / stage_drop if stage_drop > 0 else math.inf
        evidence = {"t": t, "progress": progress}
        if t >= self.significance and progress >= self.min_progress:
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
        action = "decay" if not last else ("cooldown" if self.decay_shape == "cooldown" else "finish")
        self.history.append({"update": self.update, "action": action, "stage": self.stage, "reason": reason})
        if action == "finish":
            self.finished = True
        elif action == "cooldown":
            self._start_cooldown()
        else:
            self.stage += 1
            # a budget end starts the next stage at the nominal boundary, so a late observation (coarse
            # logging) or rounding never pushes later boundaries, nor the run's end, past the budget
            self.stage_start = self.stage_start + self.stage_budget if reason == "budget" else self.update
            self._reset_stage()
        return Decision(action, self.stage, self.update, reason, evidence)

    def _start_cooldown(self) -> None:
        share = self.cooldown_fraction / (1.0 - self.cooldown_fraction)
        length = max(1, math.ceil(self.update * share - ROUNDING))
        if self.total_updates is not None:
            length = max(1, min(length, self.total_updates - self.update))
        self.cooldown_start, self.cooldown_updates = self.update, length
        self._reset_stage()

    def _cooldown_step(self) -> Decision:
        if self.update < self.cooldown_end:
            return Decision("continue", self.stage, self.update, "cooldown")
        if self.nonfinite_streak:  # the model the run would end with comes from non-finite losses: not a result
            raise FloatingPointError(
                f"AutoDecay saw only non-finite training losses for the last {self.nonfinite_streak} updates of "
                "the cooldown: the run has diverged, its final model is not a result")
        self.history.append({"update": self.update, "action": "finish", "stage": self.stage, "reason": "cooldown"})
        self.finished = True
        return Decision("finish", self.stage, self.update, "cooldown")

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly where this detector is (JSON-able, versioned)."""
        return {
            "version": STATE_VERSION,
            "settings": self.settings(),
            "update": self.update,
            "stage": self.stage,
            "finished": self.finished,
            "stage_start": self.stage_start,
            "stage_reference": self._stage_reference,
            "cooldown_start": self.cooldown_start,
            "cooldown_updates": self.cooldown_updates,
            "nonfinite_losses": self.nonfinite_losses,
            "nonfinite_streak": self.nonfinite_streak,
            "history": [dict(h) for h in self.history],
            "bucket_sum": self._bucket_sum,
            "bucket_count": self._bucket_count,
            "points": [list(p) for p in self._points],
            "plateau_since": self._plateau_since,
            "evaluations": self.evaluations.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state of this release or an older one; raises StateError (a ValueError) naming
        the bad key, and changes nothing, if any of it is invalid."""
        state = saved_state.migrate(state)
        saved_state.validate(state, self.settings())
        EvaluationSeries.check_state(state["evaluations"])
        self.update = state["update"]
        self.stage = state["stage"]
        self.finished = state["finished"]
        self.stage_start = state["stage_start"]
        self.cooldown_start = state["cooldown_start"]
        self.cooldown_updates = state["cooldown_updates"]
        self.nonfinite_losses = state["nonfinite_losses"]
        self.nonfinite_streak = state["nonfinite_streak"]
        self.history = [dict(h) for h in state["history"]]
        self._bucket_sum = float(state["bucket_sum"])
        self._bucket_count = state["bucket_count"]
        self._points = deque(tuple(float(v) for v in p) for p in state["points"])
        self._plateau_since = state["plateau_since"]
        self._stage_reference = state["stage_reference"]
        self.evaluations.load_state_dict(state["evaluations"])
