"""timm's train.py loop (in miniature, ``timm_train_py.py``) with ``--sched autodecay``: decisions from
the losses train.py passes, LRs as timm's step schedule sets them, the early end, two ranks."""
import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch
from timm_train_py import (
    BASE_LR,
    UPE,
    Toy,
    carried_state,
    load_checkpoint,
    detector_settings,
    import_timm_scheduler,
    make_args,
    replayed_history,
    summary_epochs,
    train_py,
    yaml_keys,
)

from timm_autodecay.detector import StageDetector
from timm_autodecay.timm_legacy import STATE_FILE
from timm_autodecay.timm_loop import AutoDecayFinished
from timm_autodecay.timm_resume import STATE_KEY


def unread(state):
    """Losses a saved scheduler state holds that the detector has not seen."""
    return state["pending_losses"]["count"]


@pytest.mark.parametrize("sched_on_updates", [False, True])
def test_train_py_loop_decays_on_plateaus_and_ends_early(tmp_path, caplog, sched_on_updates):
    caplog.set_level(logging.INFO, logger="timm_autodecay")
    args = make_args(sched_on_updates=sched_on_updates, **yaml_keys())
    run = train_py(tmp_path, args)
    scheduler, log, results = run["scheduler"], run["log"], run["results"]
    history = scheduler.history

    # the decisions are the detector's on the per-update losses (recovered from losses_m.avg)
    assert history == replayed_history(scheduler, [b["loss"] for b in log])
    assert [h["action"] for h in history] == ["decay", "decay", "finish"]
    assert all(h["reason"] == "plateau" for h in history)

    # LRs: base, x0.1, x0.01; changing after the decision's update, or at the next epoch boundary
    lr_of = {b["update"]: b["lrs"][0] for b in log}
    for stage, decision in enumerate(history[:2]):
        switch = decision["update"] + 1 if sched_on_updates else -(-decision["update"] // UPE) * UPE + 1
        assert lr_of[switch - 1] == pytest.approx(BASE_LR * 0.1 ** stage)
        assert lr_of[switch] == pytest.approx(BASE_LR * 0.1 ** (stage + 1))
    if not sched_on_updates:  # t_in_epochs: one LR per epoch
        assert all(len({b["lrs"][0] for b in log if b["epoch"] == e}) == 1 for e in range(results[-1]["epoch"] + 1))

    # the end: at the boundary of the epoch the last stage ended in; that epoch is complete and kept
    last_epoch = (history[-1]["update"] - 1) // UPE
    assert last_epoch < args.epochs - 1
    assert results[-1]["epoch"] == last_epoch and len(results) == last_epoch + 1
    assert log[-1]["update"] == (last_epoch + 1) * UPE  # no batch of the next epoch
    assert summary_epochs(tmp_path)[-1] == last_epoch
    assert load_checkpoint(tmp_path / "last.pth.tar")["epoch"] == last_epoch
    assert (tmp_path / f"checkpoint-{last_epoch}.pth.tar").exists()
    assert any(f"training ends after epoch {last_epoch}" in r.getMessage() for r in caplog.records)
    assert any("the last stage (2) ended at update" in r.getMessage() for r in caplog.records)
    # the trap is gone once it fired: the optimizer is back to normal
    assert "zero_grad" not in run["optimizer"].__dict__
    run["optimizer"].zero_grad()
    run["optimizer"].step()

    # each checkpoint carries the schedule's state after its epoch in its optimizer state; no file of its own
    saved = [carried_state(tmp_path / f"checkpoint-{epoch}.pth.tar") for epoch in range(last_epoch + 1)]
    assert [state["num_updates"] for state in saved] == [(epoch + 1) * UPE for epoch in range(last_epoch + 1)]
    assert saved[-1]["detector"]["finished"] is True
    # every epoch's losses were read (averaged over ranks) before its state was saved: a state
    # written by rank 0 alone holds nothing rank-specific, so all ranks may resume from it
    assert all(unread(state) == 0 for state in saved)
    assert not (tmp_path / STATE_FILE).exists() and [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_ends_only_where_train_py_checkpoints(tmp_path):
    """--val-interval N: train.py checkpoints every N epochs only; the run ends at such a boundary."""
    boundary = train_py(tmp_path / "every", make_args(**yaml_keys()))["results"][-1]["epoch"] + 1
    interval = next(n for n in (2, 3, 4, 5) if boundary % n)
    run = train_py(tmp_path / "n", make_args(val_interval=interval, **yaml_keys()))
    end = -(-boundary // interval) * interval  # the first checkpointed boundary at or after it
    assert boundary < end < 30
    assert run["log"][-1]["update"] == end * UPE  # trained on to that boundary, not a batch more
    assert run["results"][-1]["epoch"] == end - 1
    assert load_checkpoint(tmp_path / "n" / "last.pth.tar")["epoch"] == end - 1


def test_warmup_like_timm_and_no_decision_during_it(tmp_path):
    """A loss flat from the start: still no decision before the warmup ends; warmup LRs are timm's."""
    timm_scheduler = import_timm_scheduler()
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler, _ = timm_scheduler.create_scheduler_v2(
        optimizer, sched="autodecay", num_epochs=30, warmup_epochs=4, warmup_lr=1e-4, updates_per_epoch=UPE,
        **yaml_keys())
    step_opt = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    step, _ = timm_scheduler.create_scheduler_v2(step_opt, sched="step", num_epochs=30, warmup_epochs=4,
                                                 warmup_lr=1e-4, decay_epochs=1000, updates_per_epoch=UPE)
    for epoch in range(8):
        if epoch <= 5:  # warmup ramp, then the base LR, as timm's step schedule has them
            assert optimizer.param_groups[0]["lr"] == pytest.approx(step_opt.param_groups[0]["lr"])
        for k in range(1, UPE + 1):
            scheduler.step_update(epoch * UPE + k, metric=1.0)
            if epoch < 4:
                assert scheduler.last_decision is None or scheduler.last_decision.reason == "warmup"
        scheduler.step(epoch + 1, None)
        step.step(epoch + 1, None)
    assert scheduler.history and scheduler.history[0]["update"] > 4 * UPE


def test_lr_scale_and_min_lr_floor(tmp_path):
    args = make_args(min_lr=0.002, **yaml_keys())
    run = train_py(tmp_path, args, lr_scale=0.5)
    lrs = [b["lrs"] for b in run["log"]]
    assert {round(a, 12) for a, _ in lrs} == {0.1, 0.01, 0.002}  # 0.001 is below the floor
    assert all(b == pytest.approx(a * 0.5) for a, b in lrs)


def test_every_epoch_end_reads_the_pending_losses():
    """Buckets of 3 updates, epochs of 10: each epoch's last update still hands its partial bucket
    to the detector (a collective on every rank), so the state it puts in the optimizer's state for
    train.py's checkpoint holds no rank's own unread losses; the decisions are the same as with whole buckets."""
    from timm_autodecay.timm_scheduler import AutoDecayScheduler

    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler = AutoDecayScheduler(optimizer, updates_per_epoch=UPE, t_initial=30,
                                   **detector_settings(window=75, patience=10))
    assert scheduler.detector.bucket_size == 3
    rng = random.Random(2)
    losses = [2.0 * math.exp(-n / 40) + 0.5 + 0.01 * rng.gauss(0, 1) for n in range(200)]
    for n in range(1, 201):
        k = (n - 1) % UPE + 1
        scheduler.step_update(n, metric=sum(losses[n - k:n]) / k)
        if n % UPE == 0:
            assert unread(scheduler.state_dict()) == 0 and scheduler.detector.update == n
            carried = optimizer.param_groups[0][STATE_KEY]  # what train.py's checkpoint would take now
            assert carried["num_updates"] == n and unread(carried) == 0 and carried["evaluated_epoch"] == 0
            scheduler.step(n // UPE)
    assert scheduler.history and scheduler.history == replayed_history(scheduler, losses)


def test_finished_stop_is_a_keyboard_interrupt_raised_before_the_next_batch():
    from timm_autodecay.timm_scheduler import AutoDecayScheduler

    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler = AutoDecayScheduler(optimizer, updates_per_epoch=UPE, t_initial=30, num_stages=1,
                                   **detector_settings())
    n, epoch = 0, 0
    while not scheduler.finished:
        for _ in range(UPE):
            n += 1
            scheduler.step_update(n, metric=1.0)
        epoch += 1
        scheduler.step(epoch)
    assert issubclass(AutoDecayFinished, KeyboardInterrupt)
    with pytest.raises(AutoDecayFinished, match=f"training ends after epoch {epoch - 1}"):
        optimizer.zero_grad()
    scheduler2 = AutoDecayScheduler(torch.optim.SGD(Toy().parameters(), lr=BASE_LR), updates_per_epoch=UPE,
                                    t_initial=30, num_stages=1, **detector_settings())
    scheduler2.load_state_dict(scheduler.state_dict())
    scheduler2._arm_stop(epoch)
    with pytest.raises(AutoDecayFinished):
        scheduler2.optimizer.step()  # the step pre-hook, for loops that do not zero_grad first


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_take_the_same_decisions_from_the_mean_loss(tmp_path, torchrun):
    done = torchrun(Path(__file__).with_name("distributed_worker.py"), "timm", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert [b["loss"] for b in r0["log"]] != [b["loss"] for b in r1["log"]]  # the ranks see different losses
    assert [(b["update"], b["lrs"]) for b in r0["log"]] == [(b["update"], b["lrs"]) for b in r1["log"]]
    assert r0["history"] == r1["history"] and r0["results"] == r1["results"] and r0["finished"]
    assert [h["action"] for h in r0["history"]] == ["decay", "decay", "finish"]
    assert r0["results"][-1] < 29
    # the decisions are those on the mean over ranks of each update's loss
    mean = [(a["loss"] + b["loss"]) / 2 for a, b in zip(r0["log"], r1["log"])]
    detector = StageDetector(**{**detector_settings(), "total_updates": 30 * UPE, "updates_per_epoch": UPE})
    for loss in mean:
        if not detector.finished:
            detector.observe(loss)
    assert detector.history == r0["history"]
    assert carried_state(tmp_path / "run" / "last.pth.tar")["detector"]["finished"]
    # resumed on both ranks from rank 0's checkpoint: the unbroken run's LRs and losses, update for update
    for record in (r0, r1):
        expected = [b for b in record["log"] if b["epoch"] >= record["crash_epoch"]]
        assert record["resumed"] == expected and expected
