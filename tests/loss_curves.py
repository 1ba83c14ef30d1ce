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


# -- the spike grid: one bad batch must not move a decision ---------------------------------------
SPIKE_SHAPE = {"total_updates": 3000, "updates_per_epoch": 100, "decay_shape": "step"}
# an outlier is this many times the running loss; 0.0 is a single zero, as a NaN filter may log one
SPIKE_FACTORS = (3.0, 1e3, 1e6, 0.0)
SPIKE_SEEDS = (0, 1, 2, 3, 4)


def falling_curve(seed, length=3000, noise=0.02):
    """``0.2 + 1.8 exp(-i / 1000)`` with multiplicative Gaussian noise: a loss still falling at the end
    of a 3000-update budget, so every stage ends at its budget share. Returns (noisy, noise-free)."""
    rng = random.Random(seed)
    level = [0.2 + 1.8 * math.exp(-i / 1000) for i in range(length)]
    return [v * (1.0 + noise * rng.gauss(0.0, 1.0)) for v in level], level


def plateau_curve(seed, tau, noise, length=3000):
    """``0.2 + 1.8 exp(-i / tau)``, multiplicative Gaussian noise: a loss that levels off long before the
    budget, so its stages end on plateaus, where the test hovers at its threshold. Returns (noisy, noise-free)."""
    rng = random.Random(seed)
    level = [0.2 + 1.8 * math.exp(-i / tau) for i in range(length)]
    return [v * (1.0 + noise * rng.gauss(0.0, 1.0)) for v in level], level


def spike_grid(face, seeds=SPIKE_SEEDS, factors=SPIKE_FACTORS, every=1, curve=falling_curve):
    """Run ``face`` on ``curve(seed)`` (default ``falling_curve``) and on copies of it with one outlier in the middle of
    every ``every``-th bucket of the detector (before the clean run's last decision), for each factor.

    ``face`` is a small adapter over one face of the package: ``start()`` returns a fresh run and
    ``load(saved)`` one resumed from ``run.save()`` (its state dict); a run has ``feed(losses)``
    (per-update losses; it stops at the finish), ``finished``, ``decisions`` [(update, action)] and
    ``bucket_size``. A spiked run starts from the clean run's state at its bucket and stops as soon
    as its whole state equals the clean run's at the same update: from there on it is the clean run.
    Returns [(seed, position, factor, clean decisions, spiked decisions)].
    """
    outcomes = []
    for seed in seeds:
        losses, level = curve(seed)
        clean = face.start()
        bucket = clean.bucket_size
        saved, at = {0: clean.save()}, 0
        while not clean.finished and at < len(losses):
            clean.feed(losses[at:at + bucket])
            at += bucket
            saved[at] = clean.save()
        reference = list(clean.decisions)
        end = reference[-1][0] if reference else len(losses)
        for start in range(0, end, bucket * every):
            position = start + bucket // 2
            for factor in factors:
                spiked = list(losses)
                spiked[position] = factor * level[position]
                outcomes.append((seed, position, factor, reference, _run_spiked(face, spiked, saved, start)))
    return outcomes


def _run_spiked(face, losses, saved, start):
    run, at = face.load(saved[start]), start
    while not run.finished and at < len(losses):
        run.feed(losses[at:at + run.bucket_size])
        at += run.bucket_size
        if at in saved and run.save() == saved[at]:
            return None  # rejoined the clean run
    return list(run.decisions)


def judge_spikes(outcomes, tolerance):
    """(moved, added): the spiked runs whose decisions are not the clean run's (same actions, each
    within ``tolerance`` updates), and those with more decisions than the clean run."""
    moved, added = [], []
    for seed, position, factor, reference, decisions in outcomes:
        if decisions is None:
            continue
        if len(decisions) > len(reference):
            added.append((seed, position, factor, decisions))
        same = len(decisions) == len(reference) and all(
            action == want and abs(update - at) <= tolerance
            for (update, action), (at, want) in zip(decisions, reference))
        if not same:
            moved.append((seed, position, factor, decisions))
    return moved, added
