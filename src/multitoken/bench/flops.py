"""Analytic training FLOPs per token of a multi-token model (forward + backward).

The count, per token of a window of `context` tokens (multiply-add = 2 FLOPs):

    6 * (trunk blocks' + head blocks' matmul parameters + n * V * d)      # the weight matmuls
    + 12 * context * d_q * (number of blocks)                             # attention scores and values

- Weight matmuls: forward 2 FLOPs per parameter per token, backward 4 (gradient of the input and of the
  weight), hence 6. The unembedding is counted n times, once per head: training unembeds every head's
  output (the overhead the paper reports at small d and large V). The input embedding is a lookup (no
  FLOPs); norms, rotary, SwiGLU's gating and the softmax are elementwise and left out, as in the PaLM and
  Chinchilla conventions.
- Attention: QK^T and attention-times-V each take 2 * context * d_q FLOPs per token forward (d_q =
  n_heads * head_dim), backward twice that: 12 * context * d_q per block. This counts the full T x T
  score matrix (PaLM's convention); causal kernels skip about half of it, so on long contexts the
  utilisation computed from this count is slightly generous to the kernel, equally for every n.
- Every block runs once per token whatever the head type (parallel, causal, anticausal); linear heads
  are a d x d matmul each and no attention.

`torch.utils.flop_counter.FlopCounterMode` on a real forward+backward (math attention backend, which it
can see) agrees with this count exactly; tests/bench/test_flops.py checks it.
"""

from __future__ import annotations

from multitoken.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in a matmul per token, the unembedding counted once per head."""
    d, q, kv = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    block = d * q + 2 * d * kv + q * d + 3 * d * cfg.ffn_dim  # wq, wk, wv, wo, SwiGLU w1/w2/w3
    blocks = (cfg.n_trunk_layers + cfg.n_head_blocks) * block + cfg.head_kind.extra_parameters(cfg)
    return blocks + cfg.n_future * cfg.vocab_size * d


def attention_flops_per_token(cfg: ModelConfig, context: int) -> int:
    """Forward + backward FLOPs per token of the score and value products, over every block."""
    n_blocks = cfg.n_trunk_layers + cfg.n_head_blocks
    return 12 * context * cfg.n_heads * cfg.head_dim * n_blocks


def train_flops_per_token(cfg: ModelConfig, context: int) -> int:
    """Training (forward + backward) FLOPs per input token; the optimizer step is not counted."""
    return 6 * matmul_params(cfg) + attention_flops_per_token(cfg, context)


def flop_ratio(cfg_n: ModelConfig, cfg_1: ModelConfig, context: int) -> float:
    """Training FLOPs of `cfg_n` over those of `cfg_1` at the same context (e.g. n=4 vs n=1)."""
    return train_flops_per_token(cfg_n, context) / train_flops_per_token(cfg_1, context)
