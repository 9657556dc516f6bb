"""multitoken: multi-token prediction training and lossless self-speculative decoding.

    import multitoken
    lm = multitoken.train(multitoken.TrainConfig(max_steps=800), data="my_project/**/*.py", out="runs/mine")
    print(lm.generate("def fib(n):", max_new_tokens=64).text)
    lm = multitoken.load("runs/demo")             # a run directory, a Hugging Face folder or a .gguf file
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multitoken.api import Generation, MultiTokenLM, add_heads, load, train
    from multitoken.config import HeadsConfig, ModelConfig, TrainConfig

__version__ = "0.1.0"
_LAZY = {
    "Generation": "multitoken.api",
    "MultiTokenLM": "multitoken.api",
    "add_heads": "multitoken.api",
    "load": "multitoken.api",
    "train": "multitoken.api",
    "ModelConfig": "multitoken.config",
    "TrainConfig": "multitoken.config",
    "HeadsConfig": "multitoken.config",
}
__all__ = [
    "Generation", "MultiTokenLM", "add_heads", "load", "train", "ModelConfig", "TrainConfig", "HeadsConfig",
    "__version__",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use: `import multitoken.cli` stays free of torch until a command runs."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'multitoken' has no attribute {name!r}")
