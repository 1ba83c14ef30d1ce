"""One training run: `train_run(cfg)` trains the task's model under the config's schedule and evaluates
after every epoch.

The loop knows one `Schedule` (schedules.py) and never a schedule's name: the schedule builds the
optimizer, hears every update's loss and every epoch's results, lowers the LR, counts the stages that
have ended and ends the run. A stage end is marked in `decay_epochs` and, with `save_stage_ends`,
checkpointed into `output_dir/stage_ends/stage{k}` (k as `stage` in metrics.jsonl).

Engine: one Accelerator per run (`mixed_precision`, any number of processes, `grad_accum_steps`
micro-batches per update, `full_batch` gradient descent), `save_state` into `output_dir/checkpoint` every
`checkpoint_every` epochs, `resume` / `resume_from`, `stop_after_epoch` (a preemption), and
`log_with: tensorboard`. Writes `metrics.jsonl` (a line per epoch), `summary.json` and
`training_curves.png` into `cfg.output_dir`; `saved_run(cfg)` reads a finished run back from them.
"""
import contextlib
import dataclasses
import json
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from .batches import Batches
from .config import ConfigError
from .evaluation import evaluate_all
from .models import make_model
from .peer_schedules import make_schedule
from .plots import plot_run
from .schedules import Schedule, current_lr
from .tasks import make_task


def make_accelerator(cfg) -> Accelerator:
    """The Accelerator a run's config asks for: `mixed_precision` ("no" leaves the launcher's choice) and
    `log_with` trackers (their files under the run's output folder)."""
    kwargs = {}
    if "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        kwargs["cpu"] = True  # torchrun on CPUs: Accelerate's gloo data-parallel (accelerate launch sets it itself)
    if cfg.mixed_precision != "no":
        kwargs["mixed_precision"] = cfg.mixed_precision
    if cfg.log_with != "none":
        kwargs.update(log_with=cfg.log_with, project_dir=cfg.output_dir)
    return Accelerator(**kwargs)


@dataclass
class RunState:
    """Where a run stands, saved with every checkpoint so that `resume` continues it exactly."""

    epoch: int = 0  # epochs completed
    updates: int = 0
    decay_epochs: list = field(default_factory=list)
    stage_ends: list = field(default_factory=list)
    curves: list = field(default_factory=list)
    finished: bool = False  # the schedule ended the run

    def state_dict(self) -> dict:
        return {"json": json.dumps(dataclasses.asdict(self))}

    def load_state_dict(self, state: dict) -> None:
        for key, value in json.loads(state["json"]).items():
            setattr(self, key, value)


@dataclass
class Run:
    """What one run trains with, built by `prepare_run` and handed to the loop's helpers."""

    cfg: typing.Any
    accelerator: Accelerator
    task: typing.Any
    batches: Batches
    model: torch.nn.Module
    optimizer: typing.Any
    schedule: Schedule
    state: RunState = field(default_factory=RunState)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def epochs_done(self) -> float:
        """Epochs trained so far, fractional when the run ended mid-epoch."""
        return self.state.updates / self.batches.updates_per_epoch


def prepare_run(cfg, schedule: Schedule = None) -> Run:
    """The run's Accelerator, data, model (initialised from `cfg.seed`), optimizer and schedule (`schedule`,
    else the one `cfg.schedule` names), the schedule and the run's state registered for checkpointing."""
    accelerator = make_accelerator(cfg)
    task = make_task(cfg)
    batches = Batches(task, cfg, accelerator)
    schedule = schedule or make_schedule(cfg)
    model = make_model(cfg, task.num_classes)
    model, optimizer = accelerator.prepare(model, schedule.make_optimizer(model, cfg))
    schedule.start(optimizer, batches.updates_per_epoch, cfg.epochs * batches.updates_per_epoch)
    run = Run(cfg, accelerator, task, batches, model, optimizer, schedule)
    # Not passed to prepare(): an AcceleratedScheduler would step once per process per call.
    accelerator.register_for_checkpointing(schedule)
    accelerator.register_for_checkpointing(run.state)
    return run


def update_losses(run: Run, epoch: int):
    """Train epoch `epoch` (0-based) in the benchmark's data order, yielding each update's loss (a 0-dim
    tensor on the device, the update's exact mean over its samples) after its optimizer step."""
    model, optimizer, accelerator, batches = run.model, run.optimizer, run.accelerator, run.batches
    model.train()
    for update_size, micro_batches in batches.epoch(epoch):
        optimizer.zero_grad(set_to_none=True)
        update_loss = torch.zeros((), device=accelerator.device)
        for index, (inputs, targets) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                # Summed and scaled so that the mean over processes is the update's exact mean loss.
                logits = model(inputs)
                loss = F.cross_entropy(logits.float(), targets, reduction="sum") * (batches.processes / update_size)
                accelerator.backward(loss)
            update_loss += loss.detach()
        optimizer.step()
        yield update_loss


def train_epoch(run: Run, epoch: int) -> tuple[float, float, int]:
    """One epoch's updates, each followed by the schedule's `after_update` and the stage ends it marks.
    Returns the epoch's mean training loss and the LR and stage of its last update."""
    loss_sum = torch.zeros((), device=run.accelerator.device)
    count, lr = 0, current_lr(run.optimizer)
    for update_loss in update_losses(run, epoch):
        lr_of_update, stage_of_update = lr, len(run.state.decay_epochs)
        loss_sum += update_loss
        count += 1
        run.state.updates += 1
        run.state.finished = run.schedule.after_update(update_loss)
        note_stage_ends(run, lr_of_update)
        lr = current_lr(run.optimizer)
        if run.state.finished:
            break
    train_loss = run.accelerator.reduce(loss_sum, reduction="mean").item() / count
    return train_loss, lr_of_update, stage_of_update


def note_stage_ends(run: Run, lr_of_stage: float) -> None:
    """Mark (and checkpoint) every stage the schedule has ended since the last call."""
    while len(run.state.decay_epochs) < run.schedule.stage:
        save_stage_end(run, lr_of_stage)
        run.state.decay_epochs.append(run.epochs_done)


def save_stage_end(run: Run, lr: float) -> None:
    """Record the end of the current stage (numbered like `stage` in metrics) and, with `save_stage_ends`,
    checkpoint it into `stage_ends/stage{k}`."""
    cfg, state = run.cfg, run.state
    stage = len(state.stage_ends)
    path = run.output_dir / "stage_ends" / f"stage{stage}"
    state.stage_ends.append({"stage": stage, "epoch": run.epochs_done, "updates": state.updates, "lr": lr,
                             "path": str(path) if cfg.save_stage_ends else None})
    if cfg.save_stage_ends:
        run.accelerator.save_state(str(path))


def run_epoch(run: Run, epoch: int) -> dict:
    """Train and evaluate one epoch; the schedule hears the results. Returns the epoch's metrics line."""
    epoch_start = time.perf_counter()
    train_loss, lr, stage = train_epoch(run, epoch)
    with run.schedule.evaluation(run.model, run.batches):
        metrics = evaluate_all(run.model, run.task, run.cfg, run.accelerator)
    record = {"epoch": run.epochs_done, "updates": run.state.updates, "lr": lr, "stage": stage,
              "train_loss": train_loss, **metrics, "seconds": time.perf_counter() - epoch_start}
    lr_before = current_lr(run.optimizer)
    ended = run.schedule.after_epoch(epoch + 1, train_loss, record)
    note_stage_ends(run, lr_before)
    run.state.finished = ended or run.state.finished
    run.state.curves.append(record)
    run.state.epoch = epoch + 1
    return record


def resume(run: Run) -> bool:
    """Load `resume_from`, or with `resume` the run's own checkpoint if there is one; True if loaded."""
    cfg = run.cfg
    resume_dir = Path(cfg.resume_from) if cfg.resume_from else run.output_dir / "checkpoint" if cfg.resume else None
    if cfg.resume_from and not resume_dir.is_dir():
        raise ConfigError(f"resume_from: no checkpoint folder {cfg.resume_from!r}")
    if resume_dir is None or not resume_dir.is_dir():
        return False
    run.accelerator.load_state(str(resume_dir))
    return True


def open_outputs(run: Run) -> Path:
    """The metrics file, rewritten with the lines of the epochs already done (a resumed run), and the
    trackers the config asks for. Returns the metrics file's path."""
    metrics_path = run.output_dir / "metrics.jsonl"
    if run.accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(record) + "\n" for record in run.state.curves))
    if run.cfg.log_with != "none":
        config = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                  for key, value in dataclasses.asdict(run.cfg).items()}
        run.accelerator.init_trackers(run.cfg.log_with, config=config)
    return metrics_path


def write_record(run: Run, record: dict, metrics_path: Path) -> None:
    if run.accelerator.is_main_process:
        with metrics_path.open("a") as metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
    if run.cfg.log_with != "none":
        run.accelerator.log({key: value for key, value in record.items() if key != "epoch"}, step=run.state.epoch)


def end_of_epoch(run: Run) -> bool:
    """Checkpoints due after an epoch (the last stage's end, every `checkpoint_every`); True to stop."""
    cfg, state = run.cfg, run.state
    done = state.finished or state.epoch == cfg.epochs
    if done:
        save_stage_end(run, current_lr(run.optimizer))  # the last stage ends with the run
    if cfg.checkpoint_every and (state.epoch % cfg.checkpoint_every == 0 or done):
        run.accelerator.save_state(str(run.output_dir / "checkpoint"))
    if cfg.stop_after_epoch and state.epoch >= cfg.stop_after_epoch and not done:
        run.accelerator.print(f"stopped after epoch {state.epoch} (stop_after_epoch); continue with --resume")
        return True
    return done


def summarize(run: Run, resumed: bool, wall_seconds: float) -> dict:
    """The run's summary (summary.json): final results, length, stage ends, the config."""
    cfg, state, curves = run.cfg, run.state, run.state.curves
    return {
        "schedule": cfg.schedule,
        "seed": cfg.seed,
        "test_top1": curves[-1]["test_top1"] if curves else None,
        "test_loss": curves[-1]["test_loss"] if curves else None,
        "epochs": run.epochs_done,
        "updates": state.updates,
        "updates_per_epoch": run.batches.updates_per_epoch,
        "decay_epochs": state.decay_epochs,
        "stage_ends": state.stage_ends,
        "complete": state.finished or state.epoch == cfg.epochs,
        "resumed": resumed,
        "wall_seconds": wall_seconds,
        "config": dataclasses.asdict(cfg),
        **run.schedule.summary(),
    }


def write_summary(run: Run, summary: dict) -> None:
    cfg = run.cfg
    if run.accelerator.is_main_process:
        (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if run.state.curves:
            plot_run(run.state.curves, run.state.decay_epochs, run.output_dir / "training_curves.png",
                     f"{cfg.model} on {cfg.task}, {cfg.schedule}")
    if cfg.verbose:
        decays = ", ".join(f"{at:g}" for at in run.state.decay_epochs) or "none"
        run.accelerator.print(
            f"{cfg.schedule} seed {cfg.seed}: test top-1 {summary['test_top1']:.2f}% after {summary['epochs']:g} "
            f"epochs (decays at epoch {decays}), {summary['wall_seconds']:.0f} s, written to {run.output_dir}"
        )


def same_config(saved, cfg) -> bool:
    """True when a run saved with config ``saved`` is the run ``cfg`` describes: the same values, where a key
    added to the config since (absent from ``saved``) counts as the same only at its default."""
    if not isinstance(saved, dict):
        return False
    current = json.loads(json.dumps(dataclasses.asdict(cfg)))
    added = {f.name for f in dataclasses.fields(cfg)} - set(saved)
    defaults = json.loads(json.dumps({name: getattr(type(cfg)(), name) for name in added}))
    return {**defaults, **saved} == current


def saved_run(cfg) -> typing.Optional[dict]:
    """The finished run `cfg` describes, as `train_run` returns it, read back from its `summary.json` and
    `metrics.jsonl` in `cfg.output_dir`; None unless the run there is complete and had exactly this config."""
    folder = Path(cfg.output_dir)
    try:
        summary = json.loads((folder / "summary.json").read_text())
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except (OSError, ValueError):
        return None
    curves = [json.loads(line) for line in lines]
    matches = same_config(summary.get("config"), cfg)
    whole = bool(curves) and curves[-1]["updates"] == summary.get("updates")
    return {**summary, "curves": curves} if summary.get("complete") and matches and whole else None


def train_run(cfg, schedule: Schedule = None) -> dict:
    """Train one run under `schedule` (default: the one `cfg.schedule` names), evaluating after every
    epoch, until the budget (`cfg.epochs`) or the schedule ends it. Returns the summary with the
    per-epoch lines under "curves". Several runs may be trained one after another in one process."""
    run = prepare_run(cfg, schedule)
    resumed = resume(run)
    metrics_path = open_outputs(run)
    run_start = time.perf_counter()
    show_progress = run.accelerator.is_local_main_process and cfg.verbose
    progress = tqdm(range(run.state.epoch, cfg.epochs), desc=f"{cfg.schedule} seed {cfg.seed}",
                    disable=not show_progress, initial=run.state.epoch, total=cfg.epochs)
    for epoch in progress:
        if run.state.finished:
            break
        record = run_epoch(run, epoch)
        write_record(run, record, metrics_path)
        progress.set_postfix(loss=f"{record['train_loss']:.4f}", top1=f"{record['test_top1']:.2f}",
                             lr=f"{record['lr']:.3g}")
        if end_of_epoch(run):
            break
    progress.close()
    for tracker in run.accelerator.trackers:  # not end_training(): that would end the process group too
        tracker.finish()
    summary = summarize(run, resumed, time.perf_counter() - run_start)
    write_summary(run, summary)
    return {**summary, "curves": run.state.curves}
