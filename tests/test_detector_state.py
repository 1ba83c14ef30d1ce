"""The detector's saved state: versioned, migrated from 0.1.0, validated whole before it is applied."""
import copy
import json
import math
from pathlib import Path

import pytest

from loss_curves import stage_loss
from timm_autodecay.detector import STATE_VERSION, StageDetector, StateError

OLD_STATE = Path(__file__).parent / "data" / "detector_state_0.1.0.json"  # written by release 0.1.0


def golden_values():
    return [stage_loss(min(i // 700, 2), i % 700, 60) * (1 + 0.2 * math.sin(i * 1.7) * math.cos(i * 0.31))
            for i in range(2100)]


def make():
    return StageDetector(decay_shape="step", num_stages=3, window=100, total_updates=2100)


def mid_run_state():
    detector = make()
    for value in golden_values()[:900]:
        detector.observe(value)
    return detector.state_dict()


def test_state_carries_its_format_version():
    assert mid_run_state()["version"] == STATE_VERSION == 3


def test_a_0_1_0_state_resumes_where_it_stopped():
    old = json.loads(OLD_STATE.read_text())
    assert "version" not in old and "min_relative_drop" in old["settings"]
    detector = make()
    detector.load_state_dict(old)
    assert (detector.update, detector.stage, len(detector.history)) == (900, 2, 2)
    for value in golden_values()[900:]:
        if detector.observe(value).action == "finish":
            break
    assert detector.finished and detector.history[-1]["action"] == "finish"
    assert detector.state_dict()["version"] == STATE_VERSION


def test_a_state_from_a_newer_release_is_refused_with_what_to_do():
    state = mid_run_state()
    state["version"] = STATE_VERSION + 1
    with pytest.raises(StateError, match="version.*upgrade"):
        make().load_state_dict(state)


def _delete(state, key):
    del state[key]


@pytest.mark.parametrize("break_it, named", [
    (lambda s: _delete(s, "points"), "'points' is missing"),
    (lambda s: _delete(s, "settings"), "'settings' is missing"),
    (lambda s: s.update(stage=7), "'stage' must be in \\[0, 3\\)"),
    (lambda s: s.update(stage="1"), "'stage' must be int"),
    (lambda s: s.update(finished=1), "'finished' must be bool"),
    (lambda s: s.update(update=-4), "'update' must be >= 0"),
    (lambda s: s.update(stage_start=5000), "'stage_start'"),
    (lambda s: s.update(points=[[1, 2]]), "'points\\[0\\]'"),
    (lambda s: s.update(points=[[1, math.nan, 3]]), "'points\\[0\\]'"),
    (lambda s: s.update(history=[{"update": 3}]), "'history\\[0\\].action' is missing"),
    (lambda s: s.update(cooldown_start=10), "cooldown"),
    (lambda s: s["settings"].update(window=120), "window: 120 saved, 100 now"),
])
def test_a_bad_state_is_refused_naming_the_key_and_nothing_is_applied(break_it, named):
    detector = make()
    for value in golden_values()[:300]:
        detector.observe(value)
    before = detector.state_dict()
    bad = copy.deepcopy(mid_run_state())
    break_it(bad)
    with pytest.raises(StateError, match=named):
        detector.load_state_dict(bad)
    assert detector.state_dict() == before
    assert issubclass(StateError, ValueError)


def test_a_state_that_is_not_a_dict_is_refused():
    with pytest.raises(StateError, match="must be a dict, got list"):
        make().load_state_dict([1, 2])


def test_a_state_saved_during_warmup_resumes():
    first = StageDetector(decay_shape="step", warmup_updates=50, total_updates=1000)
    for _ in range(10):
        first.observe(1.0)
    resumed = StageDetector(decay_shape="step", warmup_updates=50, total_updates=1000)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.state_dict() == first.state_dict()
