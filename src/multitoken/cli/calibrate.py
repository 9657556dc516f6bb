"""`multitoken calibrate`: fit a draft tree (and a draft vocabulary) to a run's held-out text."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from multitoken.argtypes import COUNT
from multitoken.cli.common import (
    Subparsers,
    add_decode_device,
    add_sampling,
    check_out_file,
    decode_device,
    set_decode_threads,
)


def add(sub: Subparsers) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure each head's top-k acceptance on held-out data and build a draft tree (RUN/tree.json)",
    )
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument(
        "--budget", type=budget, default=16,
        help="tree nodes per forward, the root included; auto: time decoding with trees of 2-32 nodes on this "
        "machine and keep the one with the highest expected speed",
    )  # fmt: skip
    p.add_argument("--max-rank", type=COUNT, default=4, help="candidates considered per head")
    p.add_argument(
        "--windows", type=COUNT, default=32,
        help="windows to measure on, from the first half of the held-out text (`bench generate` takes its "
        "prompts from the second)",
    )  # fmt: skip
    p.add_argument(
        "--on", choices=["generated", "data"], default="generated",
        help="generated: the model's own continuations of held-out prompts (greedy, or sampled with "
        "--temperature/--top-k/--top-p), the text decoding reads; data: the held-out text itself",
    )  # fmt: skip
    p.add_argument(
        "--prompt-tokens", type=COUNT, default=32,
        help="prompt length of each generated window (--on generated), and of the timing prompt (--budget auto)",
    )  # fmt: skip
    p.add_argument(
        "--draft-vocab", type=COUNT, metavar="K",
        help="also restrict drafts to the K tokens most frequent in the training split (RUN/draft_vocab.json); "
        "the tree is then calibrated with it (default: none)",
    )  # fmt: skip
    p.add_argument(
        "--data", nargs="+", action="extend", help="measure on these files (default: the run's held-out split)"
    )
    p.add_argument("--cache-dir", type=Path, help="where token stores are cached (default: beside the run)")
    p.add_argument("--out", type=Path, help="where to write the tree (default: RUN/tree.json)")
    add_sampling(p)  # a tree for sampling: acceptance of independent draws at these settings
    add_decode_device(p)
    p.add_argument("--threads", type=COUNT, help="CPU threads (default 1, as decoding uses)")
    p.set_defaults(func=run)


def budget(value: str) -> int | str:
    """--budget: a positive number of nodes, or "auto"."""
    if value == "auto":
        return value
    try:
        budget = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of nodes or 'auto', got {value!r}") from None
    if budget < 1:
        raise argparse.ArgumentTypeError(f"a tree needs at least 1 node, got {budget}")
    return budget


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import asdict

    from multitoken.checkpoint import load_run
    from multitoken.eval.heldout import load_heldout, split_heldout
    from multitoken.generate.autotune import fit_tree
    from multitoken.generate.draft_vocab import DRAFT_VOCAB_FILE
    from multitoken.generate.sampling import SamplingConfig
    from multitoken.generate.tree import TREE_FILE, save_tree

    check_out_file(args.out)
    set_decode_threads(args.threads)
    device, dtype = decode_device(args)
    run = load_run(args.run, device, dtype)
    held = load_heldout(args.run, run.config, args.data, args.cache_dir)
    length = min(run.config.get("train", {}).get("context", 256), run.model.cfg.max_seq_len)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    fitted = fit_tree(
        run.model, split_heldout(held.tokens)[0],  # the second half is for `bench generate`'s prompts
        length=length, on=args.on, windows=args.windows, max_rank=args.max_rank, prompt_tokens=args.prompt_tokens,
        budget=args.budget, draft_vocab=args.draft_vocab, vocab_tokens=held.train_tokens, sampling=sampling,
        seed=args.seed,
    )  # fmt: skip
    report: dict[str, Any] = {}
    if fitted.draft_vocab is not None:
        coverage = fitted.draft_vocab.coverage(held.tokens)
        fitted.draft_vocab.save(Path(args.run) / DRAFT_VOCAB_FILE, coverage)
        report = {"draft_vocab": str(Path(args.run) / DRAFT_VOCAB_FILE), "draft_vocab_size": fitted.draft_vocab.size,
                  "draft_vocab_coverage": coverage}  # fmt: skip
    if fitted.budget_choice:
        print(f"tree budget by expected speed ({device}, {args.dtype}; a plain decoding step: "
              f"{fitted.plain_step_s * 1e3:.2f} ms):", file=sys.stderr)  # fmt: skip
        for c in fitted.budget_choice:
            print(f"  {c['budget']:>3} nodes: {c['expected_tokens_per_forward']:.2f} tokens/forward, "
                  f"{c['seconds'] * 1e3:.2f} ms, expected {c['expected_speedup']:.2f}x"
                  + ("  <- chosen" if c["chosen"] else ""), file=sys.stderr)  # fmt: skip
    out = args.out or Path(args.run) / TREE_FILE
    save_tree(fitted.tree, out, fitted.calibration)
    columns = "candidate rank" if sampling.greedy else "draw tried"
    print(f"head acceptance (rows: heads 2..n, columns: {columns} 1..{args.max_rank}):", file=sys.stderr)
    for i, row in enumerate(fitted.calibration.acceptance.tolist()):
        print(f"  head {i + 2}: " + " ".join(f"{x:.3f}" for x in row), file=sys.stderr)
    return {"tree": str(out), "on": args.on, "sampling": asdict(sampling), **fitted.report(), **report}
