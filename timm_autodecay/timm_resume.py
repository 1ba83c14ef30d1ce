"""Where the timm scheduler's state lives between runs: in the optimizer's state, which train.py checkpoints.

timm's ``train.py`` saves ``optimizer.state_dict()`` in every checkpoint (``CheckpointSaver``) and, on
``--resume``, loads it before it builds the scheduler; torch keeps every key of a param group other
than ``params`` through that round trip. So the scheduler writes its JSON-able state into
``optimizer.param_groups[0]["autodecay_state"]`` (:func:`publish`) at every epoch's last update, before
train.py checkpoints, and again after ``step(epoch, metric)``; each checkpoint carries the schedule of its
own epoch, and resuming from any of them, older ones included, restores that one. A program of its own
gets the same by saving and loading the optimizer's state, as it does for the optimizer anyway.

On resume (:func:`saved_state`) the state comes from the optimizer; a checkpoint of release 0.1.0 or 0.2.0
has none there, and its ``autodecay_state.json`` (:mod:`~timm_autodecay.timm_legacy`) is read instead.
train.py hands the epoch's evaluation to ``step(epoch + 1, metric)`` only after it checkpointed, so the state
in a checkpoint has not taken it; ``CheckpointSaver`` stored it as the checkpoint's ``metric``, and
:func:`checkpoint_metric` reads it from the ``--resume`` file, for the scheduler to take it as the unbroken
run did. Without the optimizer's state (``--no-resume-opt``) the checkpoint is read to say so.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch

from .state import StateError
from .timm_legacy import ENTRY_TAG, STATE_FILE, WHAT_IT_IS, find_entry, what_to_do
from .timm_log import log_resumed
from .timm_loop import is_primary

__all__ = ["STATE_KEY", "checkpoint_metric", "publish", "resume", "saved_state"]

STATE_KEY = "autodecay_state"  # the key of the optimizer's first param group that holds the scheduler's state
IN_OPTIMIZER = f"in the optimizer's state, param_groups[0][{STATE_KEY!r}]"
NEW_SCHEDULE = ("to start a new schedule from the checkpoint's weights instead, use train.py --initial-checkpoint "
                "CHECKPOINT in place of --resume (the budget starts over)")

_logger = logging.getLogger("timm_autodecay")


def publish(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Put the scheduler's state where the next ``optimizer.state_dict()`` takes it along."""
    group = optimizer.param_groups[0]
    group.pop(ENTRY_TAG, None)  # release 0.2.0's tag, from a checkpoint of that release: this state replaces it
    group[STATE_KEY] = state


def resume(scheduler: Any, n: int, metric: Any) -> Any:
    """Load into a fresh ``scheduler`` the state train.py's checkpoint carries, to resume at update ``n``. Returns
    the evaluation of that epoch's end where the state has not taken it yet (the one passed to ``step``, else the
    checkpoint's ``metric``), for the scheduler to take as the unbroken run took it; None otherwise."""
    state, where = saved_state(scheduler.optimizer, n, scheduler.updates_per_epoch, scheduler.resume_from,
                               scheduler.state_file)
    try:
        scheduler.load_state_dict(state)
    except StateError as error:
        raise StateError(f"{error} ({where})") from None
    t = n // scheduler.updates_per_epoch
    if scheduler.evaluated_epoch >= t or not scheduler.eval_signal:
        metric = None  # taken already, or not judged
    elif metric is None:
        metric = checkpoint_metric(scheduler.resume_from, t)
    if is_primary():
        log_resumed(scheduler, t, where, metric)
    return metric


def saved_state(optimizer: torch.optim.Optimizer, n: int, updates_per_epoch: int, resume_from: Optional[str],
                state_file: Optional[str]) -> Tuple[Any, str]:
    """The state to resume at update ``n`` (an epoch boundary), and where it was found (for errors)."""
    if n % updates_per_epoch:
        raise ValueError(f"AutoDecay: cannot start at update {n}, inside epoch {n // updates_per_epoch}: "
                         "it resumes at epoch boundaries only")
    t = n // updates_per_epoch
    group = optimizer.param_groups[0]
    if STATE_KEY in group:
        if state_file and is_primary():
            _logger.warning(f"AutoDecay: autodecay_state_file ({state_file}) is not read: the checkpoint carries "
                            "AutoDecay's state in its optimizer state (the file is for checkpoints of releases "
                            "0.1.0 and 0.2.0); drop the key")
        state, where = group[STATE_KEY], IN_OPTIMIZER
    else:
        path = _legacy_file(t, resume_from, state_file)
        state, where = find_entry(path, t, group.get(ENTRY_TAG))["state"], f"in {path}, the entry for epoch {t}"
    saved = state.get("num_updates") if isinstance(state, dict) else None
    if isinstance(saved, int) and not isinstance(saved, bool) and saved != n:
        raise StateError(
            f"AutoDecay: the saved state ({where}) is the one after update {saved} (epoch "
            f"{saved / updates_per_epoch:g}), but training resumes at epoch {t} (update {n}): with --start-epoch, "
            "or from a recovery checkpoint (saved inside an epoch, resumed at the next one)? Resume from a "
            "checkpoint saved at an epoch's end, without --start-epoch")
    return state, where


def _legacy_file(t: int, resume_from: Optional[str], state_file: Optional[str]) -> str:
    """The autodecay_state.json of a checkpoint that carries no state in its optimizer state."""
    if state_file:
        path = state_file
    elif resume_from:
        folder = resume_from if os.path.isdir(resume_from) else os.path.dirname(resume_from)
        path = os.path.join(folder or ".", STATE_FILE)
        if not os.path.exists(path):
            raise _no_state(t, resume_from)
    else:
        raise ValueError(
            f"AutoDecay: training starts at epoch {t} but no saved AutoDecay state was given: the optimizer's state "
            f"holds none. Resume from a checkpoint of an autodecay run (train.py --resume CHECKPOINT: AutoDecay's "
            "state travels in its optimizer state), or call load_state_dict() before the first step")
    if not os.path.exists(path):
        raise ValueError(f"AutoDecay: cannot resume at epoch {t}: {path} does not exist. {WHAT_IT_IS} "
                         f"{what_to_do(t)}.")
    return path


def _no_state(t: int, checkpoint: str) -> ValueError:
    """Why the optimizer holds no state although train.py resumes from ``checkpoint``, and what to do."""
    try:
        groups = _load(checkpoint)["optimizer"]["param_groups"]
        carried = STATE_KEY in groups[0]
    except Exception:  # noqa: BLE001 - only to tell two causes apart; the error below stands without it
        carried = False
    if carried:
        return ValueError(
            f"AutoDecay: cannot resume at epoch {t}: {checkpoint} carries AutoDecay's state in its optimizer state, "
            "but the optimizer's state was not loaded from it (train.py --no-resume-opt). Resume without "
            f"--no-resume-opt; or, {NEW_SCHEDULE}")
    return ValueError(
        f"AutoDecay: cannot resume at epoch {t} from {checkpoint}: it holds no AutoDecay state, neither in its "
        f"optimizer state (param_groups[0][{STATE_KEY!r}]) nor in an {STATE_FILE} next to it (releases 0.1.0 and "
        f"0.2.0). Was it written by a train.py --sched autodecay run? If so, and the optimizer's state was not "
        f"loaded (--no-resume-opt), resume without it; {NEW_SCHEDULE}")


def checkpoint_metric(checkpoint: Optional[str], t: int) -> Optional[Any]:
    """The metric train.py saved ``checkpoint`` with (its evaluation after ``t`` epochs), which the state in
    the checkpoint has not taken; None, with a warning, where there is none to read."""
    found, why = None, f"no checkpoint file was given (train.py's --resume: {checkpoint!r})"
    if checkpoint and os.path.isfile(checkpoint):
        try:
            saved = _load(checkpoint)
            found = saved.get("metric") if isinstance(saved, dict) else None
            why = f"{checkpoint} holds no 'metric'"
        except Exception as error:  # noqa: BLE001 - a warning below says what it cost
            why = f"{checkpoint} could not be read ({type(error).__name__}: {error})"
    if found is None and is_primary():
        _logger.warning(f"AutoDecay: the evaluation after epoch {t} is not in the saved state and cannot be read: "
                        f"{why}; the evaluation signal goes on from the next evaluation, and the schedule may differ "
                        "from an unbroken run's")
    return found


def _load(path: str) -> Any:
    """A train.py checkpoint as timm's resume loads it (``weights_only``, with its ``args``), its tensors mapped,
    not read: only its small entries are wanted."""
    allowed = getattr(torch.serialization, "safe_globals", None)
    with allowed([argparse.Namespace]) if allowed else contextlib.nullcontext():
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # an old, non-zip checkpoint cannot be mapped
            return torch.load(path, map_location="cpu", weights_only=True)
