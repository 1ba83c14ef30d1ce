"""``autodecay_state.json``: the timm scheduler's resume state, next to train.py's checkpoints.

At every epoch's end the scheduler adds an entry (its whole state after that many epochs) and tags the
optimizer's first param group with the entry's id (``autodecay_state_entry``): train.py's checkpoint,
written right after, carries the tag in its optimizer state. train.py hands over the epoch's evaluation
only after it wrote that checkpoint (``step(epoch + 1, metric)``): the entry's state is then rewritten with
the evaluation taken, so the checkpoint resumes with it. ``--resume`` loads the optimizer before
the scheduler is built, so the scheduler finds the very entry of that checkpoint, even after another
checkpoint of the same folder was resumed and trained on (its entries are kept, never replaced).
Without a tag (``--no-resume-opt``, or a checkpoint of release 0.1.0) the newest entry for the
checkpoint's epoch is taken: the one written with the checkpoint file now in the folder.

Format (version 2)::

    {"format": "timm-autodecay-state", "version": 2,
     "entries": [{"id": "3f2a...", "epoch": 7, "state": {...}}, ...]}   # oldest first

Version 1 (release 0.1.0) held ``"epochs": {"7": state, ...}``, one entry per epoch; it is read as
entries without ids. A file that cannot be read as either stops the run with an error that names
the file and says what to do; it is never overwritten (a run that writes to that folder moves it
aside first).
"""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from typing import Any, Dict, List, Optional

from .detector import StateError, check_state_fields
from .state import EVALUATION_SETTINGS

STATE_FILE = "autodecay_state.json"
FILE_FORMAT = "timm-autodecay-state"
FILE_VERSION = 2  # 1: release 0.1.0
ENTRY_TAG = "autodecay_state_entry"  # the optimizer's param group key that ties a checkpoint to its entry
ENTRIES_PER_EPOCH = 3  # older entries of an epoch (checkpoints trained over since) are dropped

_logger = logging.getLogger("timm_autodecay")

WHAT_IT_IS = ("It is AutoDecay's resume state (the learning stage, LR and detector state at each epoch's end), "
              "written next to train.py's checkpoints.")


def what_to_do(epoch: Optional[int]) -> str:
    at = f" at epoch {epoch}" if epoch is not None else ""
    return (f"To resume{at}, restore the file from a backup or point to a good copy with the config key "
            "autodecay_state_file: PATH (create_scheduler_v2(..., autodecay_state_file=PATH)); or start a new "
            "schedule from the checkpoint's weights: train.py --initial-checkpoint CHECKPOINT instead of --resume "
            "(the budget starts over)")


def damaged(path: str, reason: str, epoch: Optional[int] = None) -> StateError:
    return StateError(f"AutoDecay: cannot resume from {path}: {reason}. {WHAT_IT_IS} {what_to_do(epoch)}.")


def read_entries(path: str, epoch: Optional[int] = None) -> List[Dict[str, Any]]:
    """The file's entries, oldest first, as ``{"id", "epoch", "state"}`` dicts (``id`` None for
    version-1 entries). Raises StateError naming the file if it is damaged or not this format."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except IsADirectoryError:
        raise damaged(path, "it is a folder, not a file", epoch) from None
    if not raw.strip():
        raise damaged(path, "the file is empty (a write was cut short?)", epoch)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise damaged(path, f"it is not complete JSON ({error}; truncated?)", epoch) from None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        found = type(data).__name__ if not isinstance(data, dict) else f"format {data.get('format')!r}"
        raise damaged(path, f"it holds a JSON {found}, not a {FILE_FORMAT!r} object", epoch)
    version = data.get("version")
    if version == 1 and isinstance(data.get("epochs"), dict):
        entries = [{"id": None, "epoch": key, "state": state} for key, state in data["epochs"].items()]
    elif version == FILE_VERSION and isinstance(data.get("entries"), list):
        entries = data["entries"]
    elif isinstance(version, int) and not isinstance(version, bool) and version > FILE_VERSION:
        raise StateError(f"AutoDecay: {path} has version {version}, written by a newer timm-autodecay; "
                         f"this release reads versions 1 to {FILE_VERSION}: upgrade timm-autodecay to resume it")
    else:
        raise damaged(path, f"its 'version' ({version!r}) and entries do not match (version 1 has 'epochs', "
                      f"version {FILE_VERSION} 'entries')", epoch)
    return [_checked_entry(path, i, entry, epoch) for i, entry in enumerate(entries)]


def _checked_entry(path: str, index: int, entry: Any, epoch: Optional[int]) -> Dict[str, Any]:
    where = f"entries[{index}]"
    if not isinstance(entry, dict):
        raise damaged(path, f"'{where}' must be an object, got {entry!r:.80}", epoch)
    number = entry.get("epoch")
    if isinstance(number, str) and number.isdigit():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise damaged(path, f"'{where}.epoch' must be an epoch number, got {entry.get('epoch')!r}", epoch)
    if entry.get("id") is not None and not isinstance(entry["id"], str):
        raise damaged(path, f"'{where}.id' must be a string, got {entry['id']!r}", epoch)
    if not isinstance(entry.get("state"), dict):
        raise damaged(path, f"'{where}.state' must be an object, got {entry.get('state')!r:.80}", epoch)
    return {"id": entry.get("id"), "epoch": number, "state": entry["state"]}


def find_entry(path: str, epoch: int, tag: Optional[str]) -> Dict[str, Any]:
    """The entry written for the checkpoint being resumed: the one tagged ``tag`` (from the
    checkpoint's optimizer state), else the newest for ``epoch``."""
    entries = read_entries(path, epoch)
    if tag is not None:
        match = [e for e in entries if e["id"] == tag]
        if not match:
            raise StateError(
                f"AutoDecay: {path} holds no entry for this checkpoint (its optimizer state names entry {tag!r}, "
                f"epoch {epoch}); the file holds entries for epochs {sorted({e['epoch'] for e in entries})}. "
                f"Is it the state file of the checkpoint's run? {what_to_do(epoch)}.")
        if match[-1]["epoch"] != epoch:
            raise StateError(
                f"AutoDecay: {path}: the checkpoint's entry {tag!r} is for epoch {match[-1]['epoch']}, but training "
                f"resumes at epoch {epoch} (--start-epoch?); resume at epoch {match[-1]['epoch']}")
        return match[-1]
    match = [e for e in entries if e["epoch"] == epoch]
    if not match:
        raise StateError(
            f"AutoDecay: {path} holds no state for epoch {epoch} (it has epochs "
            f"{sorted({e['epoch'] for e in entries})}); resume from a checkpoint whose epoch it holds. "
            f"{what_to_do(epoch)}.")
    return match[-1]


class StateFile:
    """Adds entries to one ``autodecay_state.json`` (rank 0 only), atomically."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, STATE_FILE)
        self._entries: Optional[List[Dict[str, Any]]] = None
        self._added: Optional[str] = None  # the id of the entry this object added last

    def _load(self) -> List[Dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        try:
            return read_entries(self.path)
        except StateError as error:
            aside = f"{self.path}.damaged"
            os.replace(self.path, aside)
            _logger.warning(f"AutoDecay: moved {self.path} to {aside} and started a new one: {error}")
            return []

    def add(self, epoch: int, state: Dict[str, Any]) -> str:
        """Write ``state`` as the entry for ``epoch``; returns its id."""
        if self._entries is None:
            self._entries = self._load()
        entry_id = uuid.uuid4().hex[:16]
        entries = self._entries + [{"id": entry_id, "epoch": epoch, "state": state}]
        same = [i for i, e in enumerate(entries) if e["epoch"] == epoch]
        drop = set(same[:-ENTRIES_PER_EPOCH])
        self._entries = [e for i, e in enumerate(entries) if i not in drop]
        self._write()
        self._added = entry_id
        return entry_id

    def replace(self, entry_id: Optional[str], epoch: int, state: Dict[str, Any]) -> bool:
        """Rewrite the state of the latest entry, if it is ``entry_id`` for ``epoch`` (the entry this object
        added last: never one of an earlier run, which its own checkpoint resumes). False if it is not."""
        last = self._entries[-1] if self._entries else None
        if entry_id is None or entry_id != self._added or last is None or last["epoch"] != epoch:
            return False
        last["state"] = state
        self._write()
        return True

    def _write(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            # dumps, not dump: only the one-shot encoder is C; the file is rewritten at every checkpoint
            f.write(json.dumps({"format": FILE_FORMAT, "version": FILE_VERSION, "entries": self._entries}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# -- one entry: the scheduler's state_dict() ------------------------------------------------------
ENTRY_VERSION = 2  # 1: release 0.1.0 ("format": 1, no "version")
_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))
ENTRY_FIELDS = {
    "version": int, "num_updates": int, "updates_per_epoch": int, "t_in_epochs": bool, "decay_rate": _NUMBER,
    "lr_min": _NUMBER, "warmup_t": int, "warmup_lr_init": _NUMBER, "base_values": list,
    "running_mean": _OPTIONAL_NUMBER, "samples": int, "last_sample": _OPTIONAL_NUMBER,
    "every_update": (bool, type(None)), "awaiting_finite": bool, "pending_losses": dict, "detector": dict,
}
PENDING_FIELDS = {"sum": _NUMBER, "finite": int, "nonfinite": int, "diverged": int}


def _fail(key: str, message: str, value: Any) -> StateError:
    return StateError(f"AutoDecay state: '{key}' {message}, got {value!r}")


def migrate_entry(state: Any) -> Dict[str, Any]:
    """A scheduler state of release 0.1.0 in the current format (the argument is left untouched);
    the detector's own state is migrated by the detector."""
    check_state_fields(state, {"detector": dict}, "")
    version = state.get("version", 1 if state.get("format") == 1 else None)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= ENTRY_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > ENTRY_VERSION
        raise _fail("version", f"must be 1..{ENTRY_VERSION}" + (" (written by a newer timm-autodecay: upgrade "
                    "to resume it)" if newer else ""), state.get("version", state.get("format")))
    if version == ENTRY_VERSION:
        return state
    check_state_fields(state.get("pending_losses"), {"sum": _NUMBER, "finite": _NUMBER, "count": _NUMBER},
                       "pending_losses")
    pending = state["pending_losses"]
    migrated = {key: value for key, value in state.items() if key != "format"}
    unread = {"sum": pending["sum"], "finite": int(pending["finite"]),
              "nonfinite": int(pending["count"] - pending["finite"]), "diverged": 0}
    migrated.update(version=ENTRY_VERSION, every_update=None, awaiting_finite=False, pending_losses=unread)
    return migrated


def check_entry(state: Dict[str, Any], param_groups: int) -> None:
    """Types and ranges of a (migrated) scheduler state; StateError names the bad key."""
    check_state_fields(state, ENTRY_FIELDS, "")
    check_state_fields(state["pending_losses"], PENDING_FIELDS, "pending_losses")
    for key in ("num_updates", "updates_per_epoch", "warmup_t", "samples"):
        if state[key] < (1 if key == "updates_per_epoch" else 0):
            raise _fail(key, "must be >= 0" if key != "updates_per_epoch" else "must be >= 1", state[key])
    values = state["base_values"]
    if len(values) != param_groups:
        raise _fail("base_values", f"must hold one LR per param group of the optimizer ({param_groups})", values)
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, _NUMBER) or not math.isfinite(value) or value < 0:
            raise _fail(f"base_values[{i}]", "must be a finite LR >= 0", value)
    pending = state["pending_losses"]
    if not math.isfinite(pending["sum"]) or min(pending["finite"], pending["nonfinite"], pending["diverged"]) < 0:
        raise _fail("pending_losses", "must hold a finite sum and counts >= 0", pending)
    for key in ("running_mean", "last_sample"):
        if state[key] is not None and not math.isfinite(state[key]):
            raise _fail(key, "must be a finite number or null", state[key])


# -- an entry against this run -------------------------------------------------------------------
# The scheduler's own settings that a resumed run must share with its checkpoint, and what sets them.
RUN_FLAGS = {
    "updates_per_epoch": "train.py's updates per epoch (the dataset, --batch-size, --grad-accum-steps)",
    "t_in_epochs": "--sched-on-updates", "decay_rate": "--decay-rate", "lr_min": "--min-lr",
    "warmup_t": "--warmup-epochs", "warmup_lr_init": "--warmup-lr",
}


def check_same_run(state: Dict[str, Any], scheduler: Any) -> None:
    """StateError naming the flag when a (migrated, checked) entry was written by a run of another shape."""
    for key, flag in RUN_FLAGS.items():
        if state[key] != getattr(scheduler, key):
            raise StateError(
                f"AutoDecay: {key} is {getattr(scheduler, key)!r} in this run but {state[key]!r} in the saved state "
                f"({flag}); resume with the run's own settings")
    saved = state["detector"].get("settings")
    saved = saved if isinstance(saved, dict) else {}
    upe, detector = scheduler.updates_per_epoch, scheduler.detector

    def describe(updates: Optional[int]) -> str:
        return "none" if updates is None else f"{updates} updates, {updates / upe:g} epochs"

    for key, flag in (("total_updates", "--epochs"), ("warmup_updates", "--warmup-epochs")):
        then, now = saved.get(key, getattr(detector, key)), getattr(detector, key)
        if then != now:
            raise StateError(
                f"AutoDecay: the saved state's run had {key}={describe(then)}, this one {describe(now)}: "
                f"resume with the checkpoint's {flag}" + (" (and --warmup-prefix)" if scheduler.warmup_prefix else ""))


def adopt_evaluation_settings(saved: Any, detector: Any) -> Any:
    """A detector state written before the evaluation signal (state version 1 or 2) with this run's evaluation
    settings: it saw no evaluation, so any fit it (left out, the defaults would be filled in, and a run whose
    --eval-metric is top1, mode max, could not resume it). Any other state is returned as it is."""
    version = saved.get("version", 1) if isinstance(saved, dict) else None
    if version not in (1, 2) or isinstance(version, bool) or not isinstance(saved.get("settings"), dict):
        return saved
    ours = {name: getattr(detector, name) for name in EVALUATION_SETTINGS}
    return {**saved, "settings": {**saved["settings"], **ours}}


def settings_hint(error: StateError) -> str:
    """What sets the detector settings that a refused state names, in timm's terms."""
    if "'settings' differ" not in str(error):
        return ""
    return "; timm config keys: autodecay_<setting>" + (
        ", and eval_mode follows --eval-metric ('min' when its name holds 'loss')" if "eval_mode" in str(error) else "")
