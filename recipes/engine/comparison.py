"""The schedule comparison's arithmetic and tables: one row per schedule, the paired comparison with the
frontier, each schedule against the frontier's envelope (regret, waste, envelope deficit), and the checks on
AutoDecay. Plain Python over the runs' summaries (no training here).

A run is a dict with at least "schedule", "seed", "test_top1", "epochs", "updates", "decay_epochs".
"""
import statistics

from .peers import PEERS


EVALUATIONS = ("test_top1", "test_loss", "val_top1", "val_loss")  # what a budget point reads off its run's curves
FIXED_LENGTH = ("cosine", "wsd")  # the frontier families whose points are runs trained to that length


def mean_sd(values: list) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def note_of(name: str) -> str:
    """A schedule's note; a point of a run read at a share of the budget (NAME_40) says which."""
    if name in PEERS:
        return PEERS[name].note
    base, _, percent = name.rpartition("_")
    return f"{PEERS[base].note}; read at {percent}% of the budget from its one run"


def budget_point_runs(results: list[dict], budget_epochs: int) -> list[dict]:
    """For each run of a peer with `budgets` (schedule-free: no schedule to end), the run as if it had
    stopped at each of those shares of the budget: its evaluation after that epoch, named NAME_PERCENT."""
    points = []
    for run in results:
        peer = PEERS.get(run["schedule"])
        for fraction in peer.budgets if peer else ():
            epoch = round(fraction * budget_epochs)
            line = next((line for line in run["curves"] if line["epoch"] == epoch), None)
            if line is not None:
                points.append({**run, "schedule": f"{run['schedule']}_{round(100 * fraction)}",
                               **{key: line[key] for key in EVALUATIONS if key in line},
                               "epochs": line["epoch"], "updates": line["updates"],
                               "curves": [ln for ln in run["curves"] if ln["epoch"] <= epoch]})
    return points


def frontier_of(name: str) -> str:
    """The frontier line a schedule's point belongs to ("" for none)."""
    base = name if name in PEERS else name.rpartition("_")[0]
    return PEERS[base].frontier if base in PEERS else ""


def table_rows(results: list[dict], names: list[str], budget_epochs: int, oracle_length) -> list[dict]:
    """Per schedule: runs, accuracy mean and sd, epochs used, the saving against StepDecay (which uses
    the whole budget) and the fraction of the oracle's saving that it captures."""
    rows = []
    for name in names:
        runs = [run for run in results if run["schedule"] == name]
        if not runs:
            continue
        top1_mean, top1_sd = mean_sd([run["test_top1"] for run in runs])
        epochs_mean, epochs_sd = mean_sd([run["epochs"] for run in runs])
        saved = budget_epochs - epochs_mean
        oracle_saving = budget_epochs - oracle_length if oracle_length is not None else None
        rows.append({
            "schedule": name, "runs": len(runs), "top1_mean": top1_mean, "top1_sd": top1_sd,
            "epochs_mean": epochs_mean, "epochs_sd": epochs_sd,
            "saved_epochs": saved, "saved_percent": 100.0 * saved / budget_epochs,
            "oracle_fraction": saved / oracle_saving if oracle_saving else None,
            "decay_epochs": [run["decay_epochs"] for run in runs],
            "frontier": frontier_of(name), "note": note_of(name),
        })
    return rows


def envelope_scores(rows: list[dict], tolerance: float = 0.1, families: tuple = FIXED_LENGTH) -> dict:
    """Every row against the envelope of the fixed-length frontier points (the rows of `families`: cosine and
    WSD at each budget point run), all from seed means:

    - regret: the best point's accuracy minus the row's (points; the best = the most accurate point);
    - waste: the row's epochs over those of the shortest point within `tolerance` points of the best;
    - envelope deficit: the best accuracy of the points no longer than the row, minus the row's (points;
      None when no point is that short).

    Returns {} without frontier points, else the best point, the shortest good one, and per schedule its
    three numbers ("scores")."""
    points = [row for row in rows if row["frontier"] in families]
    if not points:
        return {}
    best = max(points, key=lambda row: (row["top1_mean"], -row["epochs_mean"]))
    good = [row for row in points if row["top1_mean"] >= best["top1_mean"] - tolerance]
    shortest = min(good, key=lambda row: (row["epochs_mean"], -row["top1_mean"]))
    scores = {}
    for row in rows:
        shorter = [point["top1_mean"] for point in points if point["epochs_mean"] <= row["epochs_mean"] + 1e-9]
        scores[row["schedule"]] = {
            "regret": best["top1_mean"] - row["top1_mean"],
            "waste": row["epochs_mean"] / shortest["epochs_mean"],
            "envelope_deficit": max(shorter) - row["top1_mean"] if shorter else None,
        }

    def point(row):
        return {"schedule": row["schedule"], "top1_mean": row["top1_mean"], "epochs_mean": row["epochs_mean"]}

    return {"tolerance": tolerance, "best": point(best), "shortest_good": point(shortest), "scores": scores}


def budget_percent(name: str) -> int:
    """The share of the budget a frontier point's name says (NAME_PERCENT; the plain name: 100)."""
    base, _, percent = name.rpartition("_")
    return int(percent) if base and percent.isdigit() else 100


def frontier_table(rows: list[dict]) -> str:
    """The frontier's seed means: a line per family, a column per share of the budget run."""
    families = list(dict.fromkeys(row["frontier"] for row in rows if row["frontier"]))
    if not families:
        return ""
    cells = {(row["frontier"], budget_percent(row["schedule"])): row for row in rows if row["frontier"]}
    percents = sorted({percent for _, percent in cells})
    epochs = {}
    for (family, percent), row in cells.items():  # the fixed-length points' epochs first
        if family in FIXED_LENGTH or percent not in epochs:
            epochs[percent] = row["epochs_mean"]
    lines = ["| frontier | " + " | ".join(f"{p}% ({epochs[p]:.3g} epochs)" for p in percents) + " |",
             "|---" * (1 + len(percents)) + "|"]
    for family in families:
        values = [cells.get((family, p)) for p in percents]
        lines.append(f"| {family} | " + " | ".join(
            f"{row['top1_mean']:.2f} ± {row['top1_sd']:.2f}" if row else "" for row in values) + " |")
    return "\n".join(lines)


def number(value, digits: int = 2, sign: bool = True) -> str:
    """A table cell: `value` with `digits` decimals (a sign when `sign`), or "-" for None."""
    return "-" if value is None else f"{value:{'+' if sign else ''}.{digits}f}"


def envelope_table(rows: list[dict], names: list[str], envelope: dict) -> str:
    """The envelope numbers of the rows `names` (AutoDecay's), a line each, with what they are measured from."""
    chosen = [row for row in rows if row["schedule"] in names and row.get("regret") is not None]
    if not envelope or not chosen:
        return ""
    best, shortest = envelope["best"], envelope["shortest_good"]
    lines = ["| schedule | test top-1 (%) | epochs used | regret (points) | waste | envelope deficit (points) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {row['schedule']} | {row['top1_mean']:.2f} | {row['epochs_mean']:.1f} | {number(row['regret'])} "
              f"| {number(row['waste'], sign=False)} | {number(row['envelope_deficit'])} |" for row in chosen]
    lines += ["", f"best fixed-length point: {best['schedule']} ({best['top1_mean']:.2f}% in {best['epochs_mean']:g} "
              f"epochs); the shortest within {envelope['tolerance']:g} points of it: {shortest['schedule']} "
              f"({shortest['top1_mean']:.2f}% in {shortest['epochs_mean']:g} epochs)."]
    return "\n".join(lines)


def results_table(rows: list[dict]) -> str:
    """The rows as a markdown table (regret, waste and envelope deficit: see `envelope_scores`)."""
    lines = [
        "| schedule | runs | test top-1 (%) | epochs used | saved vs StepDecay | of the oracle's saving "
        "| regret | waste | envelope deficit | decays at epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        spread = f" ± {row['top1_sd']:.2f}" if row["runs"] > 1 else ""
        epochs_spread = f" ± {row['epochs_sd']:.1f}" if row["epochs_sd"] else ""
        fraction = "-" if row["oracle_fraction"] is None else f"{100 * row['oracle_fraction']:.0f}%"
        decays = "; ".join(", ".join(f"{at:.1f}" for at in run) or "-" for run in row["decay_epochs"])
        lines.append(
            f"| {row['schedule']} | {row['runs']} | {row['top1_mean']:.2f}{spread} | {row['epochs_mean']:.1f}"
            f"{epochs_spread} | {row['saved_epochs']:.1f} ({row['saved_percent']:.0f}%) | {fraction} "
            f"| {number(row.get('regret'))} | {number(row.get('waste'), sign=False)} "
            f"| {number(row.get('envelope_deficit'))} | {decays} |"
        )
    return "\n".join(lines)


def dominating_peers(rows: list[dict], name: str = "autodecay") -> dict:
    """The peers both more accurate than `name` (by more than one sd: the larger of the two schedules'
    sds) and shorter, and the fraction of the oracle's saving `name` captures."""
    by_name = {row["schedule"]: row for row in rows}
    auto = by_name.get(name)
    if auto is None:
        return {}
    dominating = [
        row["schedule"] for row in rows
        if row["schedule"] not in (name, "oracle")
        and row["top1_mean"] - auto["top1_mean"] > max(row["top1_sd"], auto["top1_sd"])
        and row["epochs_mean"] < auto["epochs_mean"]
    ]
    return {"peers_more_accurate_and_shorter": dominating, "oracle_fraction": auto["oracle_fraction"]}


def paired_comparison(runs: list[dict], paired: list[dict]) -> dict:
    """Per seed, a run (AutoDecay's) against the better of the frontier schedules trained to its own length
    on the same seed (`paired`: runs with the same "seed"; "schedule" names the frontier schedule). The
    deficit is the better one's accuracy minus the run's (points; positive: the run is below the frontier).
    Returns the per-seed lines and the means: deficit (mean, sd), the run's epochs and accuracy."""
    per_seed = []
    for run in sorted(runs, key=lambda run: run["seed"]):
        rivals = {other["schedule"]: other["test_top1"] for other in paired if other["seed"] == run["seed"]}
        if not rivals:
            continue
        best = max(rivals, key=rivals.get)
        per_seed.append({"seed": run["seed"], "epochs": run["epochs"], "updates": run["updates"],
                         "top1": run["test_top1"], "rivals": rivals, "best": best,
                         "deficit": rivals[best] - run["test_top1"]})
    if not per_seed:
        return {"per_seed": []}
    deficit, deficit_sd = mean_sd([line["deficit"] for line in per_seed])
    epochs, epochs_sd = mean_sd([line["epochs"] for line in per_seed])
    top1, top1_sd = mean_sd([line["top1"] for line in per_seed])
    return {"per_seed": per_seed, "seeds": len(per_seed), "mean_deficit": deficit, "sd_deficit": deficit_sd,
            "epochs_mean": epochs, "epochs_sd": epochs_sd, "top1_mean": top1, "top1_sd": top1_sd}


def paired_checks(summary: dict, max_deficit: float, max_epochs: float, min_top1: float) -> dict:
    """Each bound (0: not checked) against the paired comparison's means: passed or not."""
    if not summary.get("per_seed"):
        return {}
    bounds = {"mean_deficit": (max_deficit, summary["mean_deficit"] <= max_deficit),
              "epochs_mean": (max_epochs, summary["epochs_mean"] <= max_epochs),
              "top1_mean": (min_top1, summary["top1_mean"] >= min_top1)}
    return {key: {"bound": bound, "value": summary[key], "passed": passed}
            for key, (bound, passed) in bounds.items() if bound}


def paired_table(name: str, summary: dict, checks: dict) -> str:
    """The paired comparison as a markdown table (a line per seed) and a line of means and checks."""
    if not summary.get("per_seed"):
        return ""
    rivals = list(summary["per_seed"][0]["rivals"])
    lines = [f"| seed | {name} epochs | {name} top-1 (%) | " + " | ".join(f"{r} at its length" for r in rivals)
             + " | better | deficit (points) |", "|---" * (5 + len(rivals)) + "|"]
    for line in summary["per_seed"]:
        cells = " | ".join(f"{line['rivals'].get(r, float('nan')):.2f}" for r in rivals)
        lines.append(f"| {line['seed']} | {line['epochs']:.1f} | {line['top1']:.2f} | {cells} | {line['best']} "
                     f"| {line['deficit']:+.2f} |")
    lines += ["", f"{name} against the better of {' and '.join(rivals)} trained to its own length, paired by seed "
              f"({summary['seeds']} seeds): mean deficit {summary['mean_deficit']:+.2f} ± {summary['sd_deficit']:.2f} "
              f"points; {name} {summary['top1_mean']:.2f} ± {summary['top1_sd']:.2f}% in "
              f"{summary['epochs_mean']:.1f} ± {summary['epochs_sd']:.1f} epochs."]
    if checks:
        lines.append("checks: " + ", ".join(
            f"{key} {check['value']:.2f} {'<=' if key != 'top1_mean' else '>='} {check['bound']:g} "
            f"{'passed' if check['passed'] else 'FAILED'}" for key, check in checks.items()))
    return "\n".join(lines)
