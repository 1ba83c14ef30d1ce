"""The ``timm-autodecay`` command line.

``timm-autodecay replay FILE [--column NAME] [--eval-column NAME] [detector settings]`` prints, as one
JSON object, where the detector would have decayed, started its cooldown and finished on a logged run
(with ``--eval-column``, on its evaluations too); warnings (a resumed run's repeated epochs, a budget
that looks like epochs) go to stderr. The settings flags are generated from
``StageDetector.SETTINGS`` so that they never drift from the detector.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from .detector import StageDetector
from .replay import replay_file

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """Every error, argparse's or ours, reads ``timm-autodecay: error: ...`` and exits with 2."""

    def error(self, message):
        self.exit(2, f"timm-autodecay: error: {message}\n{self.format_usage()}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="timm-autodecay", description="AutoDecay: learning-rate step decay at "
                     "the end of each learning stage.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    replay = commands.add_parser(
        "replay", help="run the detector over a logged loss series",
        description="Run the detector over a logged loss series and print where it would have "
                    "decayed and finished, as JSON. FILE: a JSON list of per-update losses, a CSV, a "
                    "timm summary.csv (needs --updates-per-epoch), or a Transformers trainer_state.json.")
    replay.add_argument("file", metavar="FILE")
    replay.add_argument("--column", metavar="NAME",
                        help="CSV column holding the loss (default: train_loss, else loss)")
    replay.add_argument("--eval-column", metavar="NAME",
                        help="replay the evaluations too: a CSV column (timm: eval_top1, eval_loss) or a Trainer "
                             "metric (eval_loss, eval_accuracy); its direction from the name unless --eval-mode")

    settings = replay.add_argument_group("detector settings (default: the detector's own)")
    for name, (kind, default, text) in StageDetector.SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        text = f"{text} (default: {default})"
        # SUPPRESS: an unset flag is left out, so the detector applies its own default
        if kind is bool:
            settings.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                  default=argparse.SUPPRESS, help=text)
        else:
            settings.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS,
                                  metavar=name.upper(), help=text)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    del args["command"]  # "replay", the only one
    path, column, eval_column = args.pop("file"), args.pop("column"), args.pop("eval_column")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = replay_file(path, column=column, eval_column=eval_column, **args)
        except ValueError as error:  # a bad file (ReplayError) or settings the detector rejects
            result = error
    for warning in caught:  # a command line user reads warnings as lines of their own
        sys.stderr.write(f"timm-autodecay: warning: {warning.message}\n")
    if isinstance(result, ValueError):
        parser.exit(2, f"timm-autodecay: error: {result}\n")
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
