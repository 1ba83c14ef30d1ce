"""The transfer study (recipes/transfer.py) on tiny data: stage checkpoints -> source top-1, linear probe
and fine-tune -> summary, table and figure; its comparisons (the primary one named in advance, Holm's
correction for the others, the smallest detectable difference); and its bad inputs (missing checkpoint,
target without the label column, keys a target may not set, an unknown primary target)."""
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # the recipes, not the inner loop (`pytest -m "not slow"`)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONFIGS = RECIPES / "configs"
sys.path.insert(0, str(RECIPES))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY = ["--num_samples", "600", "--batch_size", "50", "--finetune_epochs", "1", "--probe_steps", "30"]
REST = "{name: rest, classes: [5, 6, 7, 8, 9]}"


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """A tiny StepDecay run on MNIST-1D digits 0-4 with two stage-end checkpoints (epochs 1 and 2)."""
    from engine.loop import train_run
    from engine.train_config import TrainConfig

    folder = tmp_path_factory.mktemp("source")
    torch.set_num_threads(1)
    cfg = TrainConfig(num_samples=600, classes=[0, 1, 2, 3, 4], batch_size=50, epochs=2, milestones=[1],
                      checkpoint_every=0, verbose=False, output_dir=str(folder))
    train_run(cfg)
    return folder


def test_full_path(source_run, tmp_path):
    """Given run folders: every stage's source top-1 (equal to the run's own evaluation at that epoch, so
    the checkpoint was loaded whole), probe and fine-tune per target and seed, summary, table and figure."""
    import transfer

    out = tmp_path / "study"
    transfer.main(["--source_runs", str(source_run), "--seeds", "0", "1", "--targets", REST,
                   "{name: rest_few, classes: [5, 6, 7, 8, 9], train_subset: 60}", *TINY, "--output_dir", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    run_metrics = [json.loads(line) for line in (source_run / "metrics.jsonl").read_text().splitlines()]
    assert [stage["stage"] for stage in summary["stages"]] == [0, 1]
    for stage, line in zip(summary["stages"], run_metrics):
        assert stage["epochs"] == [line["epoch"]]
        assert stage["source_top1"]["values"] == pytest.approx([line["test_top1"]] * 2)
        for target in ("rest", "rest_few"):
            for method in ("linear_probe", "finetune"):
                cell = stage["targets"][target][method]
                assert cell["seeds"] == [0, 1] and len(cell["values"]) == 2 and 0 <= cell["mean"] <= 100
                assert cell["sd"] >= 0
    # the probe is deterministic: the same source run gives the same probe whatever the seed
    probe = summary["stages"][1]["targets"]["rest"]["linear_probe"]
    assert probe["values"][0] == probe["values"][1] and probe["mean"] > 20  # 5 classes: chance is 20%
    paired = summary["stages"][0]["targets"]["rest"]["finetune"]["minus_last"]  # stage 0 - stage 1, per seed
    last, first = (summary["stages"][k]["targets"]["rest"]["finetune"]["values"] for k in (1, 0))
    assert paired["values"] == pytest.approx([a - b for a, b in zip(first, last)])
    assert summary["stages"][1]["targets"]["rest"]["finetune"]["minus_last"] is None
    init = summary["random_init"]
    assert init["stage"] == "init" and init["source_top1"] is None and set(init["targets"]) == {"rest", "rest_few"}
    assert len(summary["results"]) == 2 * 3 * 2 * 2  # seeds x (2 stages + init) x targets x methods
    finetuned = out / "finetune" / "rest" / "run0" / "stage1" / "seed1" / "summary.json"  # runs by index: no clashes
    assert json.loads(finetuned.read_text())["config"]["init_from"].endswith("stage1")
    table = (out / "transfer.md").read_text()
    assert "| random init |" in table and "rest: linear probe" in table and "± " in table and "minus stage 1" in table
    assert (out / "transfer.png").stat().st_size > 0
    # the primary comparison (no primary_target: the first target; linear probe), first and uncorrected
    primary, *others = summary["comparisons"]
    assert primary["primary"] and (primary["target"], primary["method"]) == ("rest", "linear_probe")
    assert (primary["stage"], primary["against"]) == (0, 1)
    assert primary["p_holm"] == primary["p_value"] or math.isnan(primary["p_value"])  # uncorrected
    assert len(others) == 3 and not any(row["primary"] for row in others)
    finetune_rest = next(row for row in others if (row["target"], row["method"]) == ("rest", "finetune"))
    assert finetune_rest["mean"] == pytest.approx(paired["mean"]) and finetune_rest["n"] == 2
    assert summary["source_check"]["source_top1_by_stage"] == pytest.approx(
        [stage["source_top1"]["mean"] for stage in summary["stages"]])
    assert "**primary: rest, linear probe, stage 0 - stage 1**" in table and "Source top-1 at the stage ends" in table


def test_offline_config_trains_its_source(tmp_path):
    """The shipped offline pair's config, shrunk: the source is trained here, then transferred."""
    import transfer

    out = tmp_path / "offline"
    result = transfer.main(["--config", str(CONFIGS / "transfer_offline.yaml"), *TINY, "--epochs", "2",
                            "--milestones", "1", "--seeds", "0", "--methods", "linear_probe", "--output_dir", str(out)])
    assert (out / "source" / "seed0" / "stage_ends" / "stage1" / "model.safetensors").exists()
    assert [stage["stage"] for stage in result["stages"]] == [0, 1]
    assert set(result["stages"][0]["targets"]) == {"digits5-9", "digits5-9_500"}
    assert {r["method"] for r in result["results"]} == {"linear_probe"}


def synthetic_results(effects: dict, seeds: int = 5) -> list[dict]:
    """Records as the study writes them: 3 stages, per (target, method) a stage-0 effect `effects[...]`
    over the last stage (points) plus a seed-dependent wobble; stage 1 equals the last stage."""
    results = []
    for (target, method), effect in effects.items():
        for seed in range(seeds):
            base = 80.0 + seed
            for stage, top1 in ((0, base + effect + 0.5 * (-1) ** seed), (1, base), (2, base)):
                results.append({"source_run": f"run{seed}", "seed": seed, "stage": stage, "epoch": 10.0 * (stage + 1),
                                "target": target, "method": method, "source_top1": 90.0 + stage, "top1": top1})
    return results


def test_comparisons_primary_holm_and_detectable_difference():
    from engine.study_statistics import holm, paired_test
    from engine.transfer_report import comparisons

    effects = {("full", "linear_probe"): 3.0, ("full", "finetune"): 0.0, ("few", "linear_probe"): -2.0,
               ("few", "finetune"): 0.2}
    rows = comparisons(synthetic_results(effects), ["full", "few"], ["linear_probe", "finetune"],
                       ("full", "linear_probe"), alpha=0.05, power=0.8)
    assert len(rows) == 4 * 2  # (target, method) x (stage 0, stage 1) against stage 2
    primary, *others = rows
    assert primary["primary"] and primary["stage"] == 0
    assert (primary["target"], primary["method"]) == ("full", "linear_probe")
    assert primary["mean"] == pytest.approx(3.1) and primary["n"] == 5  # 3 + 0.5 x (+1 -1 +1 -1 +1) / 5
    assert primary["p_holm"] == primary["p_value"] < 0.01  # not corrected
    # the other seven form Holm's family (stage 1 = stage 2: sd 0, no test, p counted as 1)
    p_values = [1.0 if math.isnan(row["p_value"]) else row["p_value"] for row in others]
    assert [row["p_holm"] for row in others] == pytest.approx(holm(p_values))
    # the smallest detectable difference: (t_0.975 + t_0.8) with 4 degrees of freedom x sd / sqrt(5)
    expected = paired_test([3.5, 2.5, 3.5, 2.5, 3.5])
    assert primary["detectable"] == pytest.approx(expected["detectable"])
    assert primary["detectable"] == pytest.approx((2.7764 + 0.9410) * primary["sd"] / math.sqrt(5), rel=1e-3)


def test_holm_adjusts_in_order_and_caps_at_one():
    from engine.study_statistics import holm

    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])


def test_source_check():
    from engine.transfer_report import source_rises, summarise

    rising = summarise(synthetic_results({("full", "linear_probe"): 1.0}), ["full"], ["linear_probe"])
    assert source_rises(rising) == {"source_top1_by_stage": [90.0, 91.0, 92.0], "rises": True}
    flat = {"stages": [{"source_top1": {"mean": m}} for m in (98.0, 99.0, 98.9)]}
    assert not source_rises(flat)["rises"]


@pytest.mark.slow  # imports the recipe (timm, Accelerate): seconds
def test_paper_config_parses():
    """The ImageNet config: four hub targets, each a TrainConfig on top of the shared keys."""
    from engine.config import load_config
    from transfer import TransferConfig, target_configs

    cfg = load_config(TransferConfig, ["--config", str(CONFIGS / "transfer.yaml")])
    targets = target_configs(cfg)
    assert list(targets) == ["caltech256", "indoor67", "cub200", "sketches"]
    assert targets["indoor67"].label_column == "labels" and targets["caltech256"].num_classes == 257
    assert all(t.task == "hub" and t.image_size == 224 for t in targets.values())
    assert cfg.source_runs == ["runs/imagenet_resnet50_step", "runs/imagenet_resnet50_autodecay"]


def test_init_from_keeps_features_and_replaces_the_classifier(source_run):
    from engine.models import make_model_and_optimizer
    from engine.train_config import TrainConfig

    checkpoint = source_run / "stage_ends" / "stage0"
    model, _ = make_model_and_optimizer(TrainConfig(init_from=str(checkpoint), seed=3), num_classes=7)
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "model.safetensors"))
    assert torch.equal(model[0].weight, saved["0.weight"]) and torch.equal(model[-3].weight, saved["10.weight"])
    assert model[-1].weight.shape == (7, 128)  # a fresh classifier for the 7 target classes


@pytest.mark.slow  # generates MNIST-1D
def test_classes_subset_relabels():
    from engine.config import ConfigError
    from engine.tasks import make_task
    from engine.train_config import TrainConfig

    task = make_task(TrainConfig(num_samples=600, classes=[7, 2], train_subset=40))
    assert task.num_classes == 2 and len(task.train_targets) == 40
    assert set(task.train_targets.tolist()) <= {0, 1} and set(task.test_targets.tolist()) == {0, 1}
    with pytest.raises(ConfigError, match=r"classes: invalid value \[12\]"):
        make_task(TrainConfig(num_samples=600, classes=[3, 12]))


def error_of(argv) -> str:
    import transfer

    with pytest.raises(SystemExit) as stopped:
        transfer.main(argv)
    return str(stopped.value)


def test_missing_checkpoint_is_named(source_run, tmp_path):
    broken = tmp_path / "broken_run"
    shutil.copytree(source_run, broken)
    (broken / "stage_ends" / "stage1" / "model.safetensors").unlink()
    message = error_of(["--source_runs", str(broken), "--targets", REST, *TINY, "--output_dir", str(tmp_path / "o")])
    assert "source_runs" in message and "stage 1" in message and str(broken / "stage_ends" / "stage1") in message
    nowhere = str(tmp_path / "nowhere")
    message = error_of(["--source_runs", nowhere, "--targets", REST, *TINY, "--output_dir", str(tmp_path / "o")])
    assert "no summary.json in" in message and "nowhere" in message


def test_target_without_label_column_is_named(source_run, tmp_path):
    """A local dataset (parquet, read by `datasets`) whose labels are in another column."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(4)]
    features = datasets.Features({"image": datasets.Image(), "category": datasets.ClassLabel(names=["a", "b"])})
    for split in ("train", "test"):
        (tmp_path / "pics" / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict({"image": images, "category": [0, 1, 0, 1]}, features=features).to_parquet(
            str(tmp_path / "pics" / "data" / f"{split}-00000-of-00001.parquet"))
    target = f"{{name: pics, task: hub, dataset: {tmp_path / 'pics'}, test_split: test}}"
    output = str(tmp_path / "o")
    message = error_of(["--source_runs", str(source_run), "--targets", target, *TINY, "--output_dir", output])
    assert "targets (pics)" in message and "label_column: no column 'label'" in message and "category" in message


@pytest.mark.parametrize("target, expected", [
    ("{name: a, lr: 0.5}", "targets[0] (a): lr cannot be set per target"),
    ("{name: a, colour: red}", "targets[0] (a): unknown config key 'colour'"),
    ("{name: a, classes: [5, 99]}", "targets (a): classes: invalid value [99]"),
])
def test_bad_target_is_named(source_run, tmp_path, target, expected):
    message = error_of(["--source_runs", str(source_run), "--targets", target, *TINY, "--output_dir", str(tmp_path)])
    assert expected in message


def test_unknown_primary_target_is_named(source_run, tmp_path):
    message = error_of(["--source_runs", str(source_run), "--targets", REST, "--primary_target", "elsewhere", *TINY,
                        "--output_dir", str(tmp_path)])
    assert "primary_target: invalid value 'elsewhere'" in message and "rest" in message
