"""Resume: the state in the optimizer's state of train.py's checkpoints (any checkpoint of the run), the Python
state_dict, the autodecay_state.json of releases 0.1.0 and 0.2.0, damaged states, and the checks that name what
does not match."""
import json
import logging
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from timm_train_py import (BASE_LR, UPE, Crash, Toy, detector_settings, feed_epoch_means, import_timm_scheduler,
                           load_checkpoint, make_args, summary_epochs, train_py, yaml_keys)

from timm_autodecay.state import StateError
from timm_autodecay.timm_legacy import STATE_FILE
from timm_autodecay.timm_resume import STATE_KEY


def same_updates(log, unbroken_log, first_epoch):
    return [(b["update"], b["lrs"], b["loss"]) for b in log] == [
        (b["update"], b["lrs"], b["loss"]) for b in unbroken_log if b["epoch"] >= first_epoch]


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


@pytest.mark.parametrize("sched_on_updates", [False, True])
def test_an_older_checkpoint_resumes_its_own_schedule_while_newer_ones_exist(tmp_path, sched_on_updates):
    """The crashed run wrote checkpoints 0..6; checkpoint-3 (before the first decay) resumes as the unbroken run
    went on from there: each checkpoint carries its own epoch's state, not the newest."""
    args = make_args(sched_on_updates=sched_on_updates, **yaml_keys())
    unbroken = train_py(tmp_path / "a", args)
    assert unbroken["scheduler"].history[0]["update"] > 4 * UPE
    with pytest.raises(Crash):
        train_py(tmp_path / "b", args, crash_at=(7, 4))
    assert (tmp_path / "b" / "checkpoint-6.pth.tar").exists()
    log = []
    run = train_py(tmp_path / "b", make_args(**{**vars(args), "resume": str(tmp_path / "b" / "checkpoint-3.pth.tar")}),
                   batch_log=log)
    assert log[0]["update"] == 4 * UPE + 1 and same_updates(log, unbroken["log"], 4)
    assert run["scheduler"].history == unbroken["scheduler"].history


def test_resume_errors_name_the_missing_state_and_what_to_do(tmp_path):
    args = make_args(**yaml_keys())
    train_py(tmp_path / "a", args)
    checkpoint = tmp_path / "a" / "checkpoint-1.pth.tar"
    with pytest.raises(ValueError, match=r"carries AutoDecay's state in its optimizer state, but the optimizer's "
                                         r"state was not loaded from it \(train.py --no-resume-opt\)\. Resume without "
                                         r"--no-resume-opt; or, .*--initial-checkpoint"):
        train_py(tmp_path / "b", make_args(resume=str(checkpoint), no_resume_opt=True, **yaml_keys()))
    with pytest.raises(ValueError, match=r"after update 20 \(epoch 2\), but training resumes at epoch 5 .*"
                                         r"--start-epoch"):
        train_py(tmp_path / "b", make_args(resume=str(checkpoint), start_epoch=5, **yaml_keys()))
    stripped = load_checkpoint(checkpoint)
    del stripped["optimizer"]["param_groups"][0][STATE_KEY]
    torch.save(stripped, tmp_path / "other.pth.tar")  # as a checkpoint of another schedule's run
    with pytest.raises(ValueError, match=r"other.pth.tar: it holds no AutoDecay state, neither in its optimizer state "
                                         r".* nor in an autodecay_state.json next to it"):
        train_py(tmp_path / "b", make_args(resume=str(tmp_path / "other.pth.tar"), **yaml_keys()))
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler, _ = import_timm_scheduler().create_scheduler_v2(optimizer, sched="autodecay", num_epochs=30,
                                                               updates_per_epoch=UPE)
    with pytest.raises(ValueError, match="starts at epoch 3 but no saved AutoDecay state"):
        scheduler.step(3)  # train.py --start-epoch 3 without --resume
    with pytest.raises(ValueError, match="call it once after every optimizer update"):
        scheduler.step_update(2, metric=1.0)


@pytest.mark.parametrize("corrupt, key", [
    (lambda group: group.update({STATE_KEY: "lost"}), r"the state must be a dict, got str"),
    (lambda group: group[STATE_KEY]["detector"].update(stage=7), r"'stage' must be in \[0, 3\), got 7"),
    (lambda group: group[STATE_KEY].pop("pending_losses"), r"'pending_losses' is missing"),
    (lambda group: group[STATE_KEY].update(evaluated_epoch=9), r"'evaluated_epoch' must be at most the epochs"),
])
def test_a_state_damaged_inside_the_optimizer_state_names_the_key(tmp_path, corrupt, key):
    train_py(tmp_path, make_args(**yaml_keys(), epochs=5))
    checkpoint = load_checkpoint(tmp_path / "checkpoint-2.pth.tar")
    corrupt(checkpoint["optimizer"]["param_groups"][0])
    torch.save(checkpoint, tmp_path / "damaged.pth.tar")
    with pytest.raises(StateError, match=key) as error:
        train_py(tmp_path / "b", make_args(resume=str(tmp_path / "damaged.pth.tar"), **yaml_keys(), epochs=5))
    assert f"in the optimizer's state, param_groups[0]['{STATE_KEY}']" in str(error.value)


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


def legacy_run(tmp_path):
    """A copy of ``data/timm_0.1.0``: a checkpoint of release 0.1.0 and the autodecay_state.json next to it."""
    folder = tmp_path / "old"
    shutil.copytree(DATA, folder)
    return folder


@pytest.mark.parametrize("content, reason", [
    ('{"format": "timm-autodecay-state", "version": 2, "entr', "not complete JSON"),
    ("", "the file is empty"),
    ("[1, 2]", "holds a JSON list"),
    ('{"format": "something else"}', "format 'something else'"),
    ('{"format": "timm-autodecay-state", "version": 2, "entries": [{"epoch": 2}]}', "'entries\\[0\\].state'"),
])
def test_a_damaged_state_file_of_an_earlier_release_names_itself_and_what_to_do(tmp_path, content, reason):
    folder = legacy_run(tmp_path)
    (folder / STATE_FILE).write_text(content)
    with pytest.raises(ValueError) as error:
        train_py(tmp_path / "b", resume_args(folder / "checkpoint-6.pth.tar"))
    message = str(error.value)
    assert str(folder / STATE_FILE) in message and re.search(reason, message), message
    assert "AutoDecay's resume state" in message and "autodecay_state_file" in message
    assert "--initial-checkpoint" in message


def test_a_state_file_of_a_newer_release_asks_for_an_upgrade(tmp_path):
    folder = legacy_run(tmp_path)
    (folder / STATE_FILE).write_text(json.dumps({"format": "timm-autodecay-state", "version": 9, "entries": []}))
    with pytest.raises(ValueError, match="newer timm-autodecay.*upgrade"):
        train_py(tmp_path / "b", resume_args(folder / "checkpoint-6.pth.tar"))


def test_another_state_file_can_be_named(tmp_path, caplog):
    """``autodecay_state_file``: a checkpoint of an earlier release resumes with a copy of its state file kept
    elsewhere; a checkpoint that carries its state does not read the file, and says so."""
    in_place = train_py(legacy_run(tmp_path / "a"), resume_args(tmp_path / "a" / "old" / "checkpoint-6.pth.tar"))
    folder = legacy_run(tmp_path / "b")
    (folder / STATE_FILE).rename(tmp_path / "kept.json")
    kept = resume_args(folder / "checkpoint-6.pth.tar", autodecay_state_file=str(tmp_path / "kept.json"))
    assert train_py(folder, kept)["scheduler"].history == in_place["scheduler"].history
    caplog.set_level(logging.WARNING, logger="timm_autodecay")
    again = train_py(folder, make_args(**{**vars(kept), "resume": str(folder / "checkpoint-9.pth.tar")}))
    assert again["scheduler"].history == in_place["scheduler"].history
    assert any("autodecay_state_file" in r.getMessage() and "is not read" in r.getMessage() for r in caplog.records)


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


def mid_run_scheduler():
    from timm_autodecay.timm_scheduler import AutoDecayScheduler

    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler = AutoDecayScheduler(optimizer, updates_per_epoch=UPE, t_initial=30, **detector_settings())
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
    (lambda s: s.update(version=7), "'version' 7 is not one this release reads .*written by a newer"),
    (lambda s: s.update(evaluated_epoch=-1), "'evaluated_epoch' must be >= 0"),
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
