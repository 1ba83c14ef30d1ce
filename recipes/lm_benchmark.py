"""AutoDecay against the schedules a transformer user would pick: a character-level GPT-2 trained with
AdamW through the Hugging Face `Trainer` on the Python standard library's sources.

    OMP_NUM_THREADS=1 python recipes/lm_benchmark.py --config recipes/configs/lm_benchmark.yaml \
        [--seeds 0 1 2] [--schedules autodecay cosine wsd ...] [--jobs 2] [--key value]

Every schedule in `schedules` (`engine/peers.py`, PEERS) is trained for every seed on the same task and
budget (`budget_steps`); cosine and WSD also to `frontier_fractions` of it (the fixed-budget frontier), and the
schedule-free optimizer is evaluated at those budgets. WSD and StepDecay branch off the constant-LR trunk
(the `constant` peer; a checkpoint every `checkpoint_every` steps), so each costs only its cooldown.

AutoDecay (`paired_with`) is judged paired by seed: against the better of the `frontier` (cosine and WSD)
trained to its own length (the steps it used) on the same seed, checked against `max_paired_deficit` and
StepDecay at the whole budget. Writes into `output_dir`: `results.json` (every run with its evaluations and
training-loss log, the rows, the paired comparison and its checks), `results.md` (the tables) and
`pareto.png` (validation loss against steps, frontier lines); see `engine/benchmark.py` and
`engine/backends/lm.py`. The fine-tuning domain, on the same model and Trainer, is `finetune_benchmark.py`.
"""
from engine.backends.lm import LM
from engine.benchmark import benchmark_main


def main(argv=None) -> dict:
    return benchmark_main(LM(), argv, __doc__)


if __name__ == "__main__":
    main()
