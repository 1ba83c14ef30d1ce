"""The Trainer's benchmark back-end: a character-level GPT-2 trained from scratch with AdamW through the Hugging
Face `Trainer` on the Python standard library's sources (`lm_data.py`), one run per `lm_trainer.train_run`,
scored by the validation loss at its last step and measured in steps.

Each kind of peer is TrainingArguments overrides, an `AutoDecayCallback` or StepDecay's milestones (`KINDS`).
A peer evaluated during training is evaluated every `eval_every` steps and, unless `final_model`, handed back
as its best checkpoint (load_best_model_at_end), as the Trainer's docs pair them. WSD and StepDecay branch off
the constant-LR trunk (the `constant` peer, a checkpoint every `checkpoint_every` steps) where their learning
rates part (`lm_trainer.shared_prefix`), so each costs only what follows; a frontier run as long as a paired
run is that paired run. A run's result is kept in its folder (result.json) and read back only with the same
task and run (`reuse_runs`); the trunk only with all its checkpoints.
"""
import json
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..benchmark import Backend, BenchmarkKeys, peer_list
from ..config import ConfigError
from ..peers import PEERS, ScheduleSettings, chosen, settings
from ..report import Scale
from ..runner import Job, Planned
from .lm_data import read_corpus
from .lm_trainer import LMTask, RunSpec, lr_multipliers, shared_prefix, train_run


def autodecay(peer, s: dict, cfg, steps: int) -> dict:
    """AutoDecayCallback with the config's settings; evaluated without reading it: its evaluation signal off."""
    off = {"eval_signal": False} if peer.evaluated and not peer.reads_eval else {}
    return {"autodecay": {**chosen(s, "decay_rate", "num_stages", "decay_shape"), **off}}


def wsd(peer, s: dict, cfg, steps: int) -> dict:
    kwargs = {"num_decay_steps": round(cfg.wsd_decay_fraction * steps), "decay_type": cfg.wsd_decay_type}
    return {"trainer": {"lr_scheduler_type": "warmup_stable_decay", "lr_scheduler_kwargs": kwargs}}


KINDS = {  # (peer, its settings, cfg, steps) -> RunSpec fields
    "constant": lambda peer, s, cfg, steps: {},
    "autodecay": autodecay,
    "cosine": lambda peer, s, cfg, steps: {"trainer": {"lr_scheduler_type": "cosine"}},
    "wsd": wsd,
    "step": lambda peer, s, cfg, steps: {"milestones": tuple(cfg.step_milestones), "decay_rate": s["decay_rate"]},
    "schedulefree": lambda peer, s, cfg, steps: {"trainer": {"optim": "schedule_free_adamw",
                                                             "lr_scheduler_type": "constant"}},
    "linear": lambda peer, s, cfg, steps: {"trainer": {"lr_scheduler_type": "linear"},
                                           "early_stopping": cfg.early_stopping_patience if "early_stopping" in s
                                           else 0},
    "greedy": lambda peer, s, cfg, steps: {"trainer": {"lr_scheduler_type": "greedy", "metric_for_best_model": "loss",
                                                       "lr_scheduler_kwargs": cfg.greedy_kwargs}},
}
BRANCHES = ("wsd", "step")  # the kinds that branch off the constant-LR trunk


def run_settings(cfg, name: str, steps: int) -> dict:
    """The RunSpec fields of a run of peer `name` to `steps`: its kind's, and the evaluations it asks for."""
    peer = PEERS[name]
    values = KINDS[peer.kind](peer, settings(peer, cfg), cfg, steps)
    if peer.reads_eval or peer.evaluated:
        evaluation = {"eval_strategy": "steps", "eval_steps": cfg.eval_every}
        if not peer.final_model:
            evaluation.update(save_strategy="steps", save_steps=cfg.eval_every, save_total_limit=2,
                              metric_for_best_model="loss", load_best_model_at_end=True)
        values["trainer"] = {**evaluation, **values.get("trainer", {})}
    return values


@dataclass
class LMConfig(ScheduleSettings, BenchmarkKeys):
    """The task (pinned), the comparison, and how many runs at once."""

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
    schedules: list[str] = peer_list("lm", KINDS, ["autodecay", "cosine", "wsd", "step", "constant", "schedulefree"])
    frontier: list[str] = peer_list("lm", KINDS, ["cosine", "wsd"])  # the envelope; trained to paired lengths
    paired_with: list[str] = peer_list("lm", KINDS, ["autodecay", "autodecay_step"])
    wsd_decay_fraction: float = 0.2
    wsd_decay_type: str = field(default="1-sqrt", metadata={"choices": ("1-sqrt", "linear", "cosine")})
    step_milestones: list[int] = field(default_factory=lambda: [667, 1333])
    eval_every: int = 50  # steps between evaluations of the peers evaluated during training
    early_stopping_patience: int = 3  # linear_es: evaluations without a new best
    greedy_kwargs: dict = field(default_factory=dict)  # GreedyLR's arguments (lr_scheduler_kwargs)
    checkpoint_every: int = 80  # the constant-LR trunk's checkpoints, where WSD and StepDecay branch off (0: none)
    keep_checkpoints: bool = False
    max_paired_deficit: float = 0.01  # nats per character
    waste_tolerance: float = 0.01  # nats per character: "as good as the best fixed length", for waste
    output_dir: str = "runs/lm_benchmark"


class LM(Backend):
    DOMAIN, KINDS, Config = "lm", KINDS, LMConfig
    SCALE = Scale(score="val_loss", name="val_loss", higher_is_better=False,
                  title="validation loss (nats per character)", digits=4, length="steps", units="steps",
                  length_digits=0)

    def budget(self, cfg) -> int:
        return cfg.budget_steps

    def task_of(self, cfg) -> LMTask:
        """What every run shares: the corpus, the model, the optimiser's settings, the budget."""
        values = {f.name: getattr(cfg, f.name) for f in fields(LMTask) if hasattr(cfg, f.name)}
        return LMTask(**{**values, "files": tuple(cfg.files)})

    def check(self, cfg) -> None:
        """The settings, and the pinned corpus (a CorpusError names both checksums), before any run starts."""
        super().check(cfg)
        if not cfg.files or not cfg.corpus_sha256:
            raise ConfigError("files and corpus_sha256 pin the corpus: give both (recipes/configs/lm_benchmark.yaml)")
        if not 0 < cfg.warmup_steps < min(round(f * cfg.budget_steps) for f in cfg.frontier_fractions):
            raise ConfigError(f"warmup_steps={cfg.warmup_steps} must be positive and below every frontier budget")
        read_corpus(cfg.corpus_dir, cfg.files, cfg.corpus_sha256, cfg.validation_chars, cfg.validation_block,
                    cfg.validation_every)

    def plan(self, cfg, job: Job) -> list[Planned]:
        """The run of the job's peer to its length; a branch resumes from the trunk's latest checkpoint at or
        before the last step its schedule shares with the trunk's, and waits for the trunk."""
        task, steps = self.task_of(cfg), job.length or round(job.fraction * cfg.budget_steps)
        spec = RunSpec(peer=job.peer, seed=job.seed, max_steps=steps, label=job.label,
                       evaluate_at=tuple(round(f * cfg.budget_steps) for f in job.read_at),
                       output_dir=str(self.folder(cfg, job)), **run_settings(cfg, job.peer, steps))
        key, kind = (job.task, job.peer, job.seed, steps), PEERS[job.peer].kind
        if kind == "constant" and steps == cfg.budget_steps:
            return [Planned(key, job, (task, replace(spec, save_every=cfg.checkpoint_every)), cost=steps)]
        if kind not in BRANCHES or not cfg.checkpoint_every:
            return [Planned(key, job, (task, spec), cost=steps)]
        (trunk,) = self.plan(cfg, Job("constant", job.seed, job.task))
        shared = shared_prefix(lr_multipliers(spec, task), lr_multipliers(trunk.spec[1], task))
        start = shared // cfg.checkpoint_every * cfg.checkpoint_every
        if start == 0:
            return [Planned(key, job, (task, spec), cost=steps)]
        branch = replace(spec, resume_from=str(Path(trunk.spec[1].output_dir) / f"checkpoint-{start}"))
        return [trunk, Planned(key, job, (task, branch), needs=(trunk.key,), cost=steps - start)]

    def saved(self, cfg, planned: Planned):
        return saved_result(*planned.spec)

    def train(self, spec) -> dict:
        """One run (in a pool worker, or in this process when jobs is 1), its result kept in its folder."""
        task, run = spec
        result = train_run(task, run)
        Path(run.output_dir).mkdir(parents=True, exist_ok=True)
        record = {"spec": as_json(run), "task": as_json(task), "result": result}
        (Path(run.output_dir) / "result.json").write_text(json.dumps(record) + "\n")
        return result

    def read_at(self, cfg, run: dict, fraction: float):
        """The run's validation loss at the step at `fraction` of the budget (it was evaluated there)."""
        step = round(fraction * cfg.budget_steps)
        evaluation = next((e for e in run["evals"] if e["step"] == step), None)
        return None if evaluation is None else {**run, "val_loss": evaluation["val_loss"], "steps": step}

    def finish(self, cfg, records: list[dict]) -> tuple[list[dict], dict]:
        """The trunk's checkpoints removed (unless `keep_checkpoints`): the branches have all ended."""
        if not cfg.keep_checkpoints:
            for task in self.tasks(cfg):
                for seed in set(cfg.seeds + cfg.baseline_seeds):
                    for folder in self.folder(cfg, Job("constant", seed, task)).glob("checkpoint-*"):
                        shutil.rmtree(folder)
        return records, {}

    def intro(self, cfg, runs: list[dict]) -> str:
        return (f"Validation loss in nats per character ({runs[0]['validation_predictions']:,} predictions), seeds "
                f"{cfg.seeds}; regret, waste and envelope deficit from the seed means.")

    def title(self, cfg, task: str) -> str:
        return "Character-level GPT-2 on the Python standard library: loss against steps"


def as_json(record) -> dict:
    return json.loads(json.dumps(asdict(record)))


def saved_result(task: LMTask, spec: RunSpec):
    """The result an earlier invocation kept for the same task and run, or None. The trunk counts only with
    all its checkpoints: branches planned later need them."""
    try:
        saved = json.loads((Path(spec.output_dir) / "result.json").read_text())
    except (OSError, ValueError):  # not run there, or not to its end
        return None
    if saved.get("spec") != as_json(spec) or saved.get("task") != as_json(task):
        return None
    every = spec.save_every
    if every and not all((Path(spec.output_dir) / f"checkpoint-{step}").is_dir()
                         for step in range(every, spec.max_steps + 1, every)):
        return None
    return saved["result"]
