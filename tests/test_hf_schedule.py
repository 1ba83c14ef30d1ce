"""How the callback drives the Trainer's scheduler: param groups keep their ratios and a group added
mid-run joins the schedule; budget boundaries hold exactly under any logging; schedulers that cannot
compose are refused with what to write instead."""

import pytest
import torch
from torch import nn
from hf_trainer_tasks import LR, MLP, STEP, EventRun, loss_logs, user_trainer

BUDGET_ONLY = {**STEP, "patience": 10**6}  # no plateau ever lasts this long: every stage ends at its budget share


def falling(length=1500):
    return [1.0 - i / 3000 for i in range(length)]


def test_param_groups_keep_their_ratio_and_a_group_added_mid_run_joins_the_schedule():
    from hf_integration import AutoDecayCallback

    run = EventRun(AutoDecayCallback(**BUDGET_ONLY), max_steps=1500, group_lrs=[1.0, 0.1])
    run.feed(falling()[:300])
    run.optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.5})
    run.feed(falling()[300:])
    assert [h["update"] for h in run.callback.history] == [500, 1000, 1500]
    assert run.used[300] == [1.0, 0.1]
    assert run.used[301] == run.used[500] == [1.0, 0.1, 0.5]  # its LR as added is its stage-0 rate
    assert run.used[501] == pytest.approx([0.1, 0.01, 0.05], rel=1e-12)  # decayed with the others
    assert run.used[1001] == pytest.approx([0.01, 0.001, 0.005], rel=1e-12)
    assert all(run.logs[s]["learning_rate"] == run.used[s][0] for s in run.logs)


class FrozenFirstLayerMLP(MLP):
    def __init__(self):
        super().__init__()
        self.net[0].requires_grad_(False)


@pytest.mark.slow
def test_a_backbone_unfrozen_mid_run_is_decayed_with_the_rest(tmp_path):
    from hf_trainer_callbacks import LRRecorder, UnfreezeAt

    from hf_integration import AutoDecayCallback, find_autodecay_callback

    recorder = LRRecorder()
    trainer = user_trainer(tmp_path, [AutoDecayCallback(**STEP), UnfreezeAt(100), recorder],
                           model_class=FrozenFirstLayerMLP, save_strategy="no")
    trainer.train()
    history = find_autodecay_callback(trainer).history
    decays = [h["update"] for h in history if h["action"] == "decay"]
    assert decays and decays[0] > 100 and history[-1]["action"] == "finish"
    groups = len(trainer.optimizer.param_groups)
    for step, used in recorder.used.items():
        stage = sum(step > d for d in decays)
        assert len(used) == (groups if step > 100 else groups - 1)
        assert used == pytest.approx([LR * 0.1**stage] * len(used), rel=1e-12), step


@pytest.mark.parametrize("logging", [{"logging_strategy": "epoch"}, {"logging_steps": 30}],
                         ids=["logging_strategy=epoch", "logging_steps=30"])
def test_budget_boundaries_hold_exactly_under_coarse_logging(logging):
    from hf_integration import AutoDecayCallback

    with pytest.warns(UserWarning, match="loss logs per AutoDecay window"):
        run = EventRun(AutoDecayCallback(**BUDGET_ONLY), max_steps=1500, steps_per_epoch=64, **logging)
    run.feed(falling())
    assert [(h["update"], h["action"], h["reason"]) for h in run.callback.history] == [
        (500, "decay", "budget"), (1000, "decay", "budget"), (1500, "finish", "budget")]
    assert run.used[500] == [1.0] and run.used[501] == [0.1]


@pytest.mark.slow  # a real Trainer: seconds to import
@pytest.mark.parametrize(
    "scheduler, absent",
    [(lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=1500), "lr_scheduler_type='linear'"),
     (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=100), "lr_scheduler_type='linear'")],
    ids=["OneCycleLR", "StepLR"],
)
def test_a_scheduler_of_your_own_is_refused_with_what_composes(tmp_path, scheduler, absent):
    from hf_integration import AutoDecayCallback

    trainer = user_trainer(tmp_path, [AutoDecayCallback()], optimizer=lambda p: torch.optim.SGD(p, lr=LR),
                           scheduler=scheduler)
    with pytest.raises(ValueError) as raised:
        trainer.train()
    said = str(raised.value)
    name = type(trainer.lr_scheduler).__name__
    assert f"a {name} passed to the Trainer" in said and "lr_scheduler_type='constant_with_warmup'" in said
    assert "LambdaLR" in said and absent not in said


@pytest.mark.slow
def test_a_lambda_lr_of_your_own_composes(tmp_path):
    from hf_integration import AutoDecayCallback

    trainer = user_trainer(tmp_path, [AutoDecayCallback(**STEP)], optimizer=lambda p: torch.optim.SGD(p, lr=LR),
                           scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
                           max_steps=20, save_strategy="no")
    trainer.train()
    logs = loss_logs(trainer)
    assert [e["autodecay/stage"] for e in logs.values()] == [0, 1, 1, 2]  # budget shares of 20 steps
    assert all(e["learning_rate"] == pytest.approx(LR * 0.1 ** e["autodecay/stage"]) for e in logs.values())
