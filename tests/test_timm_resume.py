"""Resume: autodecay_state.json next to train.py's checkpoints, the Python state_dict, old and damaged
states, and the checks that name what does not match."""
import json
import random

import pytest
import timm.scheduler
import torch
from timm_train_py import BASE_LR, UPE, Crash, Toy, make_args, summary_epochs, train_py, yaml_keys

from timm_autodecay.timm_scheduler import STATE_FILE


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
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched="autodecay", num_epochs=30,
                                                      updates_per_epoch=UPE)
    with pytest.raises(ValueError, match="starts at epoch 3 but no saved AutoDecay state"):
        scheduler.step(3)  # train.py --start-epoch 3 without --resume
    with pytest.raises(ValueError, match="call it once after every optimizer update"):
        scheduler.step_update(2, metric=1.0)


def test_state_dict_round_trip_mid_epoch():
    """The Python API: state_dict() mid-bucket, JSON, load into a fresh scheduler: same future."""
    def make():
        optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
        return timm.scheduler.create_scheduler_v2(optimizer, sched="autodecay", num_epochs=30,
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
