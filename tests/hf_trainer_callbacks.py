"""Callbacks that watch or steer a real Trainer in the tests: this module imports Transformers, so only the
tests that train import it (see ``conftest.py``)."""
from transformers import TrainerCallback


class LRRecorder(TrainerCallback):
    """The LR each optimizer step actually uses, read from the optimizer right before it steps."""

    def __init__(self):
        self.used = {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.used[state.global_step + 1] = [group["lr"] for group in optimizer.param_groups]


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True


class UnfreezeAt(TrainerCallback):
    """A user's callback unfreezing the frozen first layer at ``step`` (a new param group at the LR the
    other groups have then)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.step:
            layer = model.net[0]
            layer.requires_grad_(True)
            optimizer.add_param_group({"params": list(layer.parameters()), "lr": optimizer.param_groups[0]["lr"],
                                       "weight_decay": 0.0})
