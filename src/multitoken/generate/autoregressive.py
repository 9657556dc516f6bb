"""Plain autoregressive decoding with a static KV cache: one forward, one token per sequence.

Only head 1 (the next-token head) runs. This is the baseline the speculative decoder must match token
for token when greedy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from multitoken.generate.common import GenerationResult, TokenCallback, check_prompts, prefill
from multitoken.generate.sampling import SamplingConfig, sample
from multitoken.generate.stats import decode_stats
from multitoken.model import MultiTokenModel


@torch.no_grad()
def generate(
    model: MultiTokenModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    on_tokens: TokenCallback | None = None,
) -> GenerationResult:
    """Decode up to `max_new_tokens` per prompt; prompts may differ in length.

    A sequence stops at `eos_id` (kept in its output) or at the model's context limit. on_tokens(row,
    [token]): called with each new token as soon as it is chosen (e.g. to stream it).
    """
    check_prompts(model, prompts, max_new_tokens)
    start = time.perf_counter()
    limit = model.cfg.max_seq_len
    B = len(prompts)
    cache = model.make_cache(B)
    logits, positions = prefill(model, cache, prompts, heads=[0])  # (B, 1, V), (B,)
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    active = [max_new_tokens > 0] * B
    n_forwards = 1
    while True:
        tokens = sample(logits[:, 0], sampling, generator)  # (B,)
        for b in range(B):
            if not active[b]:
                continue
            out[b].append(int(tokens[b]))
            if on_tokens is not None:
                on_tokens(b, out[b][-1:])
            if eos_id is not None and out[b][-1] == eos_id:
                active[b], reasons[b] = False, "eos"
            elif len(out[b]) == max_new_tokens:
                active[b] = False
            elif int(positions[b]) + 1 > limit - 1:
                # The token just sampled sits at position `positions[b]`; feeding it fills the last slot
                # and there would be no slot left for its successor.
                active[b], reasons[b] = False, "context"
        if not any(active):
            break
        # Finished rows keep running (static batch); clamp their position inside the cache.
        pos = positions.clamp(max=limit - 1)
        logits = model(
            tokens[:, None], heads=[0], positions=pos[:, None], cache=cache, kv_len=int(pos.max()) + 1
        )
        logits = logits[:, 0]  # (B, 1, V)
        positions = positions + 1
        n_forwards += 1
    seconds = time.perf_counter() - start
    # Each forward (the prefill first) gives one token to every row still active.
    return GenerationResult(out, n_forwards, reasons, seconds, decode_stats(out, [len(o) for o in out], seconds))
