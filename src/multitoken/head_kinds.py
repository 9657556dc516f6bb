"""Head kinds: how the n future-token heads sit on the shared trunk (paper §2 and Table S4).

One object per kind says everything the rest of the library asks about heads: the module each head is,
what it reads (the trunk, or a neighbour head's output), the order heads must run in, whether their
graphs chain (the memory-efficient step keeps a chained head's graph until its successor ran), whether
heads can be added or trained one at a time, and whether the official multi-token layout can hold them.
A new kind is one subclass registered in `HEAD_KINDS`; `ModelConfig.head_type` names it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from multitoken.errors import UserError

if TYPE_CHECKING:  # config.py imports this module, and the CLI imports config.py before it needs torch
    from torch import nn

    from multitoken.config import ModelConfig


class HeadKind:
    """Parallel heads (the paper's default): each head is one transformer block reading the trunk output."""

    name: ClassVar[str] = "parallel"
    owns_blocks: ClassVar[bool] = True  # each head is a transformer block with its own KV cache
    chained: ClassVar[bool] = False  # some head reads another head's output
    independent: ClassVar[bool] = True  # heads can be added, dropped and trained one at a time
    official_layout: ClassVar[bool] = True  # the official release's parallel-heads layout can hold it

    def make_head(self, cfg: ModelConfig) -> nn.Module:
        """A new, randomly initialised head module."""
        from multitoken.model import Block  # model.py builds its heads through this module

        return Block(cfg)

    def init_head(self, head: nn.Module) -> None:
        """Initialisation after the model's generic one (default: none)."""

    def order(self, n_future: int, wanted: list[int]) -> list[int]:
        """The heads (0-based) that must run, in the order they must run, to produce `wanted`."""
        return wanted

    def source(self, i: int, n_future: int) -> int | None:
        """The head whose output head i reads, or None for the trunk output."""
        return None

    def extra_parameters(self, cfg: ModelConfig) -> int:
        """Parameters of all heads together that are not transformer blocks."""
        return 0


class CausalHeads(HeadKind):
    """Head i reads head i-1's output, so head i+1 refines head i's representation (Table S4)."""

    name = "causal"
    chained = True
    independent = False
    official_layout = False

    def order(self, n_future: int, wanted: list[int]) -> list[int]:
        return list(range(max(wanted) + 1))

    def source(self, i: int, n_future: int) -> int | None:
        return i - 1 if i > 0 else None


class AnticausalHeads(HeadKind):
    """Head i reads head i+1's output: the last head reads the trunk and the next-token head runs last."""

    name = "anticausal"
    chained = True
    independent = False
    official_layout = False

    def order(self, n_future: int, wanted: list[int]) -> list[int]:
        return list(range(n_future - 1, min(wanted) - 1, -1))

    def source(self, i: int, n_future: int) -> int | None:
        return i + 1 if i < n_future - 1 else None


class LinearHeads(HeadKind):
    """Each head is a d x d linear map of the trunk output (Table S4); the trunk owns every block."""

    name = "linear"
    owns_blocks = False
    official_layout = False

    def make_head(self, cfg: ModelConfig) -> nn.Module:
        from multitoken.model import LinearHead

        return LinearHead(cfg)

    def init_head(self, head: nn.Module) -> None:
        import torch

        # The identity: each head starts from the trunk's own representation, not a random projection of it.
        torch.nn.init.eye_(head.proj.weight)

    def extra_parameters(self, cfg: ModelConfig) -> int:
        return cfg.n_future * cfg.dim * cfg.dim


HEAD_KINDS: dict[str, HeadKind] = {k.name: k for k in (HeadKind(), CausalHeads(), AnticausalHeads(), LinearHeads())}
HEAD_TYPES = tuple(HEAD_KINDS)


def head_kind(name: str) -> HeadKind:
    """The kind called `name`; a UserError naming the known ones otherwise."""
    if name not in HEAD_KINDS:
        raise UserError(f"unknown head type {name!r}; choose one of {', '.join(HEAD_TYPES)}")
    return HEAD_KINDS[name]
