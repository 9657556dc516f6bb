"""Token stores, the document split and batch sampling."""

from pathlib import Path

import numpy as np
import pytest
import torch

from multitoken.data.corpus import Corpus, Document
from multitoken.data.dataset import (
    TokenStore,
    WindowSampler,
    build_or_load_token_store,
    iter_eval_windows,
    split_documents,
    store_key,
    token_dtype,
)
from multitoken.data.tokenizers import ByteTokenizer
from multitoken.errors import DataError


class CountingByteTokenizer(ByteTokenizer):
    """Byte tokenizer that counts encode_batch calls."""

    def __init__(self) -> None:
        self.calls = 0

    def encode_batch(self, texts):
        self.calls += 1
        return super().encode_batch(texts)


def make_corpus(n: int = 50) -> Corpus:
    return Corpus([Document(f"doc{i}.py", f"# document {i}\n" + "x = 1\n" * (i % 7 + 1)) for i in range(n)])


def test_split_by_document_and_deterministic() -> None:
    docs = make_corpus(200).documents
    train, val = split_documents(docs, 0.1)
    assert (train, val) == split_documents(list(docs), 0.1)
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    assert len(train) + len(val) == 200
    assert 5 <= len(val) <= 40
    # Adding documents never moves existing ones.
    _, val_more = split_documents(docs + [Document("new.py", "y")], 0.1)
    assert {d.name for d in val} <= {d.name for d in val_more}


def test_split_guarantees_both_sides() -> None:
    docs = make_corpus(2).documents
    train, val = split_documents(docs, 1e-9)
    assert len(train) == 1 and len(val) == 1
    train, val = split_documents(docs, 0.999999)
    assert len(train) == 1 and len(val) == 1
    assert split_documents(docs, 0.0) == (docs, [])
    assert split_documents(docs[:1], 0.999999) == (docs[:1], [])  # a lone document trains
    with pytest.raises(DataError, match="val_fraction"):
        split_documents(docs, 1.0)


def test_token_dtype() -> None:
    assert token_dtype(257) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


def test_store_contents(tmp_path: Path) -> None:
    corpus, tok = make_corpus(), ByteTokenizer()
    store = build_or_load_token_store(corpus, tok, tmp_path, val_fraction=0.2)
    train_docs, val_docs = split_documents(corpus.documents, 0.2)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        expected = [t for d in docs for t in tok.encode(d.text) + [tok.eos_id]]
        tokens = getattr(store, split)
        assert tokens.dtype == np.uint16 and tokens.ndim == 1
        assert tokens.tolist() == expected
        assert store.meta["splits"][split] == {"n_tokens": len(expected), "n_documents": len(docs)}
    assert store.meta["tokenizer"]["kind"] == "bytes"
    assert store.directory == tmp_path / store_key(corpus, tok, 0.2)
    reopened = TokenStore.open(store.directory)
    assert np.array_equal(reopened.train, store.train)


def test_store_reused(tmp_path: Path) -> None:
    corpus, tok = make_corpus(), CountingByteTokenizer()
    first = build_or_load_token_store(corpus, tok, tmp_path)
    calls = tok.calls
    assert calls > 0
    second = build_or_load_token_store(corpus, tok, tmp_path)
    assert tok.calls == calls
    assert second.directory == first.directory
    # A different split fraction or corpus is a different store.
    build_or_load_token_store(corpus, tok, tmp_path, val_fraction=0.3)
    assert tok.calls > calls
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2


def test_store_ignores_leftover_temp_dir(tmp_path: Path) -> None:
    corpus, tok = make_corpus(), CountingByteTokenizer()
    key = store_key(corpus, tok, 0.05)
    # What a process killed mid-write leaves behind: a temp folder with a partial split.
    leftover = tmp_path / f".tmp-{key}-999-deadbeef"
    leftover.mkdir()
    (leftover / "train.bin").write_bytes(b"\x01\x00" * 3)
    store = build_or_load_token_store(corpus, tok, tmp_path)
    assert tok.calls > 0
    assert store.directory == tmp_path / key
    assert len(store.train) > 3
    # Nothing of ours is left under a temporary name.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [leftover.name]


def test_store_without_meta_is_rebuilt(tmp_path: Path) -> None:
    corpus, tok = make_corpus(), CountingByteTokenizer()
    damaged = tmp_path / store_key(corpus, tok, 0.05)
    damaged.mkdir(parents=True)
    (damaged / "train.bin").write_bytes(b"\x01\x00")
    store = build_or_load_token_store(corpus, tok, tmp_path)
    assert tok.calls > 0
    assert store.directory == damaged and len(store.train) > 1


def test_sampler_deterministic() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = WindowSampler(tokens, batch_size=8, window=17, seed=3)
    batch = sampler.sample(5)
    assert batch.shape == (8, 17) and batch.dtype == torch.int64
    assert torch.equal(batch, WindowSampler(tokens, 8, 17, seed=3).sample(5))  # a fresh sampler: no state
    assert not torch.equal(batch, sampler.sample(6))
    assert not torch.equal(batch, WindowSampler(tokens, 8, 17, seed=4).sample(5))
    assert not torch.equal(batch, WindowSampler(tokens, 8, 17, seed=3, rank=1).sample(5))
    # Windows are contiguous runs of the split, within bounds.
    for step in range(50):
        b = sampler.sample(step)
        assert torch.equal(b - b[:, :1], torch.arange(17).expand(8, 17))
        assert b.min() >= 0 and b.max() <= 999


def test_sampler_exact_fit() -> None:
    tokens = np.arange(10, dtype=np.uint16)
    assert torch.equal(WindowSampler(tokens, 2, 10, seed=0).sample(0), torch.arange(10).expand(2, 10))


def test_sampler_corpus_too_small() -> None:
    with pytest.raises(DataError, match="corpus too small: 9 tokens in the train split, need at least 10"):
        WindowSampler(np.arange(9, dtype=np.uint16), 2, 10, seed=0)


def test_eval_windows() -> None:
    tokens = np.arange(100, dtype=np.uint16)
    batches = list(iter_eval_windows(tokens, batch_size=3, window=10, max_batches=None))
    assert [b.shape[0] for b in batches] == [3, 3, 3, 1]
    assert torch.equal(torch.cat(batches), torch.arange(100).view(10, 10))

    batches = list(iter_eval_windows(tokens, batch_size=2, window=10, max_batches=2))
    windows = torch.cat(batches)
    assert windows.shape == (4, 10)
    starts = windows[:, 0].tolist()
    assert starts[0] == 0 and starts[-1] == 90  # spread over the whole split
    assert all(b - a >= 10 for a, b in zip(starts, starts[1:], strict=False))  # non-overlapping
    assert torch.equal(windows, torch.cat(list(iter_eval_windows(tokens, 2, 10, 2))))

    with pytest.raises(DataError, match="9 tokens in the validation split"):
        iter_eval_windows(tokens[:9], 2, 10, 1)
