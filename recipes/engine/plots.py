"""Figures of the SGD loop's runs: training loss and test accuracy against epoch, the LR decays marked (the
Pareto figure of a benchmark is `pareto.py`'s)."""
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
        colour = colours[run["label"]]
        label = None if run["label"] in labelled else run["label"]
        labelled.add(run["label"])
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
