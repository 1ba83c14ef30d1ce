"""Decisions a bad batch cannot move, and that no loss offset or scale can move."""
import json
import math
import random
from pathlib import Path

import pytest

from loss_curves import stage_loss
from timm_autodecay.detector import StageDetector
from timm_autodecay.replay import replay_file

SPIKES = (3.0, 1e3, 1e6, 0.0)  # times the loss; 0.0: what the Trainer's NaN filter may log


def falling_curve(seed, length=3000):
    """Still falling at every budget boundary: a stage must end at its budget share, not before."""
    rng = random.Random(seed)
    return [(0.2 + 1.8 * math.exp(-i / 1000)) * (1 + 0.02 * rng.gauss(0, 1)) for i in range(length)]


def make():
    return StageDetector(decay_shape="step", total_updates=3000, updates_per_epoch=100)


def clean_run(values):
    """Decisions (update, action) and the state after every update."""
    detector, decisions, states = make(), [], []
    for value in values:
        if detector.observe(value).changed:
            decisions.append((detector.update, detector.history[-1]["action"]))
        states.append(detector.state_dict())
        if detector.finished:
            break
    return decisions, states


def spiked_decisions(values, states, at, factor, bucket):
    """Decisions with one outlier at update ``at`` (0-based), continuing from the clean run's state
    and stopping once the outlier has left every trace (the state equals the clean run's again)."""
    detector = make()
    if at:
        detector.load_state_dict(states[at - 1])
    decisions = []
    for index in range(at, len(states)):
        value = values[index] * factor if index == at else values[index]
        if detector.observe(value).changed:
            decisions.append((detector.update, detector.history[-1]["action"]))
        if detector.finished or index > at and (index + 1) % bucket == 0 and detector.state_dict() == states[index]:
            return decisions, index
    return decisions, len(states) - 1


def spike_grid(seeds, stride):
    """Share of spiked runs whose decisions match the clean ones within two buckets, and whether
    any spiked run added a decision."""
    matched = total = added = 0
    for seed in seeds:
        values = falling_curve(seed)
        reference, states = clean_run(values)
        bucket = make().bucket_size
        for factor in SPIKES:
            for at in range(bucket // 2, len(states), bucket * stride):
                got, last = spiked_decisions(values, states, at, factor, bucket)
                expected = [d for d in reference if at < d[0] <= last + 1]
                total += 1
                added += len(got) > len(expected)
                matched += len(got) == len(expected) and all(
                    a == b and abs(u - w) <= 2 * bucket for (u, a), (w, b) in zip(got, expected))
    return matched / total, added


def test_one_bad_batch_does_not_end_a_stage_that_is_still_learning():
    values = falling_curve(0)
    values[1200] += 5.0
    detector = make()
    for value in values:
        detector.observe(value)
        if detector.finished:
            break
    assert [(h["update"], h["reason"]) for h in detector.history] == [(1000, "budget"), (2000, "budget"),
                                                                      (3000, "budget")]


def test_outliers_at_every_25th_bucket_move_no_decision():
    """The full grid (every bucket, 5 seeds) runs through replay, which feeds this detector the same
    bucket means: tests/test_spike_grid.py."""
    share, added = spike_grid(seeds=[0], stride=25)
    assert share >= 0.95 and added == 0


# -- offsets and scales ---------------------------------------------------------------------------
def closed_loop(scale, offset, tau=150, noise=0.1, seed=3):
    """A run whose loss reacts to the decays (stage plateaus 1, 0.3, 0.1), seen as scale * loss + offset."""
    rng = random.Random(seed)
    detector, stage_start = StageDetector(decay_shape="step", total_updates=9000), 0
    for update in range(9000):
        loss = stage_loss(detector.stage, update - stage_start, tau) * (1 + noise * rng.gauss(0, 1))
        if detector.observe(scale * loss + offset).changed:
            stage_start = update + 1
        if detector.finished:
            break
    return [(h["update"], h["action"], h["reason"]) for h in detector.history]


@pytest.mark.parametrize("scale, offset", [(1e-3, 0.0), (1e3, 0.0), (1.0, 10.0), (1e-3, 0.05), (1e3, 3e4)])
def test_a_scaled_and_shifted_loss_gives_the_same_decisions(scale, offset):
    reference = closed_loop(1.0, 0.0)
    assert [reason for _, _, reason in reference] == ["plateau"] * 3
    assert closed_loop(scale, offset) == reference


@pytest.mark.parametrize("seed", range(20))
def test_any_affine_transform_changes_no_decision(seed):
    """Losses on a grid of 1/1024, scale a power of two, integer offset: exact in floating point."""
    rng = random.Random(seed)
    values = [rng.randint(50, 5000) for _ in range(rng.randint(50, 300))]
    exponent, offset, window = rng.randint(-10, 10), rng.randint(0, 50), rng.randint(10, 60)

    def decisions(transform):
        detector = StageDetector(decay_shape="step", num_stages=4, window=window, patience=window // 4,
                                 total_updates=600)
        out = []
        for value in values:
            if detector.observe(transform(value / 1024)).changed:
                out.append((detector.update, detector.history[-1]["action"]))
            if detector.finished:
                break
        return out
    assert decisions(lambda v: v) == decisions(lambda v: v * 2.0**exponent + offset)


REAL_RUN = Path(__file__).parent / "data" / "mnist1d_stepdecay_seed0_losses.json"  # MNIST-1D, StepDecay


@pytest.mark.parametrize("scale, offset", [(1.0, 2.0), (1e-3, 0.0), (1e3, 0.0), (1.0, 1.0), (10.0, 5.0)])
def test_replay_of_a_real_run_decides_alike_under_any_offset_and_scale(tmp_path, scale, offset):
    """The first 2500 updates of a MNIST-1D StepDecay run (x0.1 at update 1250), replayed as a user
    would replay a log. Label smoothing or an entropy floor add such an offset (1.0 and 2.0 are 5x
    and 10x the loss at the end of the first stage)."""
    losses = json.loads(REAL_RUN.read_text())
    shifted = tmp_path / "shifted.json"
    shifted.write_text(json.dumps([scale * v + offset for v in losses]))
    shape = {"total_updates": 3750, "updates_per_epoch": 125, "decay_shape": "step"}
    reference = replay_file(REAL_RUN, **shape)["decisions"]
    assert [(d["update"], d["action"]) for d in reference][:2] == [(1180, "decay"), (1940, "decay")]
    assert replay_file(shifted, **shape)["decisions"] == reference
