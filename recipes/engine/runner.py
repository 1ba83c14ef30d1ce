"""The benchmarks' one job runner: whole runs in a pool of worker processes, in every domain.

A `Job` is what a benchmark asks for (a peer on a seed, to a share of the budget or to a paired run's
length); the domain's back-end plans it (`plan`) as one or more `Planned` runs: its own, and the runs it
branches off (the Trainer's constant-LR trunk, a prefix shared by WSD and StepDecay), which it waits for
(`needs`). A run planned twice (the same `key`) is trained once. With `reuse_runs` a run already finished by
an earlier invocation with the identical config is read back (`saved`) rather than trained. When a run ends,
`followups` may ask for more (the frontier trained to its length). A line per finished run, and a bar.
"""
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Callable

from tqdm.auto import tqdm

from .peers import label


@dataclass(frozen=True)
class Job:
    peer: str
    seed: int
    task: str
    fraction: float = 1.0  # the share of the budget it trains to
    length: int = 0  # a paired run: the length it trains to, in the back-end's `units` (it overrides fraction)
    paired_with: str = ""  # a paired run: the label of the run whose length it takes
    read_at: tuple = ()  # an evaluated peer: the shares of the budget it is also read at

    @property
    def label(self) -> str:
        return label(self.peer, self.fraction, self.paired_with)


@dataclass(frozen=True)
class Planned:
    key: tuple  # the run's identity: two jobs planned as the same run train it once
    job: Job
    spec: object  # what the back-end's `train` takes
    needs: tuple = ()  # keys of the runs that must end first (the trunk it branches off)
    cost: float = 0  # what it costs to train, in the budget's unit: the longest start first


class InlineExecutor:
    """`submit` runs the call at once, in this process (jobs: 1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, function, *args) -> Future:
        future = Future()
        future.set_result(function(*args))
        return future


def labelled(job: Job, result: dict) -> dict:
    """A run's record: what the back-end returned, and which job it was."""
    return {**result, "peer": job.peer, "label": job.label, "task": job.task, "seed": job.seed,
            "budget_fraction": None if job.paired_with else job.fraction, "paired_with": job.paired_with}


class Plan:
    """The runs planned so far: those waiting, and the results read back."""

    def __init__(self, backend, cfg):
        self.backend, self.cfg = backend, cfg
        self.pending, self.keys, self.read_back = {}, set(), []

    def add(self, jobs: list[Job]) -> int:
        """Plan `jobs` (each with the runs it needs); returns how many new runs."""
        added = 0
        for job in jobs:
            for planned in self.backend.plan(self.cfg, job):
                if planned.key in self.keys:
                    continue
                self.keys.add(planned.key)
                added += 1
                saved = self.backend.saved(self.cfg, planned) if self.cfg.reuse_runs else None
                if saved is not None:
                    self.read_back.append((planned, saved))
                else:
                    self.pending[planned.key] = planned
        return added

    def ready(self, done: set, paired_with: list) -> list[Planned]:
        """The runs whose needs are done: seed by seed (a seed's numbers are complete early), the runs others
        follow up first, then the longest."""
        return sorted((p for p in self.pending.values() if set(p.needs) <= done),
                      key=lambda p: (p.job.seed, p.job.peer not in paired_with, -p.cost))


def run_jobs(backend, cfg, jobs: list[Job], followups: Callable[[dict], list[Job]], progress: Callable) -> list[dict]:
    """Every run of `jobs` and of their followups, `cfg.jobs` at once; their records, as they finish.
    `progress(record)` is the line printed for each."""
    plan = Plan(backend, cfg)
    plan.add(jobs)
    print(f"{len(plan.pending)} runs, {cfg.jobs} at once" + (f"; {len(plan.read_back)} read back" if plan.read_back
                                                             else ""), flush=True)
    records, done = [], set()
    with tqdm(total=len(plan.keys), desc=f"{backend.DOMAIN} runs", unit="run", file=sys.stdout) as bar:
        for planned, result in finished_runs(plan, done, cfg.jobs, cfg.paired_with):
            record = labelled(planned.job, result)
            records.append(record)
            done.add(planned.key)
            bar.total += plan.add(followups(record))
            bar.update()
            bar.write(progress(record))
    return records


def finished_runs(plan: Plan, done: set, processes: int, paired_with: list):
    """Yield (planned, result) as each run ends, in a pool of `processes` workers ("spawn": each starts its own
    torch; 1: in this process); the runs read back first. A run starts once the runs it needs are `done`."""
    running: dict = {}
    pool = ProcessPoolExecutor(processes, mp_context=get_context("spawn")) if processes > 1 else InlineExecutor()
    with pool:
        while plan.read_back or plan.pending or running:
            if plan.read_back:
                yield plan.read_back.pop(0)
                continue
            ready = plan.ready(done, paired_with)
            if not ready and not running:
                raise RuntimeError(f"runs wait for runs never planned: {sorted(plan.pending)}")
            for planned in ready[:max(0, processes - len(running))]:
                del plan.pending[planned.key]
                running[pool.submit(plan.backend.train, planned.spec)] = planned
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                yield running.pop(future), future.result()

