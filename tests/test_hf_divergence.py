"""A diverged Trainer run stops with an error naming the divergence; it is never decayed, finished as a
plateau or checkpointed with NaN weights. One non-finite batch that the optimizer skips is not divergence.
"""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from hf_trainer_tasks import MLP, STEP, EventRun, user_trainer

NAN_FROM = 101  # the training step whose batch is NaN


class NaNBatchMLP(MLP):
    """The batch of training step ``NAN_FROM`` (and, with ``only_once=False``, every later one) is NaN."""

    def __init__(self, only_once=False):
        super().__init__()
        self.calls, self.only_once = 0, only_once

    def forward(self, x, labels=None):
        if self.training:
            self.calls += 1
            if self.calls == NAN_FROM or (self.calls > NAN_FROM and not self.only_once):
                x = x * math.nan
        return super().forward(x, labels)


class SkipNonFiniteSGD(torch.optim.SGD):
    """Skips an update whose gradients are not finite, as a mixed-precision grad scaler does."""

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            return super().step(closure)
        return None


def checkpoint_steps(out):
    return sorted(int(p.name.split("-")[1]) for p in Path(out).glob("checkpoint-*"))


@pytest.mark.slow
@pytest.mark.parametrize("nan_filter", [True, False], ids=["logging_nan_inf_filter", "no-filter"])
def test_a_run_whose_loss_turns_nan_stops_with_a_divergence_error(tmp_path, nan_filter):
    from hf_integration import AutoDecayCallback, find_autodecay_callback

    callback = AutoDecayCallback()
    trainer = user_trainer(tmp_path, [callback], model_class=NaNBatchMLP, save_steps=10,
                           logging_nan_inf_filter=nan_filter)
    with pytest.raises(FloatingPointError, match=r"diverged.*steps 110 and 120.*from step 100 or earlier"):
        trainer.train()
    # no decision was taken on the NaN logs (the budget share is 500 steps, no plateau yet by step 100)
    assert find_autodecay_callback(trainer).history == []
    assert find_autodecay_callback(trainer).detector.update == 100
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged][-2:] == [110, 120]
    assert all("autodecay/decision" not in e for e in logged)
    # no checkpoint after the last finite loss log, and every checkpoint written holds finite weights
    assert checkpoint_steps(tmp_path) == list(range(10, 101, 10))
    weights = load_file(tmp_path / "checkpoint-100" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_one_nan_batch_that_the_optimizer_skips_is_not_divergence(tmp_path):
    """Logging every step, the NaN batch is a whole log of non-finite losses: left out, not divergence."""
    from hf_integration import AutoDecayCallback, find_autodecay_callback

    trainer = user_trainer(tmp_path, [AutoDecayCallback(**STEP)], logging_steps=1, save_steps=NAN_FROM,
                           model_class=lambda: NaNBatchMLP(only_once=True),
                           optimizer=lambda params: SkipNonFiniteSGD(params, lr=3.0))
    trainer.train()
    history = find_autodecay_callback(trainer).history
    assert history[-1]["action"] == "finish" and all(h["reason"] == "plateau" for h in history)
    entry = next(e for e in trainer.state.log_history if e.get("step") == NAN_FROM and "loss" in e)
    assert entry["loss"] == 0.0 and "autodecay/ignored" in entry  # the filter's 0.0, left out
    assert NAN_FROM not in checkpoint_steps(tmp_path)  # its gradient was NaN: no checkpoint there
    assert 2 * NAN_FROM in checkpoint_steps(tmp_path)


@pytest.mark.parametrize(
    "logs, trusted, all_nonfinite",
    [({"loss": 0.5, "grad_norm": 1.2}, True, False),
     ({"loss": 0.5}, True, False),
     ({"loss": 0.0, "grad_norm": 0.0}, True, False),  # a true zero loss has a zero gradient
     ({"loss": 0.0, "grad_norm": math.nan}, False, True),  # the NaN filter: nothing finite since the last log
     ({"loss": 0.44, "grad_norm": math.nan}, False, False),  # the last updates non-finite (or a skipped overflow)
     ({"loss": 0.5, "grad_norm": math.inf}, False, False),
     ({"loss": math.nan, "grad_norm": math.nan}, False, True),  # the filter off
     ({"loss": math.nan}, False, True),
     ({"loss": math.inf, "grad_norm": 2.0}, False, False)],  # one bad batch, recovered by the last update
)
def test_what_a_loss_log_says(logs, trusted, all_nonfinite):
    from hf_integration.loss_logs import read_loss_log

    log = read_loss_log(logs)
    assert (log.trusted, log.all_nonfinite) == (trusted, all_nonfinite)


@pytest.mark.parametrize("nan_filter, stop", [(True, 520), (False, 510)], ids=["logging_nan_inf_filter", "no-filter"])
def test_nan_losses_take_no_decision_even_across_a_budget_boundary(nan_filter, stop):
    """The stream turns NaN 5 steps before the first budget boundary (step 500 of 1500): no decay there."""
    from hf_integration import AutoDecayCallback

    run = EventRun(AutoDecayCallback(patience=10_000), max_steps=1500, nan_filter=nan_filter)
    run.feed([1.0 - i / 2000 for i in range(495)])
    with pytest.raises(FloatingPointError, match="diverged"):
        run.feed([math.nan] * 100)
    assert run.callback.history == [] and run.state.global_step == stop
    assert run.logs[500]["autodecay/ignored"] and "autodecay/decision" not in run.logs[500]


def test_a_nan_batch_the_run_recovers_from_keeps_the_budget_boundary():
    """The NaN filter off, one NaN loss at step 495 and a finite gradient by step 500 (the batch was
    skipped): the log at 500 is NaN, its loss unknown, but stage 0 still ends at its budget share, 500."""
    from hf_integration import AutoDecayCallback

    run = EventRun(AutoDecayCallback(**STEP, patience=10_000), max_steps=1500, nan_filter=False)
    losses = [1.0 - i / 2000 for i in range(1500)]
    losses[494] = math.nan
    run.feed(losses)
    assert math.isnan(run.logs[500]["loss"]) and run.logs[500]["autodecay/ignored"]
    assert [(h["update"], h["reason"]) for h in run.callback.history] == [(500, "budget"), (1000, "budget"),
                                                                            (1500, "budget")]
    assert run.callback.detector.nonfinite_losses == 0  # left out, not counted as losses
