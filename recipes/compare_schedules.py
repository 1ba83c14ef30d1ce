"""Compare AutoDecay with every peer schedule, side by side, on MNIST-1D (or any task) trained with SGD.

    accelerate launch recipes/compare_schedules.py --config recipes/configs/benchmark_peers.yaml \
        [--tasks mnist1d mnist1d_noisy] [--seeds 0 1 ...] [--schedules step autodecay ...] [--key value]

Trains every schedule in `schedules` (`engine/peers.py`, PEERS: StepDecay, AutoDecay, cosine and WSD,
schedule-free SGD, constant, ReduceLROnPlateau, timm's plateau scheduler, dlib's slope test, SASA+, and the
oracle) for every seed in `seeds` (StepDecay: `baseline_seeds` when given), on every task in `tasks`, all on
the same budget (`epochs`); cosine and WSD at each of `frontier_fractions` of it, schedule-free SGD read there
from one run. The runs are independent, so they run whole in a pool of `jobs` worker processes (one torch
thread each) rather than data-parallel. The oracle is the shortest fixed StepDecay on the grid
`oracle_first_milestones` x `oracle_gaps` x `oracle_tails` whose mean accuracy is within `oracle_tolerance`
points of StepDecay's on the same seeds.

Against the envelope of the `frontier` (cosine and WSD at every budget point run): every schedule's regret,
waste (against the shortest point within `waste_tolerance` points of the best) and envelope deficit. Paired
comparison: each run of a schedule in `paired_with` (AutoDecay) against the `frontier` trained to its own
length on the same seed, checked against `max_paired_deficit`, `max_epochs`, `min_top1` (0: not checked).
Schedules that read an evaluation (timm_plateau, plateau_eval, autodecay_eval) read `eval_metric` on the
validation split the config holds out (`val_samples`); the test set is what is reported. Runs already
finished in `output_dir` with the same config are read back, not retrained (`reuse_runs`).

Writes into `output_dir`: each run's folder (`runs/[TASK/]LABEL/seedN`: metrics.jsonl, summary.json),
`results.json`, `results.md`, per task `pareto[_TASK].png` and `compare_schedules[_TASK].png` (training loss
and test accuracy per epoch, LR decays marked); see `engine/benchmark.py` and `engine/backends/mnist1d.py`.
"""
from engine.backends.mnist1d import MNIST1D
from engine.benchmark import benchmark_main


def main(argv=None) -> dict:
    return benchmark_main(MNIST1D(), argv, __doc__)


if __name__ == "__main__":
    main()
