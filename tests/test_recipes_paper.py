"""Smoke tests of the paper's recipes on tiny data: learning_stages, the noise dose-response, mechanism, a
2-process run, a resume, and the ImageNet configs' code path on a local dataset with ImageNet's schema (image
+ label); and the definitions of the statistics they report."""
import math
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the recipes, not the inner loop (`pytest -m "not slow"`)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONFIGS = RECIPES / "configs"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(RECIPES), str(ROOT), os.environ.get("PYTHONPATH")])),
}
sys.path.insert(0, str(RECIPES))


def run(*command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    finished = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished


def test_learning_stages_smoke(tmp_path):
    finished = run(
        sys.executable, str(RECIPES / "learning_stages.py"), "--config", str(CONFIGS / "learning_stages.yaml"),
        "--num_samples", "1000", "--batch_size", "100", "--epochs", "4", "--milestones", "2", "--gd_epochs", "4",
        "--gd_grad_accum_steps", "2", "--before", "1", "--after", "1", "--seeds", "0", "--jobs", "1",
        "--output_dir", str(tmp_path),
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    methods = [run["method"] for run in summary["runs"]]
    assert methods == ["sgd_step", "gd_step", "autodecay"]
    sgd, gd = summary["runs"][0], summary["runs"][1]
    assert sgd["seed"] == 0 and sgd["decay_epochs"] == [2.0] and sgd["updates"] == 4 * 8
    assert gd["full_batch"] and gd["updates"] == 4 and gd["decay_epochs"] == [2.0]  # milestones x 4/4
    for run_summary in (sgd, gd):
        (decay,) = run_summary["decays"]
        assert {"epoch", "loss_ratio", "acc_jump_pp"} <= decay.keys()
        assert isinstance(decay["loss_ratio"], float) and isinstance(decay["acc_jump_pp"], float)
    assert (tmp_path / "learning_stages.png").stat().st_size > 0
    assert (tmp_path / "sgd_step" / "seed0" / "stage_ends" / "stage0" / "model.safetensors").exists()
    assert "| SGD, StepDecay |" in finished.stdout


@pytest.mark.slow  # imports the recipe (timm, Accelerate): seconds
def test_transition_ratio_definition():
    from learning_stages import transition

    # loss falls 0.1 per epoch for 5 epochs, then 0.5 in the 2 epochs after the decay at epoch 6
    losses = [2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.25, 1.0]
    curves = [{"epoch": float(e + 1), "train_loss": loss, "test_top1": 50.0 + e} for e, loss in enumerate(losses)]
    result = transition(curves, 6.0, before=5, after=2)
    assert result["loss_ratio"] == pytest.approx(0.5 / 0.2)
    assert result["acc_jump_pp"] == pytest.approx(2.0) and result["acc_trend_pp"] == pytest.approx(2.0)
    assert transition(curves, 7.0, before=5, after=2)["loss_ratio"] is None  # run too short after


def test_transition_log_ratio_definition():
    """S is 0 when the loss keeps falling at its log-rate, ln(k) for an extra k-fold fall after the decay,
    negative when the decay slows the fall; finite when the trend before is flat."""
    from engine.study_statistics import transition_log_ratio

    steady = [math.exp(-0.01 * u) for u in range(100)]  # -1% per update throughout
    assert transition_log_ratio(steady, 0.5, 0.1, 0.02)["log_ratio"] == pytest.approx(0.0, abs=1e-9)
    dropped = [loss / 3 if u >= 50 else loss for u, loss in enumerate(steady)]  # a 3x fall at the decay
    assert transition_log_ratio(dropped, 0.5, 0.1, 0.02)["log_ratio"] == pytest.approx(math.log(3), abs=1e-9)
    slowed = [math.exp(-0.01 * min(u, 50)) for u in range(100)]  # flat after the decay
    assert transition_log_ratio(slowed, 0.5, 0.1, 0.02)["log_ratio"] < 0
    flat_then_drop = [1.0] * 50 + [0.5] * 50  # no trend before: the old ratio divided by zero
    result = transition_log_ratio(flat_then_drop, 0.5, 0.1, 0.02)
    assert result["log_ratio"] == pytest.approx(math.log(2)) and result["loss_before_decay"] == 1.0


def test_spike_criterion():
    from engine.study_statistics import first_spike

    falling = [1.0 / (1 + 0.1 * u) for u in range(200)]
    assert first_spike(falling, 0.02, 0.1, 2.0) is None
    spiked = list(falling)
    spiked[120:124] = [3 * falling[119]] * 4  # a bin of 4 updates at 3x: a spike at 62% of the run
    spike = first_spike(spiked, 0.02, 0.1, 2.0)
    assert spike["share"] == pytest.approx(0.62) and spike["factor"] > 2
    early = list(falling)
    early[4:8] = [5.0] * 4  # within the first 10%: ignored
    assert first_spike(early, 0.02, 0.1, 2.0) is None


def test_bootstrap_and_trend_statistics():
    from engine.study_statistics import bootstrap_interval, slope_interval, spearman_trend

    low, high = bootstrap_interval([1.0, 2.0, 3.0, 4.0, 5.0], 2000, seed=1)
    assert 1.0 < low < 3.0 < high < 5.0 and (low, high) == bootstrap_interval([1.0, 2.0, 3.0, 4.0, 5.0], 2000, seed=1)
    assert bootstrap_interval([2.0, 2.0, 2.0], 100) == (2.0, 2.0)
    doses = [d for d in range(5) for _ in range(5)]
    rising = [d + 0.1 * k for d in range(5) for k in range(5)]
    trend = spearman_trend(doses, rising, 2000)
    assert trend["rho"] > 0.9 and trend["p_value"] < 0.001 and trend["count"] == 25
    assert spearman_trend(doses, [float(k) for _ in range(5) for k in range(5)], 2000)["p_value"] > 0.5  # no trend
    slope = slope_interval({d: [2 * d + 0.1 * k for k in range(5)] for d in range(5)}, 500)
    assert slope["slope"] == pytest.approx(2.0) and slope["low"] <= 2.0 <= slope["high"]


def test_noise_dose_response_smoke(tmp_path):
    """A sweep on tiny settings (momentum x gradient clip, 2 each; batch sizes up to the full training set, each
    with its own number of updates, the schedule in shares of the run): the statistic, the stability verdicts, the
    sweep's table and choice, the figure; run again, every finished run is read back, none trained."""
    command = (
        sys.executable, str(RECIPES / "noise_dose_response.py"), "--config", str(CONFIGS / "noise_dose_response.yaml"),
        "--num_samples", "500", "--train_subset", "0", "--batch_sizes", "25", "400", "--seeds", "0", "--lrs", "0.1",
        "--momenta", "0", "0.9", "--warmup_fractions", "0.2", "--clip_grad_norms", "0", "0.5", "--min_epochs", "2",
        "--min_updates", "10", "--micro_batch", "200", "--resamples", "200", "--jobs", "1",
        "--output_dir", str(tmp_path),
    )
    finished = run(*command)
    summary = json.loads((tmp_path / "summary.json").read_text())
    runs = {(r["momentum"], r["clip_grad_norm"], r["batch_size"]): r for r in summary["runs"]}
    assert len(runs) == len(summary["runs"]) == 8 and {r["seed"] for r in summary["runs"]} == {0}
    assert runs[0.9, 0, 25]["updates"] == 32 and not runs[0.9, 0, 25]["full_batch"]  # 2 epochs of 16
    full = runs[0.9, 0, 400]
    assert full["updates"] == 10 and full["full_batch"]  # min_updates; 400 = all training samples
    assert full["noise_scale"] == pytest.approx(0.1) and runs[0.9, 0, 25]["noise_scale"] == pytest.approx(1.6)
    run_summary = json.loads((tmp_path / "lr0.1_m0.9_w0.2" / "batch400" / "seed0" / "summary.json").read_text())
    assert run_summary["updates"] == 10 and len(run_summary["update_losses"]) == 10
    assert run_summary["decay_updates"] == [5, 8] and run_summary["decay_epochs"] == [5.0, 8.0]  # shares 0.5, 0.75
    assert run_summary["warmup_updates"] == 2 and run_summary["config"]["momentum"] == 0.9
    assert json.loads((tmp_path / "lr0.1_m0_w0.2" / "batch25" / "seed0" / "summary.json").read_text())[
        "config"]["momentum"] == 0.0
    clipped = json.loads((tmp_path / "lr0.1_m0.9_w0.2_c0.5" / "batch25" / "seed0" / "summary.json").read_text())
    assert clipped["clip_grad_norm"] == 0.5 and 0 < clipped["clipped_updates"] <= clipped["updates"]
    assert "clip_grad_norm" not in run_summary  # a run without a clip keeps its earlier summary and folder
    for r in summary["runs"]:
        assert r["stable"] == (not r["failures"]) and math.isfinite(r["log_ratio"]) and not r["reused"]
    assert len(summary["by_setting"]) == 4 and summary["chosen"] in set(summary["by_setting"]) | {None}
    cells = summary["by_setting"]["lr 0.1, momentum 0.9, warmup 0.2"]["cells"]
    assert [cell["batch_size"] for cell in cells] == [25, 400]
    assert "| lr | momentum | warmup | clip | unstable runs |" in finished.stdout
    assert "| lr 0.1, momentum 0.9, warmup 0.2 | 400 | 0.1 | 10 (10) |" in finished.stdout
    assert (tmp_path / "noise_dose_response.png").stat().st_size > 0
    again = run(*command)
    assert "8 finished before, read back; 0 to train" in again.stdout
    rerun = json.loads((tmp_path / "summary.json").read_text())
    assert all(r["reused"] for r in rerun["runs"]) and rerun["table"] == summary["table"]


@pytest.mark.distributed
def test_noise_dose_response_two_processes(tmp_path, torchrun):
    """Data-parallel runs over 2 processes: the full batch split into equal micro-batches per process, every
    update's loss the mean over both, the study written once."""
    finished = torchrun(
        RECIPES / "noise_dose_response.py", "--config", CONFIGS / "noise_dose_response.yaml", "--num_samples", "500",
        "--train_subset", "0", "--lrs", "0.1", "--batch_sizes", "50", "400", "--seeds", "0", "--min_epochs", "1",
        "--min_updates", "6", "--micro_batch", "100", "--resamples", "100", "--output_dir", tmp_path,
        env={"PYTHONPATH": ENV["PYTHONPATH"]},
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {(r["batch_size"], r["updates"]) for r in summary["runs"]} == {(50, 8), (400, 6)}
    # the study's setting: its clip runs on each process's optimizer, on the gradient both processes share
    run_summary = json.loads((tmp_path / "lr0.1_m0.9_w0.2_c1" / "batch400" / "seed0" / "summary.json").read_text())
    assert run_summary["config"]["grad_accum_steps"] == 2 and run_summary["config"]["full_batch"]  # 2 x 2 x 100
    assert len(run_summary["update_losses"]) == 6 and run_summary["clip_grad_norm"] == 1.0
    assert finished.stdout.count("| lr 0.1, momentum 0.9, warmup 0.2, clip 1 | 400 |") == 1


@pytest.mark.slow  # imports the recipe (timm, Accelerate): seconds
def test_dose_response_lists_every_unstable_run():
    """The criterion as the study applies it: a spike (over the floor), a non-finite loss, a loss before the first
    decay over 3x the smallest batch's at the same setting and seed; a near-zero loss that doubles passes."""
    from noise_dose_response import DoseResponseConfig, choose_setting, measure, statistics

    cfg = DoseResponseConfig(lrs=[0.1], seeds=[0], resamples=100)
    name = "lr 0.1, momentum 0.9, warmup 0.05"
    steady = [2.3 * math.exp(-0.01 * u) for u in range(100)]  # 0.14 before the decay at update 50
    spiked = steady[:60] + [3 * steady[59]] * 2 + steady[62:]  # 3x, +0.2 nats at 62%
    tiny = [0.001 * loss for loss in steady[:80]] + [0.01] * 20  # near 0.0003, then 0.01: 30x but +0.01 nats
    dropped = [2.9 * loss / (2 if u >= 50 else 1) for u, loss in enumerate(steady)]  # 2.9x before the decay
    series = {32: steady, 64: dropped, 128: [3.1 * loss for loss in steady], 256: spiked,
              512: steady[:1] + tiny[1:], 8000: steady[:60] + [float("nan")] * 40}
    results = [{"setting": name, "lr": 0.1, "seed": 0, "batch_size": size, "noise_scale": 0.1 * 8000 / size,
                "updates": 100, "epochs": 1.0, "full_batch": size == 8000, "test_top1": 90.0, "losses": losses}
               for size, losses in series.items()]
    runs = measure(results, cfg)
    assert [r["stable"] for r in runs] == [True, True, False, False, True, False]
    assert "3 x batch 32's" in runs[2]["failures"][0] and "spike at 62%" in runs[3]["failures"][0]
    assert runs[5]["failures"] == ["non-finite loss"] and runs[4]["peak_rise"] > 2  # a rise, under the floor
    cells = statistics(runs, cfg)[name]["cells"]
    assert [(c["stable"], c["runs"]) for c in cells] == [(1, 1), (1, 1), (0, 1), (0, 1), (1, 1), (0, 1)]
    assert cells[2]["log_ratio_mean"] is None and cells[2]["failures"] == {0: runs[2]["failures"]}
    assert cells[3]["loss_before_decay_median"] is not None  # measured on every finite run, stable or not
    assert choose_setting(statistics(runs, cfg)) is None  # unstable runs: not a setting the sweep can choose


def test_mechanism_smoke(tmp_path):
    """Calibration on its own data and seed, the three methods per stage, the predictions with outcomes."""
    run(
        sys.executable, str(RECIPES / "mechanism.py"), "--config", str(CONFIGS / "mechanism.yaml"),
        "--num_samples", "500", "--epochs", "2", "--milestones", "1", "--gd_epochs", "2",
        "--gd_grad_accum_steps", "2", "--seeds", "0", "--jobs", "1", "--calibration_epochs", "1",
        "--output_dir", str(tmp_path),
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [run["method"] for run in summary["runs"]] == ["sgd_step", "constant", "gd_step"]
    for run_summary in summary["runs"]:
        assert len(run_summary["stages"]) == 2  # constant: the spans of StepDecay's stages
        for stage in run_summary["stages"]:
            assert 0 <= stage["end_test_top1_easy_only"] <= 100 and 0 <= stage["end_test_top1_complex_only"] <= 100
    calibration = summary["calibration"]
    assert calibration["data_seed"] == 7 and calibration["seed"] == 100  # not the measurement's
    assert calibration["complex_alone_learnable"] == (calibration["complex_alone_top1"] >= 90.0)
    assert (tmp_path / "calibration" / "complex_alone" / "summary.json").exists()
    alone = json.loads((tmp_path / "calibration" / "complex_alone" / "summary.json").read_text())["config"]
    assert alone["easy_fraction"] == 0.0 and alone["lr"] == 0.01 and alone["data_seed"] == 7
    predictions = summary["predictions"]
    assert set(predictions) == {"P1", "P2", "P3", "verdict"}
    supported = all(predictions[key]["holds"] for key in ("P1", "P2", "P3"))
    assert predictions["verdict"] == ("supported" if supported else "not supported")
    table = (tmp_path / "mechanism.md").read_text()
    assert "complex-only" in table and "Calibration" in table and f"**{predictions['verdict']}**" in table
    assert (tmp_path / "mechanism.png").stat().st_size > 0


@pytest.mark.slow  # imports the recipe (timm, Accelerate): seconds
def test_mechanism_stage0_share():
    """The share of the final complex-only gain over chance (10%) reached by the end of stage 0."""
    from mechanism import stage0_share

    stages = [{"end_test_top1_complex_only": value} for value in (30.0, 80.0, 90.0)]
    assert stage0_share(stages) == pytest.approx(20 / 80)
    assert stage0_share([{"end_test_top1_complex_only": v} for v in (11.0, 12.0, 13.0)]) is None  # never learned


@pytest.mark.distributed
def test_two_processes_full_batch(tmp_path, torchrun):
    """Full-batch GD data-parallel over 2 processes (gloo): equal micro-batches, one update per epoch."""
    finished = torchrun(
        RECIPES / "train.py", "--num_samples", "1000", "--epochs", "3", "--milestones", "2", "--full_batch",
        "--grad_accum_steps", "4", "--output_dir", str(tmp_path), "--verbose", "false", env=ENV,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["updates"] == 3 and summary["updates_per_epoch"] == 1 and summary["decay_epochs"] == [2.0]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "checkpoint" / "model.safetensors").exists()


def test_full_batch_needs_equal_micro_batches(tmp_path):
    from engine.config import ConfigError
    from engine.loop import train_run
    from engine.train_config import TrainConfig

    cfg = TrainConfig(num_samples=1000, full_batch=True, grad_accum_steps=7, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        train_run(cfg)


def test_resume_continues_exactly(tmp_path):
    """A run stopped after epoch 3 and resumed matches one that never stopped, decays and stage ends included."""
    from engine.loop import train_run
    from engine.train_config import TrainConfig

    shared = dict(num_samples=1000, batch_size=100, epochs=4, milestones=[2], verbose=False)
    whole = train_run(TrainConfig(**shared, schedule="step", output_dir=str(tmp_path / "whole")))
    broken = TrainConfig(**shared, schedule="step", output_dir=str(tmp_path / "broken"), stop_after_epoch=3)
    first = train_run(broken)
    assert not first["complete"] and len(first["curves"]) == 3
    resumed = train_run(TrainConfig(**{**broken.__dict__, "stop_after_epoch": 0, "resume": True}))
    assert resumed["resumed"] and resumed["complete"]
    strip = lambda curves: [{k: v for k, v in line.items() if k != "seconds"} for line in curves]  # noqa: E731
    assert strip(resumed["curves"]) == strip(whole["curves"])
    assert resumed["decay_epochs"] == whole["decay_epochs"] == [2.0]
    assert [end["stage"] for end in resumed["stage_ends"]] == [0, 1]
    lines = (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1.0, 2.0, 3.0, 4.0]


def make_imagenet_like(folder: Path, per_split: dict) -> Path:
    """Parquet files with ImageNet-1k's schema: `image` (an Image) and `label` (a ClassLabel)."""
    import datasets
    import numpy as np
    from PIL import Image

    labels = datasets.ClassLabel(names=["tench", "goldfish", "shark"])
    features = datasets.Features({"image": datasets.Image(), "label": labels})
    rng = np.random.default_rng(0)
    for split, count in per_split.items():
        images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(count)]
        columns = {"image": images, "label": [i % 3 for i in range(count)]}
        dataset = datasets.Dataset.from_dict(columns, features=features)
        (folder / "data").mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


@pytest.mark.parametrize("config, streaming", [("imagenet_resnet50_step.yaml", "false"),
                                               ("imagenet_resnet50_autodecay.yaml", "true")])
def test_imagenet_config_on_local_data(tmp_path, config, streaming):
    """The ImageNet configs' code path (hub task, timm transforms, timm model, checkpoints), with the
    dataset, model and sizes overridden to run here."""
    from engine.config import load_config
    from engine.loop import train_run
    from engine.train_config import TrainConfig

    data = make_imagenet_like(tmp_path / "tiny_imagenet", {"train": 24, "validation": 9})
    cfg = load_config(TrainConfig, [
        "--config", str(CONFIGS / config), "--dataset", str(data), "--num_classes", "0", "--model", "test_resnet",
        "--image_size", "32", "--batch_size", "8", "--epochs", "2", "--milestones", "1", "--workers", "0",
        "--mixed_precision", "no", "--streaming", streaming, "--train_samples", "24", "--shuffle_buffer", "16",
        "--eval_batch_size", "4", "--output_dir", str(tmp_path / "run"), "--verbose", "false",
    ])
    assert cfg.task == "hub" and cfg.momentum == 0.9 and cfg.weight_decay == 1e-4 and cfg.lr_reference_batch == 256
    summary = train_run(cfg)
    assert summary["updates_per_epoch"] == 3 and 0 <= summary["test_top1"] <= 100
    assert summary["epochs"] <= 2 and (tmp_path / "run" / "checkpoint" / "model.safetensors").exists()
    assert (tmp_path / "run" / "stage_ends" / "stage0").is_dir()


@pytest.mark.slow  # imports the engine (timm, MNIST-1D): seconds
@pytest.mark.parametrize(
    "argv, message",
    [(["--learning_rate", "0.1"], "'learning_rate'"), (["--model", "resnet5000"], "model: invalid value 'resnet5000'"),
     (["--mixed_precision", "fp8"], "mixed_precision: invalid value 'fp8'"), (["--epochs"], "epochs: missing value")],
)
def test_bad_config_names_the_key(argv, message, capsys):
    from engine.config import load_config
    from engine.train_config import TrainConfig

    with pytest.raises(SystemExit):
        load_config(TrainConfig, argv)
    assert message in capsys.readouterr().err
