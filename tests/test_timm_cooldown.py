"""The cooldown shape in timm's train.py: ``autodecay_decay_shape: cooldown``. The last stage's end starts
an anneal of the LR to ``--min-lr`` over ``autodecay_cooldown_fraction`` of the run, set at every update
(also without ``--sched-on-updates``), then the run ends; timm's own ``--cooldown-epochs`` and
``--decay-epochs`` keep their meaning for timm's schedules and change nothing here."""
import logging

import pytest
from timm_train_py import BASE_LR, UPE, Crash, make_args, train_py, yaml_keys

MIN_LR = 0.002


def cooldown_args(**overrides):
    keys = yaml_keys(decay_shape="cooldown", cooldown_fraction=0.5, cooldown_curve="linear")
    return make_args(min_lr=MIN_LR, **{**keys, **overrides})


def expected_lr(scheduler, update):
    """The LR train.py trains update ``update`` with: set after update ``update - 1``."""
    return max(scheduler.detector.lr_at(update - 1, BASE_LR, 0.1, MIN_LR), MIN_LR)


@pytest.mark.parametrize("sched_on_updates", [False, True])
def test_the_cooldown_anneals_at_every_update_to_min_lr_then_ends_the_run(tmp_path, caplog, sched_on_updates):
    caplog.set_level(logging.INFO, logger="timm_autodecay")
    run = train_py(tmp_path, cooldown_args(sched_on_updates=sched_on_updates))
    scheduler, log = run["scheduler"], run["log"]
    detector = scheduler.detector
    assert [h["action"] for h in scheduler.history] == ["cooldown", "finish"]
    start, length = detector.cooldown_start, detector.cooldown_updates
    assert scheduler.history[-1] == {"update": start + length, "action": "finish", "stage": 0, "reason": "cooldown"}
    assert length == start  # a fraction of 0.5: as long as the run before it
    lrs = {b["update"]: b["lrs"][0] for b in log}
    cooling = range(start + 2, start + length + 1)
    assert all(lrs[n] == pytest.approx(expected_lr(scheduler, n)) for n in cooling)
    assert all(lrs[n] < lrs[n - 1] for n in cooling)  # it moves at every update, inside epochs too
    assert lrs[start + length] > MIN_LR and expected_lr(scheduler, start + length + 1) == pytest.approx(MIN_LR)
    assert all(lrs[n] == pytest.approx(BASE_LR) for n in range(1, start + 1))
    # the run ends at the epoch boundary after the cooldown, within the budget
    assert log[-1]["update"] == -(-(start + length) // UPE) * UPE <= 30 * UPE
    messages = [r.getMessage() for r in caplog.records]
    assert any("cooldown (linear) from LR 0.1 to 0.002 at every update" in m for m in messages)
    assert any(f"the cooldown ended at update {start + length}; no further batch" in m for m in messages)


def test_timm_cooldown_and_decay_epochs_keep_their_meaning(tmp_path, caplog):
    """timm's --cooldown-epochs (extra epochs at the end of timm's cycle schedules) and --decay-epochs
    (timm's step schedule) are not AutoDecay's: the run, its length and its LRs are unchanged."""
    caplog.set_level(logging.WARNING, logger="timm_autodecay")
    plain = train_py(tmp_path / "plain", cooldown_args())
    other = train_py(tmp_path / "other", cooldown_args(cooldown_epochs=5, decay_epochs=3))
    assert other["num_epochs"] == plain["num_epochs"] == 30
    assert [(b["update"], b["lrs"]) for b in other["log"]] == [(b["update"], b["lrs"]) for b in plain["log"]]
    assert any("--cooldown-epochs (5) is ignored" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("sched_on_updates", [False, True])
def test_resume_mid_cooldown_continues_exactly(tmp_path, sched_on_updates):
    args = cooldown_args(sched_on_updates=sched_on_updates)
    unbroken = train_py(tmp_path / "a", args)
    detector = unbroken["scheduler"].detector
    crash_epoch = detector.cooldown_start // UPE + 2
    assert crash_epoch * UPE < detector.cooldown_start + detector.cooldown_updates - UPE  # well inside it
    with pytest.raises(Crash):
        train_py(tmp_path / "b", args, crash_at=(crash_epoch, 3))
    resumed = []
    run = train_py(tmp_path / "b", make_args(**{**vars(args), "resume": str(tmp_path / "b" / "last.pth.tar")}),
                   batch_log=resumed)
    expected = [b for b in unbroken["log"] if b["epoch"] >= crash_epoch]
    assert [(b["update"], b["lrs"], b["loss"]) for b in resumed] == [
        (b["update"], b["lrs"], b["loss"]) for b in expected]
    assert run["scheduler"].history == unbroken["scheduler"].history
