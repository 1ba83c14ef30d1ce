"""The transfer study's report: per stage the source and target accuracies, each earlier stage against the
last (paired by source run and seed) with the primary comparison named in advance and Holm's correction for
the others, the smallest difference the design detects, the table and the figure.
"""
import math
import statistics
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from .study_statistics import holm, paired_test

METHOD_LABELS = {"linear_probe": "linear probe", "finetune": "fine-tune"}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(results: list[dict], targets: list[str], methods: list[str]) -> dict:
    """Per stage ("init": the random-init reference): epochs, source top-1 and, per target and method, the
    target top-1 over the (source run, seed) pairs, and `minus_last`: its paired difference (points) to the
    last stage's of the same source run, seed, target and method (source runs vary more than stages)."""
    stages = sorted({r["stage"] for r in results if r["stage"] != "init"})
    last = {(r["source_run"], r["seed"], r["target"], r["method"]): r["top1"]
            for r in results if stages and r["stage"] == stages[-1]}

    def entry(stage):
        mine = [r for r in results if r["stage"] == stage]
        sources = {(r["source_run"], r["seed"]): r for r in mine if r["source_top1"] is not None}
        result = {
            "stage": stage,
            "epochs": sorted({r["epoch"] for r in mine if r["epoch"] is not None}),
            "source_top1": spread([r["source_top1"] for r in sources.values()]) if sources else None,
            "targets": {},
        }
        for target in targets:
            result["targets"][target] = {}
            for method in methods:
                cell = [r for r in mine if r["target"] == target and r["method"] == method]
                if cell:
                    keys = [(r["source_run"], r["seed"], target, method) for r in cell]
                    result["targets"][target][method] = {
                        **spread([r["top1"] for r in cell]), "seeds": [r["seed"] for r in cell],
                        "source_runs": [r["source_run"] for r in cell],
                        "minus_last": spread([r["top1"] - last[key] for r, key in zip(cell, keys) if key in last])
                        if all(key in last for key in keys) and stage != stages[-1] else None,
                    }
        return result

    return {"stages": [entry(stage) for stage in stages],
            "random_init": entry("init") if any(r["stage"] == "init" for r in results) else None}


def _cell(stat, signed: bool = False) -> str:
    if not stat:
        return "-"
    mean = f"{stat['mean']:+.1f}" if signed else f"{stat['mean']:.1f}"
    return f"{mean} ± {stat['sd']:.1f}" if len(stat["values"]) > 1 else mean


def transfer_table(summary: dict, targets: list[str], methods: list[str]) -> str:
    """Markdown: a row per stage (and the random init), source top-1 and each target x method (mean ± sd %)."""
    columns = [f"{target}: {METHOD_LABELS[method]}" for target in targets for method in methods]
    lines = ["| stage | ends at epoch | source top-1 | " + " | ".join(columns) + " |",
             "|---" * (3 + len(columns)) + "|"]
    rows = summary["stages"] + ([summary["random_init"]] if summary["random_init"] else [])
    for row in rows:
        epochs = ", ".join(f"{e:g}" for e in row["epochs"]) or "-"
        cells = [_cell(row["targets"][t].get(m)) for t in targets for m in methods]
        label = "random init" if row["stage"] == "init" else str(row["stage"])
        lines.append(f"| {label} | {epochs} | {_cell(row['source_top1'])} | " + " | ".join(cells) + " |")
    every_cell = [cell for row in rows for t in row["targets"].values() for cell in t.values()]
    count = max((len(cell["values"]) for cell in every_cell), default=0)
    lines.append(f"\nTop-1 (%), mean ± sd over {count} (source run, seed) pairs.")
    paired = [row for row in rows
              if any(cell.get("minus_last") for t in row["targets"].values() for cell in t.values())]
    if paired:
        last = summary["stages"][-1]["stage"]
        lines += ["", f"| minus stage {last} (paired, points) | " + " | ".join(columns) + " |",
                  "|---" * (1 + len(columns)) + "|"]
        for row in paired:
            cells = [_cell(row["targets"][t].get(m, {}).get("minus_last"), signed=True)
                     for t in targets for m in methods]
            lines.append(f"| {'random init' if row['stage'] == 'init' else row['stage']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_transfer(summary: dict, targets: list[str], methods: list[str], path: Path) -> None:
    """Source top-1 against stage (left), and per target the transfer top-1 of each method against stage
    (mean ± sd; dashed: the random-init reference)."""
    figure = Figure(figsize=(4.2 * (1 + len(targets)), 4), layout="constrained")
    axes = figure.subplots(1, 1 + len(targets), squeeze=False)[0]
    stages = [row["stage"] for row in summary["stages"]]

    def errorbar(ax, stats, **kwargs):
        points = [(s, st) for s, st in zip(stages, stats) if st]
        ax.errorbar([s for s, _ in points], [st["mean"] for _, st in points], yerr=[st["sd"] for _, st in points],
                    marker="o", capsize=3, **kwargs)

    errorbar(axes[0], [row["source_top1"] for row in summary["stages"]], color="black")
    axes[0].set(title="source task", ylabel="test top-1 (%)")
    colours = dict(zip(methods, matplotlib.colormaps["tab10"].colors))
    for ax, target in zip(axes[1:], targets):
        for method in methods:
            errorbar(ax, [row["targets"][target].get(method) for row in summary["stages"]], color=colours[method],
                     label=METHOD_LABELS[method])
            reference = summary["random_init"] and summary["random_init"]["targets"][target].get(method)
            if reference:
                ax.axhline(reference["mean"], color=colours[method], linestyle="--", linewidth=1,
                           label=f"{METHOD_LABELS[method]}, random init")
        ax.set(title=f"transfer to {target}")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set(xlabel="stage whose end is the checkpoint", xticks=stages)
        ax.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------
def source_rises(summary: dict) -> dict:
    """The source's mean test top-1 at each stage end and whether it rises across the stages (each stage at
    least the one before, the last above the first): a study of stages needs stages that differ."""
    means = [row["source_top1"]["mean"] for row in summary["stages"] if row["source_top1"]]
    rises = len(means) > 1 and means[-1] > means[0] and all(b >= a for a, b in zip(means, means[1:]))
    return {"source_top1_by_stage": means, "rises": rises}


def comparisons(results: list[dict], targets: list[str], methods: list[str], primary: tuple,
                alpha: float, power: float) -> list[dict]:
    """Every earlier stage against the last, per target and method: the paired difference of target top-1
    (points, paired by source run and seed), its two-sided paired t-test and the smallest difference the
    design detects (`power` at `alpha`). `primary` (target, method) names the comparison chosen in advance,
    the first stage against the last: its p-value stands alone; the others get Holm's correction as a family."""
    stages = sorted({r["stage"] for r in results if r["stage"] != "init"})
    top1 = {(r["source_run"], r["seed"], r["stage"], r["target"], r["method"]): r["top1"] for r in results}
    rows = []
    for target in targets:
        for method in methods:
            for stage in stages[:-1]:
                pairs = [(run, seed) for run, seed, s, t, m in top1 if (s, t, m) == (stage, target, method)]
                differences = [top1[run, seed, stage, target, method] - top1[run, seed, stages[-1], target, method]
                               for run, seed in pairs if (run, seed, stages[-1], target, method) in top1]
                rows.append({"target": target, "method": method, "stage": stage, "against": stages[-1],
                             "primary": (target, method, stage) == (*primary, stages[0]),
                             **paired_test(differences, alpha, power)})
    others = [row for row in rows if not row["primary"]]
    p_values = [1.0 if math.isnan(row["p_value"]) else row["p_value"] for row in others]
    for row, adjusted in zip(others, holm(p_values) if others else []):
        row["p_holm"] = adjusted
    for row in rows:
        row.setdefault("p_holm", row["p_value"])  # the primary comparison: uncorrected
    return sorted(rows, key=lambda row: not row["primary"])


def comparisons_table(rows: list[dict], rising: dict, alpha: float, power: float) -> str:
    """Markdown: the source check, then a row per comparison (the primary first)."""
    by_stage = " -> ".join(f"{value:.1f}" for value in rising["source_top1_by_stage"])
    lines = [f"Source top-1 at the stage ends: {by_stage} ({'rises' if rising['rises'] else 'does NOT rise'} "
             "across the stages).", "",
             f"| comparison (target top-1, stage k - last stage, paired) | pairs | mean (points) | sd | p "
             f"| p, Holm | smallest detectable ({power:.0%} power, alpha {alpha:g}) |", "|---" * 7 + "|"]
    for row in rows:
        name = f"{row['target']}, {METHOD_LABELS[row['method']]}, stage {row['stage']} - stage {row['against']}"
        name = f"**primary: {name}**" if row["primary"] else name
        holm_text = "(not corrected)" if row["primary"] else f"{row['p_holm']:.3g}"
        lines.append(f"| {name} | {row['n']} | {row['mean']:+.2f} | {row['sd']:.2f} | {row['p_value']:.3g} "
                     f"| {holm_text} | ±{row['detectable']:.2f} |")
    return "\n".join(lines)
