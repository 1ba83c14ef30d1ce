"""Synthetic training-loss curves with known stage ends, for the detector's tests.

A stage is a noisy exponential decay from the previous plateau to the next one; the curve moves to
the next stage only when the detector under test decays, as a real run would.
"""
import math
import random

PLATEAUS = (1.0, 0.3, 0.1, 0.03)
START = 3.0


def stage_loss(stage, age, tau):
    previous = START if stage == 0 else PLATEAUS[stage - 1]
    return PLATEAUS[stage] + (previous - PLATEAUS[stage]) * math.exp(-age / tau)


def run_closed_loop(detector, tau, noise, scale=1.0, seed=0, max_updates=100_000):
    """Feed per-update losses (multiplicative Gaussian noise) until the detector finishes.

    Returns (decisions, stage ages at each decision)."""
    rng = random.Random(seed)
    decisions, ages, stage_start = [], [], 0
    for update in range(max_updates):
        age = update - stage_start
        value = scale * stage_loss(detector.stage, age, tau) * (1.0 + noise * rng.gauss(0.0, 1.0))
        decision = detector.observe(value)
        if decision.changed:
            decisions.append(decision)
            ages.append(age + 1)
            stage_start = update + 1
            if decision.action == "finish":
                break
    return decisions, ages


def noisy_series(length, seed=0, noise=0.1, tau=300.0):
    """An open-loop series: one stage's decay to its plateau, then flat noise."""
    rng = random.Random(seed)
    return [stage_loss(0, t, tau) * (1.0 + noise * rng.gauss(0.0, 1.0)) for t in range(length)]
