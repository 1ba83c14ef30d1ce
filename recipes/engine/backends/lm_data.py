"""The transformer benchmark's task: a character-level GPT-2 trained from scratch on the Python standard
library's own sources, which every Python installation ships (nothing is downloaded).

The corpus is a fixed list of modules read from this Python's standard-library folder and pinned by one
SHA-256 over their bytes: another Python version ships other sources, and the run refuses to start
rather than report numbers on a different task. The modules' text, concatenated, is cut into blocks of
`validation_block` characters; every `validation_every`-th block is held out of training, and the first
`validation_chars` held-out characters are the validation text: it samples every part of the corpus, as a
random held-out split would, and no training window comes from it. The vocabulary is the sorted set of
characters of the corpus.

Data order is a pure function of (seed, step): step s trains on items 16s..16s+15 of `TrainWindows`,
windows at offsets drawn once per seed, read sequentially. A run resumed from another run's checkpoint
at step k therefore sees exactly the batches an uninterrupted run sees from step k on. The validation set
is the same for every run: consecutive, non-overlapping windows of the held-out text; each window of
`context` characters scores `context - 1` next-character predictions.

The fine-tuning text (`read_finetune_text`) is prose, not source: the documentation topics every CPython
ships for `help()` (`pydoc_data.topics`, the values of its `topics` dict joined in sorted-key order),
pinned by its SHA-256 in the same way. Its characters outside the pre-training vocabulary (typographic
quotes, dashes, an ellipsis: 563 of 464,970 on CPython 3.11.7) are dropped. The text is cut into blocks of
`block` characters, read in groups of `every`: in each group the last block goes to the test split, the
one before it to the validation split, the others to training, each split until it holds its share; so
the three are disjoint and each samples the same stretch of the documentation.
"""
import hashlib
import importlib
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch


class CorpusError(ValueError):
    """The corpus on this machine is not the pinned one (or cannot be read)."""


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # character ids of the training text
    validation: torch.Tensor  # character ids of the validation windows, validation_chars long
    vocabulary: str  # the characters, sorted; a character's id is its index
    sha256: str


def stdlib_dir() -> Path:
    """This Python's standard-library folder (where `os.py` lives)."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_sha256(directory: Path, files: list[str]) -> str:
    """SHA-256 over the bytes of `files`, in the given order."""
    digest = hashlib.sha256()
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CorpusError(f"corpus file {str(path)!r} (from files) does not exist")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def check_checksum(actual: str, expected: str, directory: Path, config_key: str = "corpus_sha256") -> None:
    """Refuse a corpus that differs from the pinned one, naming both checksums and the way forward."""
    if actual == expected:
        return
    raise CorpusError(
        f"the corpus read from {str(directory)!r} has SHA-256 {actual}, but {config_key} pins {expected}. "
        "Another Python version ships other standard-library sources, so the task (and every number) would "
        "differ from the published ones. To run the pinned task, use the Python the checksum was taken on "
        "(see the config's comment); to benchmark on this corpus anyway, set "
        f"--{config_key} {actual} and compare only runs made with it."
    )


def read_corpus(directory, files: list[str], expected_sha256: str, validation_chars: int,
                validation_block: int, validation_every: int) -> Corpus:
    """The pinned corpus: every `validation_every`-th block of `validation_block` characters held out
    (the first `validation_chars` of them are the validation text), the rest the training text."""
    directory = Path(directory) if directory else stdlib_dir()
    if validation_every < 2 or validation_block < 1:
        raise CorpusError(f"validation_every must be >= 2 and validation_block >= 1, got {validation_every} "
                          f"and {validation_block}")
    check_checksum(corpus_sha256(directory, files), expected_sha256, directory)
    text = "".join((directory / name).read_text(encoding="utf-8") for name in files)
    blocks = [text[i:i + validation_block] for i in range(0, len(text), validation_block)]
    held_out = "".join(blocks[validation_every - 1::validation_every])
    if len(held_out) < validation_chars:
        raise CorpusError(f"validation_chars={validation_chars} but the held-out blocks (every "
                          f"{validation_every}th of {validation_block} characters) hold only {len(held_out)}")
    train_text = "".join(block for i, block in enumerate(blocks) if (i + 1) % validation_every)
    vocabulary = "".join(sorted(set(text)))
    index = {char: i for i, char in enumerate(vocabulary)}
    return Corpus(
        train=torch.tensor([index[c] for c in train_text], dtype=torch.int16),
        validation=torch.tensor([index[c] for c in held_out[:validation_chars]], dtype=torch.int16),
        vocabulary=vocabulary,
        sha256=expected_sha256,
    )


TOPICS_MODULE = "pydoc_data.topics"  # the fine-tuning text: English prose shipped with every CPython


@dataclass(frozen=True)
class TopicsSplit:
    """Which fine-tuning text (pinned) and how it is split: the settings a fine-tuning run depends on."""

    sha256: str
    block: int
    every: int
    train_chars: int
    validation_chars: int
    test_chars: int


@dataclass(frozen=True)
class FinetuneText:
    train: torch.Tensor  # character ids (the pre-training vocabulary's) of the training split
    validation: torch.Tensor  # what evaluations during training read (the evaluation signal, EarlyStopping)
    test: torch.Tensor  # what the benchmark reports; no schedule reads it
    dropped: dict  # characters outside the pre-training vocabulary, removed: {character: count}


def topics_text() -> tuple[str, Path]:
    """The documentation topics of `help()`, joined in sorted-key order, and the file they come from."""
    module = importlib.import_module(TOPICS_MODULE)
    return "".join(module.topics[key] for key in sorted(module.topics)), Path(module.__file__)


def read_finetune_text(vocabulary: str, split: TopicsSplit) -> FinetuneText:
    """The pinned topics text in the pre-training vocabulary, split into disjoint train, validation and test
    blocks (see the module's docstring); raises CorpusError when the text differs or is too short."""
    if split.every < 3 or split.block < 1:
        raise CorpusError(f"finetune_every must be >= 3 and finetune_block >= 1, got {split.every} and "
                          f"{split.block}")
    text, path = topics_text()
    check_checksum(hashlib.sha256(text.encode("utf-8")).hexdigest(), split.sha256, path, "finetune_sha256")
    dropped = Counter(char for char in text if char not in vocabulary)
    kept = "".join(char for char in text if char in vocabulary)
    wanted = {"train": split.train_chars, "validation": split.validation_chars, "test": split.test_chars}
    parts: dict = {name: [] for name in wanted}
    filled = dict.fromkeys(wanted, 0)
    for i in range(0, len(kept), split.block):
        position = i // split.block % split.every
        name = "test" if position == split.every - 1 else "validation" if position == split.every - 2 else "train"
        take = kept[i:i + split.block][:wanted[name] - filled[name]]
        parts[name].append(take)
        filled[name] += len(take)
        if filled == wanted:
            break
    if filled != wanted:
        raise CorpusError(f"the fine-tuning text ({len(kept):,} characters) cannot fill the splits {wanted} "
                          f"with blocks of {split.block} in groups of {split.every} (it fills {filled})")
    index = {char: i for i, char in enumerate(vocabulary)}
    ids = {name: torch.tensor([index[c] for c in "".join(parts[name])], dtype=torch.int16) for name in wanted}
    return FinetuneText(**ids, dropped=dict(sorted(dropped.items())))


class TrainWindows(torch.utils.data.Dataset):
    """`count` training windows of `context` characters at offsets drawn once from `seed`: item i is
    the i-th window (read them in order: the order is the seed's data order)."""

    def __init__(self, tokens: torch.Tensor, context: int, count: int, seed: int):
        if len(tokens) <= context:
            raise CorpusError(f"the training text ({len(tokens)} characters) is shorter than context={context}")
        generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(tokens) - context + 1, (count,), generator=generator)
        self.tokens, self.context = tokens, context

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict:
        start = int(self.offsets[i])
        window = self.tokens[start:start + self.context].long()
        return {"input_ids": window, "labels": window}


class ValidationWindows(torch.utils.data.Dataset):
    """The validation text cut into consecutive windows of `context` characters (the same for every run)."""

    def __init__(self, tokens: torch.Tensor, context: int):
        if len(tokens) % context:
            raise CorpusError(f"validation_chars ({len(tokens)}) must be a multiple of context ({context})")
        self.windows = tokens.long().view(-1, context)

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def predictions(self) -> int:
        """The next-character predictions the validation loss averages over."""
        return self.windows.numel() - len(self.windows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def make_model(vocab_size: int, context: int, n_layer: int, n_embd: int, n_head: int, seed: int):
    """A GPT-2 from its config, initialised from `seed`. No dropout: the runs see each character less
    than once, and without it a run is a pure function of its seed and schedule. Exact GELU: GPT-2's
    tanh approximation, unfused, costs a fifth of a CPU training step."""
    from transformers import GPT2Config, GPT2LMHeadModel  # here: reading the corpus needs no transformers

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=context, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # what transformers falls back to anyway, with a warning per run
    return model
