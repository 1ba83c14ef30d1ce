"""What the Trainer callback's tests share: a tiny task trained by a real Trainer as a user writes it, and
a model-free run of the Trainer's event order for tests that need thousands of steps in milliseconds.

The task: a 64-unit MLP on a fixed random 4-class problem with 10% label noise, trained with SGD at a
learning rate high enough that the loss stalls: each stage plateaus clearly, so the default detector
ends stages well before the budget.
"""
import json
import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

# The step shape, for the tests of its mechanics (decays between stages), whatever the callback's default
STEP = {"decay_shape": "step"}
MAX_STEPS = 1500  # default window = 1500 / 3 / 5 = 100 steps = 10 logs of 10 steps
LR = 3.0


class NoisyClassification(torch.utils.data.Dataset):
    """2048 fixed points, labels from a random linear map, 10% of them replaced by random labels."""

    def __init__(self, n=2048, dim=16, classes=4, noise=0.1, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        labels = (self.x @ torch.randn(dim, classes, generator=g)).argmax(1)
        flip = torch.rand(n, generator=g) < noise
        labels[flip] = torch.randint(0, classes, (int(flip.sum()),), generator=g)
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.labels[i]}


class MLP(nn.Module):
    def __init__(self, dim=16, hidden=64, classes=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class RankLossMLP(MLP):
    """Also keeps this process's own (not yet averaged) batch losses: the two-process test checks that
    the ranks train on different data and still see the same logged loss."""

    def __init__(self):
        super().__init__()
        self.local_losses = []

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if self.training:
            self.local_losses.append(out["loss"].item())
        return out


def user_trainer(output_dir, callbacks, eval_dataset=None, model_class=MLP, optimizer=None, scheduler=None,
                 train_dataset=None, compute_metrics=None, **overrides):
    """A Trainer as a user writes it: nothing AutoDecay-specific but the callback. ``optimizer``: a function
    of the model's parameters building the optimizer the Trainer is given (else it builds ``optim``);
    ``scheduler``: a function of that optimizer building the scheduler it is given."""
    from transformers import Trainer, TrainingArguments  # seconds to import: only the tests that train pay

    settings = dict(
        output_dir=str(output_dir), max_steps=MAX_STEPS, logging_steps=10, lr_scheduler_type="constant",
        learning_rate=LR, optim="sgd", per_device_train_batch_size=32, save_steps=100, seed=0,
        report_to=[], disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
    )
    settings.update(overrides)
    torch.manual_seed(0)
    model = model_class()
    built = None if optimizer is None else optimizer(model.parameters())
    optimizers = (built, None if scheduler is None else scheduler(built))
    return Trainer(model=model, args=TrainingArguments(**settings), callbacks=callbacks, optimizers=optimizers,
                   train_dataset=train_dataset or NoisyClassification(), eval_dataset=eval_dataset,
                   compute_metrics=compute_metrics)


def loss_logs(trainer):
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


class EventRun:
    """The Trainer's event order around a callback (optimizer step, scheduler step, ``on_step_end``,
    ``on_epoch_end``, log, save) with per-update losses given instead of a model: thousands of steps in
    milliseconds, through the real ``DefaultFlowCallback``, ``TrainingArguments`` and scheduler.

    Losses are logged as the Trainer logs them, its NaN filter included: a non-finite loss adds the running
    sum over the updates so far plus one; ``grad_norm`` is that of the last update (NaN after a non-finite
    loss unless given). ``used[step]``: the LRs step ``step`` ran with; ``logs[step]``: the logged dict;
    ``saved[step]``: the callback's trainer_state.json entry at each checkpoint, as JSON.

    Evaluations: with ``eval_steps``, every ``eval_steps`` steps (and at the end) ``metrics(step)`` gives the
    evaluation's metrics (``{"eval_loss": ...}``), logged and passed to ``on_evaluate`` between the step's loss
    log and its checkpoint, as the Trainer does; ``evals[step]``: the logged entry. ``arguments``: more
    TrainingArguments (``metric_for_best_model``, ``greater_is_better``, ``load_best_model_at_end``).
    """

    def __init__(self, callback, max_steps, logging_steps=10, lr=1.0, schedule="constant_with_warmup",
                 warmup_steps=0, save_steps=0, logging_strategy="steps", steps_per_epoch=None, group_lrs=None,
                 resume=None, nan_filter=True, min_lr_rate=None, eval_steps=0, metrics=None, **arguments):
        from transformers import DefaultFlowCallback, TrainerControl, TrainerState, TrainingArguments, get_scheduler

        self.args = TrainingArguments(
            output_dir="unused", max_steps=max_steps, logging_steps=logging_steps, logging_strategy=logging_strategy,
            save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, lr_scheduler_type=schedule,
            warmup_steps=warmup_steps, learning_rate=lr, report_to=[], use_cpu=True, logging_nan_inf_filter=nan_filter,
            eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps or None, **arguments)
        self.metrics = metrics
        group_lrs = group_lrs or [lr]
        self.params = [nn.Parameter(torch.zeros(1)) for _ in group_lrs]
        self.optimizer = torch.optim.SGD([{"params": [p], "lr": g} for p, g in zip(self.params, group_lrs)], lr=lr)
        self.scheduler = get_scheduler(schedule, self.optimizer, num_warmup_steps=warmup_steps,
                                       num_training_steps=max_steps)
        self.callback = callback
        self.flow = DefaultFlowCallback()
        self.state = TrainerState(stateful_callbacks=[callback])
        self.state.max_steps, self.state.logging_steps = max_steps, logging_steps
        self.state.save_steps, self.state.num_train_epochs = save_steps or 500, 1
        self.state.eval_steps = eval_steps or 500
        self.steps_per_epoch = steps_per_epoch or max_steps
        if steps_per_epoch:
            self.state.num_train_epochs = math.ceil(max_steps / steps_per_epoch)
        self.optimizer.step()  # no gradients: changes nothing (no later step does), but the scheduler wants one
        if resume is not None:
            step, entry = resume
            self.state.global_step = step
            self.state.stateful_callbacks = {type(callback).__name__: json.loads(entry)}
            self.scheduler.last_epoch = step  # as scheduler.pt restores it (the callback then sets the LRs)
        self.nan_filter = nan_filter
        self.control = TrainerControl()
        self.used, self.logs, self.saved, self.evals = {}, {}, {}, {}
        self.stopped = False
        self._loss_sum, self._last_logged, self._grad_norm = 0.0, self.state.global_step, None
        self._event("on_train_begin")

    def _event(self, name, **kwargs):
        for callback in (self.flow, self.callback):
            result = getattr(callback, name)(self.args, self.state, self.control, optimizer=self.optimizer,
                                             lr_scheduler=self.scheduler, **kwargs)
            if result is not None:
                self.control = result

    def feed(self, losses, grad_norms=None):
        """One optimizer update per loss (stops at the end of training)."""
        for i, loss in enumerate(losses):
            if self.stopped:
                return
            self.step(loss, None if grad_norms is None else grad_norms[i])

    def feed_logged(self, values):
        """Updates whose logged means are ``values`` (each logging interval's updates all equal)."""
        for value in values:
            self.feed([value] * self.state.logging_steps)

    def step(self, loss, grad_norm=None):
        step = self.state.global_step + 1
        self._event("on_step_begin")
        self.used[step] = [group["lr"] for group in self.optimizer.param_groups]
        self._event("on_optimizer_step")
        learning_rate = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.state.global_step = step
        self.state.epoch = step / self.steps_per_epoch
        if math.isfinite(loss) or not self.nan_filter:
            self._loss_sum += loss
        else:
            self._loss_sum += self._loss_sum / (1 + step - 1 - self._last_logged)
        self._grad_norm = grad_norm if grad_norm is not None else (1.0 if math.isfinite(loss) else math.nan)
        self._event("on_step_end")
        self._log_and_save(learning_rate)
        if step % self.steps_per_epoch == 0 or step >= self.state.max_steps:
            self._event("on_epoch_end")
            self._log_and_save(learning_rate)
        self.stopped = self.control.should_training_stop

    def _log_and_save(self, learning_rate):
        step = self.state.global_step
        if self.control.should_log and step > self._last_logged:
            logs = {"loss": self._loss_sum / (step - self._last_logged), "grad_norm": self._grad_norm,
                    "learning_rate": learning_rate}
            self._loss_sum, self._last_logged = 0.0, step
            self.state.log_history.append({**logs, "step": step})
            self._event("on_log", logs=logs)
            self.logs[step] = logs
        self.control.should_log = False
        if self.control.should_evaluate:
            self.control.should_evaluate = False
            metrics = dict(self.metrics(step))
            self.evals[step] = {**metrics, "step": step}
            self.state.log_history.append(self.evals[step])
            self._event("on_log", logs=metrics)
            self._event("on_evaluate", metrics=metrics)
        if self.control.should_save:
            self.saved[step] = json.dumps(self.callback.state(), sort_keys=True)
            self.control.should_save = False


def two_process_worker(out_dir):
    """One rank of the two-process test: the same user-written run, its decisions and LRs to JSON."""
    from hf_trainer_callbacks import LRRecorder

    from hf_integration import AutoDecayCallback, find_autodecay_callback

    recorder = LRRecorder()
    trainer = user_trainer(out_dir / "run", [AutoDecayCallback(**STEP), recorder], model_class=RankLossMLP,
                           per_device_train_batch_size=16, ddp_backend="gloo",
                           ddp_find_unused_parameters=False)
    trainer.train()
    rank = trainer.args.process_index
    result = {
        "world_size": trainer.args.world_size,
        "parallel_mode": trainer.args.parallel_mode.value,
        "local_losses": trainer.model.local_losses[:20],
        "logged_losses": {s: e["loss"] for s, e in loss_logs(trainer).items()},
        "history": find_autodecay_callback(trainer).history,
        "lrs": {s: e["learning_rate"] for s, e in loss_logs(trainer).items()},
        "used": recorder.used,
        "global_step": trainer.state.global_step,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()  # else gloo can hang at interpreter exit


def overfitting_split():
    """256 training points of the task (their noisy labels soon learnt by heart) and 1024 held-out ones: the
    training loss falls all along while the held-out accuracy peaks early (near step 250 at LR 3)."""
    task = NoisyClassification()
    return torch.utils.data.Subset(task, range(256)), torch.utils.data.Subset(task, range(1024, 2048))


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def eval_trainer(output_dir, callbacks, compute_metrics=accuracy, **overrides):
    """The user's run with the evaluation signal on: evaluate every 50 steps, keep the best model by accuracy."""
    train, held_out = overfitting_split()
    settings = dict(eval_strategy="steps", eval_steps=50, metric_for_best_model="accuracy", save_steps=50,
                    load_best_model_at_end=True, per_device_eval_batch_size=1024)
    return user_trainer(output_dir, callbacks, train_dataset=train, eval_dataset=held_out,
                        compute_metrics=compute_metrics, **{**settings, **overrides})


def two_process_eval_worker(out_dir):
    """One rank of the two-process evaluation test: each rank's compute_metrics adds an offset of its own to
    the gathered accuracy (rank 1's falls by 0.01 an evaluation), so the ranks see different local metrics."""
    from hf_integration import AutoDecayCallback, find_autodecay_callback

    local = []
    rank = int(os.environ["RANK"])

    def rank_local_accuracy(prediction):
        value = accuracy(prediction)["accuracy"] - 0.01 * rank * len(local)
        local.append(value)
        return {"accuracy": value}

    trainer = eval_trainer(out_dir / "run", [AutoDecayCallback()], compute_metrics=rank_local_accuracy,
                           per_device_train_batch_size=16, ddp_backend="gloo", ddp_find_unused_parameters=False,
                           save_strategy="no", load_best_model_at_end=False)
    trainer.train()
    callback = find_autodecay_callback(trainer)
    result = {"world_size": trainer.args.world_size, "local": local, "history": callback.history,
              "best_eval": callback.best_eval, "global_step": trainer.state.global_step,
              "lrs": {s: e["learning_rate"] for s, e in loss_logs(trainer).items()}}
    (out_dir / f"rank{trainer.args.process_index}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()  # else gloo can hang at interpreter exit
