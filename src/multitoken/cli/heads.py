"""`multitoken heads`: add multi-token heads to a (pretrained) run and train them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from multitoken.argtypes import COUNT, FRACTION, NONNEGATIVE, POSITIVE
from multitoken.cli.common import Subparsers, check_out_dir
from multitoken.config import BUDGET_CLOCKS, INITS, MODES, PRECISIONS, TARGETS, HeadsConfig, default_heads_train_config
from multitoken.head_kinds import HEAD_TYPES

HEADS, HEADS_TRAIN = HeadsConfig(), default_heads_train_config()  # the defaults of `multitoken heads`


def add(sub: Subparsers) -> None:
    p = sub.add_parser(
        "heads",
        help="add multi-token heads to a (pretrained) run and train them; writes a new run directory",
    )
    p.add_argument("run", type=Path, help="run directory, e.g. one made by `multitoken import`")
    p.add_argument("--out", required=True, type=Path, help="run directory to write")
    p.add_argument(
        "--n-future", type=COUNT, default=HEADS.n_future,
        help="heads in total, the next-token head included",
    )  # fmt: skip
    p.add_argument(
        "--mode",
        choices=MODES,
        default=HEADS.mode,
        help="frozen: train only the new heads (the verifier stays the original model)",
    )
    p.add_argument(
        "--targets",
        choices=TARGETS,
        default=HEADS.targets,
        help="corpus text, head 1's own predictions on it (self), or the model's own continuations",
    )
    p.add_argument(
        "--head-type", choices=HEAD_TYPES,
        help="the new heads' kind (default: the run's own if it has heads, else parallel); mtp: token-conditioned "
        "modules, each reading the previous depth and the next token",
    )  # fmt: skip
    p.add_argument("--init", choices=INITS, default=HEADS.init, help="new heads: copies of the last block")
    p.add_argument(
        "--trunk-lr-scale", type=NONNEGATIVE, default=HEADS.trunk_lr_scale,
        help="joint mode: LR of the pretrained parts",
    )  # fmt: skip
    p.add_argument(
        "--generated-prompts", type=COUNT, default=HEADS.generated_prompts,
        help="targets=generated: corpus prompts continued",
    )  # fmt: skip
    p.add_argument(
        "--generated-tokens", type=COUNT, default=HEADS.generated_tokens,
        help="targets=generated: greedy tokens per prompt",
    )  # fmt: skip
    p.add_argument(
        "--generation-batch", type=COUNT, default=HEADS.generation_batch,
        help="targets=generated: prompts decoded at once",
    )  # fmt: skip
    p.add_argument(
        "--draft-vocab", type=COUNT, metavar="K",
        help="frozen mode: heads 2..n learn only the K most frequent tokens of their text (OUT/draft_vocab.json; "
        "decode with --draft-vocab; default: the full vocabulary)",
    )  # fmt: skip
    p.add_argument(
        "--trunk-cache-gib",
        type=NONNEGATIVE,
        default=HEADS.trunk_cache_gib,
        help="frozen mode: keep each training window's trunk output, up to this many GiB (0: recompute every step)",
    )
    p.add_argument(
        "--soft-targets", type=FRACTION, default=HEADS.soft_targets,
        help="frozen mode: weight of head 1's distribution in the draft heads' targets (0: its token only)",
    )  # fmt: skip
    p.add_argument(
        "--trunk-reuse", type=COUNT, default=HEADS.trunk_reuse,
        help="frozen mode: batches each window's kept trunk output serves (a replay pool of recent windows)",
    )  # fmt: skip
    p.add_argument(
        "--precision", choices=PRECISIONS, default=HEADS.precision,
        help="bf16 autocast or fp32 steps; auto: bf16 if it times clearly faster on this machine",
    )  # fmt: skip
    p.add_argument("--data", nargs="+", action="extend", help="corpus (default: this Python's standard library)")
    p.add_argument(
        "--prompt-data",
        nargs="+",
        action="append",
        metavar="SOURCE",
        help="targets=generated: draw the prompts from these sources' training split; repeat the flag for "
        "groups that get an equal share each, say code, then prose (default: --data)",
    )
    p.add_argument(
        "--time-budget", type=POSITIVE, default=HEADS_TRAIN.time_budget_s,
        help="seconds of training, generation of targets=generated included",
    )  # fmt: skip
    p.add_argument(
        "--budget-clock", choices=BUDGET_CLOCKS, default=HEADS_TRAIN.budget_clock,
        help="what --time-budget counts: wall seconds, or this process's CPU seconds (fair on a shared machine)",
    )  # fmt: skip
    p.add_argument("--max-steps", type=COUNT, help="optimizer steps at most (default: the time budget alone decides)")
    p.add_argument("--batch-size", type=COUNT, default=HEADS_TRAIN.batch_size, help="windows per step")
    p.add_argument("--context", type=COUNT, default=HEADS_TRAIN.context, help="tokens per window")
    p.add_argument("--lr", type=POSITIVE, default=HEADS_TRAIN.lr, help="peak learning rate")
    p.add_argument("--tensorboard", type=Path, help="also write the metrics here for TensorBoard (default: none)")
    p.add_argument("--cache-dir", type=Path, help="where token stores are cached (default: beside --out)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.heads import train_heads

    check_out_dir(args.out)
    heads = HeadsConfig(
        n_future=args.n_future, mode=args.mode, targets=args.targets, init=args.init,
        trunk_lr_scale=args.trunk_lr_scale, generated_prompts=args.generated_prompts,
        generated_tokens=args.generated_tokens, generation_batch=args.generation_batch, draft_vocab=args.draft_vocab,
        trunk_cache_gib=args.trunk_cache_gib, trunk_reuse=args.trunk_reuse, soft_targets=args.soft_targets,
        head_type=args.head_type, precision=args.precision,
    )  # fmt: skip
    budget = {"max_steps": args.max_steps} if args.max_steps else {}
    train = default_heads_train_config(
        batch_size=args.batch_size, context=args.context, lr=args.lr, time_budget_s=args.time_budget,
        budget_clock=args.budget_clock, **budget,
    )  # fmt: skip
    data, prompts = args.data or (), args.prompt_data or ()
    return train_heads(
        args.run, args.out, heads, train, data, args.cache_dir, prompts, progress=not args.quiet,
        tensorboard=args.tensorboard,
    )  # fmt: skip
