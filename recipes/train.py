"""One training run of the shared engine: any task, model and schedule from a config.

    accelerate launch recipes/train.py --config recipes/configs/imagenet_resnet50_step.yaml [--key value]

Writes into `output_dir`: metrics.jsonl (a line per epoch), summary.json, training_curves.png,
`checkpoint/` (every `checkpoint_every` epochs; continue with `--resume`) and `stage_ends/stage{k}/`.
"""
from engine.config import load_config
from engine.loop import train_run
from engine.train_config import TrainConfig


def main():
    train_run(load_config(TrainConfig, description=__doc__))


if __name__ == "__main__":
    main()
