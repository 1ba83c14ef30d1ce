"""Figures of one run: training loss and test accuracy against epoch, the LR decays marked."""
import textwrap
from pathlib import Path


def plot_run(curves: list[dict], decay_epochs: list[float], path: Path, title: str = "") -> None:
    """Training loss (log scale) and test accuracy against epoch, LR decays marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    epochs = [line["epoch"] for line in curves]
    loss_axes.plot(epochs, [line["train_loss"] for line in curves], label="train")
    loss_axes.plot(epochs, [line["test_loss"] for line in curves], label="test")
    accuracy_axes.plot(epochs, [line["test_top1"] for line in curves], label="test")
    for name in [key for key in curves[0] if key.startswith("test_top1_")] if curves else []:
        accuracy_axes.plot(epochs, [line[name] for line in curves], label=name[len("test_top1_"):])
    for axes in (loss_axes, accuracy_axes):
        for at in decay_epochs:
            axes.axvline(at, color="grey", linestyle=":", linewidth=1)
        axes.grid(alpha=0.3)
        axes.legend()
    loss_axes.set(yscale="log", xlabel="epoch", ylabel="loss", title=title or "loss")
    accuracy_axes.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy (dotted: LR decays)")
    figure.savefig(path, dpi=110)


def colour_cycle(names: list) -> dict:
    """A distinct colour per name (tab10 but its grey, which the Pareto front and bands use, then Dark2;
    repeating past 17)."""
    import matplotlib

    tab10 = matplotlib.colormaps["tab10"].colors
    colours = tab10[:7] + tab10[8:] + matplotlib.colormaps["Dark2"].colors
    return {name: colours[index % len(colours)] for index, name in enumerate(names)}


def plot_curves(results: list[dict], names: list[str], path: Path) -> None:
    """Training loss (log scale) and test accuracy against epoch: a colour per schedule, a line per
    seed, a triangle where the learning rate was decayed."""
    import numpy as np
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    colours = colour_cycle(names)
    labelled = set()
    for run in results:
        epochs = [line["epoch"] for line in run["curves"]]
        colour = colours[run["schedule"]]
        label = None if run["schedule"] in labelled else run["schedule"]
        labelled.add(run["schedule"])
        for axes, key in ((loss_axes, "train_loss"), (accuracy_axes, "test_top1")):
            values = [line[key] for line in run["curves"]]
            axes.plot(epochs, values, color=colour, linewidth=1.2, alpha=0.85, label=label)
            decays = run["decay_epochs"]
            axes.plot(decays, np.interp(decays, epochs, values), "v", color=colour, markersize=7)
    final_accuracy = min(run["test_top1"] for run in results)
    loss_axes.set(yscale="log", xlabel="epoch", ylabel="training loss (epoch mean)", title="training loss")
    accuracy_axes.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    accuracy_axes.set_ylim(max(0.0, final_accuracy - 10), 100)
    loss_axes.legend(title="schedule (v = LR decay)", fontsize=7, ncol=2)
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both: as few or fewer epochs and as high or higher accuracy."""
    front = []
    for row in sorted(rows, key=lambda row: (row["epochs_mean"], -row["top1_mean"])):
        if not front or row["top1_mean"] > front[-1]["top1_mean"]:
            front.append(row)
    return front


FRONTIER_STYLES = {"cosine": "-", "wsd": "--", "schedulefree": ":"}
PAIRED_MARKERS = "osD^v"  # the rivals at each paired schedule's length: hollow, one shape per paired schedule


def family_label(family: str, rows: list[dict]) -> str:
    """A frontier line's legend entry, naming the shares of the budget it was run at."""
    from .comparison import budget_percent

    percents = sorted(budget_percent(row["schedule"]) for row in rows if row["frontier"] == family)
    return f"{family} at {', '.join(map(str, percents))}% of the budget"


def paired_points(paired: dict) -> list[tuple]:
    """(paired schedule, rival, epochs, mean accuracy) of every rival trained to a paired schedule's length."""
    points = []
    for name, summary in paired.items():
        for rival in summary["per_seed"][0]["rivals"] if summary.get("per_seed") else ():
            values = [line["rivals"][rival] for line in summary["per_seed"] if rival in line["rivals"]]
            points.append((name, rival, summary["epochs_mean"], sum(values) / len(values)))
    return points


def pareto_axis(rows: list[dict], paired: list[tuple]) -> tuple[float, float]:
    """The accuracy axis: it spans the frontier lines, AutoDecay, StepDecay and the paired rivals, with a margin;
    a peer far below them is named under the axis rather than drawn."""
    judged = [row["top1_mean"] for row in rows
              if row["frontier"] or row["schedule"].startswith("autodecay") or row["schedule"] == "step"]
    judged += [point[3] for point in paired]
    bottom = min(judged or [row["top1_mean"] for row in rows]) - 0.3
    return bottom, max([row["top1_mean"] for row in rows] + judged) + 0.3


def plot_pareto(rows: list[dict], paired: dict, path: Path, title: str, tolerance: float) -> None:
    """Accuracy against epochs used: a point per schedule (error bars: sd over seeds), each frontier
    family's points joined by a line (cosine, WSD, schedule-free at the shares of the budget run), the rivals
    trained to each paired schedule's own length (hollow), the Pareto front of the points drawn as a staircase,
    StepDecay's accuracy and its tolerance band. The legend lists what was run and is drawn; a peer below the
    axis is named under it."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10.5, 5.5), layout="constrained")
    axes = figure.subplots()
    rivals = paired_points(paired)
    bottom, top = pareto_axis(rows, rivals)
    below = [row for row in rows if row["top1_mean"] < bottom]
    rows = [row for row in rows if row["top1_mean"] >= bottom]
    families = list(dict.fromkeys(row["frontier"] for row in rows if row["frontier"]))
    colours = colour_cycle([row["schedule"] for row in rows if not row["frontier"]] + families)
    for row in rows:
        colour = colours[row["frontier"] or row["schedule"]]
        label = None if row["frontier"] else row["schedule"]
        marker, size = ("*", 12) if row["schedule"].startswith("autodecay") else ("o", 5 if row["frontier"] else 6)
        axes.errorbar(row["epochs_mean"], row["top1_mean"], xerr=row["epochs_sd"], yerr=row["top1_sd"],
                      fmt=marker, color=colour, capsize=3, label=label, markersize=size)
        if not row["frontier"]:
            axes.annotate(row["schedule"], (row["epochs_mean"], row["top1_mean"]), textcoords="offset points",
                          xytext=(5, 5), fontsize=8)
    for family in families:
        points = sorted((row["epochs_mean"], row["top1_mean"]) for row in rows if row["frontier"] == family)
        axes.plot(*zip(*points), FRONTIER_STYLES.get(family, "-"), color=colours[family], linewidth=1.5,
                  label=family_label(family, rows))
    names = list(paired)
    for name, rival, epochs, top1 in rivals:
        axes.plot(epochs, top1, PAIRED_MARKERS[names.index(name) % len(PAIRED_MARKERS)], markerfacecolor="none",
                  color=colours.get(rival, "black"), markersize=9, label=f"{rival} at {name}'s length")
    if rows:
        draw_front(axes, pareto_front(rows))
    step = next((row for row in rows if row["schedule"] == "step"), None)
    if step is not None:
        axes.axhspan(step["top1_mean"] - tolerance, step["top1_mean"], color="grey", alpha=0.15,
                     label=f"StepDecay - {tolerance:g} pt")
    axes.set_ylim(bottom, top)
    if below:
        names_below = ", ".join(f"{row['schedule']} {row['top1_mean']:.2f}%" for row in below)
        axes.text(0.01, 0.01, textwrap.fill("below the axis: " + names_below, 100), transform=axes.transAxes,
                  fontsize=8)
    axes.set(xlabel="epochs used (mean over seeds)", ylabel="final test top-1 (%)", title=title)
    axes.grid(alpha=0.3)
    figure.legend(fontsize=7, loc="outside right upper")  # beside the axes: it hides no point
    figure.savefig(path, dpi=120)


def draw_front(axes, front: list[dict]) -> None:
    """The Pareto front as a staircase."""
    xs, ys = [front[0]["epochs_mean"]], [front[0]["top1_mean"]]
    for row in front[1:]:
        xs += [row["epochs_mean"], row["epochs_mean"]]
        ys += [ys[-1], row["top1_mean"]]
    axes.plot(xs, ys, "-.", color="grey", linewidth=1, label="Pareto front")
