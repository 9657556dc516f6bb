"""Configuration dataclasses, presets and validation.

`ModelConfig.n_layers` counts every transformer block, as in the paper and its official release: the
trunk has `n_layers - n_future` blocks and each of the `n_future` heads one block (a 7B, 32-layer, n=4
model is 28 trunk blocks + 4 head blocks). Linear heads take no block, so their trunk keeps all
`n_layers` blocks.

Every config is checked field by field, type first (a bool is not an int, a string is not a number, NaN is
not a number), then range, before any arithmetic on its values or any allocation: configs come from JSON
files that anyone may have written. `ModelConfig.check_fits_memory` refuses, from the config alone, a model
that could not fit in this machine's memory, so a hostile or mistyped size fails in one line instead of
exhausting memory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import reprlib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from multitoken import head_kinds
from multitoken.errors import ConfigTypeError, UserError
from multitoken.head_kinds import HeadKind

# --------------------------------------------------------------------------------------------------
# field types


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` (as JSON gives it) has the type `hint`. Bools are not ints; floats must be finite;
    a list stands for a tuple (JSON has no tuples)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, h) for h in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an int is a number too; math.isfinite would overflow on a huge one
        return _matches(value, int) or (isinstance(value, float) and math.isfinite(value))
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):  # a fixed-length tuple
            return len(value) == len(args) and all(_matches(v, h) for v, h in zip(value, args, strict=True))
        return all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    raise AssertionError(f"no check for the type {hint}")


_TYPE_NAMES = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", type(None): "null"}


def _describe(hint: Any) -> str:
    """`hint` in words, for an error message."""
    if hint in _TYPE_NAMES:
        return _TYPE_NAMES[hint]
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return ", or ".join(_describe(h) for h in args)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {len(args)} ({', '.join(_describe(h) for h in args)})"
    if origin in (tuple, list):
        return f"a list, each item {_describe(args[0])}"
    if origin is dict:
        return "a mapping"
    return str(hint)


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def check_field_types(config: Any) -> None:
    """Raise `ConfigTypeError` naming the first field of the dataclass `config` whose value has the wrong type."""
    hints = _field_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigTypeError(f"{f.name} must be {_describe(hints[f.name])}, got {reprlib.repr(value)}")


REQUIRED = object()  # `typed_field`'s default: the field must be there


def typed_field(
    data: Mapping[str, Any], name: str, hint: Any, default: Any = REQUIRED, minimum: int | None = None
) -> Any:
    """`data[name]`, checked against the type `hint` and `minimum` as config fields are, for configs in foreign
    layouts (a transformers config.json, Meta's params.json). Absent or null: `default`, unless it is REQUIRED."""
    value = data.get(name)
    if value is None and default is not REQUIRED:
        return default
    wanted = _describe(hint) + (f" >= {minimum}" if minimum is not None else "")
    if value is None or not _matches(value, hint) or (minimum is not None and value < minimum):
        got = "it is missing" if value is None else f"got {reprlib.repr(value)}"
        raise ConfigTypeError(f"no valid {name!r} ({wanted} is required; {got})")
    return value


def _from_fields(cls: type, data: Any, what: str) -> Any:
    """`cls(**data)` for a mapping that must name every field of `cls` and nothing else (a config as `to_dict`
    wrote it): a missing field would silently take a default that need not be what the file's model was."""
    if not isinstance(data, dict):
        raise ConfigTypeError(f"the {what} config must be a mapping of field names to values, got {reprlib.repr(data)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = sorted(set(data) - names, key=str), sorted(names - set(data))
    if unknown:
        raise UserError(f"unknown {what} config field(s): {', '.join(map(str, unknown))}")
    if missing:
        raise UserError(f"missing {what} config field(s): {', '.join(missing)}")
    return cls(**data)


# --------------------------------------------------------------------------------------------------
# memory


def machine_memory_bytes() -> int | None:
    """This machine's physical memory, or the container's limit where that is lower (cgroup v2 or v1: sysconf
    reports the host's memory inside a container); None where neither can be read."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max": no limit
            total = min(total, int(text))
    return total


def format_bytes(n: float) -> str:
    """A byte count in binary units: 1.5 GiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = 0
    while n >= 1024 and power < len(units) - 1:
        n, power = n / 1024, power + 1
    return f"{int(n)} B" if power == 0 else f"{n:.1f} {units[power]}"


def check_memory(nbytes: int, what: str, remedy: str) -> None:
    """Raise `UserError` if `what` would need more than this machine's memory (`machine_memory_bytes`); the
    message ends with `remedy`.

    Only what cannot fit at all is refused: whether it fits beside everything else running is for the operating
    system to say, and refusing on the memory free at this instant would make loading depend on the moment.
    """
    total = machine_memory_bytes()
    if total is not None and nbytes > total:
        raise UserError(
            f"{what} would need {format_bytes(nbytes)} of memory, more than this machine's {format_bytes(total)}; "
            + remedy
        )


# --------------------------------------------------------------------------------------------------
# model


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
        self.validate()  # before the defaults below compute with the values
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.ffn_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self) -> None:
        """Raise `UserError` (a ValueError; `ConfigTypeError` for a wrong type) naming the first bad field.

        None for n_kv_heads or ffn_dim stands for its default (n_heads; Llama's rule), as before `__post_init__`.
        """
        check_field_types(self)
        kind = head_kinds.head_kind(self.head_type)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        if self.n_future < 1:
            raise UserError(f"n_future must be >= 1, got {self.n_future}")
        for name in ("norm_eps", "rope_theta"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
        if kind.owns_blocks and self.n_future >= self.n_layers:
            raise UserError(
                f"n_future={self.n_future} needs n_layers > n_future (each head takes one of the "
                f"{self.n_layers} blocks and the trunk needs at least one)"
            )
        if self.dim % self.n_heads:
            raise UserError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if self.n_heads % n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        if self.head_dim % 2:
            raise UserError(f"head dim {self.head_dim} must be even for rotary embeddings")

    def memory_bytes(self) -> int:
        """Bytes that building this model takes: its parameters in float32 (every model is built in float32, then
        cast) and its rotary tables, computed in float64 (angles, cosines, sines)."""
        return 4 * param_count(self) + 3 * 8 * self.max_seq_len * (self.head_dim // 2)

    def check_fits_memory(self) -> None:
        """Raise `UserError` if building this model would need more than this machine's memory (`check_memory`)."""
        check_memory(
            self.memory_bytes(),
            f"a model of {param_count(self):.3g} parameters (dim {self.dim}, {self.n_layers} layers, "
            f"vocabulary {self.vocab_size}, context {self.max_seq_len})",
            "check the sizes in its config",
        )

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
        """The config `to_dict` wrote (every field, nothing else), checked, and refused if the model it describes
        could not fit in this machine's memory: what loaders call on a config read from a file."""
        cfg = _from_fields(cls, data, "model")
        cfg.check_fits_memory()
        return cfg


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
BUDGET_CLOCKS = ("wall", "cpu")  # what a time budget counts: wall seconds, or this process's CPU seconds


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
    time_budget_s: float | None = None  # stop (and checkpoint) once this much time has passed ...
    budget_clock: str = "wall"  # ... on this clock: "wall", or "cpu" (this process's CPU seconds, all its threads)
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
        check_field_types(self)
        self.betas = tuple(self.betas)  # JSON round-trips give lists
        for name in ("batch_size", "context", "grad_accum", "max_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise UserError(f"time budget must be > 0 seconds, got {self.time_budget_s}")
        if self.budget_clock not in BUDGET_CLOCKS:
            raise UserError(f"budget_clock must be one of {', '.join(BUDGET_CLOCKS)}, got {self.budget_clock!r}")
        if self.loss_chunk < 0:
            raise UserError(f"loss_chunk must be >= 0, got {self.loss_chunk}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("warmup_steps", "eval_batches", "seed", "weight_decay"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.grad_clip <= 0:  # clipping to norm 0 would zero every gradient
            raise UserError(f"grad_clip must be > 0, got {self.grad_clip}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"betas must lie in [0, 1), got {self.betas}")
        if self.head_weights is not None and any(w < 0 for w in self.head_weights):
            raise UserError(f"head_weights must be >= 0, got {self.head_weights}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config `to_dict` wrote (every field, nothing else), checked."""
        return _from_fields(cls, data, "train")


MODES = ("frozen", "joint")  # head training: the new heads alone, or everything
TARGETS = ("corpus", "self", "generated")
INITS = ("copy", "random")
PRECISIONS = ("auto", "fp32", "bf16")  # head training's arithmetic; auto: bf16 where it measures faster


@dataclass
class HeadsConfig:
    """What `train_heads` does besides optimisation (which a `TrainConfig` describes)."""

    n_future: int = 4
    mode: str = "frozen"
    targets: str = "self"
    init: str = "copy"
    trunk_lr_scale: float = 0.01  # joint mode: LR of the pretrained parts relative to the new heads (3e-5)
    generated_prompts: int = 64  # targets="generated": how many greedy continuations to make ...
    prompt_tokens: int = 32  # ... from prompts of this many corpus tokens ...
    generated_tokens: int = 96  # ... continued for this many tokens each ...
    generation_batch: int = 32  # ... this many at a time (SmolLM2 on 2 cores: 44 tok/s at 8, 90 at 64)
    draft_vocab: int | None = None  # frozen mode: heads 2..n learn (and later draft) the K most frequent tokens
    trunk_cache_gib: float = 4.0  # frozen mode: keep up to this much trunk output (0: recompute at random offsets)
    trunk_reuse: int = 1  # frozen mode: batches each window's kept trunk output serves, on average
    soft_targets: float = 0.0  # frozen mode: weight of head 1's distribution in the targets (0: its token only)
    head_type: str | None = None  # the new heads' kind (`add_heads`); None: the model's own, or parallel
    precision: str = "auto"  # bf16 autocast (fp32 master weights) or fp32; auto: timed on this machine

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.n_future < 2:
            raise UserError(f"n_future must be >= 2 to have heads to train, got {self.n_future}")
        if self.head_type is not None:
            head_kinds.head_kind(self.head_type)  # a UserError naming the known kinds
        if self.mode not in MODES:
            raise UserError(f"unknown head training mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.targets not in TARGETS:
            raise UserError(f"unknown head targets {self.targets!r}; choose one of {', '.join(TARGETS)}")
        if self.init not in INITS:
            raise UserError(f"unknown head init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown head precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.trunk_lr_scale < 0:
            raise UserError(f"trunk_lr_scale must be >= 0, got {self.trunk_lr_scale}")
        if self.trunk_cache_gib < 0:
            raise UserError(f"trunk_cache_gib must be >= 0, got {self.trunk_cache_gib}")
        if not 0.0 <= self.soft_targets <= 1.0:
            raise UserError(f"soft_targets must be between 0 and 1, got {self.soft_targets}")
        if self.soft_targets > 0 and self.mode != "frozen":
            raise UserError(
                "soft targets need frozen mode (head 1 must stay the teacher): set mode frozen or soft_targets 0"
            )
        if self.trunk_reuse > 1 and (self.mode != "frozen" or self.trunk_cache_gib == 0):
            raise UserError("trunk_reuse > 1 needs frozen mode and trunk_cache_gib > 0 (a kept trunk output to reuse)")
        for name in ("generated_prompts", "prompt_tokens", "generated_tokens", "generation_batch", "trunk_reuse"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.draft_vocab is not None and self.mode != "frozen":
            raise UserError("a draft vocabulary is trained in frozen mode only (head 1 keeps the full vocabulary)")


def default_heads_train_config(**overrides: Any) -> TrainConfig:
    """Optimisation defaults for head training on a pretrained model (`multitoken heads`): ten minutes.

    No weight decay (it would pull the copied pretrained weights towards zero, not a prior worth having),
    short warmup. Batch, context and LR are the best measured for frozen heads on SmolLM2-135M: LR 3e-3
    beat 1e-3 for both head kinds at 20 CPU-minutes (docs/results/smollm2_mtp.md). Joint mode's pretrained
    parts learn at `HeadsConfig.trunk_lr_scale` times this.
    """
    fields: dict[str, Any] = dict(
        batch_size=4, context=128, lr=3e-3, warmup_steps=10, weight_decay=0.0, max_steps=100_000,
        eval_batches=2, loss_chunk=1024, time_budget_s=600.0,
    )  # fmt: skip
    fields.update(overrides)
    return TrainConfig(**fields)


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
