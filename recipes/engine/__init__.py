"""The recipes' shared engine: image classification with a timm or built-in model, `datasets` or generated
data, and Accelerate; and the benchmarks, one stack over a back-end per domain. The recipes (one file per
job, next to this package) import from its modules:

- `config`: YAML + `--key value` parsing into a dataclass, `ConfigError`;
- `train_config`: `TrainConfig`, the keys of one run;
- `tasks`: the tasks by name (`TASKS`, `make_task`); `models`: the models (`MODELS`, any timm model),
  checkpoint weights and frozen features; `optimizers`: the default SGD;
- `batches`: the updates of an epoch (data order, processes, micro-batches); `evaluation`: test and validation metrics;
- `schedules`: the one `Schedule` interface and the LR schedules behind it; `slope_test` (dlib's) and
  `optimizer_schedules` (peers that own their optimizer);
- `loop`: one run (`train_run`); `oracle`: the best fixed StepDecay in hindsight, by a prefix-sharing search;
- `study`: runs in a pool of worker processes and a study's outputs; `plots`: the figures of runs;
  `study_statistics`: the science recipes' measurements and tests; `transfer_report`: the transfer study's report;
- the benchmarks: `peers` (every schedule by name, the settings a user would pick and why: `PEERS`, for every
  domain), `peer_schedules` (each peer as the loop's `Schedule`), `benchmark` (the shared config keys, the
  runs a config asks for, the report a benchmark writes), `runner` (the runs in a pool: shared prefixes,
  reuse, progress), `report` (rows, envelope, paired comparison), `report_tables`, `pareto` (the figure),
  and `backends/` (a domain each: `mnist1d`, `lm`, `finetune`).
"""
