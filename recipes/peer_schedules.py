"""The schedules AutoDecay is compared with, each with the settings a user would pick, and the oracle.

`PEERS` maps a name to a `Peer`: how it runs and a one-line note on why its settings. Three kinds:
- "train_run": a schedule that `training.train_run` knows (StepDecay, cosine, ReduceLROnPlateau,
  AutoDecay), given by its TrainConfig settings;
- "loop": a schedule driven by a `Policy` that `training.train_run` calls after every update and
  epoch: dlib's slope test, SASA+ (statopt), timm's deprecated plateau scheduler;
- "oracle": `oracle_search`, the grid of fixed two-decay StepDecay schedules, trained once per seed
  by sharing prefixes (see there).
"""
import copy
import math
import time
import warnings
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import ndtr

from training import TASKS, TrainConfig, evaluate, make_model_and_optimizer


@dataclass(frozen=True)
class Peer:
    kind: str  # "train_run", "loop" or "oracle"
    note: str  # why these settings, in one line
    settings: dict = field(default_factory=dict)  # TrainConfig overrides ("train_run") or Policy keywords


PEERS = {
    "step": Peer("train_run", "the baseline: x0.1 at 10 and 20 of 30 epochs, ImageNet's 30/60/90 scaled to the budget",
                 {"schedule": "step"}),
    "autodecay": Peer("train_run", "the project's defaults, given only the run's shape (not tuned here)",
                      {"schedule": "autodecay"}),
    "cosine": Peer("train_run", "cosine to 0 over the whole budget, per update: the common no-tuning choice",
                   {"schedule": "cosine"}),
    "plateau_p10": Peer("train_run", "torch ReduceLROnPlateau on the epoch training loss, its default patience 10",
                        {"schedule": "plateau", "patience": 10}),
    "plateau_p3": Peer("train_run", "patience 3: what a user would pick on a 30-epoch budget (10 is a third of it)",
                       {"schedule": "plateau", "patience": 3}),
    "timm_plateau": Peer("loop", "timm's PlateauLRScheduler as train.py wires it (eval top-1, mode max, "
                                 "step(epoch+1, metric)); patience_t 3 as for plateau_p3", {"patience_t": 3}),
    "slope": Peer("loop", "dlib's trainer: decay when both the plain and robust counts of updates without "
                          "evidence of decrease reach 375 (3 epochs; dlib's 2000 would be 16 epochs here); "
                          "the third plateau ends the run (dlib's min_learning_rate)",
                  {"threshold_epochs": 3}),
    "sasa": Peer("loop", "statopt SASA+: lr 1.0 (dampened momentum 0.9 = torch SGD 0.1), var_mode 'olbm' ('mb' "
                         "falls back to iid), leak_ratio 4 and minN_stats 400 (its docstring's short-run example; "
                         "the defaults need > 8000 updates); it never ends a run early",
                 {"var_mode": "olbm", "leak_ratio": 4, "minN_stats": 400}),
    "oracle": Peer("oracle", "best fixed StepDecay in hindsight: the shortest (m1, m2, length) on the grid within "
                             "the tolerance of StepDecay's accuracy on the same seeds"),
}


# ----------------------------------------------------------------------------------------------
# dlib's slope test
# ----------------------------------------------------------------------------------------------
def count_steps_without_decrease(values, probability_of_decrease: float = 0.51, quantile_discard: float = 0.0) -> int:
    """dlib's `count_steps_without_decrease` (and, with `quantile_discard` > 0, its `_robust` variant).

    Walks back from the newest value, fitting an OLS line to the values seen so far; returns the
    largest number of values examined for which P(the slope is negative) < `probability_of_decrease`.
    The robust variant leaves out values above the (1 - quantile_discard) quantile of the container
    (dlib: `nth_element` at floor(quantile_discard * size) in descending order).
    """
    y = np.asarray(values, dtype=np.float64)[::-1]  # newest first
    if len(y) < 3:
        return 0
    keep = np.ones(len(y), dtype=bool)
    if quantile_discard > 0:
        index = int(math.floor(quantile_discard * len(y)))
        threshold = np.sort(y)[::-1][index]
        keep = y <= threshold
    kept = y[keep]
    n = np.arange(1, len(kept) + 1, dtype=np.float64)
    x = n - 1
    sx, sy = np.cumsum(x), np.cumsum(kept)
    sxx = np.cumsum(x * x) - sx * sx / n
    sxy = np.cumsum(x * kept) - sx * sy / n
    syy = np.cumsum(kept * kept) - sy * sy / n
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = sxy / sxx  # against age: positive when the forward series decreases
        residual = np.maximum(syy - slope * sxy, 0.0) / (n - 2)
        z = slope / np.sqrt(residual / sxx)
    p_decrease = ndtr(np.nan_to_num(z, nan=0.0, posinf=np.inf, neginf=-np.inf))
    no_evidence = (n > 2) & (p_decrease < probability_of_decrease)
    # j values examined -> the fit over the kept ones among them (dlib checks after every value)
    kept_count = np.cumsum(keep)
    usable = kept_count > 2
    hits = np.zeros(len(y), dtype=bool)
    hits[usable] = no_evidence[kept_count[usable] - 1]
    return int(np.nonzero(hits)[0][-1] + 1) if hits.any() else 0


# ----------------------------------------------------------------------------------------------
# Policies: the hooks `training.train_run(cfg, accelerator, policy)` calls
# ----------------------------------------------------------------------------------------------
class Policy:
    """The optimizer to use, and what to do after each update and epoch (return True to end the run)."""

    def make_optimizer(self, model, default_optimizer, cfg: TrainConfig, updates_per_epoch: int):
        return default_optimizer

    def after_update(self, loss: torch.Tensor) -> bool:
        return False

    def after_epoch(self, epochs_done: int, train_loss: float, test_top1: float) -> bool:
        return False


class SlopeTestPolicy(Policy):
    """dlib `dnn_trainer`: keep the last `threshold` losses; check when the budget (+200 per update)
    exceeds `threshold`; if both counts reach `threshold`, multiply the LR by `decay_rate` (or end the
    run, once `num_stages - 1` decays are done) and drop the oldest 20% + 10% of the losses
    (dlib's previous_loss_values_dump_amount 400 of 2000, plus threshold / 10)."""

    def __init__(self, threshold_epochs: float = 3, probability_of_decrease: float = 0.51,
                 quantile_discard: float = 0.10):
        self.threshold_epochs = threshold_epochs
        self.probability_of_decrease = probability_of_decrease
        self.quantile_discard = quantile_discard

    def make_optimizer(self, model, default_optimizer, cfg, updates_per_epoch):
        self.optimizer, self.decay_rate, self.num_stages = default_optimizer, cfg.decay_rate, cfg.num_stages
        self.threshold = round(self.threshold_epochs * updates_per_epoch)
        self.losses, self.budget, self.decays = deque(maxlen=self.threshold), 0, 0
        return default_optimizer

    def after_update(self, loss):
        self.losses.append(loss.item())
        self.budget += 200
        if self.budget <= self.threshold:
            return False
        self.budget = 0
        if count_steps_without_decrease(self.losses, self.probability_of_decrease) < self.threshold:
            return False
        if count_steps_without_decrease(self.losses, self.probability_of_decrease, self.quantile_discard) < self.threshold:
            return False
        if self.decays == self.num_stages - 1:
            return True  # the LR would fall below min_learning_rate: dlib stops training
        self.decays += 1
        for group in self.optimizer.param_groups:
            group["lr"] *= self.decay_rate
        for _ in range(min(len(self.losses), int(0.2 * self.threshold) + self.threshold // 10)):
            self.losses.popleft()
        return False


class SasaPolicy(Policy):
    """statopt's SASA+ optimizer in place of SGD; it decays its own LR (x1/drop_factor) when its
    stationarity test passes. Its momentum is dampened (h = b h + (1 - b) g), so lr / (1 - momentum)."""

    def __init__(self, **sasa_settings):
        self.sasa_settings = sasa_settings

    def make_optimizer(self, model, default_optimizer, cfg, updates_per_epoch):
        from statopt import SASA

        warnings.filterwarnings("ignore", message=".*add_.*deprecated", category=UserWarning)
        return SASA(model.parameters(), lr=cfg.lr / (1 - cfg.momentum), momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay, drop_factor=round(1 / cfg.decay_rate), **self.sasa_settings)


class TimmPlateauPolicy(Policy):
    """timm's PlateauLRScheduler stepped as timm's train.py does: step(epoch + 1, eval top-1)."""

    def __init__(self, **plateau_settings):
        self.plateau_settings = plateau_settings

    def make_optimizer(self, model, default_optimizer, cfg, updates_per_epoch):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from timm.scheduler.plateau_lr import PlateauLRScheduler

            self.scheduler = PlateauLRScheduler(default_optimizer, decay_rate=cfg.decay_rate, mode="max",
                                                **self.plateau_settings)
        return default_optimizer

    def after_epoch(self, epochs_done, train_loss, test_top1):
        self.scheduler.step(epochs_done, test_top1)
        return False


POLICIES = {"slope": SlopeTestPolicy, "sasa": SasaPolicy, "timm_plateau": TimmPlateauPolicy}


# ----------------------------------------------------------------------------------------------
# One epoch for the oracle's branches (single process, CPU)
# ----------------------------------------------------------------------------------------------
def epoch_batches(data, cfg, epoch: int):
    """The benchmark's data order (BENCHMARK.md): a permutation seeded by seed * 100003 + epoch, cut
    into batches of `batch_size`, the last partial one kept."""
    order = torch.randperm(len(data.train_targets), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    for batch in order.split(cfg.batch_size):
        yield data.train_inputs[batch], data.train_targets[batch]


def evaluate_test(model, data, cfg) -> tuple[float, float]:
    """Test loss and top-1 as `train_run` computes them."""
    return evaluate(model, data.test_inputs, data.test_targets,
                    getattr(cfg, "eval_batch_size", 0) or min(cfg.batch_size, 1024))


def train_epoch(model, optimizer, data, cfg, epoch) -> float:
    """One epoch in the benchmark's order, each update computed as `train_run` computes it on one
    process (so a branch matches a full run bit for bit); returns the mean training loss. The oracle
    needs epochs it can branch between, which `train_run` does not offer."""
    model.train()
    loss_sum, count = torch.zeros(()), 0
    for inputs, targets in epoch_batches(data, cfg, epoch):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs).float(), targets, reduction="sum") * (1 / len(targets))
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        count += 1
    return loss_sum.item() / count


def oracle_search(cfg: TrainConfig, first_milestones: list[int], gaps: list[int], tails: list[int]) -> dict:
    """Test accuracy of StepDecay x`decay_rate` at m1 and m2 = m1 + gap, stopped after m2 + tail epochs,
    for every m1, gap, tail on the grid, for `cfg.seed`.

    Runs are deterministic given seed and schedule, and two schedules agree until their first
    different milestone; so the trunk (LR 0.1) is trained once, its model/optimizer state kept in
    memory at each m1, a branch (LR 0.01) is trained from each for max(gaps) epochs, its state kept
    at each m2, and from each a last branch (LR 0.001) for max(tails) epochs, evaluated after every
    epoch. Decays take effect at the first update of epoch m (as MultiStepLR at update m * 125 does).
    Cost: max(m1) + len(m1) * max(gap) + len(m1) * len(gaps) * max(tail) epochs instead of a full
    run per grid point. Returns {"grid": {"m1,m2,length": top-1}, "curves": {branch: per-epoch records}}.
    """
    data = TASKS[cfg.task](cfg)
    model, optimizer = make_model_and_optimizer(cfg, data.num_classes)
    updates_per_epoch = math.ceil(len(data.train_targets) / cfg.batch_size)
    run_start = time.perf_counter()

    def snapshot():
        return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())

    def restore(state):
        model.load_state_dict(state[0])
        optimizer.load_state_dict(state[1])

    def decay():
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * cfg.decay_rate  # as MultiStepLR computes it

    def record(epoch, train_loss):
        test_loss, test_top1 = evaluate_test(model, data, cfg)
        return {"epoch": epoch + 1, "updates": (epoch + 1) * updates_per_epoch, "lr": optimizer.param_groups[0]["lr"],
                "train_loss": train_loss, "test_loss": test_loss, "test_top1": test_top1}

    curves, grid, epochs_trained = {"trunk": []}, {}, 0
    trunk_states = {}
    for epoch in range(max(first_milestones)):
        if epoch in first_milestones:
            trunk_states[epoch] = snapshot()
        train_loss = train_epoch(model, optimizer, data, cfg, epoch)
        curves["trunk"].append(record(epoch, train_loss))
        epochs_trained += 1
    trunk_states[max(first_milestones)] = snapshot()

    for m1 in sorted(first_milestones):
        restore(trunk_states.pop(m1))
        decay()
        second_states, key1 = {}, f"{m1}"
        curves[key1] = []
        for epoch in range(m1, m1 + max(gaps)):
            if epoch - m1 in gaps:
                second_states[epoch] = snapshot()
            train_loss = train_epoch(model, optimizer, data, cfg, epoch)
            curves[key1].append(record(epoch, train_loss))
            epochs_trained += 1
        second_states[m1 + max(gaps)] = snapshot()
        for gap in sorted(gaps):
            m2 = m1 + gap
            restore(second_states.pop(m2))
            decay()
            key2 = f"{m1},{m2}"
            curves[key2] = []
            for epoch in range(m2, m2 + max(tails)):
                train_loss = train_epoch(model, optimizer, data, cfg, epoch)
                curves[key2].append(record(epoch, train_loss))
                epochs_trained += 1
                if epoch + 1 - m2 in tails:
                    grid[f"{m1},{m2},{epoch + 1}"] = curves[key2][-1]["test_top1"]
    return {"schedule": "oracle_grid", "seed": cfg.seed, "grid": grid, "curves": curves,
            "epochs_trained": epochs_trained, "wall_seconds": time.perf_counter() - run_start}


def oracle_curve(curves: dict, m1: int, m2: int, length: int) -> list[dict]:
    """The per-epoch records of the fixed schedule (m1, m2, length), stitched from the shared branches."""
    trunk = [line for line in curves["trunk"] if line["epoch"] <= m1]
    second = [line for line in curves[f"{m1}"] if line["epoch"] <= m2]
    third = [line for line in curves[f"{m1},{m2}"] if line["epoch"] <= length]
    return trunk + second + third


def choose_oracle(grids: list[dict], target: float) -> tuple[str, float]:
    """The grid point whose mean accuracy over `grids` (one per seed) is >= `target`, shortest first,
    then most accurate; if none reaches the target, the most accurate one. Returns (key, mean)."""
    means = {key: float(np.mean([grid[key] for grid in grids])) for key in grids[0]}
    reaching = [key for key, mean in means.items() if mean >= target]
    if reaching:
        best = min(reaching, key=lambda key: (int(key.split(",")[2]), -means[key]))
    else:
        best = max(means, key=means.get)
    return best, means[best]
