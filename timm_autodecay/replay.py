"""Replay: run the detector over a loss series logged by a finished run.

This is how users check settings on runs they already have. Four kinds of file are read, recognised
by their content:

- a JSON list of numbers: one loss per update;
- any CSV: one loss per row from ``column`` (default ``train_loss``, else ``loss``);
- a timm ``summary.csv`` (header ``epoch,train_loss,...``): one row per epoch, each row the mean of
  ``updates_per_epoch`` updates; a resumed run's repeated epochs count once, by their last row;
- a Transformers ``trainer_state.json``: each ``log_history`` entry with a ``loss`` is the mean of the
  updates since the previous such entry.

Every value travels with its ``count`` (how many updates it averages), so the detector's update
clock, and with it the budget, stays right however coarsely the run was logged.
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .detector import StageDetector, check_int

__all__ = ["ReplayError", "ReplayWarning", "LossSeries", "load_series", "replay", "replay_file"]


class ReplayError(ValueError):
    """A loss file that cannot be replayed; the message names the file and the problem."""


class ReplayWarning(UserWarning):
    """A loss file or settings that replay can read, but likely not as the user meant."""


@dataclass
class LossSeries:
    """Losses in logged order; ``counts[i]`` is the number of updates ``values[i]`` averages."""

    values: list
    counts: list
    kind: str  # "json-list", "csv", "timm-summary" or "trainer-state"
    total_updates: Optional[int] = None  # the run's budget, when the file records it (max_steps)
    logging_steps: Optional[int] = None  # Trainer's logging interval, when the file records it


def load_series(path, column=None, updates_per_epoch=None) -> LossSeries:
    """Read a loss series from ``path``, recognising its format; raises ReplayError on a bad file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise ReplayError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ReplayError(f"{path}: cannot read: not a UTF-8 text file") from None
    if not text.strip():
        raise ReplayError(f"{path}: file is empty")

    if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{"):
        if column is not None:
            raise ReplayError(f"{path}: --column applies to CSV files only")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ReplayError(f"{path}: not valid JSON: {error}") from None
        if isinstance(data, list):
            series = LossSeries([_json_number(path, v, f"item {i}") for i, v in enumerate(data)],
                                [1] * len(data), "json-list")
        elif isinstance(data, dict) and "log_history" in data:
            series = _trainer_state(path, data)
        else:
            raise ReplayError(f"{path}: expected a JSON list of losses or a Transformers "
                              f"trainer_state.json (an object with 'log_history')")
    else:
        series = _csv(path, text, column, updates_per_epoch)

    if not series.values:
        raise ReplayError(f"{path}: no losses in the file")
    return series


def _json_number(path, value, where):
    # bool is an int to Python, but never a loss
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplayError(f"{path}: {where}: {json.dumps(value)} is not a number")
    return float(value)


def _trainer_state(path, state) -> LossSeries:
    """Transformers logs the mean loss since its previous loss log, so a value counts the step gap.

    Eval entries (``eval_loss``) and the closing summary (``train_loss``) carry no ``loss`` key.
    """
    history = state["log_history"]
    if not isinstance(history, list):
        raise ReplayError(f"{path}: 'log_history' is not a list")
    values, counts, previous_step = [], [], 0
    for n, entry in enumerate(history):
        if not isinstance(entry, dict) or "loss" not in entry:
            continue
        value = _json_number(path, entry["loss"], f"log_history[{n}]['loss']")
        step = entry.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ReplayError(f"{path}: log_history[{n}]: 'step' is {json.dumps(step)}, not an integer")
        if step <= previous_step:
            raise ReplayError(f"{path}: log_history[{n}]: step {step} does not follow step {previous_step}")
        values.append(value)
        counts.append(step - previous_step)
        previous_step = step
    return LossSeries(values, counts, "trainer-state",
                      total_updates=_positive_int(state.get("max_steps")),
                      logging_steps=_positive_int(state.get("logging_steps")))


def _positive_int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _csv(path, text, column, updates_per_epoch) -> LossSeries:
    """One value per row; a timm summary.csv row stands for a whole epoch of updates.

    Empty cells are skipped (loggers leave a column blank on rows that log something else), and so
    are repeated header rows (older timm wrote the header again on resume).
    """
    try:
        rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    except csv.Error as error:
        raise ReplayError(f"{path}: not a readable CSV file: {error}") from None
    header = [name.strip() for name in rows[0]]
    is_timm_summary = header[:2] == ["epoch", "train_loss"]

    if column is None:
        column = next((name for name in ("train_loss", "loss") if name in header), None)
        if column is None:
            raise ReplayError(f"{path}: no 'train_loss' or 'loss' column; pass --column, "
                              f"one of: {', '.join(header)}")
    elif column not in header:
        raise ReplayError(f"{path}: no column {column!r}; columns: {', '.join(header)}")

    if is_timm_summary:
        if updates_per_epoch is None:
            raise ReplayError(f"{path}: a timm summary.csv has one row per epoch; "
                              f"pass updates_per_epoch (--updates-per-epoch N)")
        count = check_int("updates_per_epoch", updates_per_epoch, 1)
    else:
        count = 1

    at = header.index(column)
    epoch_at = header.index("epoch") if is_timm_summary else None
    values, epochs = [], []
    for line, row in enumerate(rows[1:], start=2):
        cell = row[at].strip() if at < len(row) else ""
        if not cell or [name.strip() for name in row] == header:
            continue
        try:
            values.append(float(cell))
        except ValueError:
            raise ReplayError(f"{path}: row {line}, column {column!r}: {cell!r} is not a number") from None
        if epoch_at is not None:
            epochs.append(_epoch(path, line, row[epoch_at]))
    if epoch_at is not None:
        values = _last_row_of_each_epoch(path, values, epochs)
    kind = "timm-summary" if is_timm_summary else "csv"
    return LossSeries(values, [count] * len(values), kind)


def _epoch(path, line, cell):
    try:
        return int(cell.strip())
    except ValueError:
        raise ReplayError(f"{path}: row {line}, column 'epoch': {cell.strip()!r} is not an epoch number") from None


def _last_row_of_each_epoch(path, values, epochs):
    """A resumed timm run appends the epochs it runs again: the last row of an epoch is the one that
    led to the final weights."""
    by_epoch = dict(zip(epochs, values))
    if len(by_epoch) < len(values):
        again = sorted({e for i, e in enumerate(epochs) if e in epochs[:i]})
        warnings.warn(f"{path}: epochs {_spans(again)} appear more than once (a resumed run?): "
                      "the last row of each is used", ReplayWarning, stacklevel=4)
    order = sorted(by_epoch)
    missing = sorted(set(range(order[0], order[-1] + 1)) - set(order)) if order else []
    if missing:
        warnings.warn(f"{path}: epochs {_spans(missing)} are missing: the updates of the epochs after them "
                      "are counted too early", ReplayWarning, stacklevel=4)
    return [by_epoch[e] for e in order]


def _spans(numbers):
    """[1, 2, 3, 7] -> '1-3, 7'."""
    spans, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(f"{start}-{n}" if n != start else f"{n}")
            start = None
    return ", ".join(spans)


def replay(series: Sequence[float], counts: Optional[Sequence[int]], detector) -> list:
    """Feed ``series`` to ``detector`` and return its decays and finish, in order.

    ``index`` is the position in ``series`` of the value whose observation triggered the decision;
    feeding stops after "finish", as training would. ``counts=None`` means one update per value.
    """
    if counts is None:
        counts = [1] * len(series)
    if len(counts) != len(series):
        raise ValueError(f"{len(series)} losses but {len(counts)} counts")
    decisions = []
    for index, (value, count) in enumerate(zip(series, counts)):
        decision = detector.observe(value, count=count)
        if decision.action != "continue":
            decisions.append({"index": index, "update": decision.update, "action": decision.action,
                              "stage": decision.stage})
            if decision.action == "finish":
                break
    return decisions


def replay_file(path, column=None, **settings) -> dict:
    """Replay the losses in ``path`` with a detector built from ``settings``.

    Returns what the CLI prints: ``{"decisions": [...], "settings": {...}}``, and with the cooldown
    shape, once it began, ``"cooldown": {"start_update", "end_update", ...}``. A run's budget recorded
    in the file (Trainer's max_steps) is the default ``total_updates``. Invalid settings raise the
    detector's ValueError before the file is read; a budget that looks like epochs rather than
    updates raises ReplayError or warns (ReplayWarning).
    """
    StageDetector(**settings)  # a bad setting is named before the file is read
    series = load_series(path, column=column, updates_per_epoch=settings.get("updates_per_epoch"))
    if settings.get("total_updates") is None and series.total_updates is not None:
        settings["total_updates"] = series.total_updates
    detector = StageDetector(**settings)
    _check_budget(path, series, detector.total_updates)
    try:
        decisions = replay(series.values, series.counts, detector)
    except FloatingPointError as error:  # a whole window of non-finite losses: the run diverged
        raise ReplayError(f"{path}: {error}") from None
    result = {"decisions": decisions, "settings": detector.settings()}
    if detector.cooldown_start is not None:
        end = detector.cooldown_start + detector.cooldown_updates
        result["cooldown"] = {"start_update": detector.cooldown_start, "end_update": end,
                              "updates": detector.cooldown_updates, "curve": detector.cooldown_curve,
                              "reached_end": detector.finished}
    return result


def _check_budget(path, series, total_updates):
    """A budget below the updates the file logs is most often a number of epochs given as updates."""
    logged = sum(series.counts)
    if total_updates is None or total_updates >= logged:
        return
    rows = len(series.values)
    if series.kind == "timm-summary" and total_updates <= rows:
        raise ReplayError(f"{path}: total_updates (--total-updates) {total_updates} is no more than the {rows} "
                          f"epochs this summary.csv logs; it counts updates, not epochs: these {rows} epochs "
                          f"of {series.counts[0]} updates are --total-updates {logged}")
    warnings.warn(f"{path}: the file logs {logged} updates, more than total_updates (--total-updates) "
                  f"{total_updates}; the replay ends at that budget. total_updates counts optimizer updates, "
                  "not epochs", ReplayWarning, stacklevel=3)
