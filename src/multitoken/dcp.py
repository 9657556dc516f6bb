"""Sharded checkpoints with torch.distributed.checkpoint (DCP), in the run-directory layout of checkpoint.py.

A sharded checkpoint sits where a single-file one would, and `latest` points at either kind:

    checkpoints/step_000100/
      dcp/.metadata, dcp/__0_0.distcp, dcp/__1_0.distcp, ...   model + optimizer, one shard file per rank
      model.safetensors                                        consolidated weights (final checkpoint, or
                                                               after `consolidate`), what `load_run` reads
      state.json                                               step, RNG, elapsed time, "sharded": true,
                                                               the world size, every file's size and hash

Writing: every rank writes its shards into `.step_000100.tmp/`; after a barrier rank 0 writes state.json,
renames the folder into place and only then moves `latest`, so a process dying at any moment leaves the
previous checkpoint loadable. Reading: DCP reshards, so a checkpoint saved by N processes resumes on M
(one included, with no process group at all). Model and optimizer state go through
`get_state_dict`/`set_state_dict`, which key them by parameter name whatever the wrapping.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from multitoken.checkpoint import (
    CHECKPOINTS_DIR,
    FORMAT_VERSION,
    LATEST_FILE,
    _fsync_dir,
    _sha256,
    atomic_write_json,
    atomic_write_text,
    latest_checkpoint,
    read_checkpoint_state,
    read_run_config,
)
from multitoken.config import ModelConfig
from multitoken.distributed import DistEnv
from multitoken.errors import CheckpointError, one_line
from multitoken.model import MultiTokenModel

SHARDS_DIR = "dcp"
WEIGHTS_FILE = "model.safetensors"

# What a DCP `.metadata` pickle may name: its own record types and the torch values inside them. Anything else
# (os.system, builtins.eval, a class with a hostile __reduce__) is refused before it is called.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {  # fmt: skip
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout looked up by its name
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise CheckpointError(f"sharded checkpoint metadata names {module}.{name}, which no checkpoint holds")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's reader, but `.metadata` is unpickled with an allowlist of DCP's own types: a crafted file cannot
    run code (DCP's reader calls plain `pickle.load`)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except CheckpointError:
                raise
            except Exception as e:  # a truncated or garbled pickle
                raise CheckpointError(f"sharded checkpoint metadata {path} is corrupt ({type(e).__name__})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"sharded checkpoint metadata {path} is not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but non-tensor entries (the optimizer's hyperparameters) are read with
    `torch.load(weights_only=True)` instead of `weights_only=False`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            fqn = read_item.dest_index.fqn
            raise CheckpointError(f"sharded checkpoint entry {fqn} is not plain data: {e}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def is_sharded(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's state.json describes a DCP checkpoint."""
    return bool(state.get("sharded"))


def _file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under `folder` except state.json, by path relative to it."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != "state.json")
    return {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files}


def _consolidated_weights(model: torch.nn.Module, cfg: ModelConfig, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """The full weights gathered on rank 0 (None elsewhere), in the layout `load_weights` expects.

    A collective: every rank must call it. A tied output weight is stored once, as the embedding.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return None
    if cfg.tie_embeddings:
        full.pop("output.weight", None)
    return {k: v.detach().contiguous() for k, v in full.items()}


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    model: MultiTokenModel,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    env: DistEnv,
    consolidate: bool = False,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` from every rank (a collective) and point `latest` at it.

    `consolidate` also gathers the full weights into model.safetensors (rank 0 holds them in CPU memory).
    Keeps the newest `keep` checkpoints. Returns the checkpoint folder.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    name = f"step_{step:06d}"
    tmp, final = root / f".{name}.tmp", root / name
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a process that died mid-write
        tmp.mkdir(parents=True)
    env.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / SHARDS_DIR)
    weights = _consolidated_weights(model, model.cfg, env) if consolidate else None
    env.barrier()  # every rank's shards are on disk (DCP fsyncs them) before rank 0 publishes
    if env.is_main:
        if weights is not None:
            save_file(weights, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "sharded": True,
            "world_size": env.world_size,
            **state,
            "files": _file_table(tmp),
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp / SHARDS_DIR)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step after a resume
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        atomic_write_text(Path(run_dir) / LATEST_FILE, name + "\n")
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    env.barrier()  # nobody reads `latest` or writes the next checkpoint before it moved
    return final


def load_sharded_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a DCP checkpoint into `model` (and `optimizer`), whatever the world size now (DCP reshards).

    Works under FSDP, replicated, or in a single process without a process group. Call
    `read_checkpoint_state` first: it turns a missing or truncated shard file into a one-line error.
    """
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        target: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    else:
        target = {"model": get_model_state_dict(model)}
    try:
        with warnings.catch_warnings():
            # Without a process group (one process resuming or consolidating) DCP reads every shard itself,
            # and says so in a warning on every load.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            reader = SafeFileSystemReader(Path(ckpt) / SHARDS_DIR)
            reader.read_metadata()  # refuse a hostile or corrupt .metadata in one line, before DCP reads it
            dcp.load(target, storage_reader=reader, planner=SafeLoadPlanner(),
                     no_dist=not dist.is_initialized())  # fmt: skip
    except (dcp.CheckpointException, OSError, RuntimeError, KeyError) as e:
        # DCP wraps each rank's exception: our own one-line refusals (a hostile or corrupt file) come through.
        causes = [f[0] for f in getattr(e, "failures", {}).values() if isinstance(f, tuple) and f]
        ours = next((c for c in causes if isinstance(c, CheckpointError)), None)
        if ours is not None:
            raise ours from None
        cause = causes[0] if causes else e  # the first rank's own error says more than DCP's wrapper
        text = one_line(cause)
        detail = text if text == type(cause).__name__ else f"{type(cause).__name__}: {text}"
        raise CheckpointError(f"cannot load sharded checkpoint {ckpt}: {detail}") from None
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    else:
        model.load_state_dict(target["model"])


def consolidate(run_dir: Path, step: int | None = None) -> Path:
    """Write model.safetensors into a sharded checkpoint of `run_dir` (default: the latest), in one process.

    Afterwards `load_run` (and everything built on it: eval, generate, interop) reads the checkpoint like
    a single-file one. A no-op for a checkpoint that already has its weights. Returns the checkpoint folder.
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if step is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointError(f"{run_dir} has no checkpoint yet")
    else:
        ckpt = run_dir / CHECKPOINTS_DIR / f"step_{step:06d}"
        if not ckpt.is_dir():
            raise CheckpointError(f"{run_dir} has no checkpoint of step {step}")
    state = read_checkpoint_state(ckpt)
    if not is_sharded(state) or (ckpt / WEIGHTS_FILE).is_file():
        return ckpt
    cfg = ModelConfig.from_dict(config["model"])
    model = MultiTokenModel(cfg)
    load_sharded_checkpoint(ckpt, model, None)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        weights.pop("output.weight", None)
    tmp = ckpt / f".{WEIGHTS_FILE}.tmp"
    save_file(weights, tmp, metadata={"format": "pt"})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, ckpt / WEIGHTS_FILE)
    # state.json last: until it lists the weights, readers treat the checkpoint as shards only.
    state["files"][WEIGHTS_FILE] = {
        "bytes": (ckpt / WEIGHTS_FILE).stat().st_size,
        "sha256": _sha256(ckpt / WEIGHTS_FILE),
    }
    atomic_write_json(ckpt / "state.json", state)
    return ckpt
