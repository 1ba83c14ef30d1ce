"""Which of the Trainer's loss logs AutoDecay may trust, and when they show that the run has diverged.

The Trainer logs ``loss`` = the sum of the per-update losses since the previous log over the number of
updates, and ``grad_norm`` = the gradient norm of the last update alone. With its default
``logging_nan_inf_filter=True`` a non-finite loss is not added; in its place goes the running sum since the
previous log divided by the updates since then, this one included (``Trainer._inner_training_loop``). So:

* every update since the previous log non-finite: the running sum stays 0 and the log says ``loss 0.0``,
  with a non-finite ``grad_norm`` (the gradients of a non-finite loss are non-finite);
* the last updates non-finite, the first ones finite: a finite loss, biased low, with a non-finite
  ``grad_norm``;
* the filter off: ``loss`` NaN or inf if any update of the interval was.

A non-finite gradient at the last update may also be a mixed-precision overflow that the grad scaler
skips (the weights stay finite), and one bad batch is not divergence. Hence the rules: a log whose loss
is non-finite or whose gradient norm is, is left out of the detector's input. If its last gradient was
finite (the run recovered inside the interval), the detector's clock still runs over its updates, so
budget boundaries and the cooldown's end hold. If not, its updates wait for the next log, no decision is
taken on it and no checkpoint is written at its step (the weights may be NaN). Two logs in a row in which
every loss was non-finite and the last gradient too mean the run has diverged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

DIVERGED_AFTER_LOGS = 2  # logs in a row holding only non-finite losses; one may be a batch the scaler skipped


@dataclass(frozen=True)
class LossLog:
    """What one loss log tells AutoDecay."""

    loss: float
    grad_norm: Optional[float]
    trusted: bool  # the loss is the mean of finite per-update losses: the detector may use it
    all_nonfinite: bool  # every update since the previous log had a non-finite loss

    @property
    def weights_suspect(self) -> bool:
        """The last update's gradient was non-finite: unless a grad scaler skipped it, so are the weights."""
        return self.grad_norm is not None and not math.isfinite(self.grad_norm)

    def describe(self) -> str:
        grad = "" if self.grad_norm is None else f", grad_norm {self.grad_norm}"
        return f"loss {self.loss}{grad}"


def read_loss_log(logs: Dict[str, Any]) -> LossLog:
    loss = float(logs["loss"])
    grad_norm = logs.get("grad_norm")
    grad_norm = None if grad_norm is None else float(grad_norm)
    loss_finite = math.isfinite(loss)
    grad_finite = grad_norm is None or math.isfinite(grad_norm)
    if loss_finite:
        # the filter's signature: nothing was added since the previous log (a true loss of exactly 0
        # has a finite gradient)
        all_nonfinite = loss == 0.0 and not grad_finite
    else:
        # with a finite last gradient the run recovered inside the interval (a skipped batch)
        all_nonfinite = grad_norm is None or not grad_finite
    return LossLog(loss, grad_norm, loss_finite and grad_finite, all_nonfinite)


class DivergenceWatch:
    """Counts the loss logs in a row that hold only non-finite losses; raises once they show divergence."""

    def __init__(self) -> None:
        self.steps: List[int] = []
        self.last_trusted_step: Optional[int] = None

    def update(self, step: int, log: LossLog) -> None:
        if log.trusted:
            self.last_trusted_step = step
        if not log.all_nonfinite:
            self.steps = []
            return
        self.steps.append(step)
        if len(self.steps) >= DIVERGED_AFTER_LOGS:
            raise FloatingPointError(self._message(log))

    def _message(self, log: LossLog) -> str:
        good = self.last_trusted_step
        resume = f"from step {good} or earlier" if good is not None else "(none has a finite loss log)"
        steps = " and ".join(str(s) for s in self.steps[-DIVERGED_AFTER_LOGS:])
        return (
            f"AutoDecayCallback: the run has diverged: the loss logs at steps {steps} hold no finite training "
            f"loss ({log.describe()}; with logging_nan_inf_filter=True the Trainer logs 0.0 when every loss "
            "since the previous log was NaN or inf). AutoDecay took no decision on these logs and let no "
            f"checkpoint be written at a step with a non-finite gradient. Resume from a checkpoint {resume} "
            "with a lower learning_rate, a longer warmup or gradient clipping (max_grad_norm)."
        )
