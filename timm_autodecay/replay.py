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

With ``eval_column`` the run's evaluations are replayed too (the evaluation signal): a CSV column on
the same rows (timm's ``eval_top1`` or ``eval_loss``; a row without a value had no evaluation), or a
Trainer metric (``eval_loss``, ``eval_accuracy``) whose entries are judged after the last loss logged
at or before their step. The metric's direction is ``eval_mode``, by default from its name ("loss":
lower is better, anything else higher), as timm derives its plateau mode.
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
    evals: Optional[dict] = None  # index of the loss after which an evaluation came -> its value


def load_series(path, column=None, updates_per_epoch=None, eval_column=None) -> LossSeries:
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
        if eval_column is not None and text.lstrip()[:1] == "[":
            raise ReplayError(f"{path}: --eval-column applies to CSV files and trainer_state.json only")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ReplayError(f"{path}: not valid JSON: {error}") from None
        if isinstance(data, list):
            series = LossSeries([_json_number(path, v, f"item {i}") for i, v in enumerate(data)],
                                [1] * len(data), "json-list")
        elif isinstance(data, dict) and "log_history" in data:
            series = _trainer_state(path, data, eval_column)
        else:
            raise ReplayError(f"{path}: expected a JSON list of losses or a Transformers "
                              f"trainer_state.json (an object with 'log_history')")
    else:
        series = _csv(path, text, column, updates_per_epoch, eval_column)

    if not series.values:
        raise ReplayError(f"{path}: no losses in the file")
    return series


def _json_number(path, value, where):
    # bool is an int to Python, but never a loss
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplayError(f"{path}: {where}: {json.dumps(value)} is not a number")
    return float(value)


def _trainer_state(path, state, eval_column=None) -> LossSeries:
    """Transformers logs the mean loss since its previous loss log, so a value counts the step gap.

    Eval entries (``eval_loss``) and the closing summary (``train_loss``) carry no ``loss`` key.
    """
    history = state["log_history"]
    if not isinstance(history, list):
        raise ReplayError(f"{path}: 'log_history' is not a list")
    values, counts, previous_step, evals = [], [], 0, {}
    for n, entry in enumerate(history):
        if isinstance(entry, dict) and eval_column is not None and eval_column in entry and values:
            evals[len(values) - 1] = _json_number(path, entry[eval_column], f"log_history[{n}][{eval_column!r}]")
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
    if eval_column is not None and not evals:
        raise ReplayError(f"{path}: no log_history entry holds {eval_column!r} after a loss")
    return LossSeries(values, counts, "trainer-state",
                      total_updates=_positive_int(state.get("max_steps")),
                      logging_steps=_positive_int(state.get("logging_steps")), evals=evals)


def _positive_int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _csv(path, text, column, updates_per_epoch, eval_column=None) -> LossSeries:
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
    if eval_column is not None and eval_column not in header:
        raise ReplayError(f"{path}: no evaluation column {eval_column!r}; columns: {', '.join(header)}")

    if is_timm_summary:
        if updates_per_epoch is None:
            raise ReplayError(f"{path}: a timm summary.csv has one row per epoch; "
                              f"pass updates_per_epoch (--updates-per-epoch N)")
        count = check_int("updates_per_epoch", updates_per_epoch, 1)
    else:
        count = 1

    epoch_at = header.index("epoch") if is_timm_summary else None
    rows_read, epochs = [], []  # (loss, evaluation or None) of each row with a loss
    for line, row in enumerate(rows[1:], start=2):
        if [name.strip() for name in row] == header or not _cell(row, header, column):
            continue
        rows_read.append(tuple(_number(path, line, row, header, name) for name in (column, eval_column)))
        if epoch_at is not None:
            epochs.append(_epoch(path, line, row[epoch_at]))
    if epoch_at is not None:
        rows_read = _last_row_of_each_epoch(path, rows_read, epochs)
    kind = "timm-summary" if is_timm_summary else "csv"
    evals = {i: evaluation for i, (_, evaluation) in enumerate(rows_read) if evaluation is not None}
    return LossSeries([loss for loss, _ in rows_read], [count] * len(rows_read), kind,
                      evals=evals if eval_column is not None else None)


def _cell(row, header, name):
    at = header.index(name)
    return row[at].strip() if at < len(row) else ""


def _number(path, line, row, header, name):
    """The number in column ``name`` of a row (None for no column or an empty cell)."""
    cell = _cell(row, header, name) if name is not None else ""
    if not cell:
        return None
    try:
        return float(cell)
    except ValueError:
        raise ReplayError(f"{path}: row {line}, column {name!r}: {cell!r} is not a number") from None


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


def replay(series: Sequence[float], counts: Optional[Sequence[int]], detector, evals: Optional[dict] = None) -> list:
    """Feed ``series`` to ``detector`` and return its decays and finish, in order.

    ``index`` is the position in ``series`` of the value whose observation (or the evaluation after it,
    ``evals[index]``) triggered the decision; feeding stops after "finish", as training would.
    ``counts=None`` means one update per value.
    """
    if counts is None:
        counts = [1] * len(series)
    if len(counts) != len(series):
        raise ValueError(f"{len(series)} losses but {len(counts)} counts")
    decisions = []
    for index, (value, count) in enumerate(zip(series, counts)):
        observed = [detector.observe(value, count=count)]
        if evals and index in evals and observed[0].action != "finish":
            observed.append(detector.observe_eval(evals[index]))
        for decision in observed:
            if decision.action != "continue":
                decisions.append({"index": index, "update": decision.update, "action": decision.action,
                                  "stage": decision.stage})
        if decisions and decisions[-1]["action"] == "finish":
            break
    return decisions


def replay_file(path, column=None, eval_column=None, **settings) -> dict:
    """Replay the losses in ``path`` with a detector built from ``settings``.

    Returns what the CLI prints: ``{"decisions": [...], "settings": {...}}``, and with the cooldown
    shape, once it began, ``"cooldown": {"start_update", "end_update", ...}``. A run's budget recorded
    in the file (Trainer's max_steps) is the default ``total_updates``. Invalid settings raise the
    detector's ValueError before the file is read; a budget that looks like epochs rather than
    updates raises ReplayError or warns (ReplayWarning).
    """
    if eval_column is not None:
        settings.setdefault("eval_mode", "min" if "loss" in eval_column else "max")
    StageDetector(**settings)  # a bad setting is named before the file is read
    series = load_series(path, column=column, updates_per_epoch=settings.get("updates_per_epoch"),
                         eval_column=eval_column)
    if settings.get("total_updates") is None and series.total_updates is not None:
        settings["total_updates"] = series.total_updates
    detector = StageDetector(**settings)
    _check_budget(path, series, detector.total_updates)
    try:
        decisions = replay(series.values, series.counts, detector, series.evals)
    except FloatingPointError as error:  # a whole window of non-finite losses: the run diverged
        raise ReplayError(f"{path}: {error}") from None
    result = {"decisions": decisions, "settings": detector.settings()}
    if series.evals is not None:
        result["best_eval"] = detector.best_eval
    if detector.cooldown_start is not None:
        result["cooldown"] = {"start_update": detector.cooldown_start, "end_update": detector.cooldown_end,
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
