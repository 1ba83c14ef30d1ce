"""Replay with the evaluation signal: timm summary.csv's eval columns, trainer_state.json's eval entries."""
import csv
import json
import math

import pytest

from timm_autodecay.detector import StageDetector
from timm_autodecay.evaluations import first_ending
from timm_autodecay.replay import ReplayError, replay_file

EPOCHS, PER_EPOCH, PEAK = 30, 20, 8  # the top-1 peaks at epoch PEAK, the loss keeps falling


def top1(epoch):
    return 60.0 + min(epoch, PEAK) - 0.5 * max(0, epoch - PEAK)


def write_summary(path, skipped=()):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "train_loss", "eval_loss", "eval_top1", "lr"])
        for epoch in range(EPOCHS):
            evaluated = epoch not in skipped
            writer.writerow([epoch, math.exp(-epoch / 5), 1.0 / top1(epoch) if evaluated else "",
                             top1(epoch) if evaluated else "", 0.1])
    return path


def expected_cooldown(skipped=()):
    """Where the detector itself starts the cooldown on the same stream, fed as a face feeds it."""
    detector = StageDetector(total_updates=EPOCHS * PER_EPOCH, updates_per_epoch=PER_EPOCH, eval_mode="max")
    for epoch in range(EPOCHS):
        detector.observe(math.exp(-epoch / 5), PER_EPOCH)
        if epoch not in skipped and detector.observe_eval(top1(epoch)).action == "cooldown":
            return epoch
    raise AssertionError("no cooldown")


def test_a_timm_summary_replays_its_eval_top1_in_the_direction_its_name_says(tmp_path):
    result = replay_file(write_summary(tmp_path / "summary.csv"), eval_column="eval_top1",
                         updates_per_epoch=PER_EPOCH, total_updates=EPOCHS * PER_EPOCH)
    cooldown = result["decisions"][0]
    assert cooldown["action"] == "cooldown" and cooldown["index"] == expected_cooldown()
    assert first_ending(PEAK + 1, 3) <= cooldown["index"] + 1 <= first_ending(PEAK + 2, 3)
    assert result["settings"]["eval_mode"] == "max"
    assert result["best_eval"] == {"value": top1(PEAK), "update": (PEAK + 1) * PER_EPOCH}


def test_eval_loss_is_replayed_as_lower_is_better(tmp_path):
    result = replay_file(write_summary(tmp_path / "summary.csv"), eval_column="eval_loss",
                         updates_per_epoch=PER_EPOCH, total_updates=EPOCHS * PER_EPOCH)
    assert result["settings"]["eval_mode"] == "min" and result["decisions"][0]["index"] == expected_cooldown()


def test_without_the_eval_column_the_falling_loss_runs_to_the_budget_share(tmp_path):
    result = replay_file(write_summary(tmp_path / "summary.csv"), updates_per_epoch=PER_EPOCH,
                         total_updates=EPOCHS * PER_EPOCH)
    assert result["decisions"][0]["index"] > PEAK + 10 and "best_eval" not in result


def test_an_epoch_without_an_evaluation_is_not_an_evaluation(tmp_path):
    result = replay_file(write_summary(tmp_path / "summary.csv", skipped=(PEAK + 1,)), eval_column="eval_top1",
                         updates_per_epoch=PER_EPOCH, total_updates=EPOCHS * PER_EPOCH)
    assert result["decisions"][0]["index"] == expected_cooldown(skipped=(PEAK + 1,))
    assert result["best_eval"] == {"value": top1(PEAK), "update": (PEAK + 1) * PER_EPOCH}


def test_trainer_state_eval_entries_are_judged_after_the_loss_logged_at_their_step(tmp_path):
    history = []
    for step in range(10, 610, 10):
        history.append({"loss": 3.0 - step / 1000, "step": step})
        if step % 20 == 0:
            history.append({"eval_accuracy": top1(step // 20), "step": step})
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"log_history": history, "max_steps": 600}))
    result = replay_file(path, eval_column="eval_accuracy")
    cooldown = result["decisions"][0]
    assert cooldown["action"] == "cooldown"
    assert first_ending(PEAK, 3) * 20 <= cooldown["update"] <= first_ending(PEAK + 1, 3) * 20


@pytest.mark.parametrize("kind", ["csv", "trainer_state"])
def test_a_missing_eval_column_is_named(tmp_path, kind):
    if kind == "csv":
        path = write_summary(tmp_path / "summary.csv")
        with pytest.raises(ReplayError, match="no evaluation column 'eval_acc'"):
            replay_file(path, eval_column="eval_acc", updates_per_epoch=PER_EPOCH)
    else:
        path = tmp_path / "trainer_state.json"
        path.write_text(json.dumps({"log_history": [{"loss": 1.0, "step": 1}]}))
        with pytest.raises(ReplayError, match="'eval_acc'"):
            replay_file(path, eval_column="eval_acc")
