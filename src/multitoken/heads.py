"""Multi-token heads on a pretrained next-token model: add them, then train them (paper §3.2 applied post hoc).

A pretrained causal LM (n_future = 1: trunk + head 1 = its last block) gains heads 2..n with `add_heads`,
each starting as a copy of head 1. `train_heads` then teaches them, in one of two modes:

- "frozen": only heads 2..n learn. The trunk, head 1 and the shared norm + unembedding stay bitwise the
  pretrained model, so self-speculative greedy decoding reproduces the original model's greedy output. The
  trunk output h is computed under no_grad (no trunk activations kept, no trunk backward).
- "joint": everything learns; the pretrained parts (embedding, trunk, head 1, norm, unembedding) at
  `trunk_lr_scale` times the learning rate of the new heads, so they move only a little. The verifier then
  is no longer the original model.

What the draft heads should predict, for a high acceptance, is what head 1 will say, not the corpus:

- "corpus": head i at t learns the corpus token x_{t+i} (`shift_targets`).
- "self": teacher-forced self-distillation. Head i at t learns head 1's argmax at position t+i-1 over corpus
  text, i.e. the token head 1 would verify there. One no_grad forward of head 1 gives all the targets.
- "generated": the model's own greedy continuations of corpus prompts (decoded with the KV cache) become the
  training text, with corpus targets on it. On that text head 1's teacher-forced argmax is the next token
  itself, so "self" and "corpus" targets coincide there; what changes is that the contexts are the model's
  own, as in decoding: what the heads must learn is a function of what they can see. It costs a decode
  step per token, batched (`generation_batch` sequences at once): SmolLM2-135M on 2 CPU cores made 61k
  tokens in 6.4 minutes this way, and 24 more minutes of training on them took its heads to 1.4-1.9 tokens
  per forward on held-out code (docs/results/smollm2_heads.md).

`soft_targets` = s (frozen mode) mixes head 1's whole distribution into any of these: head i at t learns
s * (head 1's distribution at t+i-1) + (1 - s) * (its target), the distribution the verifier will draw from
there rather than only its argmax (knowledge distillation; DistillSpec, Zhou et al. 2024, for drafts).
On SmolLM2 (20 CPU-minutes) s = 0.5 lowered the heads' held-out loss but moved their tokens per forward by
under 0.05, so it is off by default (docs/results/smollm2_mtp.md).

With `draft_vocab` = K (frozen mode), heads 2..n learn a softmax over the K tokens most frequent in their
training text only, the vocabulary they will draft from (generate/draft_vocab.py, saved with the run):
each step's unembedding products shrink from V to K rows, most of a frozen step's cost when V is large.
Targets outside the K are skipped: the decoder can never draft them anyway.

In frozen mode the trunk's output on a window never changes, so `TrunkFeatures` computes it once per
window and keeps it (up to `trunk_cache_gib`): later draws of the window skip the trunk, 63 % of what a
fresh frozen step cost on SmolLM2 (fp32, corpus targets; docs/results/smollm2_heads.md). With `trunk_reuse`
R each window serves about R batches from a replay pool of recent windows, so a CPU budget buys up to R
times as many trunk-free steps.
On SmolLM2 (20 CPU-minutes, bf16) R = 4 ran 1.67-1.72x as many steps as R = 1 but reached the same agreement
with head 1 (docs/results/smollm2_mtp.md): a replayed batch taught less than a fresh one. 1 stays the default.

`precision` "bf16" runs each step (trunk, head 1's targets, the draft heads' forward and backward) under bf16
autocast, with fp32 master weights, fp32 softmax and an fp32 optimizer; "auto" (the default) times the trunk
both ways on the machine that trains (`choose_precision`) and keeps bf16 only where it is clearly faster. On
an AMD EPYC with avx512_bf16 a SmolLM2 step runs about 2.5x faster in bf16, and head 1's bf16 argmax
agrees with its fp32 one on 98 % of corpus positions. Where bf16 brings no clear gain, fp32 stays.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from multitoken.checkpoint import load_run, save_checkpoint, write_run_config
from multitoken.config import INITS, MODES, HeadsConfig, TrainConfig, default_heads_train_config
from multitoken.data.dataset import WindowSampler
from multitoken.data.tokenizers import load_tokenizer
from multitoken.errors import UserError
from multitoken.generate.autoregressive import generate
from multitoken.generate.draft_vocab import DRAFT_VOCAB_FILE, DraftVocab
from multitoken.head_kinds import HEAD_KINDS, head_kind
from multitoken.interop.meta import staged_dir
from multitoken.loop import budget_clock, training_loop
from multitoken.loss import (
    IGNORE_INDEX,
    LossReport,
    head_losses_backward,
    sequential_backward,
    shift_targets,
    trainable_targets,
)
from multitoken.model import MultiTokenModel
from multitoken.pretrain import METRICS_FILE, autocast_context, evaluate, prepare_data

# --------------------------------------------------------------------------------------------------
# adding heads


def add_heads(
    model: MultiTokenModel,
    n_future: int,
    init: str = "copy",
    seed: int = 0,
    head_type: str | None = None,
    sample: torch.Tensor | None = None,
) -> MultiTokenModel:
    """A new model with `n_future` heads whose heads 1..m are `model`'s (m = its n_future <= n_future).

    The trunk keeps its blocks and head 1 stays the old last block, so head 1's logits are unchanged
    (bitwise). New heads are initialised by `init`:

    - "copy" (default): a copy of head 1. At step 0 head i then predicts x_{t+1} instead of x_{t+i}: a
      sensible prior (neighbouring tokens are correlated, and the verifier accepts a draft equal to its own
      next guess surprisingly often), a stable start (the head's output already lives where the shared norm
      and unembedding expect it), and no loss of the pretrained alignment between the last block and the
      unembedding, which a random block would throw away and have to relearn from little data. A
      token-conditioned module copies head 1 into its block (`HeadKind.copy_head`), and its hidden norm's
      gain is the median RMS of the trunk output on the tokens `sample` (B, T), if given (`hidden_scale`).
    - "random": the model's usual random block init (seeded), for comparison.

    head_type: the kind of the new model (default: the model's own if its heads are independent, else
    parallel). To a model of m > 1 heads only heads of its own independent kind can be added: causal or
    anticausal heads would change what the existing heads read. To a next-token model (m = 1) any kind whose
    next-token head reads the trunk alone and has the same module (a block or a linear map) can be added:
    parallel, causal or token-conditioned (mtp) heads on a block. `model` itself is not modified.
    """
    cfg = model.cfg
    m = cfg.n_future
    if init not in INITS:
        raise UserError(f"unknown head init {init!r}; choose one of {', '.join(INITS)}")
    if n_future < m:
        raise UserError(f"the model already has {m} heads; cannot reduce it to {n_future}")
    kind = cfg.head_kind
    if m > 1 and not kind.independent:
        raise UserError(f"cannot add heads to {kind.name} heads: their heads read each other (add to parallel heads)")
    if head_type is not None:
        wanted = head_kind(head_type)
        if m > 1 and wanted is not kind:
            raise UserError(f"cannot add {wanted.name} heads to a model of {m} {kind.name} heads")
        if wanted.order(n_future, [0]) != [0] or wanted.owns_blocks != kind.owns_blocks:
            raise UserError(f"{wanted.name} heads cannot be added to a next-token model: its last block would change")
        kind = wanted
    elif not kind.independent:  # one head reads the trunk whatever its kind
        kind = HEAD_KINDS["parallel"]
    extra_blocks = n_future - m if kind.owns_blocks else 0  # n_layers counts every block
    new_cfg = cfg.replace(n_future=n_future, n_layers=cfg.n_layers + extra_blocks, head_type=kind.name)
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    new = MultiTokenModel(new_cfg)
    if init == "random":
        new.reset_parameters(seed=seed)
    state = dict(model.state_dict())
    scale = hidden_scale(model, sample) if sample is not None and init == "copy" else 1.0
    for i in range(m, n_future):
        if init == "copy":
            kind.copy_head(new.heads[i], model.heads[0], scale)
        state.update({k: v for k, v in new.state_dict().items() if k.startswith(f"heads.{i}.")})
    new.load_state_dict(state, strict=True)  # re-ties a tied unembedding to the embedding
    return new.to(device=device, dtype=dtype).train(model.training)


@torch.no_grad()
def hidden_scale(model: MultiTokenModel, sample: torch.Tensor) -> float:
    """The median over positions of the RMS of `model`'s trunk output on the tokens `sample` (B, T): robust
    to the few positions (the first, an attention sink) whose output is an order of magnitude larger."""
    h = model.embed_and_trunk(sample, model.attention_context(sample.shape[1]))  # (B, T, D)
    return float(h.float().pow(2).mean(-1).sqrt().median())


# --------------------------------------------------------------------------------------------------
# targets


def self_distilled_targets(choice: torch.Tensor, n_future: int) -> torch.Tensor:
    """Teacher-forced self-distillation targets (B, n_future, T) from head 1's argmax `choice` (B, T).

    choice[:, t] is the token head 1 predicts for position t+1. Head i (1-based) at position t drafts the
    token of position t+i, which head 1 decides from position t+i-1: its target is choice[:, t+i-1]. Row 0
    (head 1) is `choice` itself; the last i-1 positions of head i have no target (IGNORE_INDEX).
    """
    B, T = choice.shape
    targets = torch.full((B, n_future, T), IGNORE_INDEX, dtype=torch.long, device=choice.device)
    for i in range(n_future):
        if i < T:
            targets[:, i, : T - i] = choice[:, i:]
    return targets


@torch.no_grad()
def head1_choice(model: MultiTokenModel, head1_out: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Head 1's argmax (B, T) from its output (B, T, D); logits built `chunk` tokens at a time (V is large)."""
    z = head1_out.flatten(0, 1)  # (B*T, D)
    step = z.shape[0] if chunk <= 0 else chunk
    # max(-1).indices is argmax (both give the first of tied maxima), but on bf16 logits on the CPU it runs several
    # times faster: a SmolLM2 mtp step (bf16, 4 x 128 tokens) took 0.90 s instead of 0.98 s (AMD EPYC, torch 2.13).
    choice = torch.cat([model.unembed(z[s : s + step]).max(-1).indices for s in range(0, z.shape[0], step)])
    return choice.view(head1_out.shape[:2])  # (B, T)


@torch.no_grad()
def generate_self_data(
    model: MultiTokenModel,
    tokens: np.ndarray | Sequence[np.ndarray],
    n_prompts: int,
    prompt_tokens: int,
    new_tokens: int,
    eos_id: int,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """The model's own greedy continuations of corpus prompts, as one flat token array.

    Prompts are `prompt_tokens`-long slices of `tokens` at seeded random offsets; each continues for up to
    `new_tokens` greedy tokens of head 1 (plain decoding with the KV cache), stopping at `eos_id`. Each
    sequence (prompt + continuation) is followed by `eos_id`, like documents in a token store. `tokens`
    may be several token arrays (say code and prose): prompt j then comes from array j mod their count, so
    each gets an equal share of the prompts however small it is.
    """
    pools = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
    rng = np.random.default_rng(seed)
    drawn = []  # drawn[p]: the prompts of pool p, in order
    for p, pool in enumerate(pools):
        if len(pool) <= prompt_tokens:
            raise UserError(f"{len(pool)} tokens cannot give prompts of {prompt_tokens} tokens")
        starts = rng.integers(0, len(pool) - prompt_tokens, size=len(range(p, n_prompts, len(pools))))
        drawn.append([pool[s : s + prompt_tokens].astype(np.int64).tolist() for s in starts])
    prompts = [drawn[j % len(pools)][j // len(pools)] for j in range(n_prompts)]
    was_training = model.training
    model.eval()
    flat: list[int] = []
    for b in tqdm(range(0, n_prompts, batch_size), desc="generating", unit="batch", disable=not progress):
        batch = prompts[b : b + batch_size]
        result = generate(model, batch, new_tokens, eos_id=eos_id)
        for prompt, new in zip(batch, result.tokens, strict=True):
            flat.extend(prompt + new)
            if not new or new[-1] != eos_id:
                flat.append(eos_id)
    model.train(was_training)
    return np.asarray(flat, dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# one training step


def _draft_parameters(model: MultiTokenModel) -> list[torch.nn.Parameter]:
    return [p for head in model.heads[1:] for p in head.parameters()]


def configure_trainable(model: MultiTokenModel, mode: str) -> None:
    """Set requires_grad: heads 2..n only ("frozen"), or every parameter ("joint")."""
    if mode not in MODES:
        raise UserError(f"unknown head training mode {mode!r}; choose one of {', '.join(MODES)}")
    draft = {id(p) for p in _draft_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(mode == "joint" or id(p) in draft)


def build_heads_optimizer(
    model: MultiTokenModel, mode: str, cfg: TrainConfig, trunk_lr_scale: float
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (see `configure_trainable`), which it also sets.

    Each group carries `lr_scale`: 1 for the new heads, `trunk_lr_scale` for the pretrained parts in joint
    mode; the schedule sets `lr = lr_at(...) * lr_scale`. Norm gains are not decayed (as `build_optimizer`).
    """
    configure_trainable(model, mode)
    draft = {id(p) for p in _draft_parameters(model)}
    seen: set[int] = set()
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for p in model.parameters():  # tied weights appear once in parameters(); `seen` guards anyway
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        scale = 1.0 if id(p) in draft else trunk_lr_scale
        groups.setdefault((scale, p.dim() >= 2), []).append(p)
    param_groups = [
        {"params": ps, "lr": cfg.lr * scale, "lr_scale": scale, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (scale, decay), ps in groups.items()
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, fused=False)


def frozen_heads_backward(
    model: MultiTokenModel,
    inputs: torch.Tensor,
    targets: torch.Tensor | None,
    chunk: int = 1024,
    vocab: DraftVocab | None = None,
    soft: float = 0.0,
) -> LossReport:
    """Gradients of sum_{i>=2} mean CE(head i) into heads 2..n only; the trunk runs under no_grad.

    inputs (B, T). targets (B, n, T), or None for teacher-forced self-distilled targets computed here from
    head 1 (`self_distilled_targets`). Then `draft_heads_backward` on the trunk output, with `soft` targets.
    """
    h, targets, head1_out = frozen_trunk(model, inputs, targets, chunk, teacher=soft > 0)
    return draft_heads_backward(model, h, targets, chunk, vocab, inputs, head1_out, soft)


@torch.no_grad()
def frozen_trunk(
    model: MultiTokenModel,
    inputs: torch.Tensor,
    targets: torch.Tensor | None,
    chunk: int = 1024,
    teacher: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The trunk output (B, T, D) of `inputs` (B, T) without a graph, the targets (B, n, T) and, if `teacher`
    or for self targets, head 1's output (B, T, D) (else None), from which soft targets come.

    targets None: the self-distilled ones, from head 1 on that trunk output (`self_distilled_targets`).
    """
    if model.head_order([0]) != [0]:
        raise UserError(
            f"frozen head training needs a next-token head that reads the trunk output alone; {model.cfg.head_type} "
            "heads' does not"
        )
    ctx = model.attention_context(inputs.shape[1])
    h = model.embed_and_trunk(inputs, ctx)  # (B, T, D), no graph: the trunk is frozen
    head1_out = model.heads[0](h, ctx) if teacher or targets is None else None
    if targets is None:
        targets = self_distilled_targets(head1_choice(model, head1_out, chunk), model.cfg.n_future)
    return h, targets, head1_out


def draft_heads_backward(
    model: MultiTokenModel,
    h: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 1024,
    vocab: DraftVocab | None = None,
    inputs: torch.Tensor | None = None,
    head1_out: torch.Tensor | None = None,
    soft: float = 0.0,
) -> LossReport:
    """Gradients of sum_{i>=2} mean CE(head i) into heads 2..n from the frozen trunk output h (B, T, D).

    targets (B, n, T) token ids; inputs (B, T): the tokens, which heads that read a token need. The heads run
    forward and backward in turn (`head_losses_backward`: the sequential step of loss.py without the trunk
    backward; chained heads from the furthest back, the frozen head 1 feeding them), their logits built
    `chunk` tokens at a time. per_head[0] is NaN: head 1 is not trained. With a draft vocabulary the heads'
    softmax runs over its tokens only, and targets outside it are skipped, even with soft = 1, where the
    target itself carries no weight: the verifier's choice there is a token the heads can never draft.

    Soft targets (soft > 0, head1_out (B, T, D) head 1's output): head i (1-based) at t then learns the mixture
    of soft times head 1's distribution at t+i-1 (over the same tokens), the distribution the verifier draws
    from there, and 1 - soft times its target; positions whose t+i-1 lies past the window are skipped.
    """
    n = model.cfg.n_future
    T = h.shape[1]
    ctx = model.attention_context(T)
    targets = trainable_targets(model, targets)
    rows = None
    if vocab is not None:
        rows = vocab.rows(model.output.weight)  # (K, D): frozen, so no gradient is lost by gathering
        index = vocab.index(targets)  # (B, n, T): index among the draft tokens; -1 outside or ignored
        targets = torch.where(index < 0, IGNORE_INDEX, index)
    teachers = None
    if soft > 0:
        if head1_out is None:
            raise ValueError("soft targets need head 1's output")
        targets = targets.clone()
        for i in range(1, n):
            targets[:, i, max(T - i, 0) :] = IGNORE_INDEX  # head 1's output there lies past the window
        teachers = {i: F.pad(head1_out[:, i:], (0, 0, 0, min(i, T))) for i in range(1, n)}  # (B, T, D) each
    counts = {i: int((targets[:, i] != IGNORE_INDEX).sum()) for i in range(1, n)}
    scales = {i: 1.0 / count for i, count in counts.items() if count}
    sums = head_losses_backward(model, h, ctx, targets, scales, chunk, inputs, rows, teachers, soft)
    means = {i: sums[i] / counts[i] for i in scales}
    per_head = [float("nan")] * n
    values = torch.stack(list(means.values())).tolist() if means else []  # the step's one host sync
    for i, value in zip(means, values, strict=True):
        per_head[i] = value
    return LossReport(sum(values), per_head)


def heads_backward(
    model: MultiTokenModel,
    window: torch.Tensor,
    mode: str,
    targets: str,
    cfg: TrainConfig,
    vocab: DraftVocab | None = None,
    soft: float = 0.0,
) -> LossReport:
    """Gradients of one batch of windows (B, context + n) into what `mode` trains; returns the loss report.

    Joint mode trains head 1 on the corpus whatever `targets` says (its self-distilled target would be
    its own argmax, a loss that teaches nothing); the draft heads get the chosen targets. `soft`: frozen
    mode's soft targets (`draft_heads_backward`).
    """
    n = model.cfg.n_future
    inputs, corpus = shift_targets(window, n, cfg.context)
    if mode == "frozen":
        labels = None if targets == "self" else corpus
        return frozen_heads_backward(model, inputs, labels, cfg.loss_chunk, vocab, soft)
    if targets == "self":
        with torch.no_grad():
            ctx = model.attention_context(inputs.shape[1])
            choice = head1_choice(model, model.heads[0](model.embed_and_trunk(inputs, ctx), ctx), cfg.loss_chunk)
        labels = self_distilled_targets(choice, n)
        labels[:, 0] = corpus[:, 0]
    else:
        labels = corpus
    return sequential_backward(model, inputs, labels, chunk=cfg.loss_chunk)


def heads_update(optimizer: torch.optim.Optimizer, report: LossReport, lr: float, cfg: TrainConfig) -> float:
    """Clip the gradients `report`'s backward left, step `optimizer` at `lr` (times each group's lr_scale).

    Returns the gradient norm before clipping. A non-finite loss drops the gradients and raises.
    """
    if not math.isfinite(report.total):
        optimizer.zero_grad(set_to_none=True)
        raise UserError(f"head training diverged (loss {report.total}); lower the learning rate")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


BF16_GAIN = 0.8  # "auto" takes bf16 when its trunk forward takes under this fraction of fp32's: a clear win only


@torch.no_grad()
def choose_precision(
    model: MultiTokenModel, inputs: torch.Tensor, precision: str = "auto", repeats: int = 3
) -> tuple[bool, dict[str, Any]]:
    """Whether head training runs under bf16 autocast, and what decided it (a JSON-ready dict).

    "fp32" and "bf16" decide themselves; "auto" is bf16 on CUDA, and on the CPU bf16 only if the trunk
    forward of `inputs` (B, T) takes under `BF16_GAIN` of its fp32 time here: the best of `repeats`
    interleaved runs each, after one warm-up each (bf16 matmuls are fast only on CPUs with bf16 units).
    """
    device = inputs.device
    if precision != "auto":
        return precision == "bf16", {"precision": precision, "chosen_by": "config"}
    if device.type == "cuda":
        return True, {"precision": "bf16", "chosen_by": "device"}
    ctx = model.attention_context(inputs.shape[1])
    best = {"fp32": math.inf, "bf16": math.inf}
    for attempt in range(repeats + 1):
        for name in best:
            t = time.perf_counter()
            with autocast_context(device, name == "bf16"):
                model.embed_and_trunk(inputs, ctx)
            if attempt:  # the first of each is a warm-up
                best[name] = min(best[name], time.perf_counter() - t)
    chosen = "bf16" if best["bf16"] < BF16_GAIN * best["fp32"] else "fp32"
    return chosen == "bf16", {"precision": chosen, "chosen_by": "timing", **{f"{k}_s": v for k, v in best.items()}}


# --------------------------------------------------------------------------------------------------
# frozen trunk features, computed once per window


REPLAY_BATCHES = 64  # the replay pool: the windows first drawn in about the last 64 batches


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    return np.random.default_rng((seed, 1, epoch)).permutation(n_windows)


def window_schedule(
    step: int, batch_size: int, n_windows: int, reuse: int = 1, seed: int = 0, pool_batches: int = REPLAY_BATCHES
) -> list[int]:
    """The windows of batch `step`, a pure function of its arguments: the schedule keeps no state.

    Windows are visited in seeded shuffled order, epoch after epoch. The replay pool is the last
    M = pool_batches * batch_size windows visited. The first batches are all new windows until the pool is
    full; from then on each batch takes batch_size / reuse new ones on average and fills the rest with uniform
    draws from the pool. So every window serves about `reuse` batches, spread over the pool's span, and the
    trunk runs on about 1 / reuse of what a step trains on. reuse = 1: plain epochs without replacement.
    """
    pool = pool_batches * batch_size

    def visited_before(s: int) -> int:
        return min(s * batch_size, pool + -(-(s * batch_size - pool) // reuse))  # B / R a step once it is full

    def visited(j: int) -> int:
        return int(_epoch_order(seed, j // n_windows, n_windows)[j % n_windows])

    lo, hi = visited_before(step), visited_before(step + 1)
    index = [visited(j) for j in range(lo, hi)]
    if len(index) < batch_size:
        first = max(0, hi - pool)
        draws = np.random.default_rng((seed, 0, step)).integers(first, hi, size=batch_size - len(index))
        index += [visited(int(j)) for j in draws]
    return index


class TrunkFeatures:
    """Batches of fixed windows of the training text with the frozen trunk's output, kept once computed.

    In frozen mode nothing upstream of the draft heads learns, so a window's trunk output is the same at
    every step. Keeping it takes the trunk forward out of every later step that draws the window again: with
    `reuse` R (`window_schedule`), each window serves about R batches, and the trunk, most of a fresh frozen
    step, runs once per R. Several passes over a small text, such as the model's own generations, skip it
    from the second pass on. The price is memory, context x dim floats per window (SmolLM2 on 60k tokens:
    0.14 GB), up to `max_bytes`; and fixed windows: they tile the text (stride `context`), where
    `WindowSampler` starts each at a random offset.
    When the memory is full, plain epochs (R = 1) keep the windows they have: the next epoch is a new
    shuffle, in which the oldest window is as likely to come soon as any. With replay, the oldest window is
    dropped for the new one: it has left the replay pool and returns only an epoch later.
    """

    def __init__(
        self,
        model: MultiTokenModel,
        tokens: np.ndarray,
        context: int,
        self_targets: bool,
        chunk: int = 1024,
        seed: int = 0,
        max_bytes: float = 4 * 2**30,
        reuse: int = 1,
        teacher: bool = False,
        pool_batches: int = REPLAY_BATCHES,
    ) -> None:
        """`self_targets`: head 1's self-distilled targets instead of the text's own next tokens. `teacher`: keep
        head 1's output too, for soft targets (twice the memory per window). `reuse` and `pool_batches`: the
        replay schedule (`window_schedule`)."""
        n = model.cfg.n_future
        self.starts = np.arange(0, max(len(tokens) - context - n + 1, 0), context)
        if not len(self.starts):
            raise UserError(f"{len(tokens)} tokens cannot fill one window of {context + n}")
        self.model, self.tokens, self.context = model, tokens, context
        self.self_targets, self.chunk, self.seed, self.reuse = self_targets, chunk, seed, reuse
        self.pool_batches = pool_batches
        self.teacher = teacher
        self.offsets = np.arange(context + n)
        window_bytes = (1 + teacher) * context * model.cfg.dim * model.tok_embeddings.weight.element_size()
        self.max_windows = int(max_bytes // window_bytes)
        # window -> trunk output (T, D), targets (n, T), inputs (T,) and, with `teacher`, head 1's output (T, D)
        self.kept: dict[int, tuple[torch.Tensor, ...]] = {}
        self.computed = 0  # windows the trunk ran on

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The batch of `step` (`window_schedule`): trunk output (B, T, D), targets (B, n, T), input tokens
        (B, T) of `batch_size` windows (the tokens for heads that read one) and, with `teacher`, head 1's output
        (B, T, D), else None."""
        index = window_schedule(step, batch_size, len(self), self.reuse, self.seed, self.pool_batches)
        found = {i: self.kept[i] for i in index if i in self.kept}
        missing = sorted(set(index) - set(found))
        if missing:  # one trunk forward over the windows not kept yet
            device = self.model.tok_embeddings.weight.device
            window = torch.from_numpy(self.tokens[self.starts[missing, None] + self.offsets].astype(np.int64))
            inputs, corpus = shift_targets(window.to(device), self.model.cfg.n_future, self.context)
            labels = None if self.self_targets else corpus
            h, targets, head1_out = frozen_trunk(self.model, inputs, labels, self.chunk, self.teacher)
            parts = (h, targets, inputs) + ((head1_out,) if self.teacher else ())
            self.computed += len(missing)
            for k, i in enumerate(missing):
                found[i] = tuple(part[k].clone() for part in parts)  # copies: no view pins the batch
                if self.max_windows and (len(self.kept) < self.max_windows or self.reuse > 1):
                    if len(self.kept) >= self.max_windows:  # full, with replay: the oldest has left the pool
                        del self.kept[next(iter(self.kept))]
                    self.kept[i] = found[i]
        kept = [found[i] for i in index]
        h, targets, inputs, *head1_out = (torch.stack([w[j] for w in kept]) for j in range(len(kept[0])))
        return h, targets, inputs, head1_out[0] if head1_out else None


# --------------------------------------------------------------------------------------------------
# the job


def train_heads(
    run_dir: Path,
    out_dir: Path,
    heads: HeadsConfig | None = None,
    train: TrainConfig | None = None,
    data: Sequence[str | Path] = (),
    cache_dir: Path | None = None,
    prompt_data: Sequence[Sequence[str | Path]] = (),
    on_step: Callable[[int, LossReport], None] | None = None,
    progress: bool = False,
    tensorboard: str | Path | None = None,
) -> dict[str, Any]:
    """Add heads to the model of `run_dir` (if it has fewer) and train them; write a new run to `out_dir`.

    `heads` defaults to `HeadsConfig()` (4 heads, frozen, self-distilled targets). `data`: corpus sources
    (files, folders, globs, JSON lines; default the standard library), tokenised with the run's tokenizer and
    split as in `train`. `prompt_data` (targets="generated"): groups of sources whose training splits give
    the generation prompts, an equal share each (`generate_self_data`); by default the corpus does, in
    proportion to its parts' sizes. `train` (default `default_heads_train_config()`) gives the batch, context, LR
    schedule and the budget (`max_steps`, `time_budget_s`, whichever ends first; generation counts).
    `out_dir` becomes a run directory (config, tokenizer, one checkpoint, metrics.jsonl) that `load_run`,
    `multitoken generate` and `multitoken eval` read. Returns a JSON-ready summary: steps, seconds,
    tokens trained on, first/last losses, held-out per-head loss and agreement with head 1 (the acceptance
    forecast), the generation cost for targets="generated", and in frozen mode how many windows' trunk
    output `TrunkFeatures` computed and kept, and the precision chosen (`choose_precision`). `progress`
    shows bars for the generation and the steps.
    `tensorboard`: also write the metrics there as TensorBoard scalars.
    """
    from multitoken.data.corpus import default_corpus_paths

    heads = heads or HeadsConfig()
    cfg = train or default_heads_train_config()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if (out_dir / "config.json").exists() or out_dir == run_dir:
        raise UserError(f"{out_dir} already holds a run; choose another output directory")
    torch.manual_seed(cfg.seed)
    source = load_run(run_dir)
    tokenizer = load_tokenizer(run_dir)
    if cfg.context > source.model.cfg.max_seq_len:
        raise UserError(f"context {cfg.context} exceeds the model's max_seq_len {source.model.cfg.max_seq_len}")
    if prompt_data and heads.targets != "generated":
        raise UserError("prompt data only serves targets='generated' (prompts for the model's own continuations)")
    sources = [str(s) for s in (data or default_corpus_paths())]
    cache_dir = Path(cache_dir) if cache_dir else out_dir.parent / ".multitoken-cache"
    bundle = prepare_data(sources, tokenizer, cache_dir, cfg.val_fraction)
    prompt_sources = [[str(s) for s in group] for group in prompt_data]
    prompt_pools = [prepare_data(group, tokenizer, cache_dir, cfg.val_fraction).store.train for group in prompt_sources]
    device = source.model.tok_embeddings.weight.device
    probe = torch.from_numpy(bundle.store.train[: cfg.context].astype(np.int64))[None].to(device)  # (1, T)
    model = add_heads(source.model, heads.n_future, heads.init, cfg.seed, heads.head_type, probe).train()
    n = model.cfg.n_future

    clock = budget_clock(cfg)  # every time below, generation included, on the clock the budget counts
    t0 = clock()
    summary: dict[str, Any] = {"run_dir": str(out_dir), "source_run": str(run_dir), **asdict(heads)}
    train_tokens: np.ndarray = bundle.store.train
    targets = heads.targets
    if targets == "generated":
        train_tokens = generate_self_data(
            model, prompt_pools or bundle.store.train, heads.generated_prompts, heads.prompt_tokens,
            heads.generated_tokens, tokenizer.eos_id, cfg.seed, heads.generation_batch, progress,
        )  # fmt: skip
        summary.update(generated_tokens_total=int(len(train_tokens)), generation_s=clock() - t0)
        targets = "corpus"  # on the model's own text, corpus targets are its own greedy choices
    vocab = None
    if heads.draft_vocab is not None:  # the tokens the heads see most, in their text and then in the corpus
        then = bundle.store.train if train_tokens is not bundle.store.train else None
        vocab = DraftVocab.most_frequent(train_tokens, model.cfg.vocab_size, heads.draft_vocab, then)
        summary.update(draft_vocab_coverage=vocab.coverage(train_tokens))
        vocab = vocab.to(model.tok_embeddings.weight.device)
    features = sampler = None
    if heads.mode == "frozen" and heads.trunk_cache_gib > 0:
        features = TrunkFeatures(
            model, train_tokens, cfg.context, targets == "self", cfg.loss_chunk, cfg.seed,
            heads.trunk_cache_gib * 2**30, heads.trunk_reuse, heads.soft_targets > 0,
        )  # fmt: skip
    else:
        sampler = WindowSampler(train_tokens, cfg.batch_size, cfg.context + n, cfg.seed)
    optimizer = build_heads_optimizer(model, heads.mode, cfg, heads.trunk_lr_scale)
    bf16, precision = choose_precision(model, probe, heads.precision)  # timed on the budget's clock
    summary.update(precision=precision)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    metrics: list[dict[str, Any]] = []
    board = None
    if tensorboard is not None:
        from multitoken.tensorboard import TensorBoardLog

        board = TensorBoardLog(tensorboard)

    def log(record: dict[str, Any]) -> None:
        metrics.append(record)
        if board is not None:
            board(record)

    def step_fn(step: int, lr: float) -> tuple[LossReport, float]:
        with autocast_context(device, bf16):
            if features is not None:
                h, labels, inputs, head1_out = features.batch(step, cfg.batch_size)
                report = draft_heads_backward(
                    model, h, labels, cfg.loss_chunk, vocab, inputs, head1_out, heads.soft_targets
                )
            else:
                window = sampler.sample(step)
                report = heads_backward(model, window, heads.mode, targets, cfg, vocab, heads.soft_targets)
        return report, heads_update(optimizer, report, lr, cfg)

    t_train = clock()
    loop = training_loop(
        step_fn, cfg, tokens_per_step=cfg.batch_size * cfg.context, elapsed_before=t_train - t0,  # generation counts
        log=log, after_step=on_step, progress=progress,
    )  # fmt: skip
    step, losses = loop.step, loop.losses
    train_s = clock() - t_train
    configure_trainable(model, "joint")  # leave an ordinary model behind (every parameter trainable)
    model.eval()
    final_eval = None
    if len(bundle.store.val) >= cfg.context + n:
        final_eval = evaluate(model, bundle.store.val, cfg.context, cfg.batch_size, cfg.eval_batches, cfg.loss_chunk)
        log({"step": step, "kind": "eval", **final_eval})
    if board is not None:
        board.close()
    summary.update(
        steps=step,
        seconds=clock() - t0,
        budget_clock=cfg.budget_clock,
        train_s=train_s,
        tokens_trained=step * cfg.batch_size * cfg.context,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        eval=final_eval,
    )
    if features is not None:  # computed > windows: some did not fit in trunk_cache_gib and ran again
        kept = {"windows": len(features), "kept": len(features.kept), "computed": features.computed}
        summary.update(trunk_features=kept)
    with staged_dir(out_dir) as tmp:
        write_run_config(
            tmp, model.cfg, train=cfg.to_dict(), heads=asdict(heads),
            data={"sources": sources, "prompt_sources": prompt_sources, "tokenizer": tokenizer.kind},
            source={"run": str(run_dir.resolve())},
        )  # fmt: skip
        tokenizer.save(tmp)
        save_checkpoint(tmp, step, model, state={"heads": summary})
        if vocab is not None:  # decoding with --draft-vocab reads it
            vocab.to("cpu").save(tmp / DRAFT_VOCAB_FILE, summary["draft_vocab_coverage"])
        (tmp / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return summary
