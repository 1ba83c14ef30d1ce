"""The keys of one training run (`TrainConfig`): task, model, optimisation, schedule, engine, output.

Every key can be set in a recipe's YAML file or with `--key value` (see `config.load_config`); recipes
extend the dataclass with their own keys.
"""
from dataclasses import dataclass, field

from .models import check_model
from .peer_schedules import TRAINABLE
from .peers import ScheduleSettings
from .tasks import TASKS


@dataclass
class TrainConfig(ScheduleSettings):
    """One training run. Every field can be set in the YAML file or with `--key value` (the schedule's shared
    settings, `decay_rate`, `num_stages`, `decay_shape`, with their defaults in `peers.ScheduleSettings`)."""

    task: str = field(default="mnist1d", metadata={"choices": tuple(TASKS)})
    num_samples: int = 10000  # size of a generated task (train + test)
    data_seed: int = 42  # seed of a generated task; fixed so that runs differ only by `seed`
    classes: list[int] = field(default_factory=list)  # generated tasks: keep these classes (relabelled 0..k-1)
    val_samples: int = 0  # generated tasks: hold the last this many training samples out as a validation split
    train_subset: int = 0  # generated tasks: keep the first this many training samples (0: all; after val_samples)
    model: str = field(default="mnist1d_cnn", metadata={"check": check_model})  # MODELS or timm
    pretrained: bool = False  # timm models: start from pretrained weights (needs the Hub or its cache)
    init_from: str = ""  # start from the model weights of this save_state folder (a fresh classifier if sizes differ)
    epochs: int = 30  # the budget
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = field(default="step", metadata={"choices": TRAINABLE})  # a peer in peers.PEERS
    milestones: list[int] = field(default_factory=lambda: [10, 20])  # step: epochs at which to decay
    patience: int = 10  # plateau: epochs without improvement of the training loss before a decay
    # the metric the schedules that read an evaluation use (timm_plateau, plateau_eval, autodecay_eval): lower is
    # better when its name says loss, else higher (as timm derives its plateau mode); needs val_samples
    eval_metric: str = field(default="val_top1", metadata={"choices": ("val_top1", "val_loss")})
    budget_fraction: float = 1.0  # cosine, wsd: the share of the budget they run to, the run ends there
    schedule_updates: int = 0  # cosine, wsd: their length in updates instead (a paired run's; 0: budget_fraction)
    seed: int = 0  # model init and data order
    # image data read through `datasets` (task hub: a hub name or local path; task image_folder: a folder)
    dataset: str = ""
    dataset_config: str = ""  # the dataset's configuration name, if it has several
    train_split: str = "train"
    test_split: str = "validation"
    image_column: str = "image"
    label_column: str = "label"
    num_classes: int = 0  # 0: from the label column (a ClassLabel)
    streaming: bool = False  # read the splits as streams instead of downloading them first
    train_samples: int = 0  # training split size, for the updates per epoch when streaming (0: from its info)
    shuffle_buffer: int = 10000  # streaming: examples in the shuffle buffer
    image_size: int = 0  # pixels of the model's input (0: the model's default, 224 for ResNet50)
    workers: int = 0  # DataLoader worker processes per training process
    eval_batch_size: int = 0  # 0: batch_size
    # the synthetic pattern task (mechanism study)
    easy_fraction: float = 0.5  # training samples carrying the easy cue (the colour of their class)
    pattern_noise: float = 0.5  # std of the pixel noise
    # engine
    mixed_precision: str = field(default="no", metadata={"choices": ("no", "fp16", "bf16")})  # no: as launched
    grad_accum_steps: int = 1  # micro-batches per process per update; batch_size stays the update's size
    full_batch: bool = False  # gradient descent: one update per epoch over the whole training set
    lr_reference_batch: int = 0  # >0: the LR used is lr * batch_size / lr_reference_batch
    checkpoint_every: int = 1  # save_state into output_dir/checkpoint every this many epochs (0: never)
    save_stage_ends: bool = True  # save_state into output_dir/stage_ends/stage{k} when stage k ends
    resume: bool = False  # continue from output_dir/checkpoint if there is one
    resume_from: str = ""  # continue from this checkpoint folder
    stop_after_epoch: int = 0  # end this invocation after this epoch (a preemption; resume later)
    log_with: str = field(default="none", metadata={"choices": ("none", "tensorboard")})  # Accelerate trackers
    output_dir: str = "runs/train"
    verbose: bool = True  # progress bar and messages (on the main process)
