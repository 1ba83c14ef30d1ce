"""Compare AutoDecay with every peer schedule, side by side, on one or more tasks.

    accelerate launch recipes/compare_schedules.py --config recipes/configs/benchmark_peers.yaml \
        [--tasks mnist1d mnist1d_noisy] [--seeds 0 1 ...] [--schedules step autodecay ...] [--key value]

Trains every schedule in `schedules` (see `engine/peers.py`, PEERS: StepDecay, AutoDecay, cosine and WSD
at 20..100% of the budget, schedule-free SGD, constant, ReduceLROnPlateau, timm's plateau scheduler,
dlib's slope test, SASA+, and the oracle) for every seed in `seeds` (StepDecay: `baseline_seeds` when
given), on every task in `tasks`, all on the same budget (`epochs`). The runs are independent, so they run
whole in a pool of `jobs` worker processes (one torch thread each) rather than data-parallel. The oracle is
the shortest fixed StepDecay on the grid `oracle_first_milestones` x `oracle_gaps` x `oracle_tails` whose
mean accuracy is within `oracle_tolerance` points of StepDecay's on the same seeds.

Against the envelope: every schedule's regret (the best fixed-length point's mean accuracy minus its own),
waste (its mean epochs over the shortest fixed-length point within `waste_tolerance` points of the best) and
envelope deficit (the best point no longer than its run, minus its accuracy), from the seed means of cosine
and WSD at every budget point run (`engine/comparison.py`, `envelope_scores`).

Schedules that read an evaluation (timm_plateau, plateau_eval, autodecay_eval) read `eval_metric` on the
validation split the config holds out (`val_samples`); the test set is what is reported.

Runs already finished in `output_dir` with the same config are read back, not retrained (`reuse_runs`): a
later invocation with more schedules trains only the new ones.

Paired comparison: then, for every run of a schedule in `paired_with` (AutoDecay), each schedule in
`paired_peers` (cosine, WSD) is trained to that run's own length (its updates) on the same seed; the
deficit is the better one's accuracy minus AutoDecay's, averaged over seeds and checked against
`max_paired_deficit`, `max_epochs`, `min_top1` (0: not checked).

Writes into `output_dir`: each run's folder (metrics.jsonl, summary.json), `results.json` (every run with
its per-epoch curves, the oracle's grid and choice, the table rows with their envelope numbers, the paired
comparison), `results.md` (the tables: every schedule, the frontier per budget point, AutoDecay against the
envelope), per task `compare_schedules[_TASK].png` (training loss and test accuracy per epoch, LR decays
marked) and `pareto[_TASK].png` (accuracy against epochs used, a point per schedule, the frontier lines,
the paired rivals, the Pareto front), and prints the tables.
"""
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from engine.comparison import (
    budget_point_runs, dominating_peers, envelope_scores, envelope_table, frontier_table, paired_checks,
    paired_comparison, paired_table, results_table, table_rows,
)
from engine.config import load_config
from engine.config import ConfigError
from engine.loop import saved_run, train_run
from engine.oracle import oracle_search, resolve_oracle
from engine.peers import PEERS, TRAINABLE, check_eval_metric
from engine.plots import plot_curves, plot_pareto
from engine.study import run_in_pool
from engine.tasks import TASKS
from engine.train_config import TrainConfig
from tqdm.auto import tqdm


@dataclass
class CompareConfig(TrainConfig):
    """The shared training settings plus what to compare and how many runs at once."""

    output_dir: str = "runs/compare_schedules"
    schedules: list[str] = field(  # names in PEERS; "step" is the baseline
        default_factory=lambda: ["step", "autodecay", "cosine", "wsd"], metadata={"choices": tuple(PEERS)}
    )
    tasks: list[str] = field(default_factory=list, metadata={"choices": tuple(TASKS)})  # empty: [task]
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    baseline_seeds: list[int] = field(default_factory=list)  # seeds of "step"; empty: seeds
    jobs: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))  # runs at once
    reuse_runs: bool = True  # a run whose folder holds its finished summary.json, same config, is read, not retrained
    # the oracle's grid: first decay at m1, second at m1 + gap, end after m1 + gap + tail epochs
    oracle_first_milestones: list[int] = field(default_factory=lambda: list(range(6, 13)))
    oracle_gaps: list[int] = field(default_factory=lambda: list(range(2, 7)))
    oracle_tails: list[int] = field(default_factory=lambda: [1, 2, 3])
    oracle_tolerance: float = 0.2  # points of accuracy below StepDecay's that the oracle may lose
    # the paired comparison: each run of `paired_with` against `paired_peers` trained to its own length
    paired_with: list[str] = field(default_factory=lambda: ["autodecay"], metadata={"choices": tuple(PEERS)})
    paired_peers: list[str] = field(default_factory=lambda: ["cosine", "wsd"], metadata={"choices": ("cosine", "wsd")})
    max_paired_deficit: float = 0.0  # points; 0: not checked
    max_epochs: float = 0.0  # mean epochs of the paired schedule; 0: not checked
    min_top1: float = 0.0  # its mean accuracy (%); 0: not checked
    # against the envelope of cosine and WSD at every budget point run: waste counts epochs against the shortest
    # point within this many points of the best one's accuracy
    waste_tolerance: float = 0.1


def train_compared_schedule(job: tuple) -> dict:
    """One run, in a pool worker (or in this process when jobs is 1), labelled with its schedule's name
    and what it is paired with; for the oracle, one seed's whole grid search."""
    name, cfg, paired_with, grid = job
    torch.set_num_threads(1)
    result = train_run(cfg) if PEERS[name].schedule else oracle_search(cfg, *grid)
    return {**result, "schedule": name, "task": cfg.task, "paired_with": paired_with}


def reused_run(job: tuple):
    """The job's run read back from its folder (see `saved_run`), labelled as `train_compared_schedule` does;
    None for the oracle's search or a run not finished there with the same config."""
    name, cfg, paired_with, _ = job
    saved = saved_run(cfg) if PEERS[name].schedule else None
    return {**saved, "schedule": name, "task": cfg.task, "paired_with": paired_with} if saved else None


def run_jobs(jobs: list, cfg: CompareConfig, accelerator, what: str) -> list[dict]:
    """Every job in the pool (the longest, the oracle's, first), but those already run (`reuse_runs`);
    the finished runs."""
    saved = [reused_run(job) if cfg.reuse_runs else None for job in jobs]
    reused = [run for run in saved if run]
    jobs = sorted((job for job, run in zip(jobs, saved) if not run), key=lambda job: job[0] != "oracle")
    accelerator.print(f"{len(jobs)} {what}, {cfg.jobs} at once" + (f"; {len(reused)} read back" if reused else ""))
    finished = run_in_pool(train_compared_schedule, jobs, max(1, min(cfg.jobs, len(jobs))))
    return reused + list(tqdm(finished, total=len(jobs), desc=what, disable=not accelerator.is_local_main_process))


def schedule_jobs(cfg: CompareConfig, base: TrainConfig, tasks: list[str]) -> list[tuple]:
    """(name, run config, paired with, oracle grid) for every schedule, seed and task."""
    grid = (cfg.oracle_first_milestones, cfg.oracle_gaps, cfg.oracle_tails)
    jobs = []
    for task in tasks:
        for name in cfg.schedules:
            seeds = cfg.baseline_seeds if name == "step" and cfg.baseline_seeds else cfg.seeds
            for seed in seeds:
                run_cfg = replace(base, schedule=name if name in TRAINABLE else base.schedule, task=task, seed=seed,
                                  output_dir=str(task_folder(cfg, task, tasks) / name / f"seed{seed}"))
                jobs.append((name, run_cfg, None, grid))
    return jobs


def paired_jobs(cfg: CompareConfig, base: TrainConfig, tasks: list[str], results: list[dict]) -> list[tuple]:
    """Each of `paired_peers` trained to the length (updates) of each run of `paired_with`, same seed."""
    jobs = []
    for run in results:
        if run["schedule"] not in cfg.paired_with:
            continue
        for peer in cfg.paired_peers:
            folder = task_folder(cfg, run["task"], tasks) / f"{peer}_at_{run['schedule']}" / f"seed{run['seed']}"
            run_cfg = replace(base, schedule=peer, task=run["task"], seed=run["seed"], output_dir=str(folder),
                              schedule_updates=run["updates"])
            jobs.append((peer, run_cfg, run["schedule"], None))
    return jobs


def task_folder(cfg: CompareConfig, task: str, tasks: list[str]) -> Path:
    return Path(cfg.output_dir) / task if len(tasks) > 1 else Path(cfg.output_dir)


def report_task(cfg: CompareConfig, task: str, runs: list[dict], paired_runs: list[dict], oracle) -> dict:
    """One task's table rows, checks and paired comparisons (its markdown under "markdown")."""
    names = list(dict.fromkeys(cfg.schedules + [run["schedule"] for run in runs]))
    rows = table_rows(runs, names, cfg.epochs, oracle["length"] if oracle else None)
    envelope = envelope_scores(rows, cfg.waste_tolerance)
    for row in rows:
        row.update(envelope.get("scores", {}).get(row["schedule"], {}))
    autodecays = [row["schedule"] for row in rows if row["schedule"] in cfg.paired_with
                  or row["schedule"].startswith("autodecay")]
    report = {"rows": rows, "acceptance": dominating_peers(rows), "paired": {},
              "envelope": {key: value for key, value in envelope.items() if key != "scores"}}
    heading = f"### {task} (budget {cfg.epochs} epochs)"
    if oracle:
        reached = "" if oracle["reached_target"] else ", not reached: most accurate"
        heading += (f"; oracle: decays at {oracle['milestones'][0]}, {oracle['milestones'][1]}, ends at "
                    f"{oracle['length']} (target {oracle['target']:.2f}%{reached})")
    markdown = [heading, "", results_table(rows), ""]
    if frontier_table(rows):
        markdown += ["#### The frontier (seed means)", "", frontier_table(rows), ""]
    if envelope_table(rows, autodecays, envelope):
        markdown += ["#### AutoDecay against the envelope of cosine and WSD", "",
                     envelope_table(rows, autodecays, envelope), ""]
    if report["acceptance"]:
        markdown += [f"acceptance: {json.dumps(report['acceptance'])}", ""]
    for name in cfg.paired_with:
        mine = sorted((run for run in paired_runs if run["paired_with"] == name),
                      key=lambda run: cfg.paired_peers.index(run["schedule"]))
        summary = paired_comparison([run for run in runs if run["schedule"] == name], mine)
        if summary["per_seed"]:
            checks = paired_checks(summary, cfg.max_paired_deficit, cfg.max_epochs, cfg.min_top1)
            report["paired"][name] = {**summary, "checks": checks}
            markdown += [f"#### {name} against the frontier at its own length", "",
                         paired_table(name, summary, checks), ""]
    report["markdown"] = "\n".join(markdown)
    return report


def main():
    cfg = load_config(CompareConfig, description=__doc__)
    accelerator = Accelerator()
    if accelerator.num_processes > 1:
        raise SystemExit("compare_schedules runs whole trainings in worker processes: launch one process")
    if "oracle" in cfg.schedules and "step" not in cfg.schedules:
        raise SystemExit("the oracle is measured against StepDecay: add step to schedules")
    try:
        check_eval_metric(cfg, cfg.schedules + cfg.paired_peers)
    except ConfigError as error:
        raise SystemExit(str(error)) from error
    tasks = cfg.tasks or [cfg.task]
    shared = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}
    base = TrainConfig(**{**shared, "verbose": False})  # the runs report through results.json
    results = run_jobs(schedule_jobs(cfg, base, tasks), cfg, accelerator, "runs")
    paired = paired_jobs(cfg, base, tasks, results)
    paired_runs = run_jobs(paired, cfg, accelerator, "paired runs") if paired else []
    results, oracles = resolve_oracle(results, cfg.oracle_tolerance)
    results += budget_point_runs(results, cfg.epochs)
    order = {name: index for index, name in enumerate(dict.fromkeys(cfg.schedules + [r["schedule"] for r in results]))}
    results.sort(key=lambda run: (tasks.index(run["task"]), order[run["schedule"]], run["seed"]))

    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tables = {}
    for task in tasks:
        task_runs = [run for run in results if run["task"] == task]
        tables[task] = report_task(cfg, task, task_runs, [run for run in paired_runs if run["task"] == task],
                                   oracles.get(task))
        suffix = f"_{task}" if len(tasks) > 1 else ""
        plot_curves([run for run in task_runs if run["schedule"] in cfg.schedules], cfg.schedules,
                    output_dir / f"compare_schedules{suffix}.png")
        plot_pareto(tables[task]["rows"], tables[task]["paired"], output_dir / f"pareto{suffix}.png",
                    f"{task}: accuracy against epochs used (budget {cfg.epochs})", cfg.oracle_tolerance)
    markdown = "\n".join(tables[task].pop("markdown") for task in tasks)
    document = {"config": asdict(cfg), "tables": tables, "oracle": oracles, "runs": results,
                "paired_runs": paired_runs}
    (output_dir / "results.json").write_text(json.dumps(document, indent=1) + "\n")
    (output_dir / "results.md").write_text(markdown)
    accelerator.print(markdown)
    accelerator.print(f"results.json, results.md and the figures in {output_dir}")


if __name__ == "__main__":
    main()
