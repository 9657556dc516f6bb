"""Static key/value cache indexed by position.

Every block (trunk and head blocks alike) owns one `KVCache` of fixed size `(batch, kv_heads, max_len,
head_dim)`. A token at position p writes slot p. Nothing counts how far a sequence has got: a query at
position p attends to slots <= p (or to the slots a tree mask names), so a rejected draft costs nothing:
its slots are simply overwritten by the next forward, which always restarts at the first unverified
position. Sequences of a batch may stand at different positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Keys and values of one attention layer for `max_len` positions."""

    k: torch.Tensor  # (B, Hkv, S, hd)
    v: torch.Tensor  # (B, Hkv, S, hd)

    @classmethod
    def empty(
        cls, batch: int, n_kv_heads: int, max_len: int, head_dim: int, *, device=None, dtype=None
    ) -> KVCache:
        shape = (batch, n_kv_heads, max_len, head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, Hkv, T, hd) at `slots` (B, T); each row of the batch has its own slots."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
        # Advanced indexing on dims 0 and 2 moves them first: the target view is (B, T, Hkv, hd).
        self.k[rows, :, slots] = k.transpose(1, 2)
        self.v[rows, :, slots] = v.transpose(1, 2)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slots `src` to slots `dst` (both (B, n)); used to compact an accepted tree path."""
        rows = torch.arange(src.shape[0], device=src.device)[:, None]
        self.k[rows, :, dst] = self.k[rows, :, src]
        self.v[rows, :, dst] = self.v[rows, :, src]


@dataclass
class ModelCache:
    """One `KVCache` per block: `trunk[i]` for trunk block i, `heads[j]` for head j's block.

    For heads that read a token ahead (token-conditioned modules), which the decoder runs after each verify
    forward, it also keeps what they read, by position: `tokens` (B, S) the token at each position, and
    `states[j]` (B, S, D) head j's output at each position, for head j+1 (generate/conditioned.py).
    """

    trunk: list[KVCache]
    heads: list[KVCache | None]  # None for linear heads, which have no attention
    tokens: torch.Tensor | None = None
    states: list[torch.Tensor] = field(default_factory=list)

    @property
    def max_len(self) -> int:
        return self.trunk[0].max_len

    @property
    def batch_size(self) -> int:
        return self.trunk[0].k.shape[0]

    def layers(self) -> list[KVCache]:
        return [c for c in [*self.trunk, *self.heads] if c is not None]

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slots `src` to `dst` in every layer."""
        for cache in self.layers():
            cache.move(src, dst)


def causal_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean mask (B, 1, T, kv_len): the query at position p sees the slots 0..p.

    positions: (B, T) absolute positions of the queries (= the slots they were written to).
    """
    slots = torch.arange(kv_len, device=positions.device)
    return (slots[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
