"""`recipes/finetune_benchmark.py`, the fine-tuning domain (`recipes/engine/backends/finetune.py`): the fine-tuning
text (pinned, three disjoint splits, characters outside the pre-training vocabulary dropped), the envelope's
arithmetic on losses (regret, waste, envelope deficit) and the acceptance, and a tiny end-to-end run
(pre-training cached, results.json, the peers it cannot run refused by name)."""
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT / "tests"))
CONFIG = ROOT / "recipes" / "configs" / "finetune_benchmark.yaml"

from engine.backends.lm_data import CorpusError, TopicsSplit, read_finetune_text, topics_text  # noqa: E402
from engine.peers import label  # noqa: E402
from engine.report import envelope_scores  # noqa: E402
from test_lm_benchmark import write_corpus  # noqa: E402

pytestmark = pytest.mark.slow  # the recipes, not the inner loop (`pytest -m "not slow"`)


def this_pythons_sha256() -> str:
    return hashlib.sha256(topics_text()[0].encode("utf-8")).hexdigest()


def split(**changes) -> TopicsSplit:
    values = dict(sha256=this_pythons_sha256(), block=256, every=4, train_chars=2048, validation_chars=1024,
                  test_chars=1024)
    return TopicsSplit(**{**values, **changes})


def test_the_pinned_checksum_is_this_pythons_text():
    if platform.python_implementation() != "CPython" or platform.python_version() != "3.11.7":
        pytest.skip("the config pins the topics of CPython 3.11.7")
    assert yaml.safe_load(CONFIG.read_text())["finetune_sha256"] == this_pythons_sha256()


def test_the_splits_are_disjoint_blocks_and_unknown_characters_are_dropped():
    text = topics_text()[0]
    missing = {"’", "”", "“", "e"}  # typographic quotes (outside the corpus's vocabulary) and one common letter
    vocabulary = "".join(sorted(set(text) - missing))
    read = read_finetune_text(vocabulary, split())

    def decode(ids):
        return "".join(vocabulary[i] for i in ids.tolist())

    kept = "".join(char for char in text if char not in missing)
    assert read.dropped == {char: text.count(char) for char in sorted(missing)}
    parts = {name: decode(getattr(read, name)) for name in ("train", "validation", "test")}
    assert {name: len(part) for name, part in parts.items()} == {"train": 2048, "validation": 1024, "test": 1024}
    assert not missing & set("".join(parts.values()))
    # groups of 4 blocks of 256: the first two train, the third validation, the fourth test
    assert parts["train"] == "".join(kept[i:i + 512] for i in range(0, 4096, 1024))
    assert parts["validation"] == "".join(kept[i + 512:i + 768] for i in range(0, 4096, 1024))
    assert parts["test"] == "".join(kept[i + 768:i + 1024] for i in range(0, 4096, 1024))
    for block in range(0, 1024, 256):  # no held-out block in training, none in both held-out splits
        assert parts["validation"][block:block + 256] not in parts["train"] + parts["test"]
        assert parts["test"][block:block + 256] not in parts["train"] + parts["validation"]


def test_another_text_or_too_little_of_it_is_refused():
    vocabulary = "".join(sorted(set(topics_text()[0])))
    with pytest.raises(CorpusError) as error:
        read_finetune_text(vocabulary, split(sha256="0" * 64))
    message = str(error.value)
    assert "0" * 64 in message and f"--finetune_sha256 {this_pythons_sha256()}" in message
    with pytest.raises(CorpusError, match="cannot fill the splits"):
        read_finetune_text(vocabulary, split(train_chars=10_000_000))


def row(peer, steps, loss, fraction=1.0):
    return {"label": label(peer, fraction), "peer": peer, "steps_mean": steps, "test_loss_mean": loss}


def test_regret_waste_and_envelope_deficit_against_the_frontier():
    from types import SimpleNamespace

    from engine.backends.finetune import Finetune

    rows = [row("cosine", 250, 1.560, 0.25), row("cosine", 500, 1.545, 0.5), row("cosine", 1000, 1.600),
            row("wsd", 250, 1.549, 0.25), row("wsd", 500, 1.540, 0.5),
            row("autodecay_eval", 400, 1.548), row("linear_es", 450, 1.555), row("constant", 200, 1.58)]
    envelope = envelope_scores(rows, ["cosine", "wsd"], tolerance=0.01, scale=Finetune.SCALE)
    assert envelope["best"] == {"label": "wsd_50", "test_loss_mean": 1.540, "steps_mean": 500}
    assert envelope["shortest_good"]["label"] == "wsd_25"  # within 0.01 of the best
    for r in rows:
        r.update(envelope["scores"][r["label"]])
    by_label = {r["label"]: r for r in rows}
    own = by_label["autodecay_eval"]
    assert own["regret"] == pytest.approx(0.008) and own["waste"] == pytest.approx(400 / 250)
    assert own["envelope_deficit"] == pytest.approx(1.548 - 1.549)  # the best at 250 steps or fewer: wsd_25
    assert by_label["cosine"]["envelope_deficit"] == pytest.approx(0.06)
    assert by_label["constant"]["envelope_deficit"] is None  # no frontier run that short

    def acceptance(max_deficit):
        return Finetune().acceptance(SimpleNamespace(max_envelope_deficit=max_deficit), rows)

    checks = acceptance(0.01)
    assert checks["envelope_ok"] and checks["no_worse_than_reference"] and checks["no_more_steps"]
    assert not acceptance(-0.01)["envelope_ok"]
    by_label["linear_es"]["steps_mean"] = 300  # stopped earlier: AutoDecay used more steps
    assert not acceptance(0.01)["no_more_steps"]


def test_finetune_benchmark_end_to_end_on_a_tiny_setting(tmp_path, capsys):
    import finetune_benchmark

    corpus = write_corpus(tmp_path / "corpus")
    out, figure = tmp_path / "out", tmp_path / "figure.png"
    argv = ["--config", str(CONFIG), "--corpus_dir", str(corpus["directory"]), "--files", *corpus["files"],
            "--corpus_sha256", corpus["sha256"], "--finetune_sha256", this_pythons_sha256(),
            "--validation_chars", "2048", "--validation_block", "512", "--validation_every", "4", "--n_embd", "32",
            "--batch_size", "4", "--pretrain_steps", "20", "--pretrain_warmup_steps", "2", "--budget_steps", "40",
            "--warmup_steps", "2", "--logging_steps", "1", "--eval_every", "5", "--finetune_block", "256",
            "--finetune_train_chars", "4096", "--finetune_validation_chars", "1024", "--finetune_test_chars", "1024",
            "--schedules", "autodecay_eval", "linear_es", "cosine", "--frontier", "cosine", "--seeds", "0",
            "--jobs", "1", "--output_dir", str(out), "--docs_figure", str(figure)]
    summary = finetune_benchmark.main(argv)

    for path in (out / "results.json", out / "results.md", out / "pareto.png", figure, out / "pretrained" /
                 "model.safetensors"):
        assert path.stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    table = saved["tables"]["finetune"]
    rows = {r["label"]: r for r in table["rows"]}
    assert set(rows) == {"autodecay_eval", "linear_es", "cosine_25", "cosine_50", "cosine_75", "cosine"}
    for r in rows.values():
        assert {"test_loss_mean", "steps_mean", "regret", "waste", "envelope_deficit"} <= set(r)
    assert rows["cosine"]["waste"] == pytest.approx(40 / table["envelope"]["shortest_good"]["steps_mean"])
    assert {"envelope_ok", "no_worse_than_reference", "no_more_steps"} <= set(table["acceptance"])
    own = next(r for r in summary["runs"] if r["peer"] == "autodecay_eval")
    assert own["steps"] <= 40 and own["best_step"] is not None and own["test_loss"] > 0
    assert not list(out.glob("runs/*/seed0/checkpoint-*"))  # every run's checkpoints removed
    assert not saved["pretraining"]["reused"] and "pre-training: cosine to 20 steps" in capsys.readouterr().out

    again = finetune_benchmark.main(argv + ["--schedules", "cosine"])  # the pre-trained model is reused
    assert again["pretraining"]["reused"] and "pre-trained model reused" in capsys.readouterr().out
    assert again["pretraining"]["val_loss"] == summary["pretraining"]["val_loss"]
    assert {r["label"]: r["test_loss"] for r in again["runs"]} == {
        r["label"]: r["test_loss"] for r in summary["runs"] if r["peer"] == "cosine"}

    with pytest.raises(SystemExit, match="schedulefree cannot run in the finetune domain"):
        finetune_benchmark.main(argv + ["--schedules", "schedulefree"])  # read off one run: no handed model there
    with pytest.raises(SystemExit):
        finetune_benchmark.main(argv + ["--schedules", "plateau_p3"])
    assert "peer plateau_p3 (kind plateau) cannot run in the finetune domain" in capsys.readouterr().err
