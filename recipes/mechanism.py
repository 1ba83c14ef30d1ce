"""The mechanism hypothesis: are complex cues learned mainly after a decay under SGD?

    accelerate launch recipes/mechanism.py --config recipes/configs/mechanism.yaml [--key value]

Task `synthetic_patterns` (see `engine/tasks.py`, `make_synthetic_patterns`): every image carries its class's
complex cue (a fine arrangement of small strokes), and a fraction `easy_fraction` of the training
images also its easy cue (a uniform colour). Two test subsets hold one cue each: `easy_only` (the
class's colour, random strokes) and `complex_only` (the class's strokes, a random class's colour).

Methods, as in learning_stages.py: `sgd_step` (SGD, StepDecay at `milestones`), `gd_step` (full-batch
GD, the same schedule at the same fractions of `gd_epochs`), `constant` (SGD at the initial LR
throughout). For every method, seed and stage (for `constant`: the same spans of the run as
StepDecay's stages) it reports the accuracy on the full test set and on each subset at the end of the
stage and at `after` epochs into it. Writes into `output_dir`: the runs' folders, `summary.json`
(`runs[i].stages[k]`), `mechanism.md` (the table, mean over seeds) and `mechanism.png` (subset
accuracies against epoch).
"""
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
from engine.config import load_config
from engine.loop import make_accelerator
from engine.study import write_study
from learning_stages import METHOD_LABELS, LearningStagesConfig, train_methods
from matplotlib.figure import Figure

METHODS = ("sgd_step", "gd_step", "constant")
SUBSETS = ("test_top1", "test_top1_easy_only", "test_top1_complex_only")


@dataclass
class MechanismConfig(LearningStagesConfig):
    task: str = "synthetic_patterns"
    model: str = "pattern_cnn"
    output_dir: str = "runs/mechanism"
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"choices": METHODS})
    seeds: list[int] = field(default_factory=lambda: [0])


def stage_spans(run: dict, budget: int, milestones: list[int]) -> list[tuple[int, int]]:
    """(first epoch, last epoch) of each stage, in the run's own epochs; for a run without decays the
    spans StepDecay's stages would have."""
    epochs = run["config"]["epochs"]
    scale = epochs / budget
    bounds = [0] + [round(at * scale) for at in milestones] + [epochs]
    if run["decay_epochs"]:
        bounds = [0] + [round(at) for at in run["decay_epochs"]] + [round(run["epochs"])]
    return [(start, end) for start, end in zip(bounds, bounds[1:]) if end > start]


def stage_accuracies(run: dict, budget: int, milestones: list[int], after: int) -> list[dict]:
    at = {round(line["epoch"]): line for line in run["curves"]}
    scale = run["config"]["epochs"] / budget
    stages = []
    for k, (start, end) in enumerate(stage_spans(run, budget, milestones)):
        early = min(end, start + max(1, round(after * scale)))
        stages.append({
            "stage": k, "start_epoch": start, "end_epoch": end, "early_epoch": early,
            **{f"end_{key}": at[end][key] for key in SUBSETS if end in at},
            **{f"early_{key}": at[early][key] for key in SUBSETS if early in at},
        })
    return stages


def mechanism_table(runs: list[dict], methods: list[str]) -> str:
    lines = ["| method | stage (epochs) | test | easy-only | complex-only | complex-only gained in the stage |",
             "|---|---|---|---|---|---|"]
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        for k in range(max((len(run["stages"]) for run in mine), default=0)):
            stages = [run["stages"][k] for run in mine if len(run["stages"]) > k]
            previous = [run["stages"][k - 1]["end_test_top1_complex_only"] if k else 10.0
                        for run in mine if len(run["stages"]) > k]

            def mean(key, stages=stages):
                values = [stage[key] for stage in stages if key in stage]
                return statistics.mean(values) if values else float("nan")

            gained = mean("end_test_top1_complex_only") - statistics.mean(previous)
            label = METHOD_LABELS.get(method, method) if k == 0 else ""
            span = f"{k} ({stages[0]['start_epoch']}-{stages[0]['end_epoch']})"
            lines.append(f"| {label} | {span} | {mean('end_test_top1'):.1f} | {mean('end_test_top1_easy_only'):.1f} "
                         f"| {mean('end_test_top1_complex_only'):.1f} | {gained:+.1f} |")
    return "\n".join(lines)


def plot_mechanism(results: list[dict], methods: list[str], budget: int, path: Path) -> None:
    """Accuracy on the easy-only (dashed) and complex-only (solid) subsets against epoch (GD's updates
    on the SGD scale), a colour per method, the decays dotted."""
    figure = Figure(figsize=(8, 4.8), layout="constrained")
    axes = figure.subplots()
    colours = dict(zip(methods, matplotlib.colormaps["tab10"].colors))
    labelled = set()
    for run in results:
        scale = budget / run["config"]["epochs"]
        epochs = [line["epoch"] * scale for line in run["curves"]]
        colour = colours[run["method"]]
        first = run["method"] not in labelled
        labelled.add(run["method"])
        name = METHOD_LABELS.get(run["method"], run["method"])
        axes.plot(epochs, [line["test_top1_complex_only"] for line in run["curves"]], color=colour,
                  label=f"{name}: complex-only" if first else None)
        axes.plot(epochs, [line["test_top1_easy_only"] for line in run["curves"]], color=colour, linestyle="--",
                  label=f"{name}: easy-only" if first else None)
        for at in run["decay_epochs"]:
            axes.axvline(at * scale, color=colour, linestyle=":", linewidth=1)
    axes.set(xlabel="epoch (full-batch GD: update on the same scale)", ylabel="test top-1 (%)",
             title="accuracy on one-cue test subsets (dotted: LR decays)", ylim=(0, 100))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def main():
    cfg = load_config(MechanismConfig, description=__doc__)
    accelerator = make_accelerator(cfg)
    results = train_methods(cfg, accelerator)
    runs = [{
        "method": run["method"], "seed": run["seed"], "test_top1": run["test_top1"],
        "decay_epochs": run["decay_epochs"], "output_dir": run["config"]["output_dir"],
        "stages": stage_accuracies(run, cfg.epochs, cfg.milestones, cfg.after),
    } for run in results]
    table = mechanism_table(runs, cfg.methods)
    if accelerator.is_main_process:
        output_dir = write_study(cfg.output_dir, "mechanism", runs, table, cfg)
        plot_mechanism(results, cfg.methods, cfg.epochs, output_dir / "mechanism.png")
    accelerator.print(table)
    accelerator.print(f"summary.json, mechanism.md and mechanism.png in {cfg.output_dir}")


if __name__ == "__main__":
    main()
