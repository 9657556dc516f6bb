"""Draft trees for self-speculative decoding (Medusa-style tree attention, beyond the paper).

A tree holds several candidates per head. Node 0, the root, is the pending token (decided but not yet
fed). A node at depth d >= 1 is named by its rank path (r_1, ..., r_d): its token is the rank-r_d
candidate of head d+1 (0-based head d), drafted at the position before the root, and its parent is the
node (r_1, ..., r_{d-1}). One forward verifies the whole tree: node i is rotated by its true position
p + depth(i) but written to the scratch slot p + i, because siblings share a position; the tree mask lets
it see the cached prefix (slots < p), its ancestors and itself. Head 1 at node i checks i's children.

A chain (blockwise parallel decoding) is the tree whose every node has rank 0: its scratch slots are its
true slots and its mask is the causal one, so one decoder serves both.

The shape comes from data, not from constants: `calibrate` records, at every position of some windows, the
rank of the token head 1 then chooses among each draft head's candidates (a `Calibration`), and
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

import heapq
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from multitoken.checkpoint import atomic_write_json
from multitoken.errors import UserError
from multitoken.generate.autoregressive import generate
from multitoken.generate.draft_vocab import DraftVocab
from multitoken.generate.sampling import SamplingConfig, probabilities, residual_distribution
from multitoken.model import MultiTokenModel

TREE_FILE = "tree.json"  # a run directory's calibrated tree, read by `generate --tree`


@dataclass(frozen=True)
class Tree:
    """A draft tree given by the rank paths of its non-root nodes, each parent listed before its children.

    Because parents come first, every prefix of `paths` is a tree too: near the context limit the decoder
    verifies a prefix. `build_tree` lists nodes by decreasing value, so a prefix is also the best smaller tree.
    """

    paths: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        seen: set[tuple[int, ...]] = {()}
        for path in self.paths:
            if not path or min(path) < 0:
                raise UserError(f"tree node {path} must be a non-empty path of ranks >= 0")
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


@torch.no_grad()
def calibrate(
    model: MultiTokenModel,
    windows: torch.Tensor,
    max_rank: int,
    batch_size: int = 8,
    vocab: DraftVocab | None = None,
    skip: int = 0,
    sampling: SamplingConfig = SamplingConfig(),
) -> Calibration:
    """Measure, at every position of `windows`, which of each draft head's candidates decoding would accept.

    windows (B, L): token windows, held-out data or `decoding_windows`. Head d+1 (0-based d) at position t
    drafts token t+d+1; in decoding, head 1 judges that token from position t+d. Greedy: the right answer
    is head 1's argmax there, and its rank among the head's candidates is recorded. Sampling: the window's
    own token t+d+1 is taken as the one decoding produced there, which is exact in law when the windows
    were sampled from the model with the same `sampling` (`round_weights`). Positions t count from skip - 1
    (skip = the prompt length of generated windows: the drafts that decoding makes once it has read the
    prompt) to the last one where every head's answer is in the window. With a draft vocabulary the
    candidates come from its tokens only, as in the decoder, and a right answer outside it is a miss.
    """
    n = model.cfg.n_future
    if n < 2:
        raise UserError("calibrating a tree needs a model with at least 2 heads")
    if windows.dim() != 2 or windows.shape[1] < skip + n + 1:
        raise UserError(
            f"calibration needs (batch, length >= {skip + n + 1}) token windows, got {tuple(windows.shape)}"
        )
    first, T = max(skip - 1, 0), windows.shape[1]
    # The last position whose every draft has its answer in the window: head 1's choice for token t+n-1
    # (greedy), or token t+n-1 itself (sampling).
    last = T - n - (0 if sampling.greedy else 1)
    device = model.output.weight.device
    vocab = vocab.to(device) if vocab is not None else None
    weights = []
    for chunk in windows.to(device).split(batch_size):
        ctx = model.attention_context(chunk.shape[1])
        outputs = model.run_heads(model.embed_and_trunk(chunk, ctx), ctx)
        logits = model.unembed(outputs[0])  # (b, T, V): head 1's logits for token t+1
        # What head 1 judges by: its token for t+1 (b, T) when greedy, else its distribution (b, T, V).
        judge = logits.argmax(-1) if sampling.greedy else probabilities(logits, sampling)
        per_head = []
        for d in range(1, n):
            logits = model.unembed(outputs[d][:, first : last + 1]).float()  # (b, P, V): drafts for t+d+1
            if vocab is not None:
                logits = vocab.restrict(logits)  # (b, P, K)
            if sampling.greedy:
                right = judge[:, first + d : last + d + 1]  # (b, P): head 1's token for t+d+1
                if vocab is not None:  # rank among the draft tokens; outside them, never drafted
                    index = vocab.index(right)
                    right = index.clamp_min(0)
                rank = (logits > logits.gather(-1, right[..., None])).sum(-1).clamp_max(max_rank)  # (b, P)
                if vocab is not None:
                    rank = torch.where(index >= 0, rank, max_rank)
                w = torch.nn.functional.one_hot(rank, max_rank + 1).float()
            else:
                q = probabilities(logits, sampling)
                q = vocab.expand(q) if vocab is not None else q  # (b, P, V)
                p = judge[:, first + d : last + d + 1]  # (b, P, V): head 1's distribution over token t+d+1
                w = round_weights(p, q, chunk[:, first + d + 1 : last + d + 2], max_rank)
            per_head.append(w.flatten(0, 1))  # (b * P, max_rank + 1)
        weights.append(torch.stack(per_head, dim=1).cpu())  # (b * P, n - 1, max_rank + 1)
    return Calibration(torch.cat(weights), sampling)


def round_weights(p: torch.Tensor, q: torch.Tensor, token: torch.Tensor, rounds: int) -> torch.Tensor:
    """The law of the round that accepts, given the token the walk produced: (..., rounds + 1).

    p, q (..., V): head 1's processed distribution and the draft head's; token (...). The walk
    (`verify_sampled`) tries independent draws from q in turn against r_0 = p, r_{i+1} = normalize(max(0,
    r_i - q)); round i accepts draw y with probability min(1, r_i(y) / q(y)). So round i accepts and
    yields x with probability prod_{j<i} (1 - sum min(q, r_j)) * min(q(x), r_i(x)), and since the walk is
    lossless, x itself has probability p(x): the quotient is the law of the round given x. The last
    column is what no round accepts (x then came from the residual); a token with p(x) = 0, which decoding
    can never produce, counts there entirely.
    """
    at = token[..., None]
    px, qx = p.gather(-1, at)[..., 0], q.gather(-1, at)[..., 0]
    r, reached, joint = p, torch.ones_like(px), []
    for _ in range(rounds):
        joint.append(reached * torch.minimum(qx, r.gather(-1, at)[..., 0]))
        reached = reached * (1.0 - torch.minimum(q, r).sum(-1)).clamp_min(0.0)
        r = residual_distribution(r, q)
    w = torch.stack(joint, -1) / px.clamp_min(torch.finfo(px.dtype).tiny)[..., None]
    w = torch.where(px[..., None] > 0, w, 0.0).clamp(0.0, 1.0)  # (..., rounds)
    return torch.cat([w, (1.0 - w.sum(-1, keepdim=True)).clamp_min(0.0)], dim=-1)


def decoding_windows(
    model: MultiTokenModel,
    prompts: torch.Tensor,
    length: int,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prompts (B, P) followed by the model's own continuation of `length` tokens (plain decoding with
    `sampling`): (B, P + length), the text decoding will read; calibrate on it with skip=P."""
    if prompts.shape[1] + length > model.cfg.max_seq_len:
        raise UserError(f"prompts of {prompts.shape[1]} + {length} tokens exceed the context {model.cfg.max_seq_len}")
    continuations = generate(model, prompts.tolist(), length, sampling, generator).tokens  # no eos: all `length`
    return torch.cat([prompts, torch.tensor(continuations, dtype=prompts.dtype)], dim=1)


def calibrate_decoding(
    model: MultiTokenModel,
    prompts: torch.Tensor,
    length: int,
    max_rank: int,
    vocab: DraftVocab | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
) -> Calibration:
    """`calibrate` on the model's own continuations of prompts (B, P), windows of `length` tokens in all:
    the acceptance that decoding such prompts with `sampling` meets."""
    P = prompts.shape[1]
    windows = decoding_windows(model, prompts, length - P, sampling, generator)
    return calibrate(model, windows, max_rank, vocab=vocab, skip=P, sampling=sampling)


def build_tree(estimate: Calibration | torch.Tensor, budget: int) -> Tree:
    """The tree of at most `budget` nodes (root included) with the largest expected accepted length.

    estimate: a `Calibration` (paths valued jointly) or per-head acceptance (heads - 1, R) (paths valued
    as products). Either way a path's value never exceeds its parent's, so adding the most valuable node
    whose parent is in the tree, one at a time, picks the `budget - 1` most valuable paths. Nodes that can
    never be accepted are left out. A sampling calibration's ranks are the order in which draws are tried,
    so there a node's rank-r child becomes a candidate only once its rank r-1 sibling is in the tree.
    """
    if budget < 1:
        raise UserError(f"tree budget must be >= 1 node, got {budget}")
    acceptance = estimate.acceptance if isinstance(estimate, Calibration) else estimate
    in_turn = isinstance(estimate, Calibration) and not estimate.sampling.greedy
    n_draft, R = acceptance.shape
    heap: list[tuple[float, int, tuple[int, ...]]] = []
    counter = 0  # breaks ties by insertion order, so the result is deterministic

    def push(path: tuple[int, ...]) -> None:
        nonlocal counter
        value = path_value(path, estimate)
        if value > 0:
            heapq.heappush(heap, (-value, counter, path))
            counter += 1

    def push_children(path: tuple[int, ...]) -> None:
        if len(path) < n_draft:
            for r in range(1 if in_turn else R):
                push((*path, r))

    paths: list[tuple[int, ...]] = []
    push_children(())
    while heap and len(paths) < budget - 1:
        _, _, path = heapq.heappop(heap)
        paths.append(path)
        push_children(path)
        if in_turn and path[-1] + 1 < R:
            push((*path[:-1], path[-1] + 1))
    return Tree(tuple(paths))


def choose_tree(
    calibration: Calibration, budgets: Sequence[int], step_seconds: Callable[[Tree], float], plain_seconds: float
) -> tuple[Tree, list[dict[str, Any]]]:
    """The tree whose expected speed is highest, given what its decoding steps cost on this machine.

    For each budget, `build_tree`'s tree is timed by `step_seconds(tree)` (seconds per decoding step with
    it) and valued at expected_length * plain_seconds / step_seconds, plain_seconds being a plain decoding
    step's. Budgets that give the same tree (nothing left worth a node) are timed once. Returns the best
    tree and one row per budget (size, expected tokens per forward, seconds, expected speedup, chosen).
    """
    if not budgets:
        raise UserError("no tree budget to choose from")
    rows, trees, timed = [], [], {}
    for budget in sorted(budgets):
        tree = build_tree(calibration, budget)
        if tree not in timed:
            timed[tree] = step_seconds(tree)
        length = tree.expected_length(calibration)
        rows.append({"budget": budget, "size": tree.size, "expected_tokens_per_forward": length,
                     "seconds": timed[tree], "expected_speedup": length * plain_seconds / timed[tree],
                     "chosen": False})  # fmt: skip
        trees.append(tree)
    best = max(range(len(rows)), key=lambda i: rows[i]["expected_speedup"])  # the first of equals: the smallest
    rows[best]["chosen"] = True
    return trees[best], rows


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
    if not path.is_file():
        raise UserError(f"no draft tree at {path}; make one with `multitoken calibrate RUN`")
    try:
        paths = json.loads(path.read_text())["paths"]
        return Tree(tuple(tuple(int(r) for r in p) for p in paths))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is not a draft tree file: {e}") from None
