"""The mechanism hypothesis: complex cues are learned after a decay, because SGD's noise at the high LR
keeps them out. A test that can fail, with its predictions stated before measuring.

    accelerate launch recipes/mechanism.py --config recipes/configs/mechanism.yaml [--key value]

Task `synthetic_patterns` (engine/tasks.py): every image carries its class's complex cue (a fine layout of
small strokes, a quarter of its cells redrawn per image, under pixel noise `pattern_noise`), and a fraction
`easy_fraction` of the training images also its easy cue (the class's colour). Test subsets hold one cue
each: `easy_only` (the class's colour, random strokes), `complex_only` (the class's strokes, a random colour).

Calibration, on data and seeds the measurement does not use (`calibration_data_seed`, `calibration_seed`):
- the complex cue alone is learnable: trained on images without the easy cue (easy_fraction 0) at the
  small `calibration_lr` for `calibration_epochs`, the complex-only accuracy reaches `complex_threshold`;
- the easy cue is learned first: on the study's task at the study's LR, after the first epoch the
  easy-only accuracy is above the complex-only one.

Measurement, for every seed: `sgd_step` (SGD, x`decay_rate` at `milestones`), `constant` (SGD at the
initial LR throughout) and `gd_step` (full-batch gradient descent at the same LR, `gd_epochs` updates, the
same schedule at the same fractions of the run), as in learning_stages.py. Per stage (for `constant`: the
spans of StepDecay's stages) the accuracy on each test subset at its end.

Predictions (the hypothesis), checked in code and reported whichever way they come out:
- P1: under SGD with StepDecay, less than half of the final complex-only gain over chance (10%) is reached
  by the end of stage 0 (most of it comes after a decay);
- P2 (the falsifying control): under full-batch GD at the same LR, at least half of its final complex-only
  gain is reached by the end of stage 0 (learned without waiting for a decay);
- P3 (the time control): under constant-LR SGD, the complex-only accuracy at the end of stage 1's span is
  below StepDecay's.
Supported when P1, P2 and P3 hold for the mean over seeds; not supported otherwise (the table says which).

Writes into `output_dir`: the runs' folders, `summary.json` (calibration, `runs[i].stages[k]`, the
predictions and their outcomes), `mechanism.md` (the tables) and `mechanism.png`.
"""
import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import matplotlib
from engine.config import load_config
from engine.loop import make_accelerator
from engine.study_statistics import bootstrap_interval
from matplotlib.figure import Figure

from learning_stages import METHOD_LABELS, LearningStagesConfig, method_config, run_all

METHODS = ("sgd_step", "constant", "gd_step")
SUBSETS = ("test_top1", "test_top1_easy_only", "test_top1_complex_only")
CHANCE = 10.0  # ten classes


@dataclass
class MechanismConfig(LearningStagesConfig):
    task: str = "synthetic_patterns"
    model: str = "pattern_cnn"
    output_dir: str = "runs/mechanism"
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"choices": METHODS})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    calibration_data_seed: int = 7  # the calibration's task (the measurement's is data_seed)
    calibration_seed: int = 100  # the calibration's model init and data order
    calibration_lr: float = 0.01  # the small LR at which the complex cue alone must be learnable
    calibration_epochs: int = 5
    complex_threshold: float = 90.0  # complex-only top-1 (%) the complex cue alone must reach


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------
def calibration_jobs(cfg: MechanismConfig) -> list[tuple]:
    """The two calibration runs: the complex cue alone at the small LR; both cues for one epoch."""
    base = method_config(replace(cfg, data_seed=cfg.calibration_data_seed), "constant", cfg.calibration_seed)
    folder = Path(cfg.output_dir) / "calibration"
    alone = replace(base, easy_fraction=0.0, lr=cfg.calibration_lr, epochs=cfg.calibration_epochs,
                    output_dir=str(folder / "complex_alone"))
    first = replace(base, epochs=1, output_dir=str(folder / "easy_first"))
    return [("calibration_complex_alone", alone), ("calibration_easy_first", first)]


def calibration(results: dict, cfg: MechanismConfig) -> dict:
    """The calibration's measurements and whether each criterion holds."""
    alone = results["calibration_complex_alone"]["curves"][-1]["test_top1_complex_only"]
    first = results["calibration_easy_first"]["curves"][0]
    easy, complex_ = first["test_top1_easy_only"], first["test_top1_complex_only"]
    return {
        "complex_alone_top1": alone, "complex_alone_learnable": alone >= cfg.complex_threshold,
        "epoch1_easy_only": easy, "epoch1_complex_only": complex_, "easy_learned_first": easy > complex_,
        "data_seed": cfg.calibration_data_seed, "seed": cfg.calibration_seed,
    }


def stage_spans(run: dict, budget: int, milestones: list[int]) -> list[tuple[int, int]]:
    """(first epoch, last epoch) of each stage, in the run's own epochs; for a run without decays the
    spans StepDecay's stages would have."""
    epochs = run["config"]["epochs"]
    bounds = [0] + [round(at * epochs / budget) for at in milestones] + [epochs]
    if run["decay_epochs"]:
        bounds = [0] + [round(at) for at in run["decay_epochs"]] + [round(run["epochs"])]
    return [(start, end) for start, end in zip(bounds, bounds[1:]) if end > start]


def stage_accuracies(run: dict, budget: int, milestones: list[int]) -> list[dict]:
    """Each stage's span and the accuracies (%) on the test set and its one-cue subsets at its end."""
    at = {round(line["epoch"]): line for line in run["curves"]}
    return [{"stage": k, "start_epoch": start, "end_epoch": end, **{f"end_{key}": at[end][key] for key in SUBSETS}}
            for k, (start, end) in enumerate(stage_spans(run, budget, milestones)) if end in at]


def stage0_share(stages: list[dict]) -> float:
    """The share of the run's final complex-only gain over chance reached by the end of stage 0 (None
    when the complex cue was never learned: a final gain under 5 points)."""
    gain = stages[-1]["end_test_top1_complex_only"] - CHANCE
    return (stages[0]["end_test_top1_complex_only"] - CHANCE) / gain if gain >= 5 else None


# ----------------------------------------------------------------------------------------------
# Predictions
# ----------------------------------------------------------------------------------------------
def _mean(values):
    values = [value for value in values if value is not None]
    return statistics.mean(values) if values else None


def predictions(runs: list[dict]) -> dict:
    """P1-P3 (see the module docstring) on the means over seeds: each its measured values and outcome."""
    def mine(method):
        return [run for run in runs if run["method"] == method]

    def complex_at(method, stage):
        return _mean([r["stages"][stage]["end_test_top1_complex_only"]
                      for r in mine(method) if len(r["stages"]) > stage])

    sgd_share = _mean([run["stage0_share"] for run in mine("sgd_step")])
    gd_share = _mean([run["stage0_share"] for run in mine("gd_step")])
    sgd0, sgd1, constant1 = complex_at("sgd_step", 0), complex_at("sgd_step", 1), complex_at("constant", 1)
    result = {
        "P1": {"claim": "SGD StepDecay: less than half of the complex-only gain by the end of stage 0",
               "stage0_share": sgd_share, "stage0_complex_only": sgd0, "stage1_complex_only": sgd1,
               "holds": None if sgd_share is None else sgd_share < 0.5},
        "P2": {"claim": "full-batch GD: >= half of its complex-only gain by the end of stage 0",
               "stage0_share": gd_share, "holds": None if gd_share is None else gd_share >= 0.5},
        "P3": {"claim": "constant-LR SGD: complex-only at the end of stage 1's span below StepDecay's",
               "constant_complex_only": constant1, "step_complex_only": sgd1,
               "holds": None if constant1 is None or sgd1 is None else constant1 < sgd1},
    }
    outcomes = [result[key]["holds"] for key in ("P1", "P2", "P3")]  # None (not measurable) counts as failed
    result["verdict"] = "supported" if all(outcomes) else "not supported"
    return result


# ----------------------------------------------------------------------------------------------
# Table, figure, study
# ----------------------------------------------------------------------------------------------
def _number(value, form: str = ".1f") -> str:
    return "-" if value is None else format(value, form)


def stage_table(runs: list[dict], methods: list[str]) -> list[str]:
    """A row per method and stage: accuracies at its end, mean over seeds."""
    lines = ["| method | stage (epochs) | test | easy-only | complex-only | complex-only gained in the stage |",
             "|---|---|---|---|---|---|"]
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        for k in range(min((len(run["stages"]) for run in mine), default=0)):
            stages = [run["stages"][k] for run in mine]
            before = _mean([run["stages"][k - 1]["end_test_top1_complex_only"] for run in mine]) if k else CHANCE
            means = {key: _mean([stage[f"end_{key}"] for stage in stages]) for key in SUBSETS}
            lines.append(f"| {METHOD_LABELS.get(method, method) if k == 0 else ''} "
                         f"| {k} ({stages[0]['start_epoch']}-{stages[0]['end_epoch']}) "
                         f"| {means['test_top1']:.1f} | {means['test_top1_easy_only']:.1f} "
                         f"| {means['test_top1_complex_only']:.1f} "
                         f"| {means['test_top1_complex_only'] - before:+.1f} |")
    return lines


def mechanism_table(runs: list[dict], methods: list[str], calibrated: dict, predicted: dict, resamples: int) -> str:
    """The calibration, the stage table, the stage-0 shares with bootstrap intervals and the predictions."""
    lines = [f"Calibration (data seed {calibrated['data_seed']}, seed {calibrated['seed']}): complex cue alone "
             f"{calibrated['complex_alone_top1']:.1f}% complex-only "
             f"({'learnable' if calibrated['complex_alone_learnable'] else 'NOT learnable'}); after epoch 1 "
             f"easy-only {calibrated['epoch1_easy_only']:.1f}% vs complex-only "
             f"{calibrated['epoch1_complex_only']:.1f}% "
             f"({'easy first' if calibrated['easy_learned_first'] else 'easy NOT first'}).", ""]
    lines += stage_table(runs, methods)
    lines += ["", "| method | share of the final complex-only gain reached in stage 0: mean [95% CI] (per seed) "
              "| final complex-only |", "|---|---|---|"]
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        shares = [run["stage0_share"] for run in mine]
        known = [share for share in shares if share is not None]
        low, high = bootstrap_interval(known, resamples) if len(known) > 1 else (None, None)
        per_seed = ", ".join(_number(share, ".2f") for share in shares)
        final = _mean([run["stages"][-1]["end_test_top1_complex_only"] for run in mine])
        lines.append(f"| {METHOD_LABELS.get(method, method)} | {_number(_mean(known), '.2f')} "
                     f"[{_number(low, '.2f')}, {_number(high, '.2f')}] ({per_seed}) | {_number(final)} |")
    lines.append("")
    for key in ("P1", "P2", "P3"):
        entry = predicted[key]
        values = ", ".join(f"{name} {_number(value, '.2f')}" for name, value in entry.items()
                           if name not in ("claim", "holds"))
        outcome = {True: "holds", False: "fails", None: "not measurable"}[entry["holds"]]
        lines.append(f"- {key} ({entry['claim']}): {outcome} ({values})")
    lines.append(f"- the hypothesis is **{predicted['verdict']}** on this task")
    return "\n".join(lines)


def plot_mechanism(results: list[dict], methods: list[str], path: Path) -> None:
    """Mean accuracy over seeds on the complex-only (solid) and easy-only (dashed) subsets against the
    share of the run, a colour per method, the decays dotted."""
    figure = Figure(figsize=(8, 4.8), layout="constrained")
    axes = figure.subplots()
    colours = dict(zip(methods, matplotlib.colormaps["tab10"].colors))
    for method in methods:
        mine = [run for run in results if run["method"] == method]
        if not mine:
            continue
        epochs = mine[0]["config"]["epochs"]
        shares = [line["epoch"] / epochs for line in mine[0]["curves"]]
        name = METHOD_LABELS.get(method, method)
        for key, style in (("test_top1_complex_only", "-"), ("test_top1_easy_only", "--")):
            curves = [[line[key] for line in run["curves"]] for run in mine]
            means = [statistics.mean(values) for values in zip(*curves)]
            axes.plot(shares[:len(means)], means, style, color=colours[method],
                      label=f"{name}: {key.removeprefix('test_top1_').replace('_', '-')}")
        for at in mine[0]["decay_epochs"]:
            axes.axvline(at / epochs, color=colours[method], linestyle=":", linewidth=1)
    axes.set(xlabel="share of the run (dotted: LR decays)", ylabel="test top-1 (%), mean over seeds",
             title="accuracy on one-cue test subsets", ylim=(0, 100))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def main():
    cfg = load_config(MechanismConfig, description=__doc__)
    accelerator = make_accelerator(cfg)
    jobs = calibration_jobs(cfg)
    jobs += [(method, method_config(cfg, method, seed)) for method in cfg.methods for seed in cfg.seeds]
    jobs.sort(key=lambda job: job[0] != "gd_step")  # the longest runs first
    accelerator.print(f"{len(jobs)} runs (calibration, {' '.join(cfg.methods)} x seeds {cfg.seeds})")
    results, calibration_results = [], {}
    for run in run_all(jobs, min(cfg.jobs, len(jobs)), accelerator):
        accelerator.print(f"  {run['method']} seed {run['seed']}: {run['test_top1']:.2f}% "
                          f"in {run['wall_seconds']:.0f} s", flush=True)
        if run["method"].startswith("calibration"):
            calibration_results[run["method"]] = run
        else:
            results.append(run)
    results.sort(key=lambda run: (cfg.methods.index(run["method"]), run["seed"]))
    runs = []
    for run in results:
        stages = stage_accuracies(run, cfg.epochs, cfg.milestones)
        runs.append({"method": run["method"], "seed": run["seed"], "test_top1": run["test_top1"],
                     "decay_epochs": run["decay_epochs"], "output_dir": run["config"]["output_dir"],
                     "stages": stages, "stage0_share": stage0_share(stages)})
    calibrated = calibration(calibration_results, cfg)
    predicted = predictions(runs)
    table = mechanism_table(runs, cfg.methods, calibrated, predicted, resamples=10000)
    if accelerator.is_main_process:
        output_dir = Path(cfg.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        summary = {"calibration": calibrated, "predictions": predicted, "runs": runs, "table": table,
                   "config": asdict(cfg)}
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (output_dir / "mechanism.md").write_text(table + "\n")
        plot_mechanism(results, cfg.methods, output_dir / "mechanism.png")
    accelerator.print(table)
    accelerator.print(f"summary.json, mechanism.md and mechanism.png in {cfg.output_dir}")


if __name__ == "__main__":
    main()
