"""Offline, deterministic training data.

Two sources share one loader interface:

* ``stdlib``: a real byte-level language-modelling corpus made from the
  Python standard library's own ``*.py`` source files. It needs no download
  and is the same on every machine with the same Python version. Tokens are
  raw bytes, so the vocabulary is 256.
* ``synthetic``: uniformly random tokens, for throughput benchmarks where the
  data content does not matter.

How the corpus is built (:class:`ByteCorpus`):

1. Walk ``sysconfig.get_paths()["stdlib"]``, skipping any directory named
   ``test``, ``tests``, ``idlelib`` or ``site-packages`` (tests are huge and
   repetitive; site-packages is whatever happens to be installed).
2. Sort the ``*.py`` files by their POSIX relative path and take whole files
   in that order until the next one would push the total past ``max_bytes``.
3. Assign a file to validation iff
   ``zlib.crc32(relative_path.encode()) % 100 < val_percent``; everything
   else is training. Splitting by file (not by offset) keeps near-duplicate
   lines of one module from appearing on both sides of the split, and using
   crc32 of the path means adding or removing other files never moves a file
   between splits.
4. Each split is its files concatenated in sorted order, each followed by a
   separator byte 0 (which never occurs in source text).

How batches are drawn (:class:`BatchLoader`): at step ``s`` a CPU generator
seeded from ``(seed, s)`` draws ``batch_size * world_size`` random start
offsets; rank ``r`` takes rows ``r*batch_size:(r+1)*batch_size``. So the
global batch depends only on (seed, step, global batch size): runs with
world size 1 x batch 8 and world size 2 x batch 4 see exactly the same
sequences. Because each step has its own generator, the loader's whole state
is the step counter, and ``load_state_dict`` resumes the exact stream.
"""

from __future__ import annotations

import abc
import functools
import os
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch

from dist_ortho.core.seeds import derive_seed

__all__ = [
    "CorpusConfig",
    "ByteCorpus",
    "BatchLoader",
    "SyntheticTokens",
    "build_loader",
    "SKIP_DIRS",
    "SEPARATOR",
    "BYTE_VOCAB_SIZE",
]

SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})
SEPARATOR = 0
BYTE_VOCAB_SIZE = 256
SPLITS = ("train", "val")


@dataclass(frozen=True)
class CorpusConfig:
    """Which stdlib files make up the corpus and how they are split.

    ``root`` defaults to the running interpreter's stdlib directory; point it
    elsewhere to build the same kind of corpus from another source tree.
    """

    max_bytes: int = 8_000_000
    val_percent: int = 10
    root: str | None = None

    def validate(self) -> None:
        if not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
            raise ValueError(f"CorpusConfig.max_bytes must be a positive int, got {self.max_bytes!r}")
        if not isinstance(self.val_percent, int) or not 0 <= self.val_percent <= 100:
            raise ValueError(
                f"CorpusConfig.val_percent must be an int in [0, 100], got {self.val_percent!r}"
            )

    def resolved_root(self) -> Path:
        return Path(self.root if self.root is not None else sysconfig.get_paths()["stdlib"])


def is_val_file(rel_path: str, val_percent: int) -> bool:
    """The documented split rule: crc32 of the POSIX relative path, mod 100."""
    return zlib.crc32(rel_path.encode()) % 100 < val_percent


def _list_source_files(root: Path) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of the (large) skipped trees.
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and d != "__pycache__"]
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    return sorted(found)


@dataclass
class ByteCorpus:
    """The stdlib byte corpus: ``train`` and ``val`` uint8 tensors plus file lists."""

    config: CorpusConfig = field(default_factory=CorpusConfig)
    train: torch.Tensor = field(init=False, repr=False)
    val: torch.Tensor = field(init=False, repr=False)
    train_files: list[str] = field(init=False, repr=False)
    val_files: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.config.validate()
        root = self.config.resolved_root()
        if not root.is_dir():
            raise ValueError(f"corpus root {str(root)!r} is not a directory; set CorpusConfig.root")
        parts: dict[str, list[bytes]] = {"train": [], "val": []}
        files: dict[str, list[str]] = {"train": [], "val": []}
        total = 0
        for rel in _list_source_files(root):
            data = (root / rel).read_bytes()
            # Whole files only, so the split stays a clean partition of files.
            if total + len(data) + 1 > self.config.max_bytes:
                break
            total += len(data) + 1
            split = "val" if is_val_file(rel, self.config.val_percent) else "train"
            parts[split] += [data, bytes([SEPARATOR])]
            files[split].append(rel)
        if total == 0:
            raise ValueError(
                f"no *.py files under {str(root)!r} fit in max_bytes={self.config.max_bytes}; "
                "raise CorpusConfig.max_bytes or check CorpusConfig.root"
            )
        self.train = _to_tensor(b"".join(parts["train"]))
        self.val = _to_tensor(b"".join(parts["val"]))
        self.train_files = files["train"]
        self.val_files = files["val"]

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return self.train if name == "train" else self.val


def _to_tensor(data: bytes) -> torch.Tensor:
    # bytearray gives frombuffer a writable buffer, avoiding its warning.
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@functools.lru_cache(maxsize=4)
def _cached_corpus(config: CorpusConfig) -> ByteCorpus:
    # Train and val loaders of one run share a corpus instead of reading twice.
    return ByteCorpus(config)


def _check_sharding(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


class _SteppedLoader(abc.ABC):
    """Shared stepping, sharding and state logic; subclasses draw one global batch."""

    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device | str | None,
    ) -> None:
        _check_sharding(batch_size, seq_len, rank, world_size)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device) if device is not None else None
        self.step = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @abc.abstractmethod
    def _draw_global(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) for the whole global batch, drawn only from ``gen``."""

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) for ``step``, without changing the loader's position."""
        gen = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, step))
        x, y = self._draw_global(gen)
        assert x.shape == (self.global_batch_size, self.seq_len), x.shape
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        x, y = x[rows], y[rows]
        if self.device is not None:
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state["step"]``. The world size may change as long as
        the global batch size and seed match, since those define the stream."""
        for key in ("seed", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has "
                    f"{getattr(self, key)!r}; resuming would replay a different data stream"
                )
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"loader state needs a non-negative int 'step', got {step!r}")
        self.step = step


class BatchLoader(_SteppedLoader):
    """Random windows of a uint8 token stream: x = data[o:o+T], y = data[o+1:o+T+1]."""

    def __init__(
        self,
        data: torch.Tensor,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(batch_size, seq_len, seed, rank, world_size, device)
        assert data.dim() == 1, data.shape
        if data.numel() < seq_len + 1:
            raise ValueError(
                f"split has {data.numel()} tokens, fewer than seq_len+1={seq_len + 1}; "
                "use a shorter seq_len or a larger corpus (CorpusConfig.max_bytes)"
            )
        self.data = data

    def _draw_global(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # Largest valid start is numel - seq_len - 1 (y needs one byte more).
        # drawn on the generator's device (the CPU), whatever torch's default device is
        starts = torch.randint(
            0, self.data.numel() - self.seq_len, (self.global_batch_size,), generator=gen,
            device=gen.device,
        )
        idx = starts[:, None] + torch.arange(self.seq_len + 1, device=gen.device)[None, :]
        windows = self.data[idx].long()
        return windows[:, :-1], windows[:, 1:]


class SyntheticTokens(_SteppedLoader):
    """Uniform random tokens with the same interface as :class:`BatchLoader`.

    ``y`` is ``x`` shifted by one, like real next-token data, so a model can
    at best learn the unigram distribution (loss ln(vocab_size)).
    """

    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int = BYTE_VOCAB_SIZE,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(batch_size, seq_len, seed, rank, world_size, device)
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        self.vocab_size = vocab_size

    def _draw_global(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(
            0, self.vocab_size, (self.global_batch_size, self.seq_len + 1), generator=gen,
            device=gen.device,
        )
        return tokens[:, :-1], tokens[:, 1:]


LOADER_KINDS = ("stdlib", "synthetic")
# Distinct seed offsets so the val stream is never a copy of the train stream
# (matters for synthetic data, where both splits come from the same source).
_SPLIT_SALT = {"train": 0, "val": 0x5EED}


def build_loader(
    kind: Literal["stdlib", "synthetic"],
    split: Literal["train", "val"],
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    *,
    corpus: CorpusConfig | None = None,
    vocab_size: int = BYTE_VOCAB_SIZE,
    device: torch.device | str | None = None,
) -> BatchLoader | SyntheticTokens:
    """Build a sharded, resumable loader of (x, y) LongTensor batches.

    ``corpus`` configures the stdlib corpus (default :class:`CorpusConfig`);
    ``vocab_size`` applies to synthetic data only (the stdlib corpus is bytes).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    split_seed = derive_seed(seed, _SPLIT_SALT[split])
    if kind == "stdlib":
        data = _cached_corpus(corpus or CorpusConfig()).split(split)
        return BatchLoader(data, batch_size, seq_len, split_seed, rank, world_size, device)
    if kind == "synthetic":
        return SyntheticTokens(batch_size, seq_len, split_seed, rank, world_size, vocab_size, device)
    raise ValueError(f"unknown data kind {kind!r}; use one of {', '.join(LOADER_KINDS)}")
