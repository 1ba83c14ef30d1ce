"""The fine-tuning back-end: the Trainer back-end's GPT-2 (`lm.py`), pre-trained once on its corpus, then
fine-tuned on English prose (the documentation topics every CPython ships, `lm_data.read_finetune_text`)
until it overfits; each run is scored by the test loss (a split no schedule reads) of the model the user is
handed: the final one, or the best checkpoint's with load_best_model_at_end.

The pre-training is `pretrain_schedule` to `pretrain_steps` at `pretrain_lr` on the corpus, seed 0, the model
kept in `output_dir/pretrained` with its result; a later invocation with the same settings reuses it (its
cost is reported either way), and training it anew removes the folder's fine-tuning runs (they started from
other weights). The report adds, per row, the step of the checkpoint handed back and the test loss of the last
model; the acceptance (AutoDecay with the evaluation signal within `max_envelope_deficit` of the envelope,
and no worse than linear + EarlyStopping + best model in no more steps); and the validation curves' rise
(the budget overfits).
"""
import shutil
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..benchmark import peer_list
from ..config import ConfigError
from ..peers import EVALUATED, PEERS
from ..report import Scale
from ..report_tables import number
from .lm import LM, LMConfig, run_settings, saved_result
from .lm_data import TopicsSplit, read_corpus, read_finetune_text
from .lm_trainer import LMTask, RunSpec

PRETRAIN_SEED = 0


@dataclass
class FinetuneConfig(LMConfig):
    """The LM benchmark's keys (the corpus and model keys describe the pre-training; lr, warmup_steps and
    budget_steps the fine-tuning) and the fine-tuning text's."""

    finetune_sha256: str = ""  # pins pydoc_data.topics' text
    finetune_block: int = 1024
    finetune_every: int = 5  # in each group of blocks: the last is test, the one before validation
    finetune_train_chars: int = 98_304
    finetune_validation_chars: int = 32_768
    finetune_test_chars: int = 32_768
    pretrain_schedule: str = field(default="cosine", metadata={"choices": ("cosine", "wsd")})
    pretrain_steps: int = 2000
    pretrain_lr: float = 2e-3
    pretrain_warmup_steps: int = 40
    schedules: list[str] = peer_list("finetune", LM.KINDS, ["autodecay_eval", "linear_es", "cosine", "wsd"])
    frontier: list[str] = peer_list("finetune", LM.KINDS, ["cosine", "wsd"])
    paired_with: list[str] = peer_list("finetune", LM.KINDS, [])
    max_envelope_deficit: float = 0.01  # nats: the acceptance threshold
    docs_figure: str = ""  # where to copy pareto.png too ("": nowhere)
    output_dir: str = "runs/finetune_benchmark"


class Finetune(LM):
    DOMAIN, Config = "finetune", FinetuneConfig
    SCALE = Scale(score="test_loss", name="test_loss", higher_is_better=False,
                  title="test loss (nats per character)", digits=4, length="steps", units="steps", length_digits=0)

    def task_of(self, cfg) -> LMTask:
        """The LM task with the text's splits and the pre-trained model's folder."""
        split = TopicsSplit(cfg.finetune_sha256, cfg.finetune_block, cfg.finetune_every, cfg.finetune_train_chars,
                            cfg.finetune_validation_chars, cfg.finetune_test_chars)
        return replace(super().task_of(cfg), finetune=split, init_from=str(Path(cfg.output_dir) / "pretrained"))

    def check(self, cfg) -> None:
        """The LM benchmark's checks, the pinned fine-tuning text, and no peer read off one run: the test loss
        of a handed model exists only at the end of its run."""
        super().check(cfg)
        if not cfg.finetune_sha256:
            raise ConfigError("finetune_sha256 pins the fine-tuning text: give it (recipes/configs/"
                              "finetune_benchmark.yaml)")
        if cfg.eval_every < 1 or not 0 < cfg.pretrain_warmup_steps < cfg.pretrain_steps:
            raise ConfigError(f"eval_every={cfg.eval_every} must be positive and pretrain_warmup_steps="
                              f"{cfg.pretrain_warmup_steps} in (0, pretrain_steps={cfg.pretrain_steps})")
        for name in cfg.schedules:
            if PEERS[name].lengths == EVALUATED:
                raise ConfigError(f"schedules: peer {name} cannot run in the finetune domain: it is read at each "
                                  "budget point from one run, and a handed model's test loss exists only at its end")
        self.text(cfg)

    def text(self, cfg):
        """The pinned fine-tuning text in the corpus's vocabulary (a CorpusError when either differs)."""
        corpus = read_corpus(cfg.corpus_dir, cfg.files, cfg.corpus_sha256, cfg.validation_chars,
                             cfg.validation_block, cfg.validation_every)
        return read_finetune_text(corpus.vocabulary, self.task_of(cfg).finetune)

    def prepare(self, cfg) -> dict:
        """The pre-trained model (in `output_dir/pretrained`; `reused` when an earlier invocation trained it
        with the same task and run) and the fine-tuning text's sizes, for results.json."""
        task = replace(LM.task_of(self, cfg), lr=cfg.pretrain_lr, warmup_steps=cfg.pretrain_warmup_steps,
                       budget_steps=cfg.pretrain_steps)
        folder = Path(cfg.output_dir) / "pretrained"
        spec = RunSpec(peer=cfg.pretrain_schedule, seed=PRETRAIN_SEED, max_steps=cfg.pretrain_steps,
                       output_dir=str(folder), label="pretrained", save_model=True,
                       **run_settings(cfg, cfg.pretrain_schedule, cfg.pretrain_steps))
        result = saved_result(task, spec) if (folder / "model.safetensors").is_file() else None
        if result is not None:
            print(f"pre-trained model reused from {folder} (val loss {result['val_loss']:.4f} nats/char)")
        else:
            shutil.rmtree(Path(cfg.output_dir) / "runs", ignore_errors=True)
            print(f"pre-training: {cfg.pretrain_schedule} to {cfg.pretrain_steps} steps on the corpus ...", flush=True)
            result = {**self.train((task, spec)), "reused": False}
            print(f"pre-trained: val loss {result['val_loss']:.4f} nats/char ({result['wall_seconds']:.0f} s)")
        text = self.text(cfg)
        return {"pretraining": {"reused": True, **{k: v for k, v in result.items() if k not in ("train_log", "evals")}},
                "text": {"train_chars": len(text.train), "validation_chars": len(text.validation),
                         "test_chars": len(text.test), "dropped": text.dropped,
                         "dropped_total": sum(text.dropped.values())}}

    def finish(self, cfg, records: list[dict]) -> tuple[list[dict], dict]:
        """The Trainer back-end's, and the evidence of overfitting: per schedule evaluated during training to its
        budget, the validation loss at its best evaluation and at the end (means over seeds)."""
        records, extras = super().finish(cfg, records)
        rows = []
        for name in cfg.schedules:
            runs = [r for r in records if r["peer"] == name and len(r["evals"]) > 1 and r["steps"] == r["max_steps"]]
            if runs:
                best = [min(r["evals"], key=lambda e: e["val_loss"]) for r in runs]
                rows.append({"schedule": name, "runs": len(runs),
                             "best_val_loss": statistics.mean(e["val_loss"] for e in best),
                             "best_step": statistics.mean(e["step"] for e in best),
                             "final_val_loss": statistics.mean(r["evals"][-1]["val_loss"] for r in runs),
                             "rise": statistics.mean(r["evals"][-1]["val_loss"] - e["val_loss"]
                                                     for r, e in zip(runs, best))})
        return records, {**extras, "overfitting": rows,
                         "steps_per_second": statistics.mean(r["steps"] / r["wall_seconds"] for r in records)}

    def annotate(self, cfg, rows: list[dict], runs: list[dict], context: dict) -> None:
        """Each row's mean step of the checkpoint handed back (load_best_model_at_end) and the mean test loss of
        the last model (what training ended with), where the Trainer swapped them."""
        for row in rows:
            swapped = [r for r in runs if r["label"] == row["label"] and r.get("best_step") is not None]
            row["handed_step_mean"] = statistics.mean(r["best_step"] for r in swapped) if swapped else None
            row["last_test_loss_mean"] = statistics.mean(r["last_test_loss"] for r in swapped) if swapped else None

    def acceptance(self, cfg, rows: list[dict], own: str = "autodecay_eval", reference: str = "linear_es") -> dict:
        """`own` (AutoDecay with the evaluation signal) within `max_envelope_deficit` of the envelope, and at
        least as good as `reference` (linear + EarlyStopping + best model) in no more steps; seed means."""
        by_label = {row["label"]: row for row in rows}
        if own not in by_label:
            return {}
        row, deficit = by_label[own], by_label[own]["envelope_deficit"]
        checks = {"envelope_deficit": deficit, "max_envelope_deficit": cfg.max_envelope_deficit,
                  "envelope_ok": deficit is not None and deficit <= cfg.max_envelope_deficit}
        if reference in by_label:
            other = by_label[reference]
            checks.update(reference=reference, test_loss=row["test_loss_mean"], steps=row["steps_mean"],
                          reference_test_loss=other["test_loss_mean"], reference_steps=other["steps_mean"],
                          no_worse_than_reference=row["test_loss_mean"] <= other["test_loss_mean"],
                          no_more_steps=row["steps_mean"] <= other["steps_mean"])
        return checks

    def intro(self, cfg, runs: list[dict]) -> str:
        return ("Fine-tuning a pre-trained character-level GPT-2 on English prose (pydoc_data.topics): test loss in "
                f"nats per character ({runs[0]['test_predictions']:,} predictions) of the model each schedule hands "
                f"back, seeds {cfg.seeds}. Regret, waste and envelope deficit are from the seed means; positive "
                "regret and deficit: worse than the frontier. Last model: the test loss of the final weights where "
                "load_best_model_at_end handed back an earlier checkpoint.")

    def columns(self, cfg) -> tuple:
        return (("handed from step", lambda row: number(row["handed_step_mean"], 0, sign=False)),
                ("last model", lambda row: number(row["last_test_loss_mean"], 4, sign=False)))

    def sections(self, cfg, table: dict, runs: list[dict], context: dict) -> list[str]:
        """The acceptance, the evidence of overfitting, the pre-training's cost."""
        lines, check, pre = [], table["acceptance"], context["pretraining"]
        if check:
            text = (f"Acceptance: autodecay_eval's envelope deficit {number(check['envelope_deficit'], 4)} (at most "
                    f"{check['max_envelope_deficit']}: {'pass' if check['envelope_ok'] else 'FAIL'}).")
            if "reference" in check:
                good = check["no_worse_than_reference"] and check["no_more_steps"]
                text += (f" Against {check['reference']}: {check['test_loss']:.4f} in {check['steps']:.0f} steps vs "
                         f"{check['reference_test_loss']:.4f} in {check['reference_steps']:.0f} "
                         f"({'pass' if good else 'FAIL'}).")
            lines += [text, ""]
        lines += ["Overfitting within the budget: validation loss (means over seeds).", "",
                  "| schedule | runs | best | at step | at the budget | rise |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['schedule']} | {r['runs']} | {r['best_val_loss']:.4f} | {r['best_step']:.0f} | "
                  f"{r['final_val_loss']:.4f} | {r['rise']:+.4f} |" for r in context["overfitting"]]
        return lines + ["", f"Pre-training: {pre['peer']} to {pre['steps']} steps on the corpus, validation loss "
                        f"{pre['val_loss']:.4f}; {pre['wall_seconds']:.0f} s wall, {pre['cpu_seconds']:.0f} CPU-s"
                        + (" (reused from an earlier invocation)." if pre["reused"] else "."), ""]

    def title(self, cfg, task: str) -> str:
        return "Fine-tuning a pre-trained character-level GPT-2 on the Python docs' prose"

    def figures(self, cfg, runs: list[dict], output: Path, suffix: str) -> None:
        if cfg.docs_figure:
            shutil.copyfile(output / f"pareto{suffix}.png", cfg.docs_figure)
