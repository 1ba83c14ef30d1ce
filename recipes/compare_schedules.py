"""Compare AutoDecay with every peer schedule, side by side, on one or more tasks.

    accelerate launch recipes/compare_schedules.py --config recipes/configs/benchmark_peers.yaml \
        [--tasks mnist1d mnist1d_noisy] [--seeds 0 1 ...] [--schedules step autodecay ...] [--key value]

Trains every schedule in `schedules` (see `engine/peers.py`, PEERS: StepDecay, AutoDecay, cosine,
ReduceLROnPlateau, timm's plateau scheduler, dlib's slope test, SASA+, and the oracle) for every
seed in `seeds` (StepDecay: `baseline_seeds` when given), on every task in `tasks`, all on the same
budget (`epochs`). The runs are independent, so they run whole in a pool of `jobs` worker processes
(one torch thread each) rather than data-parallel. The oracle is the shortest fixed StepDecay on the
grid `oracle_first_milestones` x `oracle_gaps` x `oracle_tails` whose mean accuracy is within
`oracle_tolerance` points of StepDecay's on the same seeds (one prefix-sharing search per seed).

Writes into `output_dir`: each run's folder (metrics.jsonl, summary.json), `results.json` (every run
with its per-epoch curves, the oracle's grid and choice, the table rows), `results.md` (the tables),
per task `compare_schedules[_TASK].png` (training loss and test accuracy per epoch, LR decays
marked) and `pareto[_TASK].png` (accuracy against epochs used, one point per schedule with error
bars, the Pareto front drawn), and prints the tables.
"""
import json
import os
import statistics
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import matplotlib
import numpy as np
import torch
from accelerate import Accelerator
from engine.config import load_config
from engine.loop import train_run
from engine.oracle import choose_oracle, oracle_curve, oracle_search
from engine.peers import PEERS
from engine.study import run_in_pool
from engine.tasks import TASKS
from engine.train_config import TrainConfig
from matplotlib.figure import Figure
from tqdm.auto import tqdm


@dataclass
class CompareConfig(TrainConfig):
    """The shared training settings plus what to compare and how many runs at once."""

    output_dir: str = "runs/compare_schedules"
    schedules: list[str] = field(  # names in PEERS; "step" is the baseline
        default_factory=lambda: ["step", "autodecay", "cosine", "plateau_p10", "plateau_p3"],
        metadata={"choices": tuple(PEERS)},
    )
    tasks: list[str] = field(default_factory=list, metadata={"choices": tuple(TASKS)})  # empty: [task]
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    baseline_seeds: list[int] = field(default_factory=list)  # seeds of "step"; empty: seeds
    jobs: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))  # runs at once
    # the oracle's grid: first decay at m1, second at m1 + gap, end after m1 + gap + tail epochs
    oracle_first_milestones: list[int] = field(default_factory=lambda: list(range(6, 13)))
    oracle_gaps: list[int] = field(default_factory=lambda: list(range(2, 7)))
    oracle_tails: list[int] = field(default_factory=lambda: [1, 2, 3])
    oracle_tolerance: float = 0.2  # points of accuracy below StepDecay's that the oracle may lose


def train_compared_schedule(job: tuple) -> dict:
    """One run, in a pool worker (or in this process when jobs is 1), labelled with its schedule's
    name; for the oracle, one seed's whole grid search. `job` is (name, cfg) or (name, cfg, grid)."""
    name, cfg, *grid = job
    torch.set_num_threads(1)
    result = train_run(cfg) if PEERS[name].schedule else oracle_search(cfg, *grid)
    return {**result, "schedule": name, "task": cfg.task}


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


def resolve_oracle(results: list[dict], cfg: "CompareConfig", budget_epochs: int) -> tuple[list[dict], dict]:
    """Replace each task's per-seed oracle grids by the chosen fixed schedule's runs. The target is
    StepDecay's mean accuracy on the oracle's seeds (paired; all StepDecay runs if it has none of
    them) minus `oracle_tolerance`. Returns (the runs, {task: the oracle's grid means and choice})."""
    runs, oracles = [], {}
    for task in dict.fromkeys(run["task"] for run in results):
        grids = [run for run in results if run["task"] == task and run["schedule"] == "oracle"]
        if not grids:
            continue
        seeds = {run["seed"] for run in grids}
        step = [run for run in results if run["task"] == task and run["schedule"] == "step"]
        paired = [run["test_top1"] for run in step if run["seed"] in seeds] or [run["test_top1"] for run in step]
        target = statistics.mean(paired) - cfg.oracle_tolerance
        key, mean = choose_oracle([run["grid"] for run in grids], target)
        m1, m2, length = map(int, key.split(","))
        means = {k: statistics.mean(run["grid"][k] for run in grids) for k in grids[0]["grid"]}
        oracles[task] = {
            "target": target, "step_mean_on_oracle_seeds": statistics.mean(paired), "chosen": key,
            "milestones": [m1, m2], "length": length, "mean_top1": mean, "reached_target": mean >= target,
            "grid_means": means, "per_seed_grids": {run["seed"]: run["grid"] for run in grids},
            "epochs_trained_per_seed": [run["epochs_trained"] for run in grids],
        }
        for run in grids:
            runs.append({
                "schedule": "oracle", "task": task, "seed": run["seed"], "test_top1": run["grid"][key],
                "epochs": float(length), "updates": None, "decay_epochs": [float(m1), float(m2)],
                "wall_seconds": run["wall_seconds"], "curves": oracle_curve(run["curves"], m1, m2, length),
            })
    return [run for run in results if run["schedule"] != "oracle"] + runs, oracles


def table_rows(results: list[dict], names: list[str], budget_epochs: int, oracle_length) -> list[dict]:
    """Per schedule: runs, accuracy mean and sd, epochs used, the saving against StepDecay (which uses
    the whole budget) and the fraction of the oracle's saving that it captures."""
    rows = []
    for name in names:
        runs = [run for run in results if run["schedule"] == name]
        if not runs:
            continue
        accuracies = [run["test_top1"] for run in runs]
        epochs = [run["epochs"] for run in runs]
        saved = budget_epochs - statistics.mean(epochs)
        oracle_saving = budget_epochs - oracle_length if oracle_length is not None else None
        rows.append({
            "schedule": name, "runs": len(runs),
            "top1_mean": statistics.mean(accuracies),
            "top1_sd": statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
            "epochs_mean": statistics.mean(epochs),
            "epochs_sd": statistics.stdev(epochs) if len(runs) > 1 else 0.0,
            "saved_epochs": saved, "saved_percent": 100.0 * saved / budget_epochs,
            "oracle_fraction": saved / oracle_saving if oracle_saving else None,
            "decay_epochs": [run["decay_epochs"] for run in runs],
            "note": PEERS[name].note,
        })
    return rows


def results_table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| schedule | runs | test top-1 (%) | epochs used | saved vs StepDecay | of the oracle's saving "
        "| decays at epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        spread = f" ± {row['top1_sd']:.2f}" if row["runs"] > 1 else ""
        epochs_spread = f" ± {row['epochs_sd']:.1f}" if row["epochs_sd"] else ""
        fraction = "-" if row["oracle_fraction"] is None else f"{100 * row['oracle_fraction']:.0f}%"
        decays = "; ".join(", ".join(f"{at:.1f}" for at in run) or "-" for run in row["decay_epochs"])
        lines.append(
            f"| {row['schedule']} | {row['runs']} | {row['top1_mean']:.2f}{spread} | {row['epochs_mean']:.1f}"
            f"{epochs_spread} | {row['saved_epochs']:.1f} ({row['saved_percent']:.0f}%) | {fraction} | {decays} |"
        )
    return "\n".join(lines)


def acceptance(rows: list[dict]) -> dict:
    """The checks on AutoDecay: the peers both more accurate (by more than one sd: the larger
    of the two schedules' sds) and shorter, and the fraction of the oracle's saving captured."""
    by_name = {row["schedule"]: row for row in rows}
    auto = by_name.get("autodecay")
    if auto is None:
        return {}
    dominating = [
        row["schedule"] for row in rows
        if row["schedule"] not in ("autodecay", "oracle")
        and row["top1_mean"] - auto["top1_mean"] > max(row["top1_sd"], auto["top1_sd"])
        and row["epochs_mean"] < auto["epochs_mean"]
    ]
    return {"peers_more_accurate_and_shorter": dominating, "oracle_fraction": auto["oracle_fraction"]}


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both: as few or fewer epochs and as high or higher accuracy."""
    front = []
    for row in sorted(rows, key=lambda row: (row["epochs_mean"], -row["top1_mean"])):
        if not front or row["top1_mean"] > front[-1]["top1_mean"]:
            front.append(row)
    return front


def plot_pareto(rows: list[dict], path: Path, title: str, tolerance: float) -> None:
    """Accuracy against epochs used: one point per schedule (error bars: sd over seeds), the Pareto
    front as a staircase, StepDecay's accuracy and its tolerance band."""
    figure = Figure(figsize=(7.5, 5), layout="constrained")
    axes = figure.subplots()
    colours = matplotlib.colormaps["tab10"].colors
    for index, row in enumerate(rows):
        axes.errorbar(row["epochs_mean"], row["top1_mean"], xerr=row["epochs_sd"], yerr=row["top1_sd"],
                      fmt="o", color=colours[index % 10], capsize=3, label=row["schedule"])
        axes.annotate(row["schedule"], (row["epochs_mean"], row["top1_mean"]), textcoords="offset points",
                      xytext=(5, 5), fontsize=8)
    front = pareto_front(rows)
    xs, ys = [front[0]["epochs_mean"]], [front[0]["top1_mean"]]
    for row in front[1:]:
        xs += [row["epochs_mean"], row["epochs_mean"]]
        ys += [ys[-1], row["top1_mean"]]
    axes.plot(xs, ys, "--", color="grey", linewidth=1, label="Pareto front")
    step = next((row for row in rows if row["schedule"] == "step"), None)
    if step is not None:
        axes.axhspan(step["top1_mean"] - tolerance, step["top1_mean"], color="grey", alpha=0.15,
                     label=f"StepDecay - {tolerance:g} pt")
    accuracies = [row["top1_mean"] for row in rows]
    axes.set_ylim(max(min(accuracies) - 1.0, max(accuracies) - 6.0), max(accuracies) + 0.5)
    axes.set(xlabel="epochs used (mean over seeds)", ylabel="final test top-1 (%)", title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.savefig(path, dpi=120)


def main():
    cfg = load_config(CompareConfig, description=__doc__)
    accelerator = Accelerator()
    if accelerator.num_processes > 1:
        raise SystemExit("compare_schedules runs whole trainings in worker processes: launch one process")
    if "oracle" in cfg.schedules and "step" not in cfg.schedules:
        raise SystemExit("the oracle is measured against StepDecay: add step to schedules")
    output_dir = Path(cfg.output_dir)
    tasks = cfg.tasks or [cfg.task]
    shared = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}
    base = TrainConfig(**{**shared, "verbose": False})  # the runs report through results.json
    grid = (cfg.oracle_first_milestones, cfg.oracle_gaps, cfg.oracle_tails)
    runs = []
    for task in tasks:
        task_dir = output_dir / task if len(tasks) > 1 else output_dir
        for name in cfg.schedules:
            seeds = cfg.baseline_seeds if name == "step" and cfg.baseline_seeds else cfg.seeds
            for seed in seeds:
                schedule = name if PEERS[name].schedule else base.schedule
                run_cfg = replace(base, schedule=schedule, task=task, seed=seed,
                                  output_dir=str(task_dir / name / f"seed{seed}"))
                runs.append((name, run_cfg, *grid) if name == "oracle" else (name, run_cfg))
    runs.sort(key=lambda job: job[0] != "oracle")  # the longest jobs first
    accelerator.print(f"{len(runs)} runs ({' '.join(cfg.schedules)} x seeds {cfg.seeds} x tasks {tasks}), "
                      f"{cfg.jobs} at once")
    finished_runs = run_in_pool(train_compared_schedule, runs, min(cfg.jobs, len(runs)))
    show_progress = accelerator.is_local_main_process
    results = list(tqdm(finished_runs, total=len(runs), desc="runs", disable=not show_progress))
    results, oracles = resolve_oracle(results, cfg, cfg.epochs)
    results.sort(key=lambda run: (tasks.index(run["task"]), cfg.schedules.index(run["schedule"]), run["seed"]))

    output_dir.mkdir(parents=True, exist_ok=True)
    tables, markdown = {}, []
    for task in tasks:
        task_runs = [run for run in results if run["task"] == task]
        suffix = f"_{task}" if len(tasks) > 1 else ""
        oracle_length = oracles[task]["length"] if task in oracles else None
        rows = table_rows(task_runs, cfg.schedules, cfg.epochs, oracle_length)
        tables[task] = {"rows": rows, "acceptance": acceptance(rows)}
        plot_curves(task_runs, cfg.schedules, output_dir / f"compare_schedules{suffix}.png")
        plot_pareto(rows, output_dir / f"pareto{suffix}.png", f"{task}: accuracy against epochs used "
                    f"(budget {cfg.epochs})", cfg.oracle_tolerance)
        heading = f"### {task} (budget {cfg.epochs} epochs)"
        if task in oracles:
            o = oracles[task]
            heading += (f"; oracle: decays at {o['milestones'][0]}, {o['milestones'][1]}, ends at {o['length']} "
                        f"(target {o['target']:.2f}%{'' if o['reached_target'] else ', not reached: most accurate'})")
        markdown += [heading, "", results_table(rows), ""]
        if tables[task]["acceptance"]:
            markdown += [f"acceptance: {json.dumps(tables[task]['acceptance'])}", ""]
    document = {"config": asdict(cfg), "tables": tables, "oracle": oracles, "runs": results}
    (output_dir / "results.json").write_text(json.dumps(document, indent=1) + "\n")
    (output_dir / "results.md").write_text("\n".join(markdown))
    accelerator.print("\n".join(markdown))
    accelerator.print(f"results.json, results.md and the figures in {output_dir}")


if __name__ == "__main__":
    main()
