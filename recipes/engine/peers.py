"""Every schedule the recipes can train with, by name, each with the settings a user would pick and why.

A `Peer` is a one-line note (why these settings) and a function building its `Schedule` from the run's
config. `TrainConfig.schedule` chooses from these names, `compare_schedules.py`'s `schedules:` list too.
Adding a peer is one entry here (and its name in a config's `schedules:` to run it).

The oracle is a study, not a schedule: the grid of fixed two-decay StepDecay schedules, trained by
sharing prefixes (`oracle.py`); its entry has no schedule and `compare_schedules.py` searches it.
"""
from dataclasses import dataclass
from typing import Callable, Optional

from .optimizer_schedules import Sasa
from .schedules import AutoDecay, Cosine, Plateau, Schedule, StepDecay, TimmPlateau
from .slope_test import SlopeTest


@dataclass(frozen=True)
class Peer:
    note: str  # why these settings, in one line
    schedule: Optional[Callable] = None  # cfg -> a new Schedule; None: the oracle's grid search


PEERS = {
    "step": Peer("the baseline: x0.1 at 10 and 20 of 30 epochs, ImageNet's 30/60/90 scaled to the budget",
                 lambda cfg: StepDecay(cfg.milestones, cfg.decay_rate)),
    "multistep": Peer("StepDecay under torch's name: x`decay_rate` at `milestones`",
                      lambda cfg: StepDecay(cfg.milestones, cfg.decay_rate)),
    "constant": Peer("the initial LR throughout", lambda cfg: Schedule()),
    "autodecay": Peer("the project's defaults, given only the run's shape (not tuned here)",
                      lambda cfg: AutoDecay(decay_rate=cfg.decay_rate, num_stages=cfg.num_stages)),
    "cosine": Peer("cosine to 0 over the whole budget, per update: the common no-tuning choice",
                   lambda cfg: Cosine()),
    "plateau": Peer("torch ReduceLROnPlateau on the epoch training loss, the config's `patience`",
                    lambda cfg: Plateau(cfg.patience, cfg.decay_rate)),
    "plateau_p10": Peer("torch ReduceLROnPlateau on the epoch training loss, its default patience 10",
                        lambda cfg: Plateau(10, cfg.decay_rate)),
    "plateau_p3": Peer("patience 3: what a user would pick on a 30-epoch budget (10 is a third of it)",
                       lambda cfg: Plateau(3, cfg.decay_rate)),
    "timm_plateau": Peer("timm's PlateauLRScheduler as train.py wires it (eval top-1, mode max, "
                         "step(epoch+1, metric)); patience_t 3 as for plateau_p3",
                         lambda cfg: TimmPlateau(cfg.decay_rate, patience_t=3)),
    "slope": Peer("dlib's trainer: decay when both the plain and robust counts of updates without evidence of "
                  "decrease reach 375 (3 epochs; dlib's 2000 would be 16 epochs here); the third plateau ends "
                  "the run (dlib's min_learning_rate)",
                  lambda cfg: SlopeTest(cfg.decay_rate, cfg.num_stages, threshold_epochs=3)),
    "sasa": Peer("statopt SASA+: lr 1.0 (dampened momentum 0.9 = torch SGD 0.1), var_mode 'olbm' ('mb' falls back "
                 "to iid), leak_ratio 4 and minN_stats 400 (its docstring's short-run example; the defaults need "
                 "> 8000 updates); it never ends a run early",
                 lambda cfg: Sasa(var_mode="olbm", leak_ratio=4, minN_stats=400)),
    "oracle": Peer("best fixed StepDecay in hindsight: the shortest (m1, m2, length) on the grid within the "
                   "tolerance of StepDecay's accuracy on the same seeds"),
}
TRAINABLE = tuple(name for name, peer in PEERS.items() if peer.schedule is not None)  # the loop's choices


def make_schedule(cfg) -> Schedule:
    """A new schedule for the run `cfg` describes (`cfg.schedule` names it)."""
    return PEERS[cfg.schedule].schedule(cfg)
