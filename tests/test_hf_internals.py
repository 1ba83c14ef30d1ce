"""The framework internals the Trainer face relies on (``hf_integration.trainer_internals``) still behave as it
assumes: if torch or Transformers change them, these fail, not a user's run."""
import torch
from hf_trainer_tasks import user_trainer


def test_publish_lrs_is_what_get_last_lr_reports():
    from torch.optim.lr_scheduler import LambdaLR

    from hf_integration.trainer_internals import publish_lrs

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = LambdaLR(optimizer, lambda step: 1.0)
    optimizer.param_groups[0]["lr"] = 0.05
    assert scheduler.get_last_lr() == [0.5]  # torch keeps its own copy...
    publish_lrs(scheduler)
    assert scheduler.get_last_lr() == [0.05]  # ...and this is how it is told


def test_trainer_log_appends_the_entry_a_callback_then_annotates(tmp_path):
    from transformers import TrainerCallback

    from hf_integration.trainer_internals import annotate_logged_entry

    class Annotating(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            annotate_logged_entry(state, "loss", {"autodecay/stage": 1})

    trainer = user_trainer(tmp_path, [Annotating()])
    trainer.state.global_step = 7
    trainer.log({"loss": 1.5})
    entry = trainer.state.log_history[-1]
    assert entry["step"] == 7 and entry["loss"] == 1.5 and entry["autodecay/stage"] == 1
