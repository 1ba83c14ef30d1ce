"""AutoDecayLR's evaluation signal: ``step_eval(value)`` after each evaluation, ``eval_mode`` set once."""
import json
from pathlib import Path

import pytest
import torch

from timm_autodecay import AutoDecayLR
from timm_autodecay.evaluations import first_ending

BUDGET, EVERY = 2000, 50  # updates in the run; updates between evaluations


def make(**settings):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    return optimizer, AutoDecayLR(optimizer, total_updates=BUDGET, **{"eval_mode": "max", **settings})


def accuracy(evaluation: int, peak: int) -> float:
    return 80.0 + min(evaluation, peak) - 0.5 * max(0, evaluation - peak)


def train(optimizer, sched, peak=8, start=0, stop=BUDGET):
    """Per-update LRs of a run whose loss keeps falling and whose accuracy peaks at evaluation `peak`."""
    lrs = []
    for update in range(start + 1, stop + 1):
        optimizer.step()
        sched.step(torch.tensor(5.0 - update * 1e-3))
        if update % EVERY == 0:
            sched.step_eval(torch.tensor(accuracy(update // EVERY, peak)))
        lrs.append(optimizer.param_groups[0]["lr"])
        if sched.finished:
            break
    return lrs


@pytest.mark.parametrize("peak", [4, 8, 15])
def test_a_peaked_accuracy_starts_the_cooldown_where_its_peak_says(peak):
    optimizer, sched = make()
    lrs = train(optimizer, sched, peak)
    cooldown = sched.history[0]
    assert cooldown["action"] == "cooldown" and cooldown["reason"] == "evaluation"
    # the best smoothed value at the peak's evaluation or the next (the median of three)
    assert first_ending(peak, 3) * EVERY <= cooldown["update"] <= first_ending(peak + 1, 3) * EVERY
    assert lrs[cooldown["update"] - 1] == 0.1 and lrs[cooldown["update"]] < 0.1  # anneals from the next update
    assert sched.finished and len(lrs) == cooldown["update"] + round(cooldown["update"] / 4)
    assert sched.best_eval == {"value": accuracy(peak, peak), "update": peak * EVERY}


def test_without_evaluations_the_falling_loss_runs_to_the_budget_share():
    optimizer, sched = make()
    for update in range(1, BUDGET + 1):
        optimizer.step()
        sched.step(torch.tensor(5.0 - update * 1e-3))
    assert sched.history[0]["reason"] == "budget"


def test_a_loss_as_the_metric_uses_eval_mode_min():
    optimizer, sched = make(eval_mode="min")
    for update in range(1, BUDGET + 1):
        optimizer.step()
        sched.step(5.0 - update * 1e-3)
        if update % EVERY == 0:
            sched.step_eval(-accuracy(update // EVERY, 6))
        if sched.finished:
            break
    decided = sched.history[0]
    assert decided["reason"] == "evaluation"
    assert first_ending(6, 3) * EVERY <= decided["update"] <= first_ending(7, 3) * EVERY


def test_eval_is_best_points_to_the_model_to_keep():
    optimizer, sched = make()
    kept = []
    for update in range(1, 20 * EVERY + 1):
        optimizer.step()
        sched.step(5.0)
        if update % EVERY == 0:
            sched.step_eval(accuracy(update // EVERY, 5))
            if sched.eval_is_best:
                kept.append(update // EVERY)
    assert kept == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("stop_at", [EVERY * 3 + 17, EVERY * 9, EVERY * 11 + 1, EVERY * 13 + 5])
def test_resuming_mid_run_is_exact_with_the_evaluation_state(stop_at):
    unbroken = train(*make())
    optimizer, sched = make()
    first = train(optimizer, sched, stop=stop_at)
    state = json.loads(json.dumps(sched.state_dict()))
    optimizer, sched = make()
    sched.load_state_dict(state)
    rest = train(optimizer, sched, start=stop_at)
    assert first + rest == unbroken and sched.history[0]["reason"] == "evaluation"


def test_a_skipped_evaluation_changes_nothing():
    optimizer, sched = make()
    train(optimizer, sched, stop=5 * EVERY)
    before = sched.state_dict()
    sched.step_eval(None)
    assert sched.state_dict() == before


@pytest.mark.parametrize("value, error, words", [
    ("0.9", TypeError, "evaluation result must be a float or a 0-dim tensor, got str"),
    (torch.ones(2), ValueError, "evaluation result must be a scalar"),
    (True, TypeError, "got bool True"),
])
def test_a_bad_evaluation_result_is_refused_naming_it(value, error, words):
    _, sched = make()
    with pytest.raises(error, match=words):
        sched.step_eval(value)


def test_a_bad_eval_mode_is_refused_naming_it():
    with pytest.raises(ValueError, match="eval_mode must be one of .* got 'accuracy'"):
        make(eval_mode="accuracy")


@pytest.mark.slow
@pytest.mark.distributed
def test_ranks_with_different_local_metrics_hold_identical_lrs(tmp_path, torchrun):
    done = torchrun(Path(__file__).with_name("distributed_worker.py"), "torch_eval", tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = ((tmp_path / f"lrs_rank{rank}.txt").read_text() for rank in (0, 1))
    assert rank0 == rank1
    lrs = [float(line.split()[1]) for line in rank0.splitlines()]
    # alone, rank 0 (peak at evaluation 4) would start the cooldown at evaluation 7 or 8; the mean of the
    # ranks' metrics peaks at evaluation 12, so both start it where the rule puts it after that peak
    cooldown = next(i for i, lr in enumerate(lrs) if lr < 0.1)
    assert first_ending(12, 3) * 50 <= cooldown <= first_ending(13, 3) * 50 and len(lrs) < 2000
