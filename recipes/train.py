"""One training run of the shared training module: any task, model and schedule from a config.

    accelerate launch recipes/train.py --config recipes/configs/imagenet_resnet50_step.yaml [--key value]

Writes into `output_dir`: metrics.jsonl (a line per epoch), summary.json, training_curves.png,
`checkpoint/` (every `checkpoint_every` epochs; continue with `--resume`) and `stage_ends/stage{k}/`.
"""
from training import TrainConfig, load_config, make_accelerator, train_run


def main():
    cfg = load_config(TrainConfig, description=__doc__)
    train_run(cfg, make_accelerator(cfg))


if __name__ == "__main__":
    main()
