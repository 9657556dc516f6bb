"""`multitoken experiment NAME`: one of the paper's small-scale findings reproduced, with a report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from multitoken.argtypes import COUNT, NATURAL
from multitoken.cli.common import Subparsers


def add(sub: Subparsers) -> None:
    from multitoken.experiments import EXPERIMENTS

    p = sub.add_parser("experiment", help="reproduce one of the paper's small-scale findings, with a report")
    p.add_argument("name", choices=list(EXPERIMENTS), help="; ".join(f"{k}: {v}" for k, v in EXPERIMENTS.items()))
    p.add_argument(
        "--full", action="store_true",
        help="the full setting, a GPU or a long CPU run (default: the CPU setting, about 20 min on 2 cores, which "
        "decides by its rule)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, help="report folder (default docs/results/NAME)")
    p.add_argument("--seeds", type=NATURAL, nargs="+", help="seeds of each arm (default: the setting's)")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
        help="change one field of the setting, e.g. --set steps=2000 (repeatable; default: none)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=COUNT, help="CPU threads (default: torch's; on a shared machine 1 avoids OpenMP stalls)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from multitoken.experiments import run_experiment
    from multitoken.experiments.common import parse_overrides

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.overrides)
    return run_experiment(args.name, "full" if args.full else "cpu", args.out, args.seeds, overrides)
