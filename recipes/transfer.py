"""The transfer study: are the models of later learning stages less transferable?

    accelerate launch recipes/transfer.py --config recipes/configs/transfer_offline.yaml [--key value]
    accelerate launch recipes/transfer.py --config recipes/configs/transfer.yaml \
        --source_runs runs/imagenet_resnet50_step runs/imagenet_resnet50_autodecay

Source: the stage-end checkpoints of training runs (`train_run`'s `stage_ends/stage{k}`, listed in each
run's summary.json: StepDecay's milestones or AutoDecay's transitions), either given as run folders in
`source_runs` or, with `train_source: true`, trained here first, one run per seed in `seeds`, with the
config's training keys (into `output_dir/source/seed{s}`).

For every source run, stage checkpoint (and, with `random_init: true`, a randomly initialised model as a
reference) and seed:
- `source_top1`: the checkpoint's top-1 on its own source test set;
- `linear_probe`: a multinomial logistic regression on the frozen features (the model without its
  classifier, eval mode, eval transforms): features standardised, L2 penalty `probe_l2`, fitted by
  full-batch L-BFGS for at most `probe_steps` iterations from zero (deterministic);
- `finetune`: every weight trained, a fresh classifier, `finetune_epochs` epochs of SGD at
  `finetune_lr` under the `finetune_schedule`, by the shared loop `train_run` (`init_from`).
Every stage gets the same settings. With runs given in `source_runs`, each is transferred with each
seed; with `train_source`, the run of seed s with seed s.

Targets (`targets`): a list of mappings, each a `name` and the config keys that describe its data
(`task`, `dataset`, `dataset_config`, `train_split`, `test_split`, `image_column`, `label_column`,
`num_classes`, `classes`, `train_subset`, `batch_size`, ...); keys not given are the config's own. The
model is always the source's.

Comparisons (engine/transfer_report.py): the source's top-1 at each stage end, checked to rise across the
stages (`source_check`); every earlier stage against the last, per target and method, paired by source run
and seed (a paired t-test and the smallest difference the design detects at `alpha` with `power`). The primary
comparison is named in advance (`primary_target`, `primary_method`: the first stage against the last); the
others are corrected for multiple comparisons (Holm).

Writes into `output_dir`: `summary.json` (`stages[k]`: the stage, its end epochs, source top-1 and, per
target and method, the target top-1 mean, sd, values and seeds; `random_init` likewise; `source_check`;
`comparisons`; `results`: one record per measurement), `transfer.md` (the tables), `transfer.png` (source
and transfer accuracy against stage) and the fine-tuning runs' folders (`finetune/TARGET/RUN/stageK/seedS`).
"""
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from engine.config import ConfigError, config_from_dict, load_config
from engine.evaluation import evaluate_all
from engine.loop import make_accelerator, train_run
from engine.models import extract_features, make_model_and_optimizer, model_from_checkpoint
from engine.tasks import make_task
from engine.train_config import TrainConfig

from engine.transfer_report import (
    comparisons, comparisons_table, plot_transfer, source_rises, summarise, transfer_table,
)

METHODS = ("linear_probe", "finetune")
# Keys a target may not set: the model is the source's, the budget the study's.
FIXED_KEYS = {"model", "pretrained", "init_from", "epochs", "lr", "schedule", "seed", "output_dir", "resume",
              "resume_from", "stop_after_epoch"}


@dataclass
class TransferConfig(TrainConfig):
    """The training keys (the source's, with `train_source`; every target's defaults) plus the study's."""

    output_dir: str = "runs/transfer"
    source_runs: list[str] = field(default_factory=list)  # train_run output folders (summary.json, stage_ends/)
    train_source: bool = False  # train the source here first: one run per seed, with the keys above
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    targets: list[dict] = field(default_factory=list)  # each {name: ..., task/dataset/label_column/...: ...}
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"choices": METHODS})
    random_init: bool = True  # also transfer a randomly initialised model (the reference "init")
    probe_l2: float = 1e-3  # linear probe: L2 penalty on the weights (mean loss + probe_l2/2 * |W|^2)
    probe_steps: int = 200  # linear probe: L-BFGS iterations at most
    finetune_epochs: int = 5
    finetune_lr: float = 0.01
    finetune_schedule: str = field(default="cosine", metadata={"choices": ("cosine", "constant", "step")})
    # the primary comparison, named before measuring: the first stage against the last, by this method on
    # this target ("": the first target); the other comparisons get Holm's correction
    primary_target: str = ""
    primary_method: str = field(default="linear_probe", metadata={"choices": METHODS})
    alpha: float = 0.05  # two-sided level of the paired tests
    power: float = 0.8  # for the smallest difference the design detects


# ----------------------------------------------------------------------------------------------
# Sources and targets
# ----------------------------------------------------------------------------------------------
def train_config(cfg: TransferConfig, **changes) -> TrainConfig:
    """The config's training keys as a TrainConfig, with `changes`."""
    shared = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}
    return replace(TrainConfig(**shared), **changes)


def source_stages(run_dir: str) -> tuple[TrainConfig, list[dict]]:
    """A source run's TrainConfig and its stage ends ({stage, epoch, path}); a missing run, summary or
    checkpoint is a ConfigError naming it."""
    folder = Path(run_dir)
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise ConfigError(f"source_runs: no summary.json in {run_dir!r} (a run folder written by train_run)")
    summary = json.loads(summary_path.read_text())
    known = {f.name for f in fields(TrainConfig)}
    run_cfg = config_from_dict(TrainConfig, {k: v for k, v in summary["config"].items() if k in known})
    stages = []
    for end in summary.get("stage_ends", []):
        path = folder / "stage_ends" / f"stage{end['stage']}"  # where train_run put it, wherever the run is now
        if not (path / "model.safetensors").is_file() and not (path / "pytorch_model.bin").is_file():
            raise ConfigError(f"source_runs: the stage {end['stage']} checkpoint of {run_dir!r} is missing: "
                              f"no model.safetensors in {str(path)!r}")
        stages.append({"stage": end["stage"], "epoch": end["epoch"], "path": str(path)})
    if not stages:
        raise ConfigError(f"source_runs: {run_dir!r} has no stage-end checkpoints (train with save_stage_ends: true)")
    return run_cfg, stages


def target_configs(cfg: TransferConfig) -> dict[str, TrainConfig]:
    """Each target's TrainConfig (the config's training keys, then the target's), by name."""
    if not cfg.targets:
        raise ConfigError("targets: needed (a list of {name: ..., and the data keys of each target})")
    targets = {}
    for index, target in enumerate(cfg.targets):
        target = dict(target)
        name = str(target.pop("name", target.get("dataset") or f"target{index}"))
        where = f"targets[{index}] ({name})"
        fixed = sorted(FIXED_KEYS & target.keys())
        if fixed:
            raise ConfigError(f"{where}: {', '.join(fixed)} cannot be set per target")
        if name in targets:
            raise ConfigError(f"{where}: a second target named {name!r}")
        try:
            targets[name] = config_from_dict(TrainConfig, {**asdict(train_config(cfg)), **target})
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from error
    return targets


def load_target(name: str, target_cfg: TrainConfig):
    """The target's data (checked: splits, image and label columns), errors naming the target."""
    try:
        return make_task(target_cfg)
    except ConfigError as error:
        raise ConfigError(f"targets ({name}): {error}") from error


# ----------------------------------------------------------------------------------------------
# The two transfer methods
# ----------------------------------------------------------------------------------------------
def linear_probe(features: dict, num_classes: int, l2: float, steps: int) -> float:
    """Top-1 (%) on the test features of a logistic regression fitted on the standardised training
    features by full-batch L-BFGS from zero (deterministic)."""
    train_x, train_y = features["train"]
    test_x, test_y = features["test"]
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = ((x.double() - mean) / std for x in (train_x, test_x))
    weight = torch.zeros(train_x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return 100.0 * ((test_x @ weight + bias).argmax(1) == test_y).double().mean().item()


def finetune(target_cfg: TrainConfig, cfg: TransferConfig, init_from: str, seed: int, output_dir: Path) -> float:
    """Top-1 (%) after fine-tuning every weight from `init_from` ("" : random init) on the target."""
    run_cfg = replace(
        target_cfg, init_from=init_from, seed=seed, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr,
        schedule=cfg.finetune_schedule, milestones=[max(1, cfg.finetune_epochs // 2)], output_dir=str(output_dir),
        save_stage_ends=False, checkpoint_every=0, resume=False, resume_from="", stop_after_epoch=0, verbose=False,
    )
    return train_run(run_cfg)["test_top1"]


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------
def source_jobs(cfg: TransferConfig, accelerator) -> list[tuple[str, int]]:
    """(source run folder, seed) pairs: the runs trained here first (`train_source`, one per seed), or every
    run of `source_runs` with every seed."""
    if cfg.train_source:
        jobs = []
        for seed in cfg.seeds:
            run_dir = Path(cfg.output_dir) / "source" / f"seed{seed}"
            summary = train_run(train_config(cfg, seed=seed, output_dir=str(run_dir), verbose=False))
            accelerator.print(f"source seed {seed}: {summary['test_top1']:.2f}% after {summary['epochs']:g} epochs, "
                              f"stage ends at epochs {[round(end['epoch'], 2) for end in summary['stage_ends']]}")
            jobs.append((str(run_dir), seed))
        return jobs
    if cfg.source_runs:
        return [(run_dir, seed) for run_dir in cfg.source_runs for seed in cfg.seeds]
    raise ConfigError("source_runs: needed (train_run output folders), or train_source: true")


def transfer_all(cfg: TransferConfig, jobs: list, targets: dict, target_data: dict, accelerator) -> list[dict]:
    """One record per (source run, seed, stage or random init, target, method) with its target top-1."""
    sources = {run_dir: source_stages(run_dir) for run_dir in dict.fromkeys(run for run, _ in jobs)}
    results = []
    for run_dir, seed in jobs:
        run_cfg, stages = sources[run_dir]
        source_task = make_task(run_cfg)
        checkpoints = [(stage["stage"], stage["epoch"], stage["path"]) for stage in stages]
        if cfg.random_init:
            checkpoints.append(("init", None, ""))
        for stage, epoch, path in checkpoints:
            if path:
                model = model_from_checkpoint(run_cfg, source_task.num_classes, path, "source_runs")
                model = model.to(accelerator.device)
                source_top1 = evaluate_all(model, source_task, run_cfg, accelerator)["test_top1"]
            else:
                init_cfg = replace(run_cfg, seed=seed, init_from="", pretrained=False)
                model, _ = make_model_and_optimizer(init_cfg, source_task.num_classes)
                source_top1 = None
            for name, target_cfg in targets.items():
                target_cfg = replace(target_cfg, model=run_cfg.model)
                record = {"source_run": run_dir, "seed": seed, "stage": stage, "epoch": epoch, "target": name,
                          "source_top1": source_top1}
                if "linear_probe" in cfg.methods:
                    features = extract_features(model, target_data[name], target_cfg, accelerator.device)
                    top1 = linear_probe(features, target_data[name].num_classes, cfg.probe_l2, cfg.probe_steps)
                    results.append({**record, "method": "linear_probe", "top1": top1})
                if "finetune" in cfg.methods:
                    in_list = run_dir in cfg.source_runs
                    run_name = f"run{cfg.source_runs.index(run_dir)}" if in_list else Path(run_dir).name
                    folder = Path(cfg.output_dir) / "finetune" / name / run_name / f"stage{stage}" / f"seed{seed}"
                    top1 = finetune(target_cfg, cfg, path, seed, folder)
                    results.append({**record, "method": "finetune", "top1": top1})
            latest = results[-len(targets) * len(cfg.methods):]
            shown = ", ".join(f"{r['target']} {r['method']} {r['top1']:.1f}" for r in latest)
            source_text = f"source {source_top1:.1f}%, " if source_top1 is not None else ""
            accelerator.print(f"{run_dir} stage {stage} seed {seed}: {source_text}{shown}")
    return results


def study(cfg: TransferConfig, accelerator) -> dict:
    """The whole study (see the module's docstring); returns the summary with `results` and `table`."""
    targets = target_configs(cfg)
    primary = (cfg.primary_target or next(iter(targets)), cfg.primary_method)
    if primary[0] not in targets or primary[1] not in cfg.methods:
        key = "primary_target" if primary[0] not in targets else "primary_method"
        raise ConfigError(f"{key}: invalid value {getattr(cfg, key)!r} (a target's name and one of methods: "
                          f"{', '.join(targets)}; {', '.join(cfg.methods)})")
    target_data = {name: load_target(name, target_cfg) for name, target_cfg in targets.items()}  # fail early
    results = transfer_all(cfg, source_jobs(cfg, accelerator), targets, target_data, accelerator)

    names, methods = list(targets), [m for m in METHODS if m in cfg.methods]
    summary = summarise(results, names, methods)
    summary["source_check"] = source_rises(summary)
    summary["comparisons"] = comparisons(results, names, methods, primary, cfg.alpha, cfg.power)
    table = transfer_table(summary, names, methods) + "\n\n" + comparisons_table(
        summary["comparisons"], summary["source_check"], cfg.alpha, cfg.power)
    if accelerator.is_main_process:
        output_dir = Path(cfg.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        document = {**summary, "results": results, "table": table, "config": asdict(cfg)}
        (output_dir / "summary.json").write_text(json.dumps(document, indent=1) + "\n")
        (output_dir / "transfer.md").write_text(table + "\n")
        plot_transfer(summary, names, methods, output_dir / "transfer.png")
    accelerator.print(table)
    accelerator.print(f"summary.json, transfer.md and transfer.png in {cfg.output_dir}")
    return {**summary, "results": results, "table": table}


def main(argv=None):
    cfg = load_config(TransferConfig, argv, description=__doc__)
    try:
        return study(cfg, make_accelerator(cfg))
    except ConfigError as error:  # a bad input (checkpoint, target, key): its name and why, no traceback
        raise SystemExit(f"transfer.py: error: {error}") from error


if __name__ == "__main__":
    main()
