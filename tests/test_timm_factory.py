"""timm's scheduler factory with ``sched="autodecay"``: what it builds, what it leaves alone, the
bad settings it refuses (also those of an earlier release), and no peeking into its callers."""
import re
import warnings
from pathlib import Path

import pytest
import torch
from timm_train_py import BASE_LR, UPE, Toy, import_timm_scheduler, make_args, yaml_keys

from timm_autodecay.detector import SETTINGS
from timm_autodecay.timm_factory import YAML_KEYS

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = "__timm_autodecay_original__"


def test_factory_builds_autodecay_and_leaves_other_schedules_alone():
    from timm_autodecay.timm_scheduler import AutoDecayScheduler

    timm_scheduler = import_timm_scheduler()
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler, num_epochs = timm_scheduler.create_scheduler_v2(
        optimizer, sched="autodecay", num_epochs=30, updates_per_epoch=UPE, warmup_epochs=2, warmup_prefix=True,
        decay_rate=0.5, autodecay_num_stages=2, **yaml_keys())
    assert isinstance(scheduler, AutoDecayScheduler) and num_epochs == 32  # warmup_prefix adds, as in timm
    assert scheduler.detector.total_updates == 32 * UPE and scheduler.detector.warmup_updates == 2 * UPE
    assert scheduler.detector.num_stages == 2 and scheduler.detector.window == 20
    assert scheduler.decay_rate == 0.5 and scheduler.t_in_epochs
    # every detector setting the docs list is a YAML key, generated from the detector's SETTINGS
    own = ("autodecay_end_training", "autodecay_state_file", "autodecay_eval_signal")
    assert {k for k in YAML_KEYS if k not in own} == {
        "autodecay_" + k for k in SETTINGS if k not in ("total_updates", "updates_per_epoch", "warmup_updates")}

    # timm's other schedules: same class, same kwargs as timm's own functions give
    create = timm_scheduler.create_scheduler_v2
    original_create = getattr(create, ORIGINAL)
    args = make_args(sched="cosine", autodecay_window=5)
    kwargs = timm_scheduler.scheduler_kwargs(args)
    assert kwargs == getattr(timm_scheduler.scheduler_kwargs, ORIGINAL)(args)
    ours, _ = create(torch.optim.SGD(Toy().parameters(), lr=BASE_LR), **kwargs, updates_per_epoch=UPE)
    theirs, _ = original_create(torch.optim.SGD(Toy().parameters(), lr=BASE_LR), **kwargs, updates_per_epoch=UPE)
    assert type(ours) is type(theirs) is timm_scheduler.CosineLRScheduler
    assert [ours._get_lr(t) for t in range(30)] == [theirs._get_lr(t) for t in range(30)]
    # timm's create_scheduler (v1) goes through the same factory
    v1 = timm_scheduler.create_scheduler(make_args(**yaml_keys()), optimizer, updates_per_epoch=UPE)
    assert isinstance(v1[0], AutoDecayScheduler)


def test_the_python_factory_needs_no_folder_and_its_optimizer_state_carries_the_schedule():
    """Outside train.py, too, nothing but the optimizer's state is needed: no warning, and a loop that saves
    ``optimizer.state_dict()`` and loads it into a fresh optimizer resumes the schedule with ``step(epoch)``."""
    timm_scheduler = import_timm_scheduler()

    def create():
        optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
        return timm_scheduler.create_scheduler_v2(optimizer, sched="autodecay", num_epochs=30, updates_per_epoch=UPE,
                                                  autodecay_end_training=False, **yaml_keys())[0], optimizer
    losses = [1.0 + 0.001 * (n % 7) for n in range(300)]

    def feed(scheduler, optimizer, epochs, lrs):
        for n in range(epochs.start * UPE + 1, epochs.stop * UPE + 1):
            lrs.append(optimizer.param_groups[0]["lr"])
            k = (n - 1) % UPE + 1
            scheduler.step_update(n, metric=sum(losses[n - k:n]) / k)
            if n % UPE == 0:
                scheduler.step(n // UPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (unbroken, opt_a), (first, opt_b) = create(), create()
    lrs_a, lrs_b = [], []
    feed(unbroken, opt_a, range(0, 30), lrs_a)
    feed(first, opt_b, range(0, 12), lrs_b)
    saved = opt_b.state_dict()
    resumed, opt_c = create()
    opt_c.load_state_dict(saved)
    resumed.step(12)
    feed(resumed, opt_c, range(12, 30), lrs_b)
    assert lrs_a == lrs_b and resumed.history == unbroken.history and len(unbroken.history) >= 2


@pytest.mark.parametrize("where", ["create_scheduler_v2", "config", "class"])
def test_the_retired_state_dir_key_says_what_replaced_it(where, tmp_path):
    from timm_autodecay.timm_scheduler import AutoDecayScheduler

    timm_scheduler = import_timm_scheduler()
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    expected = r"state_dir is no longer a setting: .*travels in the optimizer's state.*drop this key"
    with pytest.raises(ValueError, match=expected):
        if where == "create_scheduler_v2":
            timm_scheduler.create_scheduler_v2(optimizer, sched="autodecay", num_epochs=30, updates_per_epoch=UPE,
                                               autodecay_state_dir=str(tmp_path))
        elif where == "config":
            timm_scheduler.scheduler_kwargs(make_args(autodecay_state_dir=str(tmp_path)))
        else:
            AutoDecayScheduler(optimizer, updates_per_epoch=UPE, t_initial=30, state_dir=str(tmp_path))


def test_no_module_of_the_package_reads_its_callers_frames():
    """The checkpoint folder was once looked up in train.py's frames; the state now travels in the optimizer's
    state, and nothing inspects a caller."""
    found = [f"{path.name}: {match}" for path in sorted((ROOT / "timm_autodecay").rglob("*.py"))
             for match in re.findall(r"_getframe|f_locals|f_back|inspect\.(?:stack|currentframe)", path.read_text())]
    assert found == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(autodecay_windw=30), r"unknown setting\(s\) \['autodecay_windw'\]"),
    (dict(autodecay_window=1), r"config key autodecay_window.*window must be >= 2, got 1"),
    (dict(autodecay_window="50"), r"window must be an integer, got '50'"),
    (dict(autodecay_significance=-1.0), r"significance must be .*got -1.0"),
    (dict(autodecay_num_stages=0), r"num_stages must be >= 1, got 0"),
    (dict(autodecay_end_training="no"), r"end_training must be true or false, got 'no'"),
    (dict(autodecay_eval_signal="yes"), r"autodecay_eval_signal must be true or false .*got 'yes'"),
    (dict(autodecay_eval_mode="up"), r"config key autodecay_eval_mode.*eval_mode must be one of \['min', 'max'\]"),
    (dict(autodecay_total_updates=100), r"autodecay_total_updates is not a setting: .*--epochs"),
    (dict(decay_rate=1.5), r"decay_rate must be in \(0, 1\), got 1.5 \(--decay-rate\)"),
    (dict(min_lr=-0.1), r"--min-lr\) must be a finite number >= 0, got -0.1"),
    (dict(warmup_epochs=30), r"warmup \(30\) must be shorter than the budget \(30\)"),
    (dict(updates_per_epoch=0), r"needs updates_per_epoch .*got 0"),
    (dict(noise=[0.5]), r"LR noise .*not supported"),
])
def test_bad_settings_are_rejected_clearly(kwargs, message):
    timm_scheduler = import_timm_scheduler()
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    arguments = dict(sched="autodecay", num_epochs=30, updates_per_epoch=UPE)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        timm_scheduler.create_scheduler_v2(optimizer, **arguments)


def test_bad_config_keys_are_rejected_by_scheduler_kwargs():
    timm_scheduler = import_timm_scheduler()
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['autodecay_windw'\]; known: .*autodecay_window"):
        timm_scheduler.scheduler_kwargs(make_args(autodecay_windw=30))
    with pytest.raises(ValueError, match=r"autodecay_warmup_updates is not a setting: .*--warmup-epochs"):
        timm_scheduler.scheduler_kwargs(make_args(autodecay_warmup_updates=30))
    # another schedule ignores autodecay keys, as it ignores every key it does not use
    assert "autodecay_windw" not in timm_scheduler.scheduler_kwargs(make_args(sched="step", autodecay_windw=3))




def test_a_warmup_that_leaves_no_stable_phase_names_train_pys_flags():
    timm_scheduler = import_timm_scheduler()
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    args = make_args(epochs=5, warmup_epochs=4)
    with pytest.raises(ValueError, match=r"--epochs .*--warmup-epochs .*warmup_updates \(4"):
        timm_scheduler.create_scheduler_v2(optimizer, **timm_scheduler.scheduler_kwargs(args), updates_per_epoch=UPE)
