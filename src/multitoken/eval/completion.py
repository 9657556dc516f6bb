"""Completions for the code benchmarks: a loaded model's `generate`, its decoding statistics gathered over calls."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

from multitoken.api import MultiTokenLM


@dataclass
class Completer:
    """`completer(prompt, n)` -> n completions of `prompt`, the `generate_fn` that HumanEval and MBPP call.

    Each prompt draws from a seed of its own, made of `seed` and the prompt: prompts share no random draws, and a
    prompt's samples do not depend on which others run. A completion ends at the end-of-text token or its text.
    """

    lm: MultiTokenLM
    max_new_tokens: int = 256
    decoding: str | None = None  # None: the model's default (tree, chain or plain)
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    keep_prompt_end: bool = False  # a prompt too long for the context keeps its end instead of being refused
    tokens: int = field(default=0, init=False)
    forwards: float = field(default=0.0, init=False)
    seconds: float = field(default=0.0, init=False)
    stats: dict[str, Any] = field(default_factory=dict, init=False)  # the last call's decoding statistics

    def __call__(self, prompt: str, n: int) -> list[str]:
        seed = (self.seed * 2**32 + zlib.crc32(prompt.encode())) % 2**64
        eos_text = self.lm.tokenizer.decode([self.lm.tokenizer.eos_id])
        outs = self.lm.generate(
            [prompt] * n, max_new_tokens=self.max_new_tokens, decoding=self.decoding, temperature=self.temperature,
            top_k=self.top_k, top_p=self.top_p, seed=seed, stop=eos_text, keep_prompt_end=self.keep_prompt_end,
        )  # fmt: skip
        self.tokens += sum(len(o.token_ids) for o in outs)
        self.forwards += sum(len(o.token_ids) / o.tokens_per_forward for o in outs if o.token_ids)
        self.seconds += outs[0].stats["seconds"]
        self.stats = outs[0].stats
        return [o.text for o in outs]

    def summary(self) -> dict[str, Any]:
        """How the completions were decoded: decoding, heads and tree used, tokens per forward and per second."""
        return {
            "decoding": self.decoding or self.lm.default_decoding,
            "heads_used": self.stats.get("heads_used"),
            "tree_size": self.stats.get("tree_size"),
            "tokens_per_forward": self.tokens / max(self.forwards, 1),
            "tokens_per_second": self.tokens / max(self.seconds, 1e-9),
        }
