"""Self-speculative decoding with the model's own heads (paper §3.2; Stern et al. 2018).

Each step feeds a block per sequence: the pending token (decided, not yet fed) at position p, followed by
drafts that heads 2..k proposed for p+1, p+2, ... from position p-1. Head 1 checks every draft in that one
forward; the longest agreeing prefix is accepted, plus head 1's own token after it (so 1..k tokens per
forward), and the same forward's heads 2..k, read at the last accepted node, give the next drafts. Every
head runs on every fed position, so no head's KV cache has holes; rejected drafts leave garbage in slots
past the accepted prefix, which the next step overwrites before any query can see them.

- Greedy: a draft is accepted when it equals head 1's argmax; the output equals plain greedy decoding.
- Sampling: draft j is drawn from head j+1's processed distribution q_j; it is accepted with probability
  min(1, p_j(d_j) / q_j(d_j)) where p_j is head 1's processed distribution at that node; the first
  rejection draws from normalize(max(0, p_j - q_j)), and if all are accepted a bonus token comes from head
  1's last distribution (Leviathan et al. 2023; Chen et al. 2023). Output is distributed exactly as plain
  sampling from head 1. In a tree a node's children are independent draws from q_j, tried one after
  another against the residual left by the rejected ones (`verify_sampled`).
- Trees (tree.py): several candidates per head verified at once under a tree mask.
- A draft vocabulary (draft_vocab.py) restricts what heads 2..k may propose to the K most frequent tokens,
  so the second unembedding product of a step streams K rows instead of V; head 1 still judges over all V.

Token-conditioned modules (head type mtp) read the token drafted before theirs, so they draft one after another
after the verify forward: `ConditionedDrafter` (conditioned.py), which `HeadDrafter` hands such models to and
which verifies with the same `verify`.

The chain is the tree whose nodes all have rank 0, so one step function serves both. The step is a free
function of tensors: acceptance is computed on the device and the decoding session (session.py) reads the
accepted tokens once per step. Sequences of a batch stand at their own positions and accept their own counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from multitoken.errors import UserError
from multitoken.generate.common import GenerationResult, prefill
from multitoken.generate.draft_vocab import DraftVocab
from multitoken.generate.sampling import SamplingConfig, probabilities, residual_distribution, sample, sample_from
from multitoken.generate.session import Drafter, decode
from multitoken.generate.tree import Tree, TreeIndex, tree_mask
from multitoken.kv_cache import ModelCache
from multitoken.model import MultiTokenModel


def propose(
    logits: torch.Tensor,
    max_rank: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    vocab: DraftVocab | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft candidates from the draft heads' logits (B, k-1, V), or (B, k-1, K) over `vocab`'s tokens.

    Greedy: each head's top `max_rank` tokens (B, k-1, R). Sampling: `max_rank` independent draws per head
    (B, k-1, R) and the distributions q they came from (B, k-1, V), which the acceptance test needs (zero
    outside `vocab`).
    """
    if sampling.greedy:
        ranked = logits.topk(max_rank, dim=-1).indices
        return (ranked if vocab is None else vocab.ids[ranked]), None
    q = probabilities(logits, sampling)
    drafts = sample_from(q, generator, max_rank)
    if vocab is None:
        return drafts, q
    return vocab.ids[drafts], vocab.expand(q)


def verify_greedy(
    index: TreeIndex, tokens: torch.Tensor, choice: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept the deepest node whose path head 1 agrees with; return it (B,) and head 1's token there (B,).

    tokens (B, N): the fed nodes; choice (B, N): head 1's argmax at each node, i.e. the token it wants
    after that node. Siblings hold distinct candidates, so at most one child of a node can match.
    """
    hit = tokens[:, 1:] == choice[:, index.parent[1:]]  # (B, N-1): node matches its parent's choice
    hit = torch.cat([torch.ones_like(hit[:, :1]), hit], dim=1)  # (B, N): the root is always right
    on_path = ~(index.ancestors[None] & ~hit[:, None, :]).any(-1)  # (B, N): every ancestor matched
    best = (on_path * (index.depth + 1)).argmax(-1)  # (B,): the deepest accepted node
    return best, choice.gather(1, best[:, None])[:, 0]


def verify_sampled(
    index: TreeIndex,
    tokens: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    generator: torch.Generator | None,
    by_node: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling down the tree: return the accepted node (B,) and the next token (B,).

    tokens (B, N): the fed nodes; p (B, N, V): head 1's processed distribution at each node; q (B, D, V):
    the distribution the candidates at depth d+1 were drawn from (draft head d+2's), each node's children
    being independent draws from it; with `by_node`, q (B, >= N, V) is each node's own children's
    distribution instead (token-conditioned drafts depend on the node they follow). At a node the walk holds
    a distribution r, first head 1's there; a child with token x is accepted with probability
    min(1, r(x) / q(x)), and on rejection r becomes normalize(max(0, r - q)) before the next child is tried.
    An accepted child continues the walk; when every child is rejected, or the node is a leaf, the next token
    is drawn from r. With one child per node this is the chain's rejection sampling (Leviathan et al. 2023;
    Chen et al. 2023); with several it is multi-round speculative sampling (Miao et al. 2024, SpecInfer),
    lossless for independent draws.
    """
    B, device = tokens.shape[0], tokens.device
    rows = torch.arange(B, device=device)
    node = torch.zeros(B, dtype=torch.long, device=device)
    r = p[:, 0]  # (B, V)
    walking = torch.ones(B, dtype=torch.bool, device=device)  # every node so far accepted
    for d in range(index.n_depth):
        q_d = q[rows, node] if by_node else q[:, d]  # (B, V)
        moved = torch.zeros_like(walking)
        for i in range(index.children.shape[1]):
            child = index.children[node, i]  # (B,): -1 where the node has no i-th child
            tried = walking & ~moved & (child >= 0)
            child = child.clamp(min=0)
            x = tokens[rows, child]  # (B,)
            u = torch.rand(B, generator=generator, device=device)
            accept = tried & (u * q_d[rows, x] < r[rows, x])  # u < r/q without a division; q(x) > 0
            reject = tried & ~accept
            node = torch.where(accept, child, node)
            r = torch.where(reject[:, None], residual_distribution(r, q_d), r)
            r = torch.where(accept[:, None], p[rows, child], r)
            moved |= accept
        walking &= moved
    return node, sample_from(r, generator)


def move_path(cache: ModelCache, pos: torch.Tensor, path: torch.Tensor, n_accepted: torch.Tensor) -> None:
    """Copy the accepted path's keys and values from their scratch slots to their true slots.

    path (B, D+1): node ids from the root by depth. Node path[j] sits in slot pos + path[j] and belongs
    in pos + j. Beyond the accepted depth the move is the identity, so the shape stays static.
    """
    depth = torch.arange(1, path.shape[1], device=path.device)  # (D,)
    dst = pos[:, None] + depth  # (B, D)
    src = torch.where(depth <= n_accepted[:, None], pos[:, None] + path[:, 1:], dst)  # (B, D)
    cache.move(src, dst)


@dataclass
class Verified:
    """What a verify forward decided for each sequence. N fed nodes, D the tree's depth.

    tokens (B, N): the nodes fed; z: the outputs of the heads run, {head: (B, N, dim)}; best (B,): the deepest
    accepted node; path (B, D+1): the nodes from the root to it, padded with it; n_accepted (B,): its depth;
    new (B, D+1): the accepted drafts, then head 1's token after them, of which the first n_accepted + 1 count.
    """

    tokens: torch.Tensor
    z: dict[int, torch.Tensor]
    best: torch.Tensor
    path: torch.Tensor
    n_accepted: torch.Tensor
    new: torch.Tensor


def verify(
    model: MultiTokenModel,
    cache: ModelCache,
    index: TreeIndex,
    root: torch.Tensor,
    pos: torch.Tensor,
    drafts: torch.Tensor,
    q: torch.Tensor | None,
    kv_len: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    heads: list[int],
    by_node: bool = False,
) -> Verified:
    """One forward of the trunk and `heads` over the tree `index`, head 1 judging the drafts (B, N-1).

    root (B,): pending tokens at positions pos (B,); q: the drafts' distributions when sampling (by depth, or
    by node with `by_node`; see `verify_sampled`). The accepted path's keys and values are moved to their true
    slots in every layer of `cache`.
    """
    N = index.size
    tokens = torch.cat([root[:, None], drafts], dim=1)  # (B, N)
    positions = pos[:, None] + index.depth  # (B, N): true positions, for the rotary embedding
    slots = pos[:, None] + torch.arange(N, device=pos.device)  # (B, N): scratch slots
    ctx = model.attention_context(N, positions, cache, tree_mask(index, pos, kv_len), kv_len, slots=slots)
    z = model.run_heads(model.embed_and_trunk(tokens, ctx, cache), ctx, cache, heads)
    head1 = model.unembed(z[0])  # (B, N, V)
    if sampling.greedy:
        best, new_root = verify_greedy(index, tokens, head1.argmax(-1))
    else:
        best, new_root = verify_sampled(index, tokens, probabilities(head1, sampling), q, generator, by_node)
    n_accepted = index.depth[best]  # (B,)
    path = index.path[best]  # (B, D+1)
    if not index.is_chain:
        move_path(cache, pos, path, n_accepted)
    new = tokens.gather(1, path).roll(-1, dims=1)  # (B, D+1): the accepted drafts first
    new = new.scatter(1, n_accepted[:, None], new_root[:, None])  # then head 1's token after them
    return Verified(tokens, z, best, path, n_accepted, new)


def decode_step(
    model: MultiTokenModel,
    cache: ModelCache,
    index: TreeIndex,
    root: torch.Tensor,
    pos: torch.Tensor,
    candidates: torch.Tensor,
    q: torch.Tensor | None,
    kv_len: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    heads: list[int],
    max_rank: int,
    vocab: DraftVocab | None = None,
    draft_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One verify forward over the tree `index` for every sequence.

    root (B,): pending tokens at positions pos (B,); candidates (B, k-1, R) and q: the last proposal.
    vocab, draft_rows: a draft vocabulary and its unembedding rows (K, D), or None for the full vocabulary.
    Returns the new tokens (B, D+1) of which the first n_new (B,) count, the next pending positions (B,),
    and the next proposal (candidates, q).
    """
    drafts = candidates[:, index.head, index.rank]  # (B, N-1)
    v = verify(model, cache, index, root, pos, drafts, q, kv_len, sampling, generator, heads)
    if len(heads) > 1:
        at = v.best[:, None, None].expand(-1, 1, v.z[0].shape[-1])  # (B, 1, dim)
        z_best = torch.cat([v.z[i].gather(1, at) for i in heads[1:]], dim=1)  # (B, k-1, dim)
        candidates, q = propose(model.unembed(z_best, draft_rows), max_rank, sampling, generator, vocab)
    return v.new, v.n_accepted + 1, pos + v.n_accepted + 1, candidates, q


def resolve_tree(
    model: MultiTokenModel,
    heads_used: int | None,
    tree: Tree | None,
    sampling: SamplingConfig,
    vocab: DraftVocab | None = None,
) -> Tree:
    """The tree to decode with (a chain unless one is given), after checking it and `vocab` against the model."""
    n = model.cfg.n_future
    if heads_used is not None and not 1 <= heads_used <= n:
        raise UserError(f"heads_used must be between 1 and the model's {n} heads, got {heads_used}")
    if vocab is not None and vocab.vocab_size != model.cfg.vocab_size:
        raise UserError(
            f"the draft vocabulary is for a vocabulary of {vocab.vocab_size}; the model has {model.cfg.vocab_size}"
        )
    if tree is None:
        return Tree.chain(n if heads_used is None else heads_used)
    if tree.depth + 1 > n:
        raise UserError(f"the tree is {tree.depth} drafts deep; the model's {n} heads draft at most {n - 1}")
    if heads_used is not None and heads_used != tree.depth + 1:
        raise UserError(f"heads_used={heads_used} disagrees with the tree, which uses {tree.depth + 1} heads")
    if tree.size >= model.cfg.max_seq_len:
        raise UserError(f"a tree of {tree.size} nodes does not fit the context of {model.cfg.max_seq_len}")
    if sampling.greedy and tree.max_rank > (model.cfg.vocab_size if vocab is None else vocab.size):  # top-k: distinct
        raise UserError(f"the tree reads {tree.max_rank} candidates per head; the (draft) vocabulary has fewer")
    return tree


@dataclass(frozen=True, eq=False)
class HeadDrafter:
    """Heads 2..k draft a chain or a tree; head 1 verifies every draft in the next forward (module docstring).

    heads_used: k (default: all heads or the tree's); tree: None for the chain of k heads; vocab: heads 2..k
    propose only its tokens (draft_vocab.py), which changes what can be accepted, never the output.
    `prepare` resolves the tree and gathers the draft vocabulary's unembedding rows once.
    """

    heads_used: int | None = None
    tree: Tree | None = None
    vocab: DraftVocab | None = None
    draft_rows: torch.Tensor | None = None  # (K, D): the unembedding rows of `vocab`, set by `prepare`
    step = staticmethod(decode_step)

    @property
    def heads(self) -> list[int]:
        return list(range(self.tree.depth + 1))

    def prepare(self, model: MultiTokenModel, sampling: SamplingConfig, device: torch.device) -> Drafter:
        """Ready to run; for a model whose draft heads read the tokens drafted before theirs (token-conditioned
        modules), the drafter that runs them one after another (`ConditionedDrafter`)."""
        from multitoken.generate.conditioned import ConditionedDrafter, drafts_in_turn

        if drafts_in_turn(model):
            return ConditionedDrafter(self.heads_used, self.tree, self.vocab).prepare(model, sampling, device)
        return HeadDrafter(*resolve_drafts(model, self.heads_used, self.tree, sampling, self.vocab, device))

    def start(
        self,
        model: MultiTokenModel,
        cache: ModelCache,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
        logits, pos = prefill(model, cache, prompts, self.heads)  # (B, k, V), (B,)
        root = sample(logits[:, 0], sampling, generator)
        drafts = logits[:, 1:] if self.vocab is None else self.vocab.restrict(logits[:, 1:])
        return root, pos, propose(drafts, self.tree.max_rank, sampling, generator, self.vocab)

    def graph_key(self) -> tuple[object, ...]:
        return (self.heads_used, self.tree, id(self.vocab))

    def constants(self) -> dict[str, object]:
        return dict(heads=self.heads, max_rank=self.tree.max_rank, vocab=self.vocab, draft_rows=self.draft_rows)

    def stats(self) -> dict[str, object]:
        return draft_stats(self.tree, self.vocab)


def draft_stats(tree: Tree, vocab: DraftVocab | None) -> dict[str, object]:
    """What a drafter of the heads reports: heads used, tree size, draft vocabulary size."""
    size = vocab.size if vocab is not None else None
    return dict(heads_used=tree.depth + 1, tree_size=tree.size, draft_vocab_size=size)


def resolve_drafts(
    model: MultiTokenModel,
    heads_used: int | None,
    tree: Tree | None,
    sampling: SamplingConfig,
    vocab: DraftVocab | None,
    device: torch.device,
) -> tuple[int, Tree, DraftVocab | None, torch.Tensor | None]:
    """What a drafter of the heads runs with: the heads used, the tree (`resolve_tree`), the draft vocabulary on
    `device` (None when nothing is drafted) and its unembedding rows (K, D), gathered once."""
    tree = resolve_tree(model, heads_used, tree, sampling, vocab)
    vocab = vocab.to(device) if vocab is not None and tree.depth > 0 else None
    rows = vocab.rows(model.output.weight) if vocab is not None else None
    return tree.depth + 1, tree, vocab, rows


def speculative_generate(
    model: MultiTokenModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    heads_used: int | None = None,
    tree: Tree | None = None,
    draft_vocab: DraftVocab | None = None,
    **options: Any,
) -> GenerationResult:
    """Decode with heads 2..k drafting and head 1 verifying: `decode` with a `HeadDrafter(heads_used, tree,
    draft_vocab)`; `options` are `decode`'s (sampling, generator, eos_id, on_tokens, compile_step, ...).
    heads_used = 1 is plain decoding through the speculative step."""
    return decode(model, prompts, max_new_tokens, HeadDrafter(heads_used, tree, draft_vocab), **options)
