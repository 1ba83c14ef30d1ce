"""What train.py's running epoch mean tells the scheduler: per-update losses (also those equal to the
mean so far), the latest logged loss under older timm's DDP, NaN batches, and divergence."""
import math
import random

import pytest
import torch
import torch.distributed as dist
from timm_train_py import (BASE_LR, UPE, Toy, detector_settings, feed_epoch_means, import_timm_scheduler,
                           replayed_history, yaml_keys)

from timm_autodecay.detector import StageDetector


@pytest.fixture
def one_rank_group(tmp_path):
    """torch.distributed initialised with a single rank: the scheduler runs as under DDP."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def make_scheduler(updates_per_epoch=UPE, epochs=30, **settings):
    from timm_autodecay.timm_scheduler import AutoDecayScheduler

    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    settings = {"decay_shape": "step", **settings}  # the shape with short stages: short windows
    return AutoDecayScheduler(optimizer, updates_per_epoch=updates_per_epoch, t_initial=epochs,
                              end_training=False, **settings)


def quantized_losses(count, seed, step=0.01):
    """A falling loss rounded to ``step`` (as low-precision losses are): many updates repeat exactly,
    and often equal the running mean of their epoch so far."""
    rng = random.Random(seed)
    return [round((0.5 + 2.0 / (1 + n / 20)) * (1 + 0.02 * rng.gauss(0, 1)) / step) * step for n in range(count)]


def seen_points(scheduler):
    return [round(p[1], 9) for p in scheduler.state_dict()["detector"]["points"]]


def bare_points(scheduler, losses):
    detector = StageDetector(**scheduler.detector.settings())
    for loss in losses:
        if not detector.finished:
            detector.observe(loss)
    return [round(p[1], 9) for p in detector.state_dict()["points"]], detector.history


def test_losses_equal_to_the_running_mean_are_rebuilt_exactly():
    """One process: every update adds its loss to losses_m, also one equal to the mean so far (which
    leaves the mean unchanged)."""
    losses = quantized_losses(300, seed=3)
    repeats = sum(1 for n in range(1, 300) if n % UPE and losses[n] == sum(losses[n - n % UPE:n]) / (n % UPE))
    assert repeats >= 5
    scheduler = make_scheduler(**detector_settings())
    feed_epoch_means(scheduler, losses)
    points, history = bare_points(scheduler, losses)
    assert seen_points(scheduler) == points and scheduler.history == history and history


def test_under_ddp_newer_train_py_adds_every_loss_and_is_recognised(one_rank_group):
    """timm >= 1.0.12 under DDP: each rank's mean takes every update's loss; the mean changing at two
    consecutive updates shows it, and from then on repeats are read right too."""
    losses = quantized_losses(300, seed=4)
    scheduler = make_scheduler(**detector_settings())
    feed_epoch_means(scheduler, losses)
    points, history = bare_points(scheduler, losses)
    assert seen_points(scheduler) == points and scheduler.history == history and history


def test_under_ddp_older_train_py_feeds_the_latest_logged_loss(one_rank_group):
    """timm < 1.0.12 under DDP adds the (rank-averaged) loss to losses_m only every --log-interval
    updates and at the epoch's last batch: each update in between stands for the latest logged loss."""
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler = import_timm_scheduler().create_scheduler_v2(
        optimizer, sched="autodecay", num_epochs=30, updates_per_epoch=UPE, autodecay_end_training=False,
        **yaml_keys())[0]
    rng = random.Random(2)
    losses = [0.5 + 2.0 / (1 + n / 20) + 0.05 * rng.gauss(0, 1) for n in range(30 * UPE)]
    log_interval = 4
    held = [losses[n - (n % UPE) + (n % UPE) // log_interval * log_interval] if n % UPE != UPE - 1 else losses[n]
            for n in range(30 * UPE)]
    feed_epoch_means(scheduler, losses, log_interval=log_interval)
    assert scheduler.history and scheduler.history == replayed_history(scheduler, held)


# -- NaN batches and divergence ------------------------------------------------------------------
def falling(count, seed=0, noise=0.02):
    rng = random.Random(seed)
    return [(0.2 + 1.8 * math.exp(-i / (count / 3))) * (1 + noise * rng.gauss(0, 1)) for i in range(count)]


def test_a_nan_batch_is_counted_and_the_rest_of_its_epoch_skipped(caplog):
    """After one NaN batch train.py's running mean stays NaN for the rest of the epoch: that batch is
    one non-finite loss, the rest of the epoch carries no loss (skipped, never judged, never
    non-finite), and the next epoch reads again."""
    scheduler = make_scheduler(**detector_settings(window=30, patience=6))
    losses = [1.0] * 60
    losses[12] = float("nan")  # update 13
    with pytest.warns(RuntimeWarning, match="non-finite"):
        feed_epoch_means(scheduler, losses)
    assert scheduler.detector.nonfinite_losses == 1 and scheduler.detector.update == 60
    assert scheduler.history and scheduler.history[0]["update"] > 20  # a flat loss still ends the stage
    assert any("turned non-finite at update 13 (epoch 1)" in r.getMessage() for r in caplog.records)


def test_one_nan_batch_does_not_kill_a_short_run():
    """--epochs 10 of 100 updates: the window (67 updates) is shorter than the rest of the epoch after a
    NaN batch at its 5th update. The run goes on and takes the clean run's decisions."""
    losses = falling(1000)
    clean = make_scheduler(updates_per_epoch=100, epochs=10)
    feed_epoch_means(clean, losses, updates_per_epoch=100)
    assert clean.detector.window < 95 and len(clean.history) >= 2
    spiked = list(losses)
    spiked[204] = float("nan")
    scheduler = make_scheduler(updates_per_epoch=100, epochs=10)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        feed_epoch_means(scheduler, spiked, updates_per_epoch=100)
    assert scheduler.detector.nonfinite_losses == 1
    assert [h["action"] for h in scheduler.history] == [h["action"] for h in clean.history]
    assert all(abs(h["update"] - c["update"]) <= 2 * clean.detector.bucket_size
               for h, c in zip(scheduler.history, clean.history))


def test_losses_still_nonfinite_in_the_next_epoch_stop_the_run_as_diverged():
    """The weights are NaN too when the next epoch's losses are: the run stops with an error that
    says so, during that epoch, never later as a plateau."""
    losses = falling(1000)
    losses[204:] = [float("nan")] * (1000 - 204)
    scheduler = make_scheduler(updates_per_epoch=100, epochs=10)
    with pytest.warns(RuntimeWarning, match="non-finite"), pytest.raises(FloatingPointError, match="diverged") as error:
        feed_epoch_means(scheduler, losses, updates_per_epoch=100)
    assert "--lr" in str(error.value)
    assert 300 < scheduler.num_updates <= 400  # in the epoch after the NaN batch's
    assert scheduler.history == [] and not scheduler.finished
