"""What AutoDecay costs: `AutoDecayLR.step(loss)` and the timm scheduler's `step_update` per update,
against one training step.

    python recipes/measure_overhead.py [--updates 20000] [--train_steps 300]

Prints one JSON object:
- the median (and mean) microseconds of `sched.step(loss)` with a 0-dim CPU tensor loss, in the
  reference benchmark's shape (125 updates per epoch, a 3750-update budget; a scheduler whose run
  has finished is replaced by a fresh one, so every timed call is a live one);
- the same for `AutoDecayScheduler.step_update(num_updates, metric)` (the timm face), driven as timm's
  train.py drives it: the metric is the epoch's running mean loss (a float, `losses_m.avg`), and
  `step(epoch + 1)` at each epoch's end (not timed); no state folder, so nothing is written;
- the median microseconds of one training step of the benchmark model (batch 64, one thread) and
  the scheduler's cost as a percentage of it;
- the length of `json.dumps(sched.state_dict())` after 1k and 100k updates of a run without a
  budget, on a loss that keeps falling: the detector's memory is a window, so it must not grow
  (beyond a few characters as its update counters gain digits).
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from engine.models import make_model_and_optimizer
from engine.tasks import TASKS
from engine.train_config import TrainConfig

from timm_autodecay import AutoDecayLR

UPDATES_PER_EPOCH = 125
TOTAL_UPDATES = 3750


def falling_losses(count: int, seed: int = 0) -> list[torch.Tensor]:
    """A noisy loss that keeps falling (10% per 250 updates, the default window here), as 0-dim CPU
    tensors: a run that never reaches a plateau."""
    noise = torch.randn(count, generator=torch.Generator().manual_seed(seed))
    losses = [math.exp(-4.2e-4 * update) * (1 + 0.05 * float(noise[update])) for update in range(count)]
    return [torch.tensor(loss) for loss in losses]


def new_scheduler(total_updates) -> AutoDecayLR:
    """AutoDecay with default settings over a one-parameter optimizer."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    return AutoDecayLR(optimizer, updates_per_epoch=UPDATES_PER_EPOCH, total_updates=total_updates)


def time_scheduler_steps(updates: int) -> list[float]:
    """Microseconds of each of `updates` calls to `sched.step(loss)`."""
    losses = falling_losses(updates)
    sched, timings = new_scheduler(TOTAL_UPDATES), []
    for loss in losses:
        if sched.finished:
            sched = new_scheduler(TOTAL_UPDATES)
        start = time.perf_counter_ns()
        sched.step(loss)
        timings.append((time.perf_counter_ns() - start) / 1e3)
    return timings


def time_timm_step_updates(updates: int) -> list[float]:
    """Microseconds of each of `updates` calls to `AutoDecayScheduler.step_update(n, running_mean)`."""
    from timm_autodecay.timm_scheduler import AutoDecayScheduler

    def fresh():
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        return AutoDecayScheduler(optimizer, updates_per_epoch=UPDATES_PER_EPOCH,
                                  t_initial=TOTAL_UPDATES // UPDATES_PER_EPOCH)

    losses = [float(loss) for loss in falling_losses(updates)]
    sched, timings, n, running = fresh(), [], 0, 0.0
    for loss in losses:
        if sched.finished and n % UPDATES_PER_EPOCH == 0:
            sched, n = fresh(), 0
        n += 1
        k = (n - 1) % UPDATES_PER_EPOCH + 1
        running = loss if k == 1 else running + (loss - running) / k
        start = time.perf_counter_ns()
        sched.step_update(num_updates=n, metric=running)
        timings.append((time.perf_counter_ns() - start) / 1e3)
        if k == UPDATES_PER_EPOCH:
            sched.step(n // UPDATES_PER_EPOCH)
    return timings


def time_training_steps(steps: int, warmup: int = 20) -> list[float]:
    """Microseconds of each of `steps` SGD steps (forward, backward, update) of the benchmark model."""
    cfg = TrainConfig()
    data = TASKS[cfg.task](cfg)
    model, optimizer = make_model_and_optimizer(cfg, data.num_classes)
    inputs, targets = data.train_inputs[: cfg.batch_size], data.train_targets[: cfg.batch_size]
    timings = []
    for _ in range(warmup + steps):
        start = time.perf_counter_ns()
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        timings.append((time.perf_counter_ns() - start) / 1e3)
    return timings[warmup:]


def state_sizes() -> dict:
    """Length of the JSON state of one budget-less run after 1k and after 100k updates."""
    sched, sizes = new_scheduler(None), {}
    for update, loss in enumerate(falling_losses(100_000, seed=1), start=1):
        sched.step(loss)
        if update in (1_000, 100_000):
            sizes[f"state_json_chars_after_{update // 1000}k"] = len(json.dumps(sched.state_dict()))
    sizes["stage_after_100k"], sizes["finished_after_100k"] = sched.stage, sched.finished
    return sizes


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--updates", type=int, default=20000, help="scheduler steps to time")
    parser.add_argument("--train_steps", type=int, default=300, help="training steps to time")
    args = parser.parse_args()
    torch.set_num_threads(1)

    scheduler_us = time_scheduler_steps(args.updates)
    timm_us = time_timm_step_updates(args.updates)
    train_step_us = statistics.median(time_training_steps(args.train_steps))
    report = {
        "autodecay_step_us_median": statistics.median(scheduler_us),
        "autodecay_step_us_mean": statistics.mean(scheduler_us),
        "timm_step_update_us_median": statistics.median(timm_us),
        "timm_step_update_us_mean": statistics.mean(timm_us),
        "train_step_us_median": train_step_us,
        "overhead_percent_of_train_step": 100.0 * statistics.median(scheduler_us) / train_step_us,
        "timm_overhead_percent_of_train_step": 100.0 * statistics.median(timm_us) / train_step_us,
        "updates_timed": args.updates,
        **state_sizes(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
