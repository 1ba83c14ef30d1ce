"""Shared fixtures: one torch thread per test, and the one launcher of multi-process tests.

Every test trains with one torch thread: with two on a busy 2-core machine torch runs many times slower.
Multi-process tests start their workers (a recipe, or a face's worker in `distributed_worker.py`) through
the `torchrun` fixture: `torchrun(script, *args, processes=2, env=None, timeout=300)`.
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
    """Collection imports torch, timm and Transformers: millions of objects that live until the end. The
    garbage collector stays off while they load, then they are frozen out of its scans; a full collection
    would otherwise rescan them all, many times over (seconds of the fast layer)."""
    enabled = gc.isenabled()
    gc.disable()
    yield
    gc.freeze()
    if enabled:
        gc.enable()


# A framework's fast tests run on one pytest-xdist worker (`--dist loadgroup`), which alone imports it.
FRAMEWORK_GROUPS = {"test_timm_": "timm", "test_hf_": "transformers"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """Test modules import timm and Transformers inside the tests, not at the top: every worker collects
    every module, and the one that runs no timm test then never pays timm's 3 s import. The slow layer
    keeps no groups: there a framework's import is small beside its tests, which spread over the workers."""
    for item in items:
        group = next((g for prefix, g in FRAMEWORK_GROUPS.items() if item.module.__name__.startswith(prefix)), None)
        if group and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.xdist_group(group))


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
