"""The noise dose-response study's tables and figure (`recipes/noise_dose_response.py`): the sweep's table, a
row per setting and batch size with the trend, and the dose-response figure."""
import math
from pathlib import Path

import numpy as np

from .study_statistics import binned


def _number(value, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def sweep_table(by_setting: dict, chosen) -> str:
    """Markdown: a row per setting of the sweep, the chosen one in bold."""
    sizes = [cell["batch_size"] for cell in next(iter(by_setting.values()))["cells"]]
    lines = [f"| lr | momentum | warmup | clip | unstable runs | full batch stable | loss before decay, median, B = "
             f"{' / '.join(map(str, sizes))} | S, mean of stable, B = {' / '.join(map(str, sizes))} "
             f"| full batch: largest rise | updates clipped |", "|---" * 10 + "|"]
    for name, value in by_setting.items():
        cells = value["cells"]
        full = [cell for cell in cells if cell["full_batch"]]
        mark = "**" if name == chosen else ""
        full_stable = ", ".join(f"{c['stable']}/{c['runs']}" for c in full) or "-"
        rise = ", ".join(f"{c['peak_rise_max']:.2f}x" for c in full) or "-"
        clipped = " / ".join(f"{c['clipped_share']:.0%}" for c in cells) if value["clip_grad_norm"] else "-"
        lines.append(
            f"| {mark}{value['lr']:g}{mark} | {value['momentum']:g} | {value['warmup_fraction']:g} "
            f"| {value['clip_grad_norm'] or '-'} "
            f"| {sum(c['runs'] - c['stable'] for c in cells)}/{sum(c['runs'] for c in cells)} | {full_stable} "
            f"| {' / '.join(_number(c['loss_before_decay_median'], 3) for c in cells)} "
            f"| {' / '.join(_number(c['log_ratio_mean'], signed=True) for c in cells)} | {rise} | {clipped} |")
    verdict = f"chosen (bold): {chosen}" if chosen else "no setting trains every run stably"
    return "\n".join(lines + ["", f"- {verdict}"])


def dose_table(by_setting: dict) -> str:
    """Markdown: a row per (setting, batch size), the trend per setting, the unstable runs."""
    lines = ["| setting | batch | noise scale lr·N/B | updates (epochs) | stable | loss before decay (median) "
             "| log-ratio S, mean [95% CI] | S per seed ((S): unstable) | test top-1 (%) |", "|---" * 9 + "|"]
    notes = []
    for name, value in by_setting.items():
        for cell in value["cells"]:
            per_seed = ", ".join(_number(s, signed=True) if stable else f"({_number(s, signed=True)})"
                                 for s, stable in cell["log_ratios"].values())
            low, high = (_number(cell[key], signed=True) for key in ("log_ratio_low", "log_ratio_high"))
            lines.append(
                f"| {name} | {cell['batch_size']} | {cell['noise_scale']:.3g} | {cell['updates']} "
                f"({cell['epochs']:.3g}) | {cell['stable']}/{cell['runs']} "
                f"| {_number(cell['loss_before_decay_median'], 3)} "
                f"| {_number(cell['log_ratio_mean'], signed=True)} [{low}, {high}] | {per_seed} "
                f"| {cell['test_top1_mean']:.1f} |")
            notes += [f"- unstable: {name}, batch {cell['batch_size']}, seed {seed}: {'; '.join(why)}"
                      for seed, why in cell["failures"].items()]
        trend = value["trend"]
        if trend:
            slope = trend["slope_per_doubling"]
            notes.append(f"- trend at {name}: Spearman rho of S with the noise scale {trend['rho']:+.2f} "
                         f"(permutation p = {trend['p_value']:.2g}, {trend['count']} stable runs); slope "
                         f"{slope['slope']:+.3f} per doubling [{slope['low']:+.3f}, {slope['high']:+.3f}]")
    return "\n".join(lines + [""] + (notes or ["- every run trained stably"]))


def plot_dose_response(runs: list[dict], by_setting: dict, cfg, path: Path) -> None:
    """Left: S against the noise scale (a dot per stable run, the mean and its bootstrap interval) per setting;
    right: the binned training loss of the first setting's first seed per batch size against the share of the run."""
    import matplotlib
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.6), layout="constrained")
    dose_axes, loss_axes = figure.subplots(1, 2)
    colours = matplotlib.colormaps["tab10"].colors
    for index, (name, value) in enumerate(by_setting.items()):
        cells = [cell for cell in value["cells"] if cell["log_ratio_mean"] is not None]
        stable = [run for run in runs if run["setting"] == name and run["stable"]]
        colour = colours[index % len(colours)]
        dose_axes.plot([r["noise_scale"] for r in stable], [r["log_ratio"] for r in stable], ".", alpha=0.5,
                       color=colour)
        means = [cell["log_ratio_mean"] for cell in cells]
        errors = [[m - cell["log_ratio_low"] for m, cell in zip(means, cells)],
                  [cell["log_ratio_high"] - m for m, cell in zip(means, cells)]]
        dose_axes.errorbar([cell["noise_scale"] for cell in cells], means, yerr=np.nan_to_num(errors), marker="o",
                           capsize=3, color=colour, label=f"{name}: mean, 95% bootstrap interval")
    dose_axes.axhline(0, color="grey", linewidth=1)
    dose_axes.set(xscale="log", xlabel="noise scale lr·N/B (right: small batches; left end: full batch)",
                  ylabel="transition log-ratio S at the first decay", title="dose-response")
    dose_axes.legend(fontsize=7)
    first = [run for run in runs if run["setting"] == next(iter(by_setting)) and run["seed"] == runs[0]["seed"]]
    for index, run in enumerate(first):
        bins = binned(run["losses"], cfg.bin_fraction)
        label = "full batch" if run["full_batch"] else f"batch {run['batch_size']}"
        loss_axes.plot([(k + 1) * cfg.bin_fraction for k in range(len(bins))], bins,
                       color=matplotlib.colormaps["viridis"](index / max(1, len(first) - 1)),
                       label=f"{label} ({run['updates']} updates){'' if run['stable'] else ', unstable'}")
    for at in cfg.decay_fractions:
        loss_axes.axvline(at, color="grey", linestyle=":", linewidth=1)
    loss_axes.set(yscale="log", xlabel="share of the run (dotted: LR decays)", ylabel="training loss (bin mean)",
                  title=f"{next(iter(by_setting))}, seed {runs[0]['seed'] if runs else ''}")
    loss_axes.legend(fontsize=8)
    for axes in (dose_axes, loss_axes):
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


