"""The timm face's names for its settings: ``autodecay_*`` config keys (YAML, ``train.py``'s ``args``,
``create_scheduler_v2`` keywords) and the detector settings that timm's own flags fix.

Imports no timm: the factory reads these while timm's scheduler package is being imported."""
from __future__ import annotations

from typing import Dict

from .detector import SETTINGS

__all__ = ["FROM_RUN", "PREFIX", "RETIRED", "RUN_KEYS", "YAML_KEYS"]

PREFIX = "autodecay_"
# Detector settings that the run's shape fixes: they come from timm's own arguments.
FROM_RUN = {
    "total_updates": "--epochs (num_epochs): the budget",
    "updates_per_epoch": "train.py's batches per epoch (updates_per_epoch)",
    "warmup_updates": "--warmup-epochs (warmup_epochs)",
}
# YAML config keys (``-c config.yaml``): the detector's settings, generated from its SETTINGS, and the
# adapter's own. name -> (type, default, help)
YAML_KEYS: Dict[str, tuple] = {PREFIX + name: spec for name, spec in SETTINGS.items() if name not in FROM_RUN}
YAML_KEYS[PREFIX + "end_training"] = (
    bool, True, "end training at the epoch boundary after the last stage's plateau (and cooldown)")
YAML_KEYS[PREFIX + "state_file"] = (
    str, None, "for checkpoints of releases up to 0.2.0 only, which kept AutoDecay's state in an "
               "autodecay_state.json next to them: that file, kept elsewhere (default: the one next to the --resume "
               "checkpoint); later checkpoints carry the state in their optimizer state")
YAML_KEYS[PREFIX + "eval_signal"] = (
    bool, None, "judge train.py's evaluation metric (--eval-metric) too: the stable phase also ends once it has "
                "stopped improving. Unset: on when train.py evaluates on a validation split at most "
                "60 times in the budget (--epochs / --val-interval), off otherwise")
# Keys that ``scheduler_kwargs`` fills in from train.py's arguments, and ``create_scheduler_v2``
# keyword arguments for Python users; not YAML keys.
RUN_KEYS = {
    PREFIX + "resume": "the checkpoint train.py resumes from (--resume): it holds the metric of the checkpoint's "
                       "evaluation, and next to it lies the autodecay_state.json of a release up to 0.2.0",
    PREFIX + "end_interval": "epochs between boundaries where training may end: train.py's --val-interval",
    PREFIX + "eval_metric": "the metric train.py passes to step(epoch, metric): its --eval-metric, or '' when it "
                            "evaluates nothing (--val-split '': it passes the training loss)",
}
# Keys that meant something in an earlier release, and what to do instead: refused with this text, not as unknown.
RETIRED = {
    PREFIX + "state_dir": "AutoDecay writes no autodecay_state.json any more: its state travels in the optimizer's "
                          "state (param group 0), which train.py saves in every checkpoint; save "
                          "optimizer.state_dict() with your checkpoints and drop this key",
}
