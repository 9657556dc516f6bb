"""A draft vocabulary: the draft heads propose only among the K most frequent tokens.

After head 1 has chosen the accepted node, a verify step scores the draft heads' outputs there against the
unembedding a second time, for the next proposals. With a large vocabulary that product streams the whole
V x d matrix again to score k - 1 rows: for SmolLM2-135M (49152 x 576, 113 MB in fp32) about 11 ms of a
~120 ms step on 2 CPU cores. Restricting the drafts to the K tokens most frequent in the training text
(FR-Spec, Zhao et al. 2025; EAGLE-3 does the same) streams K rows instead.

Decoding stays exact: head 1 still verifies over the full vocabulary, so a token outside the K can only
fail to be drafted, never be wrongly accepted. In sampling, a draft distribution q without mass outside
the K is still a distribution to draw from, which is all rejection sampling asks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from multitoken.checkpoint import atomic_write_text, read_json
from multitoken.config import typed_field
from multitoken.errors import UserError

DRAFT_VOCAB_FILE = "draft_vocab.json"


@dataclass(frozen=True)
class DraftVocab:
    """The token ids (K,) the draft heads may propose, most frequent first, out of `vocab_size`."""

    ids: torch.Tensor
    vocab_size: int

    def __post_init__(self) -> None:
        ids = self.ids
        if ids.dim() != 1 or ids.numel() == 0:
            raise UserError("a draft vocabulary needs a non-empty list of token ids")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise UserError(f"draft vocabulary ids must lie in [0, {self.vocab_size})")
        if torch.unique(ids).numel() != ids.numel():
            raise UserError("the draft vocabulary lists a token twice")

    @classmethod
    def most_frequent(
        cls,
        tokens: np.ndarray | torch.Tensor,
        vocab_size: int,
        size: int,
        then: np.ndarray | torch.Tensor | None = None,
    ) -> DraftVocab:
        """The `size` tokens most frequent in `tokens`; equal counts are ordered by their counts in `then`
        (e.g. a large corpus behind a small sample of generated text, which may hold fewer than `size`
        distinct tokens), then by id."""
        if not 1 <= size <= vocab_size:
            raise UserError(f"draft vocabulary size must be between 1 and {vocab_size}, got {size}")

        def counts(t: np.ndarray | torch.Tensor | None) -> np.ndarray:
            if t is None:
                return np.zeros(vocab_size, dtype=np.int64)
            return np.bincount(np.asarray(t, dtype=np.int64).ravel(), minlength=vocab_size)[:vocab_size]

        order = np.lexsort((np.arange(vocab_size), -counts(then), -counts(tokens)))  # last key sorts first
        return cls(torch.from_numpy(order[:size].copy()), vocab_size)

    @property
    def size(self) -> int:
        return self.ids.numel()

    def to(self, device: torch.device | str) -> DraftVocab:
        return DraftVocab(self.ids.to(device), self.vocab_size)

    def coverage(self, tokens: np.ndarray | torch.Tensor) -> float:
        """Fraction of `tokens` that the draft vocabulary contains."""
        t = np.asarray(tokens, dtype=np.int64).ravel()
        inside = np.zeros(self.vocab_size, dtype=bool)
        inside[self.ids.cpu().numpy()] = True
        return float(inside[t].mean()) if t.size else 0.0

    def position(self) -> torch.Tensor:
        """(V,) each token's index in the draft vocabulary, -1 for tokens outside it."""
        where = torch.full((self.vocab_size,), -1, dtype=torch.long, device=self.ids.device)
        where[self.ids] = torch.arange(self.size, device=self.ids.device)
        return where

    def index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (...) -> their indices in the draft vocabulary (...), -1 outside it (negative ids too)."""
        return torch.where(tokens < 0, -1, self.position()[tokens.clamp_min(0)])

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The unembedding's rows (K, D) for the draft tokens: gather once per decode, then score with them."""
        return weight.index_select(0, self.ids.to(weight.device))

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (..., V) -> the draft tokens' logits (..., K)."""
        return logits.index_select(-1, self.ids.to(logits.device))

    def expand(self, probs: torch.Tensor) -> torch.Tensor:
        """A distribution over the draft tokens (..., K) -> the same over the full vocabulary (..., V)."""
        full = probs.new_zeros(*probs.shape[:-1], self.vocab_size)
        return full.index_copy_(-1, self.ids.to(probs.device), probs)

    def save(self, path: Path, coverage: float | None = None) -> None:
        data = {"vocab_size": self.vocab_size, "size": self.size, "ids": self.ids.tolist()}
        if coverage is not None:
            data["coverage"] = coverage
        atomic_write_text(Path(path), json.dumps(data) + "\n")

    @classmethod
    def load(cls, path: Path) -> DraftVocab:
        """A vocabulary written by `save`; UserError if the file is missing or malformed."""
        path = Path(path)
        remedy = "make one with `multitoken calibrate RUN --draft-vocab K`"
        if not path.is_file():
            raise UserError(f"no draft vocabulary at {path}; {remedy}")
        data = read_json(path, UserError, remedy)
        try:
            if not isinstance(data, dict):
                raise UserError("not a JSON object")
            ids, vocab_size = typed_field(data, "ids", list[int]), typed_field(data, "vocab_size", int, minimum=1)
            if not all(0 <= i < vocab_size for i in ids):  # before torch.tensor, which overflows past int64
                raise UserError(f"its ids must lie in [0, {vocab_size})")
            return cls(torch.tensor(ids, dtype=torch.long), vocab_size)
        except UserError as e:
            raise UserError(f"{path} is not a draft vocabulary file: {e}; {remedy}") from None
