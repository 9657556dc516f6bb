"""Token stores and batches: a corpus tokenised once into memory-mapped arrays, then sampled.

Each split is one flat array of token ids on disk, documents concatenated with `eos_id` after each
one. Training batches are random windows whose positions are a pure function of (seed, step), so a
resumed run sees exactly the batches of an uninterrupted one without saving any sampler state.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from multitoken.data.corpus import Corpus, Document
from multitoken.data.tokenizers import Tokenizer
from multitoken.errors import DataError

# Bump when the on-disk layout changes, so old stores are not reused.
STORE_FORMAT = 1
SPLITS = ("train", "val")
# Characters handed to one encode_batch call: large enough to keep the Rust threads busy, small
# enough that the Python lists of ids stay a few tens of MB.
_BATCH_CHARS = 1 << 20


def _name_fraction(name: str) -> float:
    """A stable pseudo-random number in [0, 1) derived from a document name."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_documents(
    documents: Sequence[Document], val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, val) by a hash of their names.

    A document goes to validation iff its name hashes below `val_fraction`, so adding documents never
    moves existing ones between splits. Train is never empty (a lone document trains), and with
    `val_fraction > 0` and at least two documents validation is not either: the document with the
    lowest (highest) hash is moved if needed.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    fractions = [_name_fraction(doc.name) for doc in documents]
    in_val = [f < val_fraction for f in fractions]
    if val_fraction > 0 and len(documents) >= 2 and not any(in_val):
        in_val[fractions.index(min(fractions))] = True
    if documents and all(in_val):
        in_val[fractions.index(max(fractions))] = False
    train = [doc for doc, v in zip(documents, in_val, strict=True) if not v]
    val = [doc for doc, v in zip(documents, in_val, strict=True) if v]
    return train, val


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 - 1 else np.uint32)


def _open_split(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """A read-only memory map of a split (numpy cannot map an empty file)."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


@dataclass
class TokenStore:
    """The tokenised splits of one corpus with one tokenizer, as 1-D read-only memory maps."""

    directory: Path
    meta: dict[str, Any]
    train: np.ndarray
    val: np.ndarray

    @classmethod
    def open(cls, directory: Path) -> TokenStore:
        """Open a store written by `build_or_load_token_store`."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"no usable token store in {directory}: {exc}") from exc
        dtype = np.dtype(meta["dtype"])
        counts = {split: meta["splits"][split]["n_tokens"] for split in SPLITS}
        train, val = (_open_split(directory / f"{s}.bin", dtype, counts[s]) for s in SPLITS)
        return cls(directory, meta, train, val)


def store_key(corpus: Corpus, tokenizer: Tokenizer, val_fraction: float) -> str:
    """Cache key of a token store: corpus content, tokenizer identity, split and format."""
    ident = json.dumps([STORE_FORMAT, corpus.fingerprint, tokenizer.fingerprint, val_fraction])
    return hashlib.blake2b(ident.encode("utf-8"), digest_size=10).hexdigest()


def _write_split(
    path: Path, documents: Sequence[Document], tokenizer: Tokenizer, dtype: np.dtype, desc: str
) -> int:
    """Tokenise `documents` into `path` (each followed by eos); returns the number of tokens."""
    n_tokens = 0
    total_chars = sum(len(doc.text) for doc in documents)
    with open(path, "wb") as f, tqdm(total=total_chars, desc=desc, unit="char", unit_scale=True) as bar:
        start = 0
        while start < len(documents):
            # Group documents up to _BATCH_CHARS characters (at least one) per encode_batch call.
            end, chars = start, 0
            while end < len(documents) and (end == start or chars + len(documents[end].text) <= _BATCH_CHARS):
                chars += len(documents[end].text)
                end += 1
            flat: list[int] = []
            for ids in tokenizer.encode_batch([doc.text for doc in documents[start:end]]):
                flat.extend(ids)
                flat.append(tokenizer.eos_id)
            np.asarray(flat, dtype=dtype).tofile(f)
            n_tokens += len(flat)
            bar.update(chars)
            start = end
    return n_tokens


def build_or_load_token_store(
    corpus: Corpus, tokenizer: Tokenizer, cache_dir: Path, val_fraction: float = 0.05
) -> TokenStore:
    """Return the token store of (corpus, tokenizer, val_fraction), tokenising only if not cached.

    The store is written into a temporary folder and renamed into `<cache_dir>/<key>` when complete,
    so an interrupted run never leaves a partial store under the final name.
    """
    cache_dir = Path(cache_dir)
    key = store_key(corpus, tokenizer, val_fraction)
    final = cache_dir / key
    if (final / "meta.json").is_file():
        return TokenStore.open(final)

    train_docs, val_docs = split_documents(corpus.documents, val_fraction)
    dtype = token_dtype(tokenizer.vocab_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        splits = {}
        for split, docs in zip(SPLITS, (train_docs, val_docs), strict=True):
            n_tokens = _write_split(tmp / f"{split}.bin", docs, tokenizer, dtype, f"tokenizing {split}")
            splits[split] = {"n_tokens": n_tokens, "n_documents": len(docs)}
        meta = {
            "format": STORE_FORMAT,
            "dtype": dtype.name,
            "splits": splits,
            "n_documents": len(corpus.documents),
            "val_fraction": val_fraction,
            "corpus_fingerprint": corpus.fingerprint,
            "tokenizer": {
                "kind": tokenizer.kind,
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
                "fingerprint": tokenizer.fingerprint,
            },
        }
        # meta.json is written last: its presence marks a complete store.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if final.exists() and not (final / "meta.json").exists():
            # Our renames are atomic, so a folder without meta.json was damaged by hand: replace it.
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same store first; theirs is identical, use it.
            if not (final / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return TokenStore.open(final)


def _check_length(tokens: np.ndarray, window: int, split: str) -> None:
    if len(tokens) < window:
        raise DataError(
            f"corpus too small: {len(tokens)} tokens in the {split} split, need at least {window} "
            "for one window (context + n_future); add text or shorten the context"
        )


class WindowSampler:
    """Random windows of `window` tokens from one split; the batch of a step depends only on (seed, step)."""

    def __init__(
        self, tokens: np.ndarray, batch_size: int, window: int, seed: int, rank: int = 0, split: str = "train"
    ) -> None:
        """`rank` gives each data-parallel process its own stream of batches under the same seed."""
        if batch_size <= 0 or window <= 0:
            raise ValueError(f"batch_size and window must be positive, got {batch_size} and {window}")
        if seed < 0 or rank < 0:
            raise ValueError(f"seed and rank must be non-negative, got {seed} and {rank}")
        _check_length(tokens, window, split)
        self.tokens = tokens
        self.batch_size = batch_size
        self.window = window
        self.seed = seed
        self.rank = rank
        self._offsets = np.arange(window)

    def sample(self, step: int) -> torch.Tensor:
        """The batch of `step`: (batch_size, window) int64 token ids."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        # A fresh generator per step, seeded from (seed, rank, step): no state to save or replay.
        rng = np.random.default_rng((self.seed, self.rank, step))
        starts = rng.integers(0, len(self.tokens) - self.window + 1, size=self.batch_size)
        batch = self.tokens[starts[:, None] + self._offsets]  # (B, W)
        return torch.from_numpy(batch.astype(np.int64))


def iter_eval_windows(
    tokens: np.ndarray, batch_size: int, window: int, max_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Non-overlapping windows spread evenly over a split, in batches of (<= batch_size, window) int64.

    Takes every window when the split holds at most `max_batches * batch_size` of them, otherwise
    that many windows evenly spaced from the start to the end of the split. Deterministic.
    """
    if batch_size <= 0 or window <= 0:
        raise ValueError(f"batch_size and window must be positive, got {batch_size} and {window}")
    _check_length(tokens, window, "validation")
    n_windows = len(tokens) // window
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    # Spacing (len - window) / (n - 1) >= window because n * window <= len: windows never overlap.
    span = len(tokens) - window
    starts = np.array([i * span // (n_windows - 1) for i in range(n_windows)] if n_windows > 1 else [0])
    offsets = np.arange(window)
    return (
        torch.from_numpy(tokens[starts[i : i + batch_size, None] + offsets].astype(np.int64))  # (B, W)
        for i in range(0, n_windows, batch_size)
    )
