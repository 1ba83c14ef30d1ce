"""Judge a stopping rule on a finished MNIST-1D benchmark without training: where it would have ended the stable
phase, the length and score that gives, and the best any length-picking rule could have scored.

    python recipes/replay_lengths.py runs/benchmark_eval_noisy/results.json [--max_epochs 15] \
        [--setting eval_patience=4 ...] [--output_dir DIR]

Reads `results.json` from `compare_schedules.py` (it must hold `wsd` at several `frontier_fractions`, 1.0 among
them). For each task and seed, the full-budget WSD run's stable phase (its epochs' mean training loss, then its
`eval_metric` on the validation split) goes through the detector with the defaults and the `--setting`s; its
stable-phase end, followed by the cooldown, is the run's length, and the same seed's WSD frontier at that length
its score (AutoDecay with the cooldown shape is WSD at the length it picks: `engine/length_replay.py`). Beside it,
each seed's best WSD point within `--max_epochs` (default: the budget): the bound for any rule that keeps every seed
within that length.
Writes `length_replay.json`, `length_replay.md` and `length_replay.png` into `--output_dir` (default: beside the
results).
"""
import argparse
import json
import sys
from pathlib import Path

from engine.backends.mnist1d import MNIST1D
from engine.config import ConfigError
from engine.length_replay import markdown, plot, replay_task


def parse_setting(text: str) -> tuple:
    """`name=value`, the value as JSON where it parses (numbers), else the text."""
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"--setting wants NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="results.json of compare_schedules.py")
    parser.add_argument("--max_epochs", type=float, default=0.0, help="the oracle's bound on the length (0: budget)")
    parser.add_argument("--setting", type=parse_setting, action="append", default=[],
                        help="a detector setting, NAME=VALUE (repeatable)")
    parser.add_argument("--output_dir", type=Path, default=None)
    args = parser.parse_args(argv)
    document = json.loads(args.results.read_text())
    config, scale, settings = document["config"], MNIST1D.SCALE, dict(args.setting)
    tasks = config.get("tasks") or [config["task"]]
    max_epochs = args.max_epochs or config["epochs"]
    try:
        replays = [replay_task(document["runs"], task, config["eval_metric"], scale, settings, max_epochs)
                   for task in tasks]
    except (ConfigError, ValueError) as error:
        sys.exit(f"replay_lengths.py: {error}")
    output = args.output_dir or args.results.parent
    output.mkdir(parents=True, exist_ok=True)
    summary = {"results": str(args.results), "settings": settings, "eval_metric": config["eval_metric"],
               "replays": replays}
    (output / "length_replay.json").write_text(json.dumps(summary, indent=1))
    table = markdown(replays, scale, settings)
    (output / "length_replay.md").write_text(table)
    plot(replays, scale, output / "length_replay.png", args.results.parent.name)
    print(table)
    return summary


if __name__ == "__main__":
    main()
