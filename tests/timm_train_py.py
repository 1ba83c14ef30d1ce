"""timm's ``train.py`` in miniature, for the timm face's tests, and their two-rank worker.

``train_py`` below is timm's train.py main loop as far as the scheduler can tell (the calls and their
order as in a timm checkout): the resume of model and optimizer state from ``--resume`` (timm's own
``resume_checkpoint``, which loads the optimizer's state as the checkout's ``resume_task_checkpoint`` does; not
the optimizer's with ``--no-resume-opt``) before ``create_scheduler_v2(**scheduler_kwargs(args))``, the resume
``step`` (at ``--start-epoch`` if given), ``zero_grad`` at the top of each epoch, ``step_update(num_updates,
metric=losses_m.avg)`` after each update, then the evaluation (``--val-split``; none by default here, so
train.py passes the training loss), summary row, checkpoint (timm's own CheckpointSaver, with ``args``, the
optimizer's state and the metric), ``step(epoch + 1, latest_metric)`` and the result entry, inside ``try: ...
except KeyboardInterrupt``. The "model" is a synthetic loss that relaxes towards a level set by the learning
rate; its state is a parameter, so checkpoints carry it and a resumed run sees the very losses an unbroken one
sees. Tests that evaluate pass ``evaluate(epoch, rank) -> {"loss", "top1"}`` (and may pass
``loss_fn(update, rank)`` for the training loss).

Detector settings are explicit and small; expected decisions come from a bare StageDetector fed
the same per-update losses, so the tests check the plumbing, not the detector's tuning.
``two_rank_worker`` is the two-rank tests' worker (started through ``distributed_worker.py timm OUT_DIR``; the
environment variable ``TIMM_WORKER_CASE=eval`` picks the evaluation case, ``eval_rank_worker``).
"""
import argparse
import json
import math
import os
import random
from pathlib import Path

import torch

from timm_autodecay.detector import SETTINGS, StageDetector

UPE = 10  # updates per epoch
BASE_LR = 0.1


def import_timm_scheduler():
    """``timm.scheduler``, imported by the tests that use it, not at collection (see ``conftest.py``). Like
    train.py, the tests rely on the installed start-up hook to register autodecay in its factory."""
    import timm.scheduler

    if not hasattr(timm.scheduler.create_scheduler_v2, "__timm_autodecay_original__"):
        raise RuntimeError("sched='autodecay' is not registered in timm: the timm tests need the package installed "
                           "(pip install -e .), with its start-up hook on (TIMM_AUTODECAY_HOOK unset)")
    return timm.scheduler


def feed_epoch_means(scheduler, losses, start=0, stop=None, updates_per_epoch=UPE, log_interval=None):
    """Drive ``scheduler`` as train.py does with per-update ``losses`` (``losses[i]`` is update i + 1's):
    ``step_update(n, metric=losses_m.avg)`` for updates ``start + 1 .. stop``, and ``step(epoch)`` after
    each epoch's last update. ``losses_m`` is timm's AverageMeter over the epoch (batch size 16); with
    ``log_interval`` it takes a loss only every that many updates and at the epoch's last, as train.py
    did under DDP before timm 1.0.12. A run resumed mid-epoch rebuilds the meter from ``losses``."""
    from timm.utils import AverageMeter

    stop = len(losses) if stop is None else stop
    meter = AverageMeter()
    for n in range(start - (start % updates_per_epoch) + 1, stop + 1):
        index = (n - 1) % updates_per_epoch
        if index == 0:
            meter = AverageMeter()
        if log_interval is None or index % log_interval == 0 or index == updates_per_epoch - 1:
            meter.update(losses[n - 1], 16)
        if n <= start:
            continue
        scheduler.step_update(n, metric=meter.avg)
        if index == updates_per_epoch - 1:
            scheduler.step(n // updates_per_epoch)


def detector_settings(**overrides):
    """Small, explicit settings (only those this detector has)."""
    chosen = dict(window=20, patience=6, significance=1.0, min_relative_drop=0.01, min_points=8,
                  first_stage_patience=0.0, decay_shape="step")
    chosen.update(overrides)
    return {k: v for k, v in chosen.items() if k in SETTINGS}


def yaml_keys(**overrides):
    return {"autodecay_" + k: v for k, v in detector_settings(**overrides).items()}


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


# -- evaluations -------------------------------------------------------------------------------
def peaked_metrics(peak, height=80.0, width=0.5):
    """``evaluate(epoch, rank)`` for train_py: top-1 a parabola over the epochs with its top at ``peak``, and a
    validation loss that mirrors it (lowest there)."""
    def evaluate(epoch, rank=0):
        top1 = height - width * (epoch - peak) ** 2
        return {"loss": 3.0 - top1 / 40.0, "top1": top1}
    return evaluate


def falling_loss(update, rank=0):
    """A training loss that keeps falling, 0.5% of its start per update, through any stage of a 30-epoch run
    (each window's drop stays a large share of the stage's): the loss rule alone ends no stage."""
    rng = random.Random(update * 7919 + rank * 104729)
    return 3.0 - 0.005 * update + 0.01 * (1 + rank) * rng.gauss(0.0, 1.0)


def eval_args(**overrides):
    """train.py evaluating on a validation split (top-1, every epoch) with the cooldown shape."""
    return make_args(**{"val_split": "validation", **yaml_keys(decay_shape="cooldown"), **overrides})


def make_args(**kw):
    base = dict(model="toy", sched="autodecay", epochs=30, decay_rate=0.1, min_lr=0.0, warmup_lr=1e-5,
                warmup_epochs=0, warmup_prefix=False, sched_on_updates=False, resume="", no_resume_opt=False,
                start_epoch=None, val_interval=1, seed=42, val_split="", eval_metric="top1")
    base.update(kw)
    return argparse.Namespace(**base)


def train_py(out_dir, args, rank=0, offset=0.0, crash_at=None, lr_scale=None, batch_log=None, evaluate=None,
             loss_fn=None):
    """timm train.py's main(), as far as the scheduler can tell. Returns what the test inspects."""
    from timm.models import resume_checkpoint
    from timm.utils import AverageMeter, CheckpointSaver, update_summary

    timm_scheduler = import_timm_scheduler()
    model = Toy()
    groups = [{"params": [model.w]}]
    if lr_scale is not None:
        groups.append({"params": [model.v], "lr_scale": lr_scale})
    optimizer = torch.optim.SGD(groups, lr=BASE_LR)
    log = [] if batch_log is None else batch_log

    resume_epoch = None
    if args.resume:
        resume_epoch = resume_checkpoint(model, args.resume, optimizer=None if args.no_resume_opt else optimizer,
                                         log_info=False)
    if args.val_split and evaluate is None:
        raise ValueError("train_py: --val-split needs evaluate(epoch, rank)")
    eval_metric = args.eval_metric if args.val_split else "loss"  # train.py: no loader_eval, the training loss
    decreasing_metric = eval_metric == "loss"
    saver = None
    output_dir = None
    if rank == 0:
        output_dir = str(out_dir)
        os.makedirs(output_dir, exist_ok=True)  # train.py: utils.get_outdir(...) creates it
        saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, checkpoint_dir=output_dir,
                                recovery_dir=output_dir, decreasing=decreasing_metric, max_history=100)

    lr_scheduler, num_epochs = timm_scheduler.create_scheduler_v2(
        optimizer, **timm_scheduler.scheduler_kwargs(args, decreasing_metric=decreasing_metric), updates_per_epoch=UPE)
    start_epoch = 0
    if args.start_epoch is not None:
        start_epoch = args.start_epoch  # a specified start_epoch always overrides the resume epoch
    elif resume_epoch is not None:
        start_epoch = resume_epoch
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
            loss = (loss_fn(num_updates + 1, rank) if loss_fn is not None else
                    synthetic_loss(model, lrs[0], num_updates + 1, rank=rank, offset=offset))
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
            eval_metrics = evaluate(epoch, rank) if args.val_split else None
            if output_dir is not None:
                lrs = [g["lr"] for g in optimizer.param_groups]
                update_summary(epoch, train_metrics, eval_metrics, filename=os.path.join(output_dir, "summary.csv"),
                               lr=sum(lrs) / len(lrs), write_header=best_metric is None)
            latest_metric = (eval_metrics if eval_metrics is not None else train_metrics)[eval_metric]
            if saver is not None:
                best_metric, _ = saver.save_checkpoint(epoch, metric=latest_metric)
            lr_scheduler.step(epoch_p_1, latest_metric)
            results.append({"epoch": epoch, "train": train_metrics, **({"validation": eval_metrics}
                                                                        if eval_metrics is not None else {})})
    except KeyboardInterrupt:
        pass
    return {"scheduler": lr_scheduler, "num_epochs": num_epochs, "results": results, "log": log,
            "optimizer": optimizer}


def load_checkpoint(path):
    """A checkpoint as timm's resume loads it (``weights_only``, its ``args`` a Namespace)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def carried_state(path):
    """The AutoDecay state a checkpoint carries in its optimizer state."""
    from timm_autodecay.timm_resume import STATE_KEY

    return load_checkpoint(path)["optimizer"]["param_groups"][0][STATE_KEY]


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


# -- two ranks ---------------------------------------------------------------------------------
def two_rank_worker(out_dir):
    """Each rank trains train_py() with its own losses; then the same run crashed in stage 1 and resumed
    from rank 0's checkpoint folder on both ranks. Writes rankN.json."""
    import torch.distributed as dist

    if os.environ.get("TIMM_WORKER_CASE") == "eval":
        return eval_rank_worker(out_dir)
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
    dist.barrier()
    os._exit(0)  # not gloo's teardown: under load it sometimes aborts at exit, after all the work is written


def eval_rank_worker(out_dir):
    """Each rank evaluates its own top-1 (peaks 8 epochs apart) and trains on its own falling losses, as a loop
    that passes each rank's local metric would (train.py's validate() averages over ranks itself). Writes
    rankN.json with what each rank saw and decided."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    evaluate = peaked_metrics(peak=5 if rank == 0 else 13)  # alone: the phase ends after epoch 8, or 16
    seen = []

    def local(epoch, rank):
        seen.append(evaluate(epoch, rank))
        return seen[-1]
    run = train_py(Path(out_dir) / "run", eval_args(), rank=rank, evaluate=local, loss_fn=falling_loss)
    scheduler = run["scheduler"]
    record = {"log": run["log"], "evaluations": [m["top1"] for m in seen], "history": scheduler.history,
              "finished": scheduler.finished, "best_eval": scheduler.best_eval,
              "settings": scheduler.detector.settings(), "results": [r["epoch"] for r in run["results"]]}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    os._exit(0)  # as two_rank_worker
