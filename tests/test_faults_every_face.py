"""One fault, one answer: every fault a user may meet, run through every face (PyTorch, timm, Trainer).

Each face is driven as its users drive it, by a small adapter with the same verbs: ``step(loss)`` once per
optimizer update, ``lrs`` (every group's LR for the next update), ``add_group(lr)``, ``finished``, ``save()``
and a resume from it. The timm face gets ``train.py``'s running epoch mean and its ``step(epoch)`` at each
epoch's end; the Trainer face its real event order (``EventRun``), logging every step.
"""
import json
import math
import warnings

import pytest
import torch

UPE = 10  # updates per epoch (timm)
BUDGET = 200
COOLDOWN = {"decay_shape": "cooldown", "window": 40, "patience": 10, "min_points": 8}


def falling(n, start=0):
    """A loss still falling at the budget: stages end at their budget shares, the cooldown at 160 of 200."""
    return [0.2 + 1.8 * math.exp(-(start + i) / 400) for i in range(n)]


class SchedulerRun:
    """What the torch and timm adapters share: an optimizer with one group per LR, and a scheduler ``sched``."""

    @staticmethod
    def optimizer_for(group_lrs):
        return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in group_lrs])

    @property
    def finished(self):
        return self.sched.finished

    @property
    def lrs(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def add_group(self, lr):
        self.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr})

    def save(self):
        return json.dumps(self.sched.state_dict())


class TorchRun(SchedulerRun):
    name = "torch"

    def __init__(self, group_lrs, total=BUDGET, min_lr=0.0, warmup=0, state=None, **settings):
        from timm_autodecay import AutoDecayLR

        self.optimizer = self.optimizer_for(group_lrs)
        self.sched = AutoDecayLR(self.optimizer, total_updates=total, min_lr=min_lr, warmup_updates=warmup,
                                 **settings)
        if state is not None:
            self.sched.load_state_dict(json.loads(state))

    def step(self, loss):
        self.sched.step(loss)

    def stops_at_once(self):
        return self.finished


class TimmRun(SchedulerRun):
    """The scheduler from timm's factory, stepped as ``train.py`` steps it (``--sched-on-updates``)."""

    name = "timm"

    def __init__(self, group_lrs, total=BUDGET, min_lr=0.0, warmup=0, state=None, **settings):
        from timm.scheduler import create_scheduler_v2

        self.optimizer = self.optimizer_for(group_lrs)
        keys = {"autodecay_" + k: v for k, v in settings.items()}
        self.sched, _ = create_scheduler_v2(
            self.optimizer, sched="autodecay", num_epochs=total // UPE, updates_per_epoch=UPE, step_on_epochs=False,
            min_lr=min_lr, warmup_epochs=warmup // UPE, warmup_lr=0.0, autodecay_end_training=True, **keys)
        self.updates, self.total = 0, 0.0
        if state is not None:
            saved = json.loads(state)
            self.sched.load_state_dict(saved)
            self.updates = saved["num_updates"]

    def step(self, loss):
        self.updates += 1
        if self.updates % UPE == 1:
            self.total = 0.0
        self.total += loss
        self.sched.step_update(self.updates, metric=self.total / ((self.updates - 1) % UPE + 1))
        if self.updates % UPE == 0:
            self.sched.step(self.updates // UPE)

    def stops_at_once(self):
        from timm_autodecay.timm_loop import AutoDecayFinished

        try:
            self.optimizer.zero_grad()  # train.py's first call of the next epoch
        except AutoDecayFinished:
            return True
        return False


class TrainerRun:
    name = "trainer"

    def __init__(self, group_lrs, total=BUDGET, min_lr=0.0, warmup=0, state=None, **settings):
        from hf_trainer_tasks import EventRun

        from hf_integration import AutoDecayCallback

        resume = None if state is None else tuple(json.loads(state))
        self.run = EventRun(AutoDecayCallback(min_lr=min_lr, **settings), max_steps=total, logging_steps=1,
                            lr=group_lrs[0], group_lrs=list(group_lrs), schedule="constant", warmup_steps=warmup,
                            save_steps=1, resume=resume)

    def step(self, loss):
        self.run.step(loss)

    @property
    def finished(self):
        return self.run.callback.finished

    @property
    def lrs(self):
        return [g["lr"] for g in self.run.optimizer.param_groups]

    def add_group(self, lr):
        self.run.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr})

    def save(self):
        step = self.run.state.global_step
        return json.dumps([step, self.run.saved[step]])

    def stops_at_once(self):
        return self.run.control.should_training_stop


FACES = [TorchRun, TimmRun, TrainerRun]


def feed(run, losses):
    """LRs for the next update after each step, until the run finishes."""
    lrs = []
    for loss in losses:
        run.step(loss)
        lrs.append(run.lrs)
        if run.finished:
            break
    return lrs


@pytest.mark.parametrize("face", FACES, ids=lambda f: f.name)
def test_losses_non_finite_from_the_cooldown_to_its_end_are_an_error_never_a_finish(face):
    run = face([0.1], **COOLDOWN)
    feed(run, falling(170))
    assert run.lrs[0] < 0.1  # cooling down
    with warnings.catch_warnings(), pytest.raises(FloatingPointError):
        warnings.simplefilter("ignore")  # what each face warns on the way differs; the answer may not
        feed(run, [float("nan")] * 40)
    assert not run.finished  # a loop that checks `finished` never keeps the diverged model as final


@pytest.mark.parametrize("face", FACES, ids=lambda f: f.name)
def test_min_lr_never_raises_a_group_and_each_group_anneals_to_its_share(face):
    run = face([0.3, 0.001], min_lr=0.01, **COOLDOWN)
    lrs = feed(run, falling(BUDGET))
    assert run.finished
    assert all(lr[0] <= 0.3 + 1e-12 and lr[1] <= 0.001 + 1e-12 for lr in lrs)
    assert lrs[-1] == pytest.approx([0.01, 0.001 * 0.01 / 0.3])


@pytest.mark.parametrize("face", FACES, ids=lambda f: f.name)
def test_min_lr_at_or_above_every_group_lr_is_refused_naming_it(face):
    with pytest.raises(ValueError, match="min_lr=0.5"):
        face([0.3], min_lr=0.5, **COOLDOWN).step(1.0)


@pytest.mark.parametrize("face", FACES, ids=lambda f: f.name)
def test_a_group_added_mid_cooldown_joins_at_its_lr_then_follows_the_others(face):
    run = face([0.1], min_lr=0.001, **COOLDOWN)
    before = feed(run, falling(170))[-1][0]
    run.add_group(0.05)
    lrs = feed(run, falling(40, start=170))
    assert run.finished and before < 0.1
    # as if it had been in the run from the start: at the same share of the first group's LR ever after
    assert all(lr[1] == pytest.approx(lr[0] * 0.05 / before) for lr in lrs)
    assert lrs[0][1] < 0.05 and lrs[-1][1] == pytest.approx(0.001 * 0.05 / before)


@pytest.mark.parametrize("face", FACES, ids=lambda f: f.name)
@pytest.mark.parametrize("shape", ["step", "cooldown"])
def test_the_budget_is_a_hard_bound(face, shape):
    budget = 20 if face is TimmRun else 3  # timm counts its budget in epochs
    run = face([0.1], total=budget, decay_shape=shape)
    assert len(feed(run, falling(budget))) == budget and run.finished


@pytest.mark.parametrize("face", FACES, ids=lambda f: f.name)
def test_a_cooldown_longer_than_half_the_run_is_refused_naming_it(face):
    with pytest.raises(ValueError, match="cooldown_fraction"):
        face([0.1], cooldown_fraction=0.99).step(1.0)


@pytest.mark.parametrize("face", FACES, ids=lambda f: f.name)
def test_a_warmup_as_long_as_the_budget_is_refused_naming_it(face):
    with pytest.raises(ValueError, match="warmup"):
        face([0.1], warmup=BUDGET).step(1.0)


@pytest.mark.parametrize("face", FACES, ids=lambda f: f.name)
def test_a_resume_with_other_settings_is_refused_naming_the_setting(face):
    run = face([0.1], **COOLDOWN)
    feed(run, falling(50))
    with pytest.raises(ValueError, match="window"):
        face([0.1], state=run.save(), **{**COOLDOWN, "window": 60})


@pytest.mark.parametrize("face", FACES, ids=lambda f: f.name)
def test_resuming_a_finished_run_trains_nothing_more(face):
    run = face([0.1], **COOLDOWN)
    feed(run, falling(BUDGET))
    assert run.finished
    with pytest.warns(UserWarning) if face is TrainerRun else _nothing():
        resumed = face([0.1], state=run.save(), **COOLDOWN)
    assert resumed.finished and resumed.stops_at_once()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
