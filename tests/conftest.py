"""Shared fixtures: one torch thread per test, the one launcher of multi-process tests, and what keeps the
fast layer (`pytest -m "not slow"`) fast.

Every test trains with one torch thread: with two on a busy 2-core machine torch runs many times slower.
Multi-process tests start their workers (a recipe, or a face's worker in `distributed_worker.py`) through
the `torchrun` fixture: `torchrun(script, *args, processes=2, env=None, timeout=300)`.

Speed: test modules import timm and Transformers (and the package modules that need them) inside the
tests, never at the top; the frameworks' fast tests then run on one pytest-xdist worker, the only one that
pays their import; the garbage collector is kept off the long-lived objects.
"""
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session):
    """Collection imports torch: hundreds of thousands of objects that live until the end. The garbage
    collector stays off while they load, then they are frozen out of its scans; every full collection
    would otherwise rescan them all (seconds of the fast layer)."""
    enabled = gc.isenabled()
    gc.disable()
    yield
    gc.freeze()
    if enabled:
        gc.enable()


def pytest_sessionfinish(session):
    """Nothing the session made needs collecting any more: frozen, it spares the full collections pytest
    runs at exit (over the frameworks the tests imported) about a second per worker."""
    gc.freeze()


FRAMEWORK_TESTS = ("test_timm_", "test_hf_", "test_faults_")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """The timm and Transformers faces' fast tests form one group (`--dist loadgroup`): one worker imports both
    frameworks, which share most of their import, and the other never pays it (every worker collects every
    module, so those import the frameworks inside their tests). The slow layer keeps no group: there an
    import is small beside the tests, which spread over the workers."""
    for item in items:
        if item.module.__name__.startswith(FRAMEWORK_TESTS) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.xdist_group("frameworks"))


@pytest.fixture(autouse=True)
def one_thread():
    import torch  # here, not at the top: pytest-xdist's controller loads this file and runs no test

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def launch_torchrun(script, *args, processes: int = 2, env: dict = None, timeout: int = 300):
    """Run `script` with `args` in `processes` processes under torchrun (standalone rendezvous; gloo on
    CPU), one torch thread each, from the repository root. Returns the CompletedProcess (text output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(script), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def torchrun():
    """The launcher of multi-process tests (see `launch_torchrun`)."""
    return launch_torchrun
