"""The multi-process tests' workers, one per face, all started by the `torchrun` fixture (conftest.py):

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py WORKER OUT_DIR   (WORKER: a key of WORKERS)

Each rank trains with losses of its own and writes what it decided into OUT_DIR; the test compares the ranks.
"""
import math
import os
import sys
from pathlib import Path


def torch_worker(out_dir: Path) -> None:
    """AutoDecayLR on two ranks whose losses would each put the stage ends elsewhere."""
    import torch
    import torch.distributed as dist

    from timm_autodecay import AutoDecayLR

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    sched = AutoDecayLR(optimizer, num_stages=3, total_updates=3000, window=100)
    lines = []
    for update in range(3000):
        stage_age = update % 500
        # each rank's loss alone would put its stage ends elsewhere: rank 1 plateaus far later
        tau = 30 if rank == 0 else 120
        loss = 0.5 + math.exp(-stage_age / tau) * (1 + rank) + 0.05 * math.sin(update * (1.7 + rank))
        optimizer.step()
        sched.step(torch.tensor(loss))
        lines.append(f"{update} {optimizer.param_groups[0]['lr']:.6g} {sched.stage}")
        if sched.finished:
            break
    (out_dir / f"lrs_rank{rank}.txt").write_text("\n".join(lines) + "\n")
    dist.barrier()
    # Skip gloo's teardown: under load it sometimes aborts at exit ("terminate called without an
    # active exception") after all the work is done and written.
    os._exit(0)


def torch_eval_worker(out_dir: Path) -> None:
    """AutoDecayLR fed evaluations every 50 updates whose local values peak at different evaluations on the
    two ranks, while the training loss keeps falling (only the evaluations can end the stable phase)."""
    import torch
    import torch.distributed as dist

    from timm_autodecay import AutoDecayLR

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    sched = AutoDecayLR(optimizer, total_updates=2000, eval_mode="max")
    peak = 4 if rank == 0 else 12  # alone, each rank would end the phase at its own evaluation
    lines = []
    for update in range(1, 2001):
        optimizer.step()
        sched.step(torch.tensor(5.0 - update * 1e-3))
        if update % 50 == 0:
            evaluation = update // 50
            sched.step_eval(torch.tensor(float(min(evaluation, peak) - 0.5 * max(0, evaluation - peak))))
        lines.append(f"{update} {optimizer.param_groups[0]['lr']:.6g} {sched.stage}")
        if sched.finished:
            break
    (out_dir / f"lrs_rank{rank}.txt").write_text("\n".join(lines) + "\n")
    dist.barrier()
    os._exit(0)  # as torch_worker


def timm_worker(out_dir: Path) -> None:
    from timm_train_py import two_rank_worker

    two_rank_worker(out_dir)


def trainer_worker(out_dir: Path) -> None:
    from hf_trainer_tasks import two_process_worker

    two_process_worker(out_dir)


def trainer_eval_worker(out_dir: Path) -> None:
    from hf_trainer_tasks import two_process_eval_worker

    two_process_eval_worker(out_dir)


WORKERS = {"torch": torch_worker, "torch_eval": torch_eval_worker, "timm": timm_worker, "trainer": trainer_worker,
           "trainer_eval": trainer_eval_worker}

if __name__ == "__main__":
    WORKERS[sys.argv[1]](Path(sys.argv[2]))
