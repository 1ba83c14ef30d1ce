"""AutoDecay when fine-tuning: the character-level GPT-2 of `lm_benchmark.py`, pre-trained once on its corpus of
Python sources, fine-tuned on a small English text (the documentation topics every CPython ships) until it
overfits, through the Hugging Face `Trainer`.

    OMP_NUM_THREADS=1 python recipes/finetune_benchmark.py --config recipes/configs/finetune_benchmark.yaml \
        [--seeds 0 1 2] [--schedules autodecay_eval linear_es cosine wsd ...] [--jobs 2] [--key value]

The pre-training (`pretrain_schedule` to `pretrain_steps`, seed 0) is kept in `output_dir/pretrained` and
reused while its settings stay the same. Every run starts from those weights and trains on the text's training
split to at most `budget_steps`; runs that read evaluations evaluate on the validation split every `eval_every`
steps. Each is scored by the test loss (a third split no schedule reads) of the model the user is handed, and
against the `frontier` (cosine and WSD at `frontier_fractions` of the budget): regret, waste and envelope
deficit; the acceptance is `max_envelope_deficit` for AutoDecay with the evaluation signal, and no worse than
linear + EarlyStopping + best model in no more steps. Writes results.json, results.md and pareto.png into
`output_dir` (the figure also to `docs_figure` when one is named); see `engine/benchmark.py` and
`engine/backends/finetune.py`.
"""
from engine.backends.finetune import Finetune
from engine.benchmark import benchmark_main


def main(argv=None) -> dict:
    return benchmark_main(Finetune(), argv, __doc__)


if __name__ == "__main__":
    main()
