"""The official release layout of `facebook/multi-token-prediction` (Meta's Llama format).

    out/
      params.json        {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                          "ffn_dim_multiplier", "norm_eps", "rope_theta", "n_future_tokens"}
      consolidated.pth   a plain dict of tensors (torch.save), loaded with weights_only=True
      tokenizer files    ours (tokenizer_config.json, tokenizer.json), when the model has a tokenizer

Tensor names are Meta's: the trunk and the next-token head are `layers.0 .. layers.{n_layers - n}`
numbered contiguously, heads 2..n are `extra_heads.0 .. extra_heads.{n - 2}` with the same block
layout, then the shared `norm` and `output`. Meta's rotary embedding rotates interleaved channel pairs
(2i, 2i+1) where ours (Hugging Face's) rotates (i, i + head_dim/2), so wq and wk rows are permuted on the
way out and back. The release only has parallel heads, and its params.json has no field for any other
kind, so other head types are refused rather than written as something that would load wrongly.

This module also holds the small helpers both exporters share: opening a model or run directory, and
writing an output directory atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from multitoken.checkpoint import check_tensors, load_run, read_json
from multitoken.config import ModelConfig, typed_field
from multitoken.data.tokenizers import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from multitoken.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer
from multitoken.errors import CheckpointError, UserError, one_line
from multitoken.model import MultiTokenModel

PARAMS_FILE = "params.json"
WEIGHTS_FILE = "consolidated.pth"
# params.json does not carry the context length: Meta's loader passes max_seq_len at run time.
DEFAULT_MAX_SEQ_LEN = 4096
# The tensors of one block, named alike in our model and in Meta's (without ".weight").
BLOCK_WEIGHTS = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "attention_norm",
    "ffn_norm",
)


# --------------------------------------------------------------------------------------------------
# helpers shared with the Hugging Face exporter


def resolve_model(
    model_or_run: MultiTokenModel | str | Path, tokenizer: Tokenizer | None = None
) -> tuple[MultiTokenModel, Tokenizer | None]:
    """A model and its tokenizer: loaded from a run directory (tokenizer optional there), or as given."""
    if isinstance(model_or_run, MultiTokenModel):
        return model_or_run, tokenizer
    run_dir = Path(model_or_run)
    model = load_run(run_dir).model
    if tokenizer is None and ((run_dir / TOKENIZER_CONFIG_FILE).is_file() or (run_dir / TOKENIZER_FILE).is_file()):
        tokenizer = load_tokenizer(run_dir)
    return model, tokenizer


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir` that becomes `out_dir` (one rename) if the body succeeds.

    A failure or a kill leaves no half-written output; `out_dir` may not exist yet or be empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------
# shapes and names


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """The SwiGLU hidden size Meta's Llama code derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_ffn_params(cfg: ModelConfig) -> dict[str, Any]:
    """`multiple_of` and `ffn_dim_multiplier` that make Meta's rule give exactly `cfg.ffn_dim`."""
    for multiple_of in (cfg.multiple_of, 256):  # 256: Llama's own, as in the official params.json
        if meta_ffn_dim(cfg.dim, multiple_of) == cfg.ffn_dim:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": None}
    # Any other size: scale the base size to about ffn_dim (int() may land one below), and round up to
    # a multiple of ffn_dim itself, which gives exactly ffn_dim.
    params = {"multiple_of": cfg.ffn_dim, "ffn_dim_multiplier": cfg.ffn_dim / int(2 * (4 * cfg.dim) / 3)}
    assert meta_ffn_dim(cfg.dim, **params) == cfg.ffn_dim, (cfg.dim, cfg.ffn_dim, params)
    return params


def meta_block_names(cfg: ModelConfig) -> dict[str, str]:
    """Our block prefix -> Meta's: trunk then head 1 as `layers.*`, heads 2..n as `extra_heads.*`."""
    names = {f"trunk.{i}": f"layers.{i}" for i in range(cfg.n_trunk_layers)}
    names["heads.0"] = f"layers.{cfg.n_trunk_layers}"
    names.update({f"heads.{j}": f"extra_heads.{j - 1}" for j in range(1, cfg.n_future)})
    return names


def rope_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute wq/wk rows from the rotate-half layout (pairs i, i + hd/2) to Meta's (pairs 2i, 2i+1)."""
    out_dim, in_dim = w.shape
    half = out_dim // n_heads // 2
    return w.view(n_heads, 2, half, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def rope_from_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `rope_to_interleaved` (the permutation of transformers' Llama converter)."""
    out_dim, in_dim = w.shape
    half = out_dim // n_heads // 2
    return w.view(n_heads, half, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _permute(name: str, w: torch.Tensor, cfg: ModelConfig, to_meta: bool) -> torch.Tensor:
    """Apply the RoPE layout change to wq/wk; other tensors pass through."""
    heads = {"attention.wq": cfg.n_heads, "attention.wk": cfg.n_kv_heads}.get(name)
    if heads is None:
        return w
    return rope_to_interleaved(w, heads) if to_meta else rope_from_interleaved(w, heads)


# --------------------------------------------------------------------------------------------------
# export / import


def export_meta(model_or_run: MultiTokenModel | str | Path, out_dir: Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write `out_dir` in the official release layout (see the module docstring); returns `out_dir`.

    A model with tied embeddings is written with `output.weight` as a copy of the embedding: the
    layout has no tying flag.
    """
    model, tokenizer = resolve_model(model_or_run, tokenizer)
    cfg = model.cfg
    if not cfg.head_kind.official_layout:
        raise UserError(
            f"the official multi-token layout has only parallel heads; this model's are {cfg.head_type} "
            "(export it with --format hf instead)"
        )
    state = model.state_dict()
    # clone(): each tensor saved on its own, never as a view into a larger shared storage.
    out = {name: state[name].detach().cpu().clone() for name in ("tok_embeddings.weight", "norm.weight")}
    for ours, theirs in meta_block_names(cfg).items():
        for w in BLOCK_WEIGHTS:
            tensor = state[f"{ours}.{w}.weight"].detach().cpu()
            out[f"{theirs}.{w}.weight"] = _permute(w, tensor, cfg, to_meta=True).clone()
    out["output.weight"] = state["output.weight"].detach().cpu().clone()
    params = {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        **meta_ffn_params(cfg),
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "n_future_tokens": cfg.n_future,
    }
    with staged_dir(out_dir) as tmp:
        torch.save(out, tmp / WEIGHTS_FILE)
        (tmp / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out_dir)


def config_from_params(params: dict[str, Any], vocab_size: int, max_seq_len: int) -> ModelConfig:
    """Our ModelConfig for a params.json (parallel heads, untied embeddings, as in Meta's model), every field
    checked for type and range."""
    if params.get("use_scaled_rope"):
        raise CheckpointError("params.json asks for scaled RoPE (Llama 3.1), which is not supported")
    try:
        dim, n_heads = typed_field(params, "dim", int, minimum=1), typed_field(params, "n_heads", int, minimum=1)
        multiple_of = typed_field(params, "multiple_of", int, default=256, minimum=1)
        multiplier = typed_field(params, "ffn_dim_multiplier", float, default=None)
        cfg = ModelConfig(
            vocab_size=vocab_size,
            dim=dim,
            n_layers=typed_field(params, "n_layers", int),
            n_heads=n_heads,
            n_kv_heads=typed_field(params, "n_kv_heads", int, default=n_heads),
            ffn_dim=meta_ffn_dim(dim, multiple_of, multiplier),
            norm_eps=float(typed_field(params, "norm_eps", float, default=1e-5)),
            rope_theta=float(typed_field(params, "rope_theta", float, default=10000.0)),
            max_seq_len=max_seq_len,
            n_future=typed_field(params, "n_future_tokens", int, default=1),
            head_type="parallel",
            tie_embeddings=False,
        )
    except UserError as exc:
        raise CheckpointError(f"params.json is not a valid Llama config: {exc}") from None
    return cfg


def import_meta(src_dir: Path, max_seq_len: int | None = None) -> tuple[MultiTokenModel, Tokenizer | None]:
    """Load params.json + consolidated.pth (official layout, or a plain Meta Llama with one file).

    Every name and shape is checked before anything is loaded into the model, so a wrong or partial
    file raises `CheckpointError` and never yields a half-loaded model. params.json has no context
    length: `max_seq_len` defaults to `DEFAULT_MAX_SEQ_LEN`. The tokenizer is read when the
    folder has ours (tokenizer_config.json / tokenizer.json), else None.
    """
    src_dir = Path(src_dir)
    params_path, weights_path = src_dir / PARAMS_FILE, src_dir / WEIGHTS_FILE
    for path in (params_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{src_dir} is not a Meta checkpoint (no {path.name})")
    params = read_json(params_path)
    if not isinstance(params, dict):
        raise CheckpointError(f"{params_path} is not a JSON object")
    try:
        # weights_only: the unpickler builds tensors and plain containers only, so a crafted file runs no code
        # (it is refused); each storage holds the bytes the file has for it, so a file allocates at most its size.
        weights = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for truncated, foreign or hostile files
        raise CheckpointError(f"cannot read {weights_path}: {type(exc).__name__}: {one_line(exc)}") from None
    if not isinstance(weights, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in weights.items()):
        raise CheckpointError(f"{weights_path} is not a plain dict of tensors")
    embedding = weights.get("tok_embeddings.weight")
    if embedding is None or embedding.dim() != 2:
        raise CheckpointError(f"{weights_path} has no 2-D tok_embeddings.weight")
    try:
        vocab_size = typed_field(params, "vocab_size", int, default=-1)  # Llama 2's says -1: take the tensor's
    except UserError as exc:
        raise CheckpointError(f"params.json is not a valid Llama config: {exc}") from None
    vocab_size = vocab_size if vocab_size > 0 else embedding.shape[0]
    cfg = config_from_params(params, vocab_size, max_seq_len or DEFAULT_MAX_SEQ_LEN)
    try:
        cfg.check_fits_memory()  # before anything is sized by the config
    except UserError as exc:
        raise CheckpointError(f"{params_path}: {exc}") from None

    # (Meta's name, our name, our block tensor or None) for every tensor; the whole file is checked
    # against the model before anything is loaded.
    names = [(n, n, None) for n in ("tok_embeddings.weight", "norm.weight", "output.weight")]
    for ours, theirs in meta_block_names(cfg).items():
        names += [(f"{theirs}.{w}.weight", f"{ours}.{w}.weight", w) for w in BLOCK_WEIGHTS]
    wanted = {theirs for theirs, _, _ in names}
    missing, unexpected = sorted(wanted - set(weights)), sorted(set(weights) - wanted)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path} does not match params.json ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    model = MultiTokenModel(cfg)
    check_tensors({ours: weights[theirs] for theirs, ours, _ in names}, model.state_dict(), str(weights_path),
                  "params.json")  # fmt: skip
    state = {ours: weights[theirs] if w is None else _permute(w, weights[theirs], cfg, to_meta=False)
             for theirs, ours, w in names}  # fmt: skip
    model.load_state_dict(state, strict=True)
    tokenizer = None
    if (src_dir / TOKENIZER_CONFIG_FILE).is_file() or (src_dir / TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(src_dir)
    return model.eval(), tokenizer
