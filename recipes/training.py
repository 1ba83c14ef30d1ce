"""The training loop shared by the recipes: config, data, model, LR schedules and one run.

A recipe builds a `TrainConfig` with `load_config` (a YAML file plus `--key value` overrides) and
calls `train_run(cfg, accelerator)`. That trains with SGD under the schedule named in the config,
evaluates after every epoch and writes `metrics.jsonl` and `summary.json` into `cfg.output_dir`.

Tasks and models are looked up by name in `TASKS` and `MODELS`; today they hold the project's
reference benchmark (MNIST-1D and its 92k-parameter CNN), and hub datasets and timm models plug in
there.
"""
import argparse
import dataclasses
import functools
import json
import math
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from mnist1d.data import get_dataset_args, make_dataset
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR, ReduceLROnPlateau
from tqdm.auto import tqdm

from timm_autodecay import AutoDecayLR


# ----------------------------------------------------------------------------------------------
# Data and models
# ----------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    """A classification task held in memory as tensors."""

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    num_classes: int


@functools.cache
def make_mnist1d(num_samples: int, seed: int) -> TaskData:
    """MNIST-1D generated offline (80/20 split), signals shaped (N, 1, 40). Cached because a worker
    process trains several runs on the same data."""
    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    data = make_dataset(args)

    def signals(array):
        return torch.tensor(array, dtype=torch.float32).unsqueeze(1)

    return TaskData(
        signals(data["x"]), torch.tensor(data["y"]), signals(data["x_test"]), torch.tensor(data["y_test"]), 10
    )


def mnist1d_cnn(num_classes: int) -> nn.Module:
    """The reference benchmark's 1-D CNN (92k parameters): three conv-BN-ReLU blocks, two linears."""

    def conv_block(in_channels, out_channels, kernel_size, stride):
        conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
        return [conv, nn.BatchNorm1d(out_channels), nn.ReLU()]

    return nn.Sequential(
        *conv_block(1, 16, 5, 1),
        *conv_block(16, 32, 5, 2),
        *conv_block(32, 64, 3, 2),
        nn.Flatten(),
        nn.Linear(64 * 10, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


TASKS = {"mnist1d": lambda cfg: make_mnist1d(cfg.num_samples, cfg.data_seed)}
MODELS = {"mnist1d_cnn": mnist1d_cnn}
SCHEDULES = ("step", "cosine", "plateau", "autodecay")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """One training run. Every field can be set in the YAML file or with `--key value`."""

    task: str = field(default="mnist1d", metadata={"choices": tuple(TASKS)})
    num_samples: int = 10000  # size of a generated task (train + test)
    data_seed: int = 42  # seed of a generated task; fixed so that runs differ only by `seed`
    model: str = field(default="mnist1d_cnn", metadata={"choices": tuple(MODELS)})
    epochs: int = 30  # the budget
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = field(default="step", metadata={"choices": SCHEDULES})
    decay_rate: float = 0.1  # LR multiplier at each decay (step, plateau, autodecay)
    milestones: list[int] = field(default_factory=lambda: [10, 20])  # step: epochs at which to decay
    patience: int = 10  # plateau: epochs without improvement of the training loss before a decay
    num_stages: int = 3  # autodecay: the run ends when the last stage has ended
    seed: int = 0  # model init and data order
    output_dir: str = "runs/train"
    verbose: bool = True  # progress bar and messages (on the main process)


class ConfigError(ValueError):
    """A config key or value that is not valid; the message names both."""


def _bool_from_string(text: str) -> bool:
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


_FROM_STRING = {int: int, float: float, bool: _bool_from_string}


def _convert(key: str, kind: type, value, choices):
    """`value` (a command-line string or a YAML value) as a `kind`, checked against `choices`."""
    try:
        if isinstance(value, str) and kind is not str:
            value = _FROM_STRING[kind](value)
        if kind is float and type(value) is int:
            value = float(value)
    except ValueError:
        pass  # reported below, with the key
    if type(value) is not kind:
        raise ConfigError(f"{key}: invalid value {value!r} (expected {kind.__name__})")
    if choices and value not in choices:
        raise ConfigError(f"{key}: invalid value {value!r} (choose from {', '.join(map(str, choices))})")
    return value


def config_from_dict(config_class: type, values: dict):
    """Build `config_class` from `values`, converting and checking every key against its field."""
    config_fields = {f.name: f for f in dataclasses.fields(config_class)}
    types = typing.get_type_hints(config_class)
    kwargs = {}
    for key, value in values.items():
        if key not in config_fields:
            raise ConfigError(f"unknown config key {key!r}")
        choices = config_fields[key].metadata.get("choices")
        kind = types[key]
        if typing.get_origin(kind) is list:
            (item_kind,) = typing.get_args(kind)
            items = value if isinstance(value, list) else [value]
            kwargs[key] = [_convert(key, item_kind, item, choices) for item in items]
        elif isinstance(value, list):
            raise ConfigError(f"{key}: invalid value {value!r} (expected one {kind.__name__})")
        else:
            kwargs[key] = _convert(key, kind, value, choices)
    return config_class(**kwargs)


def _parse_overrides(tokens: list[str]) -> dict:
    """`--key value [value ...]` and `--key=value` tokens as {key: value or list of values}."""
    overrides, key = {}, None
    for token in tokens:
        if token.startswith("--"):
            key, _, value = token[2:].partition("=")
            key = key.replace("-", "_")
            overrides[key] = [value] if value else []
        elif key is None:
            raise ConfigError(f"unexpected argument {token!r} (overrides are --key value)")
        else:
            overrides[key].append(token)
    for key, values in overrides.items():
        if not values:
            raise ConfigError(f"{key}: missing value")
        overrides[key] = values[0] if len(values) == 1 else values
    return overrides


def load_config(config_class: type = TrainConfig, argv=None, description: str = None):
    """Parse `--config FILE.yaml` and `--key value` overrides into `config_class`; a bad key or value
    ends the program with a message naming it."""
    keys = ", ".join(f.name for f in dataclasses.fields(config_class))
    parser = argparse.ArgumentParser(
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Any config key can be overridden with --key value: {keys}.",
    )
    parser.add_argument("--config", help="YAML file of config keys")
    args, override_tokens = parser.parse_known_args(argv)
    values = {}
    if args.config:
        values = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(values, dict):
            parser.error(f"{args.config}: expected a mapping of config keys")
    try:
        values.update(_parse_overrides(override_tokens))
        return config_from_dict(config_class, values)
    except ConfigError as error:
        parser.error(str(error))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def make_scheduler(cfg: TrainConfig, optimizer, updates_per_epoch: int):
    """The LR scheduler named by `cfg.schedule`. `plateau` is stepped with each epoch's mean training
    loss, `autodecay` with each update's loss, the others after every update."""
    total_updates = cfg.epochs * updates_per_epoch
    if cfg.schedule == "step":
        milestones = [epoch * updates_per_epoch for epoch in cfg.milestones]
        return MultiStepLR(optimizer, milestones, gamma=cfg.decay_rate)
    if cfg.schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=total_updates)
    if cfg.schedule == "plateau":
        return ReduceLROnPlateau(optimizer, factor=cfg.decay_rate, patience=cfg.patience)
    return AutoDecayLR(
        optimizer,
        decay_rate=cfg.decay_rate,
        num_stages=cfg.num_stages,
        updates_per_epoch=updates_per_epoch,
        total_updates=total_updates,
    )


def make_model_and_optimizer(cfg: TrainConfig, num_classes: int):
    """The model, initialised from `cfg.seed`, and its SGD optimizer."""
    torch.manual_seed(cfg.seed)
    model = MODELS[cfg.model](num_classes)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    return model, optimizer


def train_batches(inputs, targets, cfg: TrainConfig, epoch: int, accelerator: Accelerator):
    """The epoch's batches in the benchmark's order (a permutation seeded by seed and epoch; the last
    partial batch kept). Each process takes its slice of every batch, so the global batch stays
    `cfg.batch_size` however many processes run."""
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    for batch in order.split(cfg.batch_size):
        local = batch.tensor_split(accelerator.num_processes)[accelerator.process_index].to(inputs.device)
        yield inputs[local], targets[local]


@torch.no_grad()
def evaluate(model, inputs, targets, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (%) over the whole test set (read once)."""
    model.eval()
    loss_sum = torch.zeros((), device=inputs.device)
    correct = torch.zeros((), device=inputs.device, dtype=torch.long)
    for batch_inputs, batch_targets in zip(inputs.split(batch_size), targets.split(batch_size)):
        logits = model(batch_inputs)
        loss_sum += F.cross_entropy(logits, batch_targets, reduction="sum")
        correct += (logits.argmax(dim=1) == batch_targets).sum()
    return loss_sum.item() / len(targets), 100.0 * correct.item() / len(targets)


def train_run(cfg: TrainConfig, accelerator: Accelerator) -> dict:
    """Train one run, evaluating after every epoch; AutoDecay ends it right after the update at which
    its last stage ended. Writes `metrics.jsonl` (a line per epoch) and `summary.json` into
    `cfg.output_dir`, and returns the summary with the per-epoch lines under "curves"."""
    data = TASKS[cfg.task](cfg)
    model, optimizer = accelerator.prepare(*make_model_and_optimizer(cfg, data.num_classes))
    updates_per_epoch = math.ceil(len(data.train_targets) / cfg.batch_size)
    scheduler = make_scheduler(cfg, optimizer, updates_per_epoch)
    # Not passed to prepare(): an AcceleratedScheduler steps once per process per call.
    accelerator.register_for_checkpointing(scheduler)
    train_inputs, train_targets, test_inputs, test_targets = (
        tensor.to(accelerator.device)
        for tensor in (data.train_inputs, data.train_targets, data.test_inputs, data.test_targets)
    )

    output_dir = Path(cfg.output_dir)
    metrics_path = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")

    curves, decay_epochs, updates = [], [], 0
    lr_in_use = optimizer.param_groups[0]["lr"]
    finished = False
    run_start = time.perf_counter()
    show_progress = accelerator.is_local_main_process and cfg.verbose
    progress = tqdm(range(cfg.epochs), desc=f"{cfg.schedule} seed {cfg.seed}", disable=not show_progress)
    for epoch in progress:
        epoch_start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=accelerator.device)
        epoch_updates = 0
        for inputs, targets in train_batches(train_inputs, train_targets, cfg, epoch, accelerator):
            lr = optimizer.param_groups[0]["lr"]
            if lr < lr_in_use and cfg.schedule != "cosine":
                decay_epochs.append(updates / updates_per_epoch)  # a decay takes effect here
            lr_in_use = lr

            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            loss_sum += loss.detach()
            updates += 1
            epoch_updates += 1

            if cfg.schedule == "autodecay":
                scheduler.step(loss.detach())
                finished = scheduler.finished
                if finished:
                    break
            elif cfg.schedule != "plateau":
                scheduler.step()

        train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / epoch_updates
        if cfg.schedule == "plateau":
            scheduler.step(train_loss)
        test_loss, test_top1 = evaluate(model, test_inputs, test_targets, cfg.batch_size)
        record = {
            "epoch": updates / updates_per_epoch,
            "updates": updates,
            "lr": lr_in_use,  # of the epoch's last update
            "stage": len(decay_epochs),
            "train_loss": train_loss,
            "test_loss": test_loss,
            "test_top1": test_top1,
            "seconds": time.perf_counter() - epoch_start,
        }
        curves.append(record)
        if accelerator.is_main_process:
            with metrics_path.open("a") as metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
        progress.set_postfix(loss=f"{train_loss:.4f}", top1=f"{test_top1:.2f}", lr=f"{lr_in_use:.3g}")
        if finished:
            break
    progress.close()

    summary = {
        "schedule": cfg.schedule,
        "seed": cfg.seed,
        "test_top1": curves[-1]["test_top1"],
        "test_loss": curves[-1]["test_loss"],
        "epochs": updates / updates_per_epoch,
        "updates": updates,
        "decay_epochs": decay_epochs,
        "wall_seconds": time.perf_counter() - run_start,
        "config": dataclasses.asdict(cfg),
    }
    if cfg.schedule == "autodecay":
        summary["autodecay_history"] = scheduler.history
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.verbose:
        decays = ", ".join(f"{at:g}" for at in decay_epochs) or "none"
        accelerator.print(
            f"{cfg.schedule} seed {cfg.seed}: test top-1 {summary['test_top1']:.2f}% after "
            f"{summary['epochs']:g} epochs (decays at epoch {decays}), {summary['wall_seconds']:.0f} s, "
            f"written to {output_dir}"
        )
    return {**summary, "curves": curves}
