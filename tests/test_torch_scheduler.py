"""AutoDecayLR: what a PyTorch user relies on."""
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from loss_curves import stage_loss
from timm_autodecay import AutoDecayLR, StageDetector
from timm_autodecay.losses import LossAccumulator

SETTINGS = dict(num_stages=3, total_updates=3000, window=100, decay_shape="step")


def make_optimizer(lrs=(0.1, 0.02)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)


def stepped_losses(n=3000, tau=40):
    """Per-update losses that plateau quickly in every stage (stage follows the update count)."""
    return [stage_loss(min(i // 500, 2), i % 500, tau) * (1 + 0.05 * math.sin(1.3 * i)) for i in range(n)]


def run(sched, optimizer, losses, as_tensor=True):
    lrs = []
    for loss in losses:
        optimizer.step()
        sched.step(torch.tensor(loss) if as_tensor else loss)
        lrs.append([group["lr"] for group in optimizer.param_groups])
        if sched.finished:
            break
    return lrs


def test_decays_scale_every_group_alike_and_match_the_detector():
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **SETTINGS)
    losses = stepped_losses()
    lrs = run(sched, optimizer, losses)
    detector = StageDetector(**SETTINGS)
    expected = [(d.update, d.action) for v in losses if not detector.finished and (d := detector.observe(v)).changed]
    assert [(h["update"], h["action"]) for h in sched.history] == expected
    assert [h["action"] for h in sched.history] == ["decay", "decay", "finish"]
    first, second = sched.history[0]["update"], sched.history[1]["update"]
    assert lrs[first - 2] == [0.1, 0.02] and lrs[first - 1] == pytest.approx([0.01, 0.002])
    assert lrs[second - 1] == pytest.approx([0.001, 0.0002])  # relative LRs kept
    assert sched.finished and sched.stage == 2 and len(lrs) == sched.history[-1]["update"]
    assert sched.get_last_lr() == pytest.approx([0.001, 0.0002])


def test_floats_and_tensors_give_the_same_schedule():
    losses = stepped_losses()
    by_tensor = run(AutoDecayLR(opt := make_optimizer(), **SETTINGS), opt, losses)
    by_float = run(AutoDecayLR(opt := make_optimizer(), **SETTINGS), opt, losses, as_tensor=False)
    assert by_tensor == by_float


def test_losses_are_read_back_once_per_bucket_not_per_update(monkeypatch):
    reads = []
    original = LossAccumulator.read
    monkeypatch.setattr(LossAccumulator, "read", lambda self: reads.append(1) or original(self))
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **SETTINGS)
    updates = len(run(sched, optimizer, stepped_losses()))
    assert sched.detector.bucket_size == 4
    assert len(reads) <= updates / sched.detector.bucket_size + 3


def test_resume_mid_bucket_gives_identical_lrs_and_decisions(tmp_path):
    losses = stepped_losses()
    optimizer = make_optimizer()
    reference = run(AutoDecayLR(optimizer, **SETTINGS), optimizer, losses)
    assert len(reference) >= 900
    for cut in (1, 250, 503, len(reference) // 2 + 1, len(reference) - 3):
        optimizer = make_optimizer()
        sched = AutoDecayLR(optimizer, **SETTINGS)
        head = run(sched, optimizer, losses[:cut])
        checkpoint = {"optimizer": optimizer.state_dict(), "scheduler": sched.state_dict()}
        path = tmp_path / "checkpoint.pt"
        torch.save(checkpoint, path)
        restored = torch.load(path, weights_only=True)
        optimizer = make_optimizer()
        optimizer.load_state_dict(restored["optimizer"])
        sched = AutoDecayLR(optimizer, **SETTINGS)
        sched.load_state_dict(restored["scheduler"])
        assert head + run(sched, optimizer, losses[cut:]) == reference, f"resumed at update {cut}"


def test_non_finite_losses_warn_once_are_counted_and_never_decay():
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **SETTINGS)
    with pytest.warns(RuntimeWarning, match="non-finite") as caught:
        run(sched, optimizer, [2.0, float("nan"), 2.0, 2.0] * 10 + [float("inf")] * 4)
    assert len([w for w in caught if "non-finite" in str(w.message)]) == 1
    assert sched.state_dict()["detector"]["nonfinite_losses"] == 14
    assert sched.stage == 0


def test_a_run_of_only_non_finite_losses_raises():
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **SETTINGS)
    with pytest.raises(FloatingPointError, match="non-finite"), pytest.warns(RuntimeWarning):
        run(sched, optimizer, [float("nan")] * 200)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"decay_rate": 0.0}, "decay_rate"),
        ({"decay_rate": 1.0}, "1.0"),
        ({"decay_rate": -0.5}, "-0.5"),
        ({"num_stages": 0}, "num_stages"),
        ({"total_updates": -1}, "total_updates"),
        ({"updates_per_epoch": -125}, "-125"),
        ({"window": 0}, "window"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_value(kwargs, named):
    with pytest.raises(ValueError, match=named):
        AutoDecayLR(make_optimizer(), **kwargs)


def test_an_optimizer_without_lr_is_refused():
    class NoLr(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, defaults={})

        def step(self, closure=None):
            pass

    with pytest.raises(ValueError, match="'lr'"):
        AutoDecayLR(NoLr([torch.nn.Parameter(torch.zeros(1))]))


def test_step_without_a_loss_is_an_error_saying_what_to_write():
    sched = AutoDecayLR(make_optimizer(), decay_shape="step")
    with pytest.raises(TypeError, match=r"sched\.step\(loss\)"):
        sched.step()


@pytest.mark.slow
@pytest.mark.distributed
def test_ranks_seeing_different_losses_hold_identical_lrs_at_every_update(tmp_path, torchrun):
    done = torchrun(Path(__file__).with_name("distributed_worker.py"), "torch", tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = (tmp_path / "lrs_rank0.txt").read_text()
    rank1 = (tmp_path / "lrs_rank1.txt").read_text()
    assert rank0 == rank1
    lrs = [float(line.split()[1]) for line in rank0.splitlines()]
    # the two decays, then the cooldown (the default shape), at the same updates on both ranks
    assert sorted(set(lrs), reverse=True)[:3] == [0.1, 0.01, 0.001] and min(lrs) < 0.001


# -- surprising inputs get clear answers ---------------------------------------------------------
@pytest.mark.parametrize("loss, error, words", [
    ("0.5", TypeError, "got str '0.5'"),
    (True, TypeError, "got bool True"),
    (torch.tensor(True), TypeError, "torch.bool"),
    (torch.tensor(1.0, device="meta"), ValueError, "'meta' device"),
    (torch.ones(2), ValueError, "shape (2,)"),
], ids=["string", "bool", "bool-tensor", "meta-tensor", "vector"])
def test_a_loss_that_is_not_a_number_is_refused_and_not_counted(loss, error, words):
    sched = AutoDecayLR(make_optimizer(), **SETTINGS)
    sched.step(2.0)
    with pytest.raises(error) as caught:
        sched.step(loss)
    assert words in str(caught.value)
    assert sched.last_epoch == 1 and sched.state_dict()["pending_losses"]["updates"] == 1


def test_numpy_and_torch_scalars_are_accepted_as_settings_and_losses():
    plain = AutoDecayLR(make_optimizer(), decay_rate=0.5, num_stages=3, total_updates=3000, window=100)
    scalars = AutoDecayLR(make_optimizer(), decay_rate=np.float32(0.5), num_stages=np.int64(3),
                          total_updates=torch.tensor(3000), window=np.int32(100))
    assert scalars.decay_rate == 0.5 and scalars.state_dict() == plain.state_dict()
    for loss in (np.float32(2.5), np.float64(2.5), torch.tensor(2.5, dtype=torch.float16), 2):
        scalars.step(loss)
    assert scalars.last_epoch == 4


def test_last_epoch_is_refused_saying_how_to_resume():
    with pytest.raises(TypeError, match="takes no last_epoch") as caught:
        AutoDecayLR(make_optimizer(), last_epoch=5)
    assert "load_state_dict" in str(caught.value) and "StageDetector" not in str(caught.value)


def test_an_unknown_argument_is_refused_naming_it():
    with pytest.raises(TypeError, match="'gamma'"):
        AutoDecayLR(make_optimizer(), gamma=0.1)


def test_stepping_once_per_epoch_instead_of_per_update_warns():
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, total_updates=3000, updates_per_epoch=100, decay_shape="step")
    with pytest.warns(RuntimeWarning, match="once after every optimizer.step") as caught:
        for epoch in range(3):
            for _ in range(100):
                optimizer.step()
            sched.step(2.0 - epoch / 10)  # the epoch's mean loss
    assert "once per epoch" in str(caught[0].message)


def test_stepping_twice_per_update_warns():
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **SETTINGS)
    with pytest.warns(RuntimeWarning, match="more often than the optimizer updates"):
        for _ in range(40):
            optimizer.step()
            sched.step(2.0)
            sched.step(2.0)


def test_stepping_once_per_update_does_not_warn():
    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **SETTINGS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(sched, optimizer, stepped_losses())
    assert sched.finished


def test_the_scheduler_pickles_and_deep_copies():
    import copy
    import pickle

    optimizer = make_optimizer()
    sched = AutoDecayLR(optimizer, **SETTINGS)
    run(sched, optimizer, stepped_losses()[:700])
    for clone in (pickle.loads(pickle.dumps(sched)), copy.deepcopy(sched)):
        assert clone.state_dict() == sched.state_dict()


def test_a_budget_given_in_epochs_warns_with_the_updates_it_meant():
    with pytest.warns(RuntimeWarning, match="total_updates=9000"):
        AutoDecayLR(make_optimizer(), total_updates=90, updates_per_epoch=100, decay_shape="step")


def test_a_second_autodecaylr_on_the_same_optimizer_warns():
    optimizer = make_optimizer()
    first = AutoDecayLR(optimizer, **SETTINGS)
    with pytest.warns(RuntimeWarning, match="already has an AutoDecayLR"):
        AutoDecayLR(optimizer, **SETTINGS)
    del first
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoDecayLR(make_optimizer(), **SETTINGS)  # another optimizer: no warning
