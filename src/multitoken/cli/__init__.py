"""`multitoken <subcommand>`: a thin layer over the library, one module per subcommand; all logic lives in the
library's modules.

Every subcommand that produces machine-readable output prints a JSON document as its last stdout
line. User mistakes (a `UserError`) print one line on stderr and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from multitoken.cli import bench, calibrate, evaluate, experiment, generate, heads, interop, serve, train
from multitoken.cli.common import Parser, UsageError
from multitoken.errors import UserError

SUBCOMMANDS = (train, evaluate, generate, calibrate, bench, heads, experiment, interop, serve)
ALIASES = {("eval", "humaneval"): "eval-humaneval", ("eval", "mbpp"): "eval-mbpp"}  # as users spell them


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="multitoken",
        description="Multi-token prediction training and self-speculative decoding (Gloeckle et al., 2024).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if tuple(argv[:2]) in ALIASES:
        argv = [ALIASES[tuple(argv[:2])], *argv[2:]]
    try:
        if argv[:1] == ["lm-eval"]:  # the other arguments are lm-eval's, --help included: argparse never sees them
            args = argparse.Namespace(command="lm-eval", func=serve.run_lm_eval, lm_eval_args=argv[1:])
        else:
            args = parser.parse_args(argv)
    except UsageError as e:
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        out = args.func(args)
    except UserError as e:
        print(f"multitoken {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"multitoken {args.command}: interrupted", file=sys.stderr)
        return 130
    if out is not None:
        print(json.dumps(out))
    return 0
