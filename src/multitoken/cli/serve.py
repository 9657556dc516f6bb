"""`multitoken serve` (an OpenAI-compatible HTTP server) and `multitoken lm-eval` (the evaluation harness)."""

from __future__ import annotations

import argparse
from pathlib import Path

from multitoken.argtypes import COUNT, NATURAL, NONNEGATIVE
from multitoken.cli.common import Subparsers, add_decode_device, decode_device, set_decode_threads


def add(sub: Subparsers) -> None:
    _add_serve(sub)
    _add_lm_eval(sub)


def _add_serve(sub: Subparsers) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (needs the serve extra)",
        description="Serve a model with OpenAI's HTTP API: POST /v1/completions and /v1/chat/completions "
        '("stream": true for server-sent events), GET /v1/models and /health. Self-speculative decoding, greedy '
        "at temperature 0 and lossless sampling otherwise; concurrent requests with the same options are decoded "
        "as one batch.",
    )
    p.add_argument("path", type=Path, help="run directory, Hugging Face folder or .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=NATURAL, default=8000, help="port to listen on (0: a free one)")
    add_decode_device(p)
    p.add_argument(
        "--decoding", choices=["plain", "chain", "tree"],
        help="default: the tree if the model has one, else the chain of heads if it has heads, else plain",
    )  # fmt: skip
    p.add_argument(
        "--batch-window-ms", type=NONNEGATIVE, default=10.0,
        help="how long a request waits for others to share its batch",
    )  # fmt: skip
    p.add_argument(
        "--max-batch", type=COUNT, default=8, help="sequences decoded together at most; also the prompts of one request"
    )
    p.add_argument("--threads", type=COUNT, help="CPU threads (default 1: decode steps are too small to split)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from multitoken.serve import serve  # a one-line UserError when the serve extra is missing

    set_decode_threads(args.threads)
    device, dtype = decode_device(args)
    serve(
        args.path, host=args.host, port=args.port, device=device, dtype=dtype, decoding=args.decoding,
        batch_window_ms=args.batch_window_ms, max_batch=args.max_batch,
    )  # fmt: skip


def _add_lm_eval(sub: Subparsers) -> None:
    sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the model `--model multitoken` registered; every argument is lm-eval's "
        "(needs the lm-eval extra)",
        add_help=False,  # `multitoken lm-eval --help` is lm-eval's help
    )


def run_lm_eval(args: argparse.Namespace) -> None:
    from multitoken.eval.lm_eval import main as lm_eval_main  # a one-line UserError when lm-eval is missing

    lm_eval_main(args.lm_eval_args)
