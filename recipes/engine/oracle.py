"""The oracle: the best fixed StepDecay in hindsight, searched on a grid of two-decay schedules.

StepDecay x`decay_rate` at m1 and m2 = m1 + gap, stopped after m2 + tail epochs, for every m1, gap, tail
on the grid. Runs are deterministic given seed and schedule, and two schedules agree until their first
different milestone; so the trunk (the initial LR) is trained once, its model/optimizer state kept at
each m1, a branch (one decay) is trained from each for max(gaps) epochs, its state kept at each m2, and
from each a last branch (two decays) for max(tails) epochs, evaluated after every epoch. Every branch
runs through the loop's own epoch (`loop.train_epoch`) under the constant schedule, its decay applied
where it starts, at the first update of epoch m (as `MultiStepLR` at update m x updates_per_epoch does):
so a grid point matches the full StepDecay run bit for bit. Cost: max(m1) + len(m1) x max(gap) +
len(m1) x len(gaps) x max(tail) epochs instead of a full run per grid point.
"""
import copy
import statistics
import time

import numpy as np

from .evaluation import evaluate_all
from .loop import Run, prepare_run, train_epoch
from .schedules import Schedule, current_lr, scale_lr


def snapshot(run: Run) -> tuple[dict, dict]:
    return copy.deepcopy(run.model.state_dict()), copy.deepcopy(run.optimizer.state_dict())


def restore(run: Run, state: tuple[dict, dict]) -> None:
    run.model.load_state_dict(state[0])
    run.optimizer.load_state_dict(state[1])


def train_epochs(run: Run, first: int, end: int, keep_at) -> tuple[list[dict], dict]:
    """Train epochs `first` .. `end - 1` (0-based), evaluating after each. Returns their records and the
    model/optimizer states at the start of each epoch in `keep_at` and at `end`."""
    records, states = [], {}
    for epoch in range(first, end):
        if epoch in keep_at:
            states[epoch] = snapshot(run)
        train_loss, _, _ = train_epoch(run, epoch)
        results = evaluate_all(run.model, run.task, run.cfg, run.accelerator)
        records.append({"epoch": epoch + 1, "updates": (epoch + 1) * run.batches.updates_per_epoch,
                        "lr": current_lr(run.optimizer), "train_loss": train_loss,
                        "test_loss": results["test_loss"], "test_top1": results["test_top1"]})
    states[end] = snapshot(run)
    return records, states


def oracle_search(cfg, first_milestones: list[int], gaps: list[int], tails: list[int]) -> dict:
    """Test accuracy of every grid point for `cfg.seed` (see the module docstring). Returns
    {"grid": {"m1,m2,length": top-1}, "curves": {branch: per-epoch records}, "epochs_trained", ...}."""
    run = prepare_run(cfg, Schedule())
    run_start = time.perf_counter()
    curves, grid = {}, {}
    curves["trunk"], trunk_states = train_epochs(run, 0, max(first_milestones), set(first_milestones))
    for m1 in sorted(first_milestones):
        restore(run, trunk_states.pop(m1))
        scale_lr(run.optimizer, cfg.decay_rate)
        curves[f"{m1}"], second_states = train_epochs(run, m1, m1 + max(gaps), {m1 + gap for gap in gaps})
        for gap in sorted(gaps):
            m2 = m1 + gap
            restore(run, second_states.pop(m2))
            scale_lr(run.optimizer, cfg.decay_rate)
            curves[f"{m1},{m2}"], _ = train_epochs(run, m2, m2 + max(tails), set())
            for tail in sorted(tails):
                grid[f"{m1},{m2},{m2 + tail}"] = curves[f"{m1},{m2}"][tail - 1]["test_top1"]
    return {"schedule": "oracle_grid", "seed": cfg.seed, "grid": grid, "curves": curves,
            "epochs_trained": sum(len(records) for records in curves.values()),
            "wall_seconds": time.perf_counter() - run_start}


def oracle_curve(curves: dict, m1: int, m2: int, length: int) -> list[dict]:
    """The per-epoch records of the fixed schedule (m1, m2, length), stitched from the shared branches."""
    trunk = [line for line in curves["trunk"] if line["epoch"] <= m1]
    second = [line for line in curves[f"{m1}"] if line["epoch"] <= m2]
    third = [line for line in curves[f"{m1},{m2}"] if line["epoch"] <= length]
    return trunk + second + third


def choose_oracle(grids: list[dict], target: float) -> tuple[str, float]:
    """The grid point whose mean accuracy over `grids` (one per seed) is >= `target`, shortest first,
    then most accurate; if none reaches the target, the most accurate one. Returns (key, mean)."""
    means = {key: float(np.mean([grid[key] for grid in grids])) for key in grids[0]}
    reaching = [key for key, mean in means.items() if mean >= target]
    if reaching:
        best = min(reaching, key=lambda key: (int(key.split(",")[2]), -means[key]))
    else:
        best = max(means, key=means.get)
    return best, means[best]


def resolve_oracle(results: list[dict], tolerance: float) -> tuple[list[dict], dict]:
    """Replace each task's per-seed oracle grids by the chosen fixed schedule's runs. The target is
    StepDecay's mean accuracy on the oracle's seeds (paired; all StepDecay runs if it has none of
    them) minus `tolerance`. Returns (the runs, {task: the oracle's grid means and choice})."""
    runs, oracles = [], {}
    for task in dict.fromkeys(run["task"] for run in results):
        grids = [run for run in results if run["task"] == task and run["peer"] == "oracle"]
        if not grids:
            continue
        seeds = {run["seed"] for run in grids}
        step = [run for run in results if run["task"] == task and run["label"] == "step"]
        step_paired = [run["test_top1"] for run in step if run["seed"] in seeds] or [run["test_top1"] for run in step]
        target = statistics.mean(step_paired) - tolerance
        key, mean = choose_oracle([run["grid"] for run in grids], target)
        m1, m2, length = map(int, key.split(","))
        oracles[task] = {
            "target": target, "step_mean_on_oracle_seeds": statistics.mean(step_paired), "chosen": key,
            "milestones": [m1, m2], "length": length, "mean_top1": mean, "reached_target": mean >= target,
            "grid_means": {k: statistics.mean(run["grid"][k] for run in grids) for k in grids[0]["grid"]},
            "per_seed_grids": {run["seed"]: run["grid"] for run in grids},
            "epochs_trained_per_seed": [run["epochs_trained"] for run in grids],
        }
        runs += [{**{name: run[name] for name in ("peer", "label", "task", "seed", "budget_fraction", "paired_with")},
                  "test_top1": run["grid"][key], "epochs": float(length), "updates": None,
                  "decay_epochs": [float(m1), float(m2)], "wall_seconds": run["wall_seconds"],
                  "curves": oracle_curve(run["curves"], m1, m2, length)}
                 for run in grids]
    return [run for run in results if run["peer"] != "oracle"] + runs, oracles
