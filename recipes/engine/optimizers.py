"""The recipes' default optimizer: SGD with the config's momentum and weight decay."""
import torch


def initial_lr(cfg) -> float:
    """`lr`, or `lr * batch_size / lr_reference_batch` when a reference batch is set."""
    return cfg.lr * cfg.batch_size / cfg.lr_reference_batch if cfg.lr_reference_batch else cfg.lr


def sgd_optimizer(model: torch.nn.Module, cfg) -> torch.optim.SGD:
    """SGD over the model's parameters at `initial_lr(cfg)`."""
    return torch.optim.SGD(model.parameters(), lr=initial_lr(cfg), momentum=cfg.momentum, weight_decay=cfg.weight_decay)
