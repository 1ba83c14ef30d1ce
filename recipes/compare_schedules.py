"""Compare AutoDecay with the schedules it replaces on the reference benchmark (MNIST-1D).

    accelerate launch recipes/compare_schedules.py --config recipes/configs/compare_schedules.yaml \
        [--seeds 0 1 ...] [--schedules step autodecay ...] [--key value]

Trains every schedule in `schedules` for every seed in `seeds`, all on the same budget (`epochs`).
The runs are independent, so they run whole in a pool of `jobs` worker processes (one torch thread
each) rather than data-parallel. Writes into `output_dir`: each run's folder (metrics.jsonl,
summary.json), `results.json` (every run with its per-epoch curves), `compare_schedules.png`
(training loss and test accuracy per epoch, LR decays marked), and prints a table of accuracy and
epochs used.
"""
import json
import multiprocessing
import os
import statistics
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import matplotlib
import numpy as np
import torch
from accelerate import Accelerator
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from training import TrainConfig, load_config, train_run

# name -> the TrainConfig settings that make that schedule; "step" is the baseline.
COMPARED_SCHEDULES = {
    "step": {"schedule": "step"},
    "autodecay": {"schedule": "autodecay"},
    "cosine": {"schedule": "cosine"},
    "plateau_p10": {"schedule": "plateau", "patience": 10},
    "plateau_p3": {"schedule": "plateau", "patience": 3},
}


@dataclass
class CompareConfig(TrainConfig):
    """The shared training settings plus what to compare and how many runs at once."""

    output_dir: str = "runs/compare_schedules"
    schedules: list[str] = field(
        default_factory=lambda: list(COMPARED_SCHEDULES), metadata={"choices": tuple(COMPARED_SCHEDULES)}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    jobs: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))  # runs at once


def train_compared_schedule(job: tuple[str, TrainConfig]) -> dict:
    """One run, in a pool worker (or in this process when jobs is 1), labelled with its schedule's name."""
    name, cfg = job
    torch.set_num_threads(1)
    return {**train_run(cfg, Accelerator()), "schedule": name}


def train_all(runs: list[tuple[str, TrainConfig]], processes: int):
    """Yield the runs' results as they finish, from a pool of worker processes ("spawn": each starts
    its own torch and Accelerate state) or, for one process, in this one."""
    if processes == 1:
        yield from map(train_compared_schedule, runs)
        return
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        yield from pool.imap_unordered(train_compared_schedule, runs)
        pool.close()  # let the workers exit cleanly rather than be terminated
        pool.join()


def plot_curves(results: list[dict], names: list[str], path: Path) -> None:
    """Training loss (log scale) and test accuracy against epoch: a colour per schedule, a line per
    seed, a triangle where the learning rate was decayed."""
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    colours = dict(zip(names, matplotlib.colormaps["tab10"].colors))
    labelled = set()
    for run in results:
        epochs = [line["epoch"] for line in run["curves"]]
        colour = colours[run["schedule"]]
        label = None if run["schedule"] in labelled else run["schedule"]
        labelled.add(run["schedule"])
        for axes, key in ((loss_axes, "train_loss"), (accuracy_axes, "test_top1")):
            values = [line[key] for line in run["curves"]]
            axes.plot(epochs, values, color=colour, linewidth=1.2, alpha=0.85, label=label)
            decays = run["decay_epochs"]
            axes.plot(decays, np.interp(decays, epochs, values), "v", color=colour, markersize=7)
    final_accuracy = min(run["test_top1"] for run in results)
    loss_axes.set(yscale="log", xlabel="epoch", ylabel="training loss (epoch mean)", title="training loss")
    accuracy_axes.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    accuracy_axes.set_ylim(max(0.0, final_accuracy - 10), 100)
    loss_axes.legend(title="schedule (v = LR decay)")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


def results_table(results: list[dict], names: list[str], budget_epochs: int) -> str:
    """A markdown table per schedule: runs, accuracy mean ± sd, epochs used, epochs saved against
    StepDecay (which always uses the whole budget) and where each run decayed."""
    lines = [
        "| schedule | runs | test top-1 (%) | epochs used | saved vs StepDecay | decays at epoch |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        runs = [run for run in results if run["schedule"] == name]
        accuracies = [run["test_top1"] for run in runs]
        spread = f" ± {statistics.stdev(accuracies):.2f}" if len(runs) > 1 else ""
        epochs_used = statistics.mean(run["epochs"] for run in runs)
        saved = 100.0 * (1 - epochs_used / budget_epochs)
        decays = "; ".join(", ".join(f"{at:.1f}" for at in run["decay_epochs"]) or "-" for run in runs)
        lines.append(
            f"| {name} | {len(runs)} | {statistics.mean(accuracies):.2f}{spread} | {epochs_used:.1f} "
            f"| {saved:.0f}% | {decays} |"
        )
    return "\n".join(lines)


def main():
    cfg = load_config(CompareConfig, description=__doc__)
    accelerator = Accelerator()
    if accelerator.num_processes > 1:
        raise SystemExit("compare_schedules runs whole trainings in worker processes: launch one process")
    output_dir = Path(cfg.output_dir)
    shared = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}
    base = TrainConfig(**{**shared, "verbose": False})  # the runs report through results.json
    runs = []
    for name in cfg.schedules:
        for seed in cfg.seeds:
            run_dir = output_dir / name / f"seed{seed}"
            runs.append((name, replace(base, **COMPARED_SCHEDULES[name], seed=seed, output_dir=str(run_dir))))
    accelerator.print(f"{len(runs)} runs ({' '.join(cfg.schedules)} x seeds {cfg.seeds}), {cfg.jobs} at once")
    finished_runs = train_all(runs, min(cfg.jobs, len(runs)))
    show_progress = accelerator.is_local_main_process
    results = list(tqdm(finished_runs, total=len(runs), desc="runs", disable=not show_progress))
    results.sort(key=lambda run: (cfg.schedules.index(run["schedule"]), run["seed"]))

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_curves(results, cfg.schedules, output_dir / "compare_schedules.png")
    accelerator.print(results_table(results, cfg.schedules, cfg.epochs))
    accelerator.print(f"results.json and compare_schedules.png in {output_dir}")


if __name__ == "__main__":
    main()
