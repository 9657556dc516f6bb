"""The multi-token prediction transformer: shared trunk, n heads, shared norm and unembedding.

    tokens ─ embed ─ trunk blocks ─ h ─┬─ head 1 ─ z1 ─┐
                                       ├─ head 2 ─ z2 ─┼─ shared norm ─ shared unembedding ─ logits per head
                                       └─ head n ─ zn ─┘

Head i predicts token t+i from tokens <= t (Gloeckle et al. 2024). Head variants (paper App. B):
parallel (every head reads h), causal (head i reads head i-1's output), anticausal (head i reads head
i+1's output), linear (a d x d map instead of a block). Beyond the paper, token-conditioned modules (mtp,
DeepSeek-V3): module k reads depth k-1's output and the embedding of token t+k, so it predicts t+k+1 from
tokens <= t+k. With n_future = 1 this is exactly a plain Llama-style causal LM.

One definition serves training, both decoders and interop: `trunk`, `run_heads` and `unembed` are the
pieces, `forward` composes them, and the memory-efficient training step (loss.py) composes the same
pieces one head at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from multitoken import kernels
from multitoken.config import ModelConfig
from multitoken.kv_cache import KVCache, ModelCache, causal_mask


def linear(x: torch.Tensor, weight: torch.Tensor, decide_as: Sequence[int] | None = None) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T; a few-row product on the CPU is computed weight-stationary where that
    was measured faster on this machine (kernels.py). Everything else goes to F.linear: many rows (training,
    prefill), shapes not measured, other devices. decide_as: the weight shape whose choice applies, for a
    weight made of rows of a larger one (a draft vocabulary's rows of the unembedding)."""
    rows = x.numel() // weight.shape[1]
    if x.is_cpu and kernels.choice_for(weight.shape if decide_as is None else decide_as, weight.dtype).takes(rows):
        return kernels.weight_stationary(x, weight)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """nn.Linear without bias whose few-row products on the CPU may be computed weight-stationary (`linear`)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability under bf16 autocast, as Llama does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (max_len, head_dim // 2) for rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (S, hd/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by position; cos/sin are (B, T, hd/2) or (T, hd/2).

    The "rotate half" layout of Hugging Face's Llama: the first and second halves of each head's
    channels form the pairs, so HF checkpoints load without permuting wq/wk.
    """
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd/2): broadcast over heads
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.type_as(x)


@dataclass
class AttentionContext:
    """Everything attention needs besides the hidden states, computed once per forward.

    Training: positions 0..T-1, causal, no cache (`mask` and `slots` are None).
    Decoding: `slots` (B, T) are the positions written to the cache, `mask` (B, 1, T, kv_len) which slots
    each query sees (causal by position, or a tree mask), and `kv_len` how much of the cache to read.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    kv_len: int = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            cache.write(ctx.slots, k, v)
            k, v = cache.k[:, :, : ctx.kv_len], cache.v[:, :, : ctx.kv_len]  # (B, Hkv, S, hd)
            y = F.scaled_dot_product_attention(
                q, k.to(q.dtype), v.to(q.dtype), attn_mask=ctx.mask, enable_gqa=gqa
            )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.ffn_dim)
        self.w2 = Linear(cfg.ffn_dim, cfg.dim)
        self.w3 = Linear(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + ffn(norm(.))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), ctx, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class LinearHead(nn.Module):
    """A head that is one d x d linear map (paper Table S4 "linear"); it ignores the attention context."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: KVCache | None = None) -> torch.Tensor:
        return self.proj(x)


class TokenConditionedModule(nn.Module):
    """An MTP module (DeepSeek-V3 §2.2): block(proj([norm(hidden); norm(embedding)])).

    Its input is the concatenation (..., 2D) of the hidden state of depth k-1 and the embedding of the token
    it is conditioned on (`MultiTokenModel.head_input` builds it); each half is RMS-normalised on its own, so
    neither the depth of the hidden state nor the embedding's scale decides how much the other counts.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hidden_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.embed_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.proj = Linear(2 * cfg.dim, cfg.dim)
        self.block = Block(cfg)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: KVCache | None = None) -> torch.Tensor:
        hidden, embedding = x.chunk(2, dim=-1)  # (B, T, D) each
        x = self.proj(torch.cat([self.hidden_norm(hidden), self.embed_norm(embedding)], dim=-1))  # (B, T, D)
        return self.block(x, ctx, cache)


class MultiTokenModel(nn.Module):
    """Shared trunk, `n_future` heads, shared final norm and unembedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.check_fits_memory()  # refused from the config, before a byte is allocated
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.trunk = nn.ModuleList(Block(cfg) for _ in range(cfg.n_trunk_layers))
        self.heads = nn.ModuleList(cfg.head_kind.make_head(cfg, i) for i in range(cfg.n_future))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Not saved in checkpoints: recomputed from the config.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------------
    # initialisation

    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # norm weights
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=residual_std, generator=gen)
            else:
                nn.init.normal_(p, std=0.02, generator=gen)
        for head in self.heads:
            self.cfg.head_kind.init_head(head)

    # ----------------------------------------------------------------------------------------------
    # the pieces

    def attention_context(
        self,
        T: int,
        positions: torch.Tensor | None = None,
        cache: ModelCache | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_len: int | None = None,
        slots: torch.Tensor | None = None,
    ) -> AttentionContext:
        """Rotary tables and masks for a forward over T tokens.

        Without a cache: training, positions 0..T-1. With a cache: `positions` (B, T) are required;
        the default mask is causal by position; `kv_len` (default: the cache length) bounds the slots
        read, which saves attention work when every position in the batch is short. `slots` (default:
        the positions) are where the keys and values are written: a draft tree rotates each node by its
        true position but writes it to a scratch slot, since siblings share a position.
        """
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
            return AttentionContext(self.rope_cos[:T], self.rope_sin[:T])
        assert positions is not None, "decoding with a cache needs explicit positions"
        kv_len = kv_len or cache.max_len
        mask = causal_mask(positions, kv_len) if attn_mask is None else attn_mask
        return AttentionContext(
            self.rope_cos[positions],
            self.rope_sin[positions],
            slots=positions if slots is None else slots,
            mask=mask,
            kv_len=kv_len,
        )

    def embed_and_trunk(
        self, tokens: torch.Tensor, ctx: AttentionContext, cache: ModelCache | None = None
    ) -> torch.Tensor:
        """Token ids (B, T) -> trunk output h (B, T, D)."""
        x = self.tok_embeddings(tokens)  # (B, T, D)
        for i, block in enumerate(self.trunk):
            x = block(x, ctx, cache.trunk[i] if cache is not None else None)
        return x

    def head_order(self, heads: Sequence[int] | None = None) -> list[int]:
        """The heads (0-based) that must run, in the order they must run, to produce `heads` (default: all)."""
        wanted = list(range(self.cfg.n_future)) if heads is None else list(heads)
        return self.cfg.head_kind.order(self.cfg.n_future, wanted)

    def head_input(
        self, i: int, h: torch.Tensor, outputs: dict[int, torch.Tensor], tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What head i reads: the trunk output h, or the output of the head its kind chains it to; for a head that
        reads a token as well, that hidden input (B, T, D) concatenated with the embedding of the token `lead`
        positions ahead in `tokens` (B, T), zero past their end: (B, T, 2D)."""
        kind = self.cfg.head_kind
        source = kind.source(i, self.cfg.n_future)
        x = h if source is None else outputs[source]
        lead = kind.token_lead(i)
        if lead is None:
            return x
        if tokens is None:
            raise ValueError(f"head {i + 1} reads the token {lead} positions ahead: pass the tokens")
        ahead = F.pad(self.tok_embeddings(tokens[:, lead:]), (0, 0, 0, min(lead, tokens.shape[1])))  # (B, T, D)
        return torch.cat([x, ahead.to(x.dtype)], dim=-1)

    def run_heads(
        self,
        h: torch.Tensor,
        ctx: AttentionContext,
        cache: ModelCache | None = None,
        heads: Sequence[int] | None = None,
        tokens: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Trunk output h (B, T, D) -> {head index: head output z (B, T, D)} for the heads needed.

        tokens (B, T): the input tokens, which heads that read a token ahead need (`head_input`). In a cached
        forward such a head has no input at the last `lead` positions of the block fed: the decoder fills its
        cache with its own pass instead (generate/conditioned.py).
        """
        outputs: dict[int, torch.Tensor] = {}
        for i in self.head_order(heads):
            x = self.head_input(i, h, outputs, tokens)
            outputs[i] = self.heads[i](x, ctx, cache.heads[i] if cache is not None else None)
        return outputs

    def unembed(self, z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Head output (..., D) -> logits (..., V) through the shared norm and unembedding.

        rows: (K, D) rows of the unembedding to score against instead of all V (a draft vocabulary's,
        gathered once by the caller); the logits are then (..., K).
        """
        if rows is None:
            return self.output(self.norm(z))
        return linear(self.norm(z), rows, decide_as=self.output.weight.shape)

    # ----------------------------------------------------------------------------------------------
    # composition

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        heads: Sequence[int] | None = None,
        positions: torch.Tensor | None = None,
        cache: ModelCache | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, len(heads), V) of the requested heads (default: all, in order).

        This builds every requested head's logits at once: fine for decoding and tests; training uses
        the sequential step in loss.py, which never does.
        """
        ctx = self.attention_context(tokens.shape[1], positions, cache, attn_mask, kv_len)
        h = self.embed_and_trunk(tokens, ctx, cache)
        wanted = list(range(self.cfg.n_future)) if heads is None else list(heads)
        outputs = self.run_heads(h, ctx, cache, wanted, tokens)
        return torch.stack([self.unembed(outputs[i]) for i in wanted], dim=2)  # (B, T, k, V)

    def make_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> ModelCache:
        """An empty static cache for every block, on the model's device.

        Decoding starts here, so on the CPU this also chooses, once per machine and thread count, which of the
        model's few-row products go weight-stationary (`kernels.prepare`); training never makes a cache.
        """
        kernels.prepare(m.weight for m in self.modules() if isinstance(m, Linear))
        cfg, p = self.cfg, self.tok_embeddings.weight
        max_len = max_len or cfg.max_seq_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len={cfg.max_seq_len}")

        def new() -> KVCache:
            return KVCache.empty(
                batch_size, cfg.n_kv_heads, max_len, cfg.head_dim, device=p.device, dtype=dtype or p.dtype
            )

        heads = [new() if cfg.head_kind.owns_blocks else None for _ in range(cfg.n_future)]
        cache = ModelCache(trunk=[new() for _ in range(cfg.n_trunk_layers)], heads=heads)
        if cfg.head_kind.reads_tokens(cfg.n_future):
            # What the token-conditioned modules read: each position's token and each head's output but the last.
            cache.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=p.device)
            shape = (batch_size, max_len, cfg.dim)
            cache.states = [
                torch.zeros(shape, device=p.device, dtype=dtype or p.dtype) for _ in range(cfg.n_future - 1)
            ]
        return cache

    def num_parameters(self, *, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_embeddings.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.output.weight.numel()
        return n
