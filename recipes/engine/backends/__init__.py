"""A benchmark's back-end per domain (`benchmark.Backend`): how it trains one run and what its report adds.

- `mnist1d`: a CNN on MNIST-1D (any `TrainConfig` task) with SGD, through the engine's loop;
- `lm`: a character-level GPT-2 trained from scratch with AdamW through the Hugging Face Trainer
  (`lm_data`: the pinned corpus; `lm_trainer`: one Trainer run);
- `finetune`: that GPT-2 pre-trained once, then fine-tuned on English prose.
"""
