"""Resume: autodecay_state.json next to train.py's checkpoints, the Python state_dict, old and damaged
states, and the checks that name what does not match."""
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from timm_train_py import (BASE_LR, UPE, Crash, Toy, detector_settings, feed_epoch_means, import_timm_scheduler,
                           make_args, summary_epochs, train_py, yaml_keys)

from timm_autodecay.timm_state import STATE_FILE


# -- resume ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched_on_updates", [False, True])
def test_resume_continues_like_an_unbroken_run(tmp_path, sched_on_updates):
    args = make_args(sched_on_updates=sched_on_updates, **yaml_keys())
    unbroken = train_py(tmp_path / "a", args)
    decay_update = unbroken["scheduler"].history[0]["update"]
    crash_epoch = decay_update // UPE + 1  # mid-stage 1: after a decay, before the next
    with pytest.raises(Crash):
        train_py(tmp_path / "b", args, crash_at=(crash_epoch, 4))
    resumed_log = []
    train_py(tmp_path / "b", make_args(**{**vars(args), "resume": str(tmp_path / "b" / "last.pth.tar")}),
             batch_log=resumed_log)
    resumed = [b for b in resumed_log if b["epoch"] >= crash_epoch]
    assert resumed[0]["update"] == crash_epoch * UPE + 1
    assert resumed[0]["lrs"][0] == pytest.approx(BASE_LR * 0.1)  # stage 1's LR, not the base LR
    expected = [b for b in unbroken["log"] if b["epoch"] >= crash_epoch]
    assert [(b["update"], b["lrs"], b["loss"]) for b in resumed] == [
        (b["update"], b["lrs"], b["loss"]) for b in expected]
    assert summary_epochs(tmp_path / "b")[-1] == unbroken["results"][-1]["epoch"]


def test_resume_errors_name_the_missing_state(tmp_path):
    args = make_args(**yaml_keys())
    train_py(tmp_path / "a", args)
    checkpoint = tmp_path / "a" / "checkpoint-1.pth.tar"
    (tmp_path / "a" / STATE_FILE).unlink()
    with pytest.raises(ValueError, match="autodecay_state.json does not exist"):
        train_py(tmp_path / "b", make_args(resume=str(checkpoint), **yaml_keys()))
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler, _ = import_timm_scheduler().create_scheduler_v2(optimizer, sched="autodecay", num_epochs=30,
                                                               updates_per_epoch=UPE)
    with pytest.raises(ValueError, match="starts at epoch 3 but no saved AutoDecay state"):
        scheduler.step(3)  # train.py --start-epoch 3 without --resume
    with pytest.raises(ValueError, match="call it once after every optimizer update"):
        scheduler.step_update(2, metric=1.0)


def test_state_dict_round_trip_mid_epoch():
    """The Python API: state_dict() mid-bucket, JSON, load into a fresh scheduler: same future."""
    timm_scheduler = import_timm_scheduler()

    def make():
        optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
        return timm_scheduler.create_scheduler_v2(optimizer, sched="autodecay", num_epochs=30,
                                                  updates_per_epoch=UPE, autodecay_end_training=False,
                                                  **yaml_keys())[0], optimizer
    rng = random.Random(1)
    losses = [1.0 + 0.01 * rng.gauss(0, 1) for _ in range(300)]

    def feed(scheduler, optimizer, start, stop, lrs):
        for n in range(start + 1, stop + 1):
            k = (n - 1) % UPE + 1
            mean = sum(losses[n - k:n]) / k
            scheduler.step_update(n, metric=mean)
            if n % UPE == 0:
                scheduler.step(n // UPE)
            lrs.append(optimizer.param_groups[0]["lr"])
    a, opt_a = make()
    lrs_a = []
    feed(a, opt_a, 0, 300, lrs_a)
    b, opt_b = make()
    lrs_b = []
    feed(b, opt_b, 0, 137, lrs_b)
    c, opt_c = make()
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    feed(c, opt_c, 137, 300, lrs_b)
    assert lrs_a == lrs_b and a.history == c.history and a.finished


# -- old, damaged and mismatched state ---------------------------------------------------------------
DATA = Path(__file__).with_name("data") / "timm_0.1.0"


def resume_args(checkpoint, **overrides):
    return make_args(resume=str(checkpoint), **yaml_keys(), **overrides)


def test_a_state_file_of_release_0_1_0_resumes_like_the_current_release(tmp_path):
    """``data/timm_0.1.0``: the autodecay_state.json and checkpoint-6 that release 0.1.0's code wrote for
    this file's miniature train.py (``make_args(**yaml_keys())``, crashed at epoch 7, batch 4; the
    unbroken 0.1.0 run decayed at updates 61 and 145 and finished at 206). Resumed by this release, it
    continues exactly as this release's own run resumed at the same checkpoint."""
    folder = tmp_path / "old"
    shutil.copytree(DATA, folder)
    resumed_log = []
    old = train_py(folder, resume_args(folder / "checkpoint-6.pth.tar"), batch_log=resumed_log)
    assert resumed_log[0]["update"] == 71 and resumed_log[0]["lrs"][0] == pytest.approx(BASE_LR * 0.1)
    assert old["scheduler"].history[0] == {"update": 61, "action": "decay", "stage": 0, "reason": "plateau"}
    assert old["scheduler"].finished

    unbroken = train_py(tmp_path / "new", make_args(**yaml_keys()))
    assert unbroken["scheduler"].history[0]["update"] == 61  # the same first stage as in 0.1.0
    expected = [b for b in unbroken["log"] if b["update"] > 70]
    assert [(b["update"], b["lrs"], b["loss"]) for b in resumed_log] == [
        (b["update"], b["lrs"], b["loss"]) for b in expected]
    assert old["scheduler"].history == unbroken["scheduler"].history


@pytest.mark.parametrize("content, reason", [
    ('{"format": "timm-autodecay-state", "version": 2, "entr', "not complete JSON"),
    ("", "the file is empty"),
    ("[1, 2]", "holds a JSON list"),
    ('{"format": "something else"}', "format 'something else'"),
    ('{"format": "timm-autodecay-state", "version": 2, "entries": [{"epoch": 2}]}', "'entries\\[0\\].state'"),
])
def test_a_damaged_state_file_names_itself_and_what_to_do(tmp_path, content, reason):
    train_py(tmp_path, make_args(**yaml_keys(), epochs=3))
    (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(ValueError) as error:
        train_py(tmp_path / "b", resume_args(tmp_path / "checkpoint-1.pth.tar"))
    message = str(error.value)
    assert str(tmp_path / STATE_FILE) in message and re.search(reason, message), message
    assert "AutoDecay's resume state" in message and "autodecay_state_file" in message
    assert "--initial-checkpoint" in message


def test_a_state_file_of_a_newer_release_asks_for_an_upgrade(tmp_path):
    train_py(tmp_path, make_args(**yaml_keys(), epochs=3))
    (tmp_path / STATE_FILE).write_text(json.dumps({"format": "timm-autodecay-state", "version": 9, "entries": []}))
    with pytest.raises(ValueError, match="newer timm-autodecay.*upgrade"):
        train_py(tmp_path / "b", resume_args(tmp_path / "checkpoint-1.pth.tar"))


def test_another_state_file_can_be_named(tmp_path):
    """``autodecay_state_file``: resume with a copy of the state file kept elsewhere."""
    unbroken = train_py(tmp_path / "a", make_args(**yaml_keys()))
    (tmp_path / "a" / STATE_FILE).rename(tmp_path / "kept.json")
    run = train_py(tmp_path / "b", resume_args(tmp_path / "a" / "checkpoint-9.pth.tar",
                                               autodecay_state_file=str(tmp_path / "kept.json")))
    assert run["scheduler"].history == unbroken["scheduler"].history


def test_trying_an_older_checkpoint_leaves_the_later_ones_resumable(tmp_path):
    """Resuming checkpoint-5 in the run's own folder trains epochs 6 and 7 again (and overwrites their
    checkpoints); checkpoint-15 of the first run still resumes into that run's own future."""
    args = make_args(**yaml_keys())
    unbroken = train_py(tmp_path, args)
    last = unbroken["results"][-1]["epoch"]
    assert last > 16
    with pytest.raises(Crash):
        train_py(tmp_path, resume_args(tmp_path / "checkpoint-5.pth.tar"), crash_at=(8, 0))
    log = []
    run = train_py(tmp_path, resume_args(tmp_path / "checkpoint-15.pth.tar"), batch_log=log)
    assert [(b["update"], b["lrs"], b["loss"]) for b in log] == [
        (b["update"], b["lrs"], b["loss"]) for b in unbroken["log"] if b["epoch"] >= 16]
    assert run["scheduler"].history == unbroken["scheduler"].history


def mid_run_scheduler(state_dir=None):
    from timm_autodecay.timm_scheduler import AutoDecayScheduler

    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler = AutoDecayScheduler(optimizer, updates_per_epoch=UPE, t_initial=30, state_dir=state_dir,
                                   **detector_settings())
    rng = random.Random(5)
    feed_epoch_means(scheduler, [1.0 + 0.01 * rng.gauss(0, 1) for _ in range(95)])
    return scheduler


@pytest.mark.parametrize("corrupt, key", [
    (lambda s: s["detector"].update(stage=7), "'stage' must be in \\[0, 3\\), got 7"),
    (lambda s: s["detector"].update(stage="1"), "'stage' must be int, got '1'"),
    (lambda s: s["detector"].pop("points"), "'points' is missing"),
    (lambda s: s.pop("pending_losses"), "'pending_losses' is missing"),
    (lambda s: s["pending_losses"].pop("finite"), "'pending_losses.finite' is missing"),
    (lambda s: s.update(samples=-1), "'samples' must be >= 0"),
    (lambda s: s.update(base_values=[0.1, 0.1]), "'base_values' must hold one LR per param group"),
    (lambda s: s.update(version=7), "'version' must be 1..2 \\(written by a newer"),
    (lambda s: s.update(decay_rate=0.5), "decay_rate is 0.1 in this run but 0.5 .*--decay-rate"),
    (lambda s: s["detector"]["settings"].update(total_updates=200), "total_updates=200 updates.*--epochs"),
    (lambda s: s["detector"]["settings"].update(window=50), "window: 50 saved, 20 now.*autodecay_<setting>"),
])
def test_a_bad_state_is_refused_whole_with_the_key_named(corrupt, key):
    scheduler = mid_run_scheduler()
    before = json.dumps(scheduler.state_dict(), sort_keys=True)
    lrs = [g["lr"] for g in scheduler.optimizer.param_groups]
    fresh = mid_run_scheduler()
    fresh.step_update(96, metric=1.0)  # a scheduler one update further: any partial load would show
    further = json.dumps(fresh.state_dict(), sort_keys=True)
    state = json.loads(before)
    corrupt(state)
    with pytest.raises(ValueError, match=key):
        fresh.load_state_dict(state)
    assert json.dumps(fresh.state_dict(), sort_keys=True) == further
    assert [g["lr"] for g in scheduler.optimizer.param_groups] == lrs


def test_resuming_with_another_budget_names_epochs(tmp_path):
    train_py(tmp_path, make_args(**yaml_keys()))
    with pytest.raises(ValueError, match=r"total_updates=300 updates, 30 epochs.*200 updates, 20 epochs.*--epochs"):
        train_py(tmp_path / "b", resume_args(tmp_path / "checkpoint-3.pth.tar", epochs=20))


def test_resume_during_timms_warmup(tmp_path):
    """train.py's default --warmup-epochs is 5: a checkpoint inside the warmup resumes like any other."""
    args = make_args(warmup_epochs=3, **yaml_keys())
    unbroken = train_py(tmp_path / "a", args)
    with pytest.raises(Crash):
        train_py(tmp_path / "b", args, crash_at=(2, 4))
    resumed = []
    train_py(tmp_path / "b", resume_args(tmp_path / "b" / "checkpoint-1.pth.tar", warmup_epochs=3), batch_log=resumed)
    assert [(b["update"], b["lrs"], b["loss"]) for b in resumed] == [
        (b["update"], b["lrs"], b["loss"]) for b in unbroken["log"] if b["epoch"] >= 2]


def test_a_run_never_writes_over_a_damaged_state_file(tmp_path, caplog):
    """A new run in a folder whose autodecay_state.json cannot be read moves it aside, with a warning."""
    (tmp_path / STATE_FILE).write_text('{"format": "timm-autodecay-state", "vers')
    train_py(tmp_path, make_args(**yaml_keys(), epochs=3))
    assert (tmp_path / f"{STATE_FILE}.damaged").read_text() == '{"format": "timm-autodecay-state", "vers'
    assert json.loads((tmp_path / STATE_FILE).read_text())["entries"]
    assert any("moved" in r.getMessage() and ".damaged" in r.getMessage() for r in caplog.records)
