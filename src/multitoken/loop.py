"""The training loop, once, for pretraining (train.py), head training (heads.py) and the experiments.

What differs between them is the step: a function of (step, learning rate) that runs forward, backward and
the optimizer update and returns the loss report and gradient norm. The loop owns what they share: the
schedule (warmup + cosine over the step budget or the time budget, whichever ends first), the stop rule, the
metrics record of every step, the progress bar and the hooks that evaluate or checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from multitoken.config import UNBOUNDED_STEPS, TrainConfig
from multitoken.loss import LossReport

StepFn = Callable[[int, float], tuple[LossReport, float]]  # (step, lr) -> (loss report, gradient norm)
TOKENS_PER_S_WINDOW = 5.0  # seconds over which the logged throughput is averaged


@dataclass
class LoopResult:
    """Where the loop stopped: the step reached, the losses of the steps it ran and the seconds they took
    (plus the `elapsed_before` it was given)."""

    step: int
    elapsed_s: float
    losses: list[float] = field(default_factory=list)


def lr_at(progress: float, step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio * lr` as progress goes 0 -> 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def budget_clock(cfg: TrainConfig) -> Callable[[], float]:
    """The clock a time budget counts: wall seconds, or with `budget_clock="cpu"` this process's CPU seconds (all
    its threads), which a busy machine does not eat into: a CPU budget buys about the same training there."""
    return time.process_time if cfg.budget_clock == "cpu" else time.perf_counter


def training_loop(
    step_fn: StepFn,
    cfg: TrainConfig,
    *,
    tokens_per_step: int,
    start_step: int = 0,
    elapsed_before: float = 0.0,
    shared_clock: Callable[[float], float] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    after_step: Callable[[int, LossReport], None] | None = None,
    progress: bool = False,
) -> LoopResult:
    """Run `step_fn` from `start_step` until `cfg.max_steps`, or until `cfg.time_budget_s` has passed.

    elapsed_before: seconds already spent (a resumed run's, or generation before head training), counted
    against the time budget; every time is on `budget_clock(cfg)`. shared_clock(seconds): the seconds every
    process agrees on (rank 0's), so all stop at the same step with the same learning rate. log(record): each
    step's metrics record. after_step(step, report): runs after each step (evaluation, checkpoints, user hooks).
    An exception from the step ends the loop with the bar closed.
    """
    agree = shared_clock or (lambda seconds: seconds)
    clock = budget_clock(cfg)
    t0 = clock()
    # With a time budget alone the step count is unknown: the bar counts steps and the postfix shows the clock.
    bar = tqdm(
        total=None if cfg.max_steps >= UNBOUNDED_STEPS else cfg.max_steps,
        initial=start_step,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
    )
    step, losses = start_step, []
    window_t, window_tokens = t0, 0
    elapsed = elapsed_before
    try:
        while step < cfg.max_steps:
            fraction = step / cfg.max_steps
            if cfg.time_budget_s is not None:
                elapsed = agree(elapsed_before + clock() - t0)
                if elapsed >= cfg.time_budget_s:
                    break
                fraction = max(fraction, elapsed / cfg.time_budget_s)
            lr = lr_at(fraction, step, cfg)
            report, grad_norm = step_fn(step, lr)
            step += 1
            losses.append(report.total)
            window_tokens += tokens_per_step
            now = time.perf_counter()
            tok_s = window_tokens / max(now - window_t, 1e-9)
            if now - window_t > TOKENS_PER_S_WINDOW:
                window_t, window_tokens = now, 0
            if log is not None:
                log({"step": step, "kind": "train", "loss": report.total, "per_head": report.per_head, "lr": lr,
                     "grad_norm": grad_norm, "tokens_per_s": tok_s,
                     "elapsed_s": elapsed_before + clock() - t0})  # fmt: skip
            bar.update(1)
            budget = f"{elapsed:.0f}/{cfg.time_budget_s:.0f}s " if cfg.time_budget_s else ""
            losses_shown = " ".join(f"{x:.2f}" for x in report.per_head)
            bar.set_postfix_str(f"{budget}{tok_s:,.0f} tok/s loss/head {losses_shown}")
            if after_step is not None:
                after_step(step, report)
    finally:
        bar.close()
    return LoopResult(step, elapsed_before + clock() - t0, losses)
