"""The callback's entry in a checkpoint's ``trainer_state.json``, read back whole before any of it is used.

The Trainer files it under ``stateful_callbacks.AutoDecayCallback`` as ``{"args": {"decay_rate": ...,
"min_lr": ..., ["eval_signal": ...,] <settings passed>}, "attributes": {"detector_state": {...}}}``
(``eval_signal`` only when passed, so entries of release 0.2.0 read as its default; it is checked here, but
this run's applies). The detector's state carries its format version (release 0.1.0 wrote none; such states
are migrated) and its resolved settings, which are the ones a resumed run continues with, but for the
evaluation settings of a state that has recorded no evaluation (every state written before evaluations
were added): those had no effect yet, and this run's are taken (``eval_mode`` follows the Trainer's
``greater_is_better``). Everything is checked before anything is applied; a damaged entry raises a
``ValueError`` naming the file, the key and what the user can do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from timm_autodecay.detector import StageDetector, StateError, check_float, check_state_fields
from timm_autodecay.state import adopt_evaluation_settings
from timm_autodecay.torch_scheduler import check_decay_rate

from .eval_signal import check_eval_signal

ENTRY_KEY = "stateful_callbacks.AutoDecayCallback"


@dataclass(frozen=True)
class SavedEntry:
    decay_rate: float
    min_lr: float
    detector: StageDetector  # restored and validated


def read_saved_entry(entry: Any, step: int, eval_settings: Mapping[str, Any]) -> Optional[SavedEntry]:
    """The entry restored (None when it holds no detector state: a checkpoint from before training began);
    ``eval_settings``: this run's evaluation settings, taken where the state has recorded no evaluation.
    Raises ValueError naming ``checkpoint-<step>/trainer_state.json`` and the bad key."""
    try:
        return _read(entry, step, eval_settings)
    except (StateError, ValueError) as error:
        raise StateError(
            f"AutoDecayCallback cannot resume from checkpoint-{step}/trainer_state.json: {error}. That entry "
            f"({ENTRY_KEY}) is AutoDecay's resume state. Restore the file from a copy, resume from another "
            "checkpoint, or delete the AutoDecayCallback entry from stateful_callbacks to restart AutoDecay at "
            "this step (it then splits the remaining steps into its stages)."
        ) from error


def _read(entry: Any, step: int, eval_settings: Mapping[str, Any]) -> Optional[SavedEntry]:
    check_state_fields(entry, {"args": dict, "attributes": dict}, ENTRY_KEY)
    args, attributes = entry["args"], entry["attributes"]
    check_state_fields(args, {"decay_rate": (int, float)}, f"{ENTRY_KEY}.args")
    check_state_fields(attributes, {"detector_state": (dict, type(None))}, f"{ENTRY_KEY}.attributes")
    decay_rate = _named(f"{ENTRY_KEY}.args.decay_rate", check_decay_rate, args["decay_rate"])
    min_lr = _named(f"{ENTRY_KEY}.args.min_lr", lambda v: check_float("min_lr", v, 0.0), args.get("min_lr", 0.0))
    _named(f"{ENTRY_KEY}.args.eval_signal", check_eval_signal, args.get("eval_signal"))  # the Trainer's restore uses it
    saved = attributes["detector_state"]
    if saved is None:
        return None
    where = f"{ENTRY_KEY}.attributes.detector_state"
    try:
        state = adopt_evaluation_settings(saved, eval_settings)
    except StateError as error:
        raise StateError(f"{where}: {error}") from error
    try:
        detector = StageDetector.from_settings(state["settings"])
    except ValueError as error:
        raise StateError(f"{where}.settings: {error}") from error
    try:
        detector.load_state_dict(state)
    except StateError as error:  # its message names the key inside the state
        raise StateError(f"{where}: {error}") from error
    if detector.update > step:
        raise StateError(f"{where}: 'update' is {detector.update}, past the checkpoint's step {step}: the "
                         "entry belongs to a later checkpoint")
    return SavedEntry(decay_rate, min_lr, detector)


def _named(key: str, check, value: Any):
    try:
        return check(value)
    except ValueError as error:
        raise StateError(f"'{key}': {error}") from error

