"""`multitoken import`, `export` and `consolidate`: models in and out of run directories."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from multitoken.argtypes import COUNT, NATURAL
from multitoken.cli.common import Subparsers, check_out_dir


def add(sub: Subparsers) -> None:
    _add_import(sub)
    _add_export(sub)
    _add_consolidate(sub)


def _add_import(sub: Subparsers) -> None:
    p = sub.add_parser(
        "import",
        help="import a Hugging Face Llama directory, a GGUF file or the official MTP release into a run directory",
    )
    p.add_argument("src", type=Path, help="model folder, .gguf file, or official-release folder (--layout meta)")
    p.add_argument("--out", required=True, type=Path, help="run directory to write")
    p.add_argument("--gguf", help="GGUF file name inside SRC (default: the only .gguf there, if SRC is a folder)")
    p.add_argument(
        "--layout",
        choices=["hf", "meta"],
        default="hf",
        help="hf: a Hugging Face folder or GGUF; meta: the official release",
    )
    p.add_argument("--n-future", type=COUNT, default=1, help="heads; heads 2..n start as copies of the last block")
    p.add_argument("--max-seq-len", type=COUNT, help="context length to use (default: the model's)")
    p.add_argument("--allow-missing-tokenizer", action="store_true", help="import the weights even without a tokenizer")
    p.add_argument(
        "--dtype", choices=["auto", "fp32", "bf16"], default="auto",
        help="the run's weights: auto keeps the source's (bf16 stays bf16; fp16 and GGUF become fp32, exactly)",
    )  # fmt: skip
    p.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.checkpoint import resolve_dtype
    from multitoken.interop.hf import import_to_run

    check_out_dir(args.out)
    out = import_to_run(
        args.src,
        args.out,
        args.gguf,
        layout=args.layout,
        n_future=args.n_future,
        max_seq_len=args.max_seq_len,
        allow_missing_tokenizer=args.allow_missing_tokenizer,
        dtype=None if args.dtype == "auto" else resolve_dtype(args.dtype),
    )
    return {"run_dir": str(out)}


def _add_export(sub: Subparsers) -> None:
    p = sub.add_parser("export", help="export a run as a Hugging Face Llama (next-token model) or the official layout")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--out", required=True, type=Path, help="folder to write")
    p.add_argument(
        "--format", choices=["hf", "meta"], default="hf", help="hf: a transformers Llama; meta: the official release"
    )
    p.add_argument(
        "--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="the exported weights: auto keeps the run's"
    )
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.checkpoint import resolve_dtype
    from multitoken.interop.hf import export_run

    check_out_dir(args.out)
    dtype = None if args.dtype == "auto" else resolve_dtype(args.dtype)
    return {"out": str(export_run(args.run, args.out, args.format, dtype)), "format": args.format}


def _add_consolidate(sub: Subparsers) -> None:
    p = sub.add_parser("consolidate", help="gather a sharded (FSDP2) checkpoint into model.safetensors")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--step", type=NATURAL, help="checkpoint step (default: the latest)")
    p.set_defaults(func=run_consolidate)


def run_consolidate(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.dcp import consolidate

    return {"checkpoint": str(consolidate(args.run, args.step))}
