"""AutoDecayLR with decay_shape="cooldown": the LR at every update, resumes mid-cooldown, composition."""
import json
import math

import pytest
import torch
from torch.optim.lr_scheduler import LinearLR

from loss_curves import noisy_series
from timm_autodecay import AutoDecayLR

BASE_LRS = (0.1, 0.02)
MIN_LR = 1e-3
COOLDOWN = dict(decay_shape="cooldown", total_updates=1000, min_lr=MIN_LR)


def make_optimizer(lrs=BASE_LRS):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)


def falling(n=2000):
    """No plateau: the budget ends the stable phase."""
    return [2.0 - i / 1000 + 0.01 * math.sin(1.3 * i) for i in range(n)]


def run(sched, optimizer, losses, warmup=None):
    """[group LRs] before the first update and after every update, until the run finishes."""
    lrs = [[g["lr"] for g in optimizer.param_groups]]
    for loss in losses:
        optimizer.step()
        if warmup is not None:
            warmup.step()
        sched.step(loss)
        lrs.append([g["lr"] for g in optimizer.param_groups])
        if sched.finished:
            break
    return lrs


def one_minus_sqrt(stage_lr, floor, progress):
    return floor + (stage_lr - floor) * (1 - math.sqrt(progress))


def test_the_lr_anneals_at_every_update_from_the_stage_lr_to_min_lr_then_the_run_finishes():
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **COOLDOWN)
    lrs = run(sched, optimizer, falling())
    assert [(h["update"], h["action"]) for h in sched.history] == [(800, "cooldown"), (1000, "finish")]
    assert sched.finished and len(lrs) == 1001  # never past the budget
    for update, got in enumerate(lrs):
        progress = max(0, update - 800) / 200
        # min_lr is the highest group's floor; the other anneals to the same share of its own LR
        want = [one_minus_sqrt(base, MIN_LR * base / max(BASE_LRS), progress) for base in BASE_LRS]
        assert got == pytest.approx(want, rel=1e-12), f"update {update}"


def test_a_plateau_starts_the_cooldown_which_lasts_a_share_of_the_run_so_far():
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, decay_shape="cooldown", total_updates=20_000, cooldown_curve="linear")
    lrs = run(sched, optimizer, noisy_series(20_000, tau=300))
    (start, first), (end, last) = [(h["update"], h["action"]) for h in sched.history]
    assert (first, last) == ("cooldown", "finish") and start < 16_000
    assert end - start == math.ceil(start * 0.2 / 0.8)
    assert lrs[start] == pytest.approx(list(BASE_LRS))
    assert lrs[(start + end) // 2] == pytest.approx([b / 2 for b in BASE_LRS], rel=1e-2)  # linear, half way
    assert lrs[end] == pytest.approx([0.0, 0.0], abs=1e-15)


def test_step_stages_then_a_cooldown_from_the_last_stage_lr():
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, num_stages=2, **COOLDOWN)
    lrs = run(sched, optimizer, falling())
    assert [(h["update"], h["action"]) for h in sched.history] == [(400, "decay"), (800, "cooldown"),
                                                                     (1000, "finish")]
    assert lrs[600] == pytest.approx([b * 0.1 for b in BASE_LRS])
    assert lrs[900] == pytest.approx([one_minus_sqrt(b * 0.1, MIN_LR * b / max(BASE_LRS), 0.5) for b in BASE_LRS])


def test_a_resume_at_every_update_around_and_in_the_cooldown_gives_identical_lrs():
    losses, shape = falling(), {**COOLDOWN, "total_updates": 400}
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **shape)
    saved, reference = {}, [[g["lr"] for g in optimizer.param_groups]]
    for update, loss in enumerate(losses, start=1):
        optimizer.step()
        sched.step(loss)
        reference.append([g["lr"] for g in optimizer.param_groups])
        saved[update] = json.dumps({"optimizer": optimizer.state_dict(), "scheduler": sched.state_dict()})
        if sched.finished:
            break
    start = sched.history[0]["update"]
    assert sched.history[0]["action"] == "cooldown" and start == 320
    for cut in range(start - 2 * sched.detector.bucket_size, 400):
        checkpoint = json.loads(saved[cut])
        optimizer = make_optimizer()
        optimizer.load_state_dict(checkpoint["optimizer"])
        sched = AutoDecayLR(optimizer, **shape)
        sched.load_state_dict(checkpoint["scheduler"])
        assert reference[:cut + 1] + run(sched, optimizer, losses[cut:])[1:] == reference, f"resumed at {cut}"


def test_a_resume_mid_cooldown_without_the_optimizer_state_still_gets_the_right_lrs():
    losses = falling()
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **COOLDOWN)
    reference = run(sched, optimizer, losses)
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **COOLDOWN)
    run(sched, optimizer, losses[:900])
    state = json.loads(json.dumps(sched.state_dict()))
    optimizer = make_optimizer()  # at the base LRs: only the scheduler's state is loaded
    sched = AutoDecayLR(optimizer, **COOLDOWN)
    sched.load_state_dict(state)
    assert run(sched, optimizer, losses[900:]) == reference[900:]


def test_a_linear_warmup_then_the_stable_phase_then_the_cooldown():
    optimizer = make_optimizer()
    warmup = LinearLR(optimizer, start_factor=0.1, total_iters=10)
    sched = AutoDecayLR(optimizer, warmup_updates=10, **COOLDOWN)
    lrs = run(sched, optimizer, falling(), warmup)
    start = sched.history[0]["update"]
    for update, got in enumerate(lrs):
        factor = 0.1 + 0.9 * min(update, 10) / 10
        progress = max(0, update - start) / (1000 - start)
        want = [one_minus_sqrt(base * factor, MIN_LR * base / max(BASE_LRS), progress) for base in BASE_LRS]
        assert got == pytest.approx(want, rel=1e-9), f"update {update}"


def test_a_group_added_mid_cooldown_joins_at_its_lr_then_anneals_as_if_there_from_the_start():
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **COOLDOWN)
    run(sched, optimizer, falling()[:850])
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.05})
    lrs = run(sched, optimizer, falling()[850:])
    share = MIN_LR / max(BASE_LRS)  # every group's floor, as a share of its initial LR
    start = 0.05 / one_minus_sqrt(1.0, share, 50 / 200)  # the initial LR that puts it at 0.05 where it joined
    for update, got in enumerate(lrs[1:], start=851):
        assert got[2] == pytest.approx(one_minus_sqrt(start, share * start, (update - 800) / 200), rel=1e-12)
    assert lrs[1][2] < 0.05 and all(a[2] > b[2] for a, b in zip(lrs[1:], lrs[2:]))  # never raised, always falling
    assert sched.finished and lrs[-1] == pytest.approx([MIN_LR, MIN_LR * 0.2, share * start])


def test_min_lr_with_the_step_shape_is_refused():
    with pytest.raises(ValueError, match="min_lr"):
        AutoDecayLR(make_optimizer(), total_updates=1000, min_lr=1e-3, decay_shape="step")


@pytest.mark.parametrize("diverged_at", [850, 990])  # the cooldown runs from update 800 to 1000
def test_losses_non_finite_to_the_end_of_the_cooldown_are_an_error_not_a_finish(diverged_at):
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **COOLDOWN)
    losses = falling(diverged_at) + [float("nan")] * (1000 - diverged_at)
    with pytest.warns(RuntimeWarning, match="non-finite"), pytest.raises(FloatingPointError, match="cooldown"):
        run(sched, optimizer, losses)
    assert not sched.finished  # a loop that checks `finished` never saves the diverged model as final


def test_a_bad_batch_in_the_cooldown_still_finishes():
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **COOLDOWN)
    losses = falling(1000)
    losses[900] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        run(sched, optimizer, losses)
    assert sched.finished and sched.detector.nonfinite_losses == 1
