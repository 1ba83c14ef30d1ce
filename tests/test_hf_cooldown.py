"""``decay_shape="cooldown"`` under the Trainer with ``constant_with_warmup``: when the stable stage ends
(plateau or its budget share) the LR anneals to ``min_lr`` (0 unless given) along the cooldown's curve,
set at every step; the run finishes with a checkpoint at the cooldown's end; a resume mid-cooldown
continues exactly."""
import json
import math

import pytest
from hf_trainer_tasks import LR, MAX_STEPS, EventRun, loss_logs, user_trainer

WARMUP = 30


def plateau_stream(length=MAX_STEPS):
    """A loss that falls and stalls well before the stable budget's end."""
    return [0.5 + 0.5 * 0.99 ** i + 0.01 * ((i * 7919) % 13 - 6) for i in range(length)]


def cooldown_lr(step, start, length, peak, floor=0.0, curve="1-sqrt"):
    """The LR step ``step`` runs with: written out here, not taken from the package."""
    progress = (step - 1 - start) / length
    share = {"1-sqrt": 1 - math.sqrt(progress), "linear": 1 - progress,
             "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[curve]
    return floor + (peak - floor) * share


def cooldown_run(stream, save_steps=50, resume=None, **settings):
    from hf_integration import AutoDecayCallback

    callback = AutoDecayCallback(decay_shape="cooldown", **settings)
    run = EventRun(callback, max_steps=MAX_STEPS, lr=LR, warmup_steps=WARMUP, save_steps=save_steps, resume=resume)
    run.feed(stream[run.state.global_step:])
    return run


def check_cooldown(run, floor=0.0, curve="1-sqrt"):
    """The cooldown began at a stage end, the LR followed its curve at every step, and the run finished
    at its end with a checkpoint. Returns (start, length)."""
    history = run.callback.history
    assert [h["action"] for h in history] == ["cooldown", "finish"] and history[1]["reason"] == "cooldown"
    start, end = history[0]["update"], history[1]["update"]
    length = math.ceil(start * 0.2 / 0.8)
    assert end == start + length == run.state.global_step and end in run.saved
    for step in range(WARMUP + 1, end + 1):
        want = LR if step <= start else cooldown_lr(step, start, length, LR, floor, curve)
        assert run.used[step] == [pytest.approx(want, rel=1e-12, abs=1e-15)], step
    assert all(logs["learning_rate"] == run.used[step][0] for step, logs in run.logs.items())
    return start, length


@pytest.mark.parametrize("curve", ["1-sqrt", "linear", "cosine"])
def test_a_plateau_starts_a_cooldown_along_its_curve_then_the_run_finishes(curve):
    run = cooldown_run(plateau_stream(), cooldown_curve=curve)
    start, length = check_cooldown(run, curve=curve)
    assert run.callback.history[0]["reason"] == "plateau" and start + length < MAX_STEPS


def test_the_floor_is_min_lr_when_given():
    run = cooldown_run(plateau_stream(), min_lr=0.05)
    start, length = check_cooldown(run, floor=0.05)
    assert run.used[start + length][0] > 0.05


def test_without_a_plateau_the_cooldown_fills_the_last_fifth_of_the_budget():
    run = cooldown_run([2.0 - i / 1000 for i in range(MAX_STEPS)], patience=10**6)
    assert check_cooldown(run) == (1200, 300)  # stable until 80% of max_steps, finished at max_steps
    assert run.callback.history[0]["reason"] == "budget"


def test_a_resume_mid_cooldown_continues_exactly():
    full = cooldown_run(plateau_stream())
    start, length = check_cooldown(full)
    mid = next(s for s in sorted(full.saved) if start < s < start + length - 50)
    assert json.loads(full.saved[mid])["attributes"]["detector_state"]["cooldown_start"] == start
    resumed = cooldown_run(plateau_stream(), resume=(mid, full.saved[mid]))
    assert resumed.callback.history == full.callback.history
    assert all(resumed.used[s] == full.used[s] for s in range(mid + 1, start + length + 1))
    assert {s: e for s, e in resumed.logs.items()} == {s: e for s, e in full.logs.items() if s > mid}


def test_min_lr_needs_the_cooldown_shape():
    from hf_integration import AutoDecayCallback

    with pytest.raises(ValueError, match=r"min_lr=0\.01 .*decay_shape='cooldown'"):
        AutoDecayCallback(decay_shape="step", min_lr=0.01)


@pytest.fixture(scope="module")
def trainer_cooldown(tmp_path_factory):
    from hf_trainer_callbacks import LRRecorder

    from hf_integration import AutoDecayCallback

    out = tmp_path_factory.mktemp("cooldown")
    recorder = LRRecorder()
    trainer = user_trainer(out, [AutoDecayCallback(decay_shape="cooldown"), recorder], save_steps=50,
                           lr_scheduler_type="constant_with_warmup", warmup_steps=WARMUP)
    trainer.train()
    return out, trainer, recorder


@pytest.mark.slow
def test_trainer_cools_down_every_step_and_stops_with_a_checkpoint(trainer_cooldown):
    from hf_integration import find_autodecay_callback

    out, trainer, recorder = trainer_cooldown
    history = find_autodecay_callback(trainer).history
    assert [h["action"] for h in history] == ["cooldown", "finish"], history
    start, end = history[0]["update"], history[1]["update"]
    length = math.ceil(start * 0.2 / 0.8)
    assert end == start + length == trainer.state.global_step < MAX_STEPS
    assert (out / f"checkpoint-{end}" / "model.safetensors").exists()
    for step in range(WARMUP + 1, end + 1):
        want = LR if step <= start else cooldown_lr(step, start, length, LR)
        assert recorder.used[step] == [pytest.approx(want, rel=1e-12, abs=1e-15)] * 2, step  # both param groups
    for step, entry in loss_logs(trainer).items():
        assert entry["learning_rate"] == recorder.used[step][0]  # the logged LR is the LR used


@pytest.mark.slow
@pytest.mark.parametrize("restore", [False, True], ids=["plain-resume", "restore_callback_states"])
def test_trainer_resumed_mid_cooldown_continues_exactly(trainer_cooldown, tmp_path, restore):
    from hf_trainer_callbacks import LRRecorder

    from hf_integration import AutoDecayCallback, find_autodecay_callback

    out, full, full_recorder = trainer_cooldown
    start, end = (h["update"] for h in find_autodecay_callback(full).history)
    mid = next(s for s in range(50, end, 50) if start < s < end)
    recorder = LRRecorder()
    trainer = user_trainer(tmp_path, [AutoDecayCallback(decay_shape="cooldown"), recorder], save_steps=50,
                           lr_scheduler_type="constant_with_warmup", warmup_steps=WARMUP,
                           restore_callback_states_from_checkpoint=restore)
    trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{mid}"))
    assert find_autodecay_callback(trainer).history == find_autodecay_callback(full).history
    assert all(recorder.used[s] == full_recorder.used[s] for s in range(mid + 1, end + 1))
    full_logs, resumed_logs = loss_logs(full), loss_logs(trainer)
    assert [s for s in resumed_logs if s > mid] == [s for s in full_logs if s > mid]
    for step in (s for s in full_logs if s > mid):
        assert resumed_logs[step]["loss"] == full_logs[step]["loss"]
        assert resumed_logs[step]["learning_rate"] == full_logs[step]["learning_rate"]
