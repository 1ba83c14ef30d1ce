"""Learning stages and their root cause: SGD under StepDecay, full-batch GD, and AutoDecay.

    accelerate launch recipes/learning_stages.py --config recipes/configs/learning_stages.yaml \
        [--seeds 0 1 2] [--methods sgd_step gd_step autodecay] [--key value]

The same task and model trained three ways, for every seed in `seeds`:
- `sgd_step`: SGD (batch `batch_size`), LR x`decay_rate` at `milestones` of an `epochs` budget;
- `gd_step`: full-batch gradient descent (the gradient of the whole training set per update, summed
  over `gd_grad_accum_steps` equal micro-batches per process), `gd_epochs` updates, the same schedule at
  the same fractions of the run (milestones x gd_epochs / epochs);
- `autodecay`: SGD under AutoDecay (decays where it detects a stage end).

For each decay it measures the transition, as in BENCHMARK.md: `loss_ratio` is the fall of the
training loss (epoch mean) within `after` epochs after the decay over `after` x the mean per-epoch fall
in the `before` epochs before it (1: the trend continues; >= 2: a sharp transition), `acc_jump_pp` the
change of test accuracy within `after` epochs after the decay (points), `acc_trend_pp` what the trend
before predicts for it. A fractional decay epoch (AutoDecay) is measured from the epoch it falls in.

Launched on one process, the runs go whole to a pool of `jobs` worker processes; launched on several,
they run one after the other, each data-parallel over all processes. Writes into `output_dir`: each
run's folder (`METHOD/seedS/`: metrics.jsonl, summary.json, checkpoints), `summary.json` (`runs[i]`
with `method`, `seed`, `decays[j]` = {epoch, loss_ratio, acc_jump_pp, ...}; the table),
`learning_stages.png` (the paper-style figure) and `learning_stages.md` (the table).
"""
import math
import os
import statistics
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import matplotlib
import numpy as np
import torch
from engine.config import load_config
from engine.loop import make_accelerator, train_run
from engine.study import run_in_pool, write_study
from engine.train_config import TrainConfig
from matplotlib.figure import Figure

METHODS = ("sgd_step", "gd_step", "autodecay")
METHOD_LABELS = {"sgd_step": "SGD, StepDecay", "gd_step": "full-batch GD, StepDecay", "autodecay": "SGD, AutoDecay",
                 "constant": "SGD, constant LR"}


@dataclass
class LearningStagesConfig(TrainConfig):
    """The shared training settings (those of `sgd_step`) plus the comparison's."""

    output_dir: str = "runs/learning_stages"
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"choices": METHODS})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    gd_epochs: int = 150  # full-batch GD: updates (= epochs) in its run
    gd_grad_accum_steps: int = 16  # full-batch GD: equal micro-batches per process per update
    before: int = 5  # epochs before a decay that give the trend
    after: int = 2  # epochs after a decay in which the transition is measured
    jobs: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))  # runs at once (one process)


def method_config(cfg: LearningStagesConfig, method: str, seed: int) -> TrainConfig:
    """The TrainConfig of one run."""
    shared = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}
    output_dir = str(Path(cfg.output_dir) / method / f"seed{seed}")
    run = TrainConfig(**{**shared, "verbose": False, "seed": seed, "output_dir": output_dir})
    if method == "sgd_step":
        return replace(run, schedule="step")
    if method == "autodecay":
        return replace(run, schedule="autodecay")
    if method == "constant":
        return replace(run, schedule="constant")
    scale = cfg.gd_epochs / cfg.epochs  # gd_step: the same schedule at the same fractions of the run
    return replace(
        run, schedule="step", full_batch=True, grad_accum_steps=cfg.gd_grad_accum_steps, epochs=cfg.gd_epochs,
        milestones=[round(at * scale) for at in cfg.milestones],
    )


def transition(curves: list[dict], decay_epoch: float, before: int, after: int) -> dict:
    """The transition at a decay: loss and accuracy change in `after` epochs against the trend of the
    `before` epochs before (see the module's docstring). None where the run is too short to tell."""
    at = {round(line["epoch"]): line for line in curves if abs(line["epoch"] - round(line["epoch"])) < 1e-9}
    decay = math.floor(decay_epoch + 1e-9)
    start = max(1, decay - before)
    result = {"epoch": decay_epoch, "loss_ratio": None, "acc_jump_pp": None, "acc_trend_pp": None,
              "loss_drop": None, "loss_trend": None}
    if decay not in at or decay + after not in at or start not in at or start == decay:
        return result
    per_epoch_loss = (at[start]["train_loss"] - at[decay]["train_loss"]) / (decay - start)
    per_epoch_acc = (at[decay]["test_top1"] - at[start]["test_top1"]) / (decay - start)
    loss_drop = at[decay]["train_loss"] - at[decay + after]["train_loss"]
    result.update(
        loss_drop=loss_drop,
        loss_trend=after * per_epoch_loss,
        loss_ratio=loss_drop / (after * per_epoch_loss) if per_epoch_loss != 0 else None,
        acc_jump_pp=at[decay + after]["test_top1"] - at[decay]["test_top1"],
        acc_trend_pp=after * per_epoch_acc,
    )
    return result


def run_one(job: tuple[str, TrainConfig]) -> dict:
    """One run (in a pool worker or in this process), labelled with its method."""
    method, cfg = job
    torch.set_num_threads(1)
    return {**train_run(cfg), "method": method}


def run_all(jobs: list, processes: int, accelerator):
    """Under several processes the runs are data-parallel, one after the other; else whole runs in a pool."""
    if accelerator.num_processes > 1:
        for method, cfg in jobs:
            yield {**train_run(cfg), "method": method}
        return
    yield from run_in_pool(run_one, jobs, processes)


def budget_fraction_scale(run: dict, budget: int) -> float:
    """Multiplier putting a run's epochs on the SGD budget's scale (GD runs more, shorter epochs)."""
    return budget / run["config"]["epochs"]


def plot_learning_stages(results: list[dict], methods: list[str], budget: int, path: Path) -> None:
    """Training loss (log) and test accuracy against the run's progress on the SGD epoch scale: a colour
    per method, a line per seed, dotted verticals and triangles at the decays."""
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    colours = dict(zip(methods, matplotlib.colormaps["tab10"].colors))
    labelled = set()
    for run in results:
        scale = budget_fraction_scale(run, budget)
        epochs = [line["epoch"] * scale for line in run["curves"]]
        colour = colours[run["method"]]
        label = None if run["method"] in labelled else METHOD_LABELS.get(run["method"], run["method"])
        labelled.add(run["method"])
        for axes, key in ((loss_axes, "train_loss"), (accuracy_axes, "test_top1")):
            values = [line[key] for line in run["curves"]]
            axes.plot(epochs, values, color=colour, linewidth=1.2, alpha=0.85, label=label)
            decays = [at * scale for at in run["decay_epochs"]]
            axes.plot(decays, np.interp(decays, epochs, values), "v", color=colour, markersize=7)
    final = min(run["test_top1"] for run in results)
    loss_axes.set(yscale="log", xlabel=f"epoch (full-batch GD: update x {budget}/its updates)",
                  ylabel="training loss (epoch mean)", title="training loss")
    accuracy_axes.set(xlabel="epoch (same scale)", ylabel="test top-1 (%)", title="test accuracy")
    accuracy_axes.set_ylim(max(0.0, final - 25), 100)
    loss_axes.legend(title="method (v = LR decay)")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


def _mean(values):
    values = [value for value in values if value is not None]
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"


def results_table(runs: list[dict], methods: list[str]) -> str:
    """Per method: final accuracy, and per decay (first, second) the loss ratio and accuracy jump."""
    lines = ["| method | runs | test top-1 (%) | decay | at epoch | loss_ratio | acc_jump_pp (trend) |",
             "|---|---|---|---|---|---|---|"]
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        accuracy = _mean([run["test_top1"] for run in mine])
        count = max((len(run["decays"]) for run in mine), default=0)
        if count == 0:
            lines.append(f"| {METHOD_LABELS.get(method, method)} | {len(mine)} | {accuracy} | none | - | - | - |")
        for j in range(count):
            decays = [run["decays"][j] for run in mine if len(run["decays"]) > j]
            epochs = ", ".join(f"{d['epoch']:.1f}" for d in decays)
            ratios = ", ".join("-" if d["loss_ratio"] is None else f"{d['loss_ratio']:.2f}" for d in decays)
            lines.append(
                f"| {METHOD_LABELS.get(method, method) if j == 0 else ''} | {len(mine) if j == 0 else ''} "
                f"| {accuracy if j == 0 else ''} | {j + 1} | {epochs} "
                f"| {_mean([d['loss_ratio'] for d in decays])} ({ratios}) "
                f"| {_mean([d['acc_jump_pp'] for d in decays])} ({_mean([d['acc_trend_pp'] for d in decays])}) |"
            )
    return "\n".join(lines)


def train_methods(cfg, accelerator) -> list[dict]:
    """Every method for every seed; the runs' summaries ordered by method, then seed."""
    jobs = [(method, method_config(cfg, method, seed)) for method in cfg.methods for seed in cfg.seeds]
    accelerator.print(f"{len(jobs)} runs ({' '.join(cfg.methods)} x seeds {cfg.seeds})")
    results = []
    for run in run_all(jobs, min(cfg.jobs, len(jobs)), accelerator):
        results.append(run)
        accelerator.print(
            f"  {run['method']} seed {run['seed']}: {run['test_top1']:.2f}% in {run['wall_seconds']:.0f} s"
        )
    return sorted(results, key=lambda run: (cfg.methods.index(run["method"]), run["seed"]))


def main():
    cfg = load_config(LearningStagesConfig, description=__doc__)
    accelerator = make_accelerator(cfg)
    results = train_methods(cfg, accelerator)
    runs = []
    for run in results:
        # A GD "epoch" is one update: its transition is measured over the same number of epochs.
        decays = [transition(run["curves"], at, cfg.before, cfg.after) for at in run["decay_epochs"]]
        runs.append({
            "method": run["method"], "seed": run["seed"], "schedule": run["schedule"],
            "full_batch": run["config"]["full_batch"], "test_top1": run["test_top1"], "epochs": run["epochs"],
            "updates": run["updates"], "decay_epochs": run["decay_epochs"], "decays": decays,
            "wall_seconds": run["wall_seconds"], "output_dir": run["config"]["output_dir"],
        })
    table = results_table(runs, cfg.methods)
    if accelerator.is_main_process:
        output_dir = write_study(cfg.output_dir, "learning_stages", runs, table, cfg)
        plot_learning_stages(results, cfg.methods, cfg.epochs, output_dir / "learning_stages.png")
    accelerator.print(table)
    accelerator.print(f"summary.json, learning_stages.png and learning_stages.md in {cfg.output_dir}")


if __name__ == "__main__":
    main()
