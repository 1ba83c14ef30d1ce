"""A benchmark's Pareto figure, the same in every domain: each row's score against the length it used, the
frontier lines, the rivals trained to each paired run's length, and the Pareto front."""
import textwrap
from pathlib import Path

from .peers import PEERS
from .plots import colour_cycle
from .report import Scale

FRONTIER_STYLES = {"cosine": "-", "wsd": "--", "schedulefree": ":"}
PAIRED_MARKERS = "osD^v"  # the rivals at each paired schedule's length: hollow, one shape per paired schedule


def pareto_front(rows: list[dict], scale: Scale) -> list[dict]:
    """The rows no other row beats on both: as short or shorter and as good or better."""
    mean, length = f"{scale.name}_mean", f"{scale.length}_mean"
    front = []
    for row in sorted(rows, key=lambda row: (row[length], -scale.better(row[mean]))):
        if not front or scale.better(row[mean]) > scale.better(front[-1][mean]):
            front.append(row)
    return front


def family_label(family: str, rows: list[dict]) -> str:
    """A frontier line's legend entry, naming the shares of the budget it was run at."""
    percents = sorted(round(100 * row["budget_fraction"]) for row in rows if row["frontier"] == family)
    return f"{family} at {', '.join(map(str, percents))}% of the budget"


def paired_points(paired: dict, scale: Scale) -> list[tuple]:
    """(paired schedule, rival, length, mean score) of every rival trained to a paired schedule's length."""
    points = []
    for name, summary in paired.items():
        for rival in summary["per_seed"][0]["rivals"] if summary.get("per_seed") else ():
            values = [line["rivals"][rival] for line in summary["per_seed"] if rival in line["rivals"]]
            points.append((name, rival, summary[f"{scale.length}_mean"], sum(values) / len(values)))
    return points


def score_axis(rows: list[dict], paired: list[tuple], scale: Scale) -> tuple[float, float]:
    """The score axis: it spans the frontier lines, AutoDecay, StepDecay and the paired rivals, with a margin;
    a peer far worse than them is named under the axis rather than drawn."""
    mean = f"{scale.name}_mean"
    judged = [row[mean] for row in rows if row["frontier"] or row["peer"] == "step"
              or PEERS[row["peer"]].kind == "autodecay"] + [point[3] for point in paired]
    judged = judged or [row[mean] for row in rows]
    margin = 0.15 * (max(judged) - min(judged)) + 10 ** -scale.digits
    scores = [row[mean] for row in rows]
    if scale.higher_is_better:  # room for the best row; those far below the judged ones are named instead
        return min(judged) - margin, max(scores + judged) + margin
    return min(scores + judged) - margin, max(judged) + margin


def plot_pareto(rows: list[dict], paired: dict, path: Path, title: str, scale: Scale, band: float = 0.0) -> None:
    """Score against length used: a point per row (error bars: sd over seeds), each frontier family's points
    joined by a line, the rivals trained to each paired schedule's own length (hollow), the Pareto front as a
    staircase, and with `band` StepDecay's score and a band of that width on its worse side. A peer beyond
    the axis is named under it."""
    from matplotlib.figure import Figure

    mean, sd, length = f"{scale.name}_mean", f"{scale.name}_sd", f"{scale.length}_mean"
    figure = Figure(figsize=(10.5, 5.5), layout="constrained")
    axes = figure.subplots()
    rivals = paired_points(paired, scale)
    low, high = score_axis(rows, rivals, scale)
    beyond = [row for row in rows if not low <= row[mean] <= high]
    rows = [row for row in rows if low <= row[mean] <= high]
    families = list(dict.fromkeys(row["frontier"] for row in rows if row["frontier"]))
    colours = colour_cycle([row["label"] for row in rows if not row["frontier"]] + families)
    for row in rows:
        colour = colours[row["frontier"] or row["label"]]
        marker, size = ("*", 12) if PEERS[row["peer"]].kind == "autodecay" else ("o", 5 if row["frontier"] else 6)
        axes.errorbar(row[length], row[mean], xerr=row[f"{scale.length}_sd"], yerr=row[sd], fmt=marker,
                      color=colour, capsize=3, label=None if row["frontier"] else row["label"], markersize=size)
        if not row["frontier"]:
            axes.annotate(row["label"], (row[length], row[mean]), textcoords="offset points", xytext=(5, 5),
                          fontsize=8)
    for family in families:
        points = sorted((row[length], row[mean]) for row in rows if row["frontier"] == family)
        axes.plot(*zip(*points), FRONTIER_STYLES.get(family, "-"), color=colours[family], linewidth=1.5,
                  label=family_label(family, rows))
    names = list(paired)
    for name, rival, epochs, score in rivals:
        axes.plot(epochs, score, PAIRED_MARKERS[names.index(name) % len(PAIRED_MARKERS)], markerfacecolor="none",
                  color=colours.get(rival, "black"), markersize=9, label=f"{rival} at {name}'s length")
    if rows:
        draw_front(axes, pareto_front(rows, scale), scale)
    step = next((row for row in rows if row["label"] == "step"), None)
    if step is not None and band:
        edge = step[mean] - band if scale.higher_is_better else step[mean] + band
        axes.axhspan(min(edge, step[mean]), max(edge, step[mean]), color="grey", alpha=0.15,
                     label=f"StepDecay, {band:g} worse")
    axes.set_ylim(low, high)
    if beyond:
        text = ", ".join(f"{row['label']} {row[mean]:.{scale.digits}f}" for row in beyond)
        axes.text(0.01, 0.01, textwrap.fill("beyond the axis: " + text, 100), transform=axes.transAxes, fontsize=8)
    axes.set(xlabel=f"{scale.length} used (mean over seeds)", ylabel=scale.title, title=title)
    axes.grid(alpha=0.3)
    figure.legend(fontsize=7, loc="outside right upper")  # beside the axes: it hides no point
    figure.savefig(path, dpi=120)


def draw_front(axes, front: list[dict], scale: Scale) -> None:
    """The Pareto front as a staircase."""
    mean, length = f"{scale.name}_mean", f"{scale.length}_mean"
    xs, ys = [front[0][length]], [front[0][mean]]
    for row in front[1:]:
        xs += [row[length], row[length]]
        ys += [ys[-1], row[mean]]
    axes.plot(xs, ys, "-.", color="grey", linewidth=1, label="Pareto front")
