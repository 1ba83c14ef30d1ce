"""The recipes' shared engine: image classification with a timm or built-in model, `datasets` or generated
data, and Accelerate. The recipes (one file per job, next to this package) import from its modules:

- `config`: YAML + `--key value` parsing into a dataclass, `ConfigError`;
- `train_config`: `TrainConfig`, the keys of one run;
- `tasks`: the tasks by name (`TASKS`, `make_task`); `models`: the models (`MODELS`, any timm model),
  checkpoint weights and frozen features; `optimizers`: the default SGD;
- `batches`: the updates of an epoch (data order, processes, micro-batches); `evaluation`: test and validation metrics;
- `schedules`: the one `Schedule` interface and the LR schedules behind it; `slope_test` (dlib's) and
  `optimizer_schedules` (peers that own their optimizer);
- `peers`: every schedule by name with the settings a user would pick and why (`PEERS`);
- `loop`: one run (`train_run`); `oracle`: the best fixed StepDecay in hindsight, by a prefix-sharing search;
- `comparison`: the schedule comparison's rows, tables and the paired comparison with the frontier;
- `study`: runs in a pool of worker processes and a study's outputs; `plots`: the figures.
"""
