"""The start-up hook: registers ``autodecay`` with timm's scheduler factory, lazily.

An installed ``timm_autodecay-hook.pth`` (shipped by ``setup.py``, for ``pip install .`` and
``pip install -e .`` alike) calls :func:`install` at interpreter start-up. That only puts a tiny
finder on ``sys.meta_path``: nothing is imported (no timm, no torch) until a program imports
``timm.scheduler``. Right after timm has executed ``timm/scheduler/__init__.py``, and before the
importer sees the module, the finder's loader imports :mod:`timm_autodecay.timm_factory` and calls its
:func:`~timm_autodecay.timm_factory.register`, which wraps ``create_scheduler_v2`` and
``scheduler_kwargs``. So an unmodified ``train.py`` (``from timm.scheduler import create_scheduler_v2,
scheduler_kwargs``) gets the wrapped names. ``TIMM_AUTODECAY_HOOK=0`` in the environment turns the hook off.

The ``.pth`` line imports this module inside ``try``: when the package is gone (an editable install's
checkout moved or deleted), Python starts silently, as if the hook were not installed.
This module imports only ``sys`` and ``os`` at import time.
"""
from __future__ import annotations

import os
import sys

__all__ = ["install"]

TARGET = "timm.scheduler"


class _PatchingLoader:
    """Runs timm's own loader, then registers ``autodecay`` in the fresh module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register(module)

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


def _register(module) -> None:
    """Register in timm's fresh module; a failure here must not break ``import timm.scheduler`` for
    programs that never use AutoDecay: it is reported as a warning."""
    try:
        from .timm_factory import register

        register(module)
    except Exception as error:  # noqa: BLE001 - any failure of ours, reported, never raised into timm
        import warnings

        warnings.warn(f"timm_autodecay: sched='autodecay' is not available in timm: registering it failed "
                      f"({type(error).__name__}: {error})", RuntimeWarning, stacklevel=2)


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
        _register(module)
        return
    if _finder() is None:
        sys.meta_path.insert(0, _TimmSchedulerFinder())
