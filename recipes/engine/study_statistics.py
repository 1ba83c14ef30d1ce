"""The measurements and statistics the science recipes report: a loss curve's transition at a decay and its
spikes, bootstrap intervals, a rank trend test, paired comparisons with Holm's correction and the smallest
difference a design can detect.

Every function takes plain lists of floats (and a seed where it draws at random), so that a study's numbers
are the same on every machine given the same measurements. Shares are fractions of a run's updates.
"""
import math

import numpy as np
from scipy import stats


def loss_at(losses: list, end: float, width: float) -> float:
    """Mean of `losses` (one per update) over the bin of `width` (a share of the run) that ends at share `end`."""
    count = len(losses)
    stop = min(count, max(1, round(end * count)))
    begin = min(stop - 1, max(0, round((end - width) * count)))
    return float(np.mean(losses[begin:stop]))


def binned(losses: list, width: float) -> list[float]:
    """The loss curve: means over consecutive bins of `width` of the run."""
    return [loss_at(losses, (k + 1) * width, width) for k in range(round(1 / width))]


def transition_log_ratio(losses: list, decay: float, window: float, width: float) -> dict:
    """The transition at a decay at share `decay`: with L(x) the bin of `width` ending at x,
    S = ln(L(d) / L(d + window)) - ln(L(d - window) / L(d)), the log-fall after the decay minus the one
    before it (0: the trend goes on; > 0: a sharp transition; < 0: a slowdown), and the three losses."""
    before, at, after = (loss_at(losses, x, width) for x in (decay - window, decay, decay + window))
    return {"loss_window_before": before, "loss_before_decay": at, "loss_window_after": after,
            "log_ratio": math.log(at / after) - math.log(before / at)}


def first_spike(losses: list, width: float, after: float, factor: float, floor: float = 0.0):
    """The first bin after share `after` that is a spike, as {"share": where it ends, "factor": its ratio};
    None when there is none. A spike is a bin above `factor` x the lowest bin before it AND above that lowest
    bin + `floor` x the first bin (the loss at the start): the floor, a share of the run's own initial loss
    (scale-aware), keeps a loss near zero from failing for a rise that is tiny next to it (0.01 to 0.02)."""
    bins = binned(losses, width)
    for k in range(max(1, round(after / width)), len(bins)):
        lowest = min(bins[:k])
        if bins[k] > factor * lowest and bins[k] > lowest + floor * bins[0]:
            return {"share": (k + 1) * width, "factor": bins[k] / lowest}
    return None


def peak_rise(losses: list, width: float, after: float) -> float:
    """The largest ratio of a bin after share `after` to the lowest bin before it (1: never above it)."""
    bins = binned(losses, width)
    return max([1.0] + [bins[k] / min(bins[:k]) for k in range(max(1, round(after / width)), len(bins))])


def bootstrap_interval(values, resamples: int = 10000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return (float("nan"), float("nan"))
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[draws].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def spearman_trend(x, y, permutations: int = 10000, seed: int = 0) -> dict:
    """Spearman's rank correlation of `y` with `x` and its two-sided permutation p-value (the share of
    random pairings whose |rho| is at least the observed one, counting the observed pairing)."""
    x_ranks, y_ranks = stats.rankdata(x), stats.rankdata(y)
    rho = float(np.corrcoef(x_ranks, y_ranks)[0, 1])
    rng = np.random.default_rng(seed)
    shuffled = np.array([np.corrcoef(x_ranks, rng.permutation(y_ranks))[0, 1] for _ in range(permutations)])
    p_value = (1 + np.sum(np.abs(shuffled) >= abs(rho) - 1e-12)) / (permutations + 1)
    return {"rho": rho, "p_value": float(p_value), "permutations": permutations, "count": len(x)}


def slope_interval(groups: dict, resamples: int = 10000, level: float = 0.95, seed: int = 0) -> dict:
    """Least-squares slope of y on x over `groups` ({x: [y, ...]}), with a bootstrap interval that
    resamples the values within each group (the design's x values stay fixed)."""
    xs = np.concatenate([[x] * len(ys) for x, ys in groups.items()]).astype(float)
    ys = np.concatenate([ys for ys in groups.values()]).astype(float)
    slope = float(np.polyfit(xs, ys, 1)[0])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        resampled = np.concatenate([rng.choice(np.asarray(v, dtype=float), size=len(v)) for v in groups.values()])
        draws.append(np.polyfit(xs, resampled, 1)[0])
    tail = (1 - level) / 2
    return {"slope": slope, "low": float(np.quantile(draws, tail)), "high": float(np.quantile(draws, 1 - tail))}


def paired_test(differences, alpha: float = 0.05, power: float = 0.8) -> dict:
    """Two-sided paired t-test that the mean difference is 0, and the smallest true difference this
    design (n pairs, the observed sd of the differences) detects with probability `power` at `alpha`."""
    d = np.asarray(differences, dtype=float)
    n = len(d)
    mean, sd = float(d.mean()), float(d.std(ddof=1)) if n > 1 else float("nan")
    if n < 2 or sd == 0:
        return {"mean": mean, "sd": sd, "n": n, "t": float("nan"), "p_value": float("nan"), "detectable": float("nan")}
    t = mean / (sd / math.sqrt(n))
    p_value = float(2 * stats.t.sf(abs(t), n - 1))
    detectable = (stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "t": float(t), "p_value": p_value, "detectable": float(detectable)}


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the order given."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()
