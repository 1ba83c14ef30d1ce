"""The length replay (`recipes/replay_lengths.py`): a stopping rule judged on a finished benchmark's WSD trunk, its
length read as WSD's and its score off the same seed's WSD frontier, beside the per-seed oracle."""
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
pytestmark = pytest.mark.slow  # imports the recipes' engine (Accelerate, timm): seconds, not the inner loop

PER_EPOCH, BUDGET = 10, 30
FRONTIER = {0.2: 90.0, 0.4: 95.0, 0.6: 93.0, 0.8: 92.0, 1.0: 91.0}  # budget share -> test top-1


def peaked(epoch: int) -> float:
    """A validation accuracy that rises to 80 at epoch 6, then falls a point an epoch (memorisation)."""
    return 50.0 + 5 * epoch if epoch <= 6 else 80.0 - (epoch - 6)


def wsd_runs(seed: int, validation=peaked) -> list[dict]:
    """A seed's WSD runs at every share; the full-budget one with its epochs (a loss falling in a straight line, so
    only the evaluations can end the stable phase)."""
    curves = [{"epoch": float(e), "updates": e * PER_EPOCH, "train_loss": 2.0 - 0.05 * e, "val_top1": validation(e)}
              for e in range(1, BUDGET + 1)]
    return [{"peer": "wsd", "task": "mnist1d", "seed": seed, "paired_with": "", "budget_fraction": share,
             "epochs": share * BUDGET, "test_top1": score, "updates": int(share * BUDGET * PER_EPOCH),
             "updates_per_epoch": PER_EPOCH, "curves": curves if share == 1.0 else []}
            for share, score in FRONTIER.items()]


@pytest.fixture(scope="module")
def replayer():
    from engine.backends.mnist1d import MNIST1D
    from engine.config import ConfigError
    from engine.length_replay import replay_task, score_at
    from replay_lengths import main
    return SimpleNamespace(scale=MNIST1D.SCALE, ConfigError=ConfigError, replay_task=replay_task, score_at=score_at,
                           main=main)


def test_a_peak_ends_the_stable_phase_and_the_length_is_read_off_the_frontier(replayer):
    trained = {"peer": "autodecay_eval", "task": "mnist1d", "seed": 1, "paired_with": "", "epochs": 13.75,
               "test_top1": 94.0}
    result = replayer.replay_task(wsd_runs(0) + wsd_runs(1) + [trained], "mnist1d", "val_top1", replayer.scale, {},
                                  max_epochs=15)
    assert [seed["trained"] for seed in result["seeds"]] == [None, (13.75, 94.0)]
    for seed in result["seeds"]:
        # Medians of three peak at evaluation 7 (79); a third of the evaluations without a new best first reaches
        # 4 at evaluation 11. The cooldown makes it 11 / 0.8 = 13.75 epochs, between WSD's 12 (95) and 18 (93).
        assert seed["stable_end_epoch"] == 11.0
        assert seed["epochs"] == pytest.approx(13.75)
        assert seed["score"] == pytest.approx(95.0 - 2.0 * 1.75 / 6)
        assert (seed["oracle_epochs"], seed["oracle_score"]) == (12.0, 95.0)
    assert result["oracle_score_mean"] == 95.0


def test_a_rising_metric_runs_to_the_budget(replayer):
    runs = wsd_runs(0, validation=lambda epoch: 50.0 + epoch)
    seed = replayer.replay_task(runs, "mnist1d", "val_top1", replayer.scale, {}, max_epochs=BUDGET)["seeds"][0]
    # The stable phase's share of the budget ends it: WSD at the budget.
    assert seed["stable_end_epoch"] == 24.0 and seed["epochs"] == BUDGET and seed["score"] == 91.0
    assert (seed["oracle_epochs"], seed["oracle_score"]) == (12.0, 95.0)


def test_a_detector_setting_moves_the_decision(replayer):
    result = replayer.replay_task(wsd_runs(0), "mnist1d", "val_top1", replayer.scale, {"eval_patience": 6}, 15)
    seed = result["seeds"][0]
    assert seed["stable_end_epoch"] == 13.0  # 6 evaluations after the best at 7


def test_outside_the_frontier_is_flagged_not_extrapolated(replayer):
    points = [(6.0, 90.0), (12.0, 95.0)]
    assert replayer.score_at(points, 3.0) == (90.0, False)
    assert replayer.score_at(points, 9.0) == (92.5, True)


@pytest.mark.parametrize("runs, settings, named", [
    ([run for run in wsd_runs(0) if run["budget_fraction"] != 1.0], {}, "no full-budget WSD run"),
    (wsd_runs(0), {"decay_shape": "step"}, "decay_shape='step'"),
    (wsd_runs(0), {"cooldown_fraction": 0.3}, "cooldown_fraction=0.3"),
])
def test_what_cannot_be_read_off_the_frontier_is_an_error_naming_it(replayer, runs, settings, named):
    with pytest.raises(replayer.ConfigError, match=named):
        replayer.replay_task(runs, "mnist1d", "val_top1", replayer.scale, settings, 15)


def test_the_recipe_writes_json_markdown_and_a_figure(replayer, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"config": {"task": "mnist1d", "tasks": [], "epochs": BUDGET,
                                              "eval_metric": "val_top1"}, "runs": wsd_runs(0) + wsd_runs(1)}))
    summary = replayer.main([str(results), "--max_epochs", "15", "--setting", "eval_patience=6"])
    assert summary["settings"] == {"eval_patience": 6}
    written = json.loads((tmp_path / "length_replay.json").read_text())
    assert [s["stable_end_epoch"] for s in written["replays"][0]["seeds"]] == [13.0, 13.0]
    assert "| mnist1d | **mean** |" in (tmp_path / "length_replay.md").read_text()
    assert (tmp_path / "length_replay.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="cooldown_fraction"):
        replayer.main([str(results), "--setting", "cooldown_fraction=0.3"])
