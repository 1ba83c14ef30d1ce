"""One run of the transformer benchmark, through the Hugging Face `Trainer` as a user would write it.

A `RunSpec` says which schedule (TrainingArguments overrides, an `AutoDecayCallback`, or StepDecay's
milestones), how long, where to evaluate, and whether the run is the constant-LR trunk (it saves a
checkpoint every `save_every` steps) or a branch resumed from one of the trunk's checkpoints with
`trainer.train(resume_from_checkpoint=...)`. A branch is exact: the trunk and the branch's schedule have
the same learning rate up to the branch point (`shared_prefix` checks it on the schedules themselves), the
data order is a function of the step, and the Trainer restores the model, AdamW's moments, the
scheduler's step and the RNG. So WSD at four budgets costs one trunk plus four cooldowns.

Fine-tuning (a task with `finetune` and `init_from`): the model starts from the pre-trained weights, trains
on the fine-tuning text's training split, evaluates on its validation split (every `eval_steps`, as the
spec's Trainer settings say), and the model the user is handed (the final one, or with
`load_best_model_at_end` the best checkpoint's) is scored on the test split, which no schedule reads.
"""
import functools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from .lm_data import TopicsSplit, TrainWindows, ValidationWindows, make_model, read_corpus, read_finetune_text
from torch.optim.lr_scheduler import LambdaLR
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, get_scheduler
from transformers.trainer_callback import PrinterCallback

from hf_integration import AutoDecayCallback

DEFAULT_SCHEDULE = "constant_with_warmup"  # a run's lr_scheduler_type unless its spec says otherwise


@dataclass(frozen=True)
class LMTask:
    """What every run shares: the corpus, the model, the optimiser's settings, the budget."""

    corpus_dir: Optional[str]
    files: tuple
    corpus_sha256: str
    validation_chars: int
    validation_block: int
    validation_every: int
    context: int
    n_layer: int
    n_embd: int
    n_head: int
    batch_size: int
    eval_batch_size: int
    lr: float
    warmup_steps: int
    budget_steps: int
    logging_steps: int
    finetune: Optional[TopicsSplit] = None  # fine-tuning: the text and its splits (the corpus: the vocabulary)
    init_from: Optional[str] = None  # fine-tuning: the pre-trained model's folder


@dataclass(frozen=True)
class RunSpec:
    peer: str  # the PEERS name
    seed: int
    max_steps: int  # the run's budget (AutoDecay may end earlier)
    output_dir: str
    trainer: dict = field(default_factory=dict)  # TrainingArguments overrides (lr_scheduler_type, optim, ...)
    autodecay: Optional[dict] = None  # AutoDecayCallback keyword arguments; None: no callback
    milestones: tuple = ()  # StepDecay: the LR is multiplied by decay_rate from each of these steps on
    decay_rate: Optional[float] = None  # StepDecay's (the config's, `peers.ScheduleSettings`)
    evaluate_at: tuple = ()  # steps to evaluate at besides the run's last one
    save_every: int = 0  # the trunk: a checkpoint every this many steps
    resume_from: Optional[str] = None  # a trunk checkpoint folder to continue from
    label: str = ""  # e.g. "cosine_40" (`peers.label`)
    early_stopping: int = 0  # EarlyStoppingCallback's patience in evaluations; 0: none
    save_model: bool = False  # save the final model into output_dir (the pre-trained model)


def step_decay_factor(step: int, warmup_steps: int, milestones: tuple, decay_rate: float) -> float:
    """StepDecay's LR multiplier: a linear warmup, then x decay_rate at each milestone reached."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return decay_rate ** sum(step >= m for m in milestones)


def step_decay(spec: RunSpec, task: LMTask):
    """StepDecay's LR multiplier as a function of the step, with the task's warmup."""
    return functools.partial(step_decay_factor, warmup_steps=task.warmup_steps, milestones=spec.milestones,
                             decay_rate=spec.decay_rate)


class FixedScheduleTrainer(Trainer):
    """A Trainer whose LR multiplier is a given function of the step: a schedule the Trainer has no
    `lr_scheduler_type` for (StepDecay)."""

    def __init__(self, *args, lr_lambda, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_lambda = lr_lambda

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, self.lr_lambda)
        return self.lr_scheduler


class EvaluateAt(TrainerCallback):
    """Asks the Trainer to evaluate after the given steps (the frontier budgets of one long run)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_evaluate = True
        return control


def lr_multipliers(spec: RunSpec, task: LMTask) -> list[float]:
    """The schedule's LR multiplier for updates 0..max_steps, as the run's Trainer builds it."""
    if spec.milestones:
        return [step_decay(spec, task)(step) for step in range(spec.max_steps + 1)]
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(
        spec.trainer.get("lr_scheduler_type", DEFAULT_SCHEDULE), optimizer=probe, num_warmup_steps=task.warmup_steps,
        num_training_steps=spec.max_steps, scheduler_specific_kwargs=spec.trainer.get("lr_scheduler_kwargs"),
    )
    return [fn(step) for fn in scheduler.lr_lambdas[:1] for step in range(spec.max_steps + 1)]


def shared_prefix(branch: list[float], trunk: list[float]) -> int:
    """The last step k at which a run resumed from the trunk's checkpoint after k updates continues
    exactly as the branch schedule would have: both schedules agree on every update up to k (the
    optimizer's LR at the checkpoint is the trunk's multiplier for update k)."""
    agree = 0
    for step, (a, b) in enumerate(zip(branch, trunk)):
        if abs(a - b) > 1e-12:
            break
        agree = step
    return agree


@functools.lru_cache(maxsize=2)
def load_data(task: LMTask, seed: int):
    """The vocabulary's size, the seed's training windows (budget_steps x batch_size, read in order), the
    validation set and, when fine-tuning, the test set (else None)."""
    corpus = read_corpus(task.corpus_dir, list(task.files), task.corpus_sha256, task.validation_chars,
                         task.validation_block, task.validation_every)
    train, validation, test = corpus.train, corpus.validation, None
    if task.finetune is not None:
        text = read_finetune_text(corpus.vocabulary, task.finetune)
        train, validation, test = text.train, text.validation, ValidationWindows(text.test, task.context)
    windows = TrainWindows(train, task.context, task.budget_steps * task.batch_size, seed)
    return len(corpus.vocabulary), windows, ValidationWindows(validation, task.context), test


def initial_model(task: LMTask, seed: int, vocab_size: int):
    """A fresh GPT-2 from the seed, or the pre-trained one when fine-tuning."""
    if task.init_from is None:
        return make_model(vocab_size, task.context, task.n_layer, task.n_embd, task.n_head, seed)
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(task.init_from)
    if model.config.vocab_size != vocab_size:
        raise ValueError(f"the model in {task.init_from} has {model.config.vocab_size} characters, the corpus "
                         f"{vocab_size}: it was not pre-trained on this corpus")
    model.loss_type = "ForCausalLM"
    return model


def training_arguments(spec: RunSpec, task: LMTask) -> TrainingArguments:
    settings = dict(
        output_dir=spec.output_dir, max_steps=spec.max_steps, per_device_train_batch_size=task.batch_size,
        per_device_eval_batch_size=task.eval_batch_size, learning_rate=task.lr, warmup_steps=task.warmup_steps,
        logging_steps=task.logging_steps, seed=spec.seed, train_sampling_strategy="sequential",
        save_strategy="steps" if spec.save_every else "no", save_steps=spec.save_every or 500,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False, log_level="warning",
        lr_scheduler_type=DEFAULT_SCHEDULE,
    )
    settings.update(spec.trainer)
    return TrainingArguments(**settings)


def train_run(task: LMTask, spec: RunSpec) -> dict:
    """Train one run, evaluate at `evaluate_at` and at its last step; the validation loss (nats per
    character) at each, the training-loss log, AutoDecay's decisions, and the wall time. Fine-tuning: also
    the test loss of the model the user is handed (`handed_scores`)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.set_num_threads(1)
    vocab_size, train, validation, test = load_data(task, spec.seed)
    callbacks = [EvaluateAt(s for s in spec.evaluate_at if s < spec.max_steps)]
    autodecay = AutoDecayCallback(**spec.autodecay) if spec.autodecay is not None else None
    if autodecay is not None:
        callbacks.append(autodecay)
    if spec.early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=spec.early_stopping))
    kwargs = dict(model=initial_model(task, spec.seed, vocab_size), args=training_arguments(spec, task),
                  train_dataset=train, eval_dataset=validation, callbacks=callbacks)
    if spec.milestones:
        trainer = FixedScheduleTrainer(lr_lambda=step_decay(spec, task), **kwargs)
    else:
        trainer = Trainer(**kwargs)
    trainer.remove_callback(PrinterCallback)  # the benchmark prints one line per run instead
    trainer.train(resume_from_checkpoint=spec.resume_from)
    if spec.save_model:
        trainer.save_model(spec.output_dir)
    history = trainer.state.log_history
    scores = handed_scores(trainer, test, spec) if test is not None else {}
    if test is None and not any(e.get("step") == trainer.state.global_step and "eval_loss" in e for e in history):
        trainer.evaluate()
    evals = [{"step": e["step"], "val_loss": e["eval_loss"]} for e in history if "eval_loss" in e]
    return {
        "peer": spec.peer, "label": spec.label or spec.peer, "seed": spec.seed, "max_steps": spec.max_steps,
        "steps": trainer.state.global_step, "val_loss": evals[-1]["val_loss"] if evals else None, "evals": evals,
        **scores,
        "train_log": [{"step": e["step"], "loss": e["loss"], "lr": e.get("learning_rate")}
                      for e in history if "loss" in e],
        "autodecay": autodecay.history if autodecay is not None else None,
        "resumed_from": _checkpoint_step(spec.resume_from),
        "validation_predictions": validation.predictions,
        "evaluate_at": list(spec.evaluate_at),
        "wall_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
    }


def handed_scores(trainer: Trainer, test: ValidationWindows, spec: RunSpec) -> dict:
    """Fine-tuning: the validation and test loss of the model the user is handed (with
    load_best_model_at_end, the best checkpoint's; else the final one) and, where the Trainer swapped in the
    best checkpoint, the test loss of the last model too (what the cooldown ended with). Then the run's
    checkpoints are removed (not the trunk's: branches resume from them)."""
    evaluated = [e for e in trainer.state.log_history if "eval_loss" in e]  # during training, before this
    handed = trainer.evaluate(test, metric_key_prefix="test")["test_loss"]
    best = trainer.state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    scores = {"test_loss": handed, "test_predictions": test.predictions, "best_step": None, "last_test_loss": None,
              "handed_val_loss": evaluated[-1]["eval_loss"] if evaluated else None}
    if best is not None:
        scores["best_step"] = _checkpoint_step(best)
        scores["handed_val_loss"] = trainer.state.best_metric
        last = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        if last.is_dir() and str(last) != best:
            trainer.model = trainer.model_wrapped = type(trainer.model).from_pretrained(last)
            scores["last_test_loss"] = trainer.evaluate(test, metric_key_prefix="last")["last_loss"]
        else:
            scores["last_test_loss"] = handed
    trainer.state.log_history[:] = [e for e in trainer.state.log_history if not {"test_loss", "last_loss"} & set(e)]
    if not spec.save_every:
        for folder in Path(trainer.args.output_dir).glob("checkpoint-*"):
            shutil.rmtree(folder)
    return scores


def _checkpoint_step(folder: Optional[str]) -> Optional[int]:
    if folder is None:
        return None
    return json.loads((Path(folder) / "trainer_state.json").read_text())["global_step"]
