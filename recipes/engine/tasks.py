"""The tasks the recipes train on, by name (`TASKS`): generated ones held in memory as tensors, and image
datasets read through `datasets` with timm's transforms.

- `mnist1d`: MNIST-1D generated offline (8000 train / 2000 test signals of length 40, 10 classes);
  `mnist1d_noisy`: the same with 15% of the training labels flipped (fixed seed), the test set clean;
- `synthetic_patterns`: 16x16 RGB images carrying an easy cue (a colour) and a complex one (strokes),
  with one-cue test subsets (the mechanism study);
- `hub`: a `datasets` hub name or local path (e.g. `imagenet-1k`); `image_folder`: a folder with one
  sub-folder per split and one per class inside it.

`make_task(cfg)` gives `TASKS[cfg.task]` restricted to `cfg.classes`, with its last `cfg.val_samples` training
samples held out as a validation split and its training set cut to `cfg.train_subset`, when set.
"""
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from mnist1d.data import get_dataset_args, make_dataset

from .config import ConfigError


@dataclass
class TaskData:
    """A classification task held in memory as tensors."""

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    num_classes: int
    extra_tests: dict = field(default_factory=dict)  # name -> (inputs, targets): more test sets
    val_inputs: typing.Optional[torch.Tensor] = None  # a validation split held out of the training set
    val_targets: typing.Optional[torch.Tensor] = None


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


# Image datasets read through `datasets`, transformed by timm -------------------------------------
@dataclass
class ImageTask:
    """A task read through `datasets`: splits yielding {"inputs": image tensor, "targets": int}."""

    train: typing.Any  # datasets.Dataset, or datasets.IterableDataset when streaming
    test: typing.Any
    num_classes: int
    train_size: int
    streaming: bool = False


def image_transforms(cfg):
    """timm's train and eval transforms for `cfg.model` (its default input size, mean and std; ImageNet's
    for the built-in models), at `cfg.image_size` pixels when set: random resized crop and flip for
    training, resize and centre crop for evaluation."""
    from timm.data import create_transform, resolve_data_config

    pretrained_cfg = timm.get_pretrained_cfg(cfg.model) if timm.is_model(cfg.model) else None
    args = {"input_size": (3, cfg.image_size, cfg.image_size)} if cfg.image_size else {}
    data_config = resolve_data_config(args, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else None)
    return create_transform(**data_config, is_training=True), create_transform(**data_config, is_training=False)


def example_transform(transform, image_column: str, label_column: str):
    """A `datasets` transform turning a batch of examples into {"inputs", "targets"}."""

    def apply(batch):
        return {
            "inputs": [transform(image.convert("RGB")) for image in batch[image_column]],
            "targets": list(batch[label_column]),
        }

    return apply


def load_image_task(cfg, path: str, **load_kwargs) -> ImageTask:
    """The train and test splits of `datasets.load_dataset(path, ...)`, images through timm's transforms."""
    import datasets

    def load(split):
        try:
            return datasets.load_dataset(
                path, cfg.dataset_config or None, split=split, streaming=cfg.streaming, **load_kwargs
            )
        except ValueError as error:  # an unknown split names the split key
            key = "train_split" if split == cfg.train_split else "test_split"
            raise ConfigError(f"{key}: {error}") from error

    train, test = load(cfg.train_split), load(cfg.test_split)
    for key in ("image_column", "label_column"):
        if train.features is not None and getattr(cfg, key) not in train.features:
            columns = ", ".join(train.features)
            raise ConfigError(f"{key}: no column {getattr(cfg, key)!r} in {path} (columns: {columns})")
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
        as_examples = dict(batched=True, batch_size=16, remove_columns=drop or None)
        train = train.map(example_transform(train_transform, *columns), **as_examples)
        test = test.map(example_transform(test_transform, *columns), **as_examples)
    else:
        train.set_transform(example_transform(train_transform, *columns))
        test.set_transform(example_transform(test_transform, *columns))
    return ImageTask(train, test, num_classes, train_size, cfg.streaming)


def make_hub_task(cfg) -> ImageTask:
    """`cfg.dataset` from the hub (or a local path `load_dataset` reads), e.g. `imagenet-1k`."""
    if not cfg.dataset:
        raise ConfigError("dataset: needed for task hub (a hub name such as imagenet-1k, or a local path)")
    return load_image_task(cfg, cfg.dataset)


def make_image_folder_task(cfg) -> ImageTask:
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
GENERATED_TASKS = ("mnist1d", "synthetic_patterns", "mnist1d_noisy")  # held in memory: subsets of them can be taken


def make_task(cfg):
    """`TASKS[cfg.task]`, restricted to `cfg.classes` (relabelled 0..k-1 in that order), then its last
    `cfg.val_samples` training samples held out as the validation split (labels as they are: noisy in
    `mnist1d_noisy`), then cut to the first `cfg.train_subset` remaining training samples (generated tasks only)."""
    task = TASKS[cfg.task](cfg)
    val_samples = getattr(cfg, "val_samples", 0)
    if not cfg.classes and not cfg.train_subset and not val_samples:
        return task
    if isinstance(task, ImageTask):
        key = "classes" if cfg.classes else "train_subset" if cfg.train_subset else "val_samples"
        raise ConfigError(f"{key}: only for generated tasks ({', '.join(GENERATED_TASKS)})")
    if cfg.classes:
        task = keep_classes(task, cfg.classes)
    if val_samples:
        task = hold_out_validation(task, val_samples)
    if cfg.train_subset:
        task = dataclasses.replace(task, train_inputs=task.train_inputs[: cfg.train_subset],
                                   train_targets=task.train_targets[: cfg.train_subset])
    return task


def keep_classes(task: TaskData, classes: list) -> TaskData:
    """The task restricted to `classes`, relabelled 0..k-1 in that order."""
    out_of_range = [c for c in classes if not 0 <= c < task.num_classes]
    bad = out_of_range or sorted({c for c in classes if classes.count(c) > 1})
    if bad:
        raise ConfigError(f"classes: invalid value {bad} (distinct classes of 0..{task.num_classes - 1})")
    relabel = torch.full((task.num_classes,), -1, dtype=torch.long)
    relabel[classes] = torch.arange(len(classes))

    def keep(inputs, targets):
        mask = relabel[targets] >= 0
        return inputs[mask], relabel[targets[mask]]

    return TaskData(*keep(task.train_inputs, task.train_targets), *keep(task.test_inputs, task.test_targets),
                    len(classes), {name: keep(*pair) for name, pair in task.extra_tests.items()})


def hold_out_validation(task: TaskData, val_samples: int) -> TaskData:
    """The last `val_samples` training samples as the validation split, removed from the training set."""
    train_size = len(task.train_targets)
    if not 0 < val_samples < train_size:
        raise ConfigError(f"val_samples: invalid value {val_samples} (1 to {train_size - 1}: the training set has "
                          f"{train_size} samples)")
    cut = train_size - val_samples
    return dataclasses.replace(task, train_inputs=task.train_inputs[:cut], train_targets=task.train_targets[:cut],
                               val_inputs=task.train_inputs[cut:], val_targets=task.train_targets[cut:])
