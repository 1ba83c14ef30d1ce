"""Replay: run the detector over a loss series logged by a finished run.

This is how users check settings on runs they already have (DESIGN.md, contract 6). Four kinds of
file are read, recognised by their content:

- a JSON list of numbers: one loss per update;
- any CSV: one loss per row from ``column`` (default ``train_loss``, else ``loss``);
- a timm ``summary.csv`` (header ``epoch,train_loss,...``): one row per epoch, each row the mean of
  ``updates_per_epoch`` updates;
- a Transformers ``trainer_state.json``: each ``log_history`` entry with a ``loss`` is the mean of the
  updates since the previous such entry.

Every value travels with its ``count`` (how many updates it averages), so the detector's update
clock, and with it the budget, stays right however coarsely the run was logged.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .detector import StageDetector

__all__ = ["ReplayError", "LossSeries", "load_series", "replay", "replay_file"]


class ReplayError(ValueError):
    """A loss file that cannot be replayed; the message names the file and the problem."""


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
        if updates_per_epoch is None or updates_per_epoch < 1:
            raise ReplayError(f"{path}: a timm summary.csv has one row per epoch; "
                              f"pass updates_per_epoch (--updates-per-epoch N)")
        count = int(updates_per_epoch)
    else:
        count = 1

    at = header.index(column)
    values = []
    for line, row in enumerate(rows[1:], start=2):
        cell = row[at].strip() if at < len(row) else ""
        if not cell or [name.strip() for name in row] == header:
            continue
        try:
            values.append(float(cell))
        except ValueError:
            raise ReplayError(f"{path}: row {line}, column {column!r}: {cell!r} is not a number") from None
    kind = "timm-summary" if is_timm_summary else "csv"
    return LossSeries(values, [count] * len(values), kind)


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
            decisions.append({"index": index, "action": decision.action, "stage": decision.stage})
            if decision.action == "finish":
                break
    return decisions


def replay_file(path, column=None, **settings) -> dict:
    """Replay the losses in ``path`` with a detector built from ``settings``.

    Returns what the CLI prints: ``{"decisions": [...], "settings": {...}}``. A run's budget recorded
    in the file (Trainer's max_steps) is the default ``total_updates``. Invalid settings raise the
    detector's ValueError.
    """
    series = load_series(path, column=column, updates_per_epoch=settings.get("updates_per_epoch"))
    if settings.get("total_updates") is None and series.total_updates is not None:
        settings["total_updates"] = series.total_updates
    detector = StageDetector(**settings)
    try:
        decisions = replay(series.values, series.counts, detector)
    except FloatingPointError as error:  # a whole window of non-finite losses: the run diverged
        raise ReplayError(f"{path}: {error}") from None
    return {"decisions": decisions, "settings": detector.settings()}
