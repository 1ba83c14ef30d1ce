"""dlib's slope test as a schedule: decay when the training loss shows no evidence of decreasing.

dlib's `dnn_trainer` keeps the recent losses, fits an OLS line to the newest ones and counts how many
updates back the probability that the loss still decreases stays below 0.51; when both the plain count
and the robust one (the largest 10% of the losses left out) reach the threshold, it decays the LR.
"""
import math
from collections import deque

import numpy as np
from scipy.special import ndtr

from .schedules import Schedule, scale_lr


def count_steps_without_decrease(values, probability_of_decrease: float = 0.51, quantile_discard: float = 0.0) -> int:
    """dlib's `count_steps_without_decrease` (and, with `quantile_discard` > 0, its `_robust` variant).

    Walks back from the newest value, fitting an OLS line to the values seen so far; returns the
    largest number of values examined for which P(the slope is negative) < `probability_of_decrease`.
    The robust variant leaves out values above the (1 - quantile_discard) quantile of the container
    (dlib: `nth_element` at floor(quantile_discard * size) in descending order).
    """
    y = np.asarray(values, dtype=np.float64)[::-1]  # newest first
    if len(y) < 3:
        return 0
    keep = np.ones(len(y), dtype=bool)
    if quantile_discard > 0:
        index = int(math.floor(quantile_discard * len(y)))
        threshold = np.sort(y)[::-1][index]
        keep = y <= threshold
    kept = y[keep]
    n = np.arange(1, len(kept) + 1, dtype=np.float64)
    x = n - 1
    sx, sy = np.cumsum(x), np.cumsum(kept)
    sxx = np.cumsum(x * x) - sx * sx / n
    sxy = np.cumsum(x * kept) - sx * sy / n
    syy = np.cumsum(kept * kept) - sy * sy / n
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = sxy / sxx  # against age: positive when the forward series decreases
        residual = np.maximum(syy - slope * sxy, 0.0) / (n - 2)
        z = slope / np.sqrt(residual / sxx)
    p_decrease = ndtr(np.nan_to_num(z, nan=0.0, posinf=np.inf, neginf=-np.inf))
    no_evidence = (n > 2) & (p_decrease < probability_of_decrease)
    # j values examined -> the fit over the kept ones among them (dlib checks after every value)
    kept_count = np.cumsum(keep)
    usable = kept_count > 2
    hits = np.zeros(len(y), dtype=bool)
    hits[usable] = no_evidence[kept_count[usable] - 1]
    return int(np.nonzero(hits)[0][-1] + 1) if hits.any() else 0


class SlopeTest(Schedule):
    """dlib `dnn_trainer`: keep the last `threshold` losses; check when the budget (+200 per update)
    exceeds `threshold`; if both counts reach `threshold`, multiply the LR by `decay_rate` (or end the
    run, once `num_stages - 1` decays are done) and drop the oldest 20% + 10% of the losses
    (dlib's previous_loss_values_dump_amount 400 of 2000, plus threshold / 10)."""

    def __init__(self, decay_rate: float, num_stages: int = 3, threshold_epochs: float = 3,
                 probability_of_decrease: float = 0.51, quantile_discard: float = 0.10):
        super().__init__()
        self.decay_rate, self.num_stages = decay_rate, num_stages
        self.threshold_epochs = threshold_epochs
        self.probability_of_decrease = probability_of_decrease
        self.quantile_discard = quantile_discard

    def start(self, optimizer, updates_per_epoch, total_updates):
        super().start(optimizer, updates_per_epoch, total_updates)
        self.threshold = round(self.threshold_epochs * updates_per_epoch)
        self.losses, self.budget = deque(maxlen=self.threshold), 0

    def after_update(self, loss):
        self.losses.append(loss.item())
        self.budget += 200
        if self.budget <= self.threshold:
            return False
        self.budget = 0
        if count_steps_without_decrease(self.losses, self.probability_of_decrease) < self.threshold:
            return False
        if count_steps_without_decrease(self.losses, self.probability_of_decrease,
                                        self.quantile_discard) < self.threshold:
            return False
        if self.stage == self.num_stages - 1:
            return True  # the LR would fall below min_learning_rate: dlib stops training
        scale_lr(self.optimizer, self.decay_rate)
        self.count_decay()
        for _ in range(min(len(self.losses), int(0.2 * self.threshold) + self.threshold // 10)):
            self.losses.popleft()
        return False

    def state_dict(self):
        return {**super().state_dict(), "losses": list(self.losses), "budget": self.budget}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.losses, self.budget = deque(state["losses"], maxlen=self.threshold), state["budget"]
