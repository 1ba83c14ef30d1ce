"""AutoDecayLR with other schedulers and with param groups added mid-run: the LR at every update."""
import math

import pytest
import torch
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR, SequentialLR

from loss_curves import stage_loss
from timm_autodecay import AutoDecayLR

BASE_LRS = (0.1, 0.02)
SHAPE = dict(total_updates=1500, window=50, decay_shape="step")
WARMUP = 10


def make_optimizer(lrs=BASE_LRS):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)


def losses(n=1500, tau=20):
    """Plateaus quickly in every stage (the stage follows the update count)."""
    return [stage_loss(min(i // 250, 2), i % 250, tau) * (1 + 0.05 * math.sin(1.3 * i)) for i in range(n)]


def warmup_factor(updates):
    """LinearLR(start_factor=0.1, total_iters=WARMUP) after ``updates`` steps."""
    return 0.1 + 0.9 * min(updates, WARMUP) / WARMUP


def run(sched, optimizer, others=(), others_first=True):
    """Step the optimizer, then the schedulers, once per update; [(lrs, stage)] after every update,
    the LRs before the first update first."""
    seen = [([g["lr"] for g in optimizer.param_groups], sched.stage)]
    for loss in losses():
        optimizer.step()
        if others_first:
            for other in others:
                other.step()
        sched.step(torch.tensor(loss))
        if not others_first:
            for other in others:
                other.step()
        seen.append(([g["lr"] for g in optimizer.param_groups], sched.stage))
        if sched.finished:
            break
    return seen


def assert_lrs(seen, expected_factor):
    """Each group's LR is its base LR times ``expected_factor(update, stage)``, at every update."""
    assert seen[-1][1] == 2, "the run must decay twice for the check to mean anything"
    for update, (lrs, stage) in enumerate(seen):
        want = [base * expected_factor(update, stage) for base in BASE_LRS]
        assert lrs == pytest.approx(want, rel=1e-9), f"update {update}, stage {stage}"


def warmed_then_decayed(update, stage):
    return warmup_factor(update) * 0.1 ** stage


def test_linear_warmup_built_before_autodecay_and_stepped_side_by_side():
    optimizer = make_optimizer()
    warmup = LinearLR(optimizer, start_factor=0.1, total_iters=WARMUP)
    sched = AutoDecayLR(optimizer, warmup_updates=WARMUP, **SHAPE)
    assert_lrs(run(sched, optimizer, [warmup]), warmed_then_decayed)


@pytest.mark.parametrize("others_first", [True, False], ids=["warmup-stepped-first", "autodecay-stepped-first"])
def test_linear_warmup_built_after_autodecay_in_either_step_order(others_first):
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, warmup_updates=WARMUP, **SHAPE)
    warmup = LinearLR(optimizer, start_factor=0.1, total_iters=WARMUP)
    assert_lrs(run(sched, optimizer, [warmup], others_first), warmed_then_decayed)


def test_autodecay_own_warmup_ramps_like_linear_lr():
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, warmup_updates=WARMUP, warmup_start_factor=0.1, **SHAPE)
    assert_lrs(run(sched, optimizer), warmed_then_decayed)


def test_warmup_losses_are_kept_from_the_detector_in_every_composition():
    histories = []
    for build in ("linear-first", "own"):
        optimizer = make_optimizer()
        if build == "own":
            sched = AutoDecayLR(optimizer, warmup_updates=WARMUP, warmup_start_factor=0.1, **SHAPE)
            run(sched, optimizer)
        else:
            warmup = LinearLR(optimizer, start_factor=0.1, total_iters=WARMUP)
            sched = AutoDecayLR(optimizer, warmup_updates=WARMUP, **SHAPE)
            run(sched, optimizer, [warmup])
        histories.append(sched.history)
    assert histories[0] == histories[1] and histories[0][0]["update"] > WARMUP


def test_sequential_lr_is_refused_when_it_is_built_saying_what_to_write():
    optimizer = make_optimizer()
    warmup = LinearLR(optimizer, start_factor=0.1, total_iters=WARMUP)
    sched = AutoDecayLR(optimizer, warmup_updates=WARMUP, **SHAPE)
    with pytest.raises(TypeError, match="SequentialLR") as caught:
        SequentialLR(optimizer, [warmup, sched], milestones=[WARMUP])
    assert "warmup_start_factor" in str(caught.value) and "side by side" in str(caught.value)


def test_chained_scheduler_is_refused_at_its_first_step_saying_what_to_write():
    optimizer = make_optimizer()
    chained = ChainedScheduler([LinearLR(optimizer, start_factor=0.1, total_iters=WARMUP),
                                AutoDecayLR(optimizer, warmup_updates=WARMUP, **SHAPE)])
    optimizer.step()
    with pytest.raises(TypeError, match="needs the training loss") as caught:
        chained.step()
    assert "warmup_start_factor" in str(caught.value)


@pytest.mark.parametrize("kwargs, named", [
    ({"warmup_start_factor": 0.1}, "warmup_updates"),  # a ramp needs a length
    ({"warmup_updates": 10, "warmup_start_factor": 0.0}, "warmup_start_factor"),
    ({"warmup_updates": 10, "warmup_start_factor": 1.5}, "1.5"),
])
def test_bad_warmup_settings_are_refused_naming_them(kwargs, named):
    with pytest.raises(ValueError, match=named):
        AutoDecayLR(make_optimizer(), **SHAPE, **kwargs)


# -- param groups added mid-run ----------------------------------------------------------------
@pytest.mark.parametrize("added_in", [0, 1], ids=["stage-0", "stage-1"])
def test_a_group_added_mid_run_keeps_its_lr_until_the_next_decay_then_decays_with_the_others(added_in):
    optimizer = make_optimizer()
    reference = AutoDecayLR(optimizer, **SHAPE)
    run(reference, optimizer)
    ends = [0] + [h["update"] for h in reference.history]
    added_at = (ends[added_in] + ends[added_in + 1]) // 2
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **SHAPE)
    backbone = torch.nn.Parameter(torch.zeros(3))
    stage_when_added, seen = None, []
    for update, loss in enumerate(losses(), start=1):
        if update == added_at:
            optimizer.add_param_group({"params": [backbone], "lr": 0.05})  # unfreeze the backbone
            stage_when_added = sched.stage
        optimizer.step()
        sched.step(loss)
        seen.append(([g["lr"] for g in optimizer.param_groups], sched.stage))
        if sched.finished:
            break
    assert seen[-1][1] == 2 and stage_when_added == added_in
    for update, (lrs, stage) in enumerate(seen, start=1):
        assert lrs[:2] == pytest.approx([base * 0.1 ** stage for base in BASE_LRS], rel=1e-9)
        if update >= added_at:
            assert lrs[2] == pytest.approx(0.05 * 0.1 ** (stage - stage_when_added), rel=1e-9), f"update {update}"


def test_a_resumed_run_with_a_group_added_before_the_checkpoint_continues_exactly():
    def fresh(groups):
        optimizer = make_optimizer(BASE_LRS + (0.05,) * (groups - 2))
        return optimizer, AutoDecayLR(optimizer, **SHAPE)

    def go(optimizer, sched, series):
        out = []
        for loss in series:
            optimizer.step()
            sched.step(loss)
            out.append([g["lr"] for g in optimizer.param_groups])
            if sched.finished:
                break
        return out

    series = losses()
    optimizer, sched = fresh(2)
    head = go(optimizer, sched, series[:100])
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.05})
    head += go(optimizer, sched, series[100:203])
    state = sched.state_dict()
    reference = head + go(optimizer, sched, series[203:])
    assert reference[-1][2] < reference[len(head) - 1][2] < 0.05, "a decay on each side of the checkpoint"

    optimizer, sched = fresh(3)  # the optimizer rebuilt with the group it had at the checkpoint
    sched.load_state_dict(state)
    assert head + go(optimizer, sched, series[203:]) == reference


def resume_at(cut):
    """LRs after every update of a run resumed at update ``cut`` of its own warmup ramp, and of the
    unbroken run; only the scheduler's state is loaded (it restores the LRs)."""
    def fresh():
        optimizer = make_optimizer()
        return optimizer, AutoDecayLR(optimizer, warmup_updates=WARMUP, warmup_start_factor=0.1, **SHAPE)

    def go(optimizer, sched, series):
        out = []
        for loss in series:
            sched.step(loss)
            out.append([g["lr"] for g in optimizer.param_groups])
        return out

    series = losses()[:3 * WARMUP]
    optimizer, sched = fresh()
    head = go(optimizer, sched, series[:cut])
    state = sched.state_dict()
    reference = head + go(optimizer, sched, series[cut:])
    optimizer, sched = fresh()
    sched.load_state_dict(state)
    return head + go(optimizer, sched, series[cut:]), reference


@pytest.mark.parametrize("cut", [WARMUP, WARMUP + 1, WARMUP + 5])
def test_a_resume_at_the_end_of_the_own_warmup_gives_identical_lrs(cut):
    resumed, reference = resume_at(cut)
    assert resumed == reference


@pytest.mark.parametrize("cut", [0, 1, WARMUP // 2, WARMUP - 1])
def test_a_resume_mid_warmup_gives_identical_lrs(cut):
    resumed, reference = resume_at(cut)
    assert resumed == reference
