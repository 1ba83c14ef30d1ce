"""The SGD loop's benchmark back-end: a CNN on MNIST-1D (or any task of `TrainConfig`) trained by `loop.train_run`,
each peer as the `Schedule` of `peer_schedules.py`, scored by test top-1 and measured in epochs.

The oracle is a study, not a schedule: the grid of fixed two-decay StepDecay schedules, each seed's grid
searched by sharing prefixes (`oracle.py`); once every run has ended it becomes the shortest grid point
within `oracle_tolerance` of StepDecay's accuracy on the same seeds. A paired run is a cosine or WSD run of
`schedule_updates`, its partner's updates. Runs are read back from a folder only with the same config
(`loop.saved_run`). The runs are whole trainings in worker processes: launch one process.
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..benchmark import Backend, BenchmarkKeys, peer_list
from ..config import ConfigError
from ..loop import saved_run, train_run
from ..oracle import oracle_search, resolve_oracle
from ..peer_schedules import KINDS as SCHEDULES, TRAINABLE, check_eval_metric
from ..peers import EVALUATED, PEERS
from ..plots import plot_curves
from ..report import Scale, dominating_peers
from ..tasks import TASKS
from ..runner import Planned
from ..train_config import TrainConfig

DOMAIN = "mnist1d"
KINDS = (*SCHEDULES, "oracle")
EVALUATIONS = ("test_top1", "test_loss", "val_top1", "val_loss")  # what a budget point reads off its run's curves


@dataclass
class CompareConfig(TrainConfig, BenchmarkKeys):
    """The shared training settings plus what to compare and how many runs at once."""

    output_dir: str = "runs/compare_schedules"
    schedules: list[str] = peer_list(DOMAIN, KINDS, ["step", "autodecay", "cosine", "wsd"])  # "step": the baseline
    frontier: list[str] = peer_list(DOMAIN, KINDS, ["cosine", "wsd"])  # the envelope; trained to paired lengths
    paired_with: list[str] = peer_list(DOMAIN, KINDS, ["autodecay"])  # each run against the frontier at its length
    tasks: list[str] = field(default_factory=list, metadata={"choices": tuple(TASKS)})  # empty: [task]
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    # the oracle's grid: first decay at m1, second at m1 + gap, end after m1 + gap + tail epochs
    oracle_first_milestones: list[int] = field(default_factory=lambda: list(range(6, 13)))
    oracle_gaps: list[int] = field(default_factory=lambda: list(range(2, 7)))
    oracle_tails: list[int] = field(default_factory=lambda: [1, 2, 3])
    oracle_tolerance: float = 0.2  # points of accuracy below StepDecay's that the oracle may lose
    max_epochs: float = 0.0  # the paired schedule's mean epochs; 0: not checked
    min_top1: float = 0.0  # its mean accuracy (%); 0: not checked
    # waste counts epochs against the shortest frontier point within this many points of the best one's accuracy
    waste_tolerance: float = 0.1


class MNIST1D(Backend):
    DOMAIN, KINDS, Config = DOMAIN, KINDS, CompareConfig
    SCALE = Scale(score="test_top1", name="top1", higher_is_better=True, title="test top-1 (%)", digits=2,
                  length="epochs", units="updates", length_digits=1)

    def tasks(self, cfg) -> list[str]:
        return cfg.tasks or [cfg.task]

    def budget(self, cfg) -> int:
        return cfg.epochs

    def check(self, cfg) -> None:
        super().check(cfg)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("compare_schedules runs whole trainings in worker processes: launch one process")
        if "oracle" in cfg.schedules and "step" not in cfg.schedules:
            raise ConfigError("schedules: the oracle is measured against StepDecay: add step")
        check_eval_metric(cfg, cfg.schedules + cfg.frontier)

    def plan(self, cfg, job) -> list[Planned]:
        """One run: a `TrainConfig` of the job's peer, seed, task and length, in its own folder; the oracle's
        search of one seed's grid (the longest: first)."""
        shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
        run = TrainConfig(**{**shared, "verbose": False, "task": job.task, "seed": job.seed,
                             "output_dir": str(self.folder(cfg, job)),
                             "schedule": job.peer if job.peer in TRAINABLE else cfg.schedule,
                             "budget_fraction": job.fraction, "schedule_updates": job.length})
        grid = (cfg.oracle_first_milestones, cfg.oracle_gaps, cfg.oracle_tails) if job.peer == "oracle" else None
        cost = (max(grid[0]) + len(grid[0]) * (max(grid[1]) + len(grid[1]) * max(grid[2])) if grid
                else cfg.epochs * job.fraction)
        return [Planned(dataclasses.astuple(job), job, (run, grid), cost=cost)]

    def saved(self, cfg, planned) -> dict:
        run, grid = planned.spec
        return saved_run(run) if grid is None else None

    def train(self, spec) -> dict:
        """One run (in a pool worker, or in this process when jobs is 1); for the oracle, one seed's search."""
        import torch

        run, grid = spec
        torch.set_num_threads(1)
        started = time.process_time()
        result = train_run(run) if grid is None else oracle_search(run, *grid)
        return {**result, "cpu_seconds": time.process_time() - started}

    def read_at(self, cfg, run: dict, fraction: float):
        """The run as if it had stopped after the epoch at `fraction` of the budget: its evaluation there."""
        epoch = round(fraction * cfg.epochs)
        line = next((line for line in run["curves"] if line["epoch"] == epoch), None)
        if line is None:
            return None
        return {**run, **{key: line[key] for key in EVALUATIONS if key in line}, "epochs": line["epoch"],
                "updates": line["updates"], "curves": [ln for ln in run["curves"] if ln["epoch"] <= epoch]}

    def finish(self, cfg, records: list[dict]) -> tuple[list[dict], dict]:
        records, oracles = resolve_oracle(records, cfg.oracle_tolerance)
        return records, {"oracle": oracles}

    def annotate(self, cfg, rows: list[dict], runs: list[dict], context: dict) -> None:
        """Each row's decays (per run) and the fraction of the oracle's saving it captures."""
        oracle = context["oracle"].get(runs[0]["task"]) if runs else None
        saving = cfg.epochs - oracle["length"] if oracle else None
        for row in rows:
            row["decay_epochs"] = [run["decay_epochs"] for run in runs if run["label"] == row["label"]]
            row["oracle_fraction"] = row["saved_epochs"] / saving if saving else None

    def paired_bounds(self, cfg) -> dict:
        return {**super().paired_bounds(cfg), "epochs_mean": (cfg.max_epochs, "<="), "top1_mean": (cfg.min_top1, ">=")}

    def acceptance(self, cfg, rows: list[dict]) -> dict:
        """The peers more accurate than AutoDecay (by more than a sd) and shorter, and the share of the oracle's
        saving it captures."""
        own = next((row for row in rows if row["label"] == "autodecay"), None)
        if own is None:
            return {}
        return {"peers_more_accurate_and_shorter": dominating_peers(rows, self.SCALE),
                "oracle_fraction": own["oracle_fraction"]}

    def heading(self, cfg, task: str, context: dict) -> str:
        oracle = context["oracle"].get(task)
        if not oracle:
            return ""
        reached = "" if oracle["reached_target"] else ", not reached: most accurate"
        return (f"; oracle: decays at {oracle['milestones'][0]}, {oracle['milestones'][1]}, ends at "
                f"{oracle['length']} (target {oracle['target']:.2f}%{reached})")

    def columns(self, cfg) -> tuple:
        def fraction(row):
            return "-" if row["oracle_fraction"] is None else f"{100 * row['oracle_fraction']:.0f}%"

        def decays(row):
            return "; ".join(", ".join(f"{at:.1f}" for at in run) or "-" for run in row["decay_epochs"])

        return (("of the oracle's saving", fraction), ("decays at epoch", decays))

    def sections(self, cfg, table: dict, runs: list[dict], context: dict) -> list[str]:
        return [f"acceptance: {json.dumps(table['acceptance'])}", ""] if table["acceptance"] else []

    def title(self, cfg, task: str) -> str:
        return f"{task}: accuracy against epochs used (budget {cfg.epochs})"

    def band(self, cfg) -> float:
        return cfg.oracle_tolerance

    def figures(self, cfg, runs: list[dict], output: Path, suffix: str) -> None:
        """Training loss and test accuracy per epoch, a colour per schedule (its budget points read off one run
        are its curve's prefixes: not drawn again)."""
        drawn = [run for run in runs if PEERS[run["peer"]].lengths != EVALUATED or run["budget_fraction"] == 1.0]
        names = list(dict.fromkeys(run["label"] for run in drawn))
        plot_curves(drawn, names, output / f"compare_schedules{suffix}.png")

