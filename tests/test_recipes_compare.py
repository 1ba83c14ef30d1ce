"""`recipes/compare_schedules.py`: smoke tests run as users run it (a subprocess, tiny settings), its
config errors, the oracle's search and dlib's slope test."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
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


@pytest.mark.slow
def test_compare_schedules_writes_results_and_plot(tmp_path):
    finished = run_recipe(
        "--epochs", "2", "--seeds", "0", "--schedules", "step", "autodecay", "--jobs", "1",
        "--output_dir", str(tmp_path),
    )
    assert finished.returncode == 0, finished.stderr

    results = json.loads((tmp_path / "results.json").read_text())["runs"]
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


@pytest.mark.slow  # imports the recipe (timm, Accelerate): seconds
@pytest.mark.parametrize(
    "override, message",
    [(["--epoch", "2"], "'epoch'"), (["--epochs", "two"], "epochs: invalid value 'two'"),
     (["--schedules", "step", "linear"], "schedules: invalid value 'linear'")],
)
def test_compare_schedules_rejects_bad_config(override, message, capsys):
    from compare_schedules import CompareConfig
    from engine.config import load_config

    with pytest.raises(SystemExit) as stopped:
        load_config(CompareConfig, ["--config", str(CONFIG), *override])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_peers_and_oracle_end_to_end(tmp_path):
    finished = run_recipe(
        "--epochs", "3", "--seeds", "0", "--jobs", "1", "--checkpoint_every", "0", "--save_stage_ends", "false",
        "--num_samples", "2000",  # 25 updates per epoch: a smoke test
        "--schedules", "step", "slope", "sasa", "timm_plateau", "oracle", "--milestones", "1", "2",
        "--oracle_first_milestones", "1", "--oracle_gaps", "1", "--oracle_tails", "1",
        "--output_dir", str(tmp_path),
    )
    assert finished.returncode == 0, finished.stderr
    document = json.loads((tmp_path / "results.json").read_text())
    runs = {run["schedule"]: run for run in document["runs"]}
    assert list(runs) == ["step", "slope", "sasa", "timm_plateau", "oracle"]
    for run in runs.values():
        assert RUN_KEYS <= run.keys() and run["curves"]
    # the oracle's only grid point is StepDecay at 1, 2 over 3 epochs: the same run, bit for bit
    assert document["oracle"]["mnist1d"]["chosen"] == "1,2,3"
    assert runs["oracle"]["test_top1"] == runs["step"]["test_top1"]
    assert runs["oracle"]["decay_epochs"] == runs["step"]["decay_epochs"] == [1.0, 2.0]
    rows = {row["schedule"]: row for row in document["tables"]["mnist1d"]["rows"]}
    assert rows["oracle"]["saved_epochs"] == 0 and rows["oracle"]["oracle_fraction"] is None
    assert all(row["note"] for row in rows.values())
    assert "| timm_plateau | 1 |" in finished.stdout
    assert (tmp_path / "pareto.png").stat().st_size > 0 and (tmp_path / "results.md").exists()


@pytest.mark.slow
def test_oracle_search_shares_prefixes():
    from engine.oracle import choose_oracle, oracle_search
    from engine.train_config import TrainConfig

    result = oracle_search(TrainConfig(num_samples=2000), [1, 2], [1], [1, 2])
    assert set(result["grid"]) == {"1,2,3", "1,2,4", "2,3,4", "2,3,5"}
    assert result["epochs_trained"] == 2 + 2 * 1 + 2 * 2  # trunk, second stages, last stages
    assert choose_oracle([result["grid"]], target=0.0)[0] == "1,2,3"  # shortest when all qualify
    best = max(result["grid"], key=result["grid"].get)
    assert choose_oracle([result["grid"]], target=101.0)[0] == best  # else the most accurate


def test_slope_test_counts():
    import numpy as np
    from engine.slope_test import count_steps_without_decrease

    rng = np.random.default_rng(0)
    falling = np.linspace(2.0, 1.0, 400) + rng.normal(0, 0.02, 400)
    flat = 1.0 + rng.normal(0, 0.02, 400)
    assert count_steps_without_decrease(falling) < 50
    assert count_steps_without_decrease(flat) > 300
    spiked = np.concatenate([np.linspace(2.0, 1.0, 380), np.full(20, 9.0)])  # a few bad batches at the end
    assert count_steps_without_decrease(spiked) == 400  # the plain count is fooled
    assert count_steps_without_decrease(spiked, quantile_discard=0.1) < 50  # the robust one is not


def test_slope_test_decays_then_ends():
    import torch
    from engine.slope_test import SlopeTest

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = SlopeTest(decay_rate=0.1, num_stages=3, threshold_epochs=1)
    schedule.start(optimizer, updates_per_epoch=50, total_updates=2000)
    noise = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    lrs, ended = [], None
    for update, value in enumerate(noise):
        if schedule.after_update(1.0 + 0.01 * value):
            ended = update
            break
        lrs.append(optimizer.param_groups[0]["lr"])
    assert sorted(set(lrs), reverse=True) == pytest.approx([0.1, 0.01, 0.001])
    assert schedule.stage == 2  # two decays; the third plateau ends the run
    assert ended is not None and ended >= 3 * 50 * 0.5


@pytest.mark.slow  # generates MNIST-1D
def test_noisy_mnist1d_flips_train_labels_only():
    from engine.tasks import TASKS
    from engine.train_config import TrainConfig

    clean, noisy = TASKS["mnist1d"](TrainConfig()), TASKS["mnist1d_noisy"](TrainConfig())
    flipped = (clean.train_targets != noisy.train_targets).float().mean().item()
    assert 0.13 < flipped < 0.17
    assert (clean.test_targets == noisy.test_targets).all()
    assert (clean.train_inputs == noisy.train_inputs).all()
