"""Smoke tests of `recipes/compare_schedules.py`, run as users run it: a subprocess, tiny settings."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "compare_schedules.py"
CONFIG = ROOT / "recipes" / "configs" / "compare_schedules.yaml"
RUN_KEYS = {"schedule", "seed", "test_top1", "epochs", "updates", "decay_epochs", "wall_seconds", "curves"}
CURVE_KEYS = {"epoch", "updates", "lr", "stage", "train_loss", "test_loss", "test_top1", "seconds"}


def run_recipe(*overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, str(RECIPE), "--config", str(CONFIG), *overrides]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_compare_schedules_writes_results_and_plot(tmp_path):
    finished = run_recipe(
        "--epochs", "2", "--seeds", "0", "--schedules", "step", "autodecay", "--jobs", "1",
        "--output_dir", str(tmp_path),
    )
    assert finished.returncode == 0, finished.stderr

    results = json.loads((tmp_path / "results.json").read_text())
    assert [run["schedule"] for run in results] == ["step", "autodecay"]
    for run in results:
        assert RUN_KEYS <= run.keys()
        assert run["curves"] and all(CURVE_KEYS <= line.keys() for line in run["curves"])
        assert run["curves"][-1]["epoch"] == run["epochs"] <= 2
        assert run["updates"] == round(run["epochs"] * 125)
        assert all(isinstance(epoch, float) for epoch in run["decay_epochs"])
        run_dir = tmp_path / run["schedule"] / "seed0"
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == len(run["curves"])
        assert json.loads((run_dir / "summary.json").read_text())["updates"] == run["updates"]
    assert results[0]["epochs"] == 2 and results[0]["decay_epochs"] == []
    assert (tmp_path / "compare_schedules.png").stat().st_size > 0
    assert "| autodecay | 1 |" in finished.stdout


@pytest.mark.parametrize(
    "override, message",
    [(["--epoch", "2"], "'epoch'"), (["--epochs", "two"], "epochs: invalid value 'two'"),
     (["--schedules", "step", "linear"], "schedules: invalid value 'linear'")],
)
def test_compare_schedules_rejects_bad_config(tmp_path, override, message):
    finished = run_recipe(*override, "--output_dir", str(tmp_path))
    assert finished.returncode == 2
    assert message in finished.stderr
    assert not (tmp_path / "results.json").exists()
