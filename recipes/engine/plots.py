"""Figures of one run: training loss and test accuracy against epoch, the LR decays marked."""
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
