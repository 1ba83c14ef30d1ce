"""Evaluation after an epoch: mean cross-entropy and top-1 accuracy on the task's test set(s) and, when the
task holds one out (`val_samples`), its validation split."""
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .tasks import ImageTask


@torch.no_grad()
def evaluate(model, inputs, targets, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (%) over a test set held in memory (read once)."""
    model.eval()
    loss_sum = torch.zeros((), device=inputs.device)
    correct = torch.zeros((), device=inputs.device, dtype=torch.long)
    for batch_inputs, batch_targets in zip(inputs.split(batch_size), targets.split(batch_size)):
        logits = model(batch_inputs)
        loss_sum += F.cross_entropy(logits.float(), batch_targets, reduction="sum")
        correct += (logits.argmax(dim=1) == batch_targets).sum()
    return loss_sum.item() / len(targets), 100.0 * correct.item() / len(targets)


@torch.no_grad()
def evaluate_dataset(model, dataset, streaming: bool, batch_size: int, workers: int, accelerator):
    """Mean cross-entropy and top-1 accuracy (%) over a `datasets` split, each process reading its share."""
    model.eval()
    rank, processes = accelerator.process_index, accelerator.num_processes
    if streaming:
        from datasets.distributed import split_dataset_by_node

        share = split_dataset_by_node(dataset, rank, processes)
        loader = DataLoader(share, batch_size=batch_size, num_workers=workers)
    else:
        share = range(rank, len(dataset), processes)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=share, num_workers=workers)
    totals = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        inputs, targets = batch["inputs"].to(accelerator.device), batch["targets"].to(accelerator.device)
        logits = model(inputs)
        totals[0] += F.cross_entropy(logits.float(), targets, reduction="sum")
        totals[1] += (logits.argmax(dim=1) == targets).sum()
        totals[2] += len(targets)
    loss_sum, correct, count = accelerator.reduce(totals, reduction="sum").tolist()
    return loss_sum / max(count, 1), 100.0 * correct / max(count, 1)


def evaluate_all(model, task, cfg, accelerator) -> dict:
    """test_loss and test_top1, val_loss and val_top1 when the task has a validation split, and test_top1_NAME
    for each of the task's extra test sets."""
    batch_size = cfg.eval_batch_size or min(cfg.batch_size, 1024)
    model = accelerator.unwrap_model(model)  # DDP's forward syncs buffers; processes may read unequal shares
    if isinstance(task, ImageTask):
        loss, top1 = evaluate_dataset(model, task.test, task.streaming, batch_size, cfg.workers, accelerator)
        return {"test_loss": loss, "test_top1": top1}
    device = accelerator.device
    loss, top1 = evaluate(model, task.test_inputs.to(device), task.test_targets.to(device), batch_size)
    results = {"test_loss": loss, "test_top1": top1}
    if task.val_inputs is not None:
        loss, top1 = evaluate(model, task.val_inputs.to(device), task.val_targets.to(device), batch_size)
        results.update(val_loss=loss, val_top1=top1)
    for name, (inputs, targets) in task.extra_tests.items():
        results[f"test_top1_{name}"] = evaluate(model, inputs.to(device), targets.to(device), batch_size)[1]
    return results
