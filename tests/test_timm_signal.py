"""What train.py's running epoch mean tells the scheduler: per-update losses, the latest logged loss
under older timm's DDP, losses equal to the mean, NaN batches, and divergence."""
import random

import pytest
import timm.scheduler
import torch
from timm.utils import AverageMeter
from timm_train_py import BASE_LR, UPE, Toy, detector_settings, replayed_history, yaml_keys

from timm_autodecay.timm_scheduler import AutoDecayScheduler


def test_distributed_train_py_logging_every_few_updates_feeds_the_latest_logged_loss():
    """Under DDP, train.py adds the (rank-averaged) loss to losses_m only every --log-interval updates
    and at the epoch's last batch: each update in between stands for the latest logged loss."""
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler = timm.scheduler.create_scheduler_v2(optimizer, sched="autodecay", num_epochs=30, updates_per_epoch=UPE,
                                                   autodecay_end_training=False, **yaml_keys())[0]
    rng = random.Random(2)
    losses = [0.5 + 2.0 / (1 + n / 20) + 0.05 * rng.gauss(0, 1) for n in range(30 * UPE)]
    log_interval, held = 4, []
    for epoch in range(30):
        meter = AverageMeter()
        for batch_idx in range(UPE):
            n = epoch * UPE + batch_idx + 1
            if batch_idx % log_interval == 0 or batch_idx == UPE - 1:
                meter.update(losses[n - 1], 16)
                latest = losses[n - 1]
            held.append(latest)
            scheduler.step_update(n, metric=meter.avg)
        scheduler.step(epoch + 1)
    assert scheduler.history and scheduler.history == replayed_history(scheduler, held)


def test_a_nan_loss_is_counted_not_judged():
    """train.py's running mean stays NaN for the rest of an epoch after one NaN batch (AMP skips that
    step): those updates are counted as non-finite, never decided on; the next epoch reads again."""
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler = AutoDecayScheduler(optimizer, updates_per_epoch=UPE, t_initial=30,
                                   **detector_settings(window=30, patience=6))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        for n in range(1, 61):
            mean = float("nan") if 13 <= n <= 20 else 1.0
            scheduler.step_update(n, metric=mean)
            if n % UPE == 0:
                scheduler.step(n // UPE)
    assert scheduler.detector.nonfinite_losses == 8 and scheduler.detector.update == 60
    assert scheduler.history and scheduler.history[0]["update"] > 20  # a flat loss still ends the stage
