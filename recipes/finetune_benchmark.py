"""AutoDecay when fine-tuning, the transformer benchmark's second domain: the character-level GPT-2 of
`lm_benchmark.py`, pre-trained once on its corpus of Python sources, fine-tuned on a small English text (the
documentation topics every CPython ships, `lm_task.read_finetune_text`) until it overfits.

    OMP_NUM_THREADS=1 python recipes/finetune_benchmark.py --config recipes/configs/finetune_benchmark.yaml \
        [--seeds 0 1 2] [--schedules autodecay_eval linear_es cosine wsd ...] [--jobs 2] [--key value]

The machinery is the LM benchmark's (`lm_benchmark`: the config, the peers, the plan and the pool;
`lm_runs.train_run`; `lm_report`), with `mode: finetune`:

* Pre-training: `pretrain_schedule` to `pretrain_steps` at `pretrain_lr` on the corpus, seed 0, the
  model saved in `output_dir/pretrained` with its result; a later invocation with the same settings reuses
  it (its cost is reported either way).
* Fine-tuning: every run starts from those weights, trains with AdamW through the Trainer on the text's
  training split at `lr` to at most `budget_steps`; runs that read evaluations evaluate on the validation
  split every `eval_every` steps. Each is scored by the test loss (a third split no schedule reads) of the
  model the user is handed: the final model, or the best checkpoint's with load_best_model_at_end.
* The report: per row, the test loss and steps (mean ± sd over seeds), and against the cosine/WSD frontier
  at `frontier_fractions` of the budget: regret, waste and envelope deficit (`lm_report.frontier_metrics`);
  the acceptance (AutoDecay with the evaluation signal within `max_envelope_deficit` of the envelope, and
  no worse than linear + EarlyStopping + best model in no more steps); the validation curves' rise (the
  budget overfits). Writes results.json, results.md and pareto.png into `output_dir`, and copies the figure
  to `docs_figure` when one is named.
"""
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from engine.config import load_config
from lm_benchmark import (
    PEERS, Job, LMBenchmarkConfig, _as_json, check_config, frontier_budgets, pretrained_dir, saved_result, task_of,
    train_all,
)
from lm_report import (
    finetune_acceptance, finetune_markdown, frontier_metrics, handed_details, overfitting, plot_pareto, table_rows,
    write_results,
)
from lm_runs import LMTask, RunSpec, train_run
from lm_task import FinetuneText, read_corpus, read_finetune_text

PRETRAIN_SEED = 0


def pretrain_task(cfg: LMBenchmarkConfig) -> LMTask:
    """The LM benchmark's task with the pre-training's optimisation settings."""
    return replace(task_of(cfg), lr=cfg.pretrain_lr, warmup_steps=cfg.pretrain_warmup_steps,
                   budget_steps=cfg.pretrain_steps, finetune=None, init_from=None)


def pretrain(cfg: LMBenchmarkConfig) -> dict:
    """The pre-trained model (in `output_dir/pretrained`) and its run's result, `reused` when an earlier
    invocation trained it with the same task and run. Training it anew removes the fine-tuning runs of
    the folder: they started from other weights."""
    task, folder = pretrain_task(cfg), pretrained_dir(cfg)
    spec = RunSpec(peer=cfg.pretrain_schedule, seed=PRETRAIN_SEED, max_steps=cfg.pretrain_steps,
                   output_dir=str(folder), label="pretrained", save_model=True,
                   **PEERS[cfg.pretrain_schedule].settings(cfg, cfg.pretrain_steps))
    saved = saved_result(Job(spec), task) if (folder / "model.safetensors").is_file() else None
    if saved is not None:
        print(f"pre-trained model reused from {folder} (val loss {saved['val_loss']:.4f} nats/char)")
        return {**saved, "reused": True}
    runs = Path(cfg.output_dir) / "runs"
    if runs.is_dir():
        shutil.rmtree(runs)
    print(f"pre-training: {cfg.pretrain_schedule} to {cfg.pretrain_steps} steps on the corpus ...", flush=True)
    result = train_run(task, spec)
    (folder / "result.json").write_text(json.dumps({"spec": _as_json(spec), "task": _as_json(task),
                                                    "result": result}) + "\n")
    print(f"pre-trained: val loss {result['val_loss']:.4f} nats/char ({result['wall_seconds']:.0f} s)")
    return {**result, "reused": False}


def summarize(cfg: LMBenchmarkConfig, results: list[dict], pretrained: dict, text: FinetuneText,
              started: float) -> dict:
    """Everything results.json holds: the rows with their frontier metrics, the acceptance, the evidence
    of overfitting, the pre-training, the costs."""
    rows = table_rows(results, cfg.schedules, frontier_budgets(cfg), cfg.budget_steps, score="test_loss")
    frontier = frontier_metrics(rows, cfg.frontier, cfg.waste_tolerance)
    handed_details(rows, results)
    pretraining = {key: value for key, value in pretrained.items() if key not in ("train_log", "evals")}
    cpu = sum(run["cpu_seconds"] for run in results) + (0.0 if pretrained["reused"] else pretrained["cpu_seconds"])
    return {
        "config": asdict(cfg), "peers": {name: PEERS[name].note for name in cfg.schedules},
        "text": {"train_chars": len(text.train), "validation_chars": len(text.validation),
                 "test_chars": len(text.test), "dropped": text.dropped, "dropped_total": sum(text.dropped.values())},
        "rows": rows, "frontier": frontier, "acceptance": finetune_acceptance(rows, cfg.max_envelope_deficit),
        "overfitting": overfitting(results, cfg.schedules), "pretraining": pretraining, "runs": results,
        "wall_seconds": time.perf_counter() - started, "cpu_seconds": cpu,
        "steps_per_second": statistics.mean(r["steps"] / r["wall_seconds"] for r in results),
    }


def main(argv=None) -> dict:
    cfg = load_config(LMBenchmarkConfig, argv, description=__doc__)
    started = time.perf_counter()
    try:  # the settings, the pinned corpus and the pinned fine-tuning text, checked before any run starts
        if cfg.mode != "finetune":
            raise ValueError(f"mode={cfg.mode}: this recipe fine-tunes (mode: finetune); recipes/lm_benchmark.py "
                             "runs mode: scratch")
        check_config(cfg)
        corpus = read_corpus(cfg.corpus_dir, cfg.files, cfg.corpus_sha256, cfg.validation_chars,
                             cfg.validation_block, cfg.validation_every)
        text = read_finetune_text(corpus.vocabulary, task_of(cfg).finetune)
    except ValueError as error:  # CorpusError included
        sys.exit(f"finetune_benchmark: error: {error}")
    pretrained = pretrain(cfg)
    results = train_all(cfg)
    summary = summarize(cfg, results, pretrained, text, started)
    output = Path(cfg.output_dir)
    plot_pareto(results, cfg.schedules, cfg.frontier, frontier_budgets(cfg), output / "pareto.png",
                score="test_loss", title="Fine-tuning a pre-trained character-level GPT-2 on the Python docs' prose")
    if cfg.docs_figure:
        shutil.copyfile(output / "pareto.png", cfg.docs_figure)
    summary["wall_seconds"] = time.perf_counter() - started
    table = write_results(output, summary, finetune_markdown)
    print(table)
    return summary


if __name__ == "__main__":
    main()
