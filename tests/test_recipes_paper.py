"""Smoke tests of the paper's recipes on tiny data: learning_stages, mechanism, a 2-process run, a resume,
and the ImageNet configs' code path on a local dataset with ImageNet's schema (image + label)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_mechanism_smoke(tmp_path):
    run(
        sys.executable, str(RECIPES / "mechanism.py"), "--config", str(CONFIGS / "mechanism.yaml"),
        "--num_samples", "500", "--epochs", "2", "--milestones", "1", "--gd_epochs", "2",
        "--gd_grad_accum_steps", "2", "--seeds", "0", "--jobs", "1", "--output_dir", str(tmp_path),
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [run["method"] for run in summary["runs"]] == ["sgd_step", "gd_step", "constant"]
    for run_summary in summary["runs"]:
        assert len(run_summary["stages"]) == 2  # constant: the spans of StepDecay's stages
        for stage in run_summary["stages"]:
            assert 0 <= stage["end_test_top1_easy_only"] <= 100 and 0 <= stage["end_test_top1_complex_only"] <= 100
    assert (tmp_path / "mechanism.png").stat().st_size > 0
    assert "complex-only" in (tmp_path / "mechanism.md").read_text()


@pytest.mark.slow
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


@pytest.mark.slow
def test_full_batch_needs_equal_micro_batches(tmp_path):
    from engine.config import ConfigError
    from engine.loop import train_run
    from engine.train_config import TrainConfig

    cfg = TrainConfig(num_samples=1000, full_batch=True, grad_accum_steps=7, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        train_run(cfg)


@pytest.mark.slow
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


@pytest.mark.slow
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
