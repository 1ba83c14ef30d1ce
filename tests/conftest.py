"""Shared fixtures: one torch thread per test, and the one launcher of multi-process tests.

Every test trains with one torch thread: with two on a busy 2-core machine torch runs many times slower.
Multi-process tests start their workers (a recipe, or a face's worker in `distributed_worker.py`) through
the `torchrun` fixture: `torchrun(script, *args, processes=2, env=None, timeout=300)`.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
