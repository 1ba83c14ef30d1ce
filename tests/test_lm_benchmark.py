"""`recipes/lm_benchmark.py`, the transformer benchmark (`recipes/engine/backends/lm.py`): a pinned corpus is
refused when it differs, the paired comparison's arithmetic on losses, and a smoke run of the real Trainer code
path on a tiny slice of the standard library (branches off the constant-LR trunk end exactly where straight
runs do)."""
import dataclasses
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
CONFIG = ROOT / "recipes" / "configs" / "lm_benchmark.yaml"

from engine.backends.lm_data import CorpusError, corpus_sha256, read_corpus, stdlib_dir  # noqa: E402
from engine.report import Scale, paired_checks, paired_comparison  # noqa: E402

pytestmark = pytest.mark.slow  # the recipes, not the inner loop (`pytest -m "not slow"`)


FILES = ["a.py", "b.py"]


def write_corpus(folder: Path) -> dict:
    """A tiny corpus of real text: slices of two standard-library modules."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.py").write_text((stdlib_dir() / "argparse.py").read_text(encoding="utf-8")[:20_000])
    (folder / "b.py").write_text((stdlib_dir() / "difflib.py").read_text(encoding="utf-8")[:12_000])
    return {"directory": folder, "files": FILES, "sha256": corpus_sha256(folder, FILES)}


def test_a_different_corpus_is_refused_with_both_checksums(tmp_path):
    pinned = write_corpus(tmp_path)["sha256"]
    read_corpus(tmp_path, FILES, pinned, 2048, validation_block=512, validation_every=4)

    with open(tmp_path / "a.py", "a") as file:  # another Python version: other sources
        file.write("# one more line\n")
    actual = corpus_sha256(tmp_path, FILES)
    with pytest.raises(CorpusError) as error:
        read_corpus(tmp_path, FILES, pinned, 2048, validation_block=512, validation_every=4)
    message = str(error.value)
    assert pinned in message and actual in message
    assert f"--corpus_sha256 {actual}" in message  # how to proceed anyway


def test_validation_blocks_are_held_out_of_training(tmp_path):
    corpus = write_corpus(tmp_path)
    read = read_corpus(tmp_path, FILES, corpus["sha256"], 2048, validation_block=512, validation_every=4)
    text = "".join((tmp_path / name).read_text() for name in FILES)

    def decode(ids):
        return "".join(read.vocabulary[i] for i in ids.tolist())

    assert decode(read.validation) == text[1536:2048] + text[3584:4096] + text[5632:6144] + text[7680:8192]
    assert len(text) == 32_000 and len(read.train) == len(text) - 15 * 512  # blocks 3, 7, ..., 59 of 63 out
    assert text[1536:2048] not in decode(read.train)
    with pytest.raises(CorpusError, match="validation_chars=10000"):
        read_corpus(tmp_path, FILES, corpus["sha256"], 10_000, validation_block=512, validation_every=4)


LOSS = Scale(score="val_loss", name="val_loss", higher_is_better=False, title="validation loss", digits=4,
             length="steps", units="steps", length_digits=0)


def run(peer, seed, steps, val_loss):
    return {"peer": peer, "label": peer, "task": "lm", "seed": seed, "steps": steps, "val_loss": val_loss}


def test_paired_deficit_is_against_the_better_frontier_schedule_at_the_same_length():
    own = [run("autodecay", 0, 1200, 1.60), run("autodecay", 1, 1000, 1.50)]
    frontier = [run("cosine", 0, 1200, 1.58), run("wsd", 0, 1200, 1.57), run("cosine", 1, 1000, 1.52),
                run("wsd", 1, 1000, 1.53), run("wsd", 1, 2000, 1.40), run("cosine", 0, 2000, 1.39)]  # other lengths
    paired = paired_comparison(own, frontier, ["cosine", "wsd"], LOSS, budget=2000)
    assert [line["deficit"] for line in paired["per_seed"]] == pytest.approx([0.03, -0.02])  # lower loss is better
    assert [line["best"] for line in paired["per_seed"]] == ["wsd", "cosine"]
    assert paired["mean_deficit"] == pytest.approx(0.005)
    assert paired["saved_steps"] == 900 and paired["saved_percent"] == pytest.approx(45.0)

    step = [run("step", 0, 2000, 1.62), run("step", 1, 2000, 1.49)]
    checks = paired_checks(paired, {"mean_deficit": (0.01, "<=")}, step, LOSS)
    assert checks["mean_deficit"]["passed"] and checks["step"]["passed"]  # no worse than StepDecay
    assert checks["step"]["value"] == pytest.approx(1.55) and checks["step"]["bound"] == pytest.approx(1.555)
    assert not paired_checks(paired, {"mean_deficit": (0.001, "<=")}, step, LOSS)["mean_deficit"]["passed"]
    worse_than_step = [{**r, "val_loss": 1.40} for r in step]
    assert not paired_checks(paired, {}, worse_than_step, LOSS)["step"]["passed"]


def test_a_paired_run_without_a_frontier_run_of_its_length_is_left_out():
    own = [run("autodecay", 0, 1200, 1.60), run("autodecay", 1, 1000, 1.50)]
    paired = paired_comparison(own, [run("cosine", 0, 2000, 1.50), run("wsd", 1, 1000, 1.49)], ["cosine", "wsd"],
                               LOSS, budget=2000)
    assert [(line["seed"], line["rivals"]) for line in paired["per_seed"]] == [(1, {"wsd": 1.49})]
    assert paired_comparison(own[:1], [], ["cosine", "wsd"], LOSS, 2000) == {"per_seed": []}


def test_benchmark_smoke_on_a_tiny_corpus(tmp_path, capsys):
    import lm_benchmark
    from engine.backends.lm import LM
    from engine.backends.lm_trainer import train_run
    from engine.config import load_config
    from engine.runner import Job

    corpus = write_corpus(tmp_path / "corpus")
    argv = ["--config", str(CONFIG), "--corpus_dir", str(corpus["directory"]),
            "--files", *corpus["files"], "--corpus_sha256", corpus["sha256"], "--validation_chars", "2048",
            "--validation_block", "512", "--validation_every", "4", "--n_embd", "32",
            "--batch_size", "4", "--budget_steps", "40", "--warmup_steps", "2", "--logging_steps", "1",
            "--step_milestones", "14", "27", "--checkpoint_every", "8", "--frontier_fractions", "0.5", "1.0",
            "--schedules", "autodecay", "cosine", "wsd", "step", "constant", "--seeds", "0", "--jobs", "1",
            "--output_dir", str(tmp_path / "out")]
    summary = lm_benchmark.main(argv)

    for name in ("results.json", "results.md", "pareto.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    labels = {r["label"] for r in summary["runs"]}
    assert {"autodecay", "cosine_50", "cosine", "wsd_50", "wsd", "step", "constant"} <= labels
    autodecay = next(r for r in summary["runs"] if r["peer"] == "autodecay")
    pair = summary["tables"]["lm"]["paired"]["autodecay"]["per_seed"][0]
    assert pair["steps"] == autodecay["steps"] <= 40
    assert set(pair["rivals"]) == {"cosine", "wsd"}  # both trained to AutoDecay's length
    assert "Paired by seed: autodecay" in (tmp_path / "out" / "results.md").read_text()
    assert "seed 0 autodecay: val loss" in capsys.readouterr().out  # progress, one line per run

    # StepDecay's first milestone is 14: it branches off the trunk's checkpoint at 8; WSD to 40 at 32
    branched = {r["label"]: r for r in summary["runs"]}
    assert branched["step"]["resumed_from"] == 8 and branched["wsd"]["resumed_from"] == 32
    assert not list((tmp_path / "out" / "runs" / "constant" / "seed0").glob("checkpoint-*"))  # cleaned up

    backend = LM()
    cfg = load_config(backend.Config, argv)
    for name in ("wsd", "step"):
        task, spec = backend.plan(cfg, Job(name, 0, "lm"))[-1].spec
        straight = train_run(task, dataclasses.replace(spec, resume_from=None, output_dir=str(tmp_path / "straight")))
        assert straight["val_loss"] == pytest.approx(branched[name]["val_loss"], abs=1e-6)

    # a second invocation with reuse_runs takes every run's result from its folder (the trunk, whose
    # checkpoints were cleaned up, trains again and ends where it did)
    again = lm_benchmark.main(argv + ["--reuse_runs", "true"])
    first = {r["label"]: r for r in summary["runs"]}
    for run in again["runs"]:
        assert run["val_loss"] == first[run["label"]]["val_loss"]
        if run["label"] != "constant":  # not trained again: the same record, wall time included
            assert run["wall_seconds"] == first[run["label"]]["wall_seconds"]

    with pytest.raises(SystemExit, match=corpus["sha256"]):
        lm_benchmark.main(argv[:argv.index("--corpus_sha256")] + ["--corpus_sha256", "0" * 64]
                          + argv[argv.index("--corpus_sha256") + 2:])
