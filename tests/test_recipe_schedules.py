"""The recipes' one schedule interface (recipes/engine/schedules.py), for every peer the SGD loop runs
(recipes/engine/peer_schedules.py): the LR it sets, the stages it counts, the run it ends, and a resume at any
update that continues exactly; and every peer of the registry runs in some domain, refused by name elsewhere."""
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from engine.peer_schedules import TRAINABLE, make_schedule  # noqa: E402
from engine.peers import PEERS  # noqa: E402
from engine.schedules import Schedule, current_lr  # noqa: E402

pytestmark = pytest.mark.slow  # the recipes, not the inner loop (`pytest -m "not slow"`)

CFG = SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=64, lr_reference_batch=0, decay_rate=0.1,
                      milestones=[2, 4], patience=1, num_stages=3, decay_shape="", budget_fraction=1.0,
                      schedule_updates=0, eval_metric="val_top1", val_samples=100)
UPDATES_PER_EPOCH, EPOCHS = 10, 6


def schedule_of(name: str, **changes):
    return make_schedule(SimpleNamespace(**{**vars(CFG), "schedule": name, **changes}))


def new_run(name: str, **changes):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    schedule = schedule_of(name, **changes)
    optimizer = schedule.make_optimizer(model, CFG)
    schedule.start(optimizer, UPDATES_PER_EPOCH, EPOCHS * UPDATES_PER_EPOCH)
    return model, optimizer, schedule


def train(model, optimizer, schedule, updates: range) -> list[tuple]:
    """Drive the schedule as the loop does (a regression task whose loss soon stops falling; after each
    epoch an accuracy that plateaus); one (update, lr, stage, ended) line per update."""
    trace = []
    for update in updates:
        generator = torch.Generator().manual_seed(update)
        inputs = torch.randn(16, 4, generator=generator)
        targets = inputs.sum(1, keepdim=True) + 0.5 * torch.randn(16, 1, generator=generator)
        optimizer.zero_grad()
        loss = F.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        ended = schedule.after_update(loss.detach())
        epochs_done, rest = divmod(update + 1, UPDATES_PER_EPOCH)
        if rest == 0:
            top1 = min(80.0, 50.0 + 10 * epochs_done)
            ended = schedule.after_epoch(epochs_done, loss.item(), {"test_top1": top1, "val_top1": top1}) or ended
        trace.append((update, current_lr(optimizer), schedule.stage, ended))
        if ended:
            break
    return trace


def saved(state: dict) -> dict:
    """`state` after a trip through a file, as Accelerate's save_state / load_state make it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# timm's and statopt's imports take seconds: those two are in the slow layer
NAMES = [pytest.param(name, marks=pytest.mark.slow) if name in ("timm_plateau", "sasa") else name for name in TRAINABLE]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cut", [7, 33])  # mid-epoch in the first stage; after a decay and an epoch's end
def test_resumed_schedule_continues_exactly(name, cut):
    whole = train(*new_run(name), range(EPOCHS * UPDATES_PER_EPOCH))
    model, optimizer, schedule = new_run(name)
    first = train(model, optimizer, schedule, range(cut))
    if first[-1][3]:  # the schedule ended the run before the cut
        assert first == whole
        return
    states = [saved(part.state_dict()) for part in (model, optimizer, schedule)]
    model, optimizer, schedule = new_run(name)
    for part, state in zip((model, optimizer, schedule), states):  # Accelerate's order: models, optimizers, rest
        part.load_state_dict(state)
    assert first + train(model, optimizer, schedule, range(cut, EPOCHS * UPDATES_PER_EPOCH)) == whole


def test_step_decay_ends_stages_at_its_milestones():
    trace = train(*new_run("step"), range(EPOCHS * UPDATES_PER_EPOCH))
    stage_ends = [update + 1 for (update, _, stage, _), (_, _, before, _) in zip(trace[1:], trace) if stage > before]
    assert stage_ends == [20, 40]  # milestones 2 and 4 epochs of 10 updates
    assert [lr for _, lr, _, _ in trace][::20] == pytest.approx([0.1, 0.01, 0.001])


def test_cosine_lowers_the_lr_without_ending_stages():
    trace = train(*new_run("cosine"), range(EPOCHS * UPDATES_PER_EPOCH))
    lrs = [lr for _, lr, _, _ in trace]
    assert all(later < earlier for earlier, later in zip(lrs, lrs[1:-1]))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and {stage for _, _, stage, _ in trace} == {0}


@pytest.mark.parametrize("peer, last_stage", [("autodecay", CFG.num_stages), ("autodecay_step", CFG.num_stages - 1)])
def test_autodecay_ends_the_run_within_its_budget(peer, last_stage):
    """Every stage but the last ends by a decay; the cooldown (the defaults' shape) is a stage of its own."""
    trace = train(*new_run(peer), range(EPOCHS * UPDATES_PER_EPOCH))
    assert trace[-1][3] and trace[-1][0] < EPOCHS * UPDATES_PER_EPOCH
    assert trace[-1][2] == last_stage


def test_every_peer_says_why_and_builds_a_new_schedule():
    for name, peer in PEERS.items():
        assert peer.note, name
        if name in TRAINABLE:
            first, second = schedule_of(name), schedule_of(name)
            assert isinstance(first, Schedule) and first is not second, name
    assert "oracle" not in TRAINABLE and "linear" not in TRAINABLE  # a search; a Trainer schedule


def test_every_peer_runs_in_a_domain_and_is_refused_by_name_elsewhere():
    from engine.backends.finetune import Finetune
    from engine.backends.lm import LM
    from engine.backends.mnist1d import MNIST1D
    from engine.peers import runs_in

    backends = (MNIST1D, LM, Finetune)
    for name, peer in PEERS.items():
        assert any(peer.kind in backend.KINDS for backend in backends), name
    assert runs_in("mnist1d", MNIST1D.KINDS)("step") is None
    assert "peer greedy (kind greedy) cannot run in the mnist1d domain" in runs_in("mnist1d", MNIST1D.KINDS)("greedy")
    assert "peer slope (kind slope) cannot run in the lm domain" in runs_in("lm", LM.KINDS)("slope")
    assert "no peer of that name" in runs_in("lm", LM.KINDS)("cosine_40")  # a budget share is frontier_fractions


def test_fixed_length_schedules_end_the_run_at_their_share_of_the_budget():
    for name, fraction, length in (("cosine", 0.4, 24), ("wsd", 0.6, 36), ("cosine", 1.0, 60)):
        trace = train(*new_run(name, budget_fraction=fraction), range(EPOCHS * UPDATES_PER_EPOCH))
        assert len(trace) == length and trace[-1][3] and trace[-1][1] == pytest.approx(0.0, abs=1e-12), name


def test_wsd_holds_the_lr_then_cools_down_as_one_minus_sqrt():
    trace = train(*new_run("wsd"), range(EPOCHS * UPDATES_PER_EPOCH))
    lrs = [lr for _, lr, _, _ in trace]  # after each update: the LR of the next one
    cooldown = 12  # 20% of 60 updates
    assert lrs[:48] == pytest.approx([0.1] * 48)
    assert lrs[48 + cooldown // 2 - 1] == pytest.approx(0.1 * (1 - (0.5 ** 0.5)))
    assert all(later < earlier for earlier, later in zip(lrs[47:], lrs[48:]))
    assert {stage for _, _, stage, _ in trace} == {0}


def test_paired_length_overrides_the_budget():
    for name in ("cosine", "wsd"):
        schedule = schedule_of(name, schedule_updates=17)
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        schedule.start(optimizer, 10, 60)
        ends = []
        for _ in range(17):
            optimizer.step()
            ends.append(schedule.after_update(torch.tensor(1.0)))
        assert ends == [False] * 16 + [True], name


def test_schedule_free_evaluates_its_average_with_recomputed_batchnorm():
    """Inside `evaluation` the optimizer holds its evaluation weights and BatchNorm's statistics are those of
    the training data under them; training resumes at its own weights."""
    from engine.optimizer_schedules import ScheduleFree

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    schedule = ScheduleFree(lr=0.05, warmup_fraction=0.05)  # the peer's 1.0 is for the CNN, too much here
    optimizer = schedule.make_optimizer(model, CFG)
    schedule.start(optimizer, UPDATES_PER_EPOCH, EPOCHS * UPDATES_PER_EPOCH)
    train(model, optimizer, schedule, range(25))
    inputs = 3.0 + torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    batches = SimpleNamespace(epoch=lambda epoch: iter([(64, [(inputs, None)])] * 60))
    training_weights = [p.detach().clone() for p in model.parameters()]
    trained_statistics = model[1].running_mean.clone()  # of inputs around 0, under the training weights
    with schedule.evaluation(model, batches):
        assert not optimizer.param_groups[0]["train_mode"]
        evaluation_weights = [p.detach().clone() for p in model.parameters()]
        model.eval()
        features = model[0](inputs)
        assert torch.allclose(model[1].running_mean, features.mean(0), rtol=0.01)  # 50 batches at momentum 0.1
    assert optimizer.param_groups[0]["train_mode"]
    assert not torch.allclose(model[1].running_mean, trained_statistics, rtol=0.1)
    assert any(not torch.equal(a, b) for a, b in zip(training_weights, evaluation_weights))
    assert all(torch.equal(a, b) for a, b in zip(training_weights, model.parameters()))
