"""The loss trend over a window: a line fitted through bucket means, robust to a bad batch.

A line through the points is first found with Tukey's resistant line (the slope between the medians
of the first and last thirds of the window, the intercept the median through it), which a few wild
points cannot tilt. Each point's residual from it is then clipped at ``OUTLIER_SCALES``
robust standard deviations (1.4826 median absolute residuals), and a point beyond ``WILD`` times that
limit (a bad batch, not noise) is put back on the line; weighted least squares on the points gives the
slope and its standard error. A spike or a dip of any size therefore moves the fit by at most one clipped
point, a wild one by nothing (clipped, it still pulled by a whole limit: on a run that plateaus, where the
test hovers at its threshold, enough to move a decision), while on clean data neither bites and the fit is
ordinary least squares. Every step (medians, the clip, least squares) commutes with ``a * loss + b``.
"""
from __future__ import annotations

import math
from statistics import median
from typing import List, NamedTuple, Sequence, Tuple

OUTLIER_SCALES = 3.0  # clean Gaussian bucket means reach 3 sd in 0.3% of cases
WILD = 2.0  # beyond twice the clip (6 sd, once in 500 million clean buckets), a point carries no weight
MAD_TO_SD = 1.4826  # median absolute deviation of a Gaussian, in standard deviations
MAX_AUTOCORRELATION = 0.9  # caps the inflation of the standard error at sqrt(19)


class Trend(NamedTuple):
    slope: float  # loss per update
    stderr: float  # of the slope, inflated for lag-1 autocorrelation of the residuals
    start: float  # fitted loss at the window's first point
    end: float  # fitted loss at the window's last point


def resistant_line(points: Sequence[Tuple[float, float, float]]) -> Tuple[float, float]:
    """Slope between the medians of the outer thirds, and the median intercept through it."""
    third = max(1, len(points) // 3)
    left, right = points[:third], points[-third:]
    run = median(t for t, _, _ in right) - median(t for t, _, _ in left)
    slope = (median(y for _, y, _ in right) - median(y for _, y, _ in left)) / run
    return slope, median(y - slope * t for t, y, _ in points)


def clip_outliers(points: Sequence[Tuple[float, float, float]]) -> List[Tuple[float, float, float]]:
    slope, intercept = resistant_line(points)
    residuals = [y - (intercept + slope * t) for t, y, _ in points]
    limit = OUTLIER_SCALES * MAD_TO_SD * median(abs(r) for r in residuals)
    return [
        (t, intercept + slope * t + (max(-limit, min(limit, r)) if abs(r) <= WILD * limit else 0.0), w)
        for (t, _, w), r in zip(points, residuals)
    ]


def fit_trend(points: Sequence[Tuple[float, float, float]]) -> Trend:
    """Robust trend of (time, value, weight) points; see the module docstring."""
    points = clip_outliers(points)
    total = sum(w for _, _, w in points)
    t_mean = sum(t * w for t, _, w in points) / total
    y_mean = sum(y * w for _, y, w in points) / total
    sxx = sum(w * (t - t_mean) ** 2 for t, _, w in points)
    slope = sum(w * (t - t_mean) * (y - y_mean) for t, y, w in points) / sxx
    residuals = [y - y_mean - slope * (t - t_mean) for t, y, _ in points]
    rss = sum(w * r * r for r, (_, _, w) in zip(residuals, points))
    variance = rss / (len(points) - 2) / sxx
    squares = sum(r * r for r in residuals)
    lag1 = sum(a * b for a, b in zip(residuals, residuals[1:]))
    rho = min(max(lag1 / squares, 0.0), MAX_AUTOCORRELATION) if squares > 0 else 0.0
    stderr = math.sqrt(variance * (1 + rho) / (1 - rho))
    first, last = points[0][0], points[-1][0]
    return Trend(slope, stderr, y_mean + slope * (first - t_mean), y_mean + slope * (last - t_mean))
