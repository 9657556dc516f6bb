"""Draft trees for self-speculative decoding (Medusa-style tree attention, beyond the paper).

A tree holds several candidates per head. Node 0, the root, is the pending token (decided but not yet
fed). A node at depth d >= 1 is named by its rank path (r_1, ..., r_d): its token is the rank-r_d
candidate of head d+1 (0-based head d), drafted at the position before the root, and its parent is the
node (r_1, ..., r_{d-1}). One forward verifies the whole tree: node i is rotated by its true position
p + depth(i) but written to the scratch slot p + i, because siblings share a position; the tree mask lets
it see the cached prefix (slots < p), its ancestors and itself. Head 1 at node i checks i's children.

A chain (blockwise parallel decoding) is the tree whose every node has rank 0: its scratch slots are its
true slots and its mask is the causal one, so one decoder serves both.

The shape comes from data, not from constants (calibration.py): `calibrate` records, at every position of
some windows, the rank of the token head 1 then chooses among each draft head's candidates (a `Calibration`), and
`build_tree` adds nodes greedily by the probability that their whole path is accepted, which maximises the
expected accepted length for a node budget. That probability is measured jointly, not as a product of
per-head rates: small models' drafts are right or wrong together (a loop is drafted to its end, a fresh
line not at all), which independence misjudges. Greedy decoding reads the model's own text, usually easier
to draft than held-out data, so `decoding_windows` continues held-out prompts with the model itself and
`calibrate(..., skip=prompt length)` measures on the continuations only: the acceptance decoding will meet.

Sampling draws a node's children independently from the draft head and tries them in turn (multi-round
speculative sampling), so there a rank is the order in which a draw is tried, and `calibrate` records the
law of the round that accepts, given the token the model sampled (`round_weights`): trees for sampling
are calibrated on sampled continuations, with the same temperature, top-k and top-p.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from multitoken.checkpoint import atomic_write_json, read_json
from multitoken.config import typed_field
from multitoken.errors import UserError
from multitoken.generate.sampling import SamplingConfig

TREE_FILE = "tree.json"  # a run directory's calibrated tree, read by `generate --tree`
# A verify forward feeds every node and its mask is nodes x context, while it can accept at most depth + 1
# tokens: calibrated trees have tens of nodes. The bound keeps a hostile tree file from allocating gigabytes
# (the ancestor matrix alone is nodes^2) and bounds the candidates per head a tree may read.
MAX_TREE_NODES = 1024


@dataclass(frozen=True)
class Tree:
    """A draft tree given by the rank paths of its non-root nodes, each parent listed before its children.

    Because parents come first, every prefix of `paths` is a tree too: near the context limit the decoder
    verifies a prefix. `build_tree` lists nodes by decreasing value, so a prefix is also the best smaller tree.
    """

    paths: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.paths) >= MAX_TREE_NODES:
            raise UserError(f"a tree of {len(self.paths) + 1} nodes is too large (at most {MAX_TREE_NODES})")
        seen: set[tuple[int, ...]] = {()}
        for path in self.paths:
            if not path or min(path) < 0 or max(path) >= MAX_TREE_NODES:
                raise UserError(f"tree node {path} must be a non-empty path of ranks >= 0 and < {MAX_TREE_NODES}")
            if path in seen:
                raise UserError(f"tree node {path} is listed twice")
            if path[:-1] not in seen:
                raise UserError(f"tree node {path} comes before its parent {path[:-1]}")
            seen.add(path)

    @classmethod
    def chain(cls, heads: int) -> Tree:
        """The chain of blockwise parallel decoding: head 1 plus the top-1 draft of heads 2..`heads`."""
        return cls(tuple((0,) * d for d in range(1, heads)))

    @property
    def size(self) -> int:
        """Nodes fed per forward, the root included."""
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        """Longest path: the tree needs heads 1..depth+1."""
        return max((len(p) for p in self.paths), default=0)

    @property
    def is_chain(self) -> bool:
        return all(p == (0,) * len(p) for p in self.paths)

    @property
    def max_rank(self) -> int:
        """How many candidates per head the tree reads (the top-k it needs)."""
        return 1 + max((max(p) for p in self.paths), default=0)

    def prefix(self, size: int) -> Tree:
        """The tree made of the first `size` nodes (root included)."""
        return Tree(self.paths[: size - 1])

    def expected_length(self, estimate: Calibration | torch.Tensor) -> float:
        """Expected tokens per forward, 1 + sum over nodes of P(whole path accepted) (`path_value`)."""
        return 1.0 + sum(path_value(p, estimate) for p in self.paths)

    def __str__(self) -> str:
        return f"Tree(size={self.size}, depth={self.depth}, paths={list(self.paths)})"


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` measured: at each counted draft position, for each draft head, the probability that
    its candidate of each rank is the one accepted, given the text that followed.

    Greedy: one-hot, the rank of head 1's choice among the head's top candidates. Sampling (`sampling` not
    greedy): a node's children are independent draws tried in turn, so rank r is the r-th draw tried, and
    its weight the probability that the walk accepts it after rejecting draws 0..r-1 (`round_weights`).
    """

    weights: torch.Tensor  # (positions, heads - 1, max_rank + 1); the last column: no candidate accepted
    sampling: SamplingConfig = SamplingConfig()

    @classmethod
    def from_ranks(cls, ranks: torch.Tensor, max_rank: int) -> Calibration:
        """A greedy calibration from ranks (positions, heads - 1), max_rank standing for "not a candidate"."""
        return cls(torch.nn.functional.one_hot(ranks, max_rank + 1).float())

    @property
    def max_rank(self) -> int:
        return self.weights.shape[-1] - 1

    @property
    def acceptance(self) -> torch.Tensor:
        """(heads - 1, max_rank): P(head d+2's rank-r candidate is accepted), each head on its own."""
        return self.weights.mean(0)[:, : self.max_rank]

    def path_probability(self, path: tuple[int, ...]) -> float:
        """P(heads 2..len(path)+1 accept exactly these ranks), i.e. that the node is accepted, measured jointly
        over the positions."""
        per_head = self.weights[:, torch.arange(len(path)), torch.tensor(path)]  # (positions, len(path))
        return float(per_head.prod(1).mean())


def path_value(path: tuple[int, ...], estimate: Calibration | torch.Tensor) -> float:
    """P(the whole path is accepted): measured jointly from a `Calibration`, or, from per-head acceptance
    (heads - 1, R) alone, the product of its nodes' rates (the heads' hits taken as independent)."""
    if isinstance(estimate, Calibration):
        return estimate.path_probability(path)
    value = 1.0
    for d, r in enumerate(path):
        value *= float(estimate[d, r]) if r < estimate.shape[1] else 0.0
    return value


@dataclass(frozen=True)
class TreeIndex:
    """A tree's structure as device tensors, for the decode step. N nodes, D = depth.

    parent (N,): parent node (the root is its own parent); depth (N,); head (N-1,) and rank (N-1,): which
    head's which candidate each non-root node drafts; ancestors (N, N): ancestors[i, j] if j is i or an
    ancestor of i; path (N, D+1): the nodes from the root to i by depth, padded with i; children (N, C):
    each node's children in the order listed (by rank for calibrated trees), padded with -1.
    """

    parent: torch.Tensor
    depth: torch.Tensor
    head: torch.Tensor
    rank: torch.Tensor
    ancestors: torch.Tensor
    path: torch.Tensor
    children: torch.Tensor
    is_chain: bool
    max_rank: int

    @property
    def size(self) -> int:
        return self.parent.shape[0]

    @property
    def n_depth(self) -> int:
        return self.path.shape[1] - 1

    @classmethod
    def build(cls, tree: Tree, device: torch.device | str = "cpu") -> TreeIndex:
        nodes: list[tuple[int, ...]] = [(), *tree.paths]
        index = {p: i for i, p in enumerate(nodes)}
        N, D = len(nodes), tree.depth
        parent = [index[p[:-1]] if p else 0 for p in nodes]
        ancestors = torch.zeros(N, N, dtype=torch.bool)
        path = torch.zeros(N, D + 1, dtype=torch.long)
        for i, p in enumerate(nodes):
            chain = [index[p[:d]] for d in range(len(p) + 1)]
            ancestors[i, chain] = True
            path[i] = torch.tensor(chain + [i] * (D + 1 - len(chain)))
        kids: list[list[int]] = [[] for _ in nodes]
        for i in range(1, N):
            kids[parent[i]].append(i)
        width = max(len(k) for k in kids)
        children = [k + [-1] * (width - len(k)) for k in kids]

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=device)

        return cls(
            parent=t(parent),
            depth=t([len(p) for p in nodes]),
            head=t([len(p) - 1 for p in tree.paths]),
            rank=t([p[-1] for p in tree.paths]),
            ancestors=ancestors.to(device),
            path=path.to(device),
            children=t(children),  # (N, 0) when the tree is the root alone
            is_chain=tree.is_chain,
            max_rank=tree.max_rank,
        )


def tree_mask(index: TreeIndex, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean attention mask (B, 1, N, kv_len) for a tree whose root sits at position pos (B,).

    Node i sees the prefix (slots < pos) and, among the scratch slots pos..pos+N-1, those of its ancestors
    and itself. For a chain this is exactly `causal_mask`.
    """
    N = index.size
    rel = torch.arange(kv_len, device=pos.device)[None, :] - pos[:, None]  # (B, S): slot - root slot
    in_tree = (rel >= 0) & (rel < N)
    sees_node = index.ancestors[:, rel.clamp(0, N - 1)].permute(1, 0, 2)  # (B, N, S)
    return ((rel < 0)[:, None, :] | (in_tree[:, None, :] & sees_node))[:, None]  # (B, 1, N, S)


def save_tree(tree: Tree, path: Path, calibration: Calibration | None = None) -> None:
    """Write a tree (and the per-head acceptance, expected length and sampling settings of the calibration it
    came from) as JSON, atomically."""
    data: dict[str, Any] = {"paths": [list(p) for p in tree.paths], "size": tree.size, "depth": tree.depth}
    if calibration is not None:
        data["acceptance"] = calibration.acceptance.tolist()
        data["expected_tokens_per_forward"] = tree.expected_length(calibration)
        data["sampling"] = asdict(calibration.sampling)
    atomic_write_json(Path(path), data)


def load_tree(path: Path) -> Tree:
    """A tree written by `save_tree`; UserError if the file is missing or malformed."""
    path = Path(path)
    remedy = "make one with `multitoken calibrate RUN`"
    if not path.is_file():
        raise UserError(f"no draft tree at {path}; {remedy}")
    data = read_json(path, UserError, remedy)
    try:
        if not isinstance(data, dict):
            raise UserError("not a JSON object")
        paths = typed_field(data, "paths", list[list[int]])
        return Tree(tuple(tuple(p) for p in paths))
    except UserError as e:
        raise UserError(f"{path} is not a draft tree file: {e}; {remedy}") from None
