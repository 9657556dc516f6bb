"""Calibrating a draft tree on the running model: how often each draft head's candidates are accepted
(`calibrate`, on the text decoding will read: `decoding_windows`), and the tree that maximises the expected
accepted length for a node budget (`build_tree`) or the measured speed (`choose_tree`). tree.py describes
the trees and why they are measured jointly."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any

import torch

from multitoken.errors import UserError
from multitoken.generate.autoregressive import generate
from multitoken.generate.draft_vocab import DraftVocab
from multitoken.generate.sampling import SamplingConfig, probabilities, residual_distribution
from multitoken.generate.tree import Calibration, Tree, path_value
from multitoken.model import MultiTokenModel


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
        # Token-conditioned modules read the window's own tokens: where their drafts are accepted, those are the
        # tokens decoding feeds them.
        outputs = model.run_heads(model.embed_and_trunk(chunk, ctx), ctx, tokens=chunk)
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
    # No eos: every continuation is `length` tokens long.
    continuations = generate(model, prompts.tolist(), length, sampling=sampling, generator=generator).tokens
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
