"""AutoDecayLR's state: a checkpoint written by an older release resumes; a damaged one is refused whole."""
import copy
import functools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from timm_autodecay import AutoDecayLR

DATA = Path(__file__).with_name("data")
RELEASE_0_1_0 = DATA / "state_0.1.0_torch.json"
SHAPE = dict(total_updates=3000, updates_per_epoch=100, decay_shape="step")


def two_group_optimizer(lrs=(0.1, 0.02)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)


def falling_losses(n=3000, seed=0):
    """The curve the 0.1.0 state was written on: still falling at the budget, 2% noise."""
    rng = random.Random(seed)
    return [(0.2 + 1.8 * math.exp(-i / 1000)) * (1 + 0.02 * rng.gauss(0, 1)) for i in range(n)]


def run(sched, optimizer, losses):
    lrs = []
    for loss in losses:
        optimizer.step()
        sched.step(torch.tensor(loss))
        lrs.append([group["lr"] for group in optimizer.param_groups])
        if sched.finished:
            break
    return lrs


def test_a_0_1_0_state_resumes_mid_stage_with_its_pending_losses():
    """Written by release 0.1.0's AutoDecayLR after 1302 updates of `falling_losses()` (two groups at
    0.1 and 0.02, stage 1, 6 losses not yet seen by the detector)."""
    state = json.loads(RELEASE_0_1_0.read_text())
    losses = falling_losses()
    unbroken = AutoDecayLR(two_group_optimizer(), **SHAPE)
    reference = run(unbroken, unbroken.optimizer, losses)

    optimizer = two_group_optimizer()
    sched = AutoDecayLR(optimizer, **SHAPE)
    sched.load_state_dict(state)
    assert sched.stage == 1 and [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.002])
    resumed = run(sched, optimizer, losses[1302:])
    assert resumed == reference[1302:]
    assert sched.history == unbroken.history and sched.finished
    json.dumps(sched.state_dict())  # and its state is JSON again


def test_a_0_1_0_state_under_todays_default_shape_says_to_pass_the_step_shape():
    optimizer = two_group_optimizer()
    sched = AutoDecayLR(optimizer, total_updates=3000, updates_per_epoch=100)
    with pytest.raises(ValueError, match=r"decay_shape: 'step' saved, 'cooldown' now.*pass decay_shape='step'"):
        sched.load_state_dict(json.loads(RELEASE_0_1_0.read_text()))
    assert sched.stage == 0 and [g["lr"] for g in optimizer.param_groups] == [0.1, 0.02]  # nothing applied


# -- a damaged state is refused whole, naming the bad key ----------------------------------------
@functools.lru_cache(maxsize=None)
def _saved_mid_run():
    optimizer = two_group_optimizer()
    sched = AutoDecayLR(optimizer, **SHAPE)
    run(sched, optimizer, falling_losses()[:1302])
    return json.dumps(sched.state_dict())


def saved_mid_run():
    """A state after 1302 updates of `falling_losses()` (stage 1, losses pending), a fresh copy."""
    return json.loads(_saved_mid_run())


def without(path):
    def change(state):
        *parents, key = path
        for parent in parents:
            state = state[parent]
        del state[key]
    return change


def setting(path, value):
    def change(state):
        *parents, key = path
        for parent in parents:
            state = state[parent]
        state[key] = value
    return change


# name -> (change to a good state, words the error must contain)
DAMAGED = {
    "no pending_losses": (without(["pending_losses"]), "'pending_losses' is missing"),
    "no detector.points": (without(["detector", "points"]), "'points' is missing"),
    "stage 7 of 3": (setting(["detector", "stage"], 7), "'stage'"),
    "stage as a string": (setting(["detector", "stage"], "1"), "'stage'"),
    "pending sum not a number": (setting(["pending_losses", "sum"], "x"), "'pending_losses.sum'"),
    "pending updates negative": (setting(["pending_losses", "updates"], -3), "'pending_losses.updates'"),
    "lrs not a list": (setting(["lrs"], 0.1), "'lrs'"),
    "an lr not a number": (setting(["lrs"], [0.01, "0.002"]), "'lrs[1]'"),
    "last_epoch a float": (setting(["last_epoch"], 1302.0), "'last_epoch'"),
    "last_epoch behind the detector": (setting(["last_epoch"], 10), "'last_epoch'"),
    "another decay_rate": (setting(["decay_rate"], 0.5), "'decay_rate'"),
    "a newer version": (setting(["version"], 99), "'version'"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_state_raises_value_error_naming_the_key_and_changes_nothing(case):
    change, words = DAMAGED[case]
    state = copy.deepcopy(saved_mid_run())
    change(state)
    optimizer = two_group_optimizer()
    sched = AutoDecayLR(optimizer, **SHAPE)
    run(sched, optimizer, falling_losses(seed=1)[:50])
    before, lrs = sched.state_dict(), [g["lr"] for g in optimizer.param_groups]
    with pytest.raises(Exception) as caught:
        sched.load_state_dict(state)
    assert isinstance(caught.value, ValueError), f"{type(caught.value).__name__}: {caught.value}"
    assert "AutoDecay state" in str(caught.value) and words in str(caught.value)
    assert sched.state_dict() == before and [g["lr"] for g in optimizer.param_groups] == lrs


def test_a_state_that_is_not_a_dict_is_refused():
    sched = AutoDecayLR(two_group_optimizer(), **SHAPE)
    with pytest.raises(ValueError, match="must be a dict"):
        sched.load_state_dict([1, 2, 3])


@pytest.mark.parametrize("groups", [1, 3])
def test_a_state_from_an_optimizer_with_other_param_groups_is_refused(groups):
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}
                                 for _ in range(groups)], lr=0.1)
    sched = AutoDecayLR(optimizer, **SHAPE)
    with pytest.raises(ValueError, match=f"had 2 group\\(s\\), this one has {groups}"):
        sched.load_state_dict(saved_mid_run())


def test_a_0_1_0_state_into_an_optimizer_with_other_param_groups_is_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = AutoDecayLR(optimizer, **SHAPE)
    with pytest.raises(ValueError, match="had 2 group\\(s\\), this one has 1"):
        sched.load_state_dict(json.loads(RELEASE_0_1_0.read_text()))


def test_the_state_is_json_with_a_version_and_the_lr_of_every_group():
    state = saved_mid_run()
    assert json.loads(json.dumps(state)) == state
    assert state["version"] >= 2 and state["lrs"] == pytest.approx([0.01, 0.002])


def test_a_tensor_lr_is_decayed_in_place_and_saved_as_a_float():
    lr = torch.tensor(0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    sched = AutoDecayLR(optimizer, **SHAPE)
    run(sched, optimizer, falling_losses()[:1302])
    assert optimizer.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.01)
    state = json.loads(json.dumps(sched.state_dict()))
    assert state["lrs"] == pytest.approx([0.01]) and state["base_lrs"] == pytest.approx([0.1])
