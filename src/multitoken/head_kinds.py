"""Head kinds: how the n future-token heads sit on the shared trunk (paper §2 and Table S4).

One object per kind says everything the rest of the library asks about heads: the module each head is,
what it reads (the trunk, or a neighbour head's output, and perhaps the embedding of a token ahead), the
order heads must run in, whether their graphs chain (the memory-efficient step keeps a chained head's graph
until its successor ran), whether heads can be added or trained one at a time, and whether the official
multi-token layout can hold them.
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

    def make_head(self, cfg: ModelConfig, i: int) -> nn.Module:
        """A new, randomly initialised module for head i (0-based)."""
        from multitoken.model import Block  # model.py builds its heads through this module

        return Block(cfg)

    def init_head(self, head: nn.Module) -> None:
        """Initialisation after the model's generic one (default: none)."""

    def copy_head(self, head: nn.Module, next_token_head: nn.Module, hidden_scale: float = 1.0) -> None:
        """Initialise an added head from a pretrained model's next-token head (`add_heads(init="copy")`): a copy.

        `hidden_scale`: the typical RMS of the hidden state the head reads (the trunk output's), for kinds
        that normalise it first."""
        head.load_state_dict(next_token_head.state_dict())

    def order(self, n_future: int, wanted: list[int]) -> list[int]:
        """The heads (0-based) that must run, in the order they must run, to produce `wanted`."""
        return wanted

    def source(self, i: int, n_future: int) -> int | None:
        """The head whose output head i reads, or None for the trunk output."""
        return None

    def token_lead(self, i: int) -> int | None:
        """How many positions ahead of its own lies the token whose embedding head i reads beside its hidden
        input, or None if it reads no token. Such a head has no input at the last `lead` positions of a window."""
        return None

    def reads_tokens(self, n_future: int) -> bool:
        """Whether some head reads a token ahead: decoding then keeps tokens and head outputs by position, and
        the drafts are made one after another (generate/conditioned.py)."""
        return any(self.token_lead(i) is not None for i in range(n_future))

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

    def make_head(self, cfg: ModelConfig, i: int) -> nn.Module:
        from multitoken.model import LinearHead

        return LinearHead(cfg)

    def init_head(self, head: nn.Module) -> None:
        import torch

        # The identity: each head starts from the trunk's own representation, not a random projection of it.
        torch.nn.init.eye_(head.proj.weight)

    def extra_parameters(self, cfg: ModelConfig) -> int:
        return cfg.n_future * cfg.dim * cfg.dim


class TokenConditionedHeads(HeadKind):
    """Token-conditioned modules (DeepSeek-V3 §2.2's MTP modules; EAGLE's draft head has the same shape).

    Head 1 is the ordinary next-token block on the trunk output. Module k >= 1 at position t reads the output of
    depth k-1 at t and the embedding of token t+k, each RMS-normalised, projects their concatenation 2d -> d,
    runs one block and goes through the shared norm and unembedding to predict token t+k+1. When drafting,
    token t+k is the one the previous module chose, so the modules run one after another.
    """

    name = "mtp"
    chained = True
    independent = False
    official_layout = False

    def make_head(self, cfg: ModelConfig, i: int) -> nn.Module:
        from multitoken.model import Block, TokenConditionedModule

        return Block(cfg) if i == 0 else TokenConditionedModule(cfg)

    def copy_head(self, head: nn.Module, next_token_head: nn.Module, hidden_scale: float = 1.0) -> None:
        """The block is a copy of the next-token head's and the projection passes the normalised hidden input
        through while the token half starts at zero: at step 0 module k is the copied head applied to the
        output of depth k-1, the pretrained alignment with the unembedding kept, and training adds the token's
        information instead of first undoing a random projection of it. The hidden norm's gain is
        `hidden_scale`, so the copied block reads inputs of the scale it was trained on (SmolLM2's trunk
        output has an RMS near 29; read at RMS 1, the copies start at 3-10x head 1's loss)."""
        import torch

        head.block.load_state_dict(next_token_head.state_dict())
        d = head.proj.weight.shape[0]
        with torch.no_grad():
            head.proj.weight.zero_()
            head.proj.weight[:, :d].copy_(torch.eye(d))
            head.hidden_norm.weight.fill_(hidden_scale)
            head.embed_norm.weight.fill_(1.0)

    def order(self, n_future: int, wanted: list[int]) -> list[int]:
        return list(range(max(wanted) + 1))

    def source(self, i: int, n_future: int) -> int | None:
        return i - 1 if i > 0 else None

    def token_lead(self, i: int) -> int | None:
        return i if i > 0 else None

    def extra_parameters(self, cfg: ModelConfig) -> int:
        return (cfg.n_future - 1) * (2 * cfg.dim * cfg.dim + 2 * cfg.dim)  # projection and two norms per module


HEAD_KINDS: dict[str, HeadKind] = {
    k.name: k for k in (HeadKind(), CausalHeads(), AnticausalHeads(), LinearHeads(), TokenConditionedHeads())
}
HEAD_TYPES = tuple(HEAD_KINDS)


def head_kind(name: str) -> HeadKind:
    """The kind called `name`; a UserError naming the known ones otherwise."""
    if name not in HEAD_KINDS:
        raise UserError(f"unknown head type {name!r}; choose one of {', '.join(HEAD_TYPES)}")
    return HEAD_KINDS[name]
