"""The evaluation signal in timm's face: the metric train.py passes to ``step(epoch + 1, metric)`` ends the stable
phase once it has stopped improving; its direction from the metric's name, when it is on by default, ``None``
(no evaluation), resume with evaluation state (and from states written before it), two ranks."""
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from timm_train_py import (BASE_LR, UPE, Toy, eval_args, falling_loss, import_timm_scheduler, make_args,
                           peaked_metrics, replayed_history, train_py, yaml_keys)

from timm_autodecay import timm_factory
from timm_autodecay.detector import StageDetector, StateError
from timm_autodecay.evaluations import first_ending
from timm_autodecay.state import EVALUATION_SETTINGS
from timm_autodecay.timm_state import STATE_FILE, read_entries

PEAK = 8  # the evaluation after epoch PEAK is the best
PATIENCE = 3  # eval_patience's default
ENDS_AFTER = first_ending(PEAK + 1, PATIENCE) - 1  # the epoch after whose evaluation the rule ends the phase


def ended_after(history):
    """The epoch whose evaluation ended the stable phase (decisions on evaluations fall on epoch ends)."""
    assert history and history[0]["reason"] == "evaluation", history
    return history[0]["update"] // UPE - 1


@pytest.fixture
def stateless(monkeypatch):
    """Schedulers that save no state file (a test's own state_dict() calls do): without the warning about it."""
    monkeypatch.setattr(timm_factory, "_warned_no_state_dir", True)


def create(**kwargs):
    """The factory as a Python program calls it (no train.py run facts), cooldown shape, no early stop."""
    timm_scheduler = import_timm_scheduler()
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    arguments = dict(sched="autodecay", num_epochs=30, updates_per_epoch=UPE, autodecay_end_training=False,
                     **yaml_keys(decay_shape="cooldown"))
    return timm_scheduler.create_scheduler_v2(optimizer, **{**arguments, **kwargs})[0]


def drive(scheduler, metrics, start=0, stop=30):
    """train.py's calls for epochs ``start .. stop - 1``: falling training losses (their running epoch mean),
    then ``step(epoch + 1, metrics(epoch))``. Returns the LR of every update."""
    lrs = []
    for epoch in range(start, stop):
        losses = []
        for k in range(1, UPE + 1):
            n = epoch * UPE + k
            lrs.append(scheduler.optimizer.param_groups[0]["lr"])
            losses.append(falling_loss(n))
            scheduler.step_update(n, metric=sum(losses) / len(losses))
        scheduler.step(epoch + 1, metrics(epoch))
    return lrs


def test_a_peaked_metric_starts_the_cooldown_after_patience_evaluations_and_resumes_exactly(tmp_path):
    args = eval_args()
    evaluate = peaked_metrics(PEAK)
    run = train_py(tmp_path / "a", args, evaluate=evaluate, loss_fn=falling_loss)
    scheduler, log = run["scheduler"], run["log"]
    assert abs(ended_after(scheduler.history) - ENDS_AFTER) <= 1
    assert scheduler.history[0]["action"] == "cooldown" and scheduler.finished
    # the training loss alone would not have ended the phase
    assert replayed_history(scheduler, [b["loss"] for b in log]) == []
    # the cooldown anneals from the update after that evaluation; the run ends after it
    start = scheduler.history[0]["update"]
    lr_of = {b["update"]: b["lrs"][0] for b in log}
    assert lr_of[start] == lr_of[start + 1] == pytest.approx(BASE_LR) and lr_of[start + 2] < BASE_LR
    last = run["results"][-1]
    assert last["epoch"] < 29 and last["validation"] == evaluate(last["epoch"])
    assert scheduler.best_eval == {"value": evaluate(PEAK)["top1"], "update": (PEAK + 1) * UPE}

    # each epoch's entry holds that epoch's evaluation (rewritten after train.py handed it over)
    entries = read_entries(str(tmp_path / "a" / STATE_FILE))
    assert [e["state"]["detector"]["evaluations"]["best_value"] for e in entries] == [
        max(evaluate(k)["top1"] for k in range(e["epoch"])) for e in entries]
    # resumed from the checkpoint after the peak, before the evaluation that ends the phase: the same future
    checkpoint = PEAK + 2
    assert checkpoint < ended_after(scheduler.history)
    resumed_log = []
    resumed = train_py(tmp_path / "b", make_args(**{**vars(args), "resume": str(tmp_path / "a" /
                                                                             f"checkpoint-{checkpoint}.pth.tar")}),
                       evaluate=evaluate, loss_fn=falling_loss, batch_log=resumed_log)
    assert [(b["update"], b["lrs"], b["loss"]) for b in resumed_log] == [
        (b["update"], b["lrs"], b["loss"]) for b in log if b["epoch"] > checkpoint]
    assert resumed["scheduler"].history == scheduler.history
    assert resumed["scheduler"].best_eval == scheduler.best_eval
    assert resumed["scheduler"].state_dict()["detector"] == scheduler.state_dict()["detector"]


@pytest.mark.parametrize("eval_metric, decreasing, extra, mode", [
    ("top1", False, {}, "max"),  # train.py: decreasing_metric = eval_metric == 'loss'
    ("loss", True, {}, "min"),
    ("top5", None, {}, "max"),  # timm's scheduler_kwargs alone: 'min' if 'loss' in the name
    ("loss", None, {}, "min"),
    ("top1", False, {"autodecay_eval_mode": "min"}, "min"),  # the config key wins
])
def test_the_direction_follows_the_eval_metrics_name(stateless, eval_metric, decreasing, extra, mode):
    timm_scheduler = import_timm_scheduler()
    args = eval_args(eval_metric=eval_metric, autodecay_end_training=False, **extra)
    given = {} if decreasing is None else {"decreasing_metric": decreasing}
    kwargs = timm_scheduler.scheduler_kwargs(args, **given)
    scheduler, _ = timm_scheduler.create_scheduler_v2(torch.optim.SGD(Toy().parameters(), lr=BASE_LR), **kwargs,
                                                      updates_per_epoch=UPE)
    assert scheduler.eval_signal and scheduler.detector.eval_mode == mode
    # the metric at its best at PEAK, in that direction: the phase ends where the rule puts it after that best
    key = "loss" if mode == "min" else "top1"
    drive(scheduler, lambda epoch: peaked_metrics(PEAK)(epoch)[key], stop=ENDS_AFTER + 3)
    assert ended_after(scheduler.history) == ENDS_AFTER


@pytest.mark.parametrize("overrides, on", [
    ({}, True),  # train.py evaluates every epoch of 30
    ({"val_split": ""}, False),  # it evaluates nothing: it passes the training loss
    ({"epochs": 100}, False),  # 100 evaluations
    ({"epochs": 100, "val_interval": 2}, True),  # 50
    ({"epochs": 100, "autodecay_eval_signal": True}, True),
    ({"autodecay_eval_signal": False}, False),
])
def test_the_signal_is_on_by_default_where_train_py_evaluates_a_few_dozen_times(stateless, caplog, overrides, on):
    caplog.set_level(logging.INFO, logger="timm_autodecay")
    timm_scheduler = import_timm_scheduler()
    args = eval_args(**overrides)
    kwargs = timm_scheduler.scheduler_kwargs(args, decreasing_metric=not args.val_split)
    scheduler, _ = timm_scheduler.create_scheduler_v2(torch.optim.SGD(Toy().parameters(), lr=BASE_LR), **kwargs,
                                                      updates_per_epoch=UPE)
    assert scheduler.eval_signal is on
    assert any(r.getMessage().startswith(f"AutoDecay: evaluation signal {'on' if on else 'off'}: ")
               for r in caplog.records)


def test_the_python_factory_judges_step_metrics_only_when_asked(stateless):
    assert not create().eval_signal  # no train.py facts: what step() gets is unknown
    scheduler = create(autodecay_eval_signal=True, plateau_mode="min")
    assert scheduler.eval_signal and scheduler.detector.eval_mode == "min"


def test_no_metric_changes_nothing(stateless):
    """``step(epoch, None)``: an epoch whose evaluation train.py skipped (``--val-interval``)."""
    evaluate = peaked_metrics(PEAK)
    scheduler = create(autodecay_eval_signal=True)
    drive(scheduler, lambda epoch: evaluate(epoch)["top1"], stop=PEAK + 1)
    for k in range(1, UPE + 1):
        scheduler.step_update(PEAK * UPE + UPE + k, metric=1.0)
    before = scheduler.state_dict()
    lrs = [g["lr"] for g in scheduler.optimizer.param_groups]
    scheduler.step(PEAK + 2, None)
    assert scheduler.state_dict() == before and [g["lr"] for g in scheduler.optimizer.param_groups] == lrs
    # no evaluation at all: the run the loss alone decides, as with the signal off
    never, off = create(autodecay_eval_signal=True), create(autodecay_eval_signal=False)
    assert drive(never, lambda epoch: None) == drive(off, lambda epoch: evaluate(epoch)["top1"])
    assert never.state_dict() == off.state_dict() and never.best_eval is None


def downgraded(state):
    """A scheduler state as release 0.2.0 wrote it: its detector state of version 2, without evaluations."""
    detector = dict(state["detector"], version=2)
    detector.pop("evaluations")
    detector["settings"] = {k: v for k, v in detector["settings"].items() if k not in EVALUATION_SETTINGS}
    return dict(state, detector=detector)


def test_a_state_written_before_evaluations_resumes_and_judges_them_from_there(stateless):
    evaluate = peaked_metrics(PEAK)
    unbroken = create(autodecay_eval_signal=True)  # eval_mode max: timm's plateau_mode default
    drive(unbroken, lambda epoch: None, stop=5)
    old = downgraded(json.loads(json.dumps(unbroken.state_dict())))
    with pytest.raises(StateError, match="eval_mode: 'min' saved, 'max' now"):  # the defaults, filled in alone
        StageDetector(**unbroken.detector.settings()).load_state_dict(old["detector"])
    resumed = create(autodecay_eval_signal=True)
    resumed.load_state_dict(old)
    assert resumed.state_dict() == unbroken.state_dict()
    lrs = [drive(s, lambda epoch: evaluate(epoch)["top1"], start=5, stop=20) for s in (unbroken, resumed)]
    assert lrs[0] == lrs[1] and resumed.history == unbroken.history
    assert ended_after(resumed.history) == 5 + first_ending(PEAK - 5 + 1, PATIENCE) - 1  # counted from epoch 5


def test_a_state_file_of_release_0_1_0_resumes_where_train_py_evaluates(tmp_path):
    """``data/timm_0.1.0`` (a step-shaped run without evaluations, see test_timm_resume.py) resumed by a
    train.py that evaluates: its stage and LR go on, evaluations are judged from the resumed epoch."""
    folder = tmp_path / "old"
    shutil.copytree(Path(__file__).with_name("data") / "timm_0.1.0", folder)
    log = []
    run = train_py(folder, eval_args(resume=str(folder / "checkpoint-6.pth.tar"), **yaml_keys()),
                   evaluate=peaked_metrics(PEAK), batch_log=log)
    assert log[0]["update"] == 71 and log[0]["lrs"][0] == pytest.approx(BASE_LR * 0.1)
    assert run["scheduler"].history[0] == {"update": 61, "action": "decay", "stage": 0, "reason": "plateau"}
    assert run["scheduler"].best_eval["update"] >= 80  # the first evaluation it saw: after epoch 7


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_with_different_local_metrics_decide_alike(tmp_path, torchrun):
    done = torchrun(Path(__file__).with_name("distributed_worker.py"), "timm", tmp_path,
                    env={"TIMM_WORKER_CASE": "eval"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["evaluations"] != r1["evaluations"] and r0["log"] != r1["log"]  # each rank its own metric and losses
    assert [(b["update"], b["lrs"]) for b in r0["log"]] == [(b["update"], b["lrs"]) for b in r1["log"]]
    assert r0["history"] == r1["history"] and r0["results"] == r1["results"] and r0["finished"]
    assert r0["best_eval"] == r1["best_eval"]
    # the decisions are those on the mean over ranks: the mean metric peaks after epoch 9 (rank 0's alone after
    # epoch 5, rank 1's after 13), and the phase ends where the rule puts it after that peak
    assert first_ending(9, PATIENCE) <= ended_after(r0["history"]) <= first_ending(10, PATIENCE)
    detector = StageDetector(**r0["settings"])
    for epoch, (m0, m1) in enumerate(zip(r0["evaluations"], r1["evaluations"])):
        for a, b in zip(r0["log"][epoch * UPE:(epoch + 1) * UPE], r1["log"][epoch * UPE:(epoch + 1) * UPE]):
            if not detector.finished:
                detector.observe((a["loss"] + b["loss"]) / 2)
        detector.observe_eval((m0 + m1) / 2)
    assert detector.history == r0["history"]
