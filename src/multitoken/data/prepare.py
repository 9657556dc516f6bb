"""A corpus made ready to train on: loaded, its tokenizer built or reused, tokenised once into a store."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from multitoken.data.corpus import load_corpus
from multitoken.data.dataset import TokenStore, build_or_load_token_store, split_documents
from multitoken.data.tokenizers import Tokenizer, build_tokenizer


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    store: TokenStore
    n_documents: int
    n_skipped: int


def prepare_data(
    sources: Sequence[str | Path],
    tokenizer: str | Tokenizer,
    cache_dir: Path,
    val_fraction: float,
    bpe_vocab_size: int = 8192,
    report_skipped: bool = True,
) -> DataBundle:
    """Load the corpus, build (or reuse) the tokenizer, and tokenise once into a memory-mapped store.

    A BPE tokenizer is trained on the training split only, so validation text stays unseen. Files that are not
    text are skipped, and said so on stderr unless `report_skipped` is False (a second pass over a corpus).
    """
    corpus = load_corpus(sources)
    if corpus.skipped and report_skipped:
        # Skipped, not fatal: a folder of code often holds a few binaries; say so, with an example.
        path, reason = corpus.skipped[0]
        print(f"skipped {corpus.n_skipped} file(s) that are not usable text (e.g. {path}: {reason})", file=sys.stderr)
    if isinstance(tokenizer, str):
        train_docs, _ = split_documents(corpus.documents, val_fraction)
        tokenizer = build_tokenizer(tokenizer, (d.text for d in train_docs), bpe_vocab_size)
    store = build_or_load_token_store(corpus, tokenizer, cache_dir, val_fraction)
    return DataBundle(tokenizer, store, len(corpus.documents), corpus.n_skipped)


def bytes_per_token(tokenizer: Tokenizer, store: TokenStore, sample_tokens: int = 200_000) -> float:
    """Average UTF-8 bytes per token on the validation split (1.0 for byte models), for bits per byte."""
    if tokenizer.kind == "bytes":
        return 1.0
    ids = store.val[:sample_tokens].tolist()
    return len(tokenizer.decode(ids).encode("utf-8")) / max(1, len(ids))
