"""Self-speculative decoding with token-conditioned modules (DeepSeek-V3's MTP modules; EAGLE-like drafts).

Module k at position j reads the output of depth k-1 at j and the token at j+k, and predicts the token at
j+k+1 (model.py). With the tokens known up to the pending root at position r, module k's entries are known
(final) up to position r-k; its entries at r-k+1 .. r-1 read drafted tokens. So drafting runs the modules one
after another: module 1 at r-1 reads the root and proposes the token at r+1, module 2 at r-1 reads that
draft and proposes r+2, and so on; module k attends to its own entries at r-k+1 .. r-2, which read the drafts
before its own.

A step (`conditioned_step`):

1. The verify forward: the trunk and head 1 over the root and the drafts (a chain or a tree), head 1 judging
   them exactly as with parallel heads (`speculative.verify`), so greedy output equals plain greedy decoding
   and sampling keeps head 1's law.
2. The accepted path's head-1 outputs and tokens (the accepted drafts, then head 1's token after them: the new
   root r) are stored by position in the cache (`ModelCache.states`, `ModelCache.tokens`).
3. Module k runs on (a) its path rows: the positions from its first non-final one up to r-k, which now read
   known tokens only, padded to a fixed count, and (b) its tree rows: the next tree's nodes of depth 1..k-1,
   each at position r-k+depth reading the node's own token (drafted by module depth in this same pass) and
   module k-1's output at the node's parent, under a tree mask. Its outputs at its path rows are stored for
   module k+1; its outputs at the nodes of depth k-1 (for k = 1: at the root) give their children's tokens:
   each tree node feeds its own token to the next depth.

Path rows write their true slots, so every module's cache is complete up to r-k after every step, whatever
was accepted or rejected: no holes, and nothing to roll back, since the entries past r-k are rewritten before
any query can see them. Tree rows write the slots just past r-k (a chain's nodes: their own positions), and
padding rows a trash slot, the last one the forward reads. The prefill is the same pass over the whole prompt
(`ConditionedDrafter.start`).

Each node's children are drawn (or ranked) from the distribution its own module gave at that node, so
sampling's rejection test reads the draft distribution by node (`verify_sampled(by_node=True)`). At the
context's end a large tree's slots may reach the trash slot or past the cache (clamped to its last slot),
which can only spoil drafts (head 1 still judges them), never the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from multitoken.errors import UserError
from multitoken.generate.common import at_last, prefill_outputs
from multitoken.generate.draft_vocab import DraftVocab
from multitoken.generate.sampling import SamplingConfig, sample
from multitoken.generate.speculative import draft_stats, propose, resolve_drafts, verify
from multitoken.generate.tree import Tree, TreeIndex
from multitoken.head_kinds import head_kind
from multitoken.kv_cache import ModelCache
from multitoken.model import MultiTokenModel


def drafts_in_turn(model: MultiTokenModel) -> bool:
    """Whether some head of `model` reads a token ahead, so that its drafts must be made one after another."""
    return head_kind(model.cfg.head_type).reads_tokens(model.cfg.n_future)  # by name: stub models have no kind


@dataclass(frozen=True)
class ModuleRows:
    """What module k runs on besides its path rows, for one tree, as device tensors; M tree rows.

    nodes (M,): the tree's nodes of depth 1..k-1; depth (M,); sees (M, M): row i attends to row j (j is i or
    an ancestor of i); parent_row (M,): the row of each node's parent among module k-1's tree rows (0 for depth
    1, whose parent is the root); from_root (M,): depth 1. drafting (Q,): the nodes of depth k-1, whose
    children module k drafts (for k = 1 the root); drafting_row (Q,): their rows among the tree rows (unused
    for k = 1); children (C,): the nodes of depth k, child_of (C,) their parent's index in `drafting`, rank (C,)
    their rank among its candidates.
    """

    nodes: torch.Tensor
    depth: torch.Tensor
    sees: torch.Tensor
    parent_row: torch.Tensor
    from_root: torch.Tensor
    drafting: torch.Tensor
    drafting_row: torch.Tensor
    children: torch.Tensor
    child_of: torch.Tensor
    rank: torch.Tensor


@dataclass(frozen=True)
class ModulePlan:
    """The rows of modules 1..D for a tree of N nodes and depth D (`ModuleRows`), built once per decode."""

    modules: tuple[ModuleRows, ...]
    size: int

    @classmethod
    def build(cls, tree: Tree, device: torch.device | str = "cpu") -> ModulePlan:
        nodes: list[tuple[int, ...]] = [(), *tree.paths]
        index = {p: i for i, p in enumerate(nodes)}

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=device)

        modules, previous = [], []
        for k in range(1, tree.depth + 1):
            rows = [i for i, p in enumerate(nodes) if 1 <= len(p) <= k - 1]
            row_of = {node: r for r, node in enumerate(rows)}
            prev_row = {node: r for r, node in enumerate(previous)}
            drafting = [i for i, p in enumerate(nodes) if len(p) == k - 1]
            children = [i for i, p in enumerate(nodes) if len(p) == k]
            sees = torch.zeros(len(rows), len(rows), dtype=torch.bool)
            for r, node in enumerate(rows):
                path = nodes[node]
                for d in range(1, len(path) + 1):
                    sees[r, row_of[index[path[:d]]]] = True
            modules.append(
                ModuleRows(
                    nodes=t(rows),
                    depth=t([len(nodes[i]) for i in rows]),
                    sees=sees.to(device),
                    parent_row=t([prev_row.get(index[nodes[i][:-1]], 0) for i in rows]),
                    from_root=torch.tensor([len(nodes[i]) == 1 for i in rows], dtype=torch.bool, device=device),
                    drafting=t(drafting),
                    drafting_row=t([row_of.get(i, 0) for i in drafting]),
                    children=t(children),
                    child_of=t([drafting.index(index[nodes[c][:-1]]) for c in children]),
                    rank=t([nodes[c][-1] for c in children]),
                )
            )
            previous = rows
        return cls(tuple(modules), len(nodes))


def at_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, S, D) at positions (B, T), clamped into the cache: (B, T, D)."""
    index = positions.clamp(0, x.shape[1] - 1)[:, :, None].expand(-1, -1, x.shape[-1])
    return x.gather(1, index)


def module_mask(
    path_pos: torch.Tensor,
    final: torch.Tensor,
    tree_slots: torch.Tensor,
    sees: torch.Tensor,
    valid: torch.Tensor,
    kv_len: int,
) -> torch.Tensor:
    """Boolean mask (B, 1, W+M, kv_len) of one module's forward.

    path_pos (B, W): the path rows' positions (= slots), causal. final (B,): the last final position; a tree row
    sees the slots up to it, its ancestors' and its own (tree_slots (B, M), sees (M, M)); valid (B, M): the tree
    rows that have a position (>= 0), the only ones another row may see.
    """
    cols = torch.arange(kv_len, device=path_pos.device)
    path = cols[None, None, :] <= path_pos[:, :, None]  # (B, W, S)
    M = tree_slots.shape[1]
    if M == 0:
        return path[:, None]
    seen = sees[None] & (valid[:, None, :] | torch.eye(M, dtype=torch.bool, device=sees.device)[None])  # (B, M, M)
    at_slot = (cols[None, None, :] == tree_slots[:, :, None]).to(torch.float32)  # (B, M, S)
    tree = (cols[None, None, :] <= final[:, None, None]) | (torch.bmm(seen.to(torch.float32), at_slot) > 0)
    return torch.cat([path, tree], dim=1)[:, None]  # (B, 1, W+M, S)


def draft_with_modules(
    model: MultiTokenModel,
    cache: ModelCache,
    plan: ModulePlan,
    start: torch.Tensor,
    W: int,
    root_pos: torch.Tensor,
    kv_len: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    max_rank: int,
    vocab: DraftVocab | None = None,
    draft_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run modules 1..D in turn (module docstring, step 3); return the next tree's drafts and their laws.

    start (B,): module 1's first non-final position (module k's is start - k + 1, at least 0); W: path rows per
    module; root_pos (B,): the pending root's position r. cache.tokens must hold the tokens up to r and
    cache.states[0] head 1's outputs up to r-1. Returns the non-root nodes' tokens (B, N-1) and, when sampling,
    the distribution each node's children were drawn from (B, N, V).
    """
    B, S, L = start.shape[0], cache.max_len, model.cfg.max_seq_len
    device = start.device
    drafts = torch.zeros(B, plan.size - 1, dtype=torch.long, device=device)
    q_nodes = None if sampling.greedy else torch.zeros(B, plan.size, model.cfg.vocab_size, device=device)
    steps = torch.arange(W, device=device)
    trash = kv_len - 1  # the last slot read: no row that counts writes it, but at the context's end
    previous: torch.Tensor | None = None  # module k-1's outputs at its tree rows (B, M_{k-1}, D)
    for k, rows in enumerate(plan.modules, start=1):
        hidden_in = cache.states[k - 1]  # (B, S, D): depth k-1's outputs by position
        path_pos = (start - (k - 1)).clamp_min(0)[:, None] + steps  # (B, W)
        final = root_pos - k  # (B,): module k's last position that reads a known token
        hidden = at_positions(hidden_in, path_pos)  # (B, W, D)
        tokens = cache.tokens.gather(1, (path_pos + k).clamp(max=S - 1))  # (B, W): the tokens k ahead
        # Path rows past the last final position are padding: they write the trash slot. Tree rows write the
        # slots after the last final one, in node order (a chain's: their own positions); siblings share a
        # position, not a slot.
        M = rows.nodes.shape[0]
        positions = path_pos
        slots = torch.where(path_pos <= final[:, None], path_pos, trash)
        tree_pos = root_pos[:, None] - k + rows.depth  # (B, M); negative: the node has no position yet
        tree_slots = final[:, None] + 1 + torch.arange(M, device=device)
        tree_slots = torch.where(tree_pos >= 0, tree_slots, trash).clamp(max=S - 1)  # (B, M)
        if M:
            at_root = at_positions(hidden_in, (root_pos - k + 1)[:, None]).expand(-1, M, -1)  # (B, M, D)
            if previous is not None and previous.shape[1]:  # nodes of depth >= 2 read their parent's row
                at_root = torch.where(rows.from_root[None, :, None], at_root, previous[:, rows.parent_row])
            hidden = torch.cat([hidden, at_root], dim=1)  # (B, W+M, D)
            tokens = torch.cat([tokens, drafts[:, rows.nodes - 1]], dim=1)  # (B, W+M)
            positions = torch.cat([positions, tree_pos.clamp(0, L - 1)], dim=1)
            slots = torch.cat([slots, tree_slots], dim=1)
        mask = module_mask(path_pos, final, tree_slots, rows.sees, tree_pos >= 0, kv_len)
        ctx = model.attention_context(W + M, positions, cache, mask, kv_len, slots=slots)
        x = torch.cat([hidden, model.tok_embeddings(tokens).to(hidden.dtype)], dim=-1)  # (B, W+M, 2D)
        out = model.heads[k](x, ctx, cache.heads[k])  # (B, W+M, D)
        if k < len(plan.modules):  # module k+1 reads these
            rows_b = torch.arange(B, device=device)[:, None]
            hidden_out = cache.states[k]
            hidden_out[rows_b, path_pos] = out[:, :W].to(hidden_out.dtype)
        if k == 1:  # module 1 drafts at its last final row, the one that reads the root
            at = at_positions(out, (root_pos - 1 - path_pos[:, 0])[:, None])  # (B, 1, D)
        else:
            at = out[:, W + rows.drafting_row]  # (B, Q, D): the nodes of depth k-1
        candidates, q = propose(model.unembed(at, draft_rows), max_rank, sampling, generator, vocab)  # (B, Q, R)
        drafts[:, rows.children - 1] = candidates[:, rows.child_of, rows.rank]
        if q_nodes is not None:
            q_nodes[:, rows.drafting] = q
        previous = out[:, W:]
    return drafts, q_nodes


def conditioned_step(
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
    plan: ModulePlan,
    max_rank: int,
    vocab: DraftVocab | None = None,
    draft_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One step (module docstring): verify the drafts (B, N-1) of the tree `index` (the decoder's tree or a prefix
    of it near the context end), then draft the next ones for the whole tree of `plan`.

    Returns the new tokens (B, D+1) of which the first n_new (B,) count, the next pending positions (B,) and
    the next proposal (drafts (B, N-1), and their laws by node when sampling).
    """
    S, D = cache.max_len, index.n_depth
    verifier = ModelCache(cache.trunk, cache.heads[:1])  # the modules' caches are filled below, not moved
    drafts = drafts[:, : index.size - 1]  # near the context end the tree is a prefix of the drafted one
    v = verify(model, verifier, index, root, pos, drafts, q, kv_len, sampling, generator, [0], by_node=True)
    rows = torch.arange(root.shape[0], device=pos.device)[:, None]
    at = pos[:, None] + torch.arange(D + 1, device=pos.device)  # (B, D+1): the path's true positions
    z_path = v.z[0].gather(1, v.path[:, :, None].expand(-1, -1, v.z[0].shape[-1]))  # (B, D+1, dim)
    cache.states[0][rows, at] = z_path.to(cache.states[0].dtype)  # past the accepted ones: rewritten later
    cache.tokens[rows, (at + 1).clamp(max=S - 1)] = v.new  # the accepted drafts, then the new root
    new_pos = pos + v.n_accepted + 1
    kv = min(S, kv_len + plan.size)  # the modules' rows reach past the verify forward's
    drafts, q = draft_with_modules(
        model, cache, plan, pos, D + 1, new_pos, kv, sampling, generator, max_rank, vocab, draft_rows
    )
    return v.new, v.n_accepted + 1, new_pos, drafts, q


@dataclass(frozen=True, eq=False)
class ConditionedDrafter:
    """Token-conditioned modules draft a chain or a tree one after another; head 1 verifies every draft in the next
    forward (module docstring). heads_used, tree, vocab: as `HeadDrafter`'s, which hands models with such heads
    to this drafter; `prepare` resolves the tree and builds its `ModulePlan`."""

    heads_used: int | None = None
    tree: Tree | None = None
    vocab: DraftVocab | None = None
    draft_rows: torch.Tensor | None = None  # (K, D): the unembedding rows of `vocab`, set by `prepare`
    plan: ModulePlan | None = None
    heads: tuple[int, ...] = (0,)  # the verify forward runs head 1 alone
    step = staticmethod(conditioned_step)

    def prepare(self, model: MultiTokenModel, sampling: SamplingConfig, device: torch.device) -> ConditionedDrafter:
        kind, n = model.cfg.head_kind, model.cfg.n_future
        if any(kind.source(k, n) != k - 1 or kind.token_lead(k) != k for k in range(1, n)):
            raise UserError(
                f"{kind.name} heads cannot be decoded with token-conditioned drafts: the decoder runs modules in which "
                "head k+1 reads head k's output and the token k ahead"
            )
        heads_used, tree, vocab, rows = resolve_drafts(model, self.heads_used, self.tree, sampling, self.vocab, device)
        return ConditionedDrafter(heads_used, tree, vocab, rows, ModulePlan.build(tree, device))

    def start(
        self,
        model: MultiTokenModel,
        cache: ModelCache,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
        """The prefill: trunk and head 1 over the prompts, the first token, then every module over the prompts
        and the first tree's nodes (`draft_with_modules` with the whole prompt as path rows)."""
        z, ids, lengths = prefill_outputs(model, cache, prompts, [0])  # (B, P, D), (B, P), (B,)
        root = sample(model.unembed(at_last(z[0], lengths)), sampling, generator)  # (B,)
        B, P = ids.shape
        rows = torch.arange(B, device=ids.device)
        cache.tokens[:, :P] = ids
        cache.tokens[rows, lengths.clamp(max=cache.max_len - 1)] = root
        cache.states[0][:, :P] = z[0].to(cache.states[0].dtype)
        kv = min(cache.max_len, P + self.plan.size)
        start = torch.zeros_like(lengths)
        proposal = draft_with_modules(
            model, cache, self.plan, start, P, lengths, kv, sampling, generator, self.tree.max_rank, self.vocab,
            self.draft_rows,
        )  # fmt: skip
        return root, lengths, proposal

    def graph_key(self) -> tuple[object, ...]:
        return ("conditioned", self.heads_used, self.tree, id(self.vocab))

    def constants(self) -> dict[str, object]:
        return dict(plan=self.plan, max_rank=self.tree.max_rank, vocab=self.vocab, draft_rows=self.draft_rows)

    def stats(self) -> dict[str, object]:
        return draft_stats(self.tree, self.vocab)
