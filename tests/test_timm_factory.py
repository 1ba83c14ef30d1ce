"""timm's scheduler factory with ``sched="autodecay"``: what it builds, what it leaves alone, the
checkpoint folder it finds, and the bad settings it refuses."""
import warnings
from pathlib import Path

import pytest
import torch
from timm_train_py import BASE_LR, UPE, Toy, import_timm_scheduler, make_args, yaml_keys

from timm_autodecay import timm_factory
from timm_autodecay.detector import SETTINGS
from timm_autodecay.timm_factory import YAML_KEYS

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = "__timm_autodecay_original__"


def test_factory_builds_autodecay_and_leaves_other_schedules_alone(tmp_path, monkeypatch):
    from timm_autodecay.timm_scheduler import AutoDecayScheduler

    timm_scheduler = import_timm_scheduler()
    optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
    scheduler, num_epochs = timm_scheduler.create_scheduler_v2(
        optimizer, sched="autodecay", num_epochs=30, updates_per_epoch=UPE, warmup_epochs=2, warmup_prefix=True,
        decay_rate=0.5, autodecay_num_stages=2, autodecay_state_dir=str(tmp_path), **yaml_keys())
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
    # timm's create_scheduler (v1) goes through the same factory (it has no state folder argument; the warning
    # about that has its own test)
    monkeypatch.setattr(timm_factory, "_warned_no_state_dir", True)
    v1 = timm_scheduler.create_scheduler(make_args(**yaml_keys()), optimizer, updates_per_epoch=UPE)
    assert isinstance(v1[0], AutoDecayScheduler)


def test_the_python_factory_without_a_checkpoint_folder_warns_once(monkeypatch, tmp_path):
    """Outside train.py (no ``saver``) nothing is saved for resume: a clear warning, given once."""
    monkeypatch.setattr(timm_factory, "_warned_no_state_dir", False)
    timm_scheduler = import_timm_scheduler()

    def create(**extra):
        optimizer = torch.optim.SGD(Toy().parameters(), lr=BASE_LR)
        return timm_scheduler.create_scheduler_v2(optimizer, sched="autodecay", num_epochs=30,
                                                  updates_per_epoch=UPE, **extra)[0]
    with pytest.warns(UserWarning, match=r"saves no autodecay_state.json .* autodecay_state_dir=FOLDER"):
        assert create().state_dir is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create()  # once per process
        monkeypatch.setattr(timm_factory, "_warned_no_state_dir", False)
        assert create(autodecay_state_dir=str(tmp_path)).state_dir == str(tmp_path)  # a folder: no warning


def test_train_py_checkpoint_dir_is_found_in_the_calling_frames(tmp_path):
    def main():  # train.py's main(): its saver is a local, only on the primary rank
        saver = type("CheckpointSaver", (), {"checkpoint_dir": str(tmp_path)})()
        assert saver
        return factory()

    def factory():
        return timm_factory.train_py_checkpoint_dir()
    assert main() == str(tmp_path)
    assert factory() is None


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
    arguments = dict(sched="autodecay", num_epochs=30, updates_per_epoch=UPE, autodecay_state_dir="unused")
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
