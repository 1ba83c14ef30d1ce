"""Every schedule the benchmarks compare, by name, each with the settings a user would pick and why: one
registry for every domain.

A `Peer` names a `kind` of schedule (step, cosine, wsd, autodecay, ...) and the settings that make it this
peer rather than another of its kind (`autodecay_step` is AutoDecay with the step shape). Each domain's
back-end (`backends/`) says how it runs each kind it knows: the SGD loop builds a `Schedule`
(`peer_schedules.py`), the Trainer back-end sets TrainingArguments and callbacks (`backends/lm.py`).
Adding a peer of a kind the domains know is one entry here; a domain that does not know its kind refuses
it by name (`runs_in`), before anything trains.

The frontier is data, not names: a `frontier` peer (cosine, WSD) is trained to each of the config's
`frontier_fractions` of the budget, an `evaluated` one (schedule-free: no budget to pick) is trained once
and read at each of them. A run is labelled by `label`, never parsed back.

The settings every kind that decays shares (`decay_rate`, `num_stages`, `decay_shape`) have their defaults
in one place, `ScheduleSettings`: every domain's config inherits it and `settings` merges it with the
peer's own; `num_stages` 0 and `decay_shape` "" leave the schedule's own default (AutoDecay's: 3 stages
with the step shape, 1 with the cooldown; dlib's slope test: 3).
"""
from dataclasses import dataclass, field
from typing import Callable

FRONTIER = "frontier"  # a run per share of the budget in frontier_fractions
EVALUATED = "evaluated"  # one run to the budget, read at every share of it
BUDGET = "budget"  # one run to the budget (it may end earlier by itself)


@dataclass
class ScheduleSettings:
    """The config keys every decaying schedule reads, with their one default each."""

    decay_rate: float = 0.1  # LR multiplier at each decay (step, plateau, slope, autodecay): StepDecay's usual x0.1
    num_stages: int = 0  # autodecay and slope: stages, the run ends after the last (0: the schedule's default)
    decay_shape: str = field(default="", metadata={"choices": ("", "step", "cooldown")})  # autodecay ("": default)


@dataclass(frozen=True)
class Peer:
    note: str  # why these settings, in one line
    kind: str  # what a back-end builds: each back-end's KINDS says which it knows
    settings: dict = field(default_factory=dict)  # this peer's settings of its kind, over the config's
    lengths: str = BUDGET  # BUDGET, FRONTIER or EVALUATED
    reads_eval: bool = False  # its schedule reads an evaluation on the validation split during the run
    evaluated: bool = False  # evaluated on the validation split during the run without reading it
    final_model: bool = False  # a run evaluated during training hands back its last model, not its best


PEERS = {
    "step": Peer("the baseline: x`decay_rate` at `milestones` (1/3 and 2/3 of the budget: ImageNet's 30/60/90 "
                 "scaled to it)", "step"),
    "multistep": Peer("StepDecay under torch's name: x`decay_rate` at `milestones`", "step"),
    "constant": Peer("the initial LR throughout (after the warmup where the domain warms up): no decay; with the "
                     "Trainer, the trunk WSD and StepDecay branch off", "constant"),
    "autodecay": Peer("the project's defaults, given only the run's shape (not tuned here): the stable phase ends "
                      "on a plateau (or its share of the budget), then a 1-sqrt cooldown to 0 over 20% of the run; "
                      "with the Trainer, AutoDecayCallback on constant_with_warmup, as its docs pair them",
                      "autodecay"),
    "autodecay_eval": Peer("the defaults plus the evaluation signal: the validation metric after every epoch (SGD: "
                           "`eval_metric`) or every `eval_every` steps (the Trainer: the loss, with "
                           "metric_for_best_model='loss' and load_best_model_at_end, as its docs pair them)",
                           "autodecay", reads_eval=True),
    "autodecay_loss": Peer("evaluated as autodecay_eval but not reading it (the Trainer: AutoDecayCallback("
                           "eval_signal=False), the best checkpoint handed back): the training loss alone ends the "
                           "stable phase", "autodecay", evaluated=True),
    "autodecay_step": Peer("the paper's step shape: x`decay_rate` at each detected stage end, 3 stages", "autodecay",
                           {"decay_shape": "step"}),
    "cosine": Peer("cosine to 0 at its length, per update (timm's default; with the Trainer, its cosine after the "
                   "same warmup): the common no-tuning choice", "cosine", lengths=FRONTIER),
    "wsd": Peer("WSD: the initial LR (after the Trainer's warmup; SGD from scratch needs none here), then a 1-sqrt "
                "cooldown to 0 over its last 20% (timm --sched wsd, the Trainer's warmup_stable_decay): current "
                "LM practice (Hägele et al. 2024: matches cosine)", "wsd", lengths=FRONTIER),
    "schedulefree": Peer("schedule-free, no budget to pick: SGD, SGDScheduleFree at lr 1.0 (10x our SGD's; its README: "
                         "10-50x), momentum 0.9, warmup 5% of the budget, BatchNorm statistics recomputed before each "
                         "evaluation; the Trainer, optim='schedule_free_adamw' at the same lr (the low end of its "
                         "README's 1x-10x), its own warmup, evaluated in eval mode", "schedulefree",
                         lengths=EVALUATED),
    "plateau": Peer("torch ReduceLROnPlateau on the epoch training loss, the config's `patience`", "plateau"),
    "plateau_p10": Peer("torch ReduceLROnPlateau on the epoch training loss, its default patience 10", "plateau",
                        {"patience": 10}),
    "plateau_p3": Peer("patience 3: what a user would pick on a 30-epoch budget (10 is a third of it)", "plateau",
                       {"patience": 3}),
    "plateau_eval": Peer("torch ReduceLROnPlateau on `eval_metric` (validation split; mode from its name), "
                         "patience 3 as for plateau_p3", "plateau", {"patience": 3}, reads_eval=True),
    "timm_plateau": Peer("timm's PlateauLRScheduler as train.py wires it (step(epoch+1, eval metric): here "
                         "`eval_metric` on the validation split, mode from its name); patience_t 3 as for plateau_p3",
                         "timm_plateau", {"patience_t": 3}, reads_eval=True),
    "slope": Peer("dlib's trainer: decay when both the plain and robust counts of updates without evidence of "
                  "decrease reach 375 (3 epochs; dlib's 2000 would be 16 epochs here); the third plateau ends "
                  "the run (dlib's min_learning_rate)", "slope", {"threshold_epochs": 3}),
    "sasa": Peer("statopt SASA+: lr 1.0 (dampened momentum 0.9 = torch SGD 0.1), var_mode 'olbm' ('mb' falls back "
                 "to iid), leak_ratio 4 and minN_stats 400 (its docstring's short-run example; the defaults need "
                 "> 8000 updates); it never ends a run early", "sasa",
                 {"var_mode": "olbm", "leak_ratio": 4, "minN_stats": 400}),
    "oracle": Peer("best fixed StepDecay in hindsight: the shortest (m1, m2, length) on the grid within the "
                   "tolerance of StepDecay's accuracy on the same seeds", "oracle"),
    "linear": Peer("the Trainer's default schedule (linear to 0 at the budget, same warmup), evaluated but the final "
                   "model handed back: a user who sets nothing", "linear", evaluated=True, final_model=True),
    "linear_es": Peer("linear + EarlyStoppingCallback(early_stopping_patience) + load_best_model_at_end: the "
                      "Trainer's own answer to overfitting", "linear", {"early_stopping": True}, reads_eval=True),
    "greedy": Peer("the Trainer's lr_scheduler_type='greedy' (GreedyLR: x factor after `patience` evaluations "
                   "without a new best, / factor after as many with; no warmup), greedy_kwargs, final model",
                   "greedy", reads_eval=True, final_model=True),
}


def settings(peer: Peer, cfg: ScheduleSettings) -> dict:
    """The settings of a run of `peer`: the config's `decay_rate`, its `num_stages` and `decay_shape` where it
    sets them, under the peer's own (autodecay_step's step shape holds whatever the config says)."""
    given = {"decay_rate": cfg.decay_rate, "num_stages": cfg.num_stages, "decay_shape": cfg.decay_shape}
    return {**{key: value for key, value in given.items() if value}, **peer.settings}


def chosen(values: dict, *keys) -> dict:
    """The entries of `values` that a schedule takes: a config may set settings another kind reads."""
    return {key: values[key] for key in keys if key in values}


def label(name: str, fraction: float = 1.0, paired_with: str = "") -> str:
    """A run's name in tables and folders: the peer's name for the whole budget, NAME_PERCENT for a share of it,
    NAME_at_PAIRED for a run trained to the length of a run of PAIRED."""
    if paired_with:
        return f"{name}_at_{paired_with}"
    return name if fraction == 1.0 else f"{name}_{round(100 * fraction)}"


def runs_in(domain: str, kinds) -> Callable:
    """A config `check` (see `config.load_config`): why a peer name cannot run in `domain`, whose back-end
    knows `kinds`; None when it can."""
    def problem(name: str):
        if name not in PEERS:
            return (f"no peer of that name: see PEERS in recipes/engine/peers.py ({', '.join(PEERS)}); a share of "
                    "the budget is frontier_fractions, not a name")
        if PEERS[name].kind not in kinds:
            able = ", ".join(sorted(peer for peer, entry in PEERS.items() if entry.kind in kinds))
            return f"peer {name} (kind {PEERS[name].kind}) cannot run in the {domain} domain; it runs {able}"
        return None
    return problem

