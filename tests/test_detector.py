"""The stage detector's decisions on loss streams with known stage ends, and its contracts."""
import json
import math
import random

import pytest

from loss_curves import noisy_series, run_closed_loop, stage_loss
from timm_autodecay import StageDetector

BUDGET = 30_000  # three stage shares of 10_000 updates; default window 2_000, patience 800


def feed(detector, values):
    """(index, action, stage) of each decision, stopping at "finish" as training would."""
    decisions = []
    for index, value in enumerate(values):
        decision = detector.observe(value)
        if decision.changed:
            decisions.append((index, decision.action, decision.stage))
        if detector.finished:
            break
    return decisions


@pytest.mark.parametrize("tau", [100, 300])
@pytest.mark.parametrize("noise", [0.02, 0.1, 0.3])
def test_each_stage_ends_on_its_plateau_not_in_its_sharp_drop(tau, noise):
    """At the loss's own scale (the decisions do not depend on it: see the affine tests)."""
    detector = StageDetector(decay_shape="step", total_updates=BUDGET)
    decisions, ages = run_closed_loop(detector, tau, noise)
    assert [d.action for d in decisions] == ["decay", "decay", "finish"]
    assert [d.reason for d in decisions] == ["plateau"] * 3
    for stage, age in enumerate(ages):
        assert age >= detector.window + detector.patience  # the drop after a decay never ends a stage
        assert age < BUDGET / 3  # and the plateau was seen before the milestone
        remaining = stage_loss(stage, age, tau) - stage_loss(stage, math.inf, tau)
        assert remaining < 0.01 * stage_loss(stage, math.inf, tau)  # the loss had flattened


@pytest.mark.parametrize("noise", [0.02, 0.3])
def test_a_loss_that_keeps_falling_falls_back_to_step_decay_milestones(noise):
    detector = StageDetector(decay_shape="step", total_updates=BUDGET)
    decisions, _ = run_closed_loop(detector, tau=3000, noise=noise)
    assert [(d.update, d.action, d.reason) for d in decisions] == [
        (10_000, "decay", "budget"),
        (20_000, "decay", "budget"),
        (30_000, "finish", "budget"),
    ]


def test_without_budget_only_plateaus_end_stages():
    detector = StageDetector(decay_shape="step", updates_per_epoch=100)
    assert detector.window == 200
    decisions, _ = run_closed_loop(detector, tau=30, noise=0.1)
    assert [(d.action, d.reason) for d in decisions] == [("decay", "plateau")] * 2 + [("finish", "plateau")]


def test_noisy_series_with_one_plateau_decays_once_then_would_finish_later():
    values = noisy_series(9_000, noise=0.2, tau=200)
    decisions = feed(StageDetector(decay_shape="step", total_updates=BUDGET), values)
    assert decisions and decisions[0][1:] == ("decay", 1)
    assert 2_800 <= decisions[0][0] < 10_000


def test_warmup_updates_are_not_judged():
    values = [5.0] * 1000 + noisy_series(9000, tau=100)
    detector = StageDetector(decay_shape="step", total_updates=10_000, num_stages=1, warmup_updates=1000)
    decisions = feed(detector, values)
    assert decisions[0][0] >= 1000 + detector.window  # the flat warmup did not count as a plateau
    assert detector.stage_budget == 9000


# -- scale invariance, determinism, bounded state ---------------------------------------------
def random_stream(rng, low, high, min_size, max_size):
    """A stream of arbitrary losses: no trend, no noise model, any decision the detector likes."""
    return [rng.uniform(low, high) for _ in range(rng.randint(min_size, max_size))]


@pytest.mark.parametrize("seed", range(15))
def test_rescaling_the_loss_changes_no_decision(seed):
    rng = random.Random(seed)
    values, exponent, window = random_stream(rng, 0.05, 5.0, 50, 400), rng.randint(-20, 20), rng.randint(10, 60)
    factor = 2.0**exponent  # exact in floating point, so any difference is the detector's
    make = lambda: StageDetector(decay_shape="step", num_stages=4, window=window, patience=window // 4,
                                 total_updates=600)
    assert feed(make(), values) == feed(make(), [v * factor for v in values])


def test_decisions_are_the_same_on_every_machine():
    """Golden decisions on a fixed, platform-independent series: a change here changes every user's
    schedule and must be deliberate."""
    values = [stage_loss(min(i // 700, 2), i % 700, 60) * (1 + 0.2 * math.sin(i * 1.7) * math.cos(i * 0.31))
              for i in range(2100)]
    decisions = feed(StageDetector(decay_shape="step", num_stages=3, total_updates=2100, window=100), values)
    assert decisions == [(531, "decay", 1), (671, "decay", 2), (1147, "finish", 2)]


@pytest.mark.parametrize("seed", range(15))
def test_non_finite_losses_never_decide_nor_corrupt(seed):
    rng = random.Random(seed)
    values = random_stream(rng, 0.1, 3.0, 30, 200)
    bad = [rng.choice([math.nan, math.inf, -math.inf]) for _ in range(rng.randint(1, 5))]
    detector = StageDetector(decay_shape="step", num_stages=20, window=20)  # 200 values end at most 10 stages
    feed(detector, values)
    with pytest.warns(RuntimeWarning, match="non-finite") as warned:
        for value in bad:
            assert detector.observe(value).action == "continue"
    assert len(warned) == 1  # once, however many
    assert detector.nonfinite_losses == len(bad)
    assert json.dumps(detector.state_dict())  # still serialisable: no NaN entered the window
    assert all(math.isfinite(p[1]) for p in detector.state_dict()["points"])


def test_the_budget_holds_when_its_boundary_falls_on_a_non_finite_loss():
    detector = StageDetector(decay_shape="step", num_stages=3, total_updates=300, window=200)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        actions = [detector.observe(1.0 if n != 99 else math.nan).action for n in range(100)]
    assert actions[:99] == ["continue"] * 99 and actions[99] == "decay"
    assert detector.history == [{"update": 100, "action": "decay", "stage": 0, "reason": "budget"}]


def test_a_window_of_only_non_finite_losses_raises():
    detector = StageDetector(decay_shape="step", window=50)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        for _ in range(49):
            detector.observe(math.nan)
    with pytest.raises(FloatingPointError, match="non-finite"):
        detector.observe(math.nan)


@pytest.mark.slow
def test_state_size_does_not_grow_with_run_length():
    detector = StageDetector(decay_shape="step", window=200, num_stages=1, min_progress=0.0)  # never ends
    sizes, points = {}, {}
    for n in range(1, 50_001):
        detector.observe(math.exp(-n / 10_000) * (1 + 0.01 * math.sin(n)))  # 2% per window: never ends
        if n in (1_000, 50_000):
            sizes[n] = len(json.dumps(detector.state_dict()))
            points[n] = len(detector.state_dict()["points"])
    assert not detector.finished
    assert points[50_000] == points[1_000] <= detector.window // detector.bucket_size + 1
    assert sizes[50_000] < 1.25 * sizes[1_000]  # longer numbers, no more entries


# -- resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride", [70, pytest.param(7, marks=pytest.mark.slow)])
def test_state_round_trip_at_every_cut_point_gives_identical_decisions(stride):
    values = [stage_loss(min(i // 700, 2), i % 700, 60) * (1 + 0.1 * math.sin(i * 1.7)) for i in range(2100)]
    make = lambda: StageDetector(decay_shape="step", num_stages=3, window=100, total_updates=2100)
    reference = feed(make(), values)
    assert len(reference) >= 2
    for cut in range(0, len(values), stride):
        first = make()
        head = feed(first, values[:cut])
        if first.finished:
            continue
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        tail = [(i + cut, a, s) for i, a, s in feed(resumed, values[cut:])]
        assert head + tail == reference, f"cut at {cut}"


def test_loading_state_with_other_settings_is_refused():
    state = StageDetector(decay_shape="step", window=100).state_dict()
    with pytest.raises(ValueError, match="window"):
        StageDetector(decay_shape="step", window=120).load_state_dict(state)


# -- bad settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, named",
    [
        ({"num_stages": 0}, "num_stages"),
        ({"total_updates": -5}, "-5"),
        ({"updates_per_epoch": 0}, "updates_per_epoch"),
        ({"window": 1}, "window"),
        ({"significance": -1.0}, "significance"),
        ({"min_progress": 1.5}, "1.5"),
        ({"decay_shape": "linear"}, "linear"),
        ({"cooldown_fraction": 0.0}, "cooldown_fraction"),
        ({"cooldown_fraction": 0.99}, r"cooldown_fraction must be in \(0, 0.5\], got 0.99"),
        ({"cooldown_curve": "sqrt"}, "sqrt"),
        ({"num_stages": 4, "total_updates": 3}, "num_stages"),
        ({"num_stages": 2.5}, "2.5"),
        ({"total_updates": 100, "warmup_updates": 100}, "warmup_updates"),
    ],
)
def test_bad_settings_raise_naming_the_value(settings, named):
    with pytest.raises(ValueError, match=named):
        StageDetector(**settings)


def test_unknown_setting_is_named():
    with pytest.raises(ValueError, match="windw"):
        StageDetector.from_settings({"windw": 10})


def test_observing_after_finish_is_an_error():
    detector = StageDetector(decay_shape="step", num_stages=1, total_updates=10)
    for _ in range(10):
        detector.observe(1.0)
    assert detector.finished and detector.history[-1]["action"] == "finish"
    with pytest.raises(RuntimeError, match="ended"):
        detector.observe(1.0)


def test_updates_without_a_loss_are_not_judged_but_the_budget_still_holds():
    detector = StageDetector(decay_shape="step", num_stages=3, total_updates=300, window=20)
    for update in range(50):
        detector.observe(2.0 - update / 100)  # still falling
    assert detector.skip(40).action == "continue"  # missing information is never a plateau
    assert detector.skip(10).action == "decay" and detector.history[-1] == {
        "update": 100, "action": "decay", "stage": 0, "reason": "budget"}
    assert detector.nonfinite_losses == 0


@pytest.mark.parametrize("total, warmup, expected", [(1000, 0, [334, 667, 1000]), (1000, 7, [338, 669, 1000]),
                                                     (3750, 0, [1250, 2500, 3750])])
def test_budget_boundaries_fall_on_the_nominal_milestones_and_the_run_ends_on_the_budget(total, warmup, expected):
    detector = StageDetector(decay_shape="step", total_updates=total, warmup_updates=warmup)
    while not detector.finished:
        detector.observe(2.0 - detector.update / 1e4)  # still falling: only the budget ends stages
    assert [h["update"] for h in detector.history] == expected
