"""The training loop shared by the recipes: config, data, model, LR schedules and one run.

A recipe builds a `TrainConfig` with `load_config` (a YAML file plus `--key value` overrides) and
calls `train_run(cfg, accelerator)`. That trains with SGD under the schedule named in the config,
evaluates after every epoch and writes `metrics.jsonl` and `summary.json` into `cfg.output_dir`.

Tasks and models are looked up by name in `TASKS` and `MODELS`: generated tasks held in memory
(MNIST-1D, the synthetic easy/complex-cue patterns of the mechanism study), image datasets read
through `datasets` (`hub`: a hub name or local path, `image_folder`: a folder of class sub-folders)
with timm's transforms, the built-in small CNNs, and any timm model by name (not pretrained unless
`pretrained: true`).

Engine: Accelerate (`mixed_precision`, any number of processes, `grad_accum_steps` micro-batches per
update, `full_batch` gradient descent over the whole training set), `save_state` into
`output_dir/checkpoint` every `checkpoint_every` epochs and into `output_dir/stage_ends/stage{k}` when
stage k (0-based, as `stage` in metrics.jsonl) ends, `resume`, and `log_with: tensorboard`.

Transfer (recipes/transfer.py): `classes` keeps a subset of a generated task's classes (two disjoint
subsets make a source/target pair), `train_subset` a prefix of its training set, `init_from` starts a
model from a checkpoint folder (a fresh classifier when the class count differs), and
`model_from_checkpoint` / `extract_features` give a stage checkpoint's model and its frozen features.
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import multiprocessing
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from mnist1d.data import get_dataset_args, make_dataset
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR, ReduceLROnPlateau
from torch.utils.data import DataLoader
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
    extra_tests: dict = field(default_factory=dict)  # name -> (inputs, targets): more test sets


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


@functools.cache
def make_mnist1d_noisy(num_samples: int, seed: int, fraction: float = 0.15) -> TaskData:
    """MNIST-1D with `fraction` of the train labels replaced by another class (uniformly, fixed by
    `seed`); test labels clean. A second task that shows learning stages."""
    data = make_mnist1d(num_samples, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    flipped = torch.rand(len(data.train_targets), generator=generator) < fraction
    shift = torch.randint(1, data.num_classes, (len(data.train_targets),), generator=generator)
    targets = torch.where(flipped, (data.train_targets + shift) % data.num_classes, data.train_targets)
    return dataclasses.replace(data, train_targets=targets)


# Synthetic easy/complex-cue task (the mechanism study) ------------------------------------------
PATTERN_SIZE, PATTERN_CELL = 16, 4  # 16x16 RGB images, a 4x4 grid of 4x4-pixel cells


def _stroke_kernels(cell: int) -> torch.Tensor:
    """Four small strokes, one per orientation (-, |, \\, /), each `cell` x `cell` pixels, zero mean."""
    kernels = torch.zeros(4, cell, cell)
    middle = cell // 2
    kernels[0, middle, :] = 1
    kernels[1, :, middle] = 1
    kernels[2] = torch.eye(cell)
    kernels[3] = torch.eye(cell).flip(1)
    return kernels - kernels.mean(dim=(1, 2), keepdim=True)


def _render_patterns(layouts, colours, noise: float, generator) -> torch.Tensor:
    """Images from per-sample stroke layouts (N, grid, grid) of orientation ids and colours (N, 3)."""
    strokes = _stroke_kernels(PATTERN_CELL)[layouts]  # (N, grid, grid, cell, cell)
    grid = PATTERN_SIZE // PATTERN_CELL
    texture = strokes.permute(0, 1, 3, 2, 4).reshape(len(layouts), grid * PATTERN_CELL, grid * PATTERN_CELL)
    images = 0.4 * texture.unsqueeze(1) + colours[:, :, None, None]  # faint strokes, strong colour
    return images + noise * torch.randn(images.shape, generator=generator)


@functools.cache
def make_synthetic_patterns(num_samples: int, seed: int, easy_fraction: float, noise: float) -> TaskData:
    """Ten classes of 16x16 RGB images, each carrying two cues of its class:

    - a *complex* cue in every sample: a fine, high-frequency arrangement of small strokes (a class's
      orientation for each of the 16 cells; a quarter of the cells redrawn at random per sample);
    - an *easy* cue in a fraction `easy_fraction` of the training samples: a uniform colour (coarse,
      zero frequency) proper to the class; the other samples get the colour of a random class.

    The test set (20% of `num_samples`) is drawn like the training set; `extra_tests` adds two subsets of
    the same size: `easy_only` (the class's colour, strokes of a random layout) and `complex_only` (the
    class's strokes, the colour of a random class).
    """
    generator = torch.Generator().manual_seed(seed)
    num_classes, grid = 10, PATTERN_SIZE // PATTERN_CELL
    class_layouts = torch.randint(0, 4, (num_classes, grid, grid), generator=generator)
    palette = torch.tensor([[r, g, b] for r in (-1, 0, 1) for g in (-1, 0, 1) for b in (-1, 0, 1)], dtype=torch.float32)
    palette = palette[palette.abs().sum(dim=1) > 0]  # no grey
    class_colours = 0.6 * palette[torch.randperm(len(palette), generator=generator)[:num_classes]]

    def draw(count: int, easy_fraction: float, complex_cue: bool):
        labels = torch.randint(0, num_classes, (count,), generator=generator)
        if complex_cue:
            layouts = class_layouts[labels].clone()
            redraw = torch.rand(layouts.shape, generator=generator) < 0.25
            layouts[redraw] = torch.randint(0, 4, (int(redraw.sum()),), generator=generator)
        else:
            layouts = torch.randint(0, 4, (count, grid, grid), generator=generator)
        random_classes = torch.randint(0, num_classes, (count,), generator=generator)
        easy = torch.rand(count, generator=generator) < easy_fraction
        colours = class_colours[torch.where(easy, labels, random_classes)]
        return _render_patterns(layouts, colours, noise, generator), labels

    num_test = num_samples // 5
    train_inputs, train_targets = draw(num_samples - num_test, easy_fraction, True)
    test_inputs, test_targets = draw(num_test, easy_fraction, True)
    extra_tests = {"easy_only": draw(num_test, 1.0, False), "complex_only": draw(num_test, 0.0, True)}
    return TaskData(train_inputs, train_targets, test_inputs, test_targets, num_classes, extra_tests)


def pattern_cnn(num_classes: int) -> nn.Module:
    """A small CNN for 16x16 RGB images (24k parameters): three conv-BN-ReLU blocks (the last two with
    stride 2), flatten (32x4x4, so positions are kept), one linear."""

    def conv_block(in_channels, out_channels, stride):
        conv = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        return [conv, nn.BatchNorm2d(out_channels), nn.ReLU()]

    return nn.Sequential(
        *conv_block(3, 16, 1), *conv_block(16, 32, 2), *conv_block(32, 32, 2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes),
    )


# Image datasets read through `datasets`, transformed by timm -------------------------------------
@dataclass
class ImageTask:
    """A task read through `datasets`: splits yielding {"inputs": image tensor, "targets": int}."""

    train: typing.Any  # datasets.Dataset, or datasets.IterableDataset when streaming
    test: typing.Any
    num_classes: int
    train_size: int
    streaming: bool = False


def image_transforms(cfg: "TrainConfig"):
    """timm's train and eval transforms for `cfg.model` (its default input size, mean and std; ImageNet's
    for the built-in models), at `cfg.image_size` pixels when set: random resized crop and flip for
    training, resize and centre crop for evaluation."""
    from timm.data import create_transform, resolve_data_config

    pretrained_cfg = timm.get_pretrained_cfg(cfg.model) if timm.is_model(cfg.model) else None
    args = {"input_size": (3, cfg.image_size, cfg.image_size)} if cfg.image_size else {}
    data_config = resolve_data_config(args, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else None)
    return create_transform(**data_config, is_training=True), create_transform(**data_config, is_training=False)


def _example_transform(transform, image_column: str, label_column: str):
    """A `datasets` transform turning a batch of examples into {"inputs", "targets"}."""

    def apply(batch):
        return {
            "inputs": [transform(image.convert("RGB")) for image in batch[image_column]],
            "targets": list(batch[label_column]),
        }

    return apply


def load_image_task(cfg: "TrainConfig", path: str, **load_kwargs) -> ImageTask:
    """The train and test splits of `datasets.load_dataset(path, ...)`, images through timm's transforms."""
    import datasets

    def load(split):
        try:
            return datasets.load_dataset(path, cfg.dataset_config or None, split=split, streaming=cfg.streaming, **load_kwargs)
        except ValueError as error:  # an unknown split names the split key
            key = "train_split" if split == cfg.train_split else "test_split"
            raise ConfigError(f"{key}: {error}") from error

    train, test = load(cfg.train_split), load(cfg.test_split)
    for key in ("image_column", "label_column"):
        if train.features is not None and getattr(cfg, key) not in train.features:
            raise ConfigError(f"{key}: no column {getattr(cfg, key)!r} in {path} (columns: {', '.join(train.features)})")
    num_classes = cfg.num_classes
    if not num_classes:
        label_feature = train.features[cfg.label_column] if train.features is not None else None
        if not isinstance(label_feature, datasets.ClassLabel):
            raise ConfigError(f"num_classes: needed, {cfg.label_column!r} is not a ClassLabel column")
        num_classes = label_feature.num_classes
    train_size = len(train) if not cfg.streaming else cfg.train_samples
    if not train_size:  # streaming without train_samples: the split's size from the dataset's info
        splits = train.info.splits or {}
        if cfg.train_split not in splits or not splits[cfg.train_split].num_examples:
            raise ConfigError("train_samples: needed when streaming (the dataset does not say its size)")
        train_size = splits[cfg.train_split].num_examples
    train_transform, test_transform = image_transforms(cfg)
    columns = (cfg.image_column, cfg.label_column)
    if cfg.streaming:
        drop = list(train.column_names or columns)  # keep only inputs and targets
        train = train.map(_example_transform(train_transform, *columns), batched=True, batch_size=16, remove_columns=drop or None)
        test = test.map(_example_transform(test_transform, *columns), batched=True, batch_size=16, remove_columns=drop or None)
    else:
        train.set_transform(_example_transform(train_transform, *columns))
        test.set_transform(_example_transform(test_transform, *columns))
    return ImageTask(train, test, num_classes, train_size, cfg.streaming)


def make_hub_task(cfg: "TrainConfig") -> ImageTask:
    """`cfg.dataset` from the hub (or a local path `load_dataset` reads), e.g. `imagenet-1k`."""
    if not cfg.dataset:
        raise ConfigError("dataset: needed for task hub (a hub name such as imagenet-1k, or a local path)")
    return load_image_task(cfg, cfg.dataset)


def make_image_folder_task(cfg: "TrainConfig") -> ImageTask:
    """A local folder `cfg.dataset` with one sub-folder per split and one per class inside it."""
    if not cfg.dataset or not Path(cfg.dataset).is_dir():
        raise ConfigError(f"dataset: {cfg.dataset!r} is not a folder (task image_folder)")
    return load_image_task(cfg, "imagefolder", data_dir=cfg.dataset)


TASKS = {
    "mnist1d": lambda cfg: make_mnist1d(cfg.num_samples, cfg.data_seed),
    "synthetic_patterns": lambda cfg: make_synthetic_patterns(
        cfg.num_samples, cfg.data_seed, cfg.easy_fraction, cfg.pattern_noise
    ),
    "hub": make_hub_task,
    "image_folder": make_image_folder_task,
    "mnist1d_noisy": lambda cfg: make_mnist1d_noisy(cfg.num_samples, cfg.data_seed),  # 15% train labels flipped
}
MODELS = {"mnist1d_cnn": mnist1d_cnn, "pattern_cnn": pattern_cnn}  # and any timm model by name
SCHEDULES = ("step", "multistep", "cosine", "plateau", "autodecay", "constant")  # step = multistep


def make_task(cfg: "TrainConfig"):
    """`TASKS[cfg.task]`, restricted to `cfg.classes` (relabelled 0..k-1 in that order) and to the first
    `cfg.train_subset` training samples when set (generated tasks only)."""
    task = TASKS[cfg.task](cfg)
    if not cfg.classes and not cfg.train_subset:
        return task
    if isinstance(task, ImageTask):
        key = "classes" if cfg.classes else "train_subset"
        raise ConfigError(f"{key}: only for generated tasks ({', '.join(k for k in TASKS if k not in ('hub', 'image_folder'))})")
    if cfg.classes:
        bad = [c for c in cfg.classes if not 0 <= c < task.num_classes] or sorted({c for c in cfg.classes if cfg.classes.count(c) > 1})
        if bad:
            raise ConfigError(f"classes: invalid value {bad} (distinct classes of 0..{task.num_classes - 1})")
        relabel = torch.full((task.num_classes,), -1, dtype=torch.long)
        relabel[cfg.classes] = torch.arange(len(cfg.classes))

        def keep(inputs, targets):
            mask = relabel[targets] >= 0
            return inputs[mask], relabel[targets[mask]]

        task = TaskData(*keep(task.train_inputs, task.train_targets), *keep(task.test_inputs, task.test_targets),
                        len(cfg.classes), {name: keep(*pair) for name, pair in task.extra_tests.items()})
    if cfg.train_subset:
        task = dataclasses.replace(task, train_inputs=task.train_inputs[: cfg.train_subset],
                                   train_targets=task.train_targets[: cfg.train_subset])
    return task


def _check_model(name: str):
    """None when `name` is a built-in model or a timm model, else why not."""
    if name in MODELS or timm.is_model(name):
        return None
    return f"choose from {', '.join(MODELS)} or a timm model name (timm.list_models())"


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """One training run. Every field can be set in the YAML file or with `--key value`."""

    task: str = field(default="mnist1d", metadata={"choices": tuple(TASKS)})
    num_samples: int = 10000  # size of a generated task (train + test)
    data_seed: int = 42  # seed of a generated task; fixed so that runs differ only by `seed`
    classes: list[int] = field(default_factory=list)  # generated tasks: keep these classes (relabelled 0..k-1)
    train_subset: int = 0  # generated tasks: keep the first this many training samples (0: all)
    model: str = field(default="mnist1d_cnn", metadata={"check": _check_model})  # MODELS or timm
    pretrained: bool = False  # timm models: start from pretrained weights (needs the Hub or its cache)
    init_from: str = ""  # start from the model weights of this save_state folder (a fresh classifier if sizes differ)
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
    # image data read through `datasets` (task hub: a hub name or local path; task image_folder: a folder)
    dataset: str = ""
    dataset_config: str = ""  # the dataset's configuration name, if it has several
    train_split: str = "train"
    test_split: str = "validation"
    image_column: str = "image"
    label_column: str = "label"
    num_classes: int = 0  # 0: from the label column (a ClassLabel)
    streaming: bool = False  # read the splits as streams instead of downloading them first
    train_samples: int = 0  # training split size, for the updates per epoch when streaming (0: from its info)
    shuffle_buffer: int = 10000  # streaming: examples in the shuffle buffer
    image_size: int = 0  # pixels of the model's input (0: the model's default, 224 for ResNet50)
    workers: int = 0  # DataLoader worker processes per training process
    eval_batch_size: int = 0  # 0: batch_size
    # the synthetic pattern task (mechanism study)
    easy_fraction: float = 0.5  # training samples carrying the easy cue (the colour of their class)
    pattern_noise: float = 0.5  # std of the pixel noise
    # engine
    mixed_precision: str = field(default="no", metadata={"choices": ("no", "fp16", "bf16")})  # no: as launched
    grad_accum_steps: int = 1  # micro-batches per process per update; batch_size stays the update's size
    full_batch: bool = False  # gradient descent: one update per epoch over the whole training set
    lr_reference_batch: int = 0  # >0: the LR used is lr * batch_size / lr_reference_batch
    checkpoint_every: int = 1  # save_state into output_dir/checkpoint every this many epochs (0: never)
    save_stage_ends: bool = True  # save_state into output_dir/stage_ends/stage{k} when stage k ends
    resume: bool = False  # continue from output_dir/checkpoint if there is one
    resume_from: str = ""  # continue from this checkpoint folder
    stop_after_epoch: int = 0  # end this invocation after this epoch (a preemption; resume later)
    log_with: str = field(default="none", metadata={"choices": ("none", "tensorboard")})  # Accelerate trackers
    output_dir: str = "runs/train"
    verbose: bool = True  # progress bar and messages (on the main process)


class ConfigError(ValueError):
    """A config key or value that is not valid; the message names both."""


def _bool_from_string(text: str) -> bool:
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


def _dict_from_string(text: str):
    """A mapping given on the command line in YAML flow style: `{key: value, ...}`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(text) from error


_FROM_STRING = {int: int, float: float, bool: _bool_from_string, dict: _dict_from_string}


def _convert(key: str, kind: type, value, choices, check=None):
    """`value` (a command-line string or a YAML value) as a `kind`, checked against `choices` and by
    `check` (a function returning why a value is bad, or None). A bool key given without a value (a
    flag such as `--resume`) is true."""
    if value is None:
        if kind is bool:
            return True
        raise ConfigError(f"{key}: missing value")
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
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"{key}: invalid value {value!r} ({problem})")
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
        check = config_fields[key].metadata.get("check")
        kind = types[key]
        if typing.get_origin(kind) is list:
            (item_kind,) = typing.get_args(kind)
            items = value if isinstance(value, list) else [value]
            kwargs[key] = [_convert(key, item_kind, item, choices, check) for item in items]
        elif isinstance(value, list):
            raise ConfigError(f"{key}: invalid value {value!r} (expected one {kind.__name__})")
        else:
            kwargs[key] = _convert(key, kind, value, choices, check)
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
    for key, values in overrides.items():  # no value: None, a flag (true) for bool keys
        overrides[key] = (values[0] if len(values) == 1 else values) if values else None
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
def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator a recipe's config asks for: `mixed_precision` ("no" leaves the launcher's
    choice) and `log_with` trackers (their files under each run's output folder)."""
    kwargs = {}
    if "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        kwargs["cpu"] = True  # torchrun on CPUs: Accelerate's gloo data-parallel (accelerate launch sets this itself)
    if cfg.mixed_precision != "no":
        kwargs["mixed_precision"] = cfg.mixed_precision
    if cfg.log_with != "none":
        kwargs.update(log_with=cfg.log_with, project_dir=cfg.output_dir)
    return Accelerator(**kwargs)


def make_scheduler(cfg: TrainConfig, optimizer, updates_per_epoch: int):
    """The LR scheduler named by `cfg.schedule`. `plateau` is stepped with each epoch's mean training
    loss, `autodecay` with each update's loss, the others after every update."""
    total_updates = cfg.epochs * updates_per_epoch
    if cfg.schedule in ("step", "multistep"):
        milestones = [epoch * updates_per_epoch for epoch in cfg.milestones]
        return MultiStepLR(optimizer, milestones, gamma=cfg.decay_rate)
    if cfg.schedule == "constant":
        return MultiStepLR(optimizer, [], gamma=cfg.decay_rate)
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
    """The model (built-in or timm, not pretrained unless asked), initialised from `cfg.seed`, and its SGD
    optimizer (at `lr * batch_size / lr_reference_batch` when a reference batch is set)."""
    torch.manual_seed(cfg.seed)
    if cfg.model in MODELS:
        model = MODELS[cfg.model](num_classes)
    else:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes)
    if cfg.init_from:
        load_model_weights(model, cfg.init_from, "init_from", keep_classifier=False)
    lr = cfg.lr * cfg.batch_size / cfg.lr_reference_batch if cfg.lr_reference_batch else cfg.lr
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return model, optimizer


def classifier(model: nn.Module) -> nn.Linear:
    """The model's last linear layer: timm's `get_classifier()`, or the last module of a built-in model."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else list(model.children())[-1]
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"model: no linear classifier to replace in {type(model).__name__}")
    return head


def replace_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """A fresh classifier for `num_classes` classes (0: none, the model then returns its features)."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
    else:
        in_features = classifier(model).in_features
        model[-1] = nn.Linear(in_features, num_classes) if num_classes else nn.Identity()
    return model


def load_model_weights(model: nn.Module, folder: str, key: str, keep_classifier: bool = True) -> nn.Module:
    """Load the model weights of a `save_state` folder (`model.safetensors`, or Accelerate's pickled
    `pytorch_model.bin`) into `model`. With `keep_classifier=False` a classifier whose size differs from
    the model's is left as initialised. A missing folder or file is a ConfigError naming `key`."""
    path = Path(folder)
    files = [path / "model.safetensors", path / "pytorch_model.bin"]
    found = next((file for file in files if file.is_file()), None)
    if found is None:
        where = "no folder" if not path.is_dir() else f"no {files[0].name} in"
        raise ConfigError(f"{key}: {where} {str(path)!r} (a checkpoint folder written by accelerator.save_state)")
    if found.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(found))
    else:
        state = torch.load(found, map_location="cpu", weights_only=True)
    for prefix in ("module.", "_orig_mod."):  # saved from a DDP-wrapped or compiled model
        state = {name.removeprefix(prefix): value for name, value in state.items()}
    if not keep_classifier:
        own = model.state_dict()
        state = {name: value for name, value in state.items() if name not in own or own[name].shape == value.shape}
    head = classifier(model)
    head_names = {f"{name}.{param}" for name, module in model.named_modules() if module is head for param, _ in module.named_parameters()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        raise ConfigError(f"{key}: the weights in {str(found)!r} do not fit the model: {error}") from error
    if unexpected or set(missing) - (set() if keep_classifier else head_names):
        raise ConfigError(f"{key}: the weights in {str(found)!r} do not fit the model (missing {missing}, unexpected {unexpected})")
    return model


def model_from_checkpoint(cfg: "TrainConfig", num_classes: int, folder: str, key: str = "checkpoint") -> nn.Module:
    """`cfg.model` for `num_classes` classes with the weights of a `save_state` folder (a stage end)."""
    model, _ = make_model_and_optimizer(dataclasses.replace(cfg, init_from="", pretrained=False), num_classes)
    return load_model_weights(model, folder, key)


@torch.no_grad()
def extract_features(model: nn.Module, task, cfg: "TrainConfig", device) -> dict:
    """The frozen features of the model without its classifier (eval mode; images through the eval
    transform, the training split included): {"train": (features, targets), "test": (features, targets)}."""
    features_model = replace_classifier(copy.deepcopy(model), 0).to(device).eval()
    batch_size = cfg.eval_batch_size or min(cfg.batch_size, 1024)
    if isinstance(task, TaskData):
        splits = {"train": (task.train_inputs, task.train_targets), "test": (task.test_inputs, task.test_targets)}
        batches = {name: zip(inputs.split(batch_size), targets.split(batch_size)) for name, (inputs, targets) in splits.items()}
    else:
        if task.streaming:
            raise ConfigError("streaming: the linear probe reads the target's splits whole (streaming: false)")
        _, eval_transform = image_transforms(cfg)
        as_eval = _example_transform(eval_transform, cfg.image_column, cfg.label_column)
        loaders = {"train": task.train.with_transform(as_eval), "test": task.test}
        batches = {
            name: ((batch["inputs"], batch["targets"]) for batch in DataLoader(split, batch_size=batch_size, num_workers=cfg.workers))
            for name, split in loaders.items()
        }
    result = {}
    for name, pairs in batches.items():
        features, targets = zip(*[(features_model(inputs.to(device)).float().flatten(1).cpu(), labels) for inputs, labels in pairs])
        result[name] = (torch.cat(features), torch.cat(targets))
    return result


class Batches:
    """The updates of an epoch, each a list of this process's micro-batches (inputs, targets) on the
    device, with the update's global sample count.

    Data order of epoch e: a permutation seeded by `seed * 100003 + e` (the benchmark's), cut into
    updates of `batch_size` samples (the whole training set with `full_batch`); each update is split
    evenly between the processes and each process's share into `grad_accum_steps` micro-batches, so the
    global batch is `batch_size` however many processes run. A last partial batch is kept unless it is
    too small to give every micro-batch a sample. Streams are shuffled in a buffer and split by node.
    """

    def __init__(self, task, cfg: TrainConfig, accelerator: Accelerator):
        self.task, self.cfg, self.accelerator = task, cfg, accelerator
        self.processes, self.micro = accelerator.num_processes, cfg.grad_accum_steps
        if cfg.grad_accum_steps < 1:
            raise ConfigError(f"grad_accum_steps: invalid value {cfg.grad_accum_steps} (at least 1)")
        self.train_size = task.train_size if isinstance(task, ImageTask) else len(task.train_targets)
        self.batch_size = self.train_size if cfg.full_batch else cfg.batch_size
        shares = self.processes * self.micro
        if cfg.full_batch and self.train_size % shares:
            raise ConfigError(
                f"grad_accum_steps: full_batch needs micro-batches of equal size: {self.train_size} training "
                f"samples do not split into {self.processes} process(es) x {self.micro} micro-batches"
            )
        streaming = isinstance(task, ImageTask) and task.streaming
        if streaming and self.batch_size % shares:
            raise ConfigError(f"batch_size: {self.batch_size} does not split into {shares} equal micro-batches (streaming)")
        full, rest = divmod(self.train_size, self.batch_size)
        self.updates_per_epoch = full + (1 if rest >= shares and not streaming else 0)
        if self.updates_per_epoch == 0:
            raise ConfigError(f"batch_size: {self.batch_size} is larger than the training set ({self.train_size})")

    def _index_updates(self, epoch: int):
        """Per update: its global size and this process's micro-batches of sample indices."""
        order = torch.randperm(self.train_size, generator=torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch))
        if isinstance(self.task, TaskData):
            order = order.to(self.accelerator.device)  # one copy per epoch, not one per micro-batch
        rank = self.accelerator.process_index
        for batch in order.split(self.batch_size)[: self.updates_per_epoch]:
            local = batch.tensor_split(self.processes)[rank]
            yield len(batch), local.tensor_split(self.micro)

    def epoch(self, epoch: int):
        device = self.accelerator.device
        task = self.task
        if isinstance(task, TaskData):
            inputs, targets = task.train_inputs.to(device), task.train_targets.to(device)
            for size, micro_batches in self._index_updates(epoch):
                yield size, [(inputs[m], targets[m]) for m in micro_batches]
            return
        if task.streaming:
            stream = self._stream(epoch)
            for _ in range(self.updates_per_epoch):
                yield self.batch_size, [self._to_device(next(stream)) for _ in range(self.micro)]
            return
        updates = list(self._index_updates(epoch))
        micro_lists = [m.tolist() for _, micro_batches in updates for m in micro_batches]
        loader = iter(self._loader(task.train, batch_sampler=micro_lists))
        for size, _ in updates:
            yield size, [self._to_device(next(loader)) for _ in range(self.micro)]

    def _stream(self, epoch: int):
        """This process's share of the shuffled training stream, in micro-batches, restarted (next
        shuffle) if this share runs out before the epoch's updates are done."""
        from datasets.distributed import split_dataset_by_node

        micro_size = self.batch_size // (self.processes * self.micro)
        for repeat in itertools.count():
            stream = self.task.train.shuffle(seed=self.cfg.seed * 100003 + epoch, buffer_size=self.cfg.shuffle_buffer)
            stream.set_epoch(repeat)
            stream = split_dataset_by_node(stream, self.accelerator.process_index, self.processes)
            yield from self._loader(stream, batch_size=micro_size, drop_last=True)

    def _loader(self, dataset, **kwargs) -> DataLoader:
        workers = self.cfg.workers
        return DataLoader(
            dataset, num_workers=workers, persistent_workers=False, pin_memory=self.accelerator.device.type == "cuda",
            **kwargs,
        )

    def _to_device(self, batch):
        device = self.accelerator.device
        return batch["inputs"].to(device, non_blocking=True), batch["targets"].to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, inputs, targets, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (%) over a test set held in memory (read once)."""
    model.eval()
    loss_sum = torch.zeros((), device=inputs.device)
    correct = torch.zeros((), device=inputs.device, dtype=torch.long)
    for batch_inputs, batch_targets in zip(inputs.split(batch_size), targets.split(batch_size)):
        logits = model(batch_inputs)
        loss_sum += F.cross_entropy(logits.float(), batch_targets, reduction="sum")
        correct += (logits.argmax(dim=1) == batch_targets).sum()
    return loss_sum.item() / len(targets), 100.0 * correct.item() / len(targets)


@torch.no_grad()
def evaluate_dataset(model, dataset, streaming: bool, batch_size: int, workers: int, accelerator) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (%) over a `datasets` split, each process reading its share."""
    model.eval()
    rank, processes = accelerator.process_index, accelerator.num_processes
    if streaming:
        from datasets.distributed import split_dataset_by_node

        loader = DataLoader(split_dataset_by_node(dataset, rank, processes), batch_size=batch_size, num_workers=workers)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=range(rank, len(dataset), processes), num_workers=workers)
    totals = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        inputs, targets = batch["inputs"].to(accelerator.device), batch["targets"].to(accelerator.device)
        logits = model(inputs)
        totals[0] += F.cross_entropy(logits.float(), targets, reduction="sum")
        totals[1] += (logits.argmax(dim=1) == targets).sum()
        totals[2] += len(targets)
    loss_sum, correct, count = accelerator.reduce(totals, reduction="sum").tolist()
    return loss_sum / max(count, 1), 100.0 * correct / max(count, 1)


def evaluate_all(model, task, cfg: TrainConfig, accelerator) -> dict:
    """test_loss and test_top1, plus test_top1_NAME for each of the task's extra test sets."""
    batch_size = cfg.eval_batch_size or min(cfg.batch_size, 1024)
    model = accelerator.unwrap_model(model)  # DDP's forward syncs buffers; processes may read unequal shares
    if isinstance(task, ImageTask):
        loss, top1 = evaluate_dataset(model, task.test, task.streaming, batch_size, cfg.workers, accelerator)
        return {"test_loss": loss, "test_top1": top1}
    device = accelerator.device
    loss, top1 = evaluate(model, task.test_inputs.to(device), task.test_targets.to(device), batch_size)
    results = {"test_loss": loss, "test_top1": top1}
    for name, (inputs, targets) in task.extra_tests.items():
        results[f"test_top1_{name}"] = evaluate(model, inputs.to(device), targets.to(device), batch_size)[1]
    return results


@dataclass
class RunState:
    """Where a run stands, saved with every checkpoint so that `resume` continues it exactly."""

    epoch: int = 0  # epochs completed
    updates: int = 0
    decay_epochs: list = field(default_factory=list)
    stage_ends: list = field(default_factory=list)
    curves: list = field(default_factory=list)
    finished: bool = False  # AutoDecay ended the run

    def state_dict(self) -> dict:
        return {"json": json.dumps(dataclasses.asdict(self))}

    def load_state_dict(self, state: dict) -> None:
        for key, value in json.loads(state["json"]).items():
            setattr(self, key, value)


def run_in_pool(function, jobs: list, processes: int):
    """Yield `function(job)` for every job as it finishes: in a pool of worker processes ("spawn":
    each starts its own torch and Accelerate state), or in this process when `processes` is 1."""
    if processes == 1:
        yield from map(function, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        yield from pool.imap_unordered(function, jobs)
        pool.close()  # let the workers exit cleanly rather than be terminated
        pool.join()


def write_study(output_dir: str, name: str, runs: list[dict], table: str, cfg) -> Path:
    """A study's results: `summary.json` (runs, table, the config) and `NAME.md` (the table)."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    summary = {"runs": runs, "table": table, "config": dataclasses.asdict(cfg)}
    (output / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (output / f"{name}.md").write_text(table + "\n")
    return output


def plot_run(curves: list[dict], decay_epochs: list[float], path: Path, title: str = "") -> None:
    """Training loss (log scale) and test accuracy against epoch, LR decays marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    epochs = [line["epoch"] for line in curves]
    loss_axes.plot(epochs, [line["train_loss"] for line in curves], label="train")
    loss_axes.plot(epochs, [line["test_loss"] for line in curves], label="test")
    accuracy_axes.plot(epochs, [line["test_top1"] for line in curves], label="test")
    for name in [key for key in curves[0] if key.startswith("test_top1_")] if curves else []:
        accuracy_axes.plot(epochs, [line[name] for line in curves], label=name[len("test_top1_"):])
    for axes in (loss_axes, accuracy_axes):
        for at in decay_epochs:
            axes.axvline(at, color="grey", linestyle=":", linewidth=1)
        axes.grid(alpha=0.3)
        axes.legend()
    loss_axes.set(yscale="log", xlabel="epoch", ylabel="loss", title=title or "loss")
    accuracy_axes.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy (dotted: LR decays)")
    figure.savefig(path, dpi=110)


def _tracker_config(cfg: TrainConfig) -> dict:
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in dataclasses.asdict(cfg).items()}


def train_run(cfg: TrainConfig, accelerator: Accelerator, policy=None) -> dict:
    """Train one run, evaluating after every epoch; AutoDecay ends it right after the update at which
    its last stage ended. Writes `metrics.jsonl` (a line per epoch), `summary.json` and
    `training_curves.png` into `cfg.output_dir`, checkpoints into `checkpoint/` (every
    `checkpoint_every` epochs) and `stage_ends/stage{k}/` (when stage k ends), and returns the summary
    with the per-epoch lines under "curves". The same `accelerator` can train several runs in turn.

    `policy` drives a schedule this module does not know (the benchmark's peers): it may replace the
    optimizer (`make_optimizer(model, optimizer, cfg, updates_per_epoch)`), change learning rates after
    each update (`after_update(loss)`) and each epoch (`after_epoch(epochs_done, train_loss,
    test_top1)`), and end the run by returning True from either. It needs `schedule: constant`."""
    if policy is not None and cfg.schedule != "constant":
        raise ConfigError(f"schedule: a policy owns the learning rate; use 'constant', not {cfg.schedule!r}")
    task = make_task(cfg)
    batches = Batches(task, cfg, accelerator)
    updates_per_epoch = batches.updates_per_epoch
    accelerator.free_memory()  # forget a previous run's model and optimizer
    accelerator._custom_objects.clear()
    model, optimizer = make_model_and_optimizer(cfg, task.num_classes)
    if policy is not None:
        optimizer = policy.make_optimizer(model, optimizer, cfg, updates_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = make_scheduler(cfg, optimizer, updates_per_epoch)
    # Not passed to prepare(): an AcceleratedScheduler steps once per process per call.
    accelerator.register_for_checkpointing(scheduler)
    state = RunState()
    accelerator.register_for_checkpointing(state)

    output_dir = Path(cfg.output_dir)
    checkpoint_dir = output_dir / "checkpoint"
    resume_dir = Path(cfg.resume_from) if cfg.resume_from else checkpoint_dir if cfg.resume else None
    if cfg.resume_from and not resume_dir.is_dir():
        raise ConfigError(f"resume_from: no checkpoint folder {cfg.resume_from!r}")
    resumed = resume_dir is not None and resume_dir.is_dir()
    if resumed:
        accelerator.load_state(str(resume_dir))
    metrics_path = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(record) + "\n" for record in state.curves))
    tracking = cfg.log_with != "none"
    if tracking:
        accelerator.trackers = []
        accelerator.project_configuration.logging_dir = str(output_dir)
        accelerator.init_trackers("tensorboard" if cfg.log_with == "tensorboard" else "trackers", config=_tracker_config(cfg))

    def save_stage_end() -> None:
        """Checkpoint the end of the stage that has just ended (numbered like `stage` in metrics)."""
        stage = len(state.stage_ends)
        path = output_dir / "stage_ends" / f"stage{stage}"
        state.stage_ends.append(
            {"stage": stage, "epoch": state.updates / updates_per_epoch, "updates": state.updates, "lr": lr_in_use,
             "path": str(path) if cfg.save_stage_ends else None}
        )
        if cfg.save_stage_ends:
            accelerator.save_state(str(path))

    def note_decay() -> None:
        """After a scheduler step: a lower LR (not cosine's continuous one) ends a stage."""
        nonlocal lr_in_use
        lr = optimizer.param_groups[0]["lr"]
        if lr < lr_in_use and cfg.schedule != "cosine":
            save_stage_end()
            state.decay_epochs.append(state.updates / updates_per_epoch)
        lr_in_use = lr

    lr_in_use = optimizer.param_groups[0]["lr"]
    run_start = time.perf_counter()
    show_progress = accelerator.is_local_main_process and cfg.verbose
    progress = tqdm(
        range(state.epoch, cfg.epochs), desc=f"{cfg.schedule} seed {cfg.seed}", disable=not show_progress,
        initial=state.epoch, total=cfg.epochs,
    )
    for epoch in progress:
        if state.finished:
            break
        epoch_start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=accelerator.device)
        epoch_updates = 0
        for update_size, micro_batches in batches.epoch(epoch):
            lr_of_update, stage_of_update = lr_in_use, len(state.decay_epochs)
            optimizer.zero_grad(set_to_none=True)
            update_loss = torch.zeros((), device=accelerator.device)
            for index, (inputs, targets) in enumerate(micro_batches):
                last = index == len(micro_batches) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    # Summed and scaled so that the mean over processes is the update's exact mean loss.
                    logits = model(inputs)
                    loss = F.cross_entropy(logits.float(), targets, reduction="sum") * (batches.processes / update_size)
                    accelerator.backward(loss)
                update_loss += loss.detach()
            optimizer.step()
            loss_sum += update_loss
            state.updates += 1
            epoch_updates += 1

            if cfg.schedule == "autodecay":
                scheduler.step(update_loss)
                note_decay()
                state.finished = scheduler.finished
                if state.finished:
                    break
            elif cfg.schedule != "plateau":
                scheduler.step()
                note_decay()
            if policy is not None:
                state.finished = policy.after_update(update_loss)
                note_decay()
                if state.finished:
                    break

        train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / epoch_updates
        if cfg.schedule == "plateau":
            scheduler.step(train_loss)
            note_decay()
        record = {
            "epoch": state.updates / updates_per_epoch,
            "updates": state.updates,
            "lr": lr_of_update,  # of the epoch's last update
            "stage": stage_of_update,  # of the epoch's last update
            "train_loss": train_loss,
            **evaluate_all(model, task, cfg, accelerator),
            "seconds": time.perf_counter() - epoch_start,
        }
        if policy is not None:
            state.finished = policy.after_epoch(epoch + 1, train_loss, record["test_top1"]) or state.finished
            note_decay()
        state.curves.append(record)
        state.epoch = epoch + 1
        if accelerator.is_main_process:
            with metrics_path.open("a") as metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
        if tracking:
            accelerator.log({key: value for key, value in record.items() if key != "epoch"}, step=epoch + 1)
        progress.set_postfix(loss=f"{train_loss:.4f}", top1=f"{record['test_top1']:.2f}", lr=f"{lr_of_update:.3g}")
        done = state.finished or state.epoch == cfg.epochs
        if done:
            save_stage_end()  # the last stage ends with the run
        if cfg.checkpoint_every and (state.epoch % cfg.checkpoint_every == 0 or done):
            accelerator.save_state(str(checkpoint_dir))
        if cfg.stop_after_epoch and state.epoch >= cfg.stop_after_epoch and not done:
            accelerator.print(f"stopped after epoch {state.epoch} (stop_after_epoch); continue with --resume")
            break
    progress.close()
    if tracking:
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers = []

    curves = state.curves
    summary = {
        "schedule": cfg.schedule,
        "seed": cfg.seed,
        "test_top1": curves[-1]["test_top1"] if curves else None,
        "test_loss": curves[-1]["test_loss"] if curves else None,
        "epochs": state.updates / updates_per_epoch,
        "updates": state.updates,
        "updates_per_epoch": updates_per_epoch,
        "decay_epochs": state.decay_epochs,
        "stage_ends": state.stage_ends,
        "complete": state.finished or state.epoch == cfg.epochs,
        "resumed": resumed,
        "wall_seconds": time.perf_counter() - run_start,
        "config": dataclasses.asdict(cfg),
    }
    if cfg.schedule == "autodecay":
        summary["autodecay_history"] = scheduler.history
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if curves:
            plot_run(curves, state.decay_epochs, output_dir / "training_curves.png", f"{cfg.model} on {cfg.task}, {cfg.schedule}")
    if cfg.verbose:
        decays = ", ".join(f"{at:g}" for at in state.decay_epochs) or "none"
        accelerator.print(
            f"{cfg.schedule} seed {cfg.seed}: test top-1 {summary['test_top1']:.2f}% after "
            f"{summary['epochs']:g} epochs (decays at epoch {decays}), {summary['wall_seconds']:.0f} s, "
            f"written to {output_dir}"
        )
    return {**summary, "curves": curves}
