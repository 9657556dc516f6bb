"""Run directories and checkpoints: safetensors + JSON, written atomically, verified on load.

A run directory:

    run/
      config.json                  model config, training config, data sources (written once)
      tokenizer_config.json, tokenizer.json (BPE only)
      metrics.jsonl                one JSON object per logged step/evaluation
      latest                       name of the newest complete checkpoint
      checkpoints/step_000100/
        model.safetensors          weights
        optimizer.safetensors      optimizer tensors (absent for weights-only checkpoints)
        state.json                 step, optimizer hyper-parameters, RNG state, data position,
                                   and the size and SHA-256 of every file above

A checkpoint is written into a temporary folder, flushed to disk, then renamed into place (a rename is
atomic), and only then does `latest` move (again by an atomic rename). A process killed at any moment
leaves the previous checkpoint loadable; a truncated or altered file is detected by its hash and is
never half-loaded. Nothing is unpickled: tensors go through safetensors, everything else through JSON.

Every file is read as if anyone could have written it, state.json included (an author of a hostile checkpoint
writes matching checksums): sizes and types are checked before they are used, and a bad file is refused in
one line naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from multitoken.config import ModelConfig, format_bytes, typed_field
from multitoken.errors import CheckpointError, UserError, one_line
from multitoken.model import MultiTokenModel

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
LATEST_FILE = "latest"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_NAME = re.compile(r"step_\d+")  # what `latest` may name: a folder of checkpoints/, never a path
# Our JSON files are configs, file tables and lists of token ids: the largest, the draft vocabulary of a
# 256k-token model, is about 2 MB. A larger file is none of them, and parsing it would take several times its
# size in Python objects.
MAX_JSON_BYTES = 64 << 20


# --------------------------------------------------------------------------------------------------
# atomic file helpers


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path, error: type[UserError] = CheckpointError, remedy: str = "") -> Any:
    """The JSON value in `path`, or `error` in one line saying why there is none (missing, too large, not UTF-8,
    not JSON, nested too deeply, a number of too many digits), then `remedy` (what to do), if given."""
    path = Path(path)
    tail = f"; {remedy}" if remedy else ""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or one_line(e)}{tail}") from None
    if size > MAX_JSON_BYTES:
        raise error(f"{path} is corrupt: {format_bytes(size)}, larger than any JSON file of ours{tail}")
    try:
        return json.loads(path.read_bytes())
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or one_line(e)}{tail}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path} is corrupt: not valid JSON ({one_line(e)}){tail}") from None


def _check_format(data: Mapping[str, Any], path: Path) -> None:
    """Refuse a file written in a later format than this code reads (or whose "format" is no version)."""
    try:
        version = typed_field(data, "format", int, minimum=1)
    except UserError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {version}; this multitoken reads up to {FORMAT_VERSION}: upgrade it")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# optimizer state <-> safetensors + JSON


def _optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into named tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state_dict that `_optimizer_to_flat` split; ValueError, KeyError, TypeError or
    AttributeError for tensors and a rest that it did not write."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# --------------------------------------------------------------------------------------------------
# run configuration


def write_run_config(run_dir: Path, model_cfg: ModelConfig, **sections: Any) -> None:
    """Write config.json: the model config plus any JSON-able sections (train config, data, tokenizer)."""
    data = {"format": FORMAT_VERSION, "model": model_cfg.to_dict(), **sections}
    atomic_write_json(Path(run_dir) / CONFIG_FILE, data)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """config.json of a run directory, or CheckpointError saying why it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    data = read_json(path)
    if not isinstance(data, dict) or "model" not in data:
        raise CheckpointError(f"{path} is corrupt: it has no 'model' section")
    _check_format(data, path)
    try:
        ModelConfig.from_dict(data["model"])
    except UserError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return data


# --------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically and point `latest` at it; keep the newest `keep` checkpoints."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        # Tied weights appear once: safetensors refuses shared storage, and loading re-ties them.
        weights = {k: v.detach().contiguous().cpu() for k, v in _unique_state(model).items()}
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        meta: dict[str, Any] = {"format": FORMAT_VERSION, "step": step, **(state or {})}
        if optimizer is not None:
            tensors, opt_meta = _optimizer_to_flat(optimizer.state_dict())
            save_file(tensors, tmp / "optimizer.safetensors")
            meta["optimizer"] = opt_meta
        meta["files"] = {
            f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # re-saving a step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(run_dir / LATEST_FILE, name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of a tied parameter (the output keeps the embedding's)."""
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        if id(v) in seen or v.data_ptr() in seen:
            continue
        seen.update((id(v), v.data_ptr()))
        out[k] = v
    return out


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Remove what killed writes left in a run directory: half-written checkpoint folders (`checkpoints/.step_*`)
    and temporary files of atomic writes (`.NAME.*.tmp`). Call it only when no other process writes there."""
    run_dir = Path(run_dir)
    stale = [*(run_dir / CHECKPOINTS_DIR).glob(".step_*"), *run_dir.glob(".*.tmp")]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None if the run has none yet."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_bytes()[:64].decode("ascii", errors="replace").strip()  # a name, or it is corrupt
    if not CHECKPOINT_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} is corrupt: it should name a checkpoint folder such as step_000100")
    path = run_dir / CHECKPOINTS_DIR / name
    if not path.is_dir():
        raise CheckpointError(f"{run_dir}: 'latest' names {path.name}, which does not exist")
    return path


def read_checkpoint_state(ckpt: Path, verify: bool = True) -> dict[str, Any]:
    """state.json of a checkpoint, after checking its fields, every file's size and (if `verify`) its hash.

    The fields a resume reads (step, elapsed time, RNG state) are checked here, where the file is read.
    """
    path = ckpt / "state.json"
    meta = read_json(path, remedy="the checkpoint is incomplete or corrupt")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is corrupt: not a JSON object")
    _check_format(meta, path)
    try:
        typed_field(meta, "step", int, minimum=0)
        if typed_field(meta, "elapsed_s", float, default=0.0) < 0:
            raise CheckpointError("elapsed_s must be >= 0")
        rng = typed_field(meta, "torch_rng", list[int], default=None)
        if rng is not None and (len(rng) != torch.get_rng_state().numel() or not all(0 <= b < 256 for b in rng)):
            raise CheckpointError(f"torch_rng must be the {torch.get_rng_state().numel()} bytes of a generator state")
    except UserError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None
    files = meta.get("files")
    well_formed = isinstance(files, dict) and files and all(
        isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)
        for info in files.values()
    )
    if not well_formed:  # without its file table nothing could be verified: refuse rather than trust
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: state.json lists no files with sizes and checksums")
    for fname, info in files.items():
        f = ckpt / fname
        if ".." in Path(fname).parts or Path(fname).is_absolute():
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: state.json names a file outside it ({fname})")
        if not f.is_file() or f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {f} is missing or truncated")
        if verify and _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is corrupt (checksum mismatch)")
    return meta


def load_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or CheckpointError in one line. safetensors checks the header (its
    length, JSON, dtypes, and that every tensor's shape and offsets fit the file) before it reads any data."""
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {one_line(e)}") from None


def check_tensors(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str, against: str = "the config"
) -> None:
    """Refuse, naming `source`, tensors that are missing from or unexpected in `expected` (which they are to be
    loaded into), or of another shape, or not floating point: so that nothing is half-loaded."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match {against} ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, {against} implies {tuple(expected[name].shape)}"
            )
        if not tensor.dtype.is_floating_point:
            raise CheckpointError(f"{source}: {name} holds {tensor.dtype} values; weights are floating point")


def load_weights(ckpt: Path, model: MultiTokenModel) -> None:
    """Load model.safetensors into `model`, refusing missing, unexpected, mis-shaped or non-float tensors."""
    weights = load_safetensors(ckpt / "model.safetensors", model.tok_embeddings.weight.device)
    check_tensors(weights, _unique_state(model), str(ckpt))
    model.load_state_dict(weights, strict=False)  # not strict: a tied output weight is stored once


def load_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Restore the optimizer saved beside `meta` (the checkpoint's state.json), or CheckpointError in one line
    if the two do not describe this optimizer's state."""
    tensors = load_safetensors(ckpt / "optimizer.safetensors")
    try:
        optimizer.load_state_dict(_optimizer_from_flat(tensors, meta["optimizer"]))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}: the optimizer state does not fit this model ({one_line(e)})") from None


@dataclass
class LoadedRun:
    """A model ready to use, with what it came with."""

    model: MultiTokenModel
    config: dict[str, Any]
    checkpoint: Path
    state: dict[str, Any]


def load_run(run_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedRun:
    """Build the model of a run directory and load its newest checkpoint's weights (verified)."""
    config = read_run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet")
    state = read_checkpoint_state(ckpt)
    model = MultiTokenModel(ModelConfig.from_dict(config["model"])).to(device)
    load_weights(ckpt, model)
    return LoadedRun(cast_model(model, dtype).eval(), config, ckpt, state)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from "fp32"/"bf16" (or a torch dtype; None stays None); UserError for anything else."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of fp32, bf16, got {dtype!r}")
    return DTYPES[dtype]


def kept_dtype(weights: torch.Tensor) -> torch.dtype:
    """The dtype a model keeps when its weights come as `weights`: bf16 stays bf16; fp16 becomes fp32, which
    holds every fp16 value exactly (bf16 would round them); everything else fp32."""
    return torch.bfloat16 if weights.dtype == torch.bfloat16 else torch.float32


def stored_dtype(ckpt: Path) -> torch.dtype:
    """The dtype of a checkpoint's weights (`kept_dtype` of its embedding), read from the file header only."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        return kept_dtype(f.get_slice("tok_embeddings.weight")[:1])


def cast_model(model: MultiTokenModel, dtype: torch.dtype | None) -> MultiTokenModel:
    """The model's weights in `dtype` (None: unchanged). The rotary tables stay fp32 (apply_rope computes in
    fp32): bf16 angles would blur positions."""
    if dtype is None:
        return model
    model = model.to(dtype)
    model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    return model
