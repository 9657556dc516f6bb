"""Held-out tokens of a run: its own validation split, or every token of files given instead."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multitoken.data.prepare import bytes_per_token, prepare_data
from multitoken.data.tokenizers import Tokenizer, load_tokenizer
from multitoken.errors import UserError


@dataclass
class HeldOut:
    tokenizer: Tokenizer
    tokens: np.ndarray  # 1-D token ids, documents separated by the tokenizer's eos
    bytes_per_token: float | None
    train_tokens: np.ndarray  # the run's training split (with `data`: the same tokens), e.g. for frequencies


def load_heldout(
    run_dir: Path, config: dict[str, Any], data: Sequence[str] | None = None, cache_dir: Path | None = None
) -> HeldOut:
    """The run's validation split (documents never trained on), or all of `data` when given."""
    tok = load_tokenizer(run_dir)
    sources = data or config.get("data", {}).get("sources")
    if not sources:
        raise UserError(f"{run_dir} records no data sources; pass --data")
    cache_dir = Path(cache_dir) if cache_dir else Path(run_dir).parent / ".multitoken-cache"
    val_fraction = 0.0 if data else config.get("train", {}).get("val_fraction", 0.05)
    bundle = prepare_data(sources, tok, cache_dir, val_fraction, report_skipped=bool(data))  # training said it
    tokens = bundle.store.train if data else bundle.store.val  # val_fraction 0 puts everything in "train"
    bpt = bytes_per_token(tok, bundle.store) if len(bundle.store.val) else (1.0 if tok.kind == "bytes" else None)
    return HeldOut(tok, tokens, bpt, bundle.store.train)


def split_heldout(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The held-out tokens in two halves: (calibration, evaluation).

    What tunes decoding (a draft tree's calibration) reads the first half and what measures it (benchmark
    and sample prompts) the second, so no benchmark runs on the prompts its tree was fitted to.
    """
    half = len(tokens) // 2
    return tokens[:half], tokens[half:]


def prompt_windows(tokens: np.ndarray, n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` tokens, evenly spaced over the held-out tokens (deterministic)."""
    if len(tokens) < length + 1:
        raise UserError(f"held-out data has {len(tokens)} tokens, fewer than one prompt of {length}")
    starts = np.linspace(0, len(tokens) - length - 1, n).astype(np.int64)
    return [tokens[s : s + length].tolist() for s in starts]


def windows_tensor(tokens: np.ndarray, n: int, length: int) -> torch.Tensor:
    """(n, length) int64 windows evenly spaced over the tokens, e.g. for calibration."""
    return torch.tensor(prompt_windows(tokens, n, length), dtype=torch.long)
