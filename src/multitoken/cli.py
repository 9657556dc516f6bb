"""`multitoken <subcommand>`: a thin layer over the library; all logic lives in the modules.

Every subcommand that produces machine-readable output prints a JSON document as its last stdout
line. User mistakes (a `UserError`) print one line on stderr and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multitoken.errors import UserError

DEFAULT_TIME_BUDGET_S = 240.0


def _print_json(data: dict[str, Any]) -> None:
    print(json.dumps(data))


# --------------------------------------------------------------------------------------------------
# train


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a multi-token prediction model",
        description="Train a multi-token prediction model. With no --data, trains on the running Python's "
        "standard library; with no budget flags, for a time budget of about 4 minutes.",
    )
    p.add_argument("--out", required=True, type=Path, help="run directory (created; or resumed with --resume)")
    p.add_argument("--data", nargs="+", action="extend", help="files, folders, globs or .jsonl files (text field)")
    p.add_argument("--preset", default="demo", help="model shape: tiny, small, demo, base, induction-*, 7b-n4")
    p.add_argument("--n-future", type=int, help="number of heads n (tokens predicted per position)")
    p.add_argument("--head-type", choices=["parallel", "causal", "anticausal", "linear"])
    p.add_argument("--n-layers", type=int, help="total blocks (trunk + heads)")
    p.add_argument("--dim", type=int)
    p.add_argument("--tokenizer", default="bytes", help="bytes, bpe (trained on the corpus) or a tokenizer.json")
    p.add_argument("--bpe-vocab", type=int, default=8192, help="vocabulary size when training a BPE tokenizer")
    p.add_argument("--time-budget", type=float, help="seconds of training (default 240 unless --max-steps)")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=256, help="input tokens per window")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30, help="warmup steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--loss-chunk", type=int, default=128, help="positions per cross-entropy chunk (0: none)")
    p.add_argument("--summed-loss", action="store_true", help="sum the head losses, one backward (no memory saving)")
    p.add_argument("--head-weights", type=float, nargs="+", help="loss weight of each head (default all 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--cache-dir", type=Path, help="where token stores are cached (default: beside --out)")
    p.add_argument("--sample-tokens", type=int, default=200, help="tokens of the final sample (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.config import TrainConfig, preset
    from multitoken.train import train

    time_budget = args.time_budget
    if time_budget is None and args.max_steps is None and not args.resume:
        time_budget = DEFAULT_TIME_BUDGET_S
    max_steps = args.max_steps if args.max_steps is not None else 1_000_000
    if args.resume:
        model_cfg = cfg = None
        overrides = {"max_steps": args.max_steps, "time_budget_s": time_budget}
        overrides = {k: v for k, v in overrides.items() if v is not None}
    else:
        model_cfg = preset(
            args.preset, n_future=args.n_future, head_type=args.head_type, n_layers=args.n_layers, dim=args.dim
        )
        cfg = TrainConfig(
            batch_size=args.batch_size,
            context=args.context,
            grad_accum=args.grad_accum,
            lr=args.lr,
            warmup_steps=args.warmup,
            max_steps=max_steps,
            time_budget_s=time_budget,
            eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every,
            loss_chunk=args.loss_chunk,
            sequential=not args.summed_loss,
            head_weights=args.head_weights,
            compile=args.compile,
            seed=args.seed,
        )
        overrides = None
        if cfg.context > model_cfg.max_seq_len:  # fail before tokenizing anything
            raise UserError(f"context {cfg.context} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    result = train(
        args.out,
        model_cfg,
        cfg,
        sources=args.data or (),
        tokenizer=args.tokenizer,
        bpe_vocab_size=args.bpe_vocab,
        cache_dir=args.cache_dir,
        resume=args.resume,
        progress=not args.quiet,
        overrides=overrides,
    )
    summary: dict[str, Any] = {
        "run_dir": str(result.run_dir),
        "steps": result.step,
        "seconds": round(result.seconds, 1),
        "tokens_seen": result.tokens_seen,
        "eval": result.final_eval,
    }
    if result.final_eval:
        print("\nheld-out evaluation per head:")
        print(_eval_table(result.final_eval))
    if args.sample_tokens > 0:
        summary["sample"] = _final_sample(args.out, args.sample_tokens)
    return summary


def _eval_table(ev: dict[str, Any]) -> str:
    unit = "bits/byte" if "bits_per_byte" in ev else "loss (nats)"
    values = ev.get("bits_per_byte", ev["loss"])
    rows = [f"{'head':>4}  {unit:>11}  {'top-1 acc':>9}  {'agrees w/ head 1':>16}"]
    for i, (v, acc, agr) in enumerate(zip(values, ev["accuracy"], ev["agreement_with_head1"], strict=True)):
        rows.append(f"{i + 1:>4}  {v:>11.3f}  {acc:>9.3f}  {agr:>16.3f}")
    return "\n".join(rows)


def _final_sample(run_dir: Path, n_tokens: int) -> dict[str, Any]:
    """Generate a code sample from the trained model and print it."""
    from multitoken.checkpoint import load_run
    from multitoken.data.tokenizers import load_tokenizer
    from multitoken.generate.autoregressive import generate

    run = load_run(run_dir)
    tok = load_tokenizer(run_dir)
    prompt = "def "
    ids = tok.encode(prompt)
    max_new = min(n_tokens, run.model.cfg.max_seq_len - len(ids) - 1)
    result = generate(run.model, [ids], max_new)
    text = prompt + tok.decode(result.tokens[0])
    print("\nsample (greedy):\n" + "-" * 60 + "\n" + text + "\n" + "-" * 60)
    return {"prompt": prompt, "text": text, "tokens_per_second": result.n_generated / max(result.seconds, 1e-9)}


# --------------------------------------------------------------------------------------------------
# eval


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="per-head loss and accuracy on held-out data (JSON)")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument(
        "--data", nargs="+", action="extend", help="evaluate on these files (default: the run's held-out split)"
    )
    p.add_argument("--batches", type=int, default=16, help="at most this many batches")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context", type=int, help="window length (default: the run's training context)")
    p.add_argument("--cache-dir", type=Path)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.checkpoint import load_run
    from multitoken.data.tokenizers import load_tokenizer
    from multitoken.train import bytes_per_token, evaluate, prepare_data

    run = load_run(args.run)
    tok = load_tokenizer(args.run)
    cache_dir = args.cache_dir or Path(args.run).parent / ".multitoken-cache"
    train_cfg = run.config.get("train", {})
    sources = args.data or run.config.get("data", {}).get("sources")
    if not sources:
        raise UserError(f"{args.run} records no data sources; pass --data")
    # With explicit --data every document is evaluated (all of it lands in the store's first split);
    # otherwise the run's own held-out split.
    val_fraction = 0.0 if args.data else train_cfg.get("val_fraction", 0.05)
    data = prepare_data(sources, tok, cache_dir, val_fraction)
    tokens = data.store.train if args.data else data.store.val
    context = args.context or min(train_cfg.get("context", 256), run.model.cfg.max_seq_len)
    bpt = bytes_per_token(tok, data.store)
    result = evaluate(run.model, tokens, context, args.batch_size, args.batches, 128, bpt)
    print(_eval_table(result), file=sys.stderr)
    return {"run": str(args.run), "step": run.state.get("step"), **result}


# --------------------------------------------------------------------------------------------------
# generate


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a run directory")
    p.add_argument("run", type=Path)
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--batch", type=Path, help="a file of prompts, one per line (JSON strings allowed)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-at-eos", action="store_true")
    p.add_argument("--stats", action="store_true", help="print a JSON line with decoding statistics")
    p.set_defaults(func=_cmd_generate)


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


def _cmd_generate(args: argparse.Namespace) -> dict[str, Any] | None:
    import torch

    from multitoken.checkpoint import load_run
    from multitoken.data.tokenizers import load_tokenizer
    from multitoken.generate.autoregressive import generate
    from multitoken.generate.sampling import SamplingConfig

    prompts = _read_prompts(args)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    run = load_run(args.run)
    tok = load_tokenizer(args.run)
    ids = [tok.encode(p) for p in prompts]
    gen = torch.Generator().manual_seed(args.seed)
    result = generate(run.model, ids, args.max_new_tokens, sampling, gen, tok.eos_id if args.stop_at_eos else None)
    for prompt, new in zip(prompts, result.tokens, strict=True):
        print(prompt + tok.decode(new))
    for b, reason in enumerate(result.stop_reasons):
        if reason == "context":
            print(
                f"note: prompt {b} reached the model's context limit ({run.model.cfg.max_seq_len} tokens)",
                file=sys.stderr,
            )
    if not args.stats:
        return None
    return {
        "decoder": "plain",
        "tokens_per_forward": result.n_generated / max(result.n_forwards, 1) / len(prompts),
        "tokens_per_second": result.n_generated / max(result.seconds, 1e-9),
        "n_forwards": result.n_forwards,
        "stop_reasons": result.stop_reasons,
        "generated_token_ids": result.tokens,
        **result.stats,
    }


# --------------------------------------------------------------------------------------------------
# import / export


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="import a Hugging Face Llama directory, a GGUF file or the official MTP release into a run directory",
    )
    p.add_argument("src", type=Path, help="model folder, .gguf file, or official-release folder (--layout meta)")
    p.add_argument("--out", required=True, type=Path, help="run directory to write")
    p.add_argument("--gguf", help="GGUF file name inside SRC")
    p.add_argument("--layout", choices=["hf", "meta"], default="hf")
    p.add_argument("--n-future", type=int, default=1, help="heads; heads 2..n start as copies of the last block")
    p.add_argument("--max-seq-len", type=int, help="context length to use (default: the model's)")
    p.add_argument("--allow-missing-tokenizer", action="store_true")
    p.set_defaults(func=_cmd_import)


def _cmd_import(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.interop.hf import import_to_run

    out = import_to_run(
        args.src,
        args.out,
        args.gguf,
        layout=args.layout,
        n_future=args.n_future,
        max_seq_len=args.max_seq_len,
        allow_missing_tokenizer=args.allow_missing_tokenizer,
    )
    return {"run_dir": str(out)}


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run as a Hugging Face Llama (next-token model) or the official layout")
    p.add_argument("run", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--format", choices=["hf", "meta"], default="hf")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.interop.hf import export_run

    return {"out": str(export_run(args.run, args.out, args.format)), "format": args.format}


# --------------------------------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multitoken",
        description="Multi-token prediction training and self-speculative decoding (Gloeckle et al., 2024).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_import(sub)
    _add_export(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out = args.func(args)
    except UserError as e:
        print(f"multitoken {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"multitoken {args.command}: interrupted", file=sys.stderr)
        return 130
    if out is not None:
        _print_json(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
