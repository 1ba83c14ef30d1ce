"""Replay: loss files of every format, index semantics, the CLI."""
import csv
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from timm_autodecay.cli import main
from timm_autodecay.detector import Decision, StageDetector
from timm_autodecay.replay import ReplayError, load_series, replay, replay_file

REPO = Path(__file__).resolve().parents[1]
TIMM_HEADER = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]


def three_stage_curve(updates_per_stage=600):
    """Per-update losses of a step-decay run: each stage falls fast, then flattens; 5% noise."""
    rng = random.Random(0)
    losses = []
    for floor, height in [(2.0, 4.0), (1.0, 0.8), (0.6, 0.3)]:
        for t in range(updates_per_stage):
            losses.append((floor + height * math.exp(-t / 60)) * (1 + 0.05 * rng.gauss(0, 1)))
    return losses


def falling(n, per_value=1):
    """A loss that falls fast at every scale: no plateau, so only the budget ends stages."""
    return [math.exp(-(i + 1) * per_value / 50) for i in range(n)]


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def write_timm_summary(path, train_losses, lr=0.1):
    """Rows as timm's update_summary writes them (one per epoch)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TIMM_HEADER)
        for epoch, loss in enumerate(train_losses):
            writer.writerow([epoch, loss, loss * 1.1, 50.0 + epoch / 10, 75.0 + epoch / 10, lr])
    return path


def trainer_state(losses, steps, max_steps, logging_steps):
    """A trainer_state.json as Transformers writes it: loss logs, eval logs, a closing summary."""
    history = []
    for loss, step in zip(losses, steps):
        history.append({"epoch": step / 8, "grad_norm": 2.5, "learning_rate": 4e-05,
                        "loss": loss, "step": step})
        if step % (2 * logging_steps) == 0:
            history.append({"epoch": step / 8, "eval_loss": 3.43, "eval_runtime": 0.003,
                            "eval_samples_per_second": 20792.8, "eval_steps_per_second": 2599.1,
                            "step": step})
    history.append({"epoch": max_steps / 8, "step": max_steps, "total_flos": 0.0,
                    "train_loss": sum(losses) / len(losses), "train_runtime": 0.04,
                    "train_samples_per_second": 4942.2, "train_steps_per_second": 617.8})
    return {"best_global_step": None, "best_metric": None, "best_model_checkpoint": None,
            "epoch": max_steps / 8, "eval_steps": 2 * logging_steps, "global_step": max_steps,
            "is_hyper_param_search": False, "is_local_process_zero": True,
            "is_world_process_zero": True, "log_history": history,
            "logging_steps": logging_steps, "max_steps": max_steps, "num_input_tokens_seen": 0,
            "num_train_epochs": 3, "save_steps": 500,
            "stateful_callbacks": {"TrainerControl": {"args": {"should_training_stop": False},
                                                      "attributes": {}}},
            "total_flos": 0.0, "train_batch_size": 8, "trial_name": None, "trial_params": None}


def run_cli(capsys, *argv):
    """main()'s exit code, its stdout, its stderr."""
    try:
        code = main(list(map(str, argv)))
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


# -- formats ------------------------------------------------------------------------------------
def test_json_list_is_one_loss_per_update(tmp_path):
    series = load_series(write_json(tmp_path / "losses.json", [3.0, 2, 1.5]))
    assert (series.values, series.counts, series.kind) == ([3.0, 2.0, 1.5], [1, 1, 1], "json-list")


def test_json_list_is_recognised_by_content(tmp_path):
    path = tmp_path / "losses.txt"
    path.write_text(" [1.0, 0.5]\n")
    assert load_series(path).values == [1.0, 0.5]


def test_csv_default_column_is_train_loss_then_loss(tmp_path):
    both = tmp_path / "both.csv"
    both.write_text("step,loss,train_loss\n1,9,3.0\n2,9,2.0\n")
    assert load_series(both).values == [3.0, 2.0]
    loss_only = tmp_path / "loss.csv"
    loss_only.write_text("step,loss\n1,3.0\n2,2.0\n")
    series = load_series(loss_only)
    assert (series.values, series.counts, series.kind) == ([3.0, 2.0], [1, 1], "csv")


def test_csv_column_is_chosen_by_name_and_blank_cells_are_skipped(tmp_path):
    # a Lightning-style metrics.csv: a row logs either the train or the val loss
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train_step_loss,val_loss\n0,0,3.0,\n0,1,2.5,\n0,1,,2.9\n0,2,2.0,\n")
    assert load_series(path, column="train_step_loss").values == [3.0, 2.5, 2.0]
    assert load_series(path, column="val_loss").values == [2.9]


def test_timm_summary_rows_stand_for_an_epoch_of_updates(tmp_path):
    path = write_timm_summary(tmp_path / "summary.csv", [6.9, 6.1, 5.4])
    series = load_series(path, updates_per_epoch=250)
    assert (series.values, series.counts, series.kind) == ([6.9, 6.1, 5.4], [250] * 3, "timm-summary")
    assert load_series(path, column="eval_loss", updates_per_epoch=250).counts == [250] * 3


def test_timm_summary_repeated_header_from_a_resume_is_skipped(tmp_path):
    path = tmp_path / "summary.csv"
    header = ",".join(TIMM_HEADER)
    path.write_text(f"{header}\n0,6.9,6.8,1.0,5.0,0.1\n{header}\n1,6.1,6.0,2.0,8.0,0.1\n")
    assert load_series(path, updates_per_epoch=10).values == [6.9, 6.1]


def test_trainer_state_counts_the_steps_since_the_previous_loss_log(tmp_path):
    state = trainer_state([3.37, 2.85, 4.02, 3.61], steps=[1, 10, 20, 30], max_steps=32, logging_steps=10)
    series = load_series(write_json(tmp_path / "trainer_state.json", state))
    # eval entries and the closing train_loss summary are not losses of the run
    assert series.values == [3.37, 2.85, 4.02, 3.61]
    assert series.counts == [1, 9, 10, 10]
    assert (series.kind, series.total_updates, series.logging_steps) == ("trainer-state", 32, 10)


# -- replay and its index semantics -------------------------------------------------------------
class ScriptedDetector:
    """Answers a fixed decision at given observations, and records what it was fed."""

    def __init__(self, script):
        self.script, self.fed, self.stage = script, [], 0

    def observe(self, value, count=1):
        self.fed.append((value, count))
        action = self.script.get(len(self.fed) - 1, "continue")
        if action == "decay":
            self.stage += 1
        return Decision(action, self.stage, sum(c for _, c in self.fed))


def test_index_is_the_position_of_the_triggering_value_and_feeding_stops_at_finish():
    detector = ScriptedDetector({2: "decay", 4: "decay", 6: "finish"})
    decisions = replay([9.0, 8, 7, 6, 5, 4, 3, 2, 1], [5, 5, 5, 5, 5, 5, 5, 5, 5], detector)
    assert decisions == [{"index": 2, "update": 15, "action": "decay", "stage": 1},
                         {"index": 4, "update": 25, "action": "decay", "stage": 2},
                         {"index": 6, "update": 35, "action": "finish", "stage": 2}]
    assert detector.fed == [(9.0, 5), (8, 5), (7, 5), (6, 5), (5, 5), (4, 5), (3, 5)]


def test_counts_default_to_one_and_must_match_the_series():
    detector = ScriptedDetector({})
    assert replay([3.0, 2.0], None, detector) == []
    assert detector.fed == [(3.0, 1), (2.0, 1)]
    with pytest.raises(ValueError):
        replay([3.0, 2.0], [1], ScriptedDetector({}))


def test_replay_with_the_real_detector_decays_at_plateaus_and_finishes():
    losses = three_stage_curve()
    detector = StageDetector(decay_shape="step", total_updates=len(losses))
    decisions = replay(losses, None, detector)
    assert [d["action"] for d in decisions] == ["decay", "decay", "finish"]
    assert [d["stage"] for d in decisions] == [1, 2, 2]
    # one update per value: the triggering value is the detector's update number minus one
    assert decisions[-1]["index"] == detector.update - 1
    assert [h["update"] - 1 for h in detector.history] == [d["index"] for d in decisions]


@pytest.mark.parametrize("fmt", ["json", "summary", "trainer_state"])
def test_budget_ends_stages_at_the_value_covering_the_milestone(tmp_path, fmt):
    """300 updates in 3 stages: milestones at updates 100, 200, 300, so at values 99, 199, 299 of a
    per-update series and at values 9, 19, 29 of one logged every 10 updates."""
    if fmt == "json":
        path, settings, last = write_json(tmp_path / "l.json", falling(300)), {"total_updates": 300}, 299
    elif fmt == "summary":
        path = write_timm_summary(tmp_path / "summary.csv", falling(30, per_value=10))
        settings, last = {"total_updates": 300, "updates_per_epoch": 10}, 29
    else:  # the budget comes from max_steps
        state = trainer_state(falling(30, per_value=10), steps=range(10, 301, 10), max_steps=300,
                              logging_steps=10)
        path, settings, last = write_json(tmp_path / "trainer_state.json", state), {}, 29
    result = replay_file(path, decay_shape="step", **settings)
    third = (last + 1) // 3
    assert result["decisions"] == [{"index": third - 1, "update": 100, "action": "decay", "stage": 1},
                                   {"index": 2 * third - 1, "update": 200, "action": "decay", "stage": 2},
                                   {"index": last, "update": 300, "action": "finish", "stage": 2}]
    assert result["settings"]["total_updates"] == 300


# -- the command line ---------------------------------------------------------------------------
def test_cli_prints_decisions_and_the_full_settings(tmp_path, capsys):
    path = write_json(tmp_path / "losses.json", three_stage_curve())
    code, out, err = run_cli(capsys, "replay", path, "--total-updates", 1800, "--num-stages", 3,
                                "--decay-shape", "step")
    assert (code, err) == (0, "")
    result = json.loads(out)
    assert set(result) == {"decisions", "settings"}
    assert result["settings"] == StageDetector(decay_shape="step", total_updates=1800).settings()
    assert [d["action"] for d in result["decisions"]] == ["decay", "decay", "finish"]


def test_cli_has_a_flag_for_every_detector_setting(tmp_path, capsys):
    path = write_json(tmp_path / "losses.json", falling(50))
    given = {"num_stages": 2, "total_updates": 400, "updates_per_epoch": 20, "warmup_updates": 5,
             "window": 40, "patience": 7, "significance": 2.0, "min_progress": 0.1,
             "min_points": 4, "first_stage_patience": 0.5, "decay_shape": "cooldown",
             "cooldown_fraction": 0.3, "cooldown_curve": "linear", "eval_mode": "max", "eval_patience": 4}
    assert set(given) == set(StageDetector.SETTINGS), "a new setting: add it to this test"
    argv = [x for name, value in given.items() for x in ("--" + name.replace("_", "-"), value)]
    code, out, err = run_cli(capsys, "replay", path, *argv)
    assert (code, err) == (0, "")
    assert json.loads(out)["settings"] == given


def test_cli_summary_and_trainer_state(tmp_path, capsys):
    summary = write_timm_summary(tmp_path / "summary.csv", falling(30, per_value=10))
    code, out, _ = run_cli(capsys, "replay", summary, "--updates-per-epoch", 10, "--total-updates", 300,
                           "--decay-shape", "step")
    assert code == 0 and [d["index"] for d in json.loads(out)["decisions"]] == [9, 19, 29]

    state = trainer_state(falling(30, per_value=10), steps=range(10, 301, 10), max_steps=300,
                          logging_steps=10)
    path = write_json(tmp_path / "trainer_state.json", state)
    code, out, _ = run_cli(capsys, "replay", path, "--decay-shape", "step")
    result = json.loads(out)
    assert code == 0 and result["settings"]["total_updates"] == 300  # max_steps from the file
    assert [d["index"] for d in result["decisions"]] == [9, 19, 29]
    code, out, _ = run_cli(capsys, "replay", path, "--total-updates", 600)  # the flag wins
    assert code == 0 and json.loads(out)["settings"]["total_updates"] == 600


def test_multiplying_every_loss_by_100_changes_no_decision(tmp_path, capsys):
    losses = three_stage_curve()
    outputs = []
    for scale in (1, 100):
        path = write_json(tmp_path / f"losses_x{scale}.json", [v * scale for v in losses])
        for settings in ([], ["--total-updates", len(losses)], ["--window", 100]):
            code, out, _ = run_cli(capsys, "replay", path, *settings)
            assert code == 0
            outputs.append(json.loads(out)["decisions"])
    assert outputs[:3] == outputs[3:]
    assert any(outputs[:3]), "the curve must produce decisions for the check to mean anything"


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _trainer_state_with(**change):
    state = trainer_state([3.0, 2.0], steps=change.pop("steps", [10, 20]), max_steps=20, logging_steps=10)
    state["log_history"][-2].update(change)
    return state


SUMMARY_ROW = ",".join(TIMM_HEADER) + "\n0,6.9,6.8,1,5,0.1\n"

# name -> (make the file in a folder, extra CLI arguments, words the error message must contain)
BAD_FILES = {
    "missing": (lambda d: d / "nowhere.json", [], "cannot read"),
    "binary": (lambda d: _write(d / "checkpoint.pth.tar", b"\x80\x02\xff\xfe\x00\x81"), [], "cannot read"),
    "empty file": (lambda d: _write(d / "empty.csv", "\n"), [], "empty"),
    "bad json": (lambda d: _write(d / "losses.json", "[1.0, 2.0"), [], "not valid JSON"),
    "empty list": (lambda d: _write(d / "none.json", "[]"), [], "no losses"),
    "json object": (lambda d: _write(d / "obj.json", {"loss": [1, 2]}), [], "log_history"),
    "json string": (lambda d: _write(d / "mixed.json", [1.0, "2.0"]), [], "item 1"),
    "json null": (lambda d: _write(d / "null.json", [1.0, None]), [], "not a number"),
    "no loss column": (lambda d: _write(d / "acc.csv", "step,acc\n1,0.5\n"), [], "step, acc"),
    "unknown column": (lambda d: _write(d / "l.csv", "step,loss\n1,0.5\n"), ["--column", "los"],
                       "no column 'los'"),
    "csv non-number": (lambda d: _write(d / "l.csv", "step,loss\n1,0.5\n2,oops\n"), [], "row 3"),
    "header only": (lambda d: _write(d / "h.csv", "step,loss\n"), [], "no losses"),
    "summary without updates_per_epoch": (lambda d: _write(d / "summary.csv", SUMMARY_ROW), [],
                                          "updates-per-epoch"),
    "trainer_state non-number": (lambda d: _write(d / "trainer_state.json", _trainer_state_with(loss="2.0")),
                                 [], "['loss']"),
    "trainer_state steps backwards": (lambda d: _write(d / "trainer_state.json",
                                                       _trainer_state_with(steps=[20, 10])),
                                      [], "does not follow step 20"),
    "column on json": (lambda d: _write(d / "c.json", [1.0]), ["--column", "loss"], "CSV files only"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_cli_bad_file_exits_2_with_a_message_naming_the_file(tmp_path, capsys, case):
    make, extra, words = BAD_FILES[case]
    path = make(tmp_path)
    code, out, err = run_cli(capsys, "replay", path, *extra)
    assert code == 2 and out == ""
    assert err.startswith(f"timm-autodecay: error: {path}: ")
    assert words in err


def test_cli_invalid_setting_exits_2(tmp_path, capsys):
    code, out, err = run_cli(capsys, "replay", write_json(tmp_path / "l.json", [1.0]), "--num-stages", 0)
    assert code == 2 and out == ""
    assert err.startswith("timm-autodecay: error: ") and "num_stages" in err


def test_load_series_raises_replay_error_a_value_error(tmp_path):
    with pytest.raises(ReplayError, match="no losses") as caught:
        load_series(write_json(tmp_path / "l.json", []))
    assert isinstance(caught.value, ValueError)


def test_cli_usage_errors_exit_2(capsys):
    code, out, err = run_cli(capsys, "replay", "l.json", "--num-stages", "three")
    assert code == 2 and err.startswith("timm-autodecay: error: ")
    code, out, err = run_cli(capsys)
    assert code == 2 and err.startswith("timm-autodecay: error: ")


def test_cli_runs_as_a_program(tmp_path):
    path = write_json(tmp_path / "losses.json", falling(30))
    done = subprocess.run([sys.executable, "-m", "timm_autodecay.cli", "replay", str(path),
                           "--total-updates", "30"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["decisions"][-1] == {"index": 29, "update": 30, "action": "finish", "stage": 0}


def test_non_finite_losses_reach_the_detector_and_a_diverged_run_is_an_error(tmp_path, capsys):
    path = tmp_path / "l.json"
    path.write_text("[3.0, NaN, Infinity, 2.0]")  # what json.dumps writes for float("nan"), ...
    values = load_series(path).values
    assert values[0] == 3.0 and math.isnan(values[1]) and values[2] == math.inf
    diverged = write_json(tmp_path / "diverged.json", falling(20) + [math.nan] * 100)
    code, out, err = run_cli(capsys, "replay", diverged, "--window", 50)
    assert code == 2 and out == ""
    warning, error = err.splitlines()[:2]
    assert warning.startswith("timm-autodecay: warning: ") and "non-finite" in warning
    assert error.startswith(f"timm-autodecay: error: {diverged}: ") and "non-finite" in error


# -- runs as they really are: resumed, misread budgets, a cooldown -------------------------------
def test_a_resumed_timm_run_counts_each_epoch_once_the_last_row_of_it(tmp_path, capsys):
    """train.py appends to summary.csv: a run resumed from epoch 2's checkpoint logs epochs 2-3 again."""
    path = tmp_path / "summary.csv"
    header = ",".join(TIMM_HEADER)
    rows = [(0, 6.9), (1, 6.1), (2, 5.4), (3, 9.9), (2, 5.5), (3, 5.0), (4, 4.6)]
    path.write_text(header + "\n" + "".join(f"{e},{loss},0,0,0,0.1\n" for e, loss in rows))
    with pytest.warns(UserWarning, match="epochs 2-3 appear more than once"):
        series = load_series(path, updates_per_epoch=10)
    assert series.values == [6.9, 6.1, 5.5, 5.0, 4.6] and series.counts == [10] * 5
    code, out, err = run_cli(capsys, "replay", path, "--updates-per-epoch", 10)
    assert code == 0 and "warning: " in err and "epochs 2-3" in err


def test_a_timm_budget_given_in_epochs_is_an_error_saying_the_updates(tmp_path, capsys):
    summary = write_timm_summary(tmp_path / "summary.csv", falling(30, per_value=10))
    code, out, err = run_cli(capsys, "replay", summary, "--updates-per-epoch", 10, "--total-updates", 30)
    assert code == 2 and out == ""
    assert "counts updates, not epochs" in err and "--total-updates 300" in err


def test_a_budget_below_the_logged_updates_warns(tmp_path, capsys):
    path = write_json(tmp_path / "losses.json", falling(300))
    code, out, err = run_cli(capsys, "replay", path, "--total-updates", 150)
    assert code == 0 and json.loads(out)["decisions"][-1]["update"] == 150
    assert err.startswith("timm-autodecay: warning: ") and "logs 300 updates, more than" in err
    code, out, err = run_cli(capsys, "replay", path, "--total-updates", 300)
    assert (code, err) == (0, "")


@pytest.mark.parametrize("value", [0, -5])
def test_updates_per_epoch_below_one_is_named_with_its_value(tmp_path, capsys, value):
    summary = write_timm_summary(tmp_path / "summary.csv", [6.9, 6.1])
    code, out, err = run_cli(capsys, "replay", summary, "--updates-per-epoch", value)
    assert code == 2 and "updates_per_epoch" in err and f"got {value}" in err


def test_replay_with_the_cooldown_shape_prints_where_the_cooldown_starts_and_ends(tmp_path, capsys):
    path = write_json(tmp_path / "losses.json", falling(1200, per_value=0.02))  # falling: the budget decides
    code, out, err = run_cli(capsys, "replay", path, "--total-updates", 1000, "--decay-shape", "cooldown")
    assert code == 0 and "warning" in err  # the file runs past the budget
    result = json.loads(out)
    assert [(d["update"], d["action"]) for d in result["decisions"]] == [(800, "cooldown"), (1000, "finish")]
    assert result["cooldown"] == {"start_update": 800, "end_update": 1000, "updates": 200, "curve": "1-sqrt",
                                  "reached_end": True}


def test_a_file_that_ends_mid_cooldown_shows_where_it_would_end(tmp_path):
    path = write_json(tmp_path / "losses.json", falling(900, per_value=0.02))
    result = replay_file(path, total_updates=1000, decay_shape="cooldown")
    assert [d["action"] for d in result["decisions"]] == ["cooldown"]
    assert result["cooldown"]["end_update"] == 1000 and result["cooldown"]["reached_end"] is False
