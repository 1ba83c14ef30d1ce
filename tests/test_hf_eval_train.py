"""The evaluation signal in real Trainer runs (``hf_trainer_tasks.eval_trainer``: a tiny MLP learning 256 noisy
points by heart, evaluated every 50 steps on 1024 held-out ones, the best model kept by accuracy): the
held-out accuracy ends the run long before the budget while the training loss still falls; a resume after
the peak continues exactly; two processes whose compute_metrics differ decide alike."""
import json
from pathlib import Path

import pytest
from hf_trainer_tasks import MAX_STEPS, loss_logs

WORKER = Path(__file__).with_name("distributed_worker.py")


def evaluations(trainer):
    return {entry["step"]: entry for entry in trainer.state.log_history if "eval_accuracy" in entry}


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    from hf_trainer_tasks import eval_trainer

    from hf_integration import AutoDecayCallback, find_autodecay_callback

    out = tmp_path_factory.mktemp("eval")
    trainer = eval_trainer(out, [AutoDecayCallback()])
    trainer.train()
    return {"out": out, "trainer": trainer, "callback": find_autodecay_callback(trainer)}


@pytest.mark.slow
def test_the_held_out_accuracy_ends_the_run_early_while_the_training_loss_falls(eval_run):
    trainer, callback = eval_run["trainer"], eval_run["callback"]
    first, last = callback.history[0], callback.history[-1]
    assert (first["action"], first["reason"]) == ("cooldown", "evaluation"), callback.history
    assert last["action"] == "finish" and trainer.state.global_step == last["update"] < MAX_STEPS / 2
    assert (eval_run["out"] / f"checkpoint-{last['update']}").exists()
    evals = evaluations(trainer)
    assert last["update"] in evals  # the final model is evaluated too, so load_best_model_at_end weighs it
    assert evals[first["update"]]["autodecay/decision"] == "cooldown"
    best = callback.best_eval
    assert best["value"] == max(e["eval_accuracy"] for e in evals.values())
    assert first["update"] - best["update"] in range(150, 301, 50)  # the rule's patience after the best
    # the Trainer kept the best model (load_best_model_at_end)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['update']}")
    # the training loss kept falling: alone it would not have ended the stage there
    logs = loss_logs(trainer)
    window = [sum(logs[s]["loss"] for s in range(end - 90, end + 1, 10)) for end in (first["update"] - 100,
                                                                                       first["update"])]
    assert window[1] < 0.8 * window[0]


@pytest.mark.slow
@pytest.mark.parametrize("restore", [False, True], ids=["plain-resume", "restore_callback_states"])
def test_resume_after_the_peak_continues_exactly(eval_run, tmp_path, restore):
    from hf_trainer_tasks import eval_trainer

    from hf_integration import AutoDecayCallback, find_autodecay_callback

    full, history = eval_run["trainer"], eval_run["callback"].history
    mid = eval_run["callback"].best_eval["update"] + 50  # evaluations under way, the stage not yet ended
    assert mid < history[0]["update"]
    checkpoint = eval_run["out"] / f"checkpoint-{mid}"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["AutoDecayCallback"]["attributes"]["detector_state"]["evaluations"]["count"]

    trainer = eval_trainer(tmp_path, [AutoDecayCallback()], restore_callback_states_from_checkpoint=restore)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    callback = find_autodecay_callback(trainer)
    assert callback.history == history and callback.best_eval == eval_run["callback"].best_eval
    assert trainer.state.global_step == full.state.global_step
    full_evals, resumed_evals = evaluations(full), evaluations(trainer)
    for step in (s for s in full_evals if s > mid):
        for key in ("eval_accuracy", "eval_loss", "autodecay/decision"):
            assert resumed_evals[step].get(key) == full_evals[step].get(key), (step, key)
    full_logs, resumed_logs = loss_logs(full), loss_logs(trainer)
    for step in (s for s in full_logs if s > mid):
        assert resumed_logs[step]["loss"] == full_logs[step]["loss"]
        assert resumed_logs[step]["learning_rate"] == full_logs[step]["learning_rate"]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_whose_metrics_differ_decide_alike(tmp_path, torchrun):
    finished = torchrun(WORKER, "trainer_eval", tmp_path, env={"HF_HUB_OFFLINE": "1"}, timeout=240)
    assert finished.returncode == 0, finished.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["local"] != ranks[1]["local"]  # each rank's compute_metrics gave its own values
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["history"][0]["reason"] == "evaluation"
    assert ranks[0]["best_eval"] == ranks[1]["best_eval"]
    assert ranks[0]["lrs"] == ranks[1]["lrs"] and ranks[0]["global_step"] == ranks[1]["global_step"] < MAX_STEPS
