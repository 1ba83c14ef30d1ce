"""Registers ``autodecay`` with timm's scheduler factory, lazily.

An installed ``timm_autodecay-hook.pth`` (shipped by ``setup.py``, for ``pip install .`` and
``pip install -e .`` alike) calls :func:`install` at interpreter start-up. That only appends a tiny
finder to ``sys.meta_path``: nothing is imported (no timm, no torch) until a program imports
``timm.scheduler``. Right after timm has executed ``timm/scheduler/__init__.py``, and before the
importer sees the module, :func:`register` wraps two names in it (and in
``timm.scheduler.scheduler_factory``):

* ``create_scheduler_v2``: ``sched="autodecay"`` builds an
  :class:`~timm_autodecay.timm_scheduler.AutoDecayScheduler`; every other schedule is passed to timm's
  own function untouched.
* ``scheduler_kwargs``: for ``cfg.sched == "autodecay"`` only, it adds the ``autodecay_*`` keys of the
  config (timm's ``train.py`` puts YAML keys on ``args``) and the few run facts the scheduler needs
  (``--resume``, ``--val-interval``); for every other schedule it returns timm's dict unchanged.

So an unmodified ``train.py`` (``from timm.scheduler import create_scheduler_v2, scheduler_kwargs``)
gets the wrapped names. ``TIMM_AUTODECAY_HOOK=0`` in the environment turns the hook off.
This module imports only ``sys`` and ``os`` at import time.
"""
from __future__ import annotations

import os
import sys

__all__ = ["install", "register"]

TARGET = "timm.scheduler"
_MARK = "__timm_autodecay_original__"


class _PatchingLoader:
    """Runs timm's own loader, then registers ``autodecay`` in the fresh module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register(module)

    def __getattr__(self, name):  # get_source, get_filename, is_package, ... for tools
        return getattr(self._loader, name)


class _TimmSchedulerFinder:
    """A meta-path finder that answers for ``timm.scheduler`` only: it asks the finders after it
    for the real spec and wraps its loader; every other import is declined at once."""

    def __init__(self):
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET or self._busy:
            return None
        self._busy = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _PatchingLoader(spec.loader)
                    return spec
            return None
        finally:
            self._busy = False

    def invalidate_caches(self):
        pass


def _finder():
    for finder in sys.meta_path:
        if isinstance(finder, _TimmSchedulerFinder):
            return finder
    return None


def install() -> None:
    """Arm the lazy hook (what the ``.pth`` file calls). Cheap, idempotent, imports nothing."""
    if os.environ.get("TIMM_AUTODECAY_HOOK", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    module = sys.modules.get(TARGET)
    if module is not None:  # timm.scheduler is already there: patch it now
        register(module)
        return
    if _finder() is None:
        sys.meta_path.insert(0, _TimmSchedulerFinder())


def register(module=None) -> None:
    """Wrap ``create_scheduler_v2`` and ``scheduler_kwargs`` in ``timm.scheduler`` (imported if need
    be) and in ``timm.scheduler.scheduler_factory``, so that timm's ``create_scheduler`` (v1), which
    calls them through its module globals, works as well. Idempotent."""
    if module is None:
        import importlib

        module = importlib.import_module(TARGET)
    factory = sys.modules.get(TARGET + ".scheduler_factory")
    for namespace in (factory, module):
        if namespace is None:
            continue
        for attr, make in (("create_scheduler_v2", _wrap_create), ("scheduler_kwargs", _wrap_kwargs)):
            current = getattr(namespace, attr, None)
            if current is None or hasattr(current, _MARK):
                continue
            setattr(namespace, attr, make(current))


def _wrap_create(original):
    import functools

    @functools.wraps(original)
    def create_scheduler_v2(optimizer, *args, **kwargs):
        sched = kwargs.get("sched", args[0] if args else "cosine")
        if sched != "autodecay":
            for key in [k for k in kwargs if k.startswith("autodecay_")]:
                del kwargs[key]  # meaningless for other schedules
            return original(optimizer, *args, **kwargs)
        from .timm_scheduler import create_autodecay_scheduler

        return create_autodecay_scheduler(original, optimizer, *args, _caller=sys._getframe(1), **kwargs)

    setattr(create_scheduler_v2, _MARK, original)
    return create_scheduler_v2


def _wrap_kwargs(original):
    import functools

    @functools.wraps(original)
    def scheduler_kwargs(cfg, *args, **kwargs):
        result = original(cfg, *args, **kwargs)
        if result.get("sched") == "autodecay":
            from .timm_scheduler import autodecay_kwargs_from_cfg

            result.update(autodecay_kwargs_from_cfg(cfg))
        return result

    setattr(scheduler_kwargs, _MARK, original)
    return scheduler_kwargs
