"""The evaluation signal in the Trainer callback, through the Trainer's events (``EventRun``): the metric the
Trainer keeps the best model by ends the stable phase once it has stopped improving, while the training
loss still falls; when it is on; how its name and direction are read; exact resumes with its state; entries
written before it existed."""
import json
import logging
import warnings
from pathlib import Path

import pytest
from hf_trainer_tasks import STEP, EventRun

from timm_autodecay.evaluations import first_ending

DATA = Path(__file__).resolve().parent / "data"
MAX_STEPS = 3000  # stage budget 2400 (the cooldown's fifth set aside): window 480 steps = 24 logs
EVAL_STEPS = 70  # not a multiple of the logging interval: the callback asks for a loss log at each evaluation
PEAK = 15 * EVAL_STEPS
PATIENCE = 3  # eval_patience's default


def falling_loss(length=MAX_STEPS):
    """A training loss that falls all along (no plateau: only an evaluation ends the stage)."""
    return [3.0 - i / 1500 + 0.01 * ((i * 7919) % 13 - 6) for i in range(length)]


def peaked(step, peak=PEAK, best=0.9, sign=1.0):
    """An evaluation peaking at ``peak`` (a trough with ``sign=-1``), with noise smaller than its slope."""
    return sign * (best - abs(step - peak) / 5000 + 0.002 * ((step * 37) % 5 - 2))


def accuracy(step):
    return {"eval_accuracy": peaked(step), "eval_loss": 1.0, "eval_runtime": 0.1}


def quiet_run(callback, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EventRun(callback, **kwargs)


def eval_run(callback=None, metrics=accuracy, metric="accuracy", **kwargs):
    from hf_integration import AutoDecayCallback

    kwargs = {"max_steps": MAX_STEPS, "logging_steps": 20, "eval_steps": EVAL_STEPS, "metrics": metrics,
              "metric_for_best_model": metric, **kwargs}
    return quiet_run(callback or AutoDecayCallback(), **kwargs)


@pytest.mark.parametrize("metric, metrics", [
    ("accuracy", accuracy),
    ("eval_loss", lambda step: {"eval_loss": peaked(step, best=-0.5, sign=-1.0)}),
], ids=["accuracy-peak", "loss-trough"])
def test_a_peak_in_the_evaluations_ends_the_stable_phase_while_the_loss_falls(metric, metrics):
    run = eval_run(metrics=metrics, metric=metric)
    run.feed(falling_loss())
    first = run.callback.history[0]
    assert first["action"] == "cooldown" and first["reason"] == "evaluation", run.callback.history
    # where the rule puts it (the best smoothed value at the peak's evaluation or the next), at an evaluation's step
    due = [first_ending(PEAK // EVAL_STEPS + late, PATIENCE) * EVAL_STEPS for late in (0, 1)]
    assert due[0] <= first["update"] <= due[1] and first["update"] % EVAL_STEPS == 0
    assert run.evals[first["update"]]["autodecay/decision"] == "cooldown"
    assert run.evals[first["update"]]["autodecay/reason"] == "evaluation"
    assert run.callback.best_eval["update"] == PEAK
    assert run.callback.history[-1]["action"] == "finish" and run.stopped
    assert run.state.global_step == run.callback.history[-1]["update"] < MAX_STEPS

    # the training loss alone ends nothing there: without the signal only the budget ends the stage
    from hf_integration import AutoDecayCallback

    off = eval_run(AutoDecayCallback(eval_signal=False), metrics=metrics, metric=metric)
    off.feed(falling_loss())
    assert off.callback.history[0]["reason"] == "budget" and off.callback.eval_metric is None


def test_with_the_step_shape_an_evaluation_decays_the_learning_rate_from_the_next_step():
    from hf_integration import AutoDecayCallback

    early_peak = lambda step: {"eval_accuracy": peaked(step, peak=5 * EVAL_STEPS), "eval_loss": 1.0}
    run = eval_run(AutoDecayCallback(decay_rate=0.5, num_stages=2, **STEP), metrics=early_peak)  # stage budget 1500
    run.feed(falling_loss(PEAK + 6 * EVAL_STEPS))
    first = run.callback.history[0]
    assert first["action"] == "decay" and first["reason"] == "evaluation"
    assert run.used[first["update"]] == [1.0] and run.used[first["update"] + 1] == [0.5]
    later = [s for s in run.evals if s > first["update"]]
    assert later and run.callback.detector.evaluations.count == len(later)  # the next stage's series starts afresh


def test_resume_mid_run_continues_exactly_with_the_evaluations_state():
    from hf_integration import AutoDecayCallback

    save = 2 * EVAL_STEPS
    losses = falling_loss()
    full = eval_run(save_steps=save)
    full.feed(losses)
    decided = full.callback.history[0]["update"]
    mid = max(s for s in full.saved if s < decided)  # after the peak, evaluations under way
    saved = json.loads(full.saved[mid])["attributes"]["detector_state"]
    assert saved["evaluations"]["count"] > PATIENCE and saved["evaluations"]["best_update"] == PEAK

    resumed = eval_run(AutoDecayCallback(), save_steps=save, resume=(mid, full.saved[mid]))
    resumed.feed(losses[mid:])
    assert resumed.callback.history == full.callback.history
    assert resumed.callback.best_eval == full.callback.best_eval
    assert resumed.state.global_step == full.state.global_step
    assert all(resumed.used[s] == full.used[s] for s in range(mid + 1, full.state.global_step + 1))
    assert {s: e for s, e in full.evals.items() if s > mid} == resumed.evals
    assert all(resumed.saved[s] == full.saved[s] for s in resumed.saved)


@pytest.mark.parametrize("eval_steps, arguments, eval_signal, expected", [
    (EVAL_STEPS, {"metric_for_best_model": "accuracy"}, None, ("eval_accuracy", "max")),
    (EVAL_STEPS, {"metric_for_best_model": "eval_f1"}, None, ("eval_f1", "max")),
    (EVAL_STEPS, {"metric_for_best_model": "eval_loss"}, None, ("eval_loss", "min")),
    (EVAL_STEPS, {"metric_for_best_model": "bleu", "greater_is_better": False}, None, ("eval_bleu", "min")),
    (EVAL_STEPS, {"load_best_model_at_end": True, "save_steps": 2 * EVAL_STEPS}, None, ("eval_loss", "min")),
    (EVAL_STEPS, {}, None, None),  # evaluations, but no metric named
    (0, {"metric_for_best_model": "accuracy"}, None, None),  # a metric named, but no evaluations
    (EVAL_STEPS, {}, True, ("eval_loss", "min")),
    (EVAL_STEPS, {"metric_for_best_model": "accuracy"}, False, None),
], ids=["accuracy", "eval_f1", "eval_loss", "greater_is_better=False", "load_best_model_at_end", "no-metric",
        "no-evaluations", "asked", "refused"])
def test_the_signal_is_on_with_evaluations_and_metric_for_best_model_or_when_asked(eval_steps, arguments,
                                                                                   eval_signal, expected):
    from hf_integration import AutoDecayCallback

    run = quiet_run(AutoDecayCallback(eval_signal=eval_signal), max_steps=MAX_STEPS, logging_steps=20,
                    eval_steps=eval_steps, **arguments)
    found = run.callback.eval_metric
    assert (found if found is None else (found, run.callback.detector.eval_mode)) == expected


def test_asking_for_the_signal_without_evaluations_is_refused_naming_both():
    from hf_integration import AutoDecayCallback

    with pytest.raises(ValueError, match=r"eval_signal=True.*eval_strategy='no'"):
        quiet_run(AutoDecayCallback(eval_signal=True), max_steps=MAX_STEPS, logging_steps=20)
    with pytest.raises(ValueError, match="eval_signal must be"):
        AutoDecayCallback(eval_signal="yes")


def test_an_eval_mode_against_greater_is_better_is_refused_naming_both():
    from hf_integration import AutoDecayCallback

    with pytest.raises(ValueError, match=r"eval_mode='min'.*greater_is_better=True.*'eval_accuracy'"):
        eval_run(AutoDecayCallback(eval_mode="min"))
    with pytest.raises(ValueError, match=r"eval_mode='max'.*greater_is_better unset.*lower-better"):
        eval_run(AutoDecayCallback(eval_mode="max", eval_signal=True), metric=None)
    assert eval_run(AutoDecayCallback(eval_mode="max", eval_patience=2)).callback.detector.eval_patience == 2


def test_one_warning_says_how_to_keep_the_best_model_unless_it_is_kept():
    from hf_integration import AutoDecayCallback

    common = {"max_steps": MAX_STEPS, "logging_steps": 20, "eval_steps": EVAL_STEPS, "metrics": accuracy,
              "metric_for_best_model": "accuracy"}
    with pytest.warns(UserWarning, match="final model may be past the best evaluation.*load_best_model_at_end=True"):
        EventRun(AutoDecayCallback(), **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EventRun(AutoDecayCallback(), load_best_model_at_end=True, save_steps=2 * EVAL_STEPS, **common)
    with pytest.warns(UserWarning, match=r"eval_patience=5 given, but the evaluation signal is off"):
        EventRun(AutoDecayCallback(eval_patience=5), max_steps=MAX_STEPS, logging_steps=20)


def test_evaluations_without_the_metric_are_left_out_with_one_warning(caplog):
    run = eval_run(metrics=lambda step: {"eval_loss": 1.0})
    with caplog.at_level(logging.WARNING, logger="hf_integration.callback"):
        run.feed(falling_loss(PEAK + 10 * EVAL_STEPS))
    said = [r.getMessage() for r in caplog.records if "has no eval_accuracy" in r.getMessage()]
    assert len(said) == 1 and "['eval_loss']" in said[0]
    assert run.callback.history == [] and run.callback.best_eval is None


def saved_entry_of(detector_state, decay_rate=0.1):
    return json.dumps({"args": {"decay_rate": decay_rate}, "attributes": {"detector_state": detector_state}})


@pytest.mark.parametrize("source", ["0.1.0", "0.2.0"])
def test_entries_written_before_evaluations_resume_with_this_runs_evaluation_settings(source):
    """The entry of release 0.1.0 (a whole trainer_state.json) and a detector state of 0.2.0 (version 2): no
    evaluation recorded, so the Trainer's greater_is_better sets the direction, without a settings warning."""
    if source == "0.1.0":
        entry = json.loads((DATA / "trainer_state_0.1.0.json").read_text())["stateful_callbacks"]["AutoDecayCallback"]
        state = entry["attributes"]["detector_state"]
    else:
        state = json.loads((DATA / "detector_state_0.2.0.json").read_text())
    from hf_integration import AutoDecayCallback

    at, total = state["update"], state["settings"]["total_updates"]
    peak = (at // EVAL_STEPS + 3) * EVAL_STEPS
    settings = {k: v for k, v in state["settings"].items() if k in ("num_stages", "window", "patience")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = EventRun(AutoDecayCallback(**STEP, **settings), max_steps=total, logging_steps=4, eval_steps=EVAL_STEPS,
                       metrics=lambda step: accuracy(step - peak + PEAK), load_best_model_at_end=True,
                       metric_for_best_model="accuracy", save_steps=EVAL_STEPS, resume=(at, saved_entry_of(state)))
    assert not [w for w in caught if "eval_" in str(w.message)]
    detector = run.callback.detector
    assert (detector.eval_mode, detector.stage, detector.update) == ("max", state["stage"], at)
    assert detector.history == state["history"]
    last = state["points"][-1][1]  # the loss goes on falling as it fell: no plateau ends the last stage
    run.feed([last - 0.001 * i + 0.002 * ((i * 7919) % 13 - 6) for i in range(8 * EVAL_STEPS)])
    assert run.callback.best_eval["update"] == peak


def test_a_saved_direction_that_differs_once_evaluations_were_recorded_is_refused_naming_it():
    from hf_integration import AutoDecayCallback

    full = eval_run(save_steps=2 * EVAL_STEPS)
    full.feed(falling_loss(PEAK))
    at = max(full.saved)
    with pytest.raises(ValueError, match=f"checkpoint-{at}: .*eval_mode: checkpoint 'max', now 'min'"):
        EventRun(AutoDecayCallback(), max_steps=MAX_STEPS, logging_steps=20, eval_steps=EVAL_STEPS,
                 metrics=accuracy, metric_for_best_model="accuracy", greater_is_better=False,
                 resume=(at, full.saved[at]))


def test_eval_signal_travels_in_the_saved_entry_when_passed():
    """The Trainer's restore_callback_states_from_checkpoint rebuilds the callback from the entry's args."""
    from hf_integration import AutoDecayCallback

    assert "eval_signal" not in AutoDecayCallback().state()["args"]  # as release 0.2.0 wrote them
    args = AutoDecayCallback(eval_signal=False, eval_patience=4).state()["args"]
    assert args["eval_signal"] is False and AutoDecayCallback(**args).eval_signal is False


def test_a_damaged_eval_signal_in_the_saved_entry_is_refused_naming_the_key():
    from hf_integration import AutoDecayCallback

    full = eval_run(save_steps=2 * EVAL_STEPS)
    full.feed(falling_loss(2 * EVAL_STEPS))
    entry = json.loads(full.saved[2 * EVAL_STEPS])
    entry["args"]["eval_signal"] = "yes"
    with pytest.raises(ValueError, match=r"args\.eval_signal.*eval_signal must be"):
        eval_run(AutoDecayCallback(), resume=(2 * EVAL_STEPS, json.dumps(entry)))


def test_the_final_model_is_evaluated_so_load_best_model_at_end_weighs_it():
    run = eval_run()
    run.feed(falling_loss())
    finish = run.callback.history[-1]
    assert finish["action"] == "finish" and finish["update"] % EVAL_STEPS != 0  # not an evaluation step of its own
    assert finish["update"] in run.evals and run.stopped
