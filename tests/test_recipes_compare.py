"""`recipes/compare_schedules.py` (`recipes/engine/backends/mnist1d.py`): smoke tests run as users run it (a
subprocess, tiny settings), its config errors, the report's arithmetic on accuracies, the oracle's search and
dlib's slope test."""
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the recipes, not the inner loop (`pytest -m "not slow"`)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
RECIPE = ROOT / "recipes" / "compare_schedules.py"
CONFIG = ROOT / "recipes" / "configs" / "compare_schedules.yaml"
RUN_KEYS = {"label", "peer", "seed", "test_top1", "epochs", "updates", "decay_epochs", "wall_seconds", "curves"}
CURVE_KEYS = {"epoch", "updates", "lr", "stage", "train_loss", "test_loss", "test_top1", "seconds"}


def run_recipe(*overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, str(RECIPE), "--config", str(CONFIG), *overrides]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def test_compare_schedules_writes_results_and_plot(tmp_path):
    finished = run_recipe(
        "--epochs", "2", "--seeds", "0", "--schedules", "step", "autodecay", "--jobs", "1",
        "--output_dir", str(tmp_path),
    )
    assert finished.returncode == 0, finished.stderr

    results = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [run["label"] for run in results] == ["step", "autodecay"]
    for run in results:
        assert RUN_KEYS <= run.keys()
        assert run["curves"] and all(CURVE_KEYS <= line.keys() for line in run["curves"])
        assert run["curves"][-1]["epoch"] == run["epochs"] <= 2
        assert run["updates"] == round(run["epochs"] * 125)
        assert all(isinstance(epoch, float) for epoch in run["decay_epochs"])
        run_dir = tmp_path / "runs" / run["label"] / "seed0"
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == len(run["curves"])
        assert json.loads((run_dir / "summary.json").read_text())["updates"] == run["updates"]
    assert results[0]["epochs"] == 2 and results[0]["decay_epochs"] == []
    assert (tmp_path / "compare_schedules.png").stat().st_size > 0
    assert "| autodecay | 1 |" in finished.stdout


@pytest.mark.slow  # imports the recipe (timm, Accelerate): seconds
@pytest.mark.parametrize(
    "override, message",
    [(["--epoch", "2"], "'epoch'"), (["--epochs", "two"], "epochs: invalid value 'two'"),
     (["--schedules", "step", "linear"], "schedules: invalid value 'linear' (peer linear (kind linear) cannot run in "
      "the mnist1d domain"), (["--schedules", "cosine_40"], "no peer of that name")],
)
def test_compare_schedules_rejects_bad_config(override, message, capsys):
    from engine.backends.mnist1d import CompareConfig
    from engine.config import load_config

    with pytest.raises(SystemExit) as stopped:
        load_config(CompareConfig, ["--config", str(CONFIG), *override])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_peers_and_oracle_end_to_end(tmp_path):
    finished = run_recipe(
        "--epochs", "3", "--seeds", "0", "--jobs", "1", "--checkpoint_every", "0", "--save_stage_ends", "false",
        "--num_samples", "2000", "--val_samples", "400",  # 20 updates per epoch: a smoke test
        "--schedules", "step", "slope", "sasa", "timm_plateau", "oracle", "--milestones", "1", "2",
        "--oracle_first_milestones", "1", "--oracle_gaps", "1", "--oracle_tails", "1",
        "--output_dir", str(tmp_path),
    )
    assert finished.returncode == 0, finished.stderr
    document = json.loads((tmp_path / "results.json").read_text())
    runs = {run["label"]: run for run in document["runs"]}
    assert list(runs) == ["step", "slope", "sasa", "timm_plateau", "oracle"]
    for run in runs.values():
        assert RUN_KEYS <= run.keys() and run["curves"]
    # the oracle's only grid point is StepDecay at 1, 2 over 3 epochs: the same run, bit for bit
    assert document["oracle"]["mnist1d"]["chosen"] == "1,2,3"
    assert runs["oracle"]["test_top1"] == runs["step"]["test_top1"]
    assert runs["oracle"]["decay_epochs"] == runs["step"]["decay_epochs"] == [1.0, 2.0]
    rows = {row["label"]: row for row in document["tables"]["mnist1d"]["rows"]}
    assert rows["oracle"]["saved_epochs"] == 0 and rows["oracle"]["oracle_fraction"] is None
    assert all(row["note"] for row in rows.values())
    assert "| timm_plateau | 1 |" in finished.stdout
    assert (tmp_path / "pareto.png").stat().st_size > 0 and (tmp_path / "results.md").exists()


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


def test_frontier_peers_and_paired_comparison_end_to_end(tmp_path):
    finished = run_recipe(
        "--epochs", "2", "--seeds", "0", "--jobs", "1", "--num_samples", "2000",  # 25 updates per epoch
        "--schedules", "step", "autodecay", "constant", "cosine", "wsd", "schedulefree", "--frontier_fractions", "0.4",
        "1.0", "--output_dir", str(tmp_path),
    )
    assert finished.returncode == 0, finished.stderr
    document = json.loads((tmp_path / "results.json").read_text())
    runs = {run["label"]: run for run in document["runs"]}
    assert runs["cosine_40"]["updates"] == runs["wsd_40"]["updates"] == 20  # 40% of 2 x 25 updates
    assert runs["cosine"]["updates"] == runs["wsd"]["updates"] == runs["schedulefree"]["updates"] == 50
    assert runs["schedulefree"]["epochs"] == 2 and runs["schedulefree_40"]["epochs"] == 1  # read off one run
    auto = runs["autodecay"]
    paired_runs = {run["peer"]: run for run in document["paired_runs"]}
    assert set(paired_runs) == {"cosine", "wsd"}
    for run in paired_runs.values():  # trained to AutoDecay's own length, same seed
        assert run["updates"] == auto["updates"] and run["seed"] == 0 and run["paired_with"] == "autodecay"
    paired = document["tables"]["mnist1d"]["paired"]["autodecay"]
    (line,) = paired["per_seed"]
    best = max(paired_runs.values(), key=lambda run: run["test_top1"])
    assert line["deficit"] == pytest.approx(best["test_top1"] - auto["test_top1"])
    assert paired["mean_deficit"] == line["deficit"] and paired["epochs_mean"] == auto["epochs"]
    rows = {row["label"]: row for row in document["tables"]["mnist1d"]["rows"]}
    assert rows["wsd_40"]["frontier"] == rows["wsd"]["frontier"] == "wsd" and rows["schedulefree_40"]["frontier"]
    assert rows["step"]["frontier"] == ""
    assert "against the frontier at its own length" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "pareto.png").stat().st_size > 0


def autodecay_run(seed: int, top1: float, epochs: float) -> dict:
    return {"peer": "autodecay", "task": "t", "seed": seed, "test_top1": top1, "epochs": epochs,
            "updates": round(epochs * 125)}


def rival(peer: str, seed: int, top1: float, epochs: float) -> dict:
    return {"peer": peer, "task": "t", "seed": seed, "test_top1": top1, "updates": round(epochs * 125)}


def test_paired_deficit_is_the_better_rival_minus_the_run_per_seed():
    from engine.backends.mnist1d import MNIST1D
    from engine.report import paired_checks, paired_comparison
    from engine.report_tables import paired_table

    runs = [autodecay_run(1, 98.6, 17.0), autodecay_run(0, 98.4, 18.0)]
    rivals = [rival("cosine", 0, 98.5, 18.0), rival("wsd", 0, 98.7, 18.0), rival("cosine", 1, 98.2, 17.0),
              rival("wsd", 1, 98.1, 17.0), rival("wsd", 1, 99.9, 30.0)]  # another length: not the pair
    summary = paired_comparison(runs, rivals, ["cosine", "wsd"], MNIST1D.SCALE, budget=30)
    assert [(line["seed"], line["best"]) for line in summary["per_seed"]] == [(0, "wsd"), (1, "cosine")]
    assert [line["deficit"] for line in summary["per_seed"]] == pytest.approx([0.3, -0.4])
    assert summary["mean_deficit"] == pytest.approx(-0.05) and summary["sd_deficit"] == pytest.approx(0.7 / 2**0.5)
    assert summary["epochs_mean"] == 17.5 and summary["top1_mean"] == pytest.approx(98.5)
    bounds = {"mean_deficit": (0.1, "<="), "epochs_mean": (17.0, "<="), "top1_mean": (0.0, ">=")}
    checks = paired_checks(summary, bounds, [], MNIST1D.SCALE)
    assert checks["mean_deficit"]["passed"] and not checks["epochs_mean"]["passed"] and "top1_mean" not in checks
    table = paired_table("autodecay", summary, checks, MNIST1D.SCALE)
    assert "| 0 | 18.0 | 98.40 | 98.50 | 98.70 | wsd | +0.30 |" in table and "FAILED" in table
    assert paired_comparison(runs, [], ["cosine", "wsd"], MNIST1D.SCALE, 30)["per_seed"] == []  # no rival trained


def test_budget_points_read_a_run_at_shares_of_the_budget():
    from types import SimpleNamespace

    from engine.backends.mnist1d import MNIST1D
    from engine.report import budget_point_runs, table_rows

    curves = [{"epoch": float(e), "updates": 125 * e, "test_top1": 90.0 + e / 10, "test_loss": 1.0 / e}
              for e in range(1, 31)]
    run = {"peer": "schedulefree", "label": "schedulefree", "task": "t", "seed": 3, "test_top1": 93.0,
           "epochs": 30.0, "updates": 3750, "decay_epochs": [], "curves": curves, "budget_fraction": 1.0,
           "paired_with": ""}
    fractions = [0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
    read_at = functools.partial(MNIST1D().read_at, SimpleNamespace(epochs=30))
    points = {point["label"]: point for point in budget_point_runs([run], fractions, read_at)}
    assert set(points) == {f"schedulefree_{p}" for p in (20, 30, 40, 50, 60, 80)}
    assert points["schedulefree_60"]["epochs"] == 18 and points["schedulefree_60"]["test_top1"] == pytest.approx(91.8)
    assert len(points["schedulefree_40"]["curves"]) == 12 and points["schedulefree_80"]["seed"] == 3
    step = {**run, "peer": "step", "label": "step"}
    rows = table_rows([run, *points.values(), step], ["schedulefree", "step"], MNIST1D.SCALE, budget=30)
    assert [row["label"] for row in rows][:2] == ["schedulefree_20", "schedulefree_30"]
    assert {row["label"]: row["frontier"] for row in rows}["schedulefree_40"] == "schedulefree"
    assert rows[-1]["label"] == "step" and rows[-1]["frontier"] == ""


@pytest.mark.slow  # generates MNIST-1D
def test_validation_split_is_the_last_training_samples_held_out_before_the_subset():
    from engine.config import ConfigError
    from engine.tasks import TASKS, make_task
    from engine.train_config import TrainConfig

    whole = TASKS["mnist1d_noisy"](TrainConfig())
    task = make_task(TrainConfig(task="mnist1d_noisy", val_samples=1000, train_subset=1500))
    assert len(task.val_targets) == 1000 and len(task.train_targets) == 1500
    assert (task.val_inputs == whole.train_inputs[-1000:]).all()
    assert (task.val_targets == whole.train_targets[-1000:]).all()  # the noisy labels, as they are
    clean = TASKS["mnist1d"](TrainConfig())
    assert 0.1 < (task.val_targets != clean.train_targets[-1000:]).float().mean() < 0.2
    assert (task.train_inputs == whole.train_inputs[:1500]).all()  # the subset: the first of the rest
    assert (task.test_targets == whole.test_targets).all()
    held_out = make_task(TrainConfig(val_samples=500))
    assert len(held_out.train_targets) == 7500 and (held_out.train_inputs == clean.train_inputs[:7500]).all()
    with pytest.raises(ConfigError, match="val_samples"):
        make_task(TrainConfig(val_samples=8000))


def test_schedules_that_read_an_evaluation_read_the_eval_metric():
    import torch
    from types import SimpleNamespace

    from engine.config import ConfigError
    from engine.peer_schedules import make_schedule
    from engine.peers import PEERS

    for metric, mode in (("val_top1", "max"), ("val_loss", "min")):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        schedule = make_schedule(SimpleNamespace(schedule="timm_plateau", decay_rate=0.1, num_stages=0, decay_shape="",
                                                 eval_metric=metric, val_samples=100))
        schedule.start(optimizer, 10, 100)
        assert schedule.scheduler.mode == mode
        for epoch in range(1, 9):  # the test set improves, the eval metric stays flat: a plateau
            schedule.after_epoch(epoch, 1.0, {"test_top1": 50.0 + 5 * epoch, "test_loss": 1.0 / epoch, metric: 0.5})
        assert schedule.stage == 1 and optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="val_samples"):  # no validation split: no eval metric
        schedule.after_epoch(9, 1.0, {"test_top1": 99.0})
    for name in ("timm_plateau", "plateau_eval", "autodecay_eval"):
        assert PEERS[name].reads_eval
        with pytest.raises(ConfigError, match="val_samples: needed by " + name):
            make_schedule(SimpleNamespace(schedule=name, val_samples=0, eval_metric="val_top1", decay_rate=0.1))


def test_eval_peers_val_metrics_and_envelope_end_to_end(tmp_path):
    finished = run_recipe(
        "--epochs", "3", "--seeds", "0", "--jobs", "2", "--num_samples", "2000", "--task", "mnist1d_noisy",
        "--val_samples", "400", "--train_subset", "768",  # 12 updates per epoch
        "--schedules", "autodecay", "autodecay_eval", "plateau_eval", "timm_plateau", "cosine", "wsd",
        "--frontier_fractions", "0.3", "1.0", "--paired_with", "autodecay", "autodecay_eval",
        "--output_dir", str(tmp_path),
    )
    assert finished.returncode == 0, finished.stderr
    document = json.loads((tmp_path / "results.json").read_text())
    runs = {run["label"]: run for run in document["runs"]}
    assert runs["wsd"]["updates"] == 3 * 12 and runs["cosine_30"]["updates"] == 11
    for run in runs.values():
        assert all({"val_top1", "val_loss"} <= line.keys() for line in run["curves"])
    lines = (tmp_path / "runs" / "wsd" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["val_top1"] for line in lines] == [line["val_top1"] for line in runs["wsd"]["curves"]]
    table = document["tables"]["mnist1d_noisy"]
    rows = {row["label"]: row for row in table["rows"]}
    best = max((rows[name] for name in ("cosine_30", "cosine", "wsd_30", "wsd")), key=lambda row: row["top1_mean"])
    assert table["envelope"]["best"]["top1_mean"] == best["top1_mean"]
    for row in rows.values():
        assert row["regret"] == pytest.approx(best["top1_mean"] - row["top1_mean"])
        assert {"waste", "envelope_deficit"} <= row.keys()
    assert set(table["paired"]) <= {"autodecay", "autodecay_eval"}
    markdown = (tmp_path / "results.md").read_text()
    assert "AutoDecay against the envelope" in markdown and "| autodecay_eval |" in markdown
    assert "| frontier | 30% (0.917 epochs) | 100% (3 epochs) |" in markdown
    assert (tmp_path / "pareto.png").stat().st_size > 0
    again = run_recipe(  # a later invocation reads the finished runs back and trains only what is new
        "--epochs", "3", "--seeds", "0", "--jobs", "1", "--num_samples", "2000", "--task", "mnist1d_noisy",
        "--val_samples", "400", "--train_subset", "768", "--schedules", "wsd", "cosine", "--frontier_fractions", "0.2",
        "1.0", "--output_dir", str(tmp_path),
    )
    assert again.returncode == 0, again.stderr
    assert "2 runs, 1 at once; 2 read back" in again.stdout  # wsd_20 and cosine_20 are new


def frontier_row(name: str, top1: float, epochs: float, peer: str = "") -> dict:
    return {"label": name, "peer": peer or name, "top1_mean": top1, "epochs_mean": epochs}


def test_regret_waste_and_envelope_deficit_from_seed_means():
    from engine.backends.mnist1d import MNIST1D
    from engine.report import envelope_scores
    from engine.report_tables import envelope_table

    rows = [frontier_row("cosine_20", 95.0, 6, "cosine"), frontier_row("cosine", 98.0, 30),
            frontier_row("wsd_40", 97.95, 12, "wsd"), frontier_row("wsd", 98.2, 30),
            frontier_row("schedulefree_20", 99.5, 6, "schedulefree"),  # read off one run: not a fixed-length point
            frontier_row("autodecay", 97.0, 18.0), frontier_row("autodecay_eval", 98.15, 10.0),
            frontier_row("early", 90.0, 3.0)]
    scale = MNIST1D.SCALE
    envelope = envelope_scores(rows, ["cosine", "wsd"], 0.3, scale)
    assert envelope["best"]["label"] == "wsd" and envelope["shortest_good"]["label"] == "wsd_40"
    scores = envelope["scores"]
    assert scores["autodecay"]["regret"] == pytest.approx(1.2)
    assert scores["autodecay"]["waste"] == pytest.approx(18.0 / 12)
    assert scores["autodecay"]["envelope_deficit"] == pytest.approx(0.95)  # wsd_40 is the best point <= 18 epochs
    assert scores["autodecay_eval"]["envelope_deficit"] == pytest.approx(95.0 - 98.15)  # above the envelope
    assert scores["early"]["envelope_deficit"] is None and scores["early"]["waste"] == pytest.approx(0.25)
    assert scores["wsd"]["regret"] == 0 and scores["wsd"]["envelope_deficit"] == 0
    assert envelope_scores(rows, ["cosine", "wsd"], 0.1, scale)["shortest_good"]["label"] == "wsd"
    assert envelope_scores([frontier_row("autodecay", 97.0, 18.0)], ["cosine", "wsd"], 0.1, scale) == {}
    for row in rows:
        row.update(scores[row["label"]])
    table = envelope_table(rows, ["autodecay", "autodecay_eval"], envelope, scale)
    assert "| autodecay | 97.00 | 18.0 | +1.20 | 1.50 | +0.95 |" in table and "early" not in table
