"""``sched="autodecay"`` in timm's scheduler factory: :func:`register` and what it wraps.

:func:`register` wraps two names of ``timm.scheduler`` (and of ``timm.scheduler.scheduler_factory``,
through which timm's ``create_scheduler`` v1 calls them):

* ``create_scheduler_v2``: ``sched="autodecay"`` builds an
  :class:`~timm_autodecay.timm_scheduler.AutoDecayScheduler` (:func:`create_autodecay_scheduler`);
  every other schedule goes to timm's own function untouched.
* ``scheduler_kwargs``: for ``cfg.sched == "autodecay"`` only, it adds the ``autodecay_*`` keys of the
  config (timm's ``train.py`` puts YAML keys on ``args``) and the run facts the scheduler needs
  (``--resume``, ``--val-interval``, the metric ``train.py`` passes to ``step``); for every other schedule it
  returns timm's dict unchanged.

The factory turns timm's arguments into the run's shape once (:class:`~timm_autodecay.timm_shape.RunShape`:
budget, warmup and epochs in updates, checked, errors naming train.py's flags) and hands it to the scheduler.
It needs no folder: the scheduler's state travels in the optimizer's state, which every train.py checkpoint
holds (:mod:`~timm_autodecay.timm_resume`).

The evaluation signal (``autodecay_eval_signal``) reads the metric ``train.py`` passes to ``step(epoch + 1,
metric)``, in the direction timm's plateau scheduler reads it (``plateau_mode``: ``min`` when the metric's name
holds ``loss``; the config key ``autodecay_eval_mode`` overrides it). Unset, it is on when ``train.py``
evaluates on a validation split (``--val-split``; without one it passes the training loss) at most
``EVAL_SIGNAL_MAX_EVALUATIONS`` times in the budget: the rule that judges evaluations (no new best of a
median of three within ``eval_patience`` evaluations) is meant for runs of a few dozen evaluations; evaluated
every epoch of a long run, a metric that still rises slowly under noise sets no new best for three
evaluations long before it has stopped rising.

The installed start-up hook (:mod:`timm_autodecay.timm_hook`) calls :func:`register` when a program
imports ``timm.scheduler``, so an unmodified ``train.py`` gets the wrapped names. A program that builds
its scheduler itself without the hook (``TIMM_AUTODECAY_HOOK=0``, or the package on ``sys.path`` without
being installed) calls ``timm_autodecay.timm_factory.register()`` once before it uses timm's factory.
Importing this module changes nothing by itself, and imports no timm: the start-up hook imports it
while timm's scheduler package is being imported (the scheduler class is imported when first built).
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
from typing import Any, Dict, Optional, Tuple

import torch

from .settings import check_known
from .timm_keys import FROM_RUN, PREFIX, RETIRED, RUN_KEYS, YAML_KEYS
from .timm_log import log_created
from .timm_loop import is_primary
from .timm_shape import RunShape

__all__ = ["RUN_KEYS", "YAML_KEYS", "autodecay_kwargs_from_cfg", "create_autodecay_scheduler", "register"]

_logger = logging.getLogger("timm_autodecay")

TARGET = "timm.scheduler"
ORIGINAL = "__timm_autodecay_original__"  # attribute of our wrappers: the function they wrap
EVAL_SIGNAL_MAX_EVALUATIONS = 60  # the evaluations a budget may hold for the evaluation signal to be on by default


# -- registration --------------------------------------------------------------------------------
def register(module: Any = None) -> None:
    """Make ``sched="autodecay"`` known to timm's scheduler factory (idempotent).

    Wraps ``create_scheduler_v2`` and ``scheduler_kwargs`` in ``timm.scheduler`` (imported if need be)
    and in ``timm.scheduler.scheduler_factory``. Code that did ``from timm.scheduler import
    create_scheduler_v2`` before this call keeps timm's own function: call it first."""
    if module is None:
        import importlib

        module = importlib.import_module(TARGET)
    factory = sys.modules.get(TARGET + ".scheduler_factory")
    for namespace in (factory, module):
        if namespace is None:
            continue
        for attr, wrap in (("create_scheduler_v2", _wrap_create), ("scheduler_kwargs", _wrap_kwargs)):
            current = getattr(namespace, attr, None)
            if current is None or hasattr(current, ORIGINAL):
                continue
            setattr(namespace, attr, wrap(current))


def _wrap_create(original: Any) -> Any:
    @functools.wraps(original)
    def create_scheduler_v2(optimizer, *args, **kwargs):
        sched = kwargs.get("sched", args[0] if args else "cosine")
        if sched != "autodecay":
            for key in [k for k in kwargs if k.startswith(PREFIX)]:
                del kwargs[key]  # meaningless for other schedules
            return original(optimizer, *args, **kwargs)
        return create_autodecay_scheduler(original, optimizer, *args, **kwargs)

    setattr(create_scheduler_v2, ORIGINAL, original)
    return create_scheduler_v2


def _wrap_kwargs(original: Any) -> Any:
    @functools.wraps(original)
    def scheduler_kwargs(cfg, *args, **kwargs):
        result = original(cfg, *args, **kwargs)
        if result.get("sched") == "autodecay":
            result.update(autodecay_kwargs_from_cfg(cfg))
        return result

    setattr(scheduler_kwargs, ORIGINAL, original)
    return scheduler_kwargs


# -- train.py's arguments ------------------------------------------------------------------------
def _check_keys(given: Any, allowed: Any, what: str) -> None:
    for key in given:
        if key in RETIRED:
            raise ValueError(f"AutoDecay: {key} is no longer a setting: {RETIRED[key]}")
        if key[len(PREFIX):] in FROM_RUN:
            raise ValueError(f"AutoDecay: {key} is not a setting: it is set from the run, by "
                             f"{FROM_RUN[key[len(PREFIX):]]}")
    check_known(given, allowed, what)


def autodecay_kwargs_from_cfg(cfg: Any) -> Dict[str, Any]:
    """What ``scheduler_kwargs(cfg)`` adds for ``cfg.sched == 'autodecay'``: the ``autodecay_*`` YAML keys
    found on ``cfg`` (unknown ones are an error), ``--resume`` and ``--val-interval``."""
    try:
        names = list(vars(cfg))
    except TypeError:
        names = [n for n in dir(cfg) if not n.startswith("_")]
    given = {n: getattr(cfg, n) for n in names if n.startswith(PREFIX)}
    _check_keys(given, YAML_KEYS, "config key(s)")
    given[PREFIX + "resume"] = getattr(cfg, "resume", None) or None
    given[PREFIX + "end_interval"] = getattr(cfg, "val_interval", 1) or 1
    # train.py: eval_metric = args.eval_metric if loader_eval is not None else 'loss' (the training loss)
    validates = getattr(cfg, "val_split", "validation")
    given[PREFIX + "eval_metric"] = (getattr(cfg, "eval_metric", None) or "top1") if validates else ""
    return given


# -- the factory ---------------------------------------------------------------------------------
def _train_py_arguments(original: Any, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Dict[str, Any]:
    """timm's factory arguments, with its defaults; those AutoDecay cannot follow are refused or warned of."""
    bound = inspect.signature(original).bind(optimizer, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a.get("noise") is not None:
        raise ValueError(f"AutoDecay: LR noise (--lr-noise {a['noise']}) is not supported with sched='autodecay'")
    if (a.get("cooldown_epochs") or 0) > 0 and is_primary():
        _logger.warning(
            f"AutoDecay: --cooldown-epochs ({a['cooldown_epochs']}) is ignored by sched='autodecay', as by timm's "
            "step schedule: --epochs is the whole budget. AutoDecay's own cooldown is the config key "
            "autodecay_decay_shape: cooldown (its length: autodecay_cooldown_fraction)")
    return a


def _eval_signal(given: Any, metric: Optional[str], evaluations: int) -> Tuple[bool, str]:
    """Whether the scheduler judges the metric passed to ``step(epoch, metric)``, and why (for the log)."""
    key = PREFIX + "eval_signal"
    if given is not None:
        if not isinstance(given, bool):
            raise ValueError(f"AutoDecay: {key} must be true or false (or unset: automatic), got {given!r}")
        passes = {None: "", "": ", train.py's training loss (no --val-split)"}.get(metric, f", train.py's {metric}")
        return given, f"{key}: {str(given).lower()}{passes}"
    if metric is None:
        return False, f"no train.py run facts; {key}=True judges the metric passed to step(epoch, metric)"
    if not metric:
        return False, "train.py evaluates nothing (--val-split ''), and passes the training loss to step()"
    if evaluations > EVAL_SIGNAL_MAX_EVALUATIONS:
        return False, (f"{evaluations} evaluations in the budget (--epochs / --val-interval), over "
                       f"{EVAL_SIGNAL_MAX_EVALUATIONS} (evaluated that often, a metric still rising slowly would "
                       f"end the phase too early); {key}: true turns it on")
    return True, f"train.py's {metric} on the validation split"


def create_autodecay_scheduler(original: Any, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any):
    """``create_scheduler_v2(optimizer, sched='autodecay', ...)``: returns ``(scheduler, num_epochs)``.

    ``original`` is timm's ``create_scheduler_v2``: its signature gives the arguments and defaults.
    Uses ``num_epochs`` (the budget), ``warmup_epochs``, ``warmup_lr``, ``warmup_prefix``, ``decay_rate``,
    ``min_lr``, ``step_on_epochs``, ``updates_per_epoch`` and ``plateau_mode`` (the evaluation metric's
    direction); the other schedules' arguments are ignored; ``autodecay_*`` keywords carry the YAML keys and
    run facts (see ``YAML_KEYS``, ``RUN_KEYS``). Without ``train.py``'s facts (no ``autodecay_eval_metric``)
    the evaluation signal is off unless ``autodecay_eval_signal=True``.
    """
    from .timm_scheduler import AutoDecayScheduler

    ours = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith(PREFIX)}
    _check_keys(ours, [*YAML_KEYS, *RUN_KEYS], "setting(s)")
    a = _train_py_arguments(original, optimizer, args, kwargs)
    shape = RunShape.from_train_py(a, ours.get(PREFIX + "end_interval") or 1)
    settings = {k[len(PREFIX):]: v for k, v in ours.items() if k in YAML_KEYS}
    end_training = settings.pop("end_training", True)
    state_file = settings.pop("state_file", None)
    settings.setdefault("eval_mode", a.get("plateau_mode") or "max")
    eval_signal, why = _eval_signal(settings.pop("eval_signal", None), ours.get(PREFIX + "eval_metric"),
                                    shape.evaluations)
    scheduler = AutoDecayScheduler(optimizer, shape=shape, eval_signal=eval_signal, end_training=end_training,
                                   resume_from=ours.get(PREFIX + "resume"), state_file=state_file, **settings)
    if is_primary():
        log_created(scheduler, why)
    return scheduler, shape.epochs
