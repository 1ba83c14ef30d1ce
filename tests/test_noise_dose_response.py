"""The stability criterion of the noise dose-response study (recipes/noise_dose_response.py) on hand-made loss
series, no training: the spike rule with its floor on the scale of the run's initial loss, and the largest rise.
The loss-before-decay rule, which needs the recipe, is tested with the recipe's smoke tests."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

WIDTH, AFTER, FACTOR, FLOOR = 0.02, 0.1, 2.0, 0.02  # the study's bin, spike_after, spike_factor, spike_floor


def falling(start: float = 2.3, end: float = 0.01, count: int = 500) -> list[float]:
    """A loss falling geometrically from `start` to `end` over `count` updates."""
    return [start * (end / start) ** (u / (count - 1)) for u in range(count)]


def with_bin(losses: list[float], bin_index: int, value: float) -> list[float]:
    """`losses` with every update of bin `bin_index` (of the 50 bins) set to `value`."""
    size = len(losses) // 50
    return losses[: bin_index * size] + [value] * size + losses[(bin_index + 1) * size:]


def test_a_near_zero_loss_that_doubles_is_no_spike():
    from engine.study_statistics import first_spike

    losses = with_bin(falling(), 48, 0.03)  # the lowest before, 0.013, more than doubled: but +0.017 nats
    assert first_spike(losses, WIDTH, AFTER, FACTOR) is not None  # the rule without a floor fails it
    assert first_spike(losses, WIDTH, AFTER, FACTOR, FLOOR) is None  # the floor: 0.02 x 2.3 = 0.046 nats


def test_a_real_spike_fails_with_the_floor():
    from engine.study_statistics import first_spike

    losses = with_bin(falling(), 20, 0.9)  # 3x+ the lowest before (0.28), +0.6 nats: a spike at 42% of the run
    spike = first_spike(losses, WIDTH, AFTER, FACTOR, FLOOR)
    assert spike["share"] == pytest.approx(0.42) and spike["factor"] > 3
    assert first_spike(with_bin(falling(), 20, 0.5), WIDTH, AFTER, FACTOR, FLOOR) is None  # +0.2 nats, under 2x


def test_the_floor_is_on_the_scale_of_the_loss():
    """The same curve in other units (x10, /10) gets the same verdict: the floor is a share of its first bin."""
    from engine.study_statistics import first_spike

    for curve in (with_bin(falling(), 48, 0.03), with_bin(falling(), 20, 0.9)):
        verdicts = {scale: first_spike([scale * x for x in curve], WIDTH, AFTER, FACTOR, FLOOR) is None
                    for scale in (0.1, 1.0, 10.0)}
        assert len(set(verdicts.values())) == 1, verdicts


def test_spikes_in_the_first_share_are_ignored_and_non_spikes_pass():
    from engine.study_statistics import first_spike

    assert first_spike(with_bin(falling(), 3, 5.0), WIDTH, AFTER, FACTOR, FLOOR) is None  # bin 3 of 5 ignored
    assert first_spike(falling(), WIDTH, AFTER, FACTOR, FLOOR) is None
    assert first_spike([1.0] * 500, WIDTH, AFTER, FACTOR, FLOOR) is None  # flat: never above its minimum


def test_peak_rise():
    from engine.study_statistics import peak_rise

    assert peak_rise(falling(), WIDTH, AFTER) == pytest.approx(1.0)  # never above the running minimum
    lowest = falling()[199]  # the last update before bin 20: a little under the lowest bin's mean
    rise = peak_rise(with_bin(falling(), 20, 0.9), WIDTH, AFTER)
    assert 0.9 / (1.2 * lowest) < rise < 0.9 / lowest
