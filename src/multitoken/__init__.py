"""multitoken: multi-token prediction training and lossless self-speculative decoding.

    import multitoken
    lm = multitoken.load("runs/demo")             # a run directory, a Hugging Face folder or a .gguf file
    print(lm.generate("def fib(n):", max_new_tokens=64).text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multitoken.api import Generation, MultiTokenLM, load

__version__ = "0.1.0"
__all__ = ["Generation", "MultiTokenLM", "load", "__version__"]


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use: `import multitoken.cli` stays free of torch until a command runs."""
    if name in ("Generation", "MultiTokenLM", "load"):
        from multitoken import api

        return getattr(api, name)
    raise AttributeError(f"module 'multitoken' has no attribute {name!r}")
