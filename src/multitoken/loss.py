"""Multi-token loss: target shifting, chunked cross-entropy and the memory-efficient sequential step.

The loss is the paper's L_n = sum_i w_i * mean_t -log P(x_{t+i} | x_{<=t}) (w_i = 1 by default: a plain
unweighted sum over heads). Two ways to get its gradients, which must agree to float tolerance:

- `summed_loss`: every head's logits at once, sum the losses, one backward. Simple; the test oracle.
- `sequential_backward`: the paper's memory-efficient step (§2, Fig. 2). The trunk runs forward once; its
  output h is detached; each head then runs forward *and* backward in turn, so its logits and their
  gradient are freed before the next head; gradients gather on h; one final backward goes through the
  trunk. Going beyond the paper, each head's cross-entropy is also taken in chunks of positions, each
  chunk's logits freed after its own backward, so even one head's full logits never exist at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from multitoken.model import AttentionContext, MultiTokenModel

IGNORE_INDEX = -100


def shift_targets(
    window: torch.Tensor, n_future: int, context: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split token windows into inputs and per-head targets.

    window: (B, L) token ids. The inputs are the first `context` tokens (default L - n_future, so that
    every head has a target at every position). Head i (0-based) at position t predicts window[t + i + 1];
    where that falls past the end of the window the target is IGNORE_INDEX, never wrapped around.
    Returns inputs (B, T) and targets (B, n_future, T).
    """
    B, L = window.shape
    T = L - n_future if context is None else context
    if not 0 < T <= L:
        raise ValueError(f"context {T} does not fit a window of {L} tokens")
    targets = torch.full((B, n_future, T), IGNORE_INDEX, dtype=window.dtype, device=window.device)
    for i in range(n_future):
        avail = min(T, L - i - 1)  # positions t with t + i + 1 < L
        if avail > 0:
            targets[:, i, :avail] = window[:, i + 1 : i + 1 + avail]
    return window[:, :T], targets


def trainable_targets(model: MultiTokenModel, targets: torch.Tensor) -> torch.Tensor:
    """targets (B, n, T) with IGNORE_INDEX wherever a head has no input: a head that reads the token `lead`
    positions ahead (a token-conditioned module) cannot be trained at the last `lead` positions of the inputs,
    whose tokens lie past their end. The same tensor when no head reads a token."""
    kind, T = model.cfg.head_kind, targets.shape[-1]
    if not kind.reads_tokens(model.cfg.n_future):
        return targets
    targets = targets.clone()
    for i in range(model.cfg.n_future):
        lead = kind.token_lead(i)
        if lead is not None:
            targets[:, i, max(T - lead, 0) :] = IGNORE_INDEX
    return targets


@dataclass
class LossReport:
    """Loss of one batch: the weighted total and each head's mean cross-entropy (nats per token)."""

    total: float
    per_head: list[float]


def _head_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} head weights given for {n} heads")
    return list(weights)


def _chunks(n_rows: int, chunk: int) -> list[slice]:
    """Row ranges of at most `chunk` rows (all rows at once when chunk <= 0)."""
    step = n_rows if chunk <= 0 else chunk
    return [slice(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]


def _token_ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits (..., V) against targets (...), in fp32, ignoring IGNORE_INDEX."""
    return F.cross_entropy(
        logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _soft_ce_sum(
    logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor, soft: float
) -> torch.Tensor:
    """Summed cross-entropy of logits (c, K) against the mixture soft * softmax(teacher_logits) + (1 - soft) *
    one-hot(targets), in fp32; rows whose target is IGNORE_INDEX carry no loss."""
    valid = targets != IGNORE_INDEX  # (c,)
    probs = soft * torch.softmax(teacher_logits.float(), dim=-1)  # (c, K)
    probs[valid, targets[valid]] += 1.0 - soft
    probs[~valid] = 0.0
    return F.cross_entropy(logits.float(), probs, reduction="sum")


def summed_loss(
    model: MultiTokenModel,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, LossReport]:
    """The obvious path: every head's logits at once, weighted sum of per-head mean losses.

    Returns the differentiable total and a report. Memory grows with n * V: use it as the oracle.
    """
    n = model.cfg.n_future
    w = _head_weights(n, weights)
    targets = trainable_targets(model, targets)
    logits = model(inputs)  # (B, T, n, V)
    per_head = [
        F.cross_entropy(
            logits[:, :, i].flatten(0, 1).float(), targets[:, i].flatten(), ignore_index=IGNORE_INDEX
        )
        for i in range(n)
    ]
    total = sum(wi * li for wi, li in zip(w, per_head, strict=True))
    return total, LossReport(total.item(), [x.item() for x in per_head])


def chunked_cross_entropy_backward(
    model: MultiTokenModel,
    z: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor | float,
    chunk: int,
    rows: torch.Tensor | None = None,
    teacher: torch.Tensor | None = None,
    soft: float = 0.0,
) -> torch.Tensor:
    """Backward of `scale * sum CE(unembed(z), targets)` into z.grad and the norm/unembedding, by chunks.

    z: (B, T, D) a leaf tensor requiring grad; targets: (B, T); chunk: tokens (rows of the flattened
    batch) per chunk, so the matmuls stay large whatever the batch shape. Each chunk's logits are built,
    reduced, back-propagated and freed before the next. Returns the unscaled summed loss as a detached
    device tensor: reading it is left to the caller, so the step needs no host sync per chunk. rows: (K, D)
    unembedding rows to score against instead of all V (a draft vocabulary's); targets then index them.
    teacher (B, T, D), with soft > 0: soft targets, the target at each position being soft times the
    distribution unembed(teacher) gives there (over the same rows) plus 1 - soft times the one-hot target.
    """
    flat_z, flat_t = z.flatten(0, 1), targets.flatten()  # (B*T, D), (B*T,): views, gradients flow to z
    flat_teacher = teacher.flatten(0, 1) if teacher is not None and soft > 0 else None
    total = torch.zeros((), device=z.device)
    for s in _chunks(flat_t.shape[0], chunk):
        logits = model.unembed(flat_z[s], rows)  # (c, V or K): lives only here
        if flat_teacher is None:
            loss = _token_ce_sum(logits, flat_t[s])
        else:
            with torch.no_grad():
                teacher_logits = model.unembed(flat_teacher[s], rows)
            loss = _soft_ce_sum(logits, flat_t[s], teacher_logits, soft)
        (loss * scale).backward()
        total = total + loss.detach()
    return total


def head_losses_backward(
    model: MultiTokenModel,
    h: torch.Tensor,
    ctx: AttentionContext,
    targets: torch.Tensor,
    scales: Mapping[int, torch.Tensor | float],
    chunk: int,
    tokens: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    teachers: Mapping[int, torch.Tensor] | None = None,
    soft: float = 0.0,
) -> dict[int, torch.Tensor]:
    """Backward of sum_i scales[i] * sum CE(head i) from the trunk output h (B, T, D), one head at a time.

    targets (B, n, T); scales: the heads that carry a loss; tokens (B, T): the inputs, for heads that read a
    token; rows: unembedding rows to score against; teachers[i] (B, T, D) and soft: head i's soft targets
    (`chunked_cross_entropy_backward`). Gradients gather on h
    when it requires grad (and on the embedding through heads that read tokens). Independent heads run forward
    and backward one at a time; a head without a loss is skipped. Chained heads feed each other, so each head's
    output is detached, all heads that the losses need run forward, and the backward goes from the head
    furthest from the trunk back towards it, each head adding its own loss's gradient to what its successors
    left on its output (paper Fig. S11); a head without a loss (a frozen one feeding trained ones) passes its
    successors' gradient on if anything below it learns. Returns each loss's unscaled sum (device tensors).
    """
    chained = model.cfg.head_kind.chained
    sums: dict[int, torch.Tensor] = {}
    if not scales:
        return sums
    leaves: dict[int, torch.Tensor] = {}
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def head_backward(i: int, z: torch.Tensor, leaf: torch.Tensor) -> None:
        if i in scales:
            teacher = teachers.get(i) if teachers else None
            sums[i] = chunked_cross_entropy_backward(model, leaf, targets[:, i], scales[i], chunk, rows, teacher, soft)
        if z.requires_grad and leaf.grad is not None:
            z.backward(leaf.grad)

    for i in model.head_order(list(scales)):
        if not chained and i not in scales:
            continue
        z = model.heads[i](model.head_input(i, h, leaves, tokens), ctx)  # (B, T, D)
        leaf = z.detach().requires_grad_()
        if chained:
            leaves[i] = leaf
            pending.append((i, z, leaf))
        else:
            head_backward(i, z, leaf)  # frees this head's activations before the next head runs
    for i, z, leaf in reversed(pending):
        head_backward(i, z, leaf)
    return sums


def sequential_backward(
    model: MultiTokenModel,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weights: Sequence[float] | None = None,
    chunk: int = 0,
    loss_scale: float = 1.0,
) -> LossReport:
    """The memory-efficient step: gradients of `loss_scale * L_n` accumulated into the parameters.

    inputs (B, T), targets (B, n, T); chunk: tokens per cross-entropy chunk (0: a head's whole batch). The
    trunk runs forward once; its output is detached; the heads run forward and backward one at a time (chained
    ones from the furthest back; `head_losses_backward`), gathering their gradient on it; one backward goes
    through the trunk. Everything stays on the device until the one host read of the losses at the end.
    """
    cfg = model.cfg
    targets = trainable_targets(model, targets)
    w = torch.tensor(_head_weights(cfg.n_future, weights), device=inputs.device)
    counts = (targets != IGNORE_INDEX).sum(dim=(0, 2))  # (n,) on the device
    scales = loss_scale * w / counts.clamp_min(1)  # a head without targets contributes a zero loss
    ctx = model.attention_context(inputs.shape[1])
    h = model.embed_and_trunk(inputs, ctx)  # (B, T, D)
    h_leaf = h.detach().requires_grad_()
    sums = head_losses_backward(model, h_leaf, ctx, targets, dict(enumerate(scales)), chunk, inputs)
    h.backward(h_leaf.grad)
    per_head = torch.stack([sums[i] for i in range(cfg.n_future)]) / counts  # nan where a head has no target
    # Heads without targets add nothing; a NaN or inf loss of a head with targets must show in the total.
    total = torch.where(counts > 0, w * per_head, 0.0).sum()
    values = torch.cat([total[None], per_head]).tolist()  # the step's one host sync
    return LossReport(values[0], values[1:])


@torch.no_grad()
def evaluate_heads(
    model: MultiTokenModel, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 0
) -> dict[str, torch.Tensor]:
    """Per-head sums for evaluation, without ever holding all heads' logits.

    Returns tensors of shape (n,): `loss_sum` (nats), `count` (targets), `correct` (top-1 hits) and
    `agree` (positions where head i's top-1 equals the token head 1 predicts i-1 steps later, i.e. the
    draft head i would make that head 1 then confirms: a forecast of self-speculative acceptance).
    """
    n = model.cfg.n_future
    targets = trainable_targets(model, targets)
    ctx = model.attention_context(inputs.shape[1])
    outputs = model.run_heads(model.embed_and_trunk(inputs, ctx), ctx, tokens=inputs)
    preds: dict[int, torch.Tensor] = {}
    loss_sum, count, correct = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    for i in range(n):
        flat_z, flat_t = outputs[i].flatten(0, 1), targets[:, i].flatten()  # (B*T, D), (B*T,)
        parts = []
        for s in _chunks(flat_t.shape[0], chunk):
            logits = model.unembed(flat_z[s])  # (c, V)
            loss_sum[i] += _token_ce_sum(logits, flat_t[s]).item()
            parts.append(logits.argmax(-1))
        preds[i] = torch.cat(parts).view_as(targets[:, i])  # (B, T)
        valid = targets[:, i] != IGNORE_INDEX
        count[i] = valid.sum()
        correct[i] = ((preds[i] == targets[:, i]) & valid).sum()
    # Head i at position t drafts token t+i+1; head 1 predicts that same token from position t+i.
    agree, agree_count = torch.zeros(n), torch.zeros(n)
    T = inputs.shape[1]
    for i in range(n):
        if T - i <= 0:
            continue
        agree[i] = (preds[i][:, : T - i] == preds[0][:, i:]).sum()
        agree_count[i] = preds[i][:, : T - i].numel()
    return {
        "loss_sum": loss_sum,
        "count": count,
        "correct": correct,
        "agree": agree,
        "agree_count": agree_count,
    }
