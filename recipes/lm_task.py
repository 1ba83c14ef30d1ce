"""The transformer benchmark's task: a character-level GPT-2 trained from scratch on the Python standard
library's own sources, which every Python installation ships (nothing is downloaded).

The corpus is a fixed list of modules read from this Python's standard-library folder and pinned by one
SHA-256 over their bytes: another Python version ships other sources, and the run refuses to start
rather than report numbers on a different task. Training and validation text come from disjoint modules.
The vocabulary is the sorted set of characters of the corpus.

Data order is a pure function of (seed, step): step s trains on items 16s..16s+15 of `TrainWindows`,
windows at offsets drawn once per seed, read sequentially. A run resumed from another run's checkpoint
at step k therefore sees exactly the batches an uninterrupted run sees from step k on. The validation set
is the same for every run: consecutive, non-overlapping windows of the held-out text; each window of
`context` characters scores `context - 1` next-character predictions.
"""
import hashlib
import sysconfig
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
            raise CorpusError(f"corpus file {str(path)!r} (from train_files / validation_files) does not exist")
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


def read_corpus(directory, train_files: list[str], validation_files: list[str], expected_sha256: str,
                validation_chars: int) -> Corpus:
    """The pinned corpus: training text (the train files, concatenated), the first `validation_chars`
    characters of the validation files, and the vocabulary of both."""
    directory = Path(directory) if directory else stdlib_dir()
    overlap = sorted(set(train_files) & set(validation_files))
    if overlap:
        raise CorpusError(f"validation_files must be held out of train_files; both list {overlap}")
    check_checksum(corpus_sha256(directory, train_files + validation_files), expected_sha256, directory)
    train_text = "".join((directory / name).read_text(encoding="utf-8") for name in train_files)
    held_out = "".join((directory / name).read_text(encoding="utf-8") for name in validation_files)
    if len(held_out) < validation_chars:
        raise CorpusError(
            f"validation_chars={validation_chars} but validation_files hold only {len(held_out)} characters"
        )
    validation_text = held_out[:validation_chars]
    vocabulary = "".join(sorted(set(train_text) | set(validation_text)))
    index = {char: i for i, char in enumerate(vocabulary)}
    return Corpus(
        train=torch.tensor([index[c] for c in train_text], dtype=torch.int16),
        validation=torch.tensor([index[c] for c in validation_text], dtype=torch.int16),
        vocabulary=vocabulary,
        sha256=expected_sha256,
    )


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
