"""The Transformers callback: a tiny Trainer run written as a user would, with the step shape; exact
resumes with and without restore_callback_states_from_checkpoint; two processes deciding alike; bad
settings; the timm recipe's smoke run. The task is ``hf_trainer_tasks``'s.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_trainer_tasks import LR, MAX_STEPS, STEP, NoisyClassification, loss_logs, user_trainer

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.fixture(scope="module", params=[100, 105], ids=["save_steps=100", "save_steps=105"])
def full_run(request, tmp_path_factory):
    """The uninterrupted run; with save_steps=105 the checkpoints fall between the logging steps."""
    from hf_trainer_callbacks import LRRecorder

    from hf_integration import AutoDecayCallback, find_autodecay_callback

    out = tmp_path_factory.mktemp("full")
    recorder = LRRecorder()
    trainer = user_trainer(out, [AutoDecayCallback(**STEP), recorder], save_steps=request.param)
    result = trainer.train()
    return {"out": out, "trainer": trainer, "result": result, "recorder": recorder, "save_steps": request.param,
            "callback": find_autodecay_callback(trainer)}


@pytest.mark.slow
def test_stages_decay_and_the_last_stops_with_checkpoint(full_run):
    callback, trainer = full_run["callback"], full_run["trainer"]
    history = callback.history
    actions = [h["action"] for h in history]
    assert actions.count("decay") >= 1 and actions[-1] == "finish", history
    stop = trainer.state.global_step
    assert full_run["result"].global_step == stop == history[-1]["update"] < MAX_STEPS
    assert all(h["reason"] == "plateau" for h in history), history  # plateaus, not the budget
    checkpoint = full_run["out"] / f"checkpoint-{stop}"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["AutoDecayCallback"]["attributes"]["detector_state"]["finished"]
    assert (checkpoint / "model.safetensors").exists()

    logs = loss_logs(trainer)
    # every checkpoint follows a loss log (the callback asks for one), so resumes lose no loss
    save_steps = full_run["save_steps"]
    assert all(step in logs for step in range(save_steps, stop, save_steps))
    assert logs[stop]["autodecay/decision"] == "finish"
    decays = [h["update"] for h in history if h["action"] == "decay"]
    for step in decays:
        assert logs[step]["autodecay/decision"] == "decay" and logs[step]["autodecay/reason"] == "plateau"
    # the LR of every logged step is the stage's, and it is the LR the optimizer used at that step
    used = full_run["recorder"].used
    for step, entry in logs.items():
        stage = sum(step > d for d in decays)
        assert entry["autodecay/stage"] == stage
        assert entry["learning_rate"] == pytest.approx(LR * 0.1**stage, rel=1e-12)
        assert set(used[step]) == {entry["learning_rate"]}  # every param group
    # the first decay pays off: the loss after it falls below the stage-0 plateau
    first = decays[0]
    before = [e["loss"] for s, e in logs.items() if first - 100 < s <= first]
    after = [e["loss"] for s, e in logs.items() if first + 50 < s <= first + 150]
    assert sum(after) / len(after) < 0.85 * sum(before) / len(before)


@pytest.mark.slow
@pytest.mark.parametrize("restore", [False, True], ids=["plain-resume", "restore_callback_states"])
def test_resume_mid_stage_continues_identically(full_run, tmp_path, restore):
    from hf_trainer_callbacks import LRRecorder

    from hf_integration import AutoDecayCallback, find_autodecay_callback

    history = full_run["callback"].history
    decays = [h["update"] for h in history if h["action"] == "decay"]
    # a checkpoint strictly inside stage 1 (after the first decay, before the next stage end)
    save_steps = full_run["save_steps"]
    mid = next(s for s in range(save_steps, MAX_STEPS, save_steps) if decays[0] < s < history[1]["update"])
    checkpoint = full_run["out"] / f"checkpoint-{mid}"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    detector_state = saved["stateful_callbacks"]["AutoDecayCallback"]["attributes"]["detector_state"]
    assert detector_state["stage"] == 1 and detector_state["points"]  # mid-stage, with a fit under way

    recorder = LRRecorder()
    trainer = user_trainer(tmp_path, [AutoDecayCallback(**STEP), recorder], save_steps=save_steps,
                           restore_callback_states_from_checkpoint=restore)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    callback = find_autodecay_callback(trainer)
    assert callback.history == history
    assert trainer.state.global_step == full_run["trainer"].state.global_step

    full_logs, resumed_logs = loss_logs(full_run["trainer"]), loss_logs(trainer)
    later = [s for s in full_logs if s > mid]
    assert later and later == [s for s in resumed_logs if s > mid]
    for step in later:
        for key in ("learning_rate", "autodecay/stage", "autodecay/decision", "loss"):
            assert resumed_logs[step].get(key) == full_logs[step].get(key), (step, key)
    full_used = full_run["recorder"].used
    assert all(recorder.used[s] == full_used[s] for s in range(mid + 1, trainer.state.global_step + 1))


@pytest.mark.slow
def test_resume_from_a_checkpoint_without_autodecay(tmp_path):
    from hf_trainer_callbacks import StopAt

    from hf_integration import AutoDecayCallback, find_autodecay_callback

    user_trainer(tmp_path, [StopAt(100)]).train()
    trainer = user_trainer(tmp_path, [AutoDecayCallback(**STEP)])
    with pytest.warns(UserWarning, match="holds no AutoDecay state"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-100"))
    callback = find_autodecay_callback(trainer)
    assert callback.detector.warmup_updates == 100 and callback.history[-1]["action"] == "finish"
    assert (tmp_path / f"checkpoint-{trainer.state.global_step}").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_decide_alike(tmp_path, torchrun):
    finished = torchrun(WORKER, "trainer", tmp_path, env={"HF_HUB_OFFLINE": "1"}, timeout=240)
    assert finished.returncode == 0, finished.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["parallel_mode"] == ranks[1]["parallel_mode"] == "distributed"
    assert ranks[0]["local_losses"] != ranks[1]["local_losses"]  # each rank trains on its own shard
    assert ranks[0]["logged_losses"] == ranks[1]["logged_losses"]  # the Trainer logs their mean
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["history"][-1]["action"] == "finish"
    assert any(h["action"] == "decay" for h in ranks[0]["history"])
    assert ranks[0]["lrs"] == ranks[1]["lrs"] and ranks[0]["used"] == ranks[1]["used"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] < MAX_STEPS


@pytest.mark.parametrize(
    "kwargs, message",
    [({"decay_rate": 1.5}, "1.5"), ({"decay_rate": 0}, "decay_rate"), ({"window": 1}, "window"),
     ({"num_stages": 0}, "num_stages"), ({"patience": -3}, "-3"), ({"significance": "high"}, "'high'"),
     ({"warmup_updates": 50, "total_updates": 40}, "50"), ({"windw": 100}, "windw")],
)
def test_bad_settings_are_refused_by_name(kwargs, message):
    from hf_integration import AutoDecayCallback

    with pytest.raises(ValueError, match=message):
        AutoDecayCallback(**kwargs)


@pytest.mark.slow  # a real Trainer: seconds to import
@pytest.mark.parametrize(
    "overrides, message",
    [({"lr_scheduler_type": "reduce_lr_on_plateau", "eval_strategy": "steps"}, "reduce_lr_on_plateau"),
     ({"logging_strategy": "no"}, "logging_strategy='no'")],
)
def test_unusable_trainer_setups_are_refused(tmp_path, overrides, message):
    from hf_integration import AutoDecayCallback

    trainer = user_trainer(tmp_path, [AutoDecayCallback()], eval_dataset=NoisyClassification(n=64), **overrides)
    with pytest.raises(ValueError, match=message):
        trainer.train()


@pytest.mark.slow  # a real Trainer: seconds to import
def test_coarse_logging_warns_with_what_to_set(tmp_path):
    from hf_trainer_callbacks import StopAt

    from hf_integration import AutoDecayCallback

    trainer = user_trainer(tmp_path, [AutoDecayCallback(**STEP), StopAt(1)], logging_steps=500, save_strategy="no")
    with pytest.warns(UserWarning, match=r"logging_steps=500 gives 0.2 loss logs per AutoDecay window of 100 "
                                         r"steps.*Set logging_steps <= 12"):
        trainer.train()


def make_image_folder(root, classes=("circle", "square", "stripes"), per_split=(("train", 8), ("validation", 4))):
    """A tiny image folder (imagefolder layout: split/class/image.png) of easy synthetic shapes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    masks = {"circle": (yy - 16) ** 2 + (xx - 16) ** 2 < 100, "square": (abs(yy - 16) < 9) & (abs(xx - 16) < 9),
             "stripes": (xx // 4) % 2 == 0}
    for split, count in per_split:
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (32, 32, 3)) + 180 * masks[name][..., None]
                Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_timm_recipe_smoke(tmp_path):
    data = make_image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(ROOT / "recipes" / "hf_trainer_timm.py"),
               "--config", str(ROOT / "recipes" / "configs" / "hf_trainer_timm.yaml"),
               "--dataset", str(data), "--output_dir", str(out), "--image_size", "32", "--max_steps", "12",
               "--logging_steps", "2", "--eval_strategy", "steps", "--eval_steps", "6",
               "--save_strategy", "steps", "--save_steps", "6",
               "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "6"]
    finished = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-4000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["updates"] for line in lines] == [6, 12]
    for line in lines:
        assert {"epoch", "updates", "lr", "stage", "train_loss", "test_loss", "test_top1", "test_top5"} <= line.keys()
        assert 0 <= line["test_top1"] <= line["test_top5"] == 1.0  # 3 classes: top-5 holds them all
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 12 and summary["num_labels"] == 3
    assert (out / "training.png").stat().st_size > 0
    assert (out / "checkpoint-12" / "trainer_state.json").exists()

