"""What every subcommand shares: the parser classes, output checks, and the decoding flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from multitoken.argtypes import COUNT, NATURAL, NONNEGATIVE, PROBABILITY
from multitoken.errors import UserError

Subparsers = argparse._SubParsersAction  # what each module's `add(sub)` registers its subcommand on


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends each option's default to its help, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or not action.option_strings
            or any(default is x for x in (None, False, argparse.SUPPRESS))
        ):
            return text
        if default == []:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows every option's default and whose errors are one line (subcommands
    inherit the class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        """Raise the mistake for `main` to print as one line (argparse would print the usage first)."""
        raise UsageError(self.prog, message)


class UsageError(UserError):
    """A command line that argparse cannot parse: `prog` names the (sub)command."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{message} (see {prog} --help)")
        self.prog = prog


def check_out_dir(path: Path) -> None:
    """Refuse, before any work, an output directory that names a file."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file, not a directory; choose another --out")


def check_out_file(path: Path | None) -> None:
    """Refuse, before any work, an output file whose folder does not exist or that names a directory."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"--out {path}: folder {path.parent} does not exist")


def eval_table(ev: dict[str, Any]) -> str:
    """Per-head held-out loss (bits per byte where known), top-1 accuracy and agreement with head 1."""
    unit = "bits/byte" if "bits_per_byte" in ev else "loss (nats)"
    values = ev.get("bits_per_byte", ev["loss"])
    rows = [f"{'head':>4}  {unit:>11}  {'top-1 acc':>9}  {'agrees w/ head 1':>16}"]
    for i, (v, acc, agr) in enumerate(zip(values, ev["accuracy"], ev["agreement_with_head1"], strict=True)):
        rows.append(f"{i + 1:>4}  {v:>11.3f}  {acc:>9.3f}  {agr:>16.3f}")
    return "\n".join(rows)


def add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--temperature", type=NONNEGATIVE, default=0.0, help="0 = greedy; above 0: sampling (lossless when speculative)"
    )
    p.add_argument("--top-k", type=COUNT, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=PROBABILITY, help="sample within the top-p probability mass (default: 1, all)")
    p.add_argument("--seed", type=NATURAL, default=0, help="seed of the sampler")


def add_decoding(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--decoding", choices=["plain", "chain", "tree"],
        help="plain, or self-speculative with a chain of heads or the calibrated tree "
        "(default: the tree if the model has one, else the chain if it has heads, else plain)",
    )  # fmt: skip


def add_decode_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and KV cache dtype")


def decode_device(args: argparse.Namespace) -> tuple[str, Any]:
    """The device and dtype that `--device` and `--dtype` ask for."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available")
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]


def set_decode_threads(threads: int | None) -> None:
    """CPU threads for decoding: as asked, else one.

    A decode step multiplies a handful of rows by each weight matrix: splitting that across threads
    gains little, and OpenMP's barriers collapse when another process holds a core (measured on 2 cores,
    demo model, 200 tokens: 1 thread 2.9 s plain and 1.1 s speculative; 2 threads beside one busy
    process 12 s and 57 s).
    """
    import torch

    torch.set_num_threads(threads or 1)


def add_tree_flags(p: argparse.ArgumentParser, tree_help: str, vocab_help: str) -> None:
    """--tree [TREE_JSON] and --draft-vocab [VOCAB_JSON]: alone, each names the run's own file."""
    p.add_argument("--tree", nargs="?", const="", metavar="TREE_JSON", help=tree_help)
    p.add_argument("--draft-vocab", nargs="?", const="", metavar="VOCAB_JSON", help=vocab_help)


def resolve_tree(run_dir: Path, tree_arg: str | None):
    """None for a chain; else the tree named by --tree (empty: the run's own calibrated tree.json)."""
    from multitoken.generate.tree import TREE_FILE, load_tree

    if tree_arg is None:
        return None
    return load_tree(Path(tree_arg) if tree_arg else Path(run_dir) / TREE_FILE)


def resolve_draft_vocab(run_dir: Path, vocab_arg: str | None):
    """None for the full vocabulary; else the draft vocabulary named by --draft-vocab (empty: the run's own)."""
    from multitoken.generate.draft_vocab import DRAFT_VOCAB_FILE, DraftVocab

    if vocab_arg is None:
        return None
    return DraftVocab.load(Path(vocab_arg) if vocab_arg else Path(run_dir) / DRAFT_VOCAB_FILE)
