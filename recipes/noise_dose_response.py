"""The root cause of learning stages as a dose-response: the transition at the first LR decay against the
gradient-noise scale lr x N / B, at one learning rate, from small batches to the whole training set.

    accelerate launch recipes/noise_dose_response.py --config recipes/configs/noise_dose_response.yaml \
        [--seeds 0 1 2 3 4] [--batch_sizes 32 128 512 2000 8000] [--lrs 0.1]

Design. Every (lr, batch size B, seed) is one SGD run (momentum and weight decay from the config) on the
task's N training samples; B >= N is full-batch gradient descent. An update's gradient is accumulated over
micro-batches of at most `micro_batch` samples. Each run has `updates = max(min_updates, min_epochs x N / B)`
updates, and its schedule is set in fractions of that run, the same for every B: a linear warmup over
`warmup_fraction`, then x`decay_rate` at each of `decay_fractions`. (Fractions, not epochs: two epochs
are 2 full-batch updates but 500 updates at B = 32.) The training loss is each update's mean loss, averaged
over bins of `bin_fraction` of the run.

Statistic: the transition log-ratio at the first decay d, over a window w = `window_fraction` of the run,
with L(x) the loss of the bin that ends at fraction x:

    S = ln(L(d) / L(d + w)) - ln(L(d - w) / L(d))

the log-fall of the loss in the window after the decay minus the one in the window before. S = 0: the loss
keeps its trend (on a log scale); S > 0: a sharp transition; S < 0: the decay slows it. S is finite
whatever the trend (the old ratio of falls divided by a fall near zero and had a heavy tail).

Trains stably (every run, listed when it fails): every loss finite; after the first `spike_after` of the
run no bin above `spike_factor` x the lowest bin before it; and its loss before the first decay, L(d),
within `loss_factor` x that of the smallest batch size at the same lr and seed. Unstable runs are left out
of the statistics and named in the table.

Reported per lr and B: mean S over the stable seeds with a bootstrap 95% interval (seeds resampled); per
lr, the trend: Spearman's rho of S against ln(noise scale) over all stable runs (permutation p-value) and
the least-squares slope of S per doubling of the noise scale (bootstrap interval, resampled within B).
Several `lrs` make the stability sweep that chose the study's LR.

Launched on one process, whole runs go to a pool of `jobs` worker processes; launched on several, each run
is data-parallel over all of them (the update and its micro-batches split between the processes).

Writes into `output_dir`: each run's folder (`lr{lr}/batch{B}/seed{s}/`: metrics.jsonl, summary.json with
every update's loss), `summary.json` (runs, per-B statistics, the trend test, the config),
`noise_dose_response.md` (the tables) and `noise_dose_response.png`.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from engine.config import ConfigError, load_config
from engine.loop import train_run
from engine.schedules import Schedule, current_lr
from engine.study import run_in_pool
from engine.tasks import ImageTask, make_task
from engine.train_config import TrainConfig

from study_statistics import (
    binned, bootstrap_interval, first_spike, slope_interval, spearman_trend, transition_log_ratio,
)


@dataclass
class DoseResponseConfig(TrainConfig):
    """The shared training keys (task, model, momentum, weight decay; `lr`, `batch_size`, `epochs`,
    `milestones` and `schedule` are set per run from the keys below) plus the study's."""

    output_dir: str = "runs/noise_dose_response"
    lrs: list[float] = field(default_factory=lambda: [0.1])  # one: the study; several: the stability sweep
    batch_sizes: list[int] = field(default_factory=lambda: [32, 128, 512, 2000, 8000])  # >= N: full batch
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    min_epochs: float = 8.0  # every run sees the training set at least this many times ...
    min_updates: int = 150  # ... and makes at least this many updates
    micro_batch: int = 500  # largest micro-batch; larger updates accumulate gradients
    warmup_fraction: float = 0.05  # linear warmup from 0 over this share of the run
    decay_fractions: list[float] = field(default_factory=lambda: [0.5, 0.75])  # x decay_rate at these shares
    window_fraction: float = 0.1  # the transition's window before and after the first decay
    bin_fraction: float = 0.02  # the loss curve: update losses averaged over bins of this share of the run
    spike_after: float = 0.1  # stability: spikes are looked for after this share of the run ...
    spike_factor: float = 2.0  # ... a bin above this x the lowest bin before it is a spike
    loss_factor: float = 3.0  # stability: loss before the first decay at most this x the smallest batch's
    resamples: int = 10000  # bootstrap resamples and permutations
    checkpoint_every: int = 0
    save_stage_ends: bool = False
    jobs: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))  # runs at once


class FractionSchedule(Schedule):
    """A linear warmup, then x`decay_rate` at fractions of a run of `updates` updates, which it ends;
    keeps every update's loss (a float per update)."""

    def __init__(self, updates: int, warmup_fraction: float, decay_fractions: list, decay_rate: float):
        super().__init__()
        self.updates, self.decay_rate = updates, decay_rate
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

    def state_dict(self):
        return {**super().state_dict(), "losses": list(self.losses), "base_lr": self.base_lr}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.losses, self.base_lr = list(state["losses"]), state["base_lr"]

    def summary(self):
        return {"update_losses": self.losses, "planned_updates": self.updates, "decay_updates": self.decay_updates}


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------
def run_plan(cfg: DoseResponseConfig, train_size: int, processes: int = 1) -> list[dict]:
    """Every run of the study: lr, batch size, seed, its updates and its TrainConfig; largest first (the
    longest runs start first in the pool). `processes`: data-parallel processes sharing each update."""
    plans = []
    for lr in cfg.lrs:
        for batch_size in sorted(cfg.batch_sizes, reverse=True):
            size = min(batch_size, train_size)
            full_batch = size == train_size
            updates = max(cfg.min_updates, math.ceil(cfg.min_epochs * train_size / size))
            micro = math.ceil(size / (processes * cfg.micro_batch))  # per process
            if full_batch and train_size % (processes * micro):
                raise ConfigError(f"micro_batch: {cfg.micro_batch} gives {processes} x {micro} micro-batches, which "
                                  f"do not split the {train_size} training samples evenly (full batch)")
            for seed in cfg.seeds:
                run_cfg = TrainConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainConfig)})
                run_cfg = replace(
                    run_cfg, lr=lr, batch_size=size, full_batch=full_batch, grad_accum_steps=micro, seed=seed,
                    schedule="constant", epochs=math.ceil(updates * size / train_size) + 1, verbose=False,
                    output_dir=str(Path(cfg.output_dir) / f"lr{lr:g}" / f"batch{size}" / f"seed{seed}"),
                )
                plans.append({"lr": lr, "batch_size": size, "seed": seed, "updates": updates, "cfg": run_cfg,
                              "noise_scale": lr * train_size / size, "full_batch": full_batch})
    return plans


def run_one(job: tuple) -> dict:
    """One run (in a pool worker or in this process): its plan, summary and update losses."""
    plan, settings = job
    torch.set_num_threads(1)
    schedule = FractionSchedule(plan["updates"], **settings)
    summary = train_run(plan["cfg"], schedule)
    return {**{k: v for k, v in plan.items() if k != "cfg"}, "test_top1": summary["test_top1"],
            "epochs": summary["epochs"], "wall_seconds": summary["wall_seconds"],
            "losses": summary["update_losses"], "output_dir": plan["cfg"].output_dir}


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
def instabilities(losses: list, cfg: DoseResponseConfig) -> list[str]:
    """What breaks this run's own stability criteria (non-finite losses, a spike); [] when none."""
    if not all(math.isfinite(loss) for loss in losses):
        return ["non-finite loss"]
    spike = first_spike(losses, cfg.bin_fraction, cfg.spike_after, cfg.spike_factor)
    if spike:
        return [f"spike at {spike['share']:.0%} of the run ({spike['factor']:.1f}x the lowest loss before)"]
    return []


def measure(results: list[dict], cfg: DoseResponseConfig) -> list[dict]:
    """Each run's transition and stability, the loss criterion against the smallest batch size."""
    decay = min(cfg.decay_fractions)
    for run in results:
        run["failures"] = instabilities(run["losses"], cfg)
        run.update(transition_log_ratio(run["losses"], decay, cfg.window_fraction, cfg.bin_fraction)
                   if not run["failures"] else {"log_ratio": None, "loss_before_decay": None})
    for run in results:
        smallest = min((r for r in results if r["lr"] == run["lr"] and r["seed"] == run["seed"]),
                       key=lambda r: r["batch_size"])
        reference = smallest["loss_before_decay"]
        if run["loss_before_decay"] is not None and reference is not None \
                and run["loss_before_decay"] > cfg.loss_factor * reference:
            run["failures"].append(f"loss before the decay {run['loss_before_decay']:.3f} > {cfg.loss_factor:g} x "
                                   f"batch {smallest['batch_size']}'s {reference:.3f}")
        run["stable"] = not run["failures"]
    return results


def statistics(runs: list[dict], cfg: DoseResponseConfig) -> dict:
    """Per lr: per batch size the mean log-ratio over stable seeds with its bootstrap interval, and the
    trend of the log-ratio against the noise scale."""
    by_lr = {}
    for lr in cfg.lrs:
        mine = [run for run in runs if run["lr"] == lr]
        cells = []
        for size in sorted({run["batch_size"] for run in mine}):
            cell = [run for run in mine if run["batch_size"] == size]
            ratios = [run["log_ratio"] for run in cell if run["stable"]]
            low, high = bootstrap_interval(ratios, cfg.resamples, seed=size)
            cells.append({
                "batch_size": size, "noise_scale": cell[0]["noise_scale"], "updates": cell[0]["updates"],
                "epochs": cell[0]["epochs"], "stable": len(ratios), "runs": len(cell),
                "log_ratio_mean": float(np.mean(ratios)) if ratios else None, "log_ratio_low": low,
                "log_ratio_high": high, "log_ratios": {run["seed"]: run["log_ratio"] for run in cell},
                "loss_before_decay_median": float(np.median([r["loss_before_decay"] for r in cell if r["stable"]]))
                if ratios else None,
                "test_top1_mean": float(np.mean([run["test_top1"] for run in cell])),
                "failures": {run["seed"]: run["failures"] for run in cell if run["failures"]},
            })
        stable = [run for run in mine if run["stable"]]
        trend = None
        if len({run["batch_size"] for run in stable}) >= 3:
            log2_noise = [math.log2(run["noise_scale"]) for run in stable]
            trend = spearman_trend(log2_noise, [run["log_ratio"] for run in stable], cfg.resamples)
            groups = {}
            for x, run in zip(log2_noise, stable):
                groups.setdefault(x, []).append(run["log_ratio"])
            trend["slope_per_doubling"] = slope_interval(groups, min(cfg.resamples, 2000))
        by_lr[lr] = {"cells": cells, "trend": trend}
    return by_lr


# ----------------------------------------------------------------------------------------------
# Table, figure, study
# ----------------------------------------------------------------------------------------------
def _number(value, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def dose_table(by_lr: dict, lrs: list) -> str:
    """Markdown: a row per (lr, batch size), the trend per lr, the unstable runs."""
    lines = ["| lr | batch | noise scale lr·N/B | updates (epochs) | stable | loss before decay (median) "
             "| log-ratio S, mean [95% CI] | S per seed | test top-1 (%) |", "|---" * 9 + "|"]
    notes = []
    for lr in lrs:
        for cell in by_lr[lr]["cells"]:
            per_seed = ", ".join(_number(value, signed=True) for value in cell["log_ratios"].values())
            low, high = (_number(cell[key], signed=True) for key in ("log_ratio_low", "log_ratio_high"))
            lines.append(
                f"| {lr:g} | {cell['batch_size']} | {cell['noise_scale']:.3g} "
                f"| {cell['updates']} ({cell['epochs']:.3g}) "
                f"| {cell['stable']}/{cell['runs']} | {_number(cell['loss_before_decay_median'], 3)} "
                f"| {_number(cell['log_ratio_mean'], signed=True)} [{low}, {high}] | {per_seed} "
                f"| {cell['test_top1_mean']:.1f} |")
            notes += [f"- unstable: lr {lr:g}, batch {cell['batch_size']}, seed {seed}: {'; '.join(why)}"
                      for seed, why in cell["failures"].items()]
        trend = by_lr[lr]["trend"]
        if trend:
            slope = trend["slope_per_doubling"]
            notes.append(f"- trend at lr {lr:g}: Spearman rho of S with the noise scale {trend['rho']:+.2f} "
                         f"(permutation p = {trend['p_value']:.2g}, {trend['count']} stable runs); slope "
                         f"{slope['slope']:+.3f} per doubling [{slope['low']:+.3f}, {slope['high']:+.3f}]")
    return "\n".join(lines + [""] + (notes or ["- every run trained stably"]))


def plot_dose_response(runs: list[dict], by_lr: dict, cfg: DoseResponseConfig, path: Path) -> None:
    """Left: S against the noise scale (a dot per stable run, the mean and its bootstrap interval); right:
    the binned training loss of the first seed of each batch size against the share of the run."""
    import matplotlib
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.6), layout="constrained")
    dose_axes, loss_axes = figure.subplots(1, 2)
    colours = matplotlib.colormaps["tab10"].colors
    for index, lr in enumerate(cfg.lrs):
        cells = [cell for cell in by_lr[lr]["cells"] if cell["log_ratio_mean"] is not None]
        stable = [run for run in runs if run["lr"] == lr and run["stable"]]
        dose_axes.plot([r["noise_scale"] for r in stable], [r["log_ratio"] for r in stable], ".", alpha=0.5,
                       color=colours[index])
        means = [cell["log_ratio_mean"] for cell in cells]
        errors = [[m - cell["log_ratio_low"] for m, cell in zip(means, cells)],
                  [cell["log_ratio_high"] - m for m, cell in zip(means, cells)]]
        dose_axes.errorbar([cell["noise_scale"] for cell in cells], means, yerr=np.nan_to_num(errors), marker="o",
                           capsize=3, color=colours[index], label=f"lr {lr:g}: mean, 95% bootstrap interval")
    dose_axes.axhline(0, color="grey", linewidth=1)
    dose_axes.set(xscale="log", xlabel="noise scale lr·N/B (right: small batches; left end: full batch)",
                  ylabel="transition log-ratio S at the first decay", title="dose-response")
    dose_axes.legend(fontsize=8)
    sizes = sorted({run["batch_size"] for run in runs})
    for index, size in enumerate(sizes):
        run = next(r for r in runs if r["lr"] == cfg.lrs[0] and r["batch_size"] == size)
        bins = binned(run["losses"], cfg.bin_fraction)
        shares = [(k + 1) * cfg.bin_fraction for k in range(len(bins))]
        label = "full batch" if run["full_batch"] else f"batch {size}"
        loss_axes.plot(shares, bins, color=matplotlib.colormaps["viridis"](index / max(1, len(sizes) - 1)),
                       label=f"{label} ({run['updates']} updates)")
    for at in cfg.decay_fractions:
        loss_axes.axvline(at, color="grey", linestyle=":", linewidth=1)
    loss_axes.set(yscale="log", xlabel="share of the run (dotted: LR decays)", ylabel="training loss (bin mean)",
                  title=f"lr {cfg.lrs[0]:g}, seed {runs[0]['seed'] if runs else ''}")
    loss_axes.legend(fontsize=8)
    for axes in (dose_axes, loss_axes):
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


def train_all(cfg: DoseResponseConfig, show) -> list[dict]:
    """Every run of the plan. Launched on one process, whole runs go to a pool of `jobs` worker processes;
    launched on several (accelerate launch, torchrun), the runs are data-parallel, one after the other."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        task = make_task(cfg)
        train_size = task.train_size if isinstance(task, ImageTask) else len(task.train_targets)
        plans = run_plan(cfg, train_size, processes)
    except ConfigError as error:
        raise SystemExit(f"noise_dose_response.py: error: {error}") from error
    settings = {"warmup_fraction": cfg.warmup_fraction, "decay_fractions": cfg.decay_fractions,
                "decay_rate": cfg.decay_rate}
    show(f"{len(plans)} runs: lr {cfg.lrs} x batch {sorted(cfg.batch_sizes)} x seeds {cfg.seeds} "
         f"({train_size} training samples)")
    results = []
    jobs = 1 if processes > 1 else min(cfg.jobs, len(plans))
    for run in run_in_pool(run_one, [(plan, settings) for plan in plans], jobs):
        results.append(run)
        show(f"  lr {run['lr']:g} batch {run['batch_size']} seed {run['seed']}: {run['updates']} updates, "
             f"{run['test_top1']:.1f}% in {run['wall_seconds']:.0f} s")
    return sorted(results, key=lambda run: (run["lr"], run["batch_size"], run["seed"]))


def main(argv=None) -> dict:
    cfg = load_config(DoseResponseConfig, argv, description=__doc__)
    main_process = int(os.environ.get("RANK", "0")) == 0

    def show(text):
        if main_process:
            print(text, flush=True)

    runs = measure(train_all(cfg, show), cfg)
    by_lr = statistics(runs, cfg)
    table = dose_table(by_lr, cfg.lrs)
    if not main_process:
        return {"runs": runs, "by_lr": by_lr, "table": table}
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {"runs": [{k: v for k, v in run.items() if k != "losses"} for run in runs],
               "by_lr": {f"{lr:g}": value for lr, value in by_lr.items()}, "table": table, "config": asdict(cfg)}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (output_dir / "noise_dose_response.md").write_text(table + "\n")
    plot_dose_response(runs, by_lr, cfg, output_dir / "noise_dose_response.png")
    show(table)
    show(f"summary.json, noise_dose_response.md and noise_dose_response.png in {cfg.output_dir}")
    return {"runs": runs, "by_lr": by_lr, "table": table}


if __name__ == "__main__":
    main()
