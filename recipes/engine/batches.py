"""The updates of an epoch: the benchmark's data order, cut into updates and split over processes and
micro-batches so that the global batch is the config's whatever the number of processes."""
import itertools

import torch
from torch.utils.data import DataLoader

from .config import ConfigError
from .tasks import ImageTask, TaskData


class Batches:
    """The updates of an epoch, each a list of this process's micro-batches (inputs, targets) on the
    device, with the update's global sample count.

    Data order of epoch e: a permutation seeded by `seed * 100003 + e` (the benchmark's), cut into
    updates of `batch_size` samples (the whole training set with `full_batch`); each update is split
    evenly between the processes and each process's share into `grad_accum_steps` micro-batches, so the
    global batch is `batch_size` however many processes run. A last partial batch is kept unless it is
    too small to give every micro-batch a sample. Streams are shuffled in a buffer and split by node.
    """

    def __init__(self, task, cfg, accelerator):
        self.task, self.cfg, self.accelerator = task, cfg, accelerator
        self.processes, self.micro = accelerator.num_processes, cfg.grad_accum_steps
        if cfg.grad_accum_steps < 1:
            raise ConfigError(f"grad_accum_steps: invalid value {cfg.grad_accum_steps} (at least 1)")
        self.train_size = task.train_size if isinstance(task, ImageTask) else len(task.train_targets)
        self.batch_size = self.train_size if cfg.full_batch else cfg.batch_size
        shares = self.processes * self.micro
        if cfg.full_batch and self.train_size % shares:
            raise ConfigError(
                f"grad_accum_steps: full_batch needs micro-batches of equal size: {self.train_size} training "
                f"samples do not split into {self.processes} process(es) x {self.micro} micro-batches"
            )
        streaming = isinstance(task, ImageTask) and task.streaming
        if streaming and self.batch_size % shares:
            raise ConfigError(
                f"batch_size: {self.batch_size} does not split into {shares} equal micro-batches (streaming)"
            )
        full, rest = divmod(self.train_size, self.batch_size)
        self.updates_per_epoch = full + (1 if rest >= shares and not streaming else 0)
        if self.updates_per_epoch == 0:
            raise ConfigError(f"batch_size: {self.batch_size} is larger than the training set ({self.train_size})")

    def _index_updates(self, epoch: int):
        """Per update: its global size and this process's micro-batches of sample indices."""
        order = torch.randperm(self.train_size, generator=torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch))
        if isinstance(self.task, TaskData):
            order = order.to(self.accelerator.device)  # one copy per epoch, not one per micro-batch
        rank = self.accelerator.process_index
        for batch in order.split(self.batch_size)[: self.updates_per_epoch]:
            local = batch.tensor_split(self.processes)[rank]
            yield len(batch), local.tensor_split(self.micro)

    def epoch(self, epoch: int):
        device = self.accelerator.device
        task = self.task
        if isinstance(task, TaskData):
            inputs, targets = task.train_inputs.to(device), task.train_targets.to(device)
            for size, micro_batches in self._index_updates(epoch):
                yield size, [(inputs[m], targets[m]) for m in micro_batches]
            return
        if task.streaming:
            stream = self._stream(epoch)
            for _ in range(self.updates_per_epoch):
                yield self.batch_size, [self._to_device(next(stream)) for _ in range(self.micro)]
            return
        updates = list(self._index_updates(epoch))
        micro_lists = [m.tolist() for _, micro_batches in updates for m in micro_batches]
        loader = iter(self._loader(task.train, batch_sampler=micro_lists))
        for size, _ in updates:
            yield size, [self._to_device(next(loader)) for _ in range(self.micro)]

    def _stream(self, epoch: int):
        """This process's share of the shuffled training stream, in micro-batches, restarted (next
        shuffle) if this share runs out before the epoch's updates are done."""
        from datasets.distributed import split_dataset_by_node

        micro_size = self.batch_size // (self.processes * self.micro)
        for repeat in itertools.count():
            stream = self.task.train.shuffle(seed=self.cfg.seed * 100003 + epoch, buffer_size=self.cfg.shuffle_buffer)
            stream.set_epoch(repeat)
            stream = split_dataset_by_node(stream, self.accelerator.process_index, self.processes)
            yield from self._loader(stream, batch_size=micro_size, drop_last=True)

    def _loader(self, dataset, **kwargs) -> DataLoader:
        workers = self.cfg.workers
        return DataLoader(
            dataset, num_workers=workers, persistent_workers=False, pin_memory=self.accelerator.device.type == "cuda",
            **kwargs,
        )

    def _to_device(self, batch):
        device = self.accelerator.device
        return batch["inputs"].to(device, non_blocking=True), batch["targets"].to(device, non_blocking=True)
