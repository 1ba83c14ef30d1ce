"""What AutoDecay costs: `AutoDecayLR.step(loss)` per update against one training step.

    python recipes/measure_overhead.py [--updates 20000] [--train_steps 300]

Prints one JSON object:
- the median (and mean) microseconds of `sched.step(loss)` with a 0-dim CPU tensor loss, in the
  reference benchmark's shape (125 updates per epoch, a 3750-update budget; a scheduler whose run
  has finished is replaced by a fresh one, so every timed call is a live one);
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

from timm_autodecay import AutoDecayLR
from training import TASKS, TrainConfig, make_model_and_optimizer

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
    train_step_us = statistics.median(time_training_steps(args.train_steps))
    report = {
        "autodecay_step_us_median": statistics.median(scheduler_us),
        "autodecay_step_us_mean": statistics.mean(scheduler_us),
        "train_step_us_median": train_step_us,
        "overhead_percent_of_train_step": 100.0 * statistics.median(scheduler_us) / train_step_us,
        "updates_timed": args.updates,
        **state_sizes(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
