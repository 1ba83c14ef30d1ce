"""AutoDecayLR's state: a checkpoint written by an older release resumes; a damaged one is refused whole."""
import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch

from timm_autodecay import AutoDecayLR

DATA = Path(__file__).with_name("data")
RELEASE_0_1_0 = DATA / "state_0.1.0_torch.json"
SHAPE = dict(total_updates=3000, updates_per_epoch=100)


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
    optimizer = two_group_optimizer()
    reference = run(AutoDecayLR(optimizer, **SHAPE), optimizer, losses)
    unbroken = AutoDecayLR(two_group_optimizer(), **SHAPE)
    run(unbroken, unbroken.optimizer, losses)

    optimizer = two_group_optimizer()
    sched = AutoDecayLR(optimizer, **SHAPE)
    sched.load_state_dict(state)
    assert sched.stage == 1 and [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.002])
    resumed = run(sched, optimizer, losses[1302:])
    assert resumed == reference[1302:]
    assert sched.history == unbroken.history and sched.finished
    json.dumps(sched.state_dict())  # and its state is JSON again
