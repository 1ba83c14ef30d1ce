"""``autodecay_state.json``: where releases 0.1.0 and 0.2.0 kept the timm scheduler's state. Read only.

Those releases wrote an entry (the scheduler's whole state after that many epochs) to this file in
train.py's checkpoint folder at every epoch's end; 0.2.0 also tagged the optimizer's first param group with
the entry's id (``autodecay_state_entry``), so each checkpoint named its own entry. This release keeps the
state in the optimizer's state itself (:mod:`~timm_autodecay.timm_resume`) and only reads the file, so that
the checkpoints of those releases still resume with their schedule: the entry the checkpoint's tag names,
else (release 0.1.0, or ``--no-resume-opt``) the newest entry for the checkpoint's epoch.

Format (version 2, release 0.2.0)::

    {"format": "timm-autodecay-state", "version": 2,
     "entries": [{"id": "3f2a...", "epoch": 7, "state": {...}}, ...]}   # oldest first

Version 1 (release 0.1.0) held ``"epochs": {"7": state, ...}``, one entry per epoch; it is read as
entries without ids. A file that cannot be read as either stops the run with an error that names the file
and says what to do.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from .state import StateError

__all__ = ["ENTRY_TAG", "STATE_FILE", "WHAT_IT_IS", "find_entry", "read_entries", "what_to_do"]

STATE_FILE = "autodecay_state.json"
FILE_FORMAT = "timm-autodecay-state"
FILE_VERSION = 2  # 1: release 0.1.0
ENTRY_TAG = "autodecay_state_entry"  # release 0.2.0's param group key that tied a checkpoint to its entry

WHAT_IT_IS = ("It is AutoDecay's resume state as releases 0.1.0 and 0.2.0 wrote it (the learning stage, LR and "
              "detector state at each epoch's end), next to train.py's checkpoints.")


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
