"""Plain autoregressive decoding: one forward, one token per sequence.

Only head 1 (the next-token head) runs. This is the baseline the speculative decoder must match token
for token when greedy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from multitoken.generate.common import GenerationResult, prefill
from multitoken.generate.sampling import SamplingConfig, sample
from multitoken.generate.session import decode
from multitoken.generate.tree import Tree, TreeIndex
from multitoken.kv_cache import ModelCache
from multitoken.model import MultiTokenModel


def next_token_step(
    model: MultiTokenModel,
    cache: ModelCache,
    index: TreeIndex,
    root: torch.Tensor,
    pos: torch.Tensor,
    *,
    kv_len: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feed each row's pending token root (B,) at pos (B,) and sample head 1's next one: (B, 1), ones, pos + 1."""
    logits = model(root[:, None], heads=[0], positions=pos[:, None], cache=cache, kv_len=kv_len)  # (B, 1, 1, V)
    return sample(logits[:, 0, 0], sampling, generator)[:, None], torch.ones_like(pos), pos + 1


@dataclass(frozen=True)
class NextToken:
    """The drafter of plain decoding: no drafts, one token per forward from head 1."""

    tree: Tree = Tree.chain(1)
    heads: tuple[int, ...] = (0,)
    step = staticmethod(next_token_step)

    def prepare(self, model: MultiTokenModel, sampling: SamplingConfig, device: torch.device) -> NextToken:
        return self

    def start(
        self,
        model: MultiTokenModel,
        cache: ModelCache,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[()]]:
        logits, pos = prefill(model, cache, prompts, self.heads)  # (B, 1, V), (B,)
        return sample(logits[:, 0], sampling, generator), pos, ()

    def graph_key(self) -> tuple[object, ...]:
        return ("next-token",)

    def constants(self) -> dict[str, object]:
        return {}

    def stats(self) -> dict[str, object]:
        return dict(heads_used=1, tree_size=1, draft_vocab_size=None)


def generate(
    model: MultiTokenModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, **options: Any
) -> GenerationResult:
    """Decode up to `max_new_tokens` per prompt with head 1 alone: `decode` with `NextToken()`; `options` are
    `decode`'s (sampling, generator, eos_id, on_tokens, compile_step, cuda_graphs, graph_session)."""
    return decode(model, prompts, max_new_tokens, NextToken(), **options)
