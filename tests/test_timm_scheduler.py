"""The timm face: ``create_scheduler_v2(sched="autodecay")`` and an unmodified train.py.

``train_py`` below is timm's train.py main loop in miniature (the calls and their order as in a timm
checkout): ``create_scheduler_v2(**scheduler_kwargs(args))``, the resume ``step``, ``zero_grad`` at
the top of each epoch, ``step_update(num_updates, metric=losses_m.avg)`` after each update, then
summary row, checkpoint (timm's own CheckpointSaver, in a local named ``saver``), ``step(epoch + 1)``
and the result entry, inside ``try: ... except KeyboardInterrupt``. The "model" is a synthetic
loss that relaxes towards a level set by the learning rate; its state is a parameter, so
checkpoints carry it and a resumed run sees the very losses an unbroken one sees.

Detector settings are explicit and small; expected decisions come from a bare StageDetector fed
the same per-update losses, so these tests check the plumbing, not the detector's tuning.
This file is also the two-rank worker: ``torchrun ... test_timm_scheduler.py OUT_DIR``.
"""
import argparse
import ast
import json
import logging
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

import timm.scheduler  # noqa: E402
from timm.utils import AverageMeter, CheckpointSaver, update_summary  # noqa: E402

from timm_autodecay import timm_hook  # noqa: E402
from timm_autodecay.detector import SETTINGS, StageDetector  # noqa: E402
from timm_autodecay.timm_scheduler import (  # noqa: E402
    STATE_FILE,
    YAML_KEYS,
    AutoDecayFinished,
    AutoDecayScheduler,
)

ROOT = Path(__file__).resolve().parents[1]
UPE = 10  # updates per epoch
BASE_LR = 0.1


def detector_settings(**overrides):
    """Small, explicit settings (only those this detector has)."""
    chosen = dict(window=20, patience=6, significance=1.0, min_relative_drop=0.01, min_points=8,
                  first_stage_patience=0.0)
    chosen.update(overrides)
    return {k: v for k, v in chosen.items() if k in SETTINGS}


def yaml_keys(**overrides):
    return {"autodecay_" + k: v for k, v in detector_settings(**overrides).items()}


@pytest.fixture(autouse=True, scope="module")
def registered():
    timm_hook.register()
    yield


# -- timm's train.py in miniature ------------------------------------------------------------
class Toy(torch.nn.Module):
    """``level`` holds the synthetic model's state (its noise-free loss); ``w`` is what the
    optimizer holds (two param groups when ``lr_scale`` is tested)."""

    def __init__(self):
        super().__init__()
        self.level = torch.nn.Parameter(torch.tensor(2.0), requires_grad=False)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.v = torch.nn.Parameter(torch.zeros(1))


def synthetic_loss(model, lr, update, rank=0, offset=0.0, noise=0.01, seed=0):
    """The loss relaxes (8 updates time constant) towards 0.3 + 5 lr: each decay opens a new drop
    and a new plateau. Ranks differ by ``offset`` and their own noise."""
    target = 0.3 + 5.0 * lr
    keep = math.exp(-1.0 / 8.0)
    with torch.no_grad():
        model.level.mul_(keep).add_(target * (1.0 - keep))
    rng = random.Random(seed * 1000003 + rank * 7919 + update)
    return float(model.level) * (1.0 + offset + noise * rng.gauss(0.0, 1.0))


class Crash(Exception):
    pass


def make_args(**kw):
    base = dict(sched="autodecay", epochs=30, decay_rate=0.1, min_lr=0.0, warmup_lr=1e-5, warmup_epochs=0,
                warmup_prefix=False, sched_on_updates=False, resume="", val_interval=1, seed=42)
    base.update(kw)
    return argparse.Namespace(**base)


def train_py(out_dir, args, rank=0, offset=0.0, crash_at=None, lr_scale=None, batch_log=None):
    """timm train.py's main(), as far as the scheduler can tell. Returns what the test inspects."""
    model = Toy()
    groups = [{"params": [model.w]}]
    if lr_scale is not None:
        groups.append({"params": [model.v], "lr_scale": lr_scale})
    optimizer = torch.optim.SGD(groups, lr=BASE_LR)
    log = [] if batch_log is None else batch_log

    resume_epoch = None
    if args.resume:
        checkpoint = torch.load(args.resume, weights_only=True)
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        resume_epoch = checkpoint["epoch"] + 1  # timm: version 2 checkpoints
    saver = None
    output_dir = None
    if rank == 0:
        output_dir = str(out_dir)
        saver = CheckpointSaver(model=model, optimizer=optimizer, checkpoint_dir=output_dir,
                                recovery_dir=output_dir, decreasing=True, max_history=100)

    lr_scheduler, num_epochs = timm.scheduler.create_scheduler_v2(
        optimizer, **timm.scheduler.scheduler_kwargs(args, decreasing_metric=True), updates_per_epoch=UPE)
    start_epoch = resume_epoch or 0
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * UPE)
        else:
            lr_scheduler.step(start_epoch)

    def train_one_epoch(epoch):
        losses_m = AverageMeter()
        num_updates = epoch * UPE
        optimizer.zero_grad()
        for batch_idx in range(UPE):
            if crash_at == (epoch, batch_idx):
                raise Crash()
            lrs = [g["lr"] for g in optimizer.param_groups]
            loss = synthetic_loss(model, lrs[0], num_updates + 1, rank=rank, offset=offset)
            optimizer.step()
            losses_m.update(loss, 16)
            num_updates += 1
            optimizer.zero_grad()
            log.append({"update": num_updates, "epoch": epoch, "lrs": lrs, "loss": loss})
            lr_scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)
        return {"loss": losses_m.avg}

    results = []
    best_metric = None
    try:
        for epoch in range(start_epoch, num_epochs):
            train_metrics = train_one_epoch(epoch)
            epoch_p_1 = epoch + 1
            if epoch_p_1 % args.val_interval != 0 and epoch_p_1 != num_epochs:
                lr_scheduler.step(epoch_p_1, metric=None)
                continue
            if output_dir is not None:
                lrs = [g["lr"] for g in optimizer.param_groups]
                update_summary(epoch, train_metrics, None, filename=os.path.join(output_dir, "summary.csv"),
                               lr=sum(lrs) / len(lrs), write_header=best_metric is None)
            latest_metric = train_metrics["loss"]
            if saver is not None:
                best_metric, _ = saver.save_checkpoint(epoch, metric=latest_metric)
            lr_scheduler.step(epoch_p_1, latest_metric)
            results.append({"epoch": epoch, "train": train_metrics})
    except KeyboardInterrupt:
        pass
    return {"scheduler": lr_scheduler, "num_epochs": num_epochs, "results": results, "log": log,
            "optimizer": optimizer}


def replayed_history(scheduler, losses):
    """Decisions of a bare detector with the scheduler's settings on these per-update losses."""
    detector = StageDetector(**scheduler.detector.settings())
    for loss in losses:
        if detector.finished:
            break
        detector.observe(loss)
    return detector.history


def summary_epochs(out_dir):
    lines = (Path(out_dir) / "summary.csv").read_text().splitlines()
    return [int(line.split(",")[0]) for line in lines if not line.startswith("epoch")]


# -- the factory -------------------------------------------------------------------------------
def test_factory_builds_autodecay_and_leaves_other_schedules_alone():
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler, num_epochs = timm.scheduler.create_scheduler_v2(
        optimizer, sched="autodecay", num_epochs=30, updates_per_epoch=UPE, warmup_epochs=2, warmup_prefix=True,
        decay_rate=0.5, autodecay_num_stages=2, **yaml_keys())
    assert isinstance(scheduler, AutoDecayScheduler) and num_epochs == 32  # warmup_prefix adds, as in timm
    assert scheduler.detector.total_updates == 32 * UPE and scheduler.detector.warmup_updates == 2 * UPE
    assert scheduler.detector.num_stages == 2 and scheduler.detector.window == 20
    assert scheduler.decay_rate == 0.5 and scheduler.t_in_epochs
    # every YAML key the docs list is generated from the detector's SETTINGS
    assert {k for k in YAML_KEYS if k != "autodecay_end_training"} == {
        "autodecay_" + k for k in SETTINGS if k not in ("total_updates", "updates_per_epoch", "warmup_updates")}

    # timm's other schedules: same class, same kwargs as timm's own functions give
    create = timm.scheduler.create_scheduler_v2
    original_create = create.__timm_autodecay_original__
    args = make_args(sched="cosine", autodecay_window=5)
    kwargs = timm.scheduler.scheduler_kwargs(args)
    assert kwargs == timm.scheduler.scheduler_kwargs.__timm_autodecay_original__(args)
    ours, _ = create(torch.optim.SGD(Toy().parameters(), lr=BASE_LR), **kwargs, updates_per_epoch=UPE)
    theirs, _ = original_create(torch.optim.SGD(Toy().parameters(), lr=BASE_LR), **kwargs, updates_per_epoch=UPE)
    assert type(ours) is type(theirs) is timm.scheduler.CosineLRScheduler
    assert [ours._get_lr(t) for t in range(30)] == [theirs._get_lr(t) for t in range(30)]
    # timm's create_scheduler (v1) goes through the same factory
    v1 = timm.scheduler.create_scheduler(make_args(**yaml_keys()), optimizer, updates_per_epoch=UPE)
    assert isinstance(v1[0], AutoDecayScheduler)


def test_startup_hook_is_lazy_and_registers_on_timm_import(tmp_path):
    """What the installed .pth does: no torch/timm at start-up; train.py's import gets our names."""
    setup = ast.parse((ROOT / "setup.py").read_text())
    constants = {t.id: ast.literal_eval(node.value) for node in setup.body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant)}
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / constants["PTH_NAME"]).write_text(constants["PTH_LINE"])
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]);"
        "names = [type(f).__name__ for f in sys.meta_path];"
        "print(int('_TimmSchedulerFinder' in names), int('torch' in sys.modules), int('timm' in sys.modules));"
        "exec(\"if sys.argv[2] == 'import':\\n from timm.scheduler import create_scheduler_v2, scheduler_kwargs\\n"
        " print(hasattr(create_scheduler_v2, '__timm_autodecay_original__'),"
        " hasattr(scheduler_kwargs, '__timm_autodecay_original__'))\")"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code, str(site_dir), "import"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0", "0", "True", "True"]  # as train.py imports them
    off = subprocess.run([sys.executable, "-c", code, str(site_dir), "-"], capture_output=True, text=True,
                         env={**env, "TIMM_AUTODECAY_HOOK": "0"}, timeout=60)
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["0", "0", "0"]


# -- train.py's loop ---------------------------------------------------------------------------
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
    assert torch.load(tmp_path / "last.pth.tar", weights_only=True)["epoch"] == last_epoch
    assert (tmp_path / f"checkpoint-{last_epoch}.pth.tar").exists()
    assert any(f"training ends after epoch {last_epoch}" in r.getMessage() for r in caplog.records)
    assert any("the last stage (2) ended at update" in r.getMessage() for r in caplog.records)
    # the trap is gone once it fired: the optimizer is back to normal
    assert "zero_grad" not in run["optimizer"].__dict__
    run["optimizer"].zero_grad()
    run["optimizer"].step()

    # the state file: one entry per completed epoch, written atomically (no temporary left)
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert sorted(map(int, saved["epochs"])) == list(range(1, last_epoch + 2))
    assert saved["epochs"][str(last_epoch + 1)]["detector"]["finished"] is True
    # every epoch's losses were read (averaged over ranks) before its state was saved: a state
    # written by rank 0 alone holds nothing rank-specific, so all ranks may resume from it
    assert all(state["pending_losses"]["updates"] == 0 for state in saved["epochs"].values())
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_ends_only_where_train_py_checkpoints(tmp_path):
    """--val-interval N: train.py checkpoints every N epochs only; the run ends at such a boundary."""
    boundary = train_py(tmp_path / "every", make_args(**yaml_keys()))["results"][-1]["epoch"] + 1
    interval = next(n for n in (2, 3, 4, 5) if boundary % n)
    run = train_py(tmp_path / "n", make_args(val_interval=interval, **yaml_keys()))
    end = -(-boundary // interval) * interval  # the first checkpointed boundary at or after it
    assert boundary < end < 30
    assert run["log"][-1]["update"] == end * UPE  # trained on to that boundary, not a batch more
    assert run["results"][-1]["epoch"] == end - 1
    assert torch.load(tmp_path / "n" / "last.pth.tar", weights_only=True)["epoch"] == end - 1


def test_warmup_like_timm_and_no_decision_during_it(tmp_path):
    """A loss flat from the start: still no decision before the warmup ends; warmup LRs are timm's."""
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched="autodecay", num_epochs=30, warmup_epochs=4, warmup_lr=1e-4, updates_per_epoch=UPE,
        **yaml_keys())
    step_opt = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    step, _ = timm.scheduler.create_scheduler_v2(step_opt, sched="step", num_epochs=30, warmup_epochs=4,
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


def test_distributed_train_py_logging_every_few_updates_feeds_the_latest_logged_loss():
    """Under DDP, train.py adds the (rank-averaged) loss to losses_m only every --log-interval updates
    and at the epoch's last batch: each update in between stands for the latest logged loss."""
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler = timm.scheduler.create_scheduler_v2(optimizer, sched="autodecay", num_epochs=30, updates_per_epoch=UPE,
                                                   autodecay_end_training=False, **yaml_keys())[0]
    rng = random.Random(2)
    losses = [0.5 + 2.0 / (1 + n / 20) + 0.05 * rng.gauss(0, 1) for n in range(30 * UPE)]
    log_interval, held = 4, []
    for epoch in range(30):
        meter = AverageMeter()
        for batch_idx in range(UPE):
            n = epoch * UPE + batch_idx + 1
            if batch_idx % log_interval == 0 or batch_idx == UPE - 1:
                meter.update(losses[n - 1], 16)
                latest = losses[n - 1]
            held.append(latest)
            scheduler.step_update(n, metric=meter.avg)
        scheduler.step(epoch + 1)
    assert scheduler.history and scheduler.history == replayed_history(scheduler, held)


def test_every_epoch_end_reads_the_pending_losses(tmp_path):
    """Buckets of 3 updates, epochs of 10: each epoch's last update still hands its partial bucket
    to the detector (a collective on every rank), so the state saved there holds no rank's own
    unread losses; the decisions are the same as with whole buckets."""
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler = AutoDecayScheduler(optimizer, updates_per_epoch=UPE, t_initial=30, state_dir=str(tmp_path),
                                   **detector_settings(window=75, patience=10))
    assert scheduler.detector.bucket_size == 3
    rng = random.Random(2)
    losses = [2.0 * math.exp(-n / 40) + 0.5 + 0.01 * rng.gauss(0, 1) for n in range(200)]
    for n in range(1, 201):
        k = (n - 1) % UPE + 1
        scheduler.step_update(n, metric=sum(losses[n - k:n]) / k)
        if n % UPE == 0:
            assert scheduler.accumulator.updates == 0 and scheduler.detector.update == n
            scheduler.step(n // UPE)
    saved = json.loads((tmp_path / STATE_FILE).read_text())["epochs"]
    assert len(saved) == 20 and all(state["pending_losses"]["updates"] == 0 for state in saved.values())
    assert scheduler.history and scheduler.history == replayed_history(scheduler, losses)


def test_a_nan_loss_is_counted_not_judged():
    """train.py's running mean stays NaN for the rest of an epoch after one NaN batch (AMP skips that
    step): those updates are counted as non-finite, never decided on; the next epoch reads again."""
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler = AutoDecayScheduler(optimizer, updates_per_epoch=UPE, t_initial=30,
                                   **detector_settings(window=30, patience=6))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        for n in range(1, 61):
            mean = float("nan") if 13 <= n <= 20 else 1.0
            scheduler.step_update(n, metric=mean)
            if n % UPE == 0:
                scheduler.step(n // UPE)
    assert scheduler.detector.nonfinite_losses == 8 and scheduler.detector.update == 60
    assert scheduler.history and scheduler.history[0]["update"] > 20  # a flat loss still ends the stage


# -- two ranks ---------------------------------------------------------------------------------
def two_rank_worker(out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out_dir = Path(out_dir)
    offset = 0.2 * (rank - 0.5)
    args = make_args(**yaml_keys())
    run = train_py(out_dir / "run", args, rank=rank, offset=offset)
    # the same run, crashed in stage 1 and resumed from rank 0's checkpoint folder on both ranks
    crash_epoch = run["scheduler"].history[0]["update"] // UPE + 1
    try:
        train_py(out_dir / "crashed", args, rank=rank, offset=offset, crash_at=(crash_epoch, 4))
    except Crash:
        pass
    dist.barrier()
    resumed = []
    train_py(out_dir / "crashed", make_args(**{**vars(args), "resume": str(out_dir / "crashed" / "last.pth.tar")}),
             rank=rank, offset=offset, batch_log=resumed)
    record = {"log": run["log"], "history": run["scheduler"].history,
              "results": [r["epoch"] for r in run["results"]], "finished": run["scheduler"].finished,
              "crash_epoch": crash_epoch, "resumed": [b for b in resumed if b["epoch"] >= crash_epoch]}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def test_two_ranks_take_the_same_decisions_from_the_mean_loss(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
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
    assert (tmp_path / "run" / STATE_FILE).exists()
    # resumed on both ranks from rank 0's state file: the unbroken run's LRs and losses, update for update
    for record in (r0, r1):
        expected = [b for b in record["log"] if b["epoch"] >= record["crash_epoch"]]
        assert record["resumed"] == expected and expected


# -- bad settings ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(autodecay_windw=30), r"unknown setting\(s\) \['autodecay_windw'\]"),
    (dict(autodecay_window=1), r"config key autodecay_window.*window must be >= 2, got 1"),
    (dict(autodecay_window="50"), r"window must be an integer, got '50'"),
    (dict(autodecay_significance=-1.0), r"significance must be .*got -1.0"),
    (dict(autodecay_num_stages=0), r"num_stages must be >= 1, got 0"),
    (dict(autodecay_end_training="no"), r"end_training must be true or false, got 'no'"),
    (dict(autodecay_total_updates=100), r"autodecay_total_updates is not a setting: .*--epochs"),
    (dict(decay_rate=1.5), r"decay_rate must be in \(0, 1\), got 1.5 \(--decay-rate\)"),
    (dict(min_lr=-0.1), r"--min-lr\) must be a finite number >= 0, got -0.1"),
    (dict(warmup_epochs=30), r"warmup \(30\) must be shorter than the budget \(30\)"),
    (dict(updates_per_epoch=0), r"needs updates_per_epoch .*got 0"),
    (dict(noise=[0.5]), r"LR noise .*not supported"),
])
def test_bad_settings_are_rejected_clearly(kwargs, message):
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    arguments = dict(sched="autodecay", num_epochs=30, updates_per_epoch=UPE)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        timm.scheduler.create_scheduler_v2(optimizer, **arguments)


def test_bad_config_keys_are_rejected_by_scheduler_kwargs():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['autodecay_windw'\]; known: .*autodecay_window"):
        timm.scheduler.scheduler_kwargs(make_args(autodecay_windw=30))
    with pytest.raises(ValueError, match=r"autodecay_warmup_updates is not a setting: .*--warmup-epochs"):
        timm.scheduler.scheduler_kwargs(make_args(autodecay_warmup_updates=30))
    # another schedule ignores autodecay keys, as it ignores every key it does not use
    assert "autodecay_windw" not in timm.scheduler.scheduler_kwargs(make_args(sched="step", autodecay_windw=3))


def test_finished_stop_is_a_keyboard_interrupt_raised_before_the_next_batch():
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


if __name__ == "__main__":  # the two-rank worker, under torchrun
    two_rank_worker(sys.argv[1])
