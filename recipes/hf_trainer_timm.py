"""Train a timm model with the Transformers Trainer and AutoDecay (`AutoDecayCallback`).

    torchrun --nproc_per_node 2 recipes/hf_trainer_timm.py --config recipes/configs/hf_trainer_timm.yaml
    accelerate launch recipes/hf_trainer_timm.py --config recipes/configs/hf_trainer_timm.yaml \
        --dataset path/to/images --num_train_epochs 10 [--key value ...]

The model is Transformers' `TimmWrapperForImageClassification` around a timm architecture, built from
its config (`--model resnet10t`, nothing downloaded) or loaded with `--model_name_or_path`. The data is a
hub dataset by name (`datasets.load_dataset`) or a local image folder in the `imagefolder` layout
(`train/<class>/*.png`, optionally `validation/<class>/*.png`). Top-1/top-5 come from the local
`evaluate` metric `recipes/metrics/topk_accuracy.py`. The learning rate follows the Trainer's schedule
(`constant_with_warmup` in the config) with AutoDecay's stages on top; training stops at the last plateau.

Every key of the YAML config can be given on the command line, and so can every `TrainingArguments`
field and AutoDecay setting (`--decay_rate`, `--num_stages`, `--window`, ...; unset ones keep their
defaults). Writes into `output_dir`: the Trainer's checkpoints, `metrics.jsonl` (one line per
evaluation: epoch, updates, lr, stage, train_loss, test_loss, test_top1, test_top5, seconds),
`summary.json` and `training.png`.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import evaluate
import numpy as np
import timm.data
import torch
import yaml
from datasets import ClassLabel, Image, load_dataset
from transformers import (
    HfArgumentParser,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_integration import AutoDecayCallback, find_autodecay_callback
from timm_autodecay.detector import SETTINGS

METRIC = Path(__file__).resolve().parent / "metrics" / "topk_accuracy.py"
EVAL_SPLITS = ("validation", "valid", "val", "test")


@dataclasses.dataclass
class RecipeArguments:
    dataset: str = dataclasses.field(
        default="uoft-cs/cifar10",
        metadata={"help": "hub dataset name (datasets.load_dataset) or a local image folder (imagefolder layout)"},
    )
    dataset_config: Optional[str] = dataclasses.field(default=None, metadata={"help": "the hub dataset's config name"})
    train_split: str = "train"
    eval_split: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "default: validation/valid/val/test if present, else eval_fraction of train"}
    )
    eval_fraction: float = 0.1
    image_column: Optional[str] = dataclasses.field(default=None, metadata={"help": "default: the Image feature"})
    label_column: Optional[str] = dataclasses.field(default=None, metadata={"help": "default: the ClassLabel feature"})
    model: str = dataclasses.field(default="resnet10t", metadata={"help": "timm architecture, built untrained"})
    model_name_or_path: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "a TimmWrapper checkpoint (hub id or folder) to fine-tune instead"}
    )
    image_size: int = 32
    augment: bool = dataclasses.field(default=True, metadata={"help": "random-resized-crop and flip for training"})
    autodecay: bool = dataclasses.field(default=True, metadata={"help": "false: the Trainer's schedule alone"})


def _autodecay_arguments():
    """AutoDecay's settings as a dataclass for the argument parser, from the detector's SETTINGS: each
    defaults to None (= the detector's own default, derived from the run)."""
    def option(help_text):
        return dataclasses.field(default=None, metadata={"help": help_text})

    fields = [("decay_rate", Optional[float], option("LR factor at each stage end (0.1)"))]
    for name, (kind, default, help_text) in SETTINGS.items():
        fields.append((name, Optional[kind], option(f"{help_text} ({default})")))
    return dataclasses.make_dataclass("AutoDecayArguments", fields)


AutoDecayArguments = _autodecay_arguments()


def parse_arguments(argv=None):
    """--config FILE.yaml supplies defaults; --key value on the command line overrides them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser((RecipeArguments, AutoDecayArguments, TrainingArguments))
    if known.config:
        config = yaml.safe_load(Path(known.config).read_text()) or {}
        classes = (RecipeArguments, AutoDecayArguments, TrainingArguments)
        names = {f.name for cls in classes for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            parser.error(f"{known.config}: unknown key(s) {unknown}")
        parser.set_defaults(**config)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # On a CPU-only machine the Trainer runs torchrun's processes as data-parallel (gloo) only with
        # use_cpu; without it each process would train alone.
        parser.set_defaults(use_cpu=True)
    recipe, autodecay, training = parser.parse_args_into_dataclasses(args=rest)
    training.remove_unused_columns = False  # the image column is turned into pixel_values on the fly
    return recipe, autodecay, training


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def load_splits(recipe: RecipeArguments, seed: int):
    if Path(recipe.dataset).is_dir():
        data = load_dataset("imagefolder", data_dir=recipe.dataset)
    else:
        data = load_dataset(recipe.dataset, recipe.dataset_config)
    train = data[recipe.train_split]
    eval_split = recipe.eval_split or next((s for s in EVAL_SPLITS if s in data), None)
    image_column = recipe.image_column or next((k for k, f in train.features.items() if isinstance(f, Image)), None)
    label_column = recipe.label_column or next(
        (k for k, f in train.features.items() if isinstance(f, ClassLabel)), None
    )
    if image_column is None or label_column is None:
        raise SystemExit(
            f"{recipe.dataset}: cannot tell the image and label columns among {list(train.features)}; "
            "pass --image_column and --label_column"
        )
    if eval_split is None:
        parts = train.train_test_split(test_size=recipe.eval_fraction, seed=seed, stratify_by_column=label_column)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = data[eval_split]
    return train, evaluation, image_column, label_column


def attach_transforms(train, evaluation, image_column, label_column, timm_model, recipe):
    """Turn images into pixel_values on the fly with timm's transforms (the model's mean/std)."""
    config = timm.data.resolve_data_config({"input_size": (3, recipe.image_size, recipe.image_size)}, model=timm_model)
    train_tf = timm.data.create_transform(**config, is_training=recipe.augment)
    eval_tf = timm.data.create_transform(**{**config, "crop_pct": 1.0}, is_training=False)

    def transform_with(tf):
        def apply(batch):
            return {
                "pixel_values": [tf(image.convert("RGB")) for image in batch[image_column]],
                "labels": batch[label_column],
            }

        return apply

    return train.with_transform(transform_with(train_tf)), evaluation.with_transform(transform_with(eval_tf))


def collate(examples):
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples]),
    }


# ----------------------------------------------------------------------------------------------
# Metrics and outputs
# ----------------------------------------------------------------------------------------------
def make_compute_metrics(num_labels: int):
    metric = evaluate.load(str(METRIC), keep_in_memory=True)
    top = min(5, num_labels)

    def compute_metrics(eval_pred):
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        ranked = np.argsort(-logits, axis=1)[:, :top]
        return metric.compute(predictions=ranked, references=eval_pred.label_ids, k=[1, 5])

    return compute_metrics


class RunRecorder(TrainerCallback):
    """metrics.jsonl: one line per evaluation. train_loss is the mean of the loss logs since the previous
    evaluation (weighted by the steps each covers); lr and stage are those of the last logged step.
    Written by the main process only."""

    def __init__(self, path: Path):
        self.path = path
        self.start = time.time()
        self.losses = []  # (mean loss, steps) since the last evaluation
        self.last_logged_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_logged_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((logs["loss"], state.global_step - self.last_logged_step))
            self.last_logged_step = state.global_step

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero:
            return
        # AutoDecayCallback annotates log_history, whatever the callbacks' order
        last = next((e for e in reversed(state.log_history) if "loss" in e), {})
        steps = sum(n for _, n in self.losses)
        line = {
            "epoch": state.epoch,
            "updates": state.global_step,
            "lr": last.get("learning_rate"),
            "stage": last.get("autodecay/stage", 0),
            "train_loss": sum(v * n for v, n in self.losses) / steps if steps else None,
            "test_loss": metrics.get("eval_loss"),
            "test_top1": metrics.get("eval_top1"),
            "test_top5": metrics.get("eval_top5"),
            "seconds": round(time.time() - self.start, 3),
        }
        self.losses = []
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def plot(trainer, lines, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    logs = [e for e in trainer.state.log_history if "loss" in e]
    fig = Figure(figsize=(10, 3.5))
    ax_loss, ax_lr, ax_acc = fig.subplots(1, 3)
    ax_loss.plot([e["step"] for e in logs], [e["loss"] for e in logs], lw=0.8)
    ax_loss.set(title="training loss", xlabel="update")
    ax_lr.plot([e["step"] for e in logs], [e["learning_rate"] for e in logs], drawstyle="steps-pre")
    ax_lr.set(title="learning rate", xlabel="update", yscale="log")
    updates = [line["updates"] for line in lines]
    ax_acc.plot(updates, [line["test_top1"] for line in lines], marker="o", label="top-1")
    ax_acc.plot(updates, [line["test_top5"] for line in lines], marker="o", label="top-5")
    ax_acc.set(title="test accuracy", xlabel="update")
    ax_acc.legend()
    for e in logs:
        if e.get("autodecay/decision"):
            for ax in (ax_loss, ax_lr, ax_acc):
                ax.axvline(e["step"], color="grey", ls="--", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------------------------
def main(argv=None):
    recipe, autodecay_args, training = parse_arguments(argv)
    started = time.time()
    train, evaluation, image_column, label_column = load_splits(recipe, training.seed)
    names = train.features[label_column].names
    labels = {"num_labels": len(names), "id2label": dict(enumerate(names)),
              "label2id": {name: i for i, name in enumerate(names)}}
    if recipe.model_name_or_path:
        model = TimmWrapperForImageClassification.from_pretrained(
            recipe.model_name_or_path, **labels, ignore_mismatched_sizes=True
        )
    else:
        model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=recipe.model, **labels))
    train, evaluation = attach_transforms(train, evaluation, image_column, label_column, model.timm_model, recipe)

    output_dir = Path(training.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / "metrics.jsonl"
    if training.process_index == 0 and metrics_path.exists() and not training.resume_from_checkpoint:
        metrics_path.unlink()
    callbacks = [RunRecorder(metrics_path)]
    if recipe.autodecay:
        settings = {k: v for k, v in dataclasses.asdict(autodecay_args).items() if v is not None}
        callbacks.insert(0, AutoDecayCallback(**settings))
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collate,
        compute_metrics=make_compute_metrics(len(names)),
        callbacks=callbacks,
    )
    resume = training.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True  # the newest checkpoint in output_dir
    trainer.train(resume_from_checkpoint=resume)
    evaluated = [e["step"] for e in trainer.state.log_history if "eval_loss" in e]
    if not evaluated or evaluated[-1] != trainer.state.global_step:
        trainer.evaluate()  # the final model, e.g. after AutoDecay stopped between evaluations

    if trainer.is_world_process_zero():
        lines = [json.loads(line) for line in metrics_path.read_text().splitlines()]
        history = find_autodecay_callback(trainer).history if recipe.autodecay else []
        summary = {
            "dataset": recipe.dataset,
            "model": recipe.model_name_or_path or recipe.model,
            "num_labels": len(names),
            "updates": trainer.state.global_step,
            "max_steps": trainer.state.max_steps,
            "stopped_early": trainer.state.global_step < trainer.state.max_steps,
            "autodecay": history,
            "final": lines[-1] if lines else None,
            "best_test_top1": max((line["test_top1"] for line in lines), default=None),
            "wall_seconds": round(time.time() - started, 3),
        }
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot(trainer, lines, output_dir / "training.png")
        print(json.dumps({k: summary[k] for k in ("updates", "max_steps", "stopped_early", "autodecay", "final")}))


if __name__ == "__main__":
    sys.exit(main())
