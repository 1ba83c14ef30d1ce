"""The models the recipes train, by name (`MODELS`, or any timm model), their SGD optimizer, and loading
a model's weights from a checkpoint folder (`save_state`) with or without its classifier.
"""
import copy
import dataclasses
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import ConfigError
from .optimizers import sgd_optimizer
from .tasks import TaskData, example_transform, image_transforms


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


MODELS = {"mnist1d_cnn": mnist1d_cnn, "pattern_cnn": pattern_cnn}  # and any timm model by name


def check_model(name: str):
    """None when `name` is a built-in model or a timm model, else why not."""
    if name in MODELS or timm.is_model(name):
        return None
    return f"choose from {', '.join(MODELS)} or a timm model name (timm.list_models())"

def make_model(cfg, num_classes: int) -> nn.Module:
    """The model (built-in or timm, not pretrained unless asked), initialised from `cfg.seed` (and from the
    weights of `cfg.init_from` when set)."""
    torch.manual_seed(cfg.seed)
    if cfg.model in MODELS:
        model = MODELS[cfg.model](num_classes)
    else:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes)
    if cfg.init_from:
        load_model_weights(model, cfg.init_from, "init_from", keep_classifier=False)
    return model


def make_model_and_optimizer(cfg, num_classes: int):
    """`make_model(cfg, num_classes)` and its `sgd_optimizer`."""
    model = make_model(cfg, num_classes)
    return model, sgd_optimizer(model, cfg)


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
        raise ConfigError(
            f"{key}: {where} {str(path)!r} (a checkpoint folder written by accelerator.save_state)"
        )
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
    head_module_name = next(name for name, module in model.named_modules() if module is head)
    head_names = {f"{head_module_name}.{param}" for param, _ in head.named_parameters()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        raise ConfigError(f"{key}: the weights in {str(found)!r} do not fit the model: {error}") from error
    if unexpected or set(missing) - (set() if keep_classifier else head_names):
        raise ConfigError(
            f"{key}: the weights in {str(found)!r} do not fit the model (missing {missing}, unexpected {unexpected})"
        )
    return model


def model_from_checkpoint(cfg, num_classes: int, folder: str, key: str = "checkpoint") -> nn.Module:
    """`cfg.model` for `num_classes` classes with the weights of a `save_state` folder (a stage end)."""
    model, _ = make_model_and_optimizer(dataclasses.replace(cfg, init_from="", pretrained=False), num_classes)
    return load_model_weights(model, folder, key)


@torch.no_grad()
def extract_features(model: nn.Module, task, cfg, device) -> dict:
    """The frozen features of the model without its classifier (eval mode; images through the eval
    transform, the training split included): {"train": (features, targets), "test": (features, targets)}."""
    features_model = replace_classifier(copy.deepcopy(model), 0).to(device).eval()
    batch_size = cfg.eval_batch_size or min(cfg.batch_size, 1024)
    if isinstance(task, TaskData):
        splits = {"train": (task.train_inputs, task.train_targets), "test": (task.test_inputs, task.test_targets)}
        batches = {
            name: zip(inputs.split(batch_size), targets.split(batch_size)) for name, (inputs, targets) in splits.items()
        }
    else:
        if task.streaming:
            raise ConfigError("streaming: the linear probe reads the target's splits whole (streaming: false)")
        _, eval_transform = image_transforms(cfg)
        as_eval = example_transform(eval_transform, cfg.image_column, cfg.label_column)
        loaders = {"train": task.train.with_transform(as_eval), "test": task.test}
        batches = {
            name: ((batch["inputs"], batch["targets"])
                   for batch in DataLoader(split, batch_size=batch_size, num_workers=cfg.workers))
            for name, split in loaders.items()
        }
    result = {}
    for name, pairs in batches.items():
        features, targets = zip(
            *[(features_model(inputs.to(device)).float().flatten(1).cpu(), labels) for inputs, labels in pairs]
        )
        result[name] = (torch.cat(features), torch.cat(targets))
    return result


