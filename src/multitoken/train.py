"""The training loop as functions: data, optimizer, schedule, step, evaluation, save and resume.

No module-level state. `train` runs a whole job; its parts (`build_optimizer`, `lr_at`, `train_step`,
`evaluate`) are usable on their own. On the CPU in fp32 a resumed run reproduces the losses of an
uninterrupted one exactly: batches depend only on (seed, step), and the optimizer state and step are
restored from the checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from multitoken.checkpoint import (
    latest_checkpoint,
    load_optimizer,
    load_weights,
    read_checkpoint_state,
    read_run_config,
    save_checkpoint,
    write_run_config,
)
from multitoken.config import ModelConfig, TrainConfig
from multitoken.data.corpus import load_corpus
from multitoken.data.dataset import (
    TokenStore,
    WindowSampler,
    build_or_load_token_store,
    iter_eval_windows,
    split_documents,
)
from multitoken.data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer
from multitoken.errors import UserError
from multitoken.loss import LossReport, evaluate_heads, sequential_backward, shift_targets, summed_loss
from multitoken.model import MultiTokenModel

METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(UserError):
    """A non-finite loss: the run stops and its last good checkpoint stays in place."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere (exactness on the CPU)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# --------------------------------------------------------------------------------------------------
# data


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    store: TokenStore
    n_documents: int
    n_skipped: int


def prepare_data(
    sources: Sequence[str | Path],
    tokenizer: str | Tokenizer,
    cache_dir: Path,
    val_fraction: float,
    bpe_vocab_size: int = 8192,
) -> DataBundle:
    """Load the corpus, build (or reuse) the tokenizer, and tokenise once into a memory-mapped store.

    A BPE tokenizer is trained on the training split only, so validation text stays unseen.
    """
    corpus = load_corpus(sources)
    if isinstance(tokenizer, str):
        train_docs, _ = split_documents(corpus.documents, val_fraction)
        tokenizer = build_tokenizer(tokenizer, (d.text for d in train_docs), bpe_vocab_size)
    store = build_or_load_token_store(corpus, tokenizer, cache_dir, val_fraction)
    return DataBundle(tokenizer, store, len(corpus.documents), corpus.n_skipped)


# --------------------------------------------------------------------------------------------------
# optimisation


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=False)


def lr_at(progress: float, step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio * lr` as progress goes 0 -> 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def train_step(
    model: MultiTokenModel,
    optimizer: torch.optim.Optimizer,
    sampler: WindowSampler,
    step: int,
    cfg: TrainConfig,
    lr: float,
    device: torch.device,
) -> tuple[LossReport, float]:
    """One optimizer step over `grad_accum` micro-batches; returns the mean loss report and grad norm.

    Raises TrainingDiverged before touching the weights if the loss is not finite.
    """
    n = model.cfg.n_future
    total, per_head = 0.0, [0.0] * n
    for micro in range(cfg.grad_accum):
        window = sampler.sample(step * cfg.grad_accum + micro).to(device)  # (B, context + n_future)
        inputs, targets = shift_targets(window, n)
        with autocast_context(device):
            if cfg.sequential:
                report = sequential_backward(
                    model, inputs, targets, cfg.head_weights, cfg.loss_chunk, loss_scale=1.0 / cfg.grad_accum
                )
            else:
                loss, report = summed_loss(model, inputs, targets, cfg.head_weights)
                (loss / cfg.grad_accum).backward()
        total += report.total / cfg.grad_accum
        per_head = [a + b / cfg.grad_accum for a, b in zip(per_head, report.per_head, strict=True)]
    if not math.isfinite(total):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"loss became {total} at step {step}; stopped, the last good checkpoint is kept")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return LossReport(total, per_head), float(grad_norm)


# --------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(
    model: MultiTokenModel,
    tokens: np.ndarray,
    context: int,
    batch_size: int = 8,
    max_batches: int | None = 8,
    chunk: int = 128,
    bytes_per_token: float | None = None,
) -> dict[str, Any]:
    """Per-head loss, top-1 accuracy and agreement with head 1 on held-out windows.

    `bytes_per_token` (1.0 for byte models) adds bits per byte. Agreement of head i is how often its
    top-1 equals what head 1 predicts i-1 positions later: a forecast of self-speculative acceptance.
    """
    was_training = model.training
    model.eval()
    device = model.tok_embeddings.weight.device
    n = model.cfg.n_future
    sums: dict[str, torch.Tensor] = {}
    for window in iter_eval_windows(tokens, batch_size, context + n, max_batches):
        inputs, targets = shift_targets(window.to(device), n)
        with autocast_context(device):
            stats = evaluate_heads(model, inputs, targets, chunk)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0) + v
    model.train(was_training)
    loss = (sums["loss_sum"] / sums["count"]).tolist()
    result: dict[str, Any] = {
        "loss": loss,
        "accuracy": (sums["correct"] / sums["count"]).tolist(),
        "agreement_with_head1": (sums["agree"] / sums["agree_count"]).tolist(),
        "tokens": int(sums["count"][0]),
    }
    if bytes_per_token:
        result["bits_per_byte"] = [x / math.log(2) / bytes_per_token for x in loss]
    return result


def bytes_per_token(tokenizer: Tokenizer, store: TokenStore, sample_tokens: int = 200_000) -> float:
    """Average UTF-8 bytes per token on the validation split (1.0 for byte models), for bits per byte."""
    if tokenizer.kind == "bytes":
        return 1.0
    ids = store.val[:sample_tokens].tolist()
    return len(tokenizer.decode(ids).encode("utf-8")) / max(1, len(ids))


# --------------------------------------------------------------------------------------------------
# the job


@dataclass
class RunResult:
    run_dir: Path
    step: int
    seconds: float
    tokens_seen: int
    final_eval: dict[str, Any] | None
    losses: list[float] = field(default_factory=list)


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics logged after `step` by a run that died before checkpointing them."""
    path = run_dir / METRICS_FILE
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def train(
    run_dir: Path,
    model_cfg: ModelConfig | None,
    cfg: TrainConfig | None,
    sources: Sequence[str | Path] = (),
    tokenizer: str = "bytes",
    bpe_vocab_size: int = 8192,
    cache_dir: Path | None = None,
    resume: bool = False,
    device: torch.device | None = None,
    progress: bool = True,
    on_step: Callable[[int, LossReport], None] | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunResult:
    """Train a model in `run_dir` (new, or resumed from its latest checkpoint).

    On resume the run's own config.json is used; `overrides` may change the budget fields
    (max_steps, time_budget_s). `sources` empty means the standard library of the running Python.
    """
    run_dir = Path(run_dir)
    device = device or default_device()
    cache_dir = Path(cache_dir) if cache_dir else run_dir.parent / ".multitoken-cache"
    if resume:
        saved = read_run_config(run_dir)
        model_cfg = ModelConfig.from_dict(saved["model"])
        cfg = TrainConfig.from_dict({**saved["train"], **(overrides or {})})
        sources, tokenizer_src = saved["data"]["sources"], load_tokenizer(run_dir)
    else:
        assert model_cfg is not None and cfg is not None
        if (run_dir / "config.json").exists():
            raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        from multitoken.data.corpus import default_corpus_paths

        sources = [str(s) for s in (sources or default_corpus_paths())]
        tokenizer_src = tokenizer
    data = prepare_data(sources, tokenizer_src, cache_dir, cfg.val_fraction, bpe_vocab_size)
    if model_cfg.vocab_size != data.tokenizer.vocab_size:
        model_cfg = model_cfg.replace(vocab_size=data.tokenizer.vocab_size)
    if cfg.context > model_cfg.max_seq_len:
        raise UserError(f"context {cfg.context} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    window = cfg.context + model_cfg.n_future
    sampler = WindowSampler(data.store.train, cfg.batch_size, window, cfg.seed)
    can_eval = len(data.store.val) >= window

    torch.manual_seed(cfg.seed)
    model = MultiTokenModel(model_cfg)
    model.reset_parameters(seed=cfg.seed)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    start_step, elapsed_before = 0, 0.0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            state = read_checkpoint_state(ckpt)
            load_weights(ckpt, model)
            load_optimizer(ckpt, optimizer, state)
            start_step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
            torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        _trim_metrics(run_dir, start_step)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        data.tokenizer.save(run_dir)
        write_run_config(
            run_dir,
            model_cfg,
            train=cfg.to_dict(),
            data={
                "sources": list(map(str, sources)),
                "tokenizer": data.tokenizer.kind,
                "n_documents": data.n_documents,
            },
        )
    if cfg.compile:
        for block in [*model.trunk, *model.heads]:
            block.compile()

    bpt = bytes_per_token(data.tokenizer, data.store) if can_eval else None
    tokens_per_step = cfg.batch_size * cfg.context * cfg.grad_accum

    saved_step = start_step if resume else -1

    def checkpoint(step: int) -> None:
        nonlocal saved_step
        elapsed = elapsed_before + time.perf_counter() - t0
        state = {
            "elapsed_s": elapsed,
            "torch_rng": torch.get_rng_state().tolist(),
            "tokens_seen": step * tokens_per_step,
        }
        save_checkpoint(run_dir, step, model, optimizer, state)
        saved_step = step

    def run_eval(step: int) -> dict[str, Any]:
        result = evaluate(model, data.store.val, cfg.context, cfg.batch_size, cfg.eval_batches, cfg.loss_chunk, bpt)
        _append_metrics(run_dir, {"step": step, "kind": "eval", **result})
        return result

    t0 = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True)
    step, last_eval, losses = start_step, None, []
    window_t, window_tokens = time.perf_counter(), 0
    while step < cfg.max_steps:
        elapsed = elapsed_before + time.perf_counter() - t0
        if cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s:
            break
        progress_frac = step / cfg.max_steps
        if cfg.time_budget_s is not None:
            progress_frac = max(progress_frac, elapsed / cfg.time_budget_s)
        lr = lr_at(progress_frac, step, cfg)
        try:
            report, grad_norm = train_step(model, optimizer, sampler, step, cfg, lr, device)
        except TrainingDiverged:
            bar.close()
            raise
        step += 1
        losses.append(report.total)
        window_tokens += tokens_per_step
        now = time.perf_counter()
        tok_s = window_tokens / max(now - window_t, 1e-9)
        if now - window_t > 5:
            window_t, window_tokens = now, 0
        record = {
            "step": step,
            "kind": "train",
            "loss": report.total,
            "per_head": report.per_head,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tok_s,
        }
        _append_metrics(run_dir, record)
        bar.update(1)
        bar.set_postfix_str(f"{tok_s:,.0f} tok/s loss " + " ".join(f"{x:.2f}" for x in report.per_head))
        if on_step is not None:
            on_step(step, report)
        if can_eval and step % cfg.eval_every == 0:
            last_eval = run_eval(step)
        if step % cfg.checkpoint_every == 0:
            checkpoint(step)
    bar.close()
    total_elapsed = elapsed_before + time.perf_counter() - t0
    if step != saved_step or latest_checkpoint(run_dir) is None:
        checkpoint(step)
    if can_eval and (last_eval is None or step % cfg.eval_every):
        last_eval = run_eval(step)
    return RunResult(run_dir, step, total_elapsed, step * tokens_per_step, last_eval, losses)
