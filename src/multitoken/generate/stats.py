"""Decoding statistics: acceptance histogram, tokens per forward, tokens per second, JSON records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from multitoken.generate.common import GenerationResult


@dataclass
class AcceptanceHistogram:
    """How many (sequence, forward) pairs accepted 0, 1, ..., max_drafts drafts."""

    max_drafts: int
    counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (self.max_drafts + 1)

    def add(self, accepted: Sequence[int]) -> None:
        for a in accepted:
            self.counts[a] += 1

    @property
    def total(self) -> int:
        return sum(self.counts)

    def head_rates(self) -> list[float]:
        """Per draft head (heads 2, 3, ...): the fraction of verify forwards that accepted its draft.

        A chain accepts head j+1's draft exactly when it accepts at least j drafts.
        """
        total = self.total
        return [sum(self.counts[j:]) / total if total else 0.0 for j in range(1, self.max_drafts + 1)]

    def mean(self) -> float:
        """Mean accepted drafts per verify forward (tokens per verify forward minus one)."""
        return sum(a * c for a, c in enumerate(self.counts)) / self.total if self.total else 0.0


def decode_stats(
    tokens: Sequence[Sequence[int]],
    row_forwards: Sequence[int],
    seconds: float,
    histogram: AcceptanceHistogram | None = None,
) -> dict[str, Any]:
    """The stats record of a decode.

    tokens_per_forward counts, for each sequence, the forwards it was still active in (the prefill
    included), so plain decoding scores exactly 1 and finished rows of a batch do not dilute it;
    `row_forwards` keeps each sequence's count.
    """
    n_tokens = sum(len(t) for t in tokens)
    stats: dict[str, Any] = {
        "forwards": max(row_forwards, default=0),
        "row_forwards": list(row_forwards),
        "tokens_per_forward": n_tokens / max(sum(row_forwards), 1),
        "tokens_per_second": n_tokens / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
    }
    if histogram is not None:
        stats["accept_histogram"] = list(histogram.counts)
        stats["head_acceptance"] = histogram.head_rates()
        stats["mean_accepted_drafts"] = histogram.mean()
    return stats


def result_json(result: GenerationResult) -> dict[str, Any]:
    """A JSON-ready record of a decode, `generated_token_ids` included."""
    return {
        "generated_token_ids": [list(t) for t in result.tokens],
        "stop_reasons": list(result.stop_reasons),
        "n_forwards": result.n_forwards,
        "n_generated": result.n_generated,
        "seconds": result.seconds,
        "stats": dict(result.stats),
    }
