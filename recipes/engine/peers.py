"""Every schedule the recipes can train with, by name, each with the settings a user would pick and why.

A `Peer` is a one-line note (why these settings) and a function building its `Schedule` from the run's
config. `TrainConfig.schedule` chooses from these names, `compare_schedules.py`'s `schedules:` list too.
Adding a peer is one entry here (and its name in a config's `schedules:` to run it).

The frontier: a user who guessed the budget right would run cosine or WSD to it. Each is here at 20%, 30%,
40%, 50%, 60%, 80% and 100% of the budget (`frontier` names the line its points draw in the Pareto figure),
and schedule-free SGD, which needs no budget, is evaluated at the same budgets from one run (`budgets`).

Peers that read an evaluation (`reads_eval`: timm's plateau scheduler, `plateau_eval`, `autodecay_eval`) read
the config's `eval_metric` on the validation split (`val_samples`), never the test set the benchmark reports.

The oracle is a study, not a schedule: the grid of fixed two-decay StepDecay schedules, trained by
sharing prefixes (`oracle.py`); its entry has no schedule and `compare_schedules.py` searches it.
"""
from dataclasses import dataclass
from typing import Callable, Optional

from .optimizer_schedules import Sasa, ScheduleFree
from .config import ConfigError
from .schedules import WSD, AutoDecay, Cosine, Plateau, Schedule, StepDecay, TimmPlateau
from .slope_test import SlopeTest

FRONTIER_FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.8)  # of the budget, besides the whole budget


@dataclass(frozen=True)
class Peer:
    note: str  # why these settings, in one line
    schedule: Optional[Callable] = None  # cfg -> a new Schedule; None: the oracle's grid search
    frontier: str = ""  # the frontier line its point belongs to
    budgets: tuple = ()  # fractions of the budget at which its run is also reported (no schedule to end)
    reads_eval: bool = False  # it reads `eval_metric` after every epoch: the run needs a validation split


def autodecay_settings(cfg) -> dict:
    """AutoDecay's settings a config sets (`decay_rate`, and `num_stages`, `decay_shape` when given)."""
    settings = {"decay_rate": cfg.decay_rate, "num_stages": cfg.num_stages or None, "decay_shape": cfg.decay_shape}
    return {key: value for key, value in settings.items() if value}


def budget_points(family: str, note: str, make: Callable) -> dict:
    """`family` at each of FRONTIER_FRACTIONS of the budget: `make(fraction)` builds each one's schedule."""
    return {f"{family}_{round(100 * fraction)}": Peer(f"{note}, to {round(100 * fraction)}% of the budget",
                                                      lambda cfg, fraction=fraction: make(fraction), family)
            for fraction in FRONTIER_FRACTIONS}


PEERS = {
    "step": Peer("the baseline: x0.1 at 10 and 20 of 30 epochs, ImageNet's 30/60/90 scaled to the budget",
                 lambda cfg: StepDecay(cfg.milestones, cfg.decay_rate)),
    "multistep": Peer("StepDecay under torch's name: x`decay_rate` at `milestones`",
                      lambda cfg: StepDecay(cfg.milestones, cfg.decay_rate)),
    "constant": Peer("the initial LR throughout: no schedule at all", lambda cfg: Schedule()),
    "autodecay": Peer("the project's defaults, given only the run's shape (not tuned here): the stable phase ends "
                      "on a plateau (or its share of the budget), then a 1-sqrt cooldown to 0 over 20% of the run",
                      lambda cfg: AutoDecay(**autodecay_settings(cfg))),
    "autodecay_eval": Peer("the defaults plus the evaluation signal: `eval_metric` on the validation split after "
                           "every epoch (step_eval, its mode from the metric's name)",
                           lambda cfg: AutoDecay(eval_metric=cfg.eval_metric, **autodecay_settings(cfg)),
                           reads_eval=True),
    "autodecay_step": Peer("the paper's step shape: x`decay_rate` at each detected stage end, 3 stages",
                           lambda cfg: AutoDecay(decay_rate=cfg.decay_rate, decay_shape="step")),
    "cosine": Peer("cosine to 0 over the whole budget (or `schedule_updates`), per update: timm's default",
                   lambda cfg: Cosine(updates=cfg.schedule_updates), "cosine"),
    **budget_points("cosine", "cosine to 0, per update", lambda fraction: Cosine(fraction)),
    "wsd": Peer("WSD: no warmup (SGD from scratch needs none here), the initial LR, then a 1-sqrt cooldown to 0 over "
                "the last 20% (timm --sched wsd, the Trainer's warmup_stable_decay), whole budget",
                lambda cfg: WSD(updates=cfg.schedule_updates), "wsd"),
    **budget_points("wsd", "WSD, 1-sqrt cooldown over its last 20%", lambda fraction: WSD(fraction)),
    "schedulefree": Peer("schedulefree SGDScheduleFree: lr 1.0 (10x our SGD's; its README: 10-50x), its default "
                         "momentum 0.9, our weight decay, warmup 5% of the budget (its README recommends warmup), "
                         "BatchNorm statistics recomputed before each evaluation",
                         lambda cfg: ScheduleFree(lr=1.0, warmup_fraction=0.05), "schedulefree",
                         FRONTIER_FRACTIONS),
    "plateau": Peer("torch ReduceLROnPlateau on the epoch training loss, the config's `patience`",
                    lambda cfg: Plateau(cfg.patience, cfg.decay_rate)),
    "plateau_p10": Peer("torch ReduceLROnPlateau on the epoch training loss, its default patience 10",
                        lambda cfg: Plateau(10, cfg.decay_rate)),
    "plateau_p3": Peer("patience 3: what a user would pick on a 30-epoch budget (10 is a third of it)",
                       lambda cfg: Plateau(3, cfg.decay_rate)),
    "plateau_eval": Peer("torch ReduceLROnPlateau on `eval_metric` (validation split; mode from its name), "
                         "patience 3 as for plateau_p3",
                         lambda cfg: Plateau(3, cfg.decay_rate, cfg.eval_metric), reads_eval=True),
    "timm_plateau": Peer("timm's PlateauLRScheduler as train.py wires it (step(epoch+1, eval metric): here "
                         "`eval_metric` on the validation split, mode from its name); patience_t 3 as for plateau_p3",
                         lambda cfg: TimmPlateau(cfg.decay_rate, cfg.eval_metric, patience_t=3), reads_eval=True),
    "slope": Peer("dlib's trainer: decay when both the plain and robust counts of updates without evidence of "
                  "decrease reach 375 (3 epochs; dlib's 2000 would be 16 epochs here); the third plateau ends "
                  "the run (dlib's min_learning_rate)",
                  lambda cfg: SlopeTest(cfg.decay_rate, cfg.num_stages or 3, threshold_epochs=3)),
    "sasa": Peer("statopt SASA+: lr 1.0 (dampened momentum 0.9 = torch SGD 0.1), var_mode 'olbm' ('mb' falls back "
                 "to iid), leak_ratio 4 and minN_stats 400 (its docstring's short-run example; the defaults need "
                 "> 8000 updates); it never ends a run early",
                 lambda cfg: Sasa(var_mode="olbm", leak_ratio=4, minN_stats=400)),
    "oracle": Peer("best fixed StepDecay in hindsight: the shortest (m1, m2, length) on the grid within the "
                   "tolerance of StepDecay's accuracy on the same seeds"),
}
TRAINABLE = tuple(name for name, peer in PEERS.items() if peer.schedule is not None)  # the loop's choices


def check_eval_metric(cfg, names) -> None:
    """A ConfigError when one of the schedules `names` reads the evaluation metric but `cfg` holds out no
    validation split to compute it on."""
    readers = [name for name in names if name in PEERS and PEERS[name].reads_eval]
    if readers and not getattr(cfg, "val_samples", 0):
        raise ConfigError(f"val_samples: needed by {', '.join(readers)}, which read eval_metric "
                          f"({cfg.eval_metric}) on a validation split; set val_samples (e.g. 1000)")


def make_schedule(cfg) -> Schedule:
    """A new schedule for the run `cfg` describes (`cfg.schedule` names it)."""
    check_eval_metric(cfg, [cfg.schedule])
    return PEERS[cfg.schedule].schedule(cfg)
