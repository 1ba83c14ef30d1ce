"""A benchmark, the same in every domain: the config keys they share, the runs a config asks for, and the
report a benchmark writes; what differs by domain is its back-end (`backends/`), which trains one run.

`schedules` lists the peers to run (`peers.PEERS`), each on every seed (StepDecay on `baseline_seeds` when
given): a frontier peer to each of `frontier_fractions` of the budget, an evaluated one (schedule-free) once
and read at each, the others once to the budget. Then each run of a peer in `paired_with` (AutoDecay) is
paired with the `frontier` peers trained to its own length on the same seed. Writes into `output_dir`:
`results.json` (the config, every run, per task the rows with their envelope numbers, the paired comparison
and its checks), `results.md` (the tables) and per task `pareto[_TASK].png`, plus the back-end's own.
"""
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, load_config
from .pareto import plot_pareto
from .peers import EVALUATED, FRONTIER, PEERS, runs_in
from .report import budget_point_runs, envelope_scores, paired_checks, paired_comparison, table_rows
from .report_tables import envelope_table, frontier_table, notes_table, paired_table, results_table
from .runner import Job, run_jobs


def peer_list(domain: str, kinds, default: list) -> dataclasses.Field:
    """A config key listing peers: `default`, checked to be peers that `domain`'s back-end (which runs `kinds`)
    can run."""
    return field(default_factory=lambda: list(default), metadata={"check": runs_in(domain, kinds)})


@dataclass
class BenchmarkKeys:
    """The keys every benchmark's config has (a domain's adds `schedules`, `frontier`, `paired_with` with its
    own defaults, `waste_tolerance` in its own unit, and `output_dir`)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    baseline_seeds: list[int] = field(default_factory=list)  # the seeds of "step"; empty: seeds
    frontier_fractions: list[float] = field(default_factory=lambda: [0.4, 0.6, 0.8, 1.0])  # shares of the budget
    jobs: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))  # runs at once, one torch thread each
    reuse_runs: bool = True  # a run finished in its folder by an earlier invocation, same config, is read back
    max_paired_deficit: float = 0.0  # the paired comparison's mean deficit, in the score's unit; 0: not checked


def initial_jobs(cfg, tasks: list[str]) -> list[Job]:
    """Every peer of `schedules` on every seed and task, at every budget point it runs to."""
    fractions = sorted(set(cfg.frontier_fractions))
    jobs = []
    for task in tasks:
        for name in cfg.schedules:
            lengths = PEERS[name].lengths
            for seed in cfg.baseline_seeds if name == "step" and cfg.baseline_seeds else cfg.seeds:
                if lengths == FRONTIER:
                    jobs += [Job(name, seed, task, fraction) for fraction in fractions]
                else:
                    read_at = tuple(f for f in fractions if f < 1) if lengths == EVALUATED else ()
                    jobs.append(Job(name, seed, task, read_at=read_at))
    return jobs


def paired_jobs(cfg, units: str, record: dict) -> list[Job]:
    """After a run of a peer in `paired_with` ends: the frontier peers trained to its own length."""
    if record["peer"] not in cfg.paired_with or record["paired_with"] or record["budget_fraction"] != 1.0:
        return []
    return [Job(name, record["seed"], record["task"], length=record[units], paired_with=record["label"])
            for name in cfg.frontier]


def progress_line(scale, record: dict) -> str:
    """A finished run in one line (a search, the oracle's, has no score of its own yet)."""
    done = (f"{scale.name.replace('_', ' ')} {record[scale.score]:.{scale.digits}f} after {record[scale.length]:g} "
            f"{scale.length}" if scale.score in record else "done")
    return f"{record['task']} seed {record['seed']} {record['label']}: {done} ({record['wall_seconds']:.0f} s)"


def benchmark_main(backend, argv=None, description: str = None) -> dict:
    """A benchmark's entry point: its config (a bad key or value ends the program naming it), the back-end's
    checks (the same), then `run_benchmark`."""
    cfg = load_config(backend.Config, argv, description=description)
    try:
        backend.check(cfg)
    except ValueError as error:  # ConfigError and the pinned data's errors included
        sys.exit(f"{backend.DOMAIN}: error: {error}")
    return run_benchmark(backend, cfg)


def run_benchmark(backend, cfg) -> dict:
    """Every run, then the report (see the module docstring); returns what results.json holds."""
    started, tasks, scale = time.perf_counter(), backend.tasks(cfg), backend.SCALE
    context = backend.prepare(cfg)
    records = run_jobs(backend, cfg, initial_jobs(cfg, tasks), lambda record: paired_jobs(cfg, scale.units, record),
                       lambda record: progress_line(scale, record))
    records, extras = backend.finish(cfg, records)
    runs = [record for record in records if not record["paired_with"]]
    runs += budget_point_runs(runs, cfg.frontier_fractions, lambda run, fraction: backend.read_at(cfg, run, fraction))
    order = list(dict.fromkeys(cfg.schedules + [run["peer"] for run in records]))
    runs.sort(key=lambda run: (tasks.index(run["task"]), order.index(run["peer"]), run["budget_fraction"], run["seed"]))
    paired_runs = [record for record in records if record["paired_with"]]
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tables, markdown = {}, []
    for task in tasks:
        tables[task], text = report_task(backend, cfg, task, runs, paired_runs, {**context, **extras})
        suffix = f"_{task}" if len(tasks) > 1 else ""
        plot_pareto(tables[task]["rows"], tables[task]["paired"], output / f"pareto{suffix}.png",
                    backend.title(cfg, task), scale, backend.band(cfg))
        backend.figures(cfg, [run for run in runs if run["task"] == task], output, suffix)
        markdown.append(text)
    names = list(dict.fromkeys(cfg.schedules + cfg.frontier + cfg.paired_with))
    markdown += ["#### Why these settings", "", notes_table({name: PEERS[name].note for name in names})]
    document = {"config": dataclasses.asdict(cfg), "tables": tables, "runs": runs, "paired_runs": paired_runs,
                **context, **extras, "wall_seconds": time.perf_counter() - started,
                "cpu_seconds": sum(record.get("cpu_seconds", 0.0) for record in records)}
    markdown += ["", f"Whole benchmark: {document['wall_seconds']:.0f} s wall, {document['cpu_seconds']:.0f} CPU-s "
                 "in its runs."]
    (output / "results.json").write_text(json.dumps(document, indent=1) + "\n")
    (output / "results.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))
    print(f"results.json, results.md and the figures in {output}")
    return document


def report_task(backend, cfg, task: str, runs: list[dict], paired_runs: list[dict], context: dict):
    """One task's rows with their envelope numbers, paired comparisons and the back-end's acceptance, and
    their markdown."""
    scale, budget = backend.SCALE, backend.budget(cfg)
    mine = [run for run in runs if run["task"] == task]
    rows = table_rows(mine, cfg.schedules, scale, budget)
    envelope = envelope_scores(rows, cfg.frontier, cfg.waste_tolerance, scale)
    for row in rows:
        row.update(envelope.get("scores", {}).get(row["label"], {}))
    backend.annotate(cfg, rows, mine, context)
    paired = {}
    for name in cfg.paired_with:
        summary = paired_comparison([run for run in mine if run["label"] == name], mine + paired_runs, cfg.frontier,
                                    scale, budget)
        if summary["per_seed"]:
            step = [run for run in mine if run["label"] == "step"]
            paired[name] = {**summary, "checks": paired_checks(summary, backend.paired_bounds(cfg), step, scale)}
    table = {"rows": rows, "envelope": {key: value for key, value in envelope.items() if key != "scores"},
             "paired": paired, "acceptance": backend.acceptance(cfg, rows)}
    return table, task_markdown(backend, cfg, task, table, mine, context)


def task_markdown(backend, cfg, task: str, table: dict, runs: list[dict], context: dict) -> str:
    """One task's tables: the rows, the frontier, AutoDecay against the envelope, each paired comparison, and
    the back-end's sections."""
    scale, rows = backend.SCALE, table["rows"]
    lines = [f"### {task} (budget {backend.budget(cfg)} {scale.length}){backend.heading(cfg, task, context)}", "",
             backend.intro(cfg, runs), "", results_table(rows, scale, backend.columns(cfg)), ""]
    if frontier_table(rows, cfg.frontier, scale):
        lines += ["#### The frontier (seed means)", "", frontier_table(rows, cfg.frontier, scale), ""]
    autodecays = [row["label"] for row in rows if row["label"] in cfg.paired_with or PEERS[row["peer"]].kind
                  == "autodecay"]
    text = envelope_table(rows, autodecays, table["envelope"], scale)
    if text:
        lines += [f"#### AutoDecay against the envelope of {' and '.join(cfg.frontier)}", "", text, ""]
    for name, summary in table["paired"].items():
        lines += [f"#### Paired by seed: {name} against the frontier at its own length", "",
                  paired_table(name, summary, summary["checks"], scale), ""]
    lines += backend.sections(cfg, table, runs, context)
    return "\n".join(lines)


class Backend:
    """What a domain's back-end provides beyond training one run; each says what its domain does differently.
    A back-end also has DOMAIN (its name), KINDS (the peer kinds it runs), SCALE (`report.Scale`), Config (its
    config dataclass), and `plan`, `saved`, `train`, `read_at` (see `runner.py` and `report.budget_point_runs`)."""

    def tasks(self, cfg) -> list[str]:
        return [self.DOMAIN]

    def folder(self, cfg, job: Job) -> Path:
        """A run's folder: output_dir/runs/[TASK/]LABEL/seedN (the task only where there are several)."""
        task = job.task if len(self.tasks(cfg)) > 1 else ""
        return Path(cfg.output_dir) / "runs" / task / job.label / f"seed{job.seed}"

    def check(self, cfg) -> None:
        """Raises ConfigError (a ValueError) for what the keys' types cannot say."""
        if sorted(set(cfg.frontier_fractions)) != sorted(cfg.frontier_fractions) or not all(
                0 < fraction <= 1 for fraction in cfg.frontier_fractions):
            raise ConfigError(f"frontier_fractions: distinct shares of the budget in (0, 1], got "
                              f"{cfg.frontier_fractions}")
        lengths = [name for name in cfg.frontier if PEERS[name].lengths != FRONTIER]
        if lengths:
            fixed = ", ".join(name for name, peer in PEERS.items() if peer.lengths == FRONTIER)
            raise ConfigError(f"frontier: {', '.join(lengths)} cannot be trained to a given length (those that can: "
                              f"{fixed})")

    def prepare(self, cfg) -> dict:
        """What must exist before any run (the fine-tuning's pre-trained model); what results.json says of it."""
        return {}

    def finish(self, cfg, records: list[dict]) -> tuple[list[dict], dict]:
        """The records once every run has ended (the oracle's searches resolved), and what results.json adds."""
        return records, {}

    def annotate(self, cfg, rows: list[dict], runs: list[dict], context: dict) -> None:
        """Adds the domain's own numbers to the rows."""

    def paired_bounds(self, cfg) -> dict:
        """{key of the paired comparison: (bound, "<=" or ">=")} besides its mean deficit's."""
        return {"mean_deficit": (cfg.max_paired_deficit, "<=")}

    def acceptance(self, cfg, rows: list[dict]) -> dict:
        return {}

    def heading(self, cfg, task: str, context: dict) -> str:
        return ""

    def intro(self, cfg, runs: list[dict]) -> str:
        return f"{self.SCALE.title}, seeds {cfg.seeds}; regret, waste and envelope deficit from the seed means."

    def columns(self, cfg) -> tuple:
        """The rows table's own columns: (header, cell of a row)."""
        return ()

    def sections(self, cfg, table: dict, runs: list[dict], context: dict) -> list[str]:
        return []

    def title(self, cfg, task: str) -> str:
        return f"{task}: {self.SCALE.title} against {self.SCALE.length} used (budget {self.budget(cfg)})"

    def band(self, cfg) -> float:
        """The width of the band drawn at StepDecay's score in the Pareto figure (0: none)."""
        return 0.0

    def figures(self, cfg, runs: list[dict], output: Path, suffix: str) -> None:
        """The domain's own figures of a task's runs."""
