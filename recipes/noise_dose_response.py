"""The root cause of learning stages as a dose-response: the transition at the first LR decay against the
gradient-noise scale lr x N / B, at one setting, from small batches to the whole training set.

    accelerate launch recipes/noise_dose_response.py --config recipes/configs/noise_dose_response.yaml \
        [--seeds 0 1 2 3 4] [--batch_sizes 32 128 512 1000 2000] [--lrs 0.1] [--momenta 0.9] [--warmup_fractions 0.05]

Design. Every (setting, batch size B, seed) is one SGD run on the task's N training samples (`train_subset`
of them when set); B >= N is full-batch gradient descent. A setting is one (lr, momentum, warmup fraction) of
the grid `lrs` x `momenta` x `warmup_fractions`: one setting is the study, several the stability sweep that
chooses it. An update's gradient is accumulated over micro-batches of at most `micro_batch` samples. Each run
has `updates = max(min_updates, min_epochs x N / B)` updates, and its schedule is set in fractions of that
run, the same for every B: a linear warmup over the warmup fraction, then x`decay_rate` at each of
`decay_fractions`. (Fractions, not epochs: two epochs are 2 full-batch updates but 500 updates at B = 32.)
The training loss is each update's mean loss, averaged over bins of `bin_fraction` of the run.

Statistic: the transition log-ratio at the first decay d, over a window w = `window_fraction` of the run,
with L(x) the loss of the bin that ends at fraction x:

    S = ln(L(d) / L(d + w)) - ln(L(d - w) / L(d))

the log-fall of the loss in the window after the decay minus the one in the window before. S = 0: the loss
keeps its trend (on a log scale); S > 0: a sharp transition; S < 0: the decay slows it.

Trains stably (every run, listed when it fails), fixed before the study: every loss finite; after the first
`spike_after` of the run no spike, a bin above `spike_factor` x the lowest bin before it AND above that
lowest bin + `spike_floor` x the run's first bin (its initial loss: a floor on the scale of the loss, so
that a loss near zero does not fail for doubling 0.01 to 0.02); and its loss before the first decay, L(d),
within `loss_factor` x that of the smallest batch size at the same setting and seed. Unstable runs are left
out of the statistics (their S is shown in brackets) and named in the table.

Reported per setting and B: mean S over the stable seeds with a bootstrap 95% interval (seeds resampled),
the median loss before the first decay, the mean test top-1; per setting, the trend: Spearman's rho of S
against ln(noise scale) over all stable runs (permutation p-value) and the least-squares slope of S per
doubling of the noise scale (bootstrap interval, resampled within B). Several settings (the sweep) add a
row per setting: unstable runs, the full batch's stable runs, median loss before the decay and mean S per B,
the largest rise of a full-batch loss over its running minimum; the sweep chooses, among the settings with
no unstable run, the one with the smallest such rise (the widest margin to the spike criterion).

Resumable: a finished run of the same config and schedule in its folder is read back, not trained again.
Launched on one process, the runs go to a pool of `jobs` worker processes; launched on several, each run is
data-parallel over all of them (the update and its micro-batches split between the processes).

Writes into `output_dir`: each run's folder (`lr{lr}_m{momentum}_w{warmup}/batch{B}/seed{s}/`: metrics.jsonl,
summary.json with every update's loss), `summary.json`, `noise_dose_response.md` (the tables) and the figure.
"""
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from engine.config import ConfigError, load_config
from engine.dose_response_report import dose_table, plot_dose_response, sweep_table
from engine.loop import saved_run, train_run
from engine.schedules import Schedule, current_lr
from engine.study import run_in_pool
from engine.study_statistics import (
    bootstrap_interval, first_spike, peak_rise, slope_interval, spearman_trend, transition_log_ratio,
)
from engine.tasks import ImageTask, make_task
from engine.train_config import TrainConfig


@dataclass
class DoseResponseConfig(TrainConfig):
    """The shared training keys (task, model, weight decay; `lr`, `momentum`, `batch_size`, `epochs`,
    `milestones` and `schedule` are set per run from the keys below) plus the study's."""

    output_dir: str = "runs/noise_dose_response"
    lrs: list[float] = field(default_factory=lambda: [0.1])  # the settings: lrs x momenta x warmup_fractions ...
    momenta: list[float] = field(default_factory=lambda: [0.9])  # ... one: the study; several: the sweep
    warmup_fractions: list[float] = field(default_factory=lambda: [0.05])  # linear warmup from 0, share of a run
    clip_grad_norms: list[float] = field(default_factory=lambda: [0.0])  # ... x the gradient's largest norm (0: none)
    batch_sizes: list[int] = field(default_factory=lambda: [32, 128, 512, 2000, 8000])  # >= N: full batch
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    min_epochs: float = 8.0  # every run sees the training set at least this many times ...
    min_updates: int = 150  # ... and makes at least this many updates
    micro_batch: int = 500  # largest micro-batch; larger updates accumulate gradients
    decay_fractions: list[float] = field(default_factory=lambda: [0.5, 0.75])  # x decay_rate at these shares
    window_fraction: float = 0.1  # the transition's window before and after the first decay
    bin_fraction: float = 0.02  # the loss curve: update losses averaged over bins of this share of the run
    spike_after: float = 0.1  # stability: spikes are looked for after this share of the run ...
    spike_factor: float = 2.0  # ... a spike: a bin above this x the lowest bin before it ...
    spike_floor: float = 0.02  # ... and above that lowest + this x the run's first bin (its initial loss)
    loss_factor: float = 3.0  # stability: loss before the first decay at most this x the smallest batch's
    resamples: int = 10000  # bootstrap resamples and permutations
    checkpoint_every: int = 0
    save_stage_ends: bool = False
    jobs: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))  # runs at once


class FractionSchedule(Schedule):
    """A linear warmup, then x`decay_rate` at fractions of a run of `updates` updates, which it ends;
    keeps every update's loss (a float per update)."""

    def __init__(self, updates: int, warmup_fraction: float, decay_fractions: list, decay_rate: float,
                 clip_grad_norm: float = 0.0):
        super().__init__()
        self.updates, self.decay_rate, self.clip_grad_norm = updates, decay_rate, clip_grad_norm
        self.clipped = 0  # updates whose gradient norm the clip cut (a device tensor while training)
        self.warmup_updates = max(1, round(warmup_fraction * updates)) if warmup_fraction > 0 else 0
        self.decay_updates = [round(fraction * updates) for fraction in decay_fractions]
        self.losses, self.base_lr = [], None

    def lr_at(self, update: int) -> float:
        """The LR of update `update` (0-based)."""
        warmup = min(1.0, (update + 1) / self.warmup_updates) if self.warmup_updates else 1.0
        return self.base_lr * warmup * self.decay_rate ** sum(update >= at for at in self.decay_updates)

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(len(self.losses))

    def start(self, optimizer, updates_per_epoch, total_updates):
        super().start(optimizer, updates_per_epoch, total_updates)
        if self.clip_grad_norm:  # on the optimizer that steps (Accelerate wraps it), right before its step
            inner = getattr(optimizer, "optimizer", optimizer)
            inner.register_step_pre_hook(lambda *_: self._clip(inner))
        self.base_lr = self.base_lr or current_lr(optimizer)
        self._set_lr()
        self._last_lr = current_lr(optimizer)

    def after_update(self, loss) -> bool:
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # the mean over processes
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
        self.losses.append(float(loss))
        self._set_lr()
        if len(self.losses) in self.decay_updates:
            self.stage += 1
        self._last_lr = current_lr(self.optimizer)
        return len(self.losses) >= self.updates

    def _clip(self, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        self.clipped = self.clipped + (norm > self.clip_grad_norm)  # summed on the device, read at the end

    def state_dict(self):
        return {**super().state_dict(), "losses": list(self.losses), "base_lr": self.base_lr,
                "clipped": int(self.clipped)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.losses, self.base_lr, self.clipped = list(state["losses"]), state["base_lr"], state.get("clipped", 0)

    def summary(self):
        clip = {"clip_grad_norm": self.clip_grad_norm, "clipped_updates": int(self.clipped)} if self.clip_grad_norm \
            else {}
        return {"update_losses": self.losses, "planned_updates": self.updates, "decay_updates": self.decay_updates,
                "warmup_updates": self.warmup_updates, **clip}


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------
def settings(cfg: DoseResponseConfig) -> list[dict]:
    """The grid lrs x momenta x warmup_fractions x clip_grad_norms, each with its name and folder (a clip only
    where there is one: the runs without keep their names and folders)."""
    grid = []
    for lr, momentum, warmup, clip in itertools.product(cfg.lrs, cfg.momenta, cfg.warmup_fractions,
                                                        cfg.clip_grad_norms):
        name, folder = f"lr {lr:g}, momentum {momentum:g}, warmup {warmup:g}", f"lr{lr:g}_m{momentum:g}_w{warmup:g}"
        grid.append({"lr": lr, "momentum": momentum, "warmup_fraction": warmup, "clip_grad_norm": clip,
                     "name": name + (f", clip {clip:g}" if clip else ""),
                     "folder": folder + (f"_c{clip:g}" if clip else "")})
    return grid


def run_plan(cfg: DoseResponseConfig, train_size: int, processes: int = 1) -> list[dict]:
    """Every run of the study: setting, batch size, seed, its updates, schedule and TrainConfig; largest
    first (the longest runs start first in the pool). `processes`: data-parallel processes sharing each update."""
    plans = []
    for setting in settings(cfg):
        for batch_size in sorted(cfg.batch_sizes, reverse=True):
            size = min(batch_size, train_size)
            full_batch = size == train_size
            updates = max(cfg.min_updates, math.ceil(cfg.min_epochs * train_size / size))
            micro = math.ceil(size / (processes * cfg.micro_batch))  # per process
            if full_batch and train_size % (processes * micro):
                raise ConfigError(f"micro_batch: {cfg.micro_batch} gives {processes} x {micro} micro-batches, which "
                                  f"do not split the {train_size} training samples evenly (full batch)")
            schedule = {"warmup_fraction": setting["warmup_fraction"], "decay_fractions": cfg.decay_fractions,
                        "decay_rate": cfg.decay_rate, "clip_grad_norm": setting["clip_grad_norm"]}
            for seed in cfg.seeds:
                run_cfg = TrainConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainConfig)})
                run_cfg = replace(
                    run_cfg, lr=setting["lr"], momentum=setting["momentum"], batch_size=size, full_batch=full_batch,
                    grad_accum_steps=micro, seed=seed, schedule="constant", verbose=False,
                    epochs=math.ceil(updates * size / train_size) + 1,
                    output_dir=str(Path(cfg.output_dir) / setting["folder"] / f"batch{size}" / f"seed{seed}"),
                )
                plans.append({"setting": setting["name"], "lr": setting["lr"], "momentum": setting["momentum"],
                              "clip_grad_norm": setting["clip_grad_norm"],
                              "warmup_fraction": setting["warmup_fraction"], "batch_size": size, "seed": seed,
                              "updates": updates, "noise_scale": setting["lr"] * train_size / size,
                              "full_batch": full_batch, "schedule": schedule, "cfg": run_cfg})
    return plans


def _record(plan: dict, summary: dict, reused: bool) -> dict:
    return {**{k: v for k, v in plan.items() if k not in ("cfg", "schedule")}, "test_top1": summary["test_top1"],
            "epochs": summary["epochs"], "wall_seconds": summary["wall_seconds"], "reused": reused,
            "losses": summary["update_losses"], "output_dir": plan["cfg"].output_dir,
            "clipped_updates": summary.get("clipped_updates", 0)}


def saved_result(plan: dict):
    """The run `plan` describes read back from its folder when it finished there with the same config and
    schedule (see `saved_run`); None when it has to be trained."""
    saved = saved_run(plan["cfg"])
    expected = FractionSchedule(plan["updates"], **plan["schedule"]).summary()
    if saved is None or any(saved.get(key) != value for key, value in expected.items()
                                if key not in ("update_losses", "clipped_updates")):
        return None
    return _record(plan, saved, reused=True)


def run_one(plan: dict) -> dict:
    """One run (in a pool worker or in this process): its plan, summary and update losses."""
    torch.set_num_threads(1)
    summary = train_run(plan["cfg"], FractionSchedule(plan["updates"], **plan["schedule"]))
    return _record(plan, summary, reused=False)


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
def instabilities(losses: list, cfg: DoseResponseConfig) -> list[str]:
    """What breaks this run's own stability criteria (non-finite losses, a spike); [] when none."""
    if not all(math.isfinite(loss) for loss in losses):
        return ["non-finite loss"]
    spike = first_spike(losses, cfg.bin_fraction, cfg.spike_after, cfg.spike_factor, cfg.spike_floor)
    if spike:
        return [f"spike at {spike['share']:.0%} of the run ({spike['factor']:.1f}x the lowest loss before)"]
    return []


def measure(results: list[dict], cfg: DoseResponseConfig) -> list[dict]:
    """Each run's transition, largest rise and stability, the loss criterion against the smallest batch size
    at the same setting and seed. S and the loss before the decay are measured on every finite run."""
    decay = min(cfg.decay_fractions)
    for run in results:
        run["failures"] = instabilities(run["losses"], cfg)
        finite = run["failures"] != ["non-finite loss"]
        run["peak_rise"] = peak_rise(run["losses"], cfg.bin_fraction, cfg.spike_after) if finite else math.inf
        run.update(transition_log_ratio(run["losses"], decay, cfg.window_fraction, cfg.bin_fraction)
                   if finite else {"log_ratio": None, "loss_before_decay": None})
    for run in results:
        smallest = min((r for r in results if r.get("setting") == run.get("setting") and r["seed"] == run["seed"]),
                       key=lambda r: r["batch_size"])
        reference = smallest["loss_before_decay"]
        if run["loss_before_decay"] is not None and reference is not None \
                and run["loss_before_decay"] > cfg.loss_factor * reference:
            run["failures"].append(f"loss before the decay {run['loss_before_decay']:.3f} > {cfg.loss_factor:g} x "
                                   f"batch {smallest['batch_size']}'s {reference:.3f}")
        run["stable"] = not run["failures"]
    return results


def _cell(cell: list[dict], resamples: int) -> dict:
    """The statistics of one setting and batch size over its seeds."""
    ratios = [run["log_ratio"] for run in cell if run["stable"]]
    low, high = bootstrap_interval(ratios, resamples, seed=cell[0]["batch_size"])
    losses = [run["loss_before_decay"] for run in cell if run["loss_before_decay"] is not None]
    return {
        "batch_size": cell[0]["batch_size"], "noise_scale": cell[0]["noise_scale"], "updates": cell[0]["updates"],
        "epochs": cell[0]["epochs"], "full_batch": cell[0]["full_batch"], "stable": len(ratios), "runs": len(cell),
        "log_ratio_mean": float(np.mean(ratios)) if ratios else None, "log_ratio_low": low, "log_ratio_high": high,
        "log_ratios": {run["seed"]: (run["log_ratio"], run["stable"]) for run in cell},
        "loss_before_decay_median": float(np.median(losses)) if losses else None,
        "peak_rise_max": max(run["peak_rise"] for run in cell),
        "test_top1_mean": float(np.mean([run["test_top1"] for run in cell])),
        "clipped_share": float(np.mean([run.get("clipped_updates", 0) / run["updates"] for run in cell])),
        "failures": {run["seed"]: run["failures"] for run in cell if run["failures"]},
    }


def statistics(runs: list[dict], cfg: DoseResponseConfig) -> dict:
    """Per setting: per batch size the mean log-ratio over stable seeds with its bootstrap interval, and the
    trend of the log-ratio against the noise scale."""
    by_setting = {}
    for setting in settings(cfg):
        mine = [run for run in runs if run["setting"] == setting["name"]]
        cells = [_cell([run for run in mine if run["batch_size"] == size], cfg.resamples)
                 for size in sorted({run["batch_size"] for run in mine})]
        stable = [run for run in mine if run["stable"]]
        trend = None
        if len({run["batch_size"] for run in stable}) >= 3:
            log2_noise = [math.log2(run["noise_scale"]) for run in stable]
            trend = spearman_trend(log2_noise, [run["log_ratio"] for run in stable], cfg.resamples)
            groups = {}
            for x, run in zip(log2_noise, stable):
                groups.setdefault(x, []).append(run["log_ratio"])
            trend["slope_per_doubling"] = slope_interval(groups, min(cfg.resamples, 2000))
        by_setting[setting["name"]] = {**{k: setting[k] for k in ("lr", "momentum", "warmup_fraction",
                                                                   "clip_grad_norm")},
                                       "cells": cells, "trend": trend}
    return by_setting


MAX_CLIPPED_SHARE = 0.5  # a clip that cuts more updates than this is the step, not a guard: the dose is not lr x N/B


def choose_setting(by_setting: dict):
    """The sweep's choice: among the settings with no unstable run whose clip (if any) cuts at most
    ``MAX_CLIPPED_SHARE`` of any batch size's updates, the one whose full-batch runs rise least over their
    running minimum (the widest margin to the spike criterion); None when no setting qualifies."""
    stable = {name: value for name, value in by_setting.items()
              if all(cell["stable"] == cell["runs"] and cell["clipped_share"] <= MAX_CLIPPED_SHARE
                     for cell in value["cells"])}
    full_rise = {name: max(cell["peak_rise_max"] for cell in value["cells"] if cell["full_batch"])
                 for name, value in stable.items() if any(cell["full_batch"] for cell in value["cells"])}
    return min(full_rise, key=full_rise.get) if full_rise else None


def train_all(cfg: DoseResponseConfig, show) -> list[dict]:
    """Every run of the plan, finished ones read back. Launched on one process, the runs to train go to a pool
    of `jobs` worker processes; on several (accelerate launch, torchrun), they are data-parallel, one by one."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        task = make_task(cfg)
        train_size = task.train_size if isinstance(task, ImageTask) else len(task.train_targets)
        plans = run_plan(cfg, train_size, processes)
    except ConfigError as error:
        raise SystemExit(f"noise_dose_response.py: error: {error}") from error
    results = [result for result in map(saved_result, plans) if result]
    todo = [plan for plan in plans if (plan["setting"], plan["batch_size"], plan["seed"])
            not in {(r["setting"], r["batch_size"], r["seed"]) for r in results}]
    show(f"{len(plans)} runs: {len(settings(cfg))} setting(s) x batch {sorted(cfg.batch_sizes)} x seeds {cfg.seeds} "
         f"({train_size} training samples); {len(results)} finished before, read back; {len(todo)} to train")
    total = sum(plan["updates"] * plan["batch_size"] for plan in todo) or 1  # samples: the progress measure
    done, start = 0, time.perf_counter()
    for run in run_in_pool(run_one, todo, 1 if processes > 1 else max(1, min(cfg.jobs, len(todo)))):
        results.append(run)
        done, elapsed = done + run["updates"] * run["batch_size"], time.perf_counter() - start
        show(f"[{len(results)}/{len(plans)}] {run['setting']}, batch {run['batch_size']}, seed {run['seed']}: "
             f"{run['updates']} updates, {run['test_top1']:.1f}% in {run['wall_seconds']:.0f} s; "
             f"{elapsed / 60:.1f} min, ~{elapsed * (total - done) / done / 60:.0f} min left")
    order = [setting["name"] for setting in settings(cfg)]
    return sorted(results, key=lambda run: (order.index(run["setting"]), run["batch_size"], run["seed"]))


def main(argv=None) -> dict:
    cfg = load_config(DoseResponseConfig, argv, description=__doc__)
    main_process = int(os.environ.get("RANK", "0")) == 0

    def show(text):
        if main_process:
            print(text, flush=True)

    runs = measure(train_all(cfg, show), cfg)
    by_setting = statistics(runs, cfg)
    sweep = sweep_table(by_setting, choose_setting(by_setting)) if len(by_setting) > 1 else ""
    table = "\n\n".join(filter(None, [sweep, dose_table(by_setting)]))
    result = {"runs": runs, "by_setting": by_setting, "chosen": choose_setting(by_setting), "table": table}
    if not main_process:
        return result
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {**result, "runs": [{k: v for k, v in run.items() if k != "losses"} for run in runs],
               "config": asdict(cfg)}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (output_dir / "noise_dose_response.md").write_text(table + "\n")
    plot_dose_response(runs, by_setting, cfg, output_dir / "noise_dose_response.png")
    show(table)
    show(f"summary.json, noise_dose_response.md and noise_dose_response.png in {cfg.output_dir}")
    return result


if __name__ == "__main__":
    main()
