"""Hugging Face interop: import Llama-architecture checkpoints (folders or GGUF), export Llama folders.

Import maps a transformers Llama onto our model with n_future = 1 by default: the trunk gets every
layer but the last, and the last layer becomes head 1, so the imported model is the same function
(`LlamaForCausalLM`'s logits == our head-1 logits, float32). Our blocks use transformers' "rotate half"
RoPE layout, so wq/wk load without permutation. Weights are read with safetensors only (never pickle);
a GGUF file goes through transformers, which dequantises it (see `gguf.py`).

Export writes the next-token model (the blocks that produce head 1's output, in order) as a plain
`LlamaForCausalLM` folder: config.json, model.safetensors, and tokenizer.json + tokenizer_config.json
that `AutoTokenizer` loads. The other heads travel beside it (multitoken_heads.safetensors and
multitoken.json, with the run's tree.json and draft_vocab.json), which transformers ignores and
`import_hf` reads back bitwise. Which blocks the Llama holds depends on the head type:

    parallel, causal   trunk, head 1                 (head 1 reads the trunk)
    anticausal         trunk, head n, ..., head 1    (head i reads head i+1: a deeper Llama)
    linear             refused: head 1 is a d x d map before the final RMSNorm, and no Llama layer
                       computes norm(W h), whatever n_future is.

The entry points for the CLI are `import_to_run` and `export_run`.
"""

from __future__ import annotations

import json
import reprlib
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from multitoken.checkpoint import (
    cast_model,
    check_tensors,
    kept_dtype,
    load_run,
    load_safetensors,
    read_json,
    save_checkpoint,
    stored_dtype,
    write_run_config,
)
from multitoken.config import ModelConfig, typed_field
from multitoken.data.tokenizers import (
    CONFIG_FILE as TOKENIZER_CONFIG_FILE,
)
from multitoken.data.tokenizers import (
    EOS_TOKEN,
    TOKENIZER_FILE,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
)
from multitoken.errors import CheckpointError, DataError, UserError
from multitoken.generate.draft_vocab import DRAFT_VOCAB_FILE
from multitoken.generate.tree import TREE_FILE
from multitoken.heads import add_heads
from multitoken.interop.gguf import load_gguf
from multitoken.interop.meta import export_meta, import_meta, resolve_model, staged_dir
from multitoken.model import MultiTokenModel

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
HEADS_WEIGHTS_FILE = "multitoken_heads.safetensors"  # heads beyond the next-token model, beside a Llama export
HEADS_CONFIG_FILE = "multitoken.json"  # {"model": our full ModelConfig}
# transformers' tensor names inside one decoder layer -> ours (both without ".weight").
HF_BLOCK_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


# --------------------------------------------------------------------------------------------------
# configs


def _field(hf: Mapping[str, Any], name: str, hint: Any, **kwargs: Any) -> Any:
    """`typed_field` of a transformers config, as CheckpointError."""
    try:
        return typed_field(hf, name, hint, **kwargs)
    except UserError as e:
        raise CheckpointError(f"the model config has {e}") from None


def config_from_hf(hf: Mapping[str, Any], n_future: int = 1, max_seq_len: int | None = None) -> ModelConfig:
    """Our ModelConfig for a transformers config dict, or CheckpointError naming what is unsupported or of the
    wrong type.

    Accepts transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`) spellings.
    """
    if not isinstance(hf, Mapping):
        raise CheckpointError(f"the model config is not a JSON object but {reprlib.repr(hf)}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"model_type {reprlib.repr(model_type)} is not supported (only {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    problems = []
    rope = _field(hf, "rope_parameters", dict[str, Any], default={})
    scaling = _field(hf, "rope_scaling", dict[str, Any], default={})
    for rope_type in (rope.get("rope_type"), scaling.get("rope_type") or scaling.get("type")):
        if rope_type not in (None, "default"):
            problems.append(f"RoPE scaling {rope_type!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            problems.append(f"{flag}=True")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (only silu)")
    # Mistral's sliding window changes attention; a Mistral without one is a Llama.
    if hf.get("sliding_window") is not None:
        problems.append(f"sliding_window={hf['sliding_window']}")
    quant = _field(hf, "quantization_config", dict[str, Any], default={})
    if quant and quant.get("quant_method") != "gguf":  # transformers dequantises GGUF on load
        problems.append(f"quantized weights ({quant.get('quant_method')})")
    dim = _field(hf, "hidden_size", int, minimum=1)
    n_heads = _field(hf, "num_attention_heads", int, minimum=1)
    head_dim = _field(hf, "head_dim", int, default=dim // n_heads)
    if dim % n_heads or head_dim != dim // n_heads:
        problems.append(f"head_dim={head_dim} != hidden_size/num_attention_heads={dim}/{n_heads}")
    if problems:
        raise CheckpointError(f"unsupported {model_type} checkpoint: {'; '.join(problems)}")
    n_source_layers = _field(hf, "num_hidden_layers", int)
    if n_source_layers < 2:
        raise CheckpointError("a checkpoint of fewer than 2 layers cannot be split into a trunk and a head")
    theta = _field(rope, "rope_theta", float, default=_field(hf, "rope_theta", float, default=10000.0))
    return ModelConfig(
        vocab_size=_field(hf, "vocab_size", int, minimum=1),
        dim=dim,
        # The last source layer becomes head 1; extra heads add blocks (n_layers counts all blocks).
        n_layers=n_source_layers - 1 + n_future,
        n_heads=n_heads,
        n_kv_heads=_field(hf, "num_key_value_heads", int, default=n_heads, minimum=1),
        ffn_dim=_field(hf, "intermediate_size", int, minimum=1),
        norm_eps=float(_field(hf, "rms_norm_eps", float, default=1e-6)),
        rope_theta=float(theta),
        max_seq_len=max_seq_len or _field(hf, "max_position_embeddings", int, default=2048, minimum=1),
        n_future=n_future,
        head_type="parallel",
        tie_embeddings=_field(hf, "tie_word_embeddings", bool, default=False),
    )


def next_token_blocks(cfg: ModelConfig) -> list[str]:
    """Our block prefixes that compute head 1's output, in the order a Llama would stack them."""
    if not cfg.head_kind.owns_blocks:
        raise UserError(
            "linear heads have no Llama equivalent: head 1 is a d x d map before the final norm, which no "
            "Llama layer computes; only models with block heads can be exported"
        )
    trunk = [f"trunk.{i}" for i in range(cfg.n_trunk_layers)]
    return trunk + [f"heads.{j}" for j in cfg.head_kind.order(cfg.n_future, [0])]


def config_to_hf(cfg: ModelConfig, n_layers: int, eos_id: int | None) -> dict[str, Any]:
    """A transformers LlamaConfig dict for `n_layers` of our blocks."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------------------------------
# weights


def state_from_hf(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict from a transformers Llama state dict (`model.layers.*`, `lm_head`, ...).

    Source layer i goes to our i-th next-token block (cfg must have n_future = 1). Missing or
    unexpected tensors raise CheckpointError (RoPE frequency buffers of old checkpoints are ignored).
    """
    blocks = next_token_blocks(cfg)  # trunk + head 1: an imported config has parallel heads
    wanted = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        wanted["lm_head.weight"] = "output.weight"
    for i, prefix in enumerate(blocks):
        wanted.update({f"model.layers.{i}.{k}.weight": f"{prefix}.{v}.weight" for k, v in HF_BLOCK_NAMES.items()})
    # A tied checkpoint may still list lm_head (transformers' state_dict does): it is the embedding.
    ignored = {name for name in tensors if name.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        ignored.add("lm_head.weight")
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(set(tensors) - set(wanted) - ignored)
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not match config.json ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    state = {ours: tensors[theirs] for theirs, ours in wanted.items()}
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def _load_state(model: MultiTokenModel, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `state` after checking every name, shape and dtype, so a mismatch never leaves a half-loaded model."""
    check_tensors(state, model.state_dict(), source)
    model.load_state_dict(state, strict=True)


def read_safetensors(src_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors or of the shards listed in model.safetensors.index.json.

    Pickled weights (pytorch_model.bin) are refused, never unpickled; the index may name only files beside it.
    """
    index = src_dir / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        shards = list(weight_map.values()) if isinstance(weight_map, dict) else []
        if not shards or not all(isinstance(v, str) and v == Path(v).name and v not in ("", ".", "..") for v in shards):
            raise CheckpointError(f"{index} is corrupt: its weight_map should name shard files beside it")
        files = sorted(set(shards))
        missing = [name for name in files if not (src_dir / name).is_file()]
        if missing:
            raise CheckpointError(f"{src_dir} lacks {len(missing)} of the shards its index lists, e.g. {missing[0]}")
    elif (src_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any(src_dir.glob("*.bin")) or any(src_dir.glob("*.pt*")):
        raise CheckpointError(f"{src_dir} has only pickled weights; convert them to safetensors first")
    else:
        raise CheckpointError(f"{src_dir} has no model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_safetensors(src_dir / name))
    return tensors


# --------------------------------------------------------------------------------------------------
# tokenizers


def _tokenizer_config(src_dir: Path) -> dict[str, Any]:
    """tokenizer_config.json of a source folder ({} without one), or DataError if it is not a JSON object."""
    path = src_dir / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return {}
    data = read_json(path, DataError)
    if not isinstance(data, dict):
        raise DataError(f"{path} is corrupt: not a JSON object")
    return data


def _eos_token(src_dir: Path, hf_config: Mapping[str, Any], tok: HFTokenizer) -> str | None:
    """The source's end-of-sequence token: tokenizer_config.json's, else config.json's id, else None."""
    eos = _tokenizer_config(src_dir).get("eos_token")
    if isinstance(eos, dict):  # the AddedToken form {"content": ..., ...}
        eos = eos.get("content")
    if isinstance(eos, str):
        return eos
    eos_id = hf_config.get("eos_token_id")
    if isinstance(eos_id, list):  # several stop ids (chat models): the first is the main one
        eos_id = eos_id[0] if eos_id else None
    in_range = isinstance(eos_id, int) and not isinstance(eos_id, bool) and 0 <= eos_id < tok.get_vocab_size()
    return tok.id_to_token(eos_id) if in_range else None


def _read_hf_tokenizer(src_dir: Path, hf_config: Mapping[str, Any]) -> BPETokenizer | None:
    path = src_dir / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception on any parse error
        raise DataError(f"cannot read tokenizer {path}: {exc}") from exc
    return BPETokenizer(tok, _eos_token(src_dir, hf_config, tok), _chat_template(src_dir))


def _chat_template(src_dir: Path) -> str | None:
    """tokenizer_config.json's chat template (or its "default" one, where it lists several), else None."""
    template = _tokenizer_config(src_dir).get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_as_hf() -> HFTokenizer:
    """Our byte tokenizer as a `tokenizers.Tokenizer`: byte b is id b, `<|endoftext|>` is 256.

    A byte-level BPE without merges splits every text into its bytes, which is exactly our encoding.
    """
    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    assert tok.token_to_id(EOS_TOKEN) == ByteTokenizer.eos_id
    return tok


def _write_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path, max_len: int) -> None:
    """tokenizer.json + a tokenizer_config.json that both AutoTokenizer and our `load_tokenizer` read."""
    if isinstance(tokenizer, ByteTokenizer):
        byte_tokenizer_as_hf().save(str(out_dir / TOKENIZER_FILE))
        eos_token = EOS_TOKEN
    else:
        tokenizer.save(out_dir)  # tokenizer.json, and our config (rewritten below)
        eos_token = tokenizer.eos_token
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "kind": tokenizer.kind,  # for multitoken's own loader
    }
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# import


def _open_source(
    src: str | Path | Any, gguf_file: str | None
) -> tuple[dict[str, Any], Callable[[], Mapping[str, torch.Tensor]], BPETokenizer | None, str]:
    """(transformers config dict, weight reader, tokenizer or None, description) of an import source.

    Weights are read only when asked, so an unsupported config is refused before gigabytes are read.
    """
    if hasattr(src, "config") and hasattr(src, "state_dict"):  # a loaded transformers model
        return src.config.to_dict(), src.state_dict, None, type(src).__name__
    path = Path(src)
    if gguf_file is not None:
        path = Path(gguf_file) if Path(gguf_file).is_absolute() else path / gguf_file
    if path.suffix == ".gguf":
        hf_model, hf_tok = load_gguf(path)
        tokenizer = BPETokenizer(hf_tok.backend_tokenizer, hf_tok.eos_token, getattr(hf_tok, "chat_template", None))
        return hf_model.config.to_dict(), hf_model.state_dict, tokenizer, str(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is neither a Hugging Face model folder (config.json) nor a .gguf file")
    hf_config = read_json(path / "config.json")
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{path / 'config.json'} is corrupt: not a JSON object")
    return hf_config, lambda: read_safetensors(path), _read_hf_tokenizer(path, hf_config), str(path)


def import_hf(
    src: str | Path | Any,
    n_future: int = 1,
    *,
    gguf_file: str | None = None,
    max_seq_len: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[MultiTokenModel, BPETokenizer | None]:
    """(our model, its tokenizer or None) from a transformers Llama.

    `src` is a folder (config.json + safetensors, tokenizer.json optional), a `.gguf` file, a folder
    with `gguf_file` naming a GGUF file in it, or a loaded `LlamaForCausalLM` (no tokenizer then).
    With `n_future` > 1, heads 2..n start as copies of head 1 (the source's last layer), to be trained.
    `max_seq_len` defaults to the source's max_position_embeddings. `dtype` (default: the source's, bf16 kept
    as bf16, fp16 as fp32, which holds it exactly; a GGUF's weights come dequantized, as fp32).
    """
    hf_config, read_tensors, tokenizer, source = _open_source(src, gguf_file)
    where = f"{source}/config.json" if isinstance(src, (str, Path)) and Path(src).is_dir() else source
    sidecar = _read_heads(Path(src)) if isinstance(src, (str, Path)) and gguf_file is None else None
    if sidecar is not None:  # exported by multitoken: the whole model, every head as it was
        cfg, heads = sidecar
        if n_future not in (1, cfg.n_future):
            raise UserError(f"{src} carries {cfg.n_future} heads; import it with n_future {cfg.n_future} (or 1)")
        cfg = cfg.replace(max_seq_len=max_seq_len) if max_seq_len else cfg
        model = MultiTokenModel(cfg)
        tensors = read_tensors()
        _load_state(model, {**state_from_hf(tensors, cfg), **heads}, source)
        return cast_model(model, dtype or kept_dtype(tensors["model.embed_tokens.weight"])).eval(), tokenizer
    try:
        cfg = config_from_hf(hf_config, 1, max_seq_len)
        cfg.check_fits_memory()  # before the model is built or any weight is read
    except UserError as e:
        raise CheckpointError(f"{where}: {e}") from None
    model = MultiTokenModel(cfg)
    tensors = read_tensors()
    _load_state(model, state_from_hf(tensors, cfg), source)
    if n_future > 1:
        model = add_heads(model, n_future)
    return cast_model(model, dtype or kept_dtype(tensors["model.embed_tokens.weight"])).eval(), tokenizer


def _read_heads(src: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]] | None:
    """The full config and the extra heads' tensors that `export_hf` wrote beside a Llama, or None."""
    path = src / HEADS_CONFIG_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or "model" not in data:
        raise CheckpointError(f"{path} is corrupt: it has no 'model' section")
    try:
        cfg = ModelConfig.from_dict(data["model"])
    except UserError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg, load_safetensors(src / HEADS_WEIGHTS_FILE)


def import_to_run(
    src: Path,
    out_dir: Path,
    gguf_file: str | None = None,
    *,
    layout: str = "hf",
    n_future: int = 1,
    max_seq_len: int | None = None,
    allow_missing_tokenizer: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Import a checkpoint into a new run directory `out_dir` (config, tokenizer, checkpoint step 0).

    `layout` is "hf" (a transformers folder or GGUF file; see `import_hf`) or "meta" (params.json +
    consolidated.pth; see `import_meta`). A source without a tokenizer is refused unless
    `allow_missing_tokenizer`. `dtype`: the weights' (default: the source's, see `import_hf`). The run
    directory appears complete or not at all.
    """
    src = Path(src)
    if layout == "hf":
        model, tokenizer = import_hf(src, n_future, gguf_file=gguf_file, max_seq_len=max_seq_len, dtype=dtype)
    elif layout == "meta":
        if gguf_file is not None or n_future != 1:
            raise UserError(
                "--gguf and n_future apply to Hugging Face imports only (the Meta layout has its own heads)"
            )
        model, tokenizer = import_meta(src, max_seq_len)
        model = cast_model(model, dtype)
    else:
        raise UserError(f"unknown layout {layout!r}: expected 'hf' or 'meta'")
    if tokenizer is None and not allow_missing_tokenizer:
        raise DataError(f"{src} has no tokenizer (tokenizer.json); pass allow_missing_tokenizer to import anyway")
    source = {"format": "gguf" if (gguf_file or src.suffix == ".gguf") else layout, "path": str(src.resolve())}
    if gguf_file:
        source["gguf_file"] = gguf_file
    with staged_dir(out_dir) as tmp:
        write_run_config(tmp, model.cfg, source=source)
        if tokenizer is not None:
            tokenizer.save(tmp)
        save_checkpoint(tmp, 0, model, state={"imported_from": source})
        for name in (TREE_FILE, DRAFT_VOCAB_FILE):  # what a multitoken export carries beside its heads
            if src.is_dir() and (src / name).is_file():
                shutil.copy(src / name, tmp / name)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------------
# export


def export_hf(
    model_or_run: MultiTokenModel | str | Path,
    out_dir: Path,
    tokenizer: Tokenizer | None = None,
    extra_files: Sequence[Path] = (),
) -> Path:
    """Write the next-token model as a transformers `LlamaForCausalLM` folder; returns `out_dir`.

    `model_or_run` is a model or a run directory (whose tokenizer is exported with it). The folder's
    logits equal our head-1 logits. See the module docstring for which blocks are written. The other
    heads go beside it, in multitoken_heads.safetensors with the full config in multitoken.json, so
    `import_hf` and `multitoken.load` read the whole model back; `extra_files` (a draft tree, a draft
    vocabulary) are copied in too.
    """
    model, tokenizer = resolve_model(model_or_run, tokenizer)
    cfg = model.cfg
    blocks = next_token_blocks(cfg)
    state = model.state_dict()
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    if not cfg.tie_embeddings:  # tied: transformers re-ties lm_head to the embedding on load
        out["lm_head.weight"] = state["output.weight"]
    for i, prefix in enumerate(blocks):
        out.update({f"model.layers.{i}.{k}.weight": state[f"{prefix}.{v}.weight"] for k, v in HF_BLOCK_NAMES.items()})
    out = {name: t.detach().cpu().contiguous() for name, t in out.items()}
    hf_config = config_to_hf(cfg, len(blocks), tokenizer.eos_id if tokenizer is not None else None)
    hf_config["torch_dtype"] = str(state["norm.weight"].dtype).removeprefix("torch.")
    exported = {f"{prefix}." for prefix in blocks} | {"tok_embeddings.", "norm.", "output."}
    heads = {k: v.detach().cpu().contiguous() for k, v in state.items() if not k.startswith(tuple(exported))}
    with staged_dir(out_dir) as tmp:
        save_file(out, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer is not None:
            _write_hf_tokenizer(tokenizer, tmp, cfg.max_seq_len)
        if cfg.n_future > 1:  # the other heads travel beside the Llama, which transformers loads unchanged
            save_file(heads, tmp / HEADS_WEIGHTS_FILE, metadata={"format": "pt"})
            (tmp / HEADS_CONFIG_FILE).write_text(json.dumps({"model": cfg.to_dict()}, indent=2) + "\n")
        for name in extra_files:
            shutil.copy(name, tmp / Path(name).name)
    return Path(out_dir)


def export_run(run_dir: Path, out_dir: Path, fmt: str = "hf", dtype: torch.dtype | None = None) -> Path:
    """Export a run directory's newest checkpoint as "hf" (`export_hf`, with the run's tree and draft
    vocabulary) or "meta" (`export_meta`), its weights in `dtype` (default: the checkpoint's)."""
    if fmt not in ("hf", "meta"):
        raise UserError(f"unknown export format {fmt!r}: expected 'hf' or 'meta'")
    run = load_run(run_dir)
    model = cast_model(run.model, dtype or stored_dtype(run.checkpoint))
    has_tokenizer = (Path(run_dir) / TOKENIZER_CONFIG_FILE).is_file() or (Path(run_dir) / TOKENIZER_FILE).is_file()
    tokenizer = load_tokenizer(run_dir) if has_tokenizer else None
    if fmt == "hf":
        extra = [Path(run_dir) / name for name in (TREE_FILE, DRAFT_VOCAB_FILE) if (Path(run_dir) / name).is_file()]
        return export_hf(model, out_dir, tokenizer, extra_files=extra)
    return export_meta(model, out_dir, tokenizer)
