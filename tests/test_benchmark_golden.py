"""The benchmarks give the numbers they gave before their stacks became one (`recipes/engine/benchmark.py`
and a back-end per domain): each domain's tiny config, on the same seeds, against what the code before that
change wrote (`tests/data/benchmark_golden_*.json`: every run's score and length, the rows, the envelope, the
paired comparison and its checks), to 1e-6. The numbers rest on the detector too: a change to its decisions
changes AutoDecay's runs here, as it does in `test_detector.py`'s golden decisions."""
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT / "tests"))
CONFIGS = ROOT / "recipes" / "configs"
DATA = ROOT / "tests" / "data"

from test_lm_benchmark import write_corpus  # noqa: E402

pytestmark = pytest.mark.slow  # trains: seconds to a minute each

FRACTIONS = ["0.2", "0.3", "0.4", "0.5", "0.6", "0.8", "1.0"]
MNIST1D = ["--epochs", "5", "--seeds", "0", "1", "--jobs", "1", "--num_samples", "2000", "--val_samples", "400",
           "--milestones", "2", "4", "--schedules", "step", "autodecay", "autodecay_eval", "schedulefree", "cosine",
           "wsd", "oracle", "--frontier_fractions", *FRACTIONS, "--oracle_first_milestones", "1", "--oracle_gaps", "1",
           "--oracle_tails", "1", "--paired_with", "autodecay", "autodecay_eval"]
TINY_LM = ["--validation_chars", "2048", "--validation_block", "512", "--validation_every", "4", "--n_embd", "32",
           "--batch_size", "4", "--budget_steps", "40", "--warmup_steps", "2", "--logging_steps", "1", "--jobs", "1"]
LM = ["--step_milestones", "14", "27", "--checkpoint_every", "8", "--frontier_fractions", "0.5", "1.0",
      "--schedules", "autodecay", "autodecay_step", "cosine", "wsd", "step", "constant", "schedulefree",
      "--paired_with", "autodecay", "autodecay_step", "--seeds", "0", "1"]
FINETUNE = ["--pretrain_steps", "20", "--pretrain_warmup_steps", "2", "--eval_every", "5", "--finetune_block", "256",
            "--finetune_train_chars", "4096", "--finetune_validation_chars", "1024", "--finetune_test_chars", "1024",
            "--checkpoint_every", "5", "--schedules", "autodecay_eval", "autodecay_loss", "linear", "linear_es",
            "greedy", "cosine", "wsd", "constant", "--seeds", "0", "--docs_figure", ""]


def pick(record: dict, keys) -> dict:
    return {key: record.get(key) for key in keys}


def run_numbers(document: dict, keys, units: str, points: bool) -> dict:
    """Every run by label and seed (with `points`, those read off a schedule-free run at a budget point too); a
    paired run by its peer and length."""
    runs = {f"{r['label']}/seed{r['seed']}": pick(r, keys) for r in document["runs"]
            if points or r["peer"] != "schedulefree" or r["budget_fraction"] == 1.0}
    runs.update({f"{r['peer']}@{r[units]}/seed{r['seed']}": pick(r, keys) for r in document["paired_runs"]})
    return runs


def paired_numbers(table: dict, length: str, score: str, means: dict) -> dict:
    """Per paired schedule its lines and `means` ({name then: key now})."""
    return {name: {"per_seed": [{"seed": s["seed"], "length": s[length], "score": s[score], "rivals": s["rivals"],
                                 "deficit": s["deficit"]} for s in p["per_seed"]],
                   **{then: p[now] for then, now in means.items()}} for name, p in table["paired"].items()}


def mnist1d_numbers(document: dict) -> dict:
    table = document["tables"]["mnist1d"]
    keys = ["test_top1", "test_loss", "val_top1", "epochs", "updates", "decay_epochs"]
    return {"runs": run_numbers(document, keys, "updates", points=True),
            "rows": {row["label"]: pick(row, ["runs", "top1_mean", "top1_sd", "epochs_mean", "epochs_sd",
                                              "saved_epochs", "oracle_fraction", "regret", "waste",
                                              "envelope_deficit"]) for row in table["rows"]},
            "paired": paired_numbers(table, "epochs", "top1", {"mean_deficit": "mean_deficit",
                                                                "sd_deficit": "sd_deficit"}),
            "envelope": {"best": table["envelope"]["best"]["label"],
                         "shortest_good": table["envelope"]["shortest_good"]["label"]},
            "oracle": pick(document["oracle"]["mnist1d"], ["chosen", "length", "target", "mean_top1"])}


def lm_numbers(document: dict) -> dict:
    table = document["tables"]["lm"]
    acceptance = {name: {"deficit_ok": checks["mean_deficit"]["passed"], "val_loss_mean": checks["step"]["value"],
                         "step_val_loss_mean": checks["step"]["bound"], "no_worse_than_step": checks["step"]["passed"]}
                  for name, checks in ((name, p["checks"]) for name, p in table["paired"].items())}
    return {"runs": run_numbers(document, ["val_loss", "steps", "max_steps", "resumed_from"], "steps", points=False),
            "rows": {row["label"]: pick(row, ["runs", "steps_mean", "steps_sd", "val_loss_mean", "val_loss_sd"])
                     for row in table["rows"]},
            "paired": paired_numbers(table, "steps", "val_loss", {"mean_deficit": "mean_deficit",
                                                                  "steps_saved": "saved_steps"}),
            "acceptance": acceptance}


def finetune_numbers(document: dict) -> dict:
    table, envelope = document["tables"]["finetune"], document["tables"]["finetune"]["envelope"]
    keys = ["test_loss", "steps", "max_steps", "best_step", "last_test_loss", "handed_val_loss", "val_loss"]
    return {"runs": run_numbers(document, keys, "steps", points=False),
            "rows": {row["label"]: pick(row, ["runs", "steps_mean", "steps_sd", "test_loss_mean", "test_loss_sd",
                                              "regret", "waste", "envelope_deficit", "handed_step_mean",
                                              "last_test_loss_mean"]) for row in table["rows"]},
            "envelope": {"best": envelope["best"]["label"], "best_score": envelope["best"]["test_loss_mean"],
                         "shortest_good": envelope["shortest_good"]["label"],
                         "shortest_steps": envelope["shortest_good"]["steps_mean"]},
            "acceptance": pick(table["acceptance"], ["envelope_deficit", "envelope_ok", "no_worse_than_reference",
                                                     "no_more_steps"]),
            "overfitting": {r["schedule"]: pick(r, ["best_val_loss", "best_step", "final_val_loss", "rise"])
                            for r in document["overfitting"]},
            "pretraining": pick(document["pretraining"], ["val_loss", "steps"])}


def differences(golden, new, path: str = "") -> list[str]:
    """Where `new` differs from `golden`: floats by more than 1e-6, anything else at all."""
    if isinstance(golden, dict) and isinstance(new, dict):
        if set(golden) != set(new):
            return [f"{path}: keys {sorted(set(golden) ^ set(new))} in one only"]
        return [d for key in golden for d in differences(golden[key], new[key], f"{path}/{key}")]
    if isinstance(golden, list) and isinstance(new, list) and len(golden) == len(new):
        return [d for i, (a, b) in enumerate(zip(golden, new)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(golden, float) or isinstance(new, float):
        close = isinstance(new, (int, float)) and isinstance(golden, (int, float)) and math.isclose(
            golden, new, rel_tol=0, abs_tol=1e-6)
        return [] if close else [f"{path}: {golden} then, {new} now"]
    return [] if golden == new else [f"{path}: {golden!r} then, {new!r} now"]


def check(domain: str, numbers: dict) -> None:
    golden = json.loads((DATA / f"benchmark_golden_{domain}.json").read_text())
    found = differences({key: golden[key] for key in numbers}, numbers)
    assert not found, "\n".join(found[:40])


def tiny_corpus(tmp_path) -> list[str]:
    corpus = write_corpus(tmp_path / "corpus")
    return ["--corpus_dir", str(corpus["directory"]), "--files", *corpus["files"], "--corpus_sha256",
            corpus["sha256"], *TINY_LM]


def test_mnist1d_frontier_gives_the_same_numbers(tmp_path):
    import compare_schedules

    document = compare_schedules.main(["--config", str(CONFIGS / "compare_schedules.yaml"), *MNIST1D,
                                       "--output_dir", str(tmp_path)])
    check("mnist1d", mnist1d_numbers(document))


def test_transformer_benchmark_gives_the_same_numbers(tmp_path):
    import lm_benchmark

    document = lm_benchmark.main(["--config", str(CONFIGS / "lm_benchmark.yaml"), *tiny_corpus(tmp_path), *LM,
                                  "--output_dir", str(tmp_path / "out")])
    check("lm", lm_numbers(document))


def test_finetune_benchmark_gives_the_same_numbers(tmp_path):
    import finetune_benchmark
    from engine.backends.lm_data import topics_text

    sha256 = hashlib.sha256(topics_text()[0].encode("utf-8")).hexdigest()
    document = finetune_benchmark.main(["--config", str(CONFIGS / "finetune_benchmark.yaml"), *tiny_corpus(tmp_path),
                                        "--finetune_sha256", sha256, *FINETUNE, "--output_dir", str(tmp_path / "out")])
    check("finetune", finetune_numbers(document))
