"""The evaluation signal in timm's face: the metric train.py passes to ``step(epoch + 1, metric)`` ends the stable
phase once it has stopped improving; its direction from the metric's name, when it is on by default, ``None``
(no evaluation), resume with evaluation state (and from states written before it), two ranks."""
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from timm_train_py import (BASE_LR, UPE, Toy, carried_state, eval_args, falling_loss, import_timm_scheduler,
                           load_checkpoint, make_args, peaked_metrics, replayed_history, train_py, yaml_keys)

from timm_autodecay.detector import StageDetector, StateError
from timm_autodecay.evaluations import first_ending
from timm_autodecay.state import EVALUATION_SETTINGS

PEAK = 8  # the evaluation after epoch PEAK is the best
PATIENCE = 3  # eval_patience's default
ENDS_AFTER = first_ending(PEAK + 1, PATIENCE) - 1  # the epoch after whose evaluation the rule ends the phase


def ended_after(history):
    """The epoch whose evaluation ended the stable phase (decisions on evaluations fall on epoch ends)."""
    assert history and history[0]["reason"] == "evaluation", history
    return history[0]["update"] // UPE - 1


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

    # train.py checkpoints before it hands over the epoch's evaluation: each checkpoint's state holds the
    # evaluations before its epoch's, and CheckpointSaver keeps that one as the checkpoint's metric
    for epoch in range(1, last["epoch"] + 1):
        saved = load_checkpoint(tmp_path / "a" / f"checkpoint-{epoch}.pth.tar")
        state = carried_state(tmp_path / "a" / f"checkpoint-{epoch}.pth.tar")
        assert state["evaluated_epoch"] == epoch and saved["metric"] == evaluate(epoch)["top1"]
        assert state["detector"]["evaluations"]["best_value"] == max(evaluate(k)["top1"] for k in range(epoch))
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


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """One unbroken run evaluated every epoch, whose cooldown an evaluation starts; all its checkpoints kept."""
    folder = tmp_path_factory.mktemp("evaluated")
    return folder, train_py(folder, eval_args(), evaluate=peaked_metrics(PEAK), loss_fn=falling_loss)


def resume_copy(evaluated_run, tmp_path, epoch, strip_metric=False):
    """Resume from checkpoint ``epoch`` in a copy of the run's folder, its newer checkpoints there too."""
    folder = tmp_path / "run"
    shutil.copytree(evaluated_run[0], folder)
    checkpoint = folder / f"checkpoint-{epoch}.pth.tar"
    if strip_metric:
        saved = load_checkpoint(checkpoint)
        del saved["metric"]
        torch.save(saved, checkpoint)
    log = []
    run = train_py(folder, make_args(**{**vars(eval_args()), "resume": str(checkpoint)}), evaluate=peaked_metrics(PEAK),
                   loss_fn=falling_loss, batch_log=log)
    return run["scheduler"], log


@pytest.mark.parametrize("before", [3, 1, 0, -2], ids=["3-before", "1-before", "its-own", "2-after"])
def test_any_checkpoint_resumes_exactly_with_the_evaluation_it_was_saved_before(evaluated_run, tmp_path, before):
    """train.py checkpoints, then hands the epoch's evaluation to ``step``: the checkpoint whose own evaluation
    starts the cooldown carries a state that has not judged it, and resumes with it all the same (read from the
    checkpoint's metric), as do older and newer checkpoints, the newer ones present."""
    unbroken = evaluated_run[1]
    ended = ended_after(unbroken["scheduler"].history)
    epoch = ended - before
    assert (carried_state(evaluated_run[0] / f"checkpoint-{epoch}.pth.tar")["detector"]["cooldown_start"] is None) == (
        epoch <= ended)
    scheduler, log = resume_copy(evaluated_run, tmp_path, epoch)
    assert log == [b for b in unbroken["log"] if b["epoch"] > epoch]
    assert scheduler.history == unbroken["scheduler"].history and scheduler.best_eval == unbroken["scheduler"].best_eval
    assert scheduler.state_dict()["detector"] == unbroken["scheduler"].state_dict()["detector"]


def test_a_checkpoint_without_its_metric_resumes_with_a_warning(evaluated_run, tmp_path, caplog):
    """Without the checkpoint's metric, its epoch's evaluation is lost: a warning says so, and the phase ends later."""
    caplog.set_level(logging.WARNING, logger="timm_autodecay")
    unbroken = evaluated_run[1]
    scheduler, _ = resume_copy(evaluated_run, tmp_path, ended_after(unbroken["scheduler"].history), strip_metric=True)
    assert any("holds no 'metric'" in r.getMessage() and "may differ" in r.getMessage() for r in caplog.records)
    assert ended_after(scheduler.history) > ended_after(unbroken["scheduler"].history)


@pytest.mark.parametrize("eval_metric, decreasing, extra, mode", [
    ("top1", False, {}, "max"),  # train.py: decreasing_metric = eval_metric == 'loss'
    ("loss", True, {}, "min"),
    ("top5", None, {}, "max"),  # timm's scheduler_kwargs alone: 'min' if 'loss' in the name
    ("loss", None, {}, "min"),
    ("top1", False, {"autodecay_eval_mode": "min"}, "min"),  # the config key wins
])
def test_the_direction_follows_the_eval_metrics_name(eval_metric, decreasing, extra, mode):
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
def test_the_signal_is_on_by_default_where_train_py_evaluates_a_few_dozen_times(caplog, overrides, on):
    caplog.set_level(logging.INFO, logger="timm_autodecay")
    timm_scheduler = import_timm_scheduler()
    args = eval_args(**overrides)
    kwargs = timm_scheduler.scheduler_kwargs(args, decreasing_metric=not args.val_split)
    scheduler, _ = timm_scheduler.create_scheduler_v2(torch.optim.SGD(Toy().parameters(), lr=BASE_LR), **kwargs,
                                                      updates_per_epoch=UPE)
    assert scheduler.eval_signal is on
    assert any(r.getMessage().startswith(f"AutoDecay: evaluation signal {'on' if on else 'off'}: ")
               for r in caplog.records)


def test_the_python_factory_judges_step_metrics_only_when_asked():
    assert not create().eval_signal  # no train.py facts: what step() gets is unknown
    scheduler = create(autodecay_eval_signal=True, plateau_mode="min")
    assert scheduler.eval_signal and scheduler.detector.eval_mode == "min"


def test_no_metric_changes_nothing():
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


def test_a_state_written_before_evaluations_resumes_and_judges_them_from_there():
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
