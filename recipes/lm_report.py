"""The transformer benchmark's report: table rows, the paired comparison against the frontier, the
acceptance checks, results.json / results.md, and the Pareto figure (validation loss against steps).

A run is a dict as `lm_runs.train_run` returns it: peer, label, seed, max_steps, steps (used), val_loss
(at its last step) and evals (validation loss at each evaluated step).
"""
import json
import statistics
from pathlib import Path
from typing import Optional


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def loss_at(results: list[dict], peer: str, seed: int, steps: int) -> Optional[float]:
    """Validation loss of `peer` trained to exactly `steps` on `seed` (a run planned to that length);
    None if there is none."""
    for run in results:
        if run["peer"] == peer and run["seed"] == seed and run["max_steps"] == steps == run["steps"]:
            return run["val_loss"]
    return None


def schedule_points(results: list[dict], peer: str, budgets: list[int]) -> dict:
    """{label: [(steps, val_loss) per seed]}: one label per frontier budget for schedules trained or
    evaluated at each, else the schedule's name."""
    points: dict = {}
    for run in sorted((r for r in results if r["peer"] == peer), key=lambda r: r["seed"]):
        if run["evaluate_at"]:  # one run evaluated at every frontier budget (schedule-free)
            for e in run["evals"]:
                if e["step"] in budgets:
                    points.setdefault(f"{peer}@{e['step']}", []).append((e["step"], e["val_loss"]))
        elif "@" in run["label"] and run["max_steps"] not in budgets:
            continue  # a frontier schedule trained to a paired run's length: in the paired table
        else:
            points.setdefault(run["label"], []).append((run["steps"], run["val_loss"]))
    return points


def table_rows(results: list[dict], schedules: list[str], budgets: list[int], budget_steps: int) -> list[dict]:
    """Per schedule (and frontier budget): runs, steps used and validation loss, mean and sd over seeds."""
    rows = []
    for peer in schedules:
        for label, pairs in sorted(schedule_points(results, peer, budgets).items(),
                                   key=lambda item: (item[1][0][0], item[0])):
            steps_mean, steps_sd = _mean_sd([s for s, _ in pairs])
            loss_mean, loss_sd = _mean_sd([loss for _, loss in pairs])
            rows.append({"schedule": peer, "label": label, "runs": len(pairs), "steps_mean": steps_mean,
                         "steps_sd": steps_sd, "steps_percent": 100.0 * steps_mean / budget_steps,
                         "val_loss_mean": loss_mean, "val_loss_sd": loss_sd})
    return rows


def paired_deficits(own: list[float], frontier: list[list[Optional[float]]]) -> list[float]:
    """Per seed: the paired run's loss minus the best (lowest) loss of the frontier schedules at its own
    length (positive: worse than the frontier). Frontier schedules not run count as absent."""
    deficits = []
    for loss, others in zip(own, frontier):
        present = [x for x in others if x is not None]
        if not present:
            raise ValueError("no frontier schedule was trained to the paired run's length")
        deficits.append(loss - min(present))
    return deficits


def paired_rows(results: list[dict], paired_schedules: list[str], frontier: list[str], budget_steps: int) -> dict:
    """For each paired schedule (AutoDecay): per seed, its steps and loss, each frontier schedule's loss
    at that length, the deficit; the mean deficit and the steps saved against the budget."""
    paired = {}
    for peer in paired_schedules:
        runs = sorted((r for r in results if r["peer"] == peer), key=lambda r: r["seed"])
        if not runs:
            continue
        seeds = []
        for run in runs:
            others = {name: loss_at(results, name, run["seed"], run["steps"]) for name in frontier}
            seeds.append({"seed": run["seed"], "steps": run["steps"], "val_loss": run["val_loss"], **others})
        deficits = paired_deficits([s["val_loss"] for s in seeds], [[s[n] for n in frontier] for s in seeds])
        for row, deficit in zip(seeds, deficits):
            row["deficit"] = deficit
        steps = [s["steps"] for s in seeds]
        paired[peer] = {"seeds": seeds, "mean_deficit": statistics.mean(deficits),
                        "steps_mean": statistics.mean(steps), "steps_saved": budget_steps - statistics.mean(steps),
                        "steps_saved_percent": 100.0 * (budget_steps - statistics.mean(steps)) / budget_steps}
    return paired


def acceptance(results: list[dict], paired: dict, budget_steps: int, max_deficit: float) -> dict:
    """Per paired schedule: mean paired deficit within `max_deficit`, and a mean validation loss no worse
    than StepDecay's at the full budget (on the seeds both ran)."""
    checks = {}
    step = {r["seed"]: r["val_loss"] for r in results if r["peer"] == "step" and r["steps"] == budget_steps}
    for peer, rows in paired.items():
        seeds = [row["seed"] for row in rows["seeds"] if row["seed"] in step]
        own = [row["val_loss"] for row in rows["seeds"] if row["seed"] in step]
        check = {"mean_paired_deficit": rows["mean_deficit"], "deficit_ok": rows["mean_deficit"] <= max_deficit,
                 "max_paired_deficit": max_deficit, "steps_saved": rows["steps_saved"]}
        if seeds:
            check.update(val_loss_mean=statistics.mean(own), step_val_loss_mean=statistics.mean(step[s] for s in seeds),
                         no_worse_than_step=statistics.mean(own) <= statistics.mean(step[s] for s in seeds))
        checks[peer] = check
    return checks


def _pm(mean: float, sd: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown(summary: dict) -> str:
    cfg = summary["config"]
    lines = [f"Validation loss in nats per character ({summary['runs'][0]['validation_predictions']:,} "
             f"predictions), budget {cfg['budget_steps']} steps, seeds {cfg['seeds']}.", "",
             "| schedule | runs | steps used | val loss |", "|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(f"| {row['label']} | {row['runs']} | {_pm(row['steps_mean'], row['steps_sd'], 0)} | "
                     f"{_pm(row['val_loss_mean'], row['val_loss_sd'], 4)} |")
    frontier = cfg["frontier"]
    for peer, rows in summary["paired"].items():
        check = summary["acceptance"][peer]
        lines += ["", f"Paired by seed: {peer} against {' / '.join(frontier)} trained to its own length.", "",
                  f"| seed | steps used | {peer} | " + " | ".join(frontier) + " | deficit |",
                  "|---" * (len(frontier) + 4) + "|"]
        for row in rows["seeds"]:
            others = " | ".join("-" if row[n] is None else f"{row[n]:.4f}" for n in frontier)
            lines.append(f"| {row['seed']} | {row['steps']} | {row['val_loss']:.4f} | {others} | "
                         f"{row['deficit']:+.4f} |")
        lines.append(f"| mean | {rows['steps_mean']:.0f} | | " + " | " * len(frontier)
                     + f"{rows['mean_deficit']:+.4f} |")
        verdict = "pass" if check["deficit_ok"] else "FAIL"
        text = (f"Mean paired deficit {check['mean_paired_deficit']:+.4f} nats (at most "
                f"{check['max_paired_deficit']}: {verdict}). Steps saved: {rows['steps_saved']:.0f} of "
                f"{cfg['budget_steps']} ({rows['steps_saved_percent']:.0f}%).")
        if "step_val_loss_mean" in check:
            verdict = "pass" if check["no_worse_than_step"] else "FAIL"
            text += (f" Against StepDecay at the full budget: {check['val_loss_mean']:.4f} vs "
                     f"{check['step_val_loss_mean']:.4f} ({verdict}).")
        lines += ["", text]
    lines += ["", "| schedule | why these settings |", "|---|---|"]
    lines += [f"| {name} | {note} |" for name, note in summary["peers"].items()]
    return "\n".join(lines)


def write_results(output: Path, summary: dict) -> str:
    """results.json (everything) and results.md (the tables); returns the tables."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = markdown(summary)
    (output / "results.md").write_text(table + "\n")
    return table


def plot_pareto(results: list[dict], schedules: list[str], frontier: list[str], budgets: list[int], path: Path):
    """Validation loss against steps used: a line (mean ± sd over seeds) for each schedule trained or
    evaluated at several budgets (the frontier solid), a point with error bars for the others, each seed
    faint behind it."""
    import matplotlib  # here, not at the top: the report's numbers need no plotting library
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.5), layout="constrained")
    axes = figure.subplots()
    colours = dict(zip(schedules, matplotlib.colormaps["tab10"].colors))
    for peer in schedules:
        points = schedule_points(results, peer, budgets)
        means = sorted((statistics.mean(s for s, _ in p), *_mean_sd([loss for _, loss in p])) for p in points.values())
        if not means:
            continue
        xs, ys, sds = zip(*means)
        style = "-" if peer in frontier else "--"
        if len(points) > 1:
            axes.errorbar(xs, ys, yerr=sds, fmt="o" + style, color=colours[peer], capsize=3, label=peer)
        else:
            pairs = next(iter(points.values()))
            axes.scatter([s for s, _ in pairs], [loss for _, loss in pairs], color=colours[peer], alpha=0.3, s=18,
                         zorder=3)
            axes.errorbar(xs, ys, yerr=sds, xerr=[_mean_sd([s for s, _ in pairs])[1]], fmt="D", zorder=3,
                          color=colours[peer], capsize=3, markersize=8, markerfacecolor="none", label=peer)
    axes.set(xlabel="training steps used", ylabel="validation loss (nats per character)",
             title="Character-level GPT-2 on the Python standard library: loss against steps")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)
