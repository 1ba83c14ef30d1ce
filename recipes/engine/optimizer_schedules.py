"""Peers that own their optimizer: the optimizer itself decides the learning rate.

- SASA+ (`statopt`): SGD whose own stationarity test decays its LR (x1/`drop_factor`);
- schedule-free SGD (`schedulefree`): no schedule at all; it evaluates an average of its iterates.
"""
import contextlib
import itertools
import warnings

import torch

from .schedules import Schedule


class Sasa(Schedule):
    """statopt's SASA+ optimizer in place of SGD; it decays its own LR (x1/drop_factor) when its
    stationarity test passes. Its momentum is dampened (h = b h + (1 - b) g), so lr / (1 - momentum)."""

    def __init__(self, **sasa_settings):
        super().__init__()
        self.sasa_settings = sasa_settings

    def make_optimizer(self, model, cfg):
        from statopt import SASA

        warnings.filterwarnings("ignore", message=".*add_.*deprecated", category=UserWarning)
        return SASA(model.parameters(), lr=cfg.lr / (1 - cfg.momentum), momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay, drop_factor=round(1 / cfg.decay_rate), **self.sasa_settings)

    def after_update(self, loss):
        self.count_decay()  # the optimizer's step may have lowered its LR
        return False


class ScheduleFree(Schedule):
    """schedulefree's `SGDScheduleFree` in place of SGD (the config's momentum and weight decay), at `lr`
    with a linear warmup over `warmup_fraction` of the budget. It trains at one point and evaluates at
    another (an average of its iterates): the loop evaluates in `evaluation`, which switches the optimizer
    to its evaluation weights and, as schedulefree's README says for BatchNorm, recomputes the BatchNorm
    statistics there on `bn_batches` training batches (train mode, no gradients); it switches back after."""

    def __init__(self, lr: float, warmup_fraction: float, bn_batches: int = 50):
        super().__init__()
        self.lr, self.warmup_fraction, self.bn_batches = lr, warmup_fraction, bn_batches

    def make_optimizer(self, model, cfg):
        from schedulefree import SGDScheduleFree

        return SGDScheduleFree(model.parameters(), lr=self.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def start(self, optimizer, updates_per_epoch, total_updates):
        for group in optimizer.param_groups:
            group["warmup_steps"] = round(self.warmup_fraction * total_updates)
        optimizer.train()
        super().start(optimizer, updates_per_epoch, total_updates)

    @contextlib.contextmanager
    def evaluation(self, model, batches):
        self.optimizer.eval()
        model.train()
        with torch.no_grad():
            for _, micro_batches in itertools.islice(batches.epoch(0), self.bn_batches):
                for inputs, _ in micro_batches:
                    model(inputs)
        try:
            yield
        finally:
            self.optimizer.train()
