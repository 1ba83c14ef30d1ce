"""The callback's entry in trainer_state.json: a damaged one is refused whole, naming the file and the key;
an entry written by release 0.1.0 resumes; every checkpoint resumes whatever was resumed before it."""
import copy
import json
import shutil
from pathlib import Path

import pytest
from hf_trainer_tasks import LR, MAX_STEPS, STEP, EventRun, loss_logs, user_trainer

DATA = Path(__file__).resolve().parent / "data"
SAVED_AT = 400


def plateau_stream(length=MAX_STEPS):
    """A loss that falls, then stalls in every stage: a stage's decisions come before its budget."""
    return [0.5 + 0.5 * 0.99 ** i + 0.01 * ((i * 7919) % 13 - 6) for i in range(length)]


@pytest.fixture(scope="module")
def saved_entry():
    from hf_integration import AutoDecayCallback

    run = EventRun(AutoDecayCallback(**STEP), max_steps=MAX_STEPS, save_steps=SAVED_AT)
    run.feed(plateau_stream(SAVED_AT))
    return json.loads(run.saved[SAVED_AT])


def test_a_saved_entry_resumes_as_saved(saved_entry):
    from hf_integration import AutoDecayCallback

    run = EventRun(AutoDecayCallback(**STEP), max_steps=MAX_STEPS, resume=(SAVED_AT, json.dumps(saved_entry)))
    assert run.callback.detector.state_dict() == saved_entry["attributes"]["detector_state"]
    assert saved_entry["attributes"]["detector_state"]["version"] == 3


def _set(entry, path, value):
    *parents, last = path.split(".")
    for key in parents:
        entry = entry[key]
    if value is KeyError:
        del entry[last]
    else:
        entry[last] = value


DETECTOR = "attributes.detector_state"


@pytest.mark.parametrize(
    "path, value, message",
    [("args", KeyError, r"'stateful_callbacks\.AutoDecayCallback\.args' is missing"),
     ("args.decay_rate", "x", r"'stateful_callbacks\.AutoDecayCallback\.args\.decay_rate' must be int or float"),
     ("args.decay_rate", 7, r"stateful_callbacks\.AutoDecayCallback\.args\.decay_rate.*in \(0, 1\), got 7"),
     ("args.min_lr", -1.0, r"args\.min_lr.*got -1\.0"),
     (DETECTOR, [1, 2], r"attributes\.detector_state' must be dict or null"),
     (f"{DETECTOR}.points", KeyError, r"detector_state: .*'points' is missing"),
     (f"{DETECTOR}.points", "x", r"detector_state: .*'points' must be list"),
     (f"{DETECTOR}.stage", 7, r"detector_state: .*'stage' must be in \[0, 3\), got 7"),
     (f"{DETECTOR}.stage", "1", r"detector_state: .*'stage' must be int, got '1'"),
     (f"{DETECTOR}.version", 99, r"detector_state: .*'version' 99 .*newer"),
     (f"{DETECTOR}.settings.window", "x", r"detector_state\.settings: window must be an integer, got 'x'"),
     (f"{DETECTOR}.update", 900, r"'update' is 900, past the checkpoint's step 400")],
)
def test_a_damaged_entry_is_refused_whole_naming_the_key(saved_entry, path, value, message):
    from hf_integration import AutoDecayCallback

    damaged = copy.deepcopy(saved_entry)
    _set(damaged, path, value)
    callback = AutoDecayCallback(**STEP)
    with pytest.raises(ValueError, match=message) as raised:
        EventRun(callback, max_steps=MAX_STEPS, resume=(SAVED_AT, json.dumps(damaged)))
    said = str(raised.value)
    assert "checkpoint-400/trainer_state.json" in said and "delete the AutoDecayCallback entry" in said
    assert callback.detector is None  # nothing applied


@pytest.mark.slow
@pytest.mark.parametrize("restore", [False, True], ids=["plain-resume", "restore_callback_states"])
def test_a_checkpoint_of_release_0_1_0_resumes(tmp_path, restore):
    """tests/data/trainer_state_0.1.0.json: written by release 0.1.0 at step 400 of this task, in stage 1
    (decayed at 240, a fit under way). The weights and optimizer here are this release's, the entry 0.1.0's."""
    from hf_trainer_callbacks import StopAt

    from hf_integration import AutoDecayCallback, find_autodecay_callback

    old = json.loads((DATA / "trainer_state_0.1.0.json").read_text())
    old_state = old["stateful_callbacks"]["AutoDecayCallback"]["attributes"]["detector_state"]
    assert "version" not in old_state and old_state["stage"] == 1 and old_state["update"] == SAVED_AT
    user_trainer(tmp_path, [StopAt(SAVED_AT)]).train()
    checkpoint = tmp_path / f"checkpoint-{SAVED_AT}"
    (checkpoint / "trainer_state.json").write_text(json.dumps(old))

    # 0.1.0 had the step shape only: a plain resume asks for it (the error says so), the Trainer's restore
    # rebuilds the callback from the checkpoint's own arguments
    callback = AutoDecayCallback() if restore else AutoDecayCallback(decay_shape="step")
    if not restore:
        with pytest.raises(ValueError, match="pass decay_shape='step'"):
            user_trainer(tmp_path / "refused", [AutoDecayCallback()]).train(resume_from_checkpoint=str(checkpoint))
    trainer = user_trainer(tmp_path / "resumed", [callback], restore_callback_states_from_checkpoint=restore)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    history = find_autodecay_callback(trainer).history
    assert history[0] == old_state["history"][0]  # the decay 0.1.0 took
    assert history[-1]["action"] == "finish" and all(h["update"] > SAVED_AT for h in history[1:])
    logs = loss_logs(trainer)
    first = logs[SAVED_AT + 10]
    assert first["learning_rate"] == pytest.approx(LR * 0.1) and first["autodecay/stage"] == 1
    stop = trainer.state.global_step
    written = json.loads((tmp_path / "resumed" / f"checkpoint-{stop}" / "trainer_state.json").read_text())
    assert written["stateful_callbacks"]["AutoDecayCallback"]["attributes"]["detector_state"]["version"] == 3


@pytest.mark.slow
def test_trying_an_older_checkpoint_leaves_a_later_one_resumable(tmp_path):
    """Resume from checkpoint-100 into the run's own folder (it rewrites checkpoint-200), stop at 250, then
    resume the same Trainer and callback from the run's last checkpoint before its end: it ends as the
    uninterrupted run did."""
    from hf_trainer_callbacks import StopAt

    from hf_integration import AutoDecayCallback, find_autodecay_callback

    full = user_trainer(tmp_path / "full", [AutoDecayCallback(**STEP)])
    full.train()
    history, stop = find_autodecay_callback(full).history, full.state.global_step
    later = max(s for s in range(100, stop, 100))
    work = tmp_path / "work"
    shutil.copytree(tmp_path / "full", work)

    halt = StopAt(250)
    trainer = user_trainer(work, [AutoDecayCallback(**STEP), halt])
    trainer.train(resume_from_checkpoint=str(work / "checkpoint-100"))
    assert trainer.state.global_step == 250 and (work / "checkpoint-250").exists()
    halt.step = 10**9
    trainer.train(resume_from_checkpoint=str(work / f"checkpoint-{later}"))
    assert find_autodecay_callback(trainer).history == history and trainer.state.global_step == stop
    full_logs, resumed_logs = loss_logs(full), loss_logs(trainer)
    for step in (s for s in full_logs if s > later):
        assert resumed_logs[step]["loss"] == full_logs[step]["loss"]
        assert resumed_logs[step]["learning_rate"] == full_logs[step]["learning_rate"]


def test_resuming_the_checkpoint_a_run_finished_at_trains_nothing_more():
    from hf_integration import AutoDecayCallback

    full = EventRun(AutoDecayCallback(), max_steps=MAX_STEPS, save_steps=MAX_STEPS)
    full.feed(plateau_stream())
    finish = full.callback.history[-1]
    assert finish["action"] == "finish" and finish["update"] < MAX_STEPS and finish["update"] in full.saved
    with pytest.warns(UserWarning, match="already finished at step"):
        resumed = EventRun(AutoDecayCallback(), max_steps=MAX_STEPS,
                           resume=(finish["update"], full.saved[finish["update"]]))
    resumed.feed(plateau_stream()[finish["update"]:])
    assert resumed.stopped and len(resumed.used) <= 1  # at most the step the Trainer runs before it checks
