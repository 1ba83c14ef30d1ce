"""The benchmarks' arithmetic, the same in every domain: a row per schedule and budget point, the frontier's
envelope (regret, waste, envelope deficit), the paired comparison with the frontier at a run's own length,
and its checks. Plain Python over the runs' records (no training here).

A run is a dict as a back-end returns it, labelled by the runner: "peer", "label", "task", "seed",
"budget_fraction", "paired_with", and the domain's score and lengths (`Scale`). Whether a higher score is
better (accuracy) or a lower one (loss) is the scale's; every number here is signed so that a positive
regret or deficit is worse than the frontier.
"""
import statistics
from dataclasses import dataclass

from .peers import EVALUATED, FRONTIER, PEERS, label


@dataclass(frozen=True)
class Scale:
    """How a domain's runs are judged and measured."""

    score: str  # the run's key a row is judged by: test_top1, val_loss, test_loss
    name: str  # its name in rows and tables: top1, val_loss, test_loss
    higher_is_better: bool
    title: str  # in table headers and on the axis: "test top-1 (%)"
    digits: int  # decimals of a score in tables
    length: str  # the run's key of its length in the budget's unit: epochs, steps
    units: str  # the run's key of its exact length: a paired run is trained to its partner's (updates, steps)
    length_digits: int  # decimals of a length in tables

    def better(self, value: float) -> float:
        """`value` signed so that larger is better."""
        return value if self.higher_is_better else -value


def mean_sd(values: list) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def budget_point_runs(runs: list[dict], fractions: list, read_at) -> list[dict]:
    """Each run of an `evaluated` peer (schedule-free: no budget to end) as if it had stopped at each share
    of the budget in `fractions` below the whole: `read_at(run, fraction)`, the domain's reading of its
    evaluation there (None where it has none)."""
    points = []
    for run in runs:
        if PEERS[run["peer"]].lengths != EVALUATED or run["paired_with"]:
            continue
        for fraction in sorted(f for f in fractions if f < 1):
            point = read_at(run, fraction)
            if point is not None:
                points.append({**point, "label": label(run["peer"], fraction), "budget_fraction": fraction})
    return points


def row_labels(runs: list[dict], schedules: list[str]) -> list[str]:
    """The rows' labels: the schedules' in their order, each one's budget points from the shortest."""
    ordered = sorted((run for run in runs if run["peer"] in schedules),
                     key=lambda run: (schedules.index(run["peer"]), run["budget_fraction"]))
    return list(dict.fromkeys(run["label"] for run in ordered))


def table_rows(runs: list[dict], schedules: list[str], scale: Scale, budget: float) -> list[dict]:
    """Per schedule and budget point: runs, score and length (mean and sd over seeds), what it saves against
    the budget, which frontier line it draws in, and why its peer has these settings."""
    rows = []
    for name in row_labels(runs, schedules):
        mine = [run for run in runs if run["label"] == name]
        score, score_sd = mean_sd([run[scale.score] for run in mine])
        length, length_sd = mean_sd([run[scale.length] for run in mine])
        peer = PEERS[mine[0]["peer"]]
        rows.append({"label": name, "peer": mine[0]["peer"], "budget_fraction": mine[0]["budget_fraction"],
                     "runs": len(mine), f"{scale.name}_mean": score, f"{scale.name}_sd": score_sd,
                     f"{scale.length}_mean": length, f"{scale.length}_sd": length_sd,
                     f"saved_{scale.length}": budget - length, "saved_percent": 100.0 * (budget - length) / budget,
                     "frontier": mine[0]["peer"] if peer.lengths in (FRONTIER, EVALUATED) else "", "note": peer.note})
    return rows


def envelope_scores(rows: list[dict], frontier: list[str], tolerance: float, scale: Scale) -> dict:
    """Every row against the envelope of the fixed-length points (the rows of the `frontier` peers at each
    budget point run), all from seed means, signed so that positive is worse:

    - regret: the best point's score minus the row's (the best: the best score, then the shortest);
    - waste: the row's length over that of the shortest point within `tolerance` of the best;
    - envelope deficit: the best score of the points no longer than the row, minus the row's (None when no
      point is that short).

    Returns {} without frontier points, else the best point, the shortest good one, and per label its three
    numbers ("scores")."""
    mean, length = f"{scale.name}_mean", f"{scale.length}_mean"
    points = [row for row in rows if row["peer"] in frontier]
    if not points:
        return {}
    best = max(points, key=lambda row: (scale.better(row[mean]), -row[length]))
    good = [row for row in points if scale.better(row[mean]) >= scale.better(best[mean]) - tolerance]
    shortest = min(good, key=lambda row: (row[length], -scale.better(row[mean])))
    scores = {}
    for row in rows:
        shorter = [scale.better(point[mean]) for point in points if point[length] <= row[length] + 1e-9]
        scores[row["label"]] = {
            "regret": scale.better(best[mean]) - scale.better(row[mean]),
            "waste": row[length] / shortest[length],
            "envelope_deficit": max(shorter) - scale.better(row[mean]) if shorter else None,
        }

    def point(row):
        return {"label": row["label"], mean: row[mean], length: row[length]}

    return {"tolerance": tolerance, "best": point(best), "shortest_good": point(shortest), "scores": scores}


def rival_scores(run: dict, candidates: list[dict], frontier: list[str], scale: Scale) -> dict:
    """{peer: score} of the first run of each `frontier` peer on `run`'s task and seed trained to exactly its
    length (a run trained to a paired run's length, or a budget point that happens to be as long)."""
    rivals = {}
    for other in candidates:
        if (other["peer"] in frontier and other["peer"] not in rivals and other["seed"] == run["seed"]
                and other["task"] == run["task"] and other[scale.units] == run[scale.units]):
            rivals[other["peer"]] = other[scale.score]
    return {peer: rivals[peer] for peer in frontier if peer in rivals}


def paired_comparison(runs: list[dict], candidates: list[dict], frontier: list[str], scale: Scale,
                      budget: float) -> dict:
    """Per seed, a run (AutoDecay's) against the better of the `frontier` peers trained to its own length on
    the same seed (found among `candidates`; a seed without them is left out). The deficit is how much worse
    the run is than the better one (positive: below the frontier). Returns the per-seed lines and the means."""
    per_seed = []
    for run in sorted(runs, key=lambda run: run["seed"]):
        rivals = rival_scores(run, candidates, frontier, scale)
        if not rivals:
            continue
        best = max(rivals, key=lambda peer: scale.better(rivals[peer]))
        per_seed.append({"seed": run["seed"], scale.length: run[scale.length], scale.name: run[scale.score],
                         "rivals": rivals, "best": best,
                         "deficit": scale.better(rivals[best]) - scale.better(run[scale.score])})
    if not per_seed:
        return {"per_seed": []}
    deficit, deficit_sd = mean_sd([line["deficit"] for line in per_seed])
    length, length_sd = mean_sd([line[scale.length] for line in per_seed])
    score, score_sd = mean_sd([line[scale.name] for line in per_seed])
    return {"per_seed": per_seed, "seeds": len(per_seed), "mean_deficit": deficit, "sd_deficit": deficit_sd,
            f"{scale.length}_mean": length, f"{scale.length}_sd": length_sd, f"{scale.name}_mean": score,
            f"{scale.name}_sd": score_sd, f"saved_{scale.length}": budget - length,
            "saved_percent": 100.0 * (budget - length) / budget}


def paired_checks(summary: dict, bounds: dict, step_runs: list[dict], scale: Scale) -> dict:
    """Each bound of `bounds` ({key: (bound, "<=" or ">=")}; a bound of 0 is not checked) against the paired
    comparison's means, and ("step") its mean score against StepDecay's at the whole budget on the seeds
    both ran: passed or not."""
    if not summary.get("per_seed"):
        return {}
    checks = {key: {"bound": bound, "value": summary[key], "sense": sense,
                    "passed": summary[key] <= bound if sense == "<=" else summary[key] >= bound}
              for key, (bound, sense) in bounds.items() if bound}
    step = {run["seed"]: run[scale.score] for run in step_runs}
    shared = [line for line in summary["per_seed"] if line["seed"] in step]
    if shared:
        own = statistics.mean(line[scale.name] for line in shared)
        theirs = statistics.mean(step[line["seed"]] for line in shared)
        checks["step"] = {"bound": theirs, "value": own, "passed": scale.better(own) >= scale.better(theirs)}
    return checks


def dominating_peers(rows: list[dict], scale: Scale, name: str = "autodecay") -> list[str]:
    """The rows both better than `name` (by more than one sd: the larger of the two rows' sds) and shorter."""
    mean, sd, length = f"{scale.name}_mean", f"{scale.name}_sd", f"{scale.length}_mean"
    own = next((row for row in rows if row["label"] == name), None)
    if own is None:
        return []
    return [row["label"] for row in rows if row["label"] not in (name, "oracle")
            and scale.better(row[mean]) - scale.better(own[mean]) > max(row[sd], own[sd])
            and row[length] < own[length]]
