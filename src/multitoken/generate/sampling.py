"""The one sampler: temperature, top-k and top-p over logits, with an explicit generator.

Greedy decoding is temperature 0. `probabilities` gives the processed distribution itself, which the
speculative sampler needs for both the draft heads and the verifying head: the distribution sampled
from must be exactly the one the acceptance test uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from multitoken.errors import UserError


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick a token from logits. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution (..., V) that `sample` draws from, in fp32. Greedy gives a one-hot."""
    logits = logits.float()
    if cfg.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        probs = probs.masked_fill(~nucleus(probs, cfg.top_p), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


NUCLEUS_START = 64  # on the CPU, the tokens first ranked for a top-p nucleus (`nucleus`)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The tokens top-p keeps (..., V), a bool mask: the smallest most-probable-first prefix whose mass reaches
    top_p, i.e. each token whose more probable tokens hold less than top_p.

    Only the top k tokens are ranked, k growing 8x from NUCLEUS_START until every row's top k hold top_p, since
    the later ones are dropped whatever their order. A full sort of SmolLM2's 49152 probabilities takes about 3 ms
    on the CPU: sampled decoding at temperature 0.8, top-p 0.95 ran 14 % faster plain and 17 % faster with mtp
    drafts this way. A flat distribution over a small vocabulary ranks it all in the end, a few syncs later (the
    demo model, V = 4096: 1-6 % slower). AMD EPYC, 2 threads. Elsewhere the whole row is ranked at once, which
    needs no host sync.
    """
    V = probs.shape[-1]
    k = min(V, NUCLEUS_START) if probs.is_cpu else V
    while True:
        top, index = probs.topk(k, dim=-1)  # (..., k), most probable first
        mass = top.cumsum(-1)  # (..., k): the mass up to each
        if k == V or bool((mass[..., -1] >= top_p).all()):
            break
        k = min(V, 8 * k)
    before = torch.cat([torch.zeros_like(mass[..., :1]), mass[..., :-1]], dim=-1)  # the mass before each
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, index, before < top_p)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(0, p - q)) over the last dim: where to sample after rejecting a draft from q.

    With q = 0 (no draft left) this is p itself: the bonus token. A residual with no mass can only follow
    a rejection that had probability 0 (p <= q everywhere means p = q), so p stands in for it there.
    """
    r = (p - q).clamp_min(0.0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(torch.finfo(r.dtype).tiny), p)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None, n: int | None = None) -> torch.Tensor:
    """One draw per row of probs (..., V) -> token ids (...); or `n` independent draws (with replacement)
    per row -> (..., n)."""
    flat = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat, n or 1, replacement=True, generator=generator)
    return draws.view(*probs.shape[:-1], n) if n is not None else draws.view(probs.shape[:-1])


def sample(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick tokens (...) from logits (..., V): argmax when greedy, else a draw from `probabilities`."""
    if cfg.greedy:
        return logits.argmax(-1)
    return sample_from(probabilities(logits, cfg), generator)
