"""The evaluation signal: decisions on streams of evaluation results (peaked, falling, flat, affine-mapped,
with a bad evaluation), their state and its migration from the release before it."""
import json
import random
from pathlib import Path

import pytest

from timm_autodecay.detector import StageDetector, StateError
from timm_autodecay.evaluations import first_ending

STATE_0_2_0 = Path(__file__).parent / "data" / "detector_state_0.2.0.json"  # written by release 0.2.0
UPDATES_PER_EVAL = 50


def detector(**settings):
    return StageDetector(**{"total_updates": 100_000, "eval_mode": "max", **settings})


def ending(values, **settings):
    """(index of the evaluation that ended the stable phase or None, the detector): the training loss keeps
    falling steeply between evaluations, so only the evaluations can end the phase."""
    d = detector(**settings)
    for i, value in enumerate(values):
        for _ in range(UPDATES_PER_EVAL):
            d.observe(10.0 - d.update * 1e-4)
        if d.observe_eval(value).action != "continue":
            return i, d
    return None, d


def peaked(peak, length=30, rise=1.0, fall=0.5):
    return [rise * i if i <= peak else rise * peak - fall * (i - peak) for i in range(length)]


@pytest.mark.parametrize("peak", [3, 7, 12, 20])
@pytest.mark.parametrize("patience", [1, 3, 5])
def test_a_peaked_metric_ends_the_phase_within_one_evaluation_of_where_its_peak_says(peak, patience):
    index, d = ending(peaked(peak, length=60), eval_patience=patience)
    # the median of three puts the best smoothed value at the peak's evaluation or the one after it
    assert first_ending(peak + 1, patience) <= index + 1 <= first_ending(peak + 2, patience)
    assert d.in_cooldown and d.history[-1]["reason"] == "evaluation"


def test_patience_is_eval_patience_early_and_a_third_of_the_stage_later():
    assert [first_ending(best, 3) - best for best in (1, 6, 9, 12, 20, 40)] == [3, 3, 5, 6, 10, 20]


def test_a_falling_metric_ends_the_phase_sooner_than_a_flat_noisy_one():
    rng = random.Random(0)
    falling = [ending([-i + rng.gauss(0, 0.3) for i in range(60)])[0] for _ in range(20)]
    flat = [ending([rng.gauss(0, 0.3) for _ in range(60)])[0] for _ in range(20)]
    flat = [60 if i is None else i for i in flat]
    assert set(falling) == {5}  # the earliest a decision can come: 3 to smooth, then 3 without a new best
    assert min(flat) >= 5 and sum(flat) / len(flat) > 6


def test_a_rising_metric_never_ends_the_phase():
    assert ending([float(i) for i in range(40)])[0] is None


def test_decisions_are_invariant_to_an_affine_map_of_the_metric():
    rng = random.Random(1)
    for _ in range(30):
        values = [v + rng.gauss(0, 0.8) for v in peaked(rng.randint(2, 15), length=40)]
        expected = ending(values)[0]
        assert ending([0.01 * v - 7 for v in values])[0] == expected
        assert ending([-3 * v + 2 for v in values], eval_mode="min")[0] == expected


def test_one_bad_evaluation_moves_the_decision_by_at_most_two_evaluations_on_a_clean_peak():
    # it moves the best smoothed value by at most one evaluation; the patience, a third of the stage's
    # evaluations late in a stage, stretches that to at most two
    for peak in (4, 9, 15):
        values = peaked(peak, length=40)
        expected = ending(values)[0]
        for at in range(len(values)):
            for outlier in (-1e6, 1e6, float("nan")):
                spoiled = list(values)
                spoiled[at] = outlier
                found = ending(spoiled)[0]
                assert found is not None and abs(found - expected) <= 2, (peak, at, outlier, found)


def test_one_bad_evaluation_rarely_moves_a_noisy_decision_by_more_than_two_evaluations():
    rng = random.Random(2)
    moved = compared = 0
    for _ in range(300):
        length = rng.randint(10, 40)
        values = [v + rng.gauss(0, 0.3) for v in peaked(rng.randint(2, length - 2), length, fall=rng.uniform(0, 1))]
        spoiled = list(values)
        spoiled[rng.randrange(length)] += rng.choice([-50.0, 50.0])
        expected, found = ending(values)[0], ending(spoiled)[0]
        if expected is not None and found is not None:
            compared += 1
            moved += abs(found - expected) > 2
    assert compared > 150 and moved / compared <= 0.05


def test_evaluations_during_warmup_and_cooldown_are_recorded_never_judged():
    d = detector(warmup_updates=500)
    for value in (5.0, 4.0, 3.0, 2.0, 1.0):  # falling during warmup: would end the phase if judged
        d.update += 100
        assert d.observe_eval(value).action == "continue"
    assert d.best_eval == {"value": 5.0, "update": 100} and not d.in_cooldown


def test_the_step_shape_starts_each_stage_with_a_fresh_series():
    index, d = ending(peaked(5) + [100.0] * 30, decay_shape="step")
    # the best smoothed value at the 7th evaluation
    assert index + 1 == first_ending(7, 3) and d.stage == 1 and d.evaluations.count == 0
    d.observe_eval(0.0)
    assert d.evaluations.count == 1  # the stage-0 best does not bar stage 1 from improving


def test_the_run_best_is_kept_with_its_update():
    _, d = ending(peaked(6))
    assert d.best_eval == {"value": 6.0, "update": 7 * UPDATES_PER_EVAL}


def test_a_non_finite_evaluation_is_counted_not_judged():
    d = detector()
    with pytest.warns(RuntimeWarning, match="non-finite evaluation"):
        decision = d.observe_eval(float("nan"))
    assert decision.action == "continue" and d.evaluations.nonfinite == 1 and d.evaluations.count == 0


@pytest.mark.parametrize("bad, named", [("accuracy", "must be a real number"), (True, "must be a real number")])
def test_a_bad_evaluation_value_is_refused_naming_it(bad, named):
    with pytest.raises(TypeError, match=named):
        detector().observe_eval(bad)


@pytest.mark.parametrize("setting, value", [("eval_mode", "maximise"), ("eval_patience", 0)])
def test_bad_evaluation_settings_are_refused_naming_them(setting, value):
    with pytest.raises(ValueError, match=setting):
        detector(**{setting: value})


@pytest.mark.parametrize("stop_at", [2, 5, 9, 11])
def test_resuming_mid_run_decides_as_an_unbroken_run(stop_at):
    values = peaked(8, length=20)
    expected, unbroken = ending(values)
    first = detector()
    for value in values[:stop_at]:
        for _ in range(UPDATES_PER_EVAL):
            first.observe(10.0 - first.update * 1e-4)
        first.observe_eval(value)
    resumed = detector()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    ended = None
    for i, value in enumerate(values[stop_at:], start=stop_at):
        for _ in range(UPDATES_PER_EVAL):
            resumed.observe(10.0 - resumed.update * 1e-4)
        if resumed.observe_eval(value).action != "continue":
            ended = i
            break
    assert ended == expected and resumed.state_dict() == unbroken.state_dict()


@pytest.mark.parametrize("break_it, named", [
    (lambda e: e.update(recent=[1.0, 2.0, 3.0]), "evaluations.recent"),
    (lambda e: e.update(best_at=None), "evaluations.best_at"),
    (lambda e: e.update(count=-1), "evaluations.count"),
    (lambda e: e.pop("best_update"), "evaluations.best_update"),
])
def test_a_damaged_evaluation_state_is_refused_naming_the_key(break_it, named):
    _, d = ending(peaked(20, length=10))
    state = d.state_dict()
    break_it(state["evaluations"])
    with pytest.raises(StateError, match=named):
        detector().load_state_dict(state)


def test_a_0_2_0_state_resumes_with_no_evaluation_seen():
    old = json.loads(STATE_0_2_0.read_text())
    assert old["version"] == 2 and "evaluations" not in old
    d = StageDetector(decay_shape="step", num_stages=3, window=100, total_updates=2100)
    d.load_state_dict(old)
    assert (d.update, d.stage, d.best_eval, d.evaluations.count) == (900, 2, None, 0)
    assert d.settings()["eval_mode"] == "min"
