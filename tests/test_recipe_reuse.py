"""A finished run is read back, not trained again, only when it is the run asked for: the rule every recipe's
reuse of saved runs goes through (`recipes/engine/loop.py`'s `same_config`)."""
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # imports the recipes' engine (Accelerate): seconds, not the inner loop
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))


def saved_config(cfg, without=()):
    saved = json.loads(json.dumps(asdict(cfg)))  # as summary.json holds it
    for key in without:
        saved.pop(key)
    return saved


def test_a_run_saved_before_a_config_key_was_added_is_reused_only_at_that_keys_default():
    from engine.loop import same_config
    from engine.train_config import TrainConfig

    cfg = TrainConfig(lr=0.2, batch_size=32)
    assert same_config(saved_config(cfg), cfg)
    older = saved_config(cfg, without=["budget_fraction"])  # written before the key existed
    assert same_config(older, cfg)
    assert not same_config(older, replace(cfg, budget_fraction=0.5))
    assert not same_config(saved_config(replace(cfg, lr=0.1)), cfg)
    assert not same_config(None, cfg)
