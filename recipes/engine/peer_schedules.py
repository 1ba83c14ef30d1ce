"""How the SGD loop (`loop.py`) runs each kind of peer: the `Schedule` a run of a peer in `peers.PEERS` trains with.

`TrainConfig.schedule` chooses from `TRAINABLE`, the peers whose kind is here (the oracle is a search,
`oracle.py`, not a schedule). The loop evaluates after every epoch whatever the peer and reports the last
model: the Trainer's `evaluated` and `final_model` have nothing to choose here. Peers that read an evaluation
(`reads_eval`) read the config's `eval_metric` on the validation split (`val_samples`), never the test set the
benchmark reports.
"""
from .config import ConfigError
from .optimizer_schedules import Sasa, ScheduleFree
from .peers import PEERS, Peer, chosen, settings
from .schedules import WSD, AutoDecay, Cosine, Plateau, Schedule, StepDecay, TimmPlateau
from .slope_test import SlopeTest


def fixed_length(cfg) -> dict:
    """The length of a frontier run: `schedule_updates` (a paired run's) when given, else its budget share."""
    return {"budget_fraction": cfg.budget_fraction, "updates": cfg.schedule_updates}


def eval_metric(peer: Peer, cfg) -> str:
    return cfg.eval_metric if peer.reads_eval else ""


KINDS = {  # (peer, its settings, cfg) -> a new Schedule
    "step": lambda peer, s, cfg: StepDecay(cfg.milestones, s["decay_rate"]),
    "constant": lambda peer, s, cfg: Schedule(),
    "autodecay": lambda peer, s, cfg: AutoDecay(eval_metric(peer, cfg), **chosen(s, "decay_rate", "num_stages",
                                                                                 "decay_shape")),
    "cosine": lambda peer, s, cfg: Cosine(**fixed_length(cfg)),
    "wsd": lambda peer, s, cfg: WSD(**fixed_length(cfg)),
    "schedulefree": lambda peer, s, cfg: ScheduleFree(lr=1.0, warmup_fraction=0.05),
    "plateau": lambda peer, s, cfg: Plateau(s.get("patience", cfg.patience), s["decay_rate"],
                                            eval_metric(peer, cfg) or "train_loss"),
    "timm_plateau": lambda peer, s, cfg: TimmPlateau(s["decay_rate"], eval_metric(peer, cfg), **peer.settings),
    "slope": lambda peer, s, cfg: SlopeTest(**chosen(s, "decay_rate", "num_stages", "threshold_epochs")),
    "sasa": lambda peer, s, cfg: Sasa(**peer.settings),
}
TRAINABLE = tuple(name for name, peer in PEERS.items() if peer.kind in KINDS)  # the loop's choices


def check_eval_metric(cfg, names) -> None:
    """A ConfigError when one of the peers `names` reads the evaluation metric but `cfg` holds out no
    validation split to compute it on."""
    readers = [name for name in names if name in PEERS and PEERS[name].reads_eval]
    if readers and not getattr(cfg, "val_samples", 0):
        raise ConfigError(f"val_samples: needed by {', '.join(readers)}, which read eval_metric "
                          f"({cfg.eval_metric}) on a validation split; set val_samples (e.g. 1000)")


def make_schedule(cfg) -> Schedule:
    """A new schedule for the run `cfg` describes (`cfg.schedule` names its peer)."""
    check_eval_metric(cfg, [cfg.schedule])
    peer = PEERS[cfg.schedule]
    return KINDS[peer.kind](peer, settings(peer, cfg), cfg)
