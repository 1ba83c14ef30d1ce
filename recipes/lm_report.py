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


def schedule_points(results: list[dict], peer: str, budgets: list[int], score: str = "val_loss") -> dict:
    """{label: [(steps, score) per seed]}: one label per frontier budget for schedules trained or
    evaluated at each, else the schedule's name. `score`: the run's key judged (fine-tuning: test_loss)."""
    points: dict = {}
    for run in sorted((r for r in results if r["peer"] == peer), key=lambda r: r["seed"]):
        if run["evaluate_at"]:  # one run evaluated at every frontier budget (schedule-free)
            for e in run["evals"]:
                if e["step"] in budgets:
                    points.setdefault(f"{peer}@{e['step']}", []).append((e["step"], e["val_loss"]))
        elif "@" in run["label"] and run["max_steps"] not in budgets:
            continue  # a frontier schedule trained to a paired run's length: in the paired table
        else:
            points.setdefault(run["label"], []).append((run["steps"], run[score]))
    return points


def table_rows(results: list[dict], schedules: list[str], budgets: list[int], budget_steps: int,
               score: str = "val_loss") -> list[dict]:
    """Per schedule (and frontier budget): runs, steps used and `score`, mean and sd over seeds."""
    rows = []
    for peer in schedules:
        for label, pairs in sorted(schedule_points(results, peer, budgets, score).items(),
                                   key=lambda item: (item[1][0][0], item[0])):
            steps_mean, steps_sd = _mean_sd([s for s, _ in pairs])
            loss_mean, loss_sd = _mean_sd([loss for _, loss in pairs])
            rows.append({"schedule": peer, "label": label, "runs": len(pairs), "steps_mean": steps_mean,
                         "steps_sd": steps_sd, "steps_percent": 100.0 * steps_mean / budget_steps,
                         f"{score}_mean": loss_mean, f"{score}_sd": loss_sd})
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


def frontier_metrics(rows: list[dict], frontier: list[str], tolerance: float, score: str = "test_loss") -> dict:
    """Adds to every row, from its seed means (positive: worse): `regret`, its loss minus the best loss of
    the frontier schedules at any of their lengths; `waste`, its steps over the shortest frontier length
    whose loss is within `tolerance` of that best; `envelope_deficit`, its loss minus the best frontier loss
    at a length no longer than its steps (None when no frontier run is that short). Returns the best."""
    points = [(row["steps_mean"], row[f"{score}_mean"], row["label"]) for row in rows if row["schedule"] in frontier]
    if not points:
        raise ValueError(f"no run of the frontier schedules {frontier}: regret, waste and envelope need them")
    best_steps, best, best_label = min(points, key=lambda point: point[1])
    enough = min((steps, label) for steps, loss, label in points if loss <= best + tolerance)
    for row in rows:
        loss, steps = row[f"{score}_mean"], row["steps_mean"]
        shorter = [other for length, other, _ in points if length <= steps + 1e-9]
        row.update(regret=loss - best, waste=steps / enough[0],
                   envelope_deficit=loss - min(shorter) if shorter else None)
    return {"best": best, "best_label": best_label, "best_steps": best_steps, "enough_steps": enough[0],
            "enough_label": enough[1], "tolerance": tolerance}


def handed_details(rows: list[dict], results: list[dict]) -> None:
    """Adds to each fine-tuning row the mean step of the checkpoint handed back (load_best_model_at_end)
    and the mean test loss of the last model (what training ended with), where the Trainer swapped them."""
    for row in rows:
        runs = [r for r in results if r["label"] == row["label"] and r.get("best_step") is not None]
        row["handed_step_mean"] = statistics.mean(r["best_step"] for r in runs) if runs else None
        row["last_test_loss_mean"] = statistics.mean(r["last_test_loss"] for r in runs) if runs else None


def overfitting(results: list[dict], schedules: list[str]) -> list[dict]:
    """Per schedule evaluated during training to its budget (no early end): the validation loss at its best
    evaluation and at the end, means over seeds; a clear rise shows the budget is long enough to overfit."""
    rows = []
    for peer in schedules:
        runs = [r for r in results if r["peer"] == peer and len(r["evals"]) > 1 and r["steps"] == r["max_steps"]]
        if not runs:
            continue
        best = [min(r["evals"], key=lambda e: e["val_loss"]) for r in runs]
        rows.append({"schedule": peer, "runs": len(runs), "best_val_loss": statistics.mean(e["val_loss"] for e in best),
                     "best_step": statistics.mean(e["step"] for e in best),
                     "final_val_loss": statistics.mean(r["evals"][-1]["val_loss"] for r in runs),
                     "rise": statistics.mean(r["evals"][-1]["val_loss"] - e["val_loss"] for r, e in zip(runs, best))})
    return rows


def finetune_acceptance(rows: list[dict], max_deficit: float, own: str = "autodecay_eval",
                        reference: str = "linear_es") -> dict:
    """`own` (AutoDecay with the evaluation signal) within `max_deficit` of the envelope, and at least as good
    as `reference` (linear + EarlyStopping + best model) in no more steps; seed means."""
    by_label = {row["label"]: row for row in rows}
    if own not in by_label:
        return {}
    row, deficit = by_label[own], by_label[own]["envelope_deficit"]
    checks = {"envelope_deficit": deficit, "max_envelope_deficit": max_deficit,
              "envelope_ok": deficit is not None and deficit <= max_deficit}
    if reference in by_label:
        other = by_label[reference]
        checks.update(reference=reference, test_loss=row["test_loss_mean"], steps=row["steps_mean"],
                      reference_test_loss=other["test_loss_mean"], reference_steps=other["steps_mean"],
                      no_worse_than_reference=row["test_loss_mean"] <= other["test_loss_mean"],
                      no_more_steps=row["steps_mean"] <= other["steps_mean"])
    return checks


def _number(value: Optional[float], form: str) -> str:
    return "-" if value is None else format(value, form)


def finetune_markdown(summary: dict) -> str:
    """results.md of the fine-tuning benchmark: the rows with their frontier metrics, the acceptance, the
    evidence of overfitting, the pre-training's cost."""
    cfg, best, pre = summary["config"], summary["frontier"], summary["pretraining"]
    lines = [f"Fine-tuning a pre-trained character-level GPT-2 on English prose (pydoc_data.topics): test loss in "
             f"nats per character ({summary['runs'][0]['test_predictions']:,} predictions) of the model each "
             f"schedule hands back, budget {cfg['budget_steps']} steps, seeds {cfg['seeds']}. Regret, waste and "
             "envelope deficit are from the seed means; positive regret and deficit: worse than the frontier.", "",
             "| schedule | runs | steps used | test loss | regret | waste | envelope deficit | handed from step "
             "| last model |", "|---" * 9 + "|"]
    for row in summary["rows"]:
        lines.append(f"| {row['label']} | {row['runs']} | {_pm(row['steps_mean'], row['steps_sd'], 0)} | "
                     f"{_pm(row['test_loss_mean'], row['test_loss_sd'], 4)} | {row['regret']:+.4f} | "
                     f"{row['waste']:.2f} | {_number(row['envelope_deficit'], '+.4f')} | "
                     f"{_number(row['handed_step_mean'], '.0f')} | {_number(row['last_test_loss_mean'], '.4f')} |")
    lines += ["", f"Frontier ({' / '.join(cfg['frontier'])}): best {best['best']:.4f} ({best['best_label']}); the "
              f"shortest length within {best['tolerance']} nats of it: {best['enough_steps']:.0f} steps "
              f"({best['enough_label']}). Last model: the test loss of the final weights where "
              "load_best_model_at_end handed back an earlier checkpoint."]
    check = summary["acceptance"]
    if check:
        text = (f"Acceptance: autodecay_eval's envelope deficit {_number(check['envelope_deficit'], '+.4f')} "
                f"(at most {check['max_envelope_deficit']}: {'pass' if check['envelope_ok'] else 'FAIL'}).")
        if "reference" in check:
            good = check["no_worse_than_reference"] and check["no_more_steps"]
            text += (f" Against {check['reference']}: {check['test_loss']:.4f} in {check['steps']:.0f} steps vs "
                     f"{check['reference_test_loss']:.4f} in {check['reference_steps']:.0f} "
                     f"({'pass' if good else 'FAIL'}).")
        lines += ["", text]
    lines += ["", "Overfitting within the budget: validation loss (means over seeds).", "",
              "| schedule | runs | best | at step | at the budget | rise |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['schedule']} | {r['runs']} | {r['best_val_loss']:.4f} | {r['best_step']:.0f} | "
              f"{r['final_val_loss']:.4f} | {r['rise']:+.4f} |" for r in summary["overfitting"]]
    lines += ["", f"Pre-training: {pre['peer']} to {pre['steps']} steps on the corpus, validation loss "
              f"{pre['val_loss']:.4f}; {pre['wall_seconds']:.0f} s wall, {pre['cpu_seconds']:.0f} CPU-s"
              + (" (reused from an earlier invocation)." if pre["reused"] else "."),
              f"Whole benchmark: {summary['wall_seconds']:.0f} s wall, {summary['cpu_seconds']:.0f} CPU-s in runs."]
    lines += ["", "| schedule | why these settings |", "|---|---|"]
    lines += [f"| {name} | {note} |" for name, note in summary["peers"].items()]
    return "\n".join(lines)


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


def write_results(output: Path, summary: dict, tables=None) -> str:
    """results.json (everything) and results.md (the tables, `markdown` unless `tables` is given); returns
    the tables."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = (tables or markdown)(summary)
    (output / "results.md").write_text(table + "\n")
    return table


def plot_pareto(results: list[dict], schedules: list[str], frontier: list[str], budgets: list[int], path: Path,
                score: str = "val_loss", title: str = "Character-level GPT-2 on the Python standard library: "
                                                       "loss against steps"):
    """`score` (validation loss) against steps used: a line (mean ± sd over seeds) for each schedule trained or
    evaluated at several budgets (the frontier solid), a point with error bars for the others, each seed
    faint behind it."""
    import matplotlib  # here, not at the top: the report's numbers need no plotting library
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.5), layout="constrained")
    axes = figure.subplots()
    colours = dict(zip(schedules, matplotlib.colormaps["tab10"].colors))
    for peer in schedules:
        points = schedule_points(results, peer, budgets, score)
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
    axes.set(xlabel="training steps used", ylabel=f"{score.replace('_loss', '')} loss (nats per character)",
             title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)
