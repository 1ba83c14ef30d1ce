"""Run by torchrun from test_torch_scheduler.py: two ranks, different losses, one schedule."""
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from timm_autodecay import AutoDecayLR


def main():
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
    Path(os.environ["OUT_DIR"], f"lrs_rank{rank}.txt").write_text("\n".join(lines) + "\n")
    dist.barrier()
    # Skip gloo's teardown: under load it sometimes aborts at exit ("terminate called without an
    # active exception") after all the work is done and written.
    os._exit(0)


if __name__ == "__main__":
    main()
