"""`multitoken generate`: text from a model, plainly or self-speculatively, streamed or as JSON statistics."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

from multitoken.argtypes import COUNT, NATURAL
from multitoken.cli.common import (
    Subparsers,
    add_decode_device,
    add_sampling,
    add_tree_flags,
    decode_device,
    resolve_draft_vocab,
    resolve_tree,
    set_decode_threads,
)
from multitoken.errors import UserError


def add(sub: Subparsers) -> None:
    p = sub.add_parser("generate", help="generate text from a model")
    p.add_argument("run", type=Path, help="run directory, Hugging Face folder or .gguf file")
    p.add_argument("--prompt", help="prompt text (default: none; this or --batch)")
    p.add_argument("--batch", type=Path, help="a file of prompts, one per line, JSON strings allowed (default: none)")
    p.add_argument("--max-new-tokens", type=NATURAL, default=200, help="tokens to generate at most")
    add_sampling(p)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    p.add_argument("--speculative", action="store_true", help="self-speculative decoding (a chain of heads by default)")
    p.add_argument("--heads-used", type=COUNT, help="heads k used by speculative decoding (1..n; default all)")
    add_tree_flags(
        p,
        tree_help="draft with a tree (alone: RUN/tree.json from `multitoken calibrate`; default: no tree)",
        vocab_help="draft only among a draft vocabulary's tokens (alone: RUN/draft_vocab.json; default: all tokens)",
    )
    p.add_argument("--threads", type=COUNT, help="CPU threads (default 1: decode steps are too small to split)")
    p.add_argument(
        "--compile", action="store_true",
        help="run the decode step under torch.compile (the first steps pay for compiling; pays off on long outputs)",
    )  # fmt: skip
    p.add_argument(
        "--cuda-graphs", action="store_true",
        help="replay the decode step from CUDA graphs (CUDA, greedy): one launch per step instead of one per kernel",
    )  # fmt: skip
    add_decode_device(p)
    p.add_argument("--stream", action="store_true", help="print the continuation as it is decoded (one --prompt)")
    p.add_argument("--stats", action="store_true", help="print a JSON line with decoding statistics")
    p.set_defaults(func=run)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if (args.prompt is None) == (args.batch is None):
        raise UserError("give exactly one of --prompt or --batch")
    if args.prompt is not None:
        return [args.prompt]
    if not args.batch.is_file():
        raise UserError(f"prompt file {args.batch} does not exist")
    prompts = []
    for line in args.batch.read_text().splitlines():
        if line.strip():
            prompts.append(json.loads(line) if line.lstrip().startswith('"') else line)
    if not prompts:
        raise UserError(f"prompt file {args.batch} has no prompts")
    return prompts


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    from multitoken.api import load

    set_decode_threads(args.threads)
    prompts = _read_prompts(args)
    speculative = args.speculative or args.tree is not None or args.heads_used is not None
    speculative = speculative or args.draft_vocab is not None
    device, dtype = decode_device(args)
    lm = load(args.run, device, dtype)
    lm.tree = resolve_tree(args.run, args.tree)
    lm.draft_vocab = resolve_draft_vocab(args.run, args.draft_vocab)
    stream = None
    if args.stream:
        if len(prompts) != 1:
            raise UserError("--stream prints one continuation as it is decoded; give one --prompt")
        print(prompts[0], end="", flush=True)
        stream = partial(print, end="", flush=True)
    decoding = ("tree" if lm.tree is not None else "chain") if speculative else "plain"
    outputs = lm.generate(
        prompts, max_new_tokens=args.max_new_tokens, decoding=decoding, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_at_eos=not args.ignore_eos,
        draft_vocab=lm.draft_vocab is not None, heads_used=args.heads_used, compile_step=args.compile,
        cuda_graphs=args.cuda_graphs, stream=stream,
    )  # fmt: skip
    for b, out in enumerate(outputs):
        print("" if stream is not None else out.prompt + out.text)
        if out.stop_reason == "context":
            limit = lm.model.cfg.max_seq_len
            print(f"note: prompt {b} reached the model's context limit ({limit} tokens)", file=sys.stderr)
    if not args.stats:
        return None
    stats = outputs[0].stats
    return {
        "decoder": decoding, **stats,
        "generated_token_ids": [o.token_ids for o in outputs], "stop_reasons": [o.stop_reason for o in outputs],
        "tokens_per_forward_per_prompt": [o.tokens_per_forward for o in outputs],
    }  # fmt: skip
