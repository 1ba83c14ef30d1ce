"""Where would a stopping rule have ended the stable phase, and what would that length have scored?

AutoDecay with the cooldown shape is WSD at the length it picks: the same constant-LR trunk, then the same 1-sqrt
cooldown over the same share of the run (a stable phase that ends at update T is followed by T x f / (1 - f)
updates of cooldown, so the run is T / (1 - f) long, WSD's stable phase at that length). A benchmark's full-budget
WSD run holds that trunk's evaluations, epoch by epoch, and its WSD runs at every share of the budget hold what a
cooldown from each point scores. So a rule can be judged without training: the trunk's training losses and
evaluations go through the real detector (`timm_autodecay.replay`), its stable-phase end gives the run's length,
and the same seed's WSD frontier, interpolated linearly between its points, gives its score. The per-seed oracle
is the best WSD point each seed reached within a length: what any rule that picks a WSD length and keeps every
seed within that length could reach there.
"""
from __future__ import annotations

import statistics
from collections import defaultdict

import numpy as np

from timm_autodecay import StageDetector
from timm_autodecay.replay import replay

from .config import ConfigError
from .schedules import WSD, metric_mode


def frontier_by_seed(runs: list[dict], task: str, score: str) -> dict:
    """Per seed of `task`: its full-budget WSD run (the trunk) and its WSD points [(epochs, score)], shortest first."""
    by_seed = defaultdict(dict)
    for run in runs:
        if run.get("peer") == "wsd" and not run.get("paired_with") and run.get("task") == task:
            by_seed[run["seed"]][run["budget_fraction"]] = run
    if not by_seed or not all(1.0 in points for points in by_seed.values()):
        raise ConfigError(f"results: task {task} has no full-budget WSD run per seed to replay (run the benchmark "
                          "with wsd among its schedules and 1.0 among its frontier_fractions)")
    return {seed: {"trunk": points[1.0],
                   "points": sorted((run["epochs"], run[score]) for run in points.values())}
            for seed, points in sorted(by_seed.items())}


def stable_end(trunk: dict, eval_metric: str, settings: dict) -> dict:
    """The update at which the detector, fed the trunk's epochs (mean training loss, then the evaluation), ends the
    stable phase; None where it runs on to the trunk's end (the cooldown of the full budget)."""
    per_epoch, budget = trunk["updates_per_epoch"], trunk["updates"]
    settings = {"eval_mode": metric_mode(eval_metric), **settings}
    detector = StageDetector(updates_per_epoch=per_epoch, total_updates=budget, **settings)
    wsd_cooldown = WSD().cooldown_fraction
    if (detector.decay_shape, detector.num_stages, detector.cooldown_fraction) != ("cooldown", 1, wsd_cooldown):
        raise ConfigError("the replay reads lengths off the WSD frontier: it needs the cooldown shape with one stable "
                          f"stage and WSD's cooldown_fraction {wsd_cooldown}, got decay_shape="
                          f"{detector.decay_shape!r}, num_stages={detector.num_stages}, cooldown_fraction="
                          f"{detector.cooldown_fraction}")
    stable = [row for row in trunk["curves"] if row["updates"] <= budget * (1 - detector.cooldown_fraction)]
    counts = [row["updates"] - previous["updates"] for previous, row in zip([{"updates": 0}] + stable, stable)]
    evals = {index: row[eval_metric] for index, row in enumerate(stable) if row.get(eval_metric) is not None}
    decisions = replay([row["train_loss"] for row in stable], counts, detector, evals)
    return {"update": decisions[0]["update"] if decisions else None, "per_epoch": per_epoch, "budget": budget,
            "cooldown_fraction": detector.cooldown_fraction}


def score_at(points: list[tuple], epochs: float) -> tuple[float, bool]:
    """The frontier's score at `epochs` (linear between its points) and whether `epochs` lies inside them."""
    lengths, scores = zip(*points)
    return float(np.interp(epochs, lengths, scores)), lengths[0] <= epochs <= lengths[-1]


def oracle(points: list[tuple], max_epochs: float, higher_is_better: bool) -> tuple[float, float]:
    """The best WSD point within `max_epochs` (its length, its score): a seed's bound for any rule that keeps it within
    that length (a bar on the mean length over seeds leaves room to run one seed longer than another)."""
    within = [point for point in points if point[0] <= max_epochs + 1e-9] or points[:1]
    return (max if higher_is_better else min)(within, key=lambda point: point[1])


def measured(runs: list[dict], task: str, score: str) -> dict:
    """Per seed, the `autodecay_eval` run the benchmark trained, when it did: (epochs, score)."""
    return {run["seed"]: (run["epochs"], run[score]) for run in runs if run.get("peer") == "autodecay_eval"
            and not run.get("paired_with") and run.get("task") == task}


def replay_task(runs: list[dict], task: str, eval_metric: str, scale, settings: dict, max_epochs: float) -> dict:
    """Each seed's replayed length and score (beside the `autodecay_eval` run trained, where there is one), the
    per-seed oracle within `max_epochs`, and their means."""
    seeds, trained = [], measured(runs, task, scale.score)
    for seed, frontier in frontier_by_seed(runs, task, scale.score).items():
        end = stable_end(frontier["trunk"], eval_metric, settings)
        budget_epochs = end["budget"] / end["per_epoch"]
        epochs = budget_epochs if end["update"] is None else min(
            budget_epochs, end["update"] / (1 - end["cooldown_fraction"]) / end["per_epoch"])
        score, inside = score_at(frontier["points"], epochs)
        best_epochs, best_score = oracle(frontier["points"], max_epochs, scale.higher_is_better)
        seeds.append({"seed": seed, "stable_end_epoch": None if end["update"] is None else end["update"] / end[
            "per_epoch"], "epochs": epochs, "score": score, "inside_frontier": inside,
            "oracle_epochs": best_epochs, "oracle_score": best_score, "frontier": frontier["points"],
            "trained": trained.get(seed)})
    return {"task": task, "max_epochs": max_epochs, "seeds": seeds,
            "epochs_mean": statistics.mean(s["epochs"] for s in seeds),
            "score_mean": statistics.mean(s["score"] for s in seeds),
            "oracle_score_mean": statistics.mean(s["oracle_score"] for s in seeds),
            "frontier_mean": mean_frontier(seeds)}


def mean_frontier(seeds: list[dict]) -> list[tuple]:
    """The seeds' WSD points averaged at each length they share."""
    by_length = defaultdict(list)
    for seed in seeds:
        for epochs, score in seed["frontier"]:
            by_length[epochs].append(score)
    return [(epochs, statistics.mean(scores)) for epochs, scores in sorted(by_length.items())
            if len(scores) == len(seeds)]


def markdown(replays: list[dict], scale, settings: dict) -> str:
    digits = scale.digits
    lines = ["# Stopping rule replayed on the WSD trunk", "",
             f"Detector settings: {settings or 'the defaults'}; the evaluation signal on, as `autodecay_eval` runs it.",
             "The training-loss rule sees one mean per epoch here (a run sees buckets of a few updates): a stable "
             "phase the loss ended mid-epoch may end later in the replay.", "",
             f"| task | seed | stable phase ends (epoch) | run length (epochs) | {scale.title} read off WSD | "
             "autodecay_eval as trained (epochs, score) | per-seed oracle within the bound |",
             "|---|---|---|---|---|---|---|"]
    for result in replays:
        for s in result["seeds"]:
            end = "never (budget)" if s["stable_end_epoch"] is None else f"{s['stable_end_epoch']:.1f}"
            trained = "-" if s["trained"] is None else f"{s['trained'][0]:.1f}, {s['trained'][1]:.{digits}f}"
            lines.append(f"| {result['task']} | {s['seed']} | {end} | {s['epochs']:.1f} | {s['score']:.{digits}f}"
                         f"{'' if s['inside_frontier'] else ' (outside the frontier: its nearest point)'} | "
                         f"{trained} | {s['oracle_score']:.{digits}f} at {s['oracle_epochs']:.1f} |")
        lines.append(f"| {result['task']} | **mean** | | {result['epochs_mean']:.1f} | "
                     f"**{result['score_mean']:.{digits}f}** | | **{result['oracle_score_mean']:.{digits}f}** within "
                     f"{result['max_epochs']:g} epochs |")
    return "\n".join(lines) + "\n"


def plot(replays: list[dict], scale, path, source: str) -> None:
    """Per task: the seeds' mean WSD frontier, each seed's replayed point and its oracle point within the bound."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(replays), 4), layout="constrained")
    for axis, result in zip(figure.subplots(1, len(replays), squeeze=False)[0], replays):
        lengths, scores = zip(*result["frontier_mean"])
        axis.plot(lengths, scores, "-o", color="tab:gray", label="WSD, seed mean")
        for s in result["seeds"]:
            axis.plot(*zip(*s["frontier"]), "-", color="tab:gray", alpha=0.25, linewidth=0.8)
        axis.plot([s["epochs"] for s in result["seeds"]], [s["score"] for s in result["seeds"]], "o",
                  color="tab:blue", label=f"rule replayed (mean {result['score_mean']:.{scale.digits}f})")
        bound = f"per-seed oracle within {result['max_epochs']:g} (mean {result['oracle_score_mean']:.{scale.digits}f})"
        axis.plot([s["oracle_epochs"] for s in result["seeds"]], [s["oracle_score"] for s in result["seeds"]], "*",
                  color="tab:green", markersize=10, label=bound)
        trained = [s["trained"] for s in result["seeds"] if s["trained"]]
        if trained:
            axis.plot(*zip(*trained), "o", markerfacecolor="none", color="tab:orange",
                      label="autodecay_eval as trained")
        axis.axvline(result["max_epochs"], color="tab:red", linestyle=":", linewidth=1)
        axis.set(title=f"{source}: {result['task']}", xlabel="epochs (run length)", ylabel=scale.title)
        axis.legend(fontsize=8)
    figure.savefig(path, dpi=120)
