"""Configuration dataclasses, presets and validation.

`ModelConfig.n_layers` counts every transformer block, as in the paper and its official release: the
trunk has `n_layers - n_future` blocks and each of the `n_future` heads one block (a 7B, 32-layer, n=4
model is 28 trunk blocks + 4 head blocks). Linear heads take no block, so their trunk keeps all
`n_layers` blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from multitoken import head_kinds
from multitoken.errors import UserError
from multitoken.head_kinds import HeadKind


@dataclass
class ModelConfig:
    """Shape of a multi-token prediction transformer (Llama-style blocks)."""

    vocab_size: int = 257
    dim: int = 256
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads (plain multi-head)
    ffn_dim: int | None = None  # SwiGLU hidden size; None means Llama's rule (8/3 dim, rounded up)
    multiple_of: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 1024
    n_future: int = 4
    head_type: str = "parallel"
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.ffn_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        self.validate()

    def validate(self) -> None:
        """Raise `UserError` (a ValueError) naming the first inconsistent field."""
        kind = head_kinds.head_kind(self.head_type)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_future < 1:
            raise UserError(f"n_future must be >= 1, got {self.n_future}")
        if kind.owns_blocks and self.n_future >= self.n_layers:
            raise UserError(
                f"n_future={self.n_future} needs n_layers > n_future (each head takes one of the "
                f"{self.n_layers} blocks and the trunk needs at least one)"
            )
        if self.dim % self.n_heads:
            raise UserError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise UserError(f"head dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_kind(self) -> HeadKind:
        """The head kind (head_kinds.py) that `head_type` names."""
        return head_kinds.head_kind(self.head_type)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_head_blocks(self) -> int:
        """Blocks owned by the heads (0 for linear heads)."""
        return self.n_future if self.head_kind.owns_blocks else 0

    @property
    def n_trunk_layers(self) -> int:
        return self.n_layers - self.n_head_blocks

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**data)


def param_count(cfg: ModelConfig, *, embeddings: bool = True) -> int:
    """Number of parameters of a model of this shape, computed from the config alone."""
    d, kv = cfg.dim, cfg.n_kv_heads * cfg.head_dim
    block = d * d * 2 + d * kv * 2 + 3 * d * cfg.ffn_dim + 2 * d  # wq, wo, wk, wv, SwiGLU, two norms
    blocks = cfg.n_trunk_layers * block + cfg.n_head_blocks * block + cfg.head_kind.extra_parameters(cfg)
    total = blocks + d  # final norm
    if embeddings:
        total += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return total


# Presets. `tiny` trains in seconds for tests; `demo` is the main job's default on 2 CPU cores; the
# paper's shapes are here for config and parameter-count checks (Table S14 induction sizes, 7B n=4).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, n_layers=4, n_heads=4, max_seq_len=256, n_future=2),
    "small": dict(dim=192, n_layers=8, n_heads=6, max_seq_len=512),
    "demo": dict(dim=192, n_layers=10, n_heads=6, max_seq_len=512),
    # The main job's model: 4 trunk blocks + 4 heads of width 128, the shape that reached the lowest held-out
    # loss in 150 s of 2 CPU cores among the candidates of benchmarks/main_job_sweep.py (docs/training.md).
    "mini": dict(dim=128, n_layers=8, n_heads=4, max_seq_len=512),
    "base": dict(dim=768, n_layers=12, n_heads=12, max_seq_len=2048),
    # Paper Table S14 (induction): ~1M, 3M, 10M, 30M non-embedding parameters.
    "induction-1m": dict(dim=128, n_layers=5, n_heads=4, max_seq_len=256, n_future=2),
    "induction-3m": dict(dim=192, n_layers=7, n_heads=6, max_seq_len=256, n_future=2),
    "induction-10m": dict(dim=256, n_layers=13, n_heads=8, max_seq_len=256, n_future=2),
    "induction-30m": dict(dim=384, n_layers=17, n_heads=8, max_seq_len=256, n_future=2),
    # 7B, 32 layers, n=4: 28 trunk blocks + 4 heads (vocab 32k, ffn 11008 as in Llama 2).
    "7b-n4": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, max_seq_len=4096, n_future=4),
}


DEFAULT_PRESET = "mini"


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with `overrides` applied (None values are ignored)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(**fields)


UNBOUNDED_STEPS = 1_000_000  # a max_steps that only a time budget stops


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping for one training run."""

    # The defaults are the main job's (`multitoken train`): the batch, context and learning rate that reached the
    # lowest held-out loss in 150 s of 2 CPU cores (benchmarks/main_job_sweep.py, docs/training.md).
    batch_size: int = 4
    context: int = 128  # input tokens per window; each window carries n_future extra target tokens
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    max_steps: int = 1600  # UNBOUNDED_STEPS: the time budget alone decides
    time_budget_s: float | None = None  # stop (and checkpoint) once this much wall time has passed
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    head_weights: list[float] | None = None
    loss_chunk: int = 1024  # tokens per cross-entropy chunk in the sequential step; 0 = no chunking
    sequential: bool = True  # the paper's memory-efficient step (False: sum the losses, one backward)
    compile: bool = False
    seed: int = 0
    val_fraction: float = 0.05
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON round-trips give lists
        for name in ("batch_size", "context", "grad_accum", "max_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise UserError(f"time budget must be > 0 seconds, got {self.time_budget_s}")
        if self.loss_chunk < 0:
            raise UserError(f"loss_chunk must be >= 0, got {self.loss_chunk}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class DemoConfig:
    """What the main job decodes after training (demo.py): held-out code, plain, chain and trees."""

    prompts: int = 2  # held-out functions continued
    context_lines: int = 6  # lines of code before each `def name(` in the prompt, fewer if it is too long
    prompt_tokens: int = 48  # at most this many prompt tokens, so that prompt + continuation fit the context
    new_tokens: int = 80  # tokens generated per prompt
    tree_budgets: tuple[int, ...] = (2, 4, 8, 12, 16)  # tree sizes (root included) timed here; the fastest kept
    calibration_windows: int = 16
    calibration_tokens: int = 128  # window length (prompt + continuation) of each calibration window
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
