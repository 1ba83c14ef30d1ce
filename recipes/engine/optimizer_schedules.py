"""Peers that own their optimizer: the optimizer itself decides the learning rate.

- SASA+ (`statopt`): SGD whose own stationarity test decays its LR (x1/`drop_factor`).
"""
import warnings

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
