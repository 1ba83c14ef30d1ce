"""AutoDecay against the schedules a transformer user would pick: a character-level GPT-2 trained with
AdamW through the Hugging Face `Trainer` on the Python standard library's sources.

    OMP_NUM_THREADS=1 python recipes/lm_benchmark.py --config recipes/configs/lm_benchmark.yaml \
        [--seeds 0 1 2] [--schedules autodecay cosine wsd ...] [--jobs 2] [--key value]

Every schedule in `schedules` (see `PEERS`) is trained for every seed on the same task and budget
(`budget_steps`); cosine and WSD also to `frontier_fractions` of it (the fixed-budget frontier), and the
schedule-free optimizer is evaluated at those budgets. WSD and StepDecay branch off the constant-LR trunk
(the `constant` peer; a checkpoint every `checkpoint_every` steps), so each costs only its cooldown.

AutoDecay is judged paired by seed: against the better of cosine and WSD trained to AutoDecay's own length
(the steps it used) on the same seed. Writes into `output_dir`: `results.json` (every run with its
evaluations and training-loss log, the table rows, the paired comparison, the acceptance checks),
`results.md` (the tables) and `pareto.png` (validation loss against steps, frontier lines).

`mode: finetune` (recipes/finetune_benchmark.py, recipes/configs/finetune_benchmark.yaml) is the second
domain, run by its own entry point on this machinery: the model is pre-trained once on the corpus, then
fine-tuned on English prose (`lm_task.read_finetune_text`) from those weights, evaluated every `eval_every`
steps on a validation split; each row is scored by the test loss of the model the user is handed, against
the cosine/WSD frontier at `frontier_fractions` of the budget: regret, waste and envelope deficit
(`lm_report.frontier_metrics`).
"""
import json
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional

from engine.config import load_config
from lm_report import acceptance, paired_rows, plot_pareto, table_rows, write_results
from lm_runs import LMTask, RunSpec, lr_multipliers, shared_prefix, train_run
from lm_task import TopicsSplit, read_corpus
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Peer:
    note: str  # why these settings, in one line
    settings: Callable  # (cfg, steps) -> RunSpec fields: trainer overrides, autodecay kwargs, milestones
    # "budget": one run to the budget; "frontier": one run per frontier budget; "evaluated": one run to the
    # budget, evaluated at every frontier budget
    lengths: str = "budget"
    source: str = "scratch"  # "scratch", "trunk" (the constant-LR run others branch from) or "branch"
    paired: bool = False  # judged against the frontier at its own length


def _wsd(cfg: "LMBenchmarkConfig", steps: int) -> dict:
    kwargs = {"num_decay_steps": round(cfg.wsd_decay_fraction * steps), "decay_type": cfg.wsd_decay_type}
    return {"trainer": {"lr_scheduler_type": "warmup_stable_decay", "lr_scheduler_kwargs": kwargs}}


PEERS = {
    "autodecay": Peer("the project's defaults on the Trainer's constant_with_warmup, as its docs pair them, given "
                      "only the run's shape by the Trainer: the stable phase ends on a plateau (or at its budget "
                      "share), then a WSD-style 1-sqrt cooldown",
                      lambda cfg, steps: {"autodecay": {}}, paired=True),
    "autodecay_step": Peer("the same with the paper's step shape: x0.1 at each detected stage end, 3 stages",
                           lambda cfg, steps: {"autodecay": {"decay_shape": "step"}}, paired=True),
    "cosine": Peer("the Trainer's cosine to 0 at the budget, same warmup: the common no-tuning choice",
                   lambda cfg, steps: {"trainer": {"lr_scheduler_type": "cosine"}}, lengths="frontier"),
    "wsd": Peer("the Trainer's warmup_stable_decay, 1-sqrt cooldown over the last 20%: current LM practice "
                "(Hägele et al. 2024: matches cosine)", _wsd, lengths="frontier", source="branch"),
    "step": Peer("the baseline AutoDecay replaces: x0.1 at 1/3 and 2/3 of the budget (ImageNet's 30/60/90)",
                 lambda cfg, steps: {"milestones": tuple(cfg.step_milestones), "decay_rate": cfg.decay_rate},
                 source="branch"),
    "constant": Peer("constant_with_warmup, no decay: AutoDecay's first stage run to the budget",
                     lambda cfg, steps: {}, source="trunk"),
    "schedulefree": Peer("the Trainer's optim='schedule_free_adamw' (its own warmup, constant schedule), the "
                         "same lr (the low end of its README's 1x-10x): no budget to pick; evaluated in eval mode",
                         lambda cfg, steps: {"trainer": {"optim": "schedule_free_adamw",
                                                         "lr_scheduler_type": "constant"}},
                         lengths="evaluated"),
}
SCRATCH_PEERS = tuple(PEERS)  # the LM benchmark's (mode: scratch); the fine-tuning peers follow


def _evaluated(cfg: "LMBenchmarkConfig", best: bool = True, **trainer) -> dict:
    """Trainer settings: an evaluation on the validation split every `eval_every` steps; with `best`, a
    checkpoint at each and the best one's model handed back at the end (load_best_model_at_end)."""
    settings = {"eval_strategy": "steps", "eval_steps": cfg.eval_every, **trainer}
    if best:
        settings.update(save_strategy="steps", save_steps=cfg.eval_every, save_total_limit=2,
                        metric_for_best_model="loss", load_best_model_at_end=True)
    return {"trainer": settings}


PEERS.update({
    "autodecay_eval": Peer("AutoDecayCallback() with evaluations as its docs pair them (eval_strategy='steps', "
                           "metric_for_best_model='loss', load_best_model_at_end=True): the validation loss also "
                           "ends the stable phase; the best checkpoint is handed back",
                           lambda cfg, steps: {"autodecay": {}, **_evaluated(cfg)}),
    "autodecay_loss": Peer("the same TrainingArguments with AutoDecayCallback(eval_signal=False): the training loss "
                           "alone ends the stable phase; the best checkpoint is handed back",
                           lambda cfg, steps: {"autodecay": {"eval_signal": False}, **_evaluated(cfg)}),
    "linear": Peer("the Trainer's default schedule (linear to 0 at the budget, same warmup), evaluated but the final "
                   "model handed back: a user who sets nothing",
                   lambda cfg, steps: _evaluated(cfg, best=False, lr_scheduler_type="linear")),
    "linear_es": Peer("linear + EarlyStoppingCallback(early_stopping_patience) + load_best_model_at_end: the "
                      "Trainer's own answer to overfitting",
                      lambda cfg, steps: {**_evaluated(cfg, lr_scheduler_type="linear"),
                                          "early_stopping": cfg.early_stopping_patience}),
    "greedy": Peer("the Trainer's lr_scheduler_type='greedy' (GreedyLR: x factor after `patience` evaluations "
                   "without a new best, / factor after as many with; no warmup), greedy_kwargs, final model",
                   lambda cfg, steps: _evaluated(cfg, best=False, lr_scheduler_type="greedy",
                                                 lr_scheduler_kwargs=cfg.greedy_kwargs, metric_for_best_model="loss")),
})


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class LMBenchmarkConfig:
    """The task (pinned), the comparison, and how many runs at once."""

    mode: str = field(default="scratch", metadata={"choices": ("scratch", "finetune")})
    files: list[str] = field(default_factory=list)  # the corpus: modules of corpus_dir, in this order
    corpus_sha256: str = ""
    corpus_dir: str = ""  # empty: this Python's standard-library folder
    validation_chars: int = 204_800
    validation_block: int = 4096
    validation_every: int = 16
    context: int = 64
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 40
    budget_steps: int = 2000
    logging_steps: int = 10
    frontier_fractions: list[float] = field(default_factory=lambda: [0.4, 0.6, 0.8, 1.0])
    wsd_decay_fraction: float = 0.2
    wsd_decay_type: str = field(default="1-sqrt", metadata={"choices": ("1-sqrt", "linear", "cosine")})
    step_milestones: list[int] = field(default_factory=lambda: [667, 1333])
    decay_rate: float = 0.1
    schedules: list[str] = field(default_factory=lambda: list(SCRATCH_PEERS), metadata={"choices": tuple(PEERS)})
    frontier: list[str] = field(default_factory=lambda: ["cosine", "wsd"], metadata={"choices": tuple(PEERS)})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    checkpoint_every: int = 80
    keep_checkpoints: bool = False
    reuse_runs: bool = False  # take a run's result from its folder when an earlier invocation made it
    max_paired_deficit: float = 0.01  # nats per character: the acceptance threshold
    jobs: int = 2
    output_dir: str = "runs/lm_benchmark"
    # mode: finetune. The corpus and model keys above describe the pre-training; lr, warmup_steps and
    # budget_steps the fine-tuning
    finetune_sha256: str = ""  # pins pydoc_data.topics' text
    finetune_block: int = 1024
    finetune_every: int = 5  # in each group of blocks: the last is test, the one before validation
    finetune_train_chars: int = 98_304
    finetune_validation_chars: int = 32_768
    finetune_test_chars: int = 32_768
    pretrain_schedule: str = field(default="cosine", metadata={"choices": ("cosine", "wsd")})
    pretrain_steps: int = 2000
    pretrain_lr: float = 2e-3
    pretrain_warmup_steps: int = 40
    eval_every: int = 50  # evaluations on the validation split
    early_stopping_patience: int = 3
    greedy_kwargs: dict = field(default_factory=dict)  # GreedyLR's arguments (lr_scheduler_kwargs)
    waste_tolerance: float = 0.01  # nats: "as good as the best fixed length", for waste
    max_envelope_deficit: float = 0.01  # nats: the acceptance threshold
    docs_figure: str = ""  # where to copy pareto.png too ("": nowhere)


def check_config(cfg: LMBenchmarkConfig) -> None:
    """What the keys' types do not say; raises ValueError naming the key."""
    if not cfg.files or not cfg.corpus_sha256:
        raise ValueError("files and corpus_sha256 pin the corpus: give both (recipes/configs/lm_benchmark.yaml)")
    if not all(0 < f <= 1 for f in cfg.frontier_fractions):
        raise ValueError(f"frontier_fractions must lie in (0, 1], got {cfg.frontier_fractions}")
    if not 0 < cfg.warmup_steps < min(frontier_budgets(cfg)):
        raise ValueError(f"warmup_steps={cfg.warmup_steps} must be positive and below every frontier budget")
    if cfg.mode == "finetune":
        if not cfg.finetune_sha256:
            raise ValueError("finetune_sha256 pins the fine-tuning text: give it (recipes/configs/"
                             "finetune_benchmark.yaml)")
        if cfg.eval_every < 1 or not 0 < cfg.pretrain_warmup_steps < cfg.pretrain_steps:
            raise ValueError(f"eval_every={cfg.eval_every} must be positive and pretrain_warmup_steps="
                             f"{cfg.pretrain_warmup_steps} in (0, pretrain_steps={cfg.pretrain_steps})")


def task_of(cfg: LMBenchmarkConfig) -> LMTask:
    """What every run shares; fine-tuning: the text's splits and the pre-trained model's folder too."""
    values = {f.name: getattr(cfg, f.name) for f in fields(LMTask) if hasattr(cfg, f.name)}
    task = LMTask(**{**values, "files": tuple(cfg.files)})
    if cfg.mode != "finetune":
        return task
    split = TopicsSplit(cfg.finetune_sha256, cfg.finetune_block, cfg.finetune_every, cfg.finetune_train_chars,
                        cfg.finetune_validation_chars, cfg.finetune_test_chars)
    return replace(task, finetune=split, init_from=str(pretrained_dir(cfg)))


def pretrained_dir(cfg: LMBenchmarkConfig) -> Path:
    return Path(cfg.output_dir) / "pretrained"


def score_key(cfg: LMBenchmarkConfig) -> str:
    """What a run is judged by: the validation loss from scratch, the handed model's test loss fine-tuning."""
    return "test_loss" if cfg.mode == "finetune" else "val_loss"


def frontier_budgets(cfg: LMBenchmarkConfig) -> list[int]:
    return sorted({round(f * cfg.budget_steps) for f in cfg.frontier_fractions})


# ----------------------------------------------------------------------------------------------
# The plan: which runs, in which order
# ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    spec: RunSpec
    needs: tuple = ()  # keys of the jobs that must finish first (the trunk)
    cost: int = 0  # steps to train: longest first

    @property
    def key(self) -> tuple:
        return (self.spec.seed, self.spec.label)


def trunk_dir(cfg: LMBenchmarkConfig, seed: int) -> Path:
    return Path(cfg.output_dir) / "runs" / f"seed{seed}" / "constant"


def make_job(cfg: LMBenchmarkConfig, name: str, seed: int, steps: int, evaluate_at: tuple = ()) -> Job:
    """The run of schedule `name` to `steps` on `seed`; a branch resumes from the trunk's latest checkpoint
    at or before the last step its schedule shares with the trunk's."""
    peer, task = PEERS[name], task_of(cfg)
    label = name if peer.lengths != "frontier" else f"{name}@{steps}"
    spec = RunSpec(peer=name, seed=seed, max_steps=steps, label=label, evaluate_at=evaluate_at,
                   output_dir=str(Path(cfg.output_dir) / "runs" / f"seed{seed}" / label), **peer.settings(cfg, steps))
    if peer.source == "trunk":
        return Job(RunSpec(**{**asdict(spec), "save_every": cfg.checkpoint_every}), cost=steps)
    if peer.source != "branch":
        return Job(spec, cost=steps)
    trunk = RunSpec(peer="constant", seed=seed, max_steps=cfg.budget_steps, output_dir="")
    shared = shared_prefix(lr_multipliers(spec, task), lr_multipliers(trunk, task))
    start = shared // cfg.checkpoint_every * cfg.checkpoint_every
    if start == 0:
        return Job(spec, cost=steps)
    resume = str(trunk_dir(cfg, seed) / f"checkpoint-{start}")
    return Job(RunSpec(**{**asdict(spec), "resume_from": resume}), needs=((seed, "constant"),), cost=steps - start)


def initial_jobs(cfg: LMBenchmarkConfig) -> list[Job]:
    budgets = frontier_budgets(cfg)
    needs_trunk = any(PEERS[name].source != "scratch" for name in cfg.schedules + cfg.frontier)
    jobs = []
    for seed in cfg.seeds:
        for name in cfg.schedules:
            peer = PEERS[name]
            if peer.lengths == "frontier":
                jobs += [make_job(cfg, name, seed, steps) for steps in budgets]
            elif peer.lengths == "evaluated":
                jobs.append(make_job(cfg, name, seed, cfg.budget_steps, evaluate_at=tuple(budgets)))
            elif peer.source != "trunk":
                jobs.append(make_job(cfg, name, seed, cfg.budget_steps))
        if needs_trunk:
            jobs.append(make_job(cfg, "constant", seed, cfg.budget_steps))
    return jobs


def paired_jobs(cfg: LMBenchmarkConfig, result: dict) -> list[Job]:
    """After a paired run (AutoDecay) ends: the frontier schedules trained to its own length."""
    if not PEERS[result["peer"]].paired:
        return []
    return [make_job(cfg, name, result["seed"], result["steps"]) for name in cfg.frontier]


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


def run_jobs(task: LMTask, jobs: list[Job], followups: Callable, processes: int, saved: Callable):
    """Yield (job, result, jobs added) as each job finishes, in a pool of `processes` workers ("spawn":
    each starts its own torch; 1: in this process). A job starts once the jobs it needs are done: seed by
    seed (a seed's numbers are complete early), paired runs first (their followups depend on them), then
    longest first. `saved(job)` may give its result
    without training; `followups(result)` may add jobs (one whose key is already planned is skipped)."""
    pending = {job.key: job for job in jobs}
    planned, done, running = set(pending), set(), {}
    pool = ProcessPoolExecutor(processes, mp_context=get_context("spawn")) if processes > 1 else InlineExecutor()
    with pool:
        while pending or running:
            ready = sorted((j for j in pending.values() if set(j.needs) <= done),
                           key=lambda j: (j.spec.seed, not PEERS[j.spec.peer].paired, -j.cost))
            if not ready and not running:
                raise RuntimeError(f"jobs wait for jobs never planned: {sorted(pending)}")
            for job in ready:
                result = saved(job)
                if result is None and len(running) >= processes:
                    continue
                del pending[job.key]
                future = Future() if result is not None else pool.submit(train_run, task, job.spec)
                if result is not None:
                    future.set_result(result)
                running[future] = job
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                result = future.result()
                done.add(job.key)
                new = [j for j in followups(result) if j.key not in planned]
                planned.update(j.key for j in new)
                pending.update((j.key, j) for j in new)
                yield job, result, len(new)


def saved_result(job: Job, task: LMTask) -> Optional[dict]:
    """The result an earlier invocation saved for the same task and run (`reuse_runs`), or None. The trunk
    counts only with all its checkpoints: branches planned later need them."""
    path = Path(job.spec.output_dir) / "result.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("spec") != _as_json(job.spec) or saved.get("task") != _as_json(task):
        return None
    every = job.spec.save_every
    if every and not all((Path(job.spec.output_dir) / f"checkpoint-{step}").is_dir()
                         for step in range(every, job.spec.max_steps + 1, every)):
        return None
    return saved["result"]


def _as_json(record) -> dict:
    return json.loads(json.dumps(asdict(record)))


def train_all(cfg: LMBenchmarkConfig) -> list[dict]:
    """Every run of the benchmark, with progress: a bar over the runs and a line per finished run. Each
    result is also saved in its run's folder (result.json)."""
    task, results = task_of(cfg), []
    lookup = (lambda job: saved_result(job, task)) if cfg.reuse_runs else (lambda job: None)
    jobs = initial_jobs(cfg)
    with tqdm(total=len(jobs), desc="lm_benchmark runs", unit="run", file=sys.stdout) as bar:
        for job, result, added in run_jobs(task, jobs, lambda r: paired_jobs(cfg, r), cfg.jobs, lookup):
            results.append(result)
            folder = Path(job.spec.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            record = {"spec": _as_json(job.spec), "task": _as_json(task), "result": result}
            (folder / "result.json").write_text(json.dumps(record) + "\n")
            bar.total += added
            bar.update()
            score = score_key(cfg)
            bar.write(f"seed {result['seed']} {result['label']}: {score.replace('_', ' ')} {result[score]:.4f} "
                      f"nats/char at step {result['steps']} ({result['wall_seconds']:.0f} s)")
    if not cfg.keep_checkpoints:
        for seed in cfg.seeds:
            for folder in trunk_dir(cfg, seed).glob("checkpoint-*"):
                shutil.rmtree(folder)
    return results


def main(argv=None) -> dict:
    cfg = load_config(LMBenchmarkConfig, argv, description=__doc__)
    started = time.perf_counter()
    try:  # the settings and the pinned corpus, checked before any run starts
        if cfg.mode != "scratch":
            raise ValueError(f"mode={cfg.mode}: run recipes/finetune_benchmark.py with this config")
        check_config(cfg)
        read_corpus(cfg.corpus_dir, cfg.files, cfg.corpus_sha256, cfg.validation_chars, cfg.validation_block,
                    cfg.validation_every)
    except ValueError as error:  # CorpusError included
        sys.exit(f"lm_benchmark: error: {error}")
    results = train_all(cfg)
    budgets = frontier_budgets(cfg)
    rows = table_rows(results, cfg.schedules, budgets, cfg.budget_steps)
    paired = paired_rows(results, [name for name in cfg.schedules if PEERS[name].paired], cfg.frontier,
                         cfg.budget_steps)
    checks = acceptance(results, paired, cfg.budget_steps, cfg.max_paired_deficit)
    summary = {"config": asdict(cfg), "peers": {name: PEERS[name].note for name in cfg.schedules},
               "rows": rows, "paired": paired, "acceptance": checks, "runs": results,
               "wall_seconds": time.perf_counter() - started,
               "cpu_seconds": sum(run["cpu_seconds"] for run in results)}
    output = Path(cfg.output_dir)
    table = write_results(output, summary)
    plot_pareto(results, cfg.schedules, cfg.frontier, budgets, output / "pareto.png")
    print(table)
    return summary


if __name__ == "__main__":
    main()
