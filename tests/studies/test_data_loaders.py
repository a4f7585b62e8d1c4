"""Tests for dist_ortho.studies.data: the stdlib byte corpus and the sharded loaders."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from dist_ortho.studies.data import (SEPARATOR, BatchLoader, ByteCorpus, CorpusConfig,
                                     SyntheticTokens, build_loader)


@pytest.fixture(scope="module")
def corpus() -> ByteCorpus:
    return ByteCorpus(CorpusConfig())


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture()
def fake_root(tmp_path: Path) -> Path:
    """A tiny source tree with files that must be skipped or kept."""
    for i in range(30):
        _write(tmp_path, f"pkg{i % 3}/mod{i:02d}.py", f"x = {i}\n" * (i + 1))
    _write(tmp_path, "a.py", "print('a')\n")
    _write(tmp_path, "notes.txt", "not python\n")
    for skipped in ("test", "tests", "idlelib", "site-packages", "pkg0/tests"):
        _write(tmp_path, f"{skipped}/skip_me.py", "SKIPPED\n")
    return tmp_path


# ------------------------------------------------------------------ corpus


def test_stdlib_corpus_size_and_split(corpus: ByteCorpus) -> None:
    total = corpus.train.numel() + corpus.val.numel()
    assert 6_000_000 < total <= 8_000_000
    assert corpus.train.dtype == corpus.val.dtype == torch.uint8
    # Roughly val_percent of files, and both splits are substantial.
    n_files = len(corpus.train_files) + len(corpus.val_files)
    assert 0.05 < len(corpus.val_files) / n_files < 0.15
    assert corpus.val.numel() > 200_000
    assert not set(corpus.train_files) & set(corpus.val_files)
    for rel in corpus.val_files:
        assert zlib.crc32(rel.encode()) % 100 < 10, rel
    for rel in corpus.train_files:
        assert zlib.crc32(rel.encode()) % 100 >= 10, rel
    every = corpus.train_files + corpus.val_files
    assert not any(part in {"test", "tests", "idlelib", "site-packages"}
                   for rel in every for part in rel.split("/"))
    assert "os.py" in every
    assert sorted(corpus.train_files) == corpus.train_files


def test_corpus_layout_on_fake_tree(fake_root: Path) -> None:
    c = ByteCorpus(CorpusConfig(root=str(fake_root), val_percent=30))
    files = c.train_files + c.val_files
    assert len(files) == 31 and "a.py" in files
    assert not any("skip_me" in f for f in files)
    # Each split is its files' bytes, in sorted order, each followed by byte 0.
    for split, names in (("train", c.train_files), ("val", c.val_files)):
        expected = b"".join((fake_root / n).read_bytes() + bytes([SEPARATOR]) for n in names)
        assert bytes(c.split(split).tolist()) == expected
    assert c.val_files and c.train_files
    assert b"SKIPPED" not in bytes(c.train.tolist()) + bytes(c.val.tolist())


def test_corpus_is_deterministic_and_capped(fake_root: Path) -> None:
    a = ByteCorpus(CorpusConfig(root=str(fake_root)))
    b = ByteCorpus(CorpusConfig(root=str(fake_root)))
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.train_files == b.train_files
    full = a.train.numel() + a.val.numel()
    capped = ByteCorpus(CorpusConfig(root=str(fake_root), max_bytes=full // 2))
    kept = capped.train_files + capped.val_files
    assert 0 < capped.train.numel() + capped.val.numel() <= full // 2
    # The cap keeps a prefix of the sorted file list.
    assert sorted(kept) == sorted(a.train_files + a.val_files)[: len(kept)]
    # Membership of a file in a split never depends on the cap.
    assert set(capped.val_files) <= set(a.val_files)


def test_corpus_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val_percent"):
        ByteCorpus(CorpusConfig(val_percent=101))
    with pytest.raises(ValueError, match="max_bytes"):
        ByteCorpus(CorpusConfig(max_bytes=0))
    with pytest.raises(ValueError, match="not a directory"):
        ByteCorpus(CorpusConfig(root=str(tmp_path / "missing")))
    _write(tmp_path, "big.py", "x" * 100)
    with pytest.raises(ValueError, match="max_bytes=10"):
        ByteCorpus(CorpusConfig(root=str(tmp_path), max_bytes=10))


# ----------------------------------------------------------------- loaders


def _data() -> torch.Tensor:
    return torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0),
                         device="cpu").to(
        torch.uint8
    )


def test_loader_batches_are_shifted_windows() -> None:
    data = _data()
    loader = BatchLoader(data, batch_size=4, seq_len=16, seed=1)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = data.long().unfold(0, 17, 1)
    for row_x, row_y in zip(x, y):
        row = torch.cat([row_x, row_y[-1:]])
        assert (windows == row).all(dim=1).any()


def test_loader_is_deterministic_and_seeded() -> None:
    data = _data()
    a = [next(BatchLoader(data, 4, 16, seed=3)) for _ in range(2)]
    stream = BatchLoader(data, 4, 16, seed=3)
    b1, b2 = next(stream), next(stream)
    assert torch.equal(a[0][0], a[1][0]) and torch.equal(a[0][0], b1[0])
    assert not torch.equal(b1[0], b2[0])
    assert not torch.equal(next(BatchLoader(data, 4, 16, seed=4))[0], b1[0])


@pytest.mark.parametrize("kind", ["stdlib", "synthetic"])
def test_rank_shards_partition_global_batch(kind: str) -> None:
    single = build_loader(kind, "train", batch_size=8, seq_len=32, seed=5, rank=0, world_size=1)
    shards = [
        build_loader(kind, "train", batch_size=4, seq_len=32, seed=5, rank=r, world_size=2)
        for r in range(2)
    ]
    quarters = [
        build_loader(kind, "train", batch_size=2, seq_len=32, seed=5, rank=r, world_size=4)
        for r in range(4)
    ]
    for _ in range(3):
        gx, gy = next(single)
        parts = [next(s) for s in shards]
        assert not torch.equal(parts[0][0], parts[1][0])
        assert torch.equal(torch.cat([p[0] for p in parts]), gx)
        assert torch.equal(torch.cat([p[1] for p in parts]), gy)
        assert torch.equal(torch.cat([next(q)[0] for q in quarters]), gx)


def test_loader_state_round_trip() -> None:
    loader = build_loader("stdlib", "val", batch_size=2, seq_len=64, seed=0, rank=1, world_size=2)
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    assert state["step"] == 3
    expected = [next(loader) for _ in range(2)]
    resumed = build_loader("stdlib", "val", batch_size=2, seq_len=64, seed=0, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for ex, got in zip(expected, (next(resumed), next(resumed))):
        assert torch.equal(ex[0], got[0]) and torch.equal(ex[1], got[1])
    # Same global batch on a different world size resumes the same stream.
    regrouped = build_loader("stdlib", "val", batch_size=4, seq_len=64, seed=0)
    regrouped.load_state_dict(state)
    assert torch.equal(next(regrouped)[0][2:], expected[0][0])
    other_seed = build_loader("stdlib", "val", batch_size=2, seq_len=64, seed=1, world_size=2)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(state)
    other_batch = build_loader("stdlib", "val", batch_size=3, seq_len=64, seed=0, world_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        other_batch.load_state_dict(state)


def test_splits_give_different_streams() -> None:
    for kind in ("stdlib", "synthetic"):
        train = build_loader(kind, "train", 4, 32, seed=0)
        val = build_loader(kind, "val", 4, 32, seed=0)
        assert not torch.equal(next(train)[0], next(val)[0]), kind


def test_synthetic_tokens() -> None:
    loader = SyntheticTokens(batch_size=3, seq_len=10, seed=2, vocab_size=7)
    x, y = next(loader)
    assert x.shape == (3, 10) and x.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < 7
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(SyntheticTokens(3, 10, seed=2, vocab_size=7).batch_at(0)[0], x)
    wide = build_loader("synthetic", "train", 2, 8, vocab_size=50304)
    assert int(next(wide)[0].max()) >= 256


def test_loader_user_errors() -> None:
    with pytest.raises(ValueError, match="'books'"):
        build_loader("books", "train", 2, 8)
    with pytest.raises(ValueError, match="'test'"):
        build_loader("synthetic", "test", 2, 8)
    with pytest.raises(ValueError, match="rank"):
        build_loader("synthetic", "train", 2, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        build_loader("synthetic", "train", 0, 8)
    with pytest.raises(ValueError, match="seq_len"):
        BatchLoader(torch.zeros(10, dtype=torch.uint8), batch_size=1, seq_len=10)
    loader = build_loader("synthetic", "train", 2, 8)
    with pytest.raises(ValueError, match="step"):
        loader.load_state_dict({"step": -1})
