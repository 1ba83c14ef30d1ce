"""The cooldown shape: when the stable phase ends, the LR anneals to its floor over a share of the
run, then the run finishes, never past the budget."""
import json
import math
from pathlib import Path

import pytest

from loss_curves import noisy_series
from timm_autodecay.detector import StageDetector
from timm_autodecay.replay import replay_file

# The first 3000 updates of MNIST-1D's CNN at a constant LR of 0.1 (the reference task's stable phase, seed 0)
CONSTANT_LR_RUN = Path(__file__).with_name("data") / "mnist1d_constant_lr_seed0_losses.json"


def run_to_finish(detector, values):
    """(update, action) of each decision and the LR after every update (base 1, floor 0.01)."""
    decisions, lrs = [], []
    for value in values:
        decision = detector.observe(value)
        if decision.changed:
            decisions.append((detector.update, decision.action))
        lrs.append(detector.lr_at(detector.update, 1.0, 0.1, min_lr=0.01))
        if detector.finished:
            break
    return decisions, lrs


def test_the_default_shape_is_the_cooldown_with_one_stable_stage():
    default, step = StageDetector(total_updates=3000), StageDetector(total_updates=3000, decay_shape="step")
    assert (default.decay_shape, default.num_stages, default.first_stage_patience) == ("cooldown", 1, 0.0)
    assert (step.num_stages, step.first_stage_patience) == (3, 0.4)
    assert default.window == 3 * step.window * 0.8  # a fifth of the stable phase: 80% of the budget, 1 stage


def test_the_reference_tasks_stable_phase_ends_on_its_plateau():
    """Golden decisions on a real stable phase: the plateau at 14.2 of 30 epochs starts the cooldown, which
    ends the run at 17.8. With the step shape's first-stage patience it would run to 17.3 and 21.6."""
    shape = {"total_updates": 3750, "updates_per_epoch": 125}
    decisions = replay_file(CONSTANT_LR_RUN, **shape)["decisions"]
    assert [(d["update"], d["action"]) for d in decisions] == [(1776, "cooldown"), (2220, "finish")]
    patient = replay_file(CONSTANT_LR_RUN, first_stage_patience=0.4, **shape)["decisions"]
    assert [(d["update"], d["action"]) for d in patient] == [(2160, "cooldown"), (2700, "finish")]


def test_a_loss_that_keeps_falling_cools_down_over_the_last_fifth_of_the_budget():
    detector = StageDetector(total_updates=1000, decay_shape="cooldown")
    assert detector.num_stages == 1 and detector.stage_budget == 800
    decisions, lrs = run_to_finish(detector, [2.0 - i / 1000 for i in range(2000)])
    assert decisions == [(800, "cooldown"), (1000, "finish")]
    assert lrs[799] == 1.0 and lrs[-1] == pytest.approx(0.01)
    assert lrs[899] == pytest.approx(0.01 + 0.99 * (1 - math.sqrt(0.5)))  # 1-sqrt, half way
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_a_plateau_starts_the_cooldown_early_and_the_cooldown_is_a_share_of_the_run_so_far():
    detector = StageDetector(total_updates=20_000, decay_shape="cooldown", cooldown_fraction=0.2)
    decisions, _ = run_to_finish(detector, noisy_series(20_000, tau=300))
    (start, first), (end, second) = decisions
    assert (first, second) == ("cooldown", "finish")
    assert start < 0.8 * 20_000  # the plateau, not the budget
    assert end - start == math.ceil(start * 0.2 / 0.8)  # a fifth of the whole run


@pytest.mark.parametrize("curve, half_way", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_cooldown_curves(curve, half_way):
    detector = StageDetector(total_updates=100, decay_shape="cooldown", cooldown_curve=curve, num_stages=1)
    for _ in range(80):
        detector.observe(1.0 - detector.update / 1000)  # falling: the budget ends the stable phase
    assert detector.in_cooldown and detector.cooldown_updates == 20
    assert detector.lr_at(90, 2.0, 0.1) == pytest.approx(2.0 * half_way)


def test_with_step_stages_before_it_the_cooldown_starts_from_the_last_stage_lr():
    detector = StageDetector(total_updates=1000, decay_shape="cooldown", num_stages=2)
    decisions, lrs = run_to_finish(detector, [2.0 - i / 1000 for i in range(2000)])
    assert decisions == [(400, "decay"), (800, "cooldown"), (1000, "finish")]
    assert lrs[500] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.01)


def test_a_resume_mid_cooldown_continues_exactly():
    values = [2.0 - i / 1000 for i in range(1000)]
    reference, reference_lrs = run_to_finish(StageDetector(total_updates=1000, decay_shape="cooldown"), values)
    first = StageDetector(total_updates=1000, decay_shape="cooldown")
    head, head_lrs = run_to_finish(first, values[:870])
    resumed = StageDetector(total_updates=1000, decay_shape="cooldown")
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail, tail_lrs = run_to_finish(resumed, values[870:])
    assert head + tail == reference and head_lrs + tail_lrs == reference_lrs


def test_the_cooldown_never_runs_past_the_budget_whatever_the_warmup():
    detector = StageDetector(total_updates=997, decay_shape="cooldown", warmup_updates=113, cooldown_fraction=0.3)
    decisions, _ = run_to_finish(detector, [2.0 - i / 1e4 for i in range(2000)])
    assert decisions[-1] == (997, "finish")


def test_the_step_shape_never_cools_down():
    detector = StageDetector(decay_shape="step", total_updates=300)
    decisions, lrs = run_to_finish(detector, [2.0 - i / 1e4 for i in range(300)])
    assert decisions == [(100, "decay"), (200, "decay"), (300, "finish")]
    assert lrs[-1] == pytest.approx(0.01) and not detector.in_cooldown


@pytest.mark.parametrize("budget", range(2, 13))
def test_a_tiny_budget_is_a_hard_bound_and_still_cools_down(budget):
    detector = StageDetector(total_updates=budget)
    updates = 0
    while not detector.finished:
        detector.observe(1.0)
        updates += 1
    assert updates == budget and detector.cooldown_end == budget and detector.cooldown_updates >= 1


def test_a_budget_of_one_update_leaves_no_cooldown_and_says_so():
    with pytest.raises(ValueError, match="total_updates=1"):
        StageDetector(total_updates=1)
