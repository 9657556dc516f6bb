"""`multitoken train`: the main job. Train, print the held-out evaluation, then decode held-out code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from multitoken.argtypes import COUNT, NATURAL, NONNEGATIVE, POSITIVE
from multitoken.cli.common import Subparsers, check_out_dir, eval_table, set_decode_threads
from multitoken.config import BUDGET_CLOCKS, DEFAULT_PRESET, PRESETS, DemoConfig, ModelConfig, TrainConfig
from multitoken.errors import UserError
from multitoken.head_kinds import HEAD_TYPES

TRAIN = TrainConfig()  # the defaults of `multitoken train` are the config's

# TrainConfig field -> the train flag that sets it (the flag's default is the field's).
TRAIN_FLAGS = {
    "batch_size": "batch_size", "context": "context", "grad_accum": "grad_accum", "lr": "lr",
    "warmup_steps": "warmup", "eval_every": "eval_every", "checkpoint_every": "checkpoint_every",
    "loss_chunk": "loss_chunk", "head_weights": "head_weights", "compile": "compile", "seed": "seed",
    "budget_clock": "budget_clock",
}  # fmt: skip
MODEL_FLAGS = ("n_future", "head_type", "n_layers", "dim")


def add(sub: Subparsers) -> None:
    p = sub.add_parser(
        "train",
        help="train a multi-token prediction model",
        description="Train a multi-token prediction model. With no --data it trains on the running Python's "
        f"standard library; with no budget flags it takes {TRAIN.max_steps} steps, then decodes held-out code.",
    )
    p.add_argument("--out", required=True, type=Path, help="run directory (created; or resumed with --resume)")
    p.add_argument(
        "--data", nargs="+", action="extend",
        help="files, folders, globs or .jsonl files, text field (default: this Python's standard library)",
    )  # fmt: skip
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"model shape: {', '.join(PRESETS)}")
    p.add_argument(
        "--n-future", type=COUNT, help="number of heads n, tokens predicted per position (default: the preset's)"
    )
    p.add_argument("--head-type", choices=HEAD_TYPES, help=f"head architecture (default: {HEAD_TYPES[0]})")
    p.add_argument("--n-layers", type=COUNT, help="total blocks, trunk + heads (default: the preset's)")
    p.add_argument("--dim", type=COUNT, help="model width (default: the preset's)")
    p.add_argument("--tokenizer", default="bpe", help="bpe (trained on the corpus), bytes, or a tokenizer.json")
    p.add_argument("--bpe-vocab", type=COUNT, default=4096, help="vocabulary size when training a BPE tokenizer")
    p.add_argument("--time-budget", type=POSITIVE, help="stop after this many seconds of training (default: none)")
    p.add_argument(
        "--budget-clock", choices=BUDGET_CLOCKS, default=TRAIN.budget_clock,
        help="what --time-budget counts: wall seconds, or this process's CPU seconds (fair on a shared machine)",
    )  # fmt: skip
    p.add_argument(
        "--max-steps", type=COUNT,
        help=f"optimizer steps (default: {TRAIN.max_steps}; with --time-budget alone, the time decides)",
    )  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--batch-size", type=COUNT, default=TRAIN.batch_size, help="windows per step")
    p.add_argument("--context", type=COUNT, default=TRAIN.context, help="input tokens per window")
    p.add_argument("--grad-accum", type=COUNT, default=TRAIN.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=POSITIVE, default=TRAIN.lr, help="peak learning rate (AdamW, warmup then cosine)")
    p.add_argument("--warmup", type=NATURAL, default=TRAIN.warmup_steps, help="warmup steps")
    p.add_argument("--seed", type=NATURAL, default=TRAIN.seed, help="seed of the weights and of the data order")
    p.add_argument("--eval-every", type=COUNT, default=TRAIN.eval_every, help="steps between held-out evaluations")
    p.add_argument("--checkpoint-every", type=COUNT, default=TRAIN.checkpoint_every, help="steps between checkpoints")
    p.add_argument(
        "--loss-chunk", type=NATURAL, default=TRAIN.loss_chunk, help="tokens per cross-entropy chunk (0: none)"
    )  # fmt: skip
    p.add_argument("--summed-loss", action="store_true", help="sum the head losses, one backward (no memory saving)")
    p.add_argument("--head-weights", type=NONNEGATIVE, nargs="+", help="loss weight of each head (default all 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (falls back to eager on failure)")
    p.add_argument(
        "--parallel", choices=["auto", "ddp", "fsdp", "none"], default="auto",
        help="under torchrun: ddp, fsdp (FSDP2), or auto: fsdp from 1B parameters, ddp below",
    )  # fmt: skip
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute trunk blocks in backward")
    p.add_argument(
        "--cache-dir", type=Path, help="where token stores are cached (default: .multitoken-cache beside --out)"
    )
    p.add_argument(
        "--sample-tokens", type=NATURAL, default=DemoConfig.new_tokens,
        help="tokens generated per held-out prompt after training (0: no decoding)",
    )  # fmt: skip
    p.add_argument(
        "--config", type=Path,
        help="a JSON or YAML file of {model: {preset or ModelConfig fields}, train: {TrainConfig fields}}; "
        "flags that differ from their defaults override it (default: none)",
    )  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--tensorboard", type=Path, help="also write the metrics here for TensorBoard (default: none)")
    p.add_argument("--peak-tflops", type=POSITIVE, help="the hardware's peak, for MFU in TensorBoard (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, flag_default=p.get_default)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    from multitoken.pretrain import train

    check_out_dir(args.out)
    if args.resume:
        model_cfg = cfg = None
        overrides = {"max_steps": args.max_steps, "time_budget_s": args.time_budget}
        overrides = {k: v for k, v in overrides.items() if v is not None}
    else:
        model_cfg, cfg = train_configs(args)
        model_cfg.check_fits_memory()  # before tokenizing anything
        overrides = None
        if args.print_config:
            print(json.dumps({"model": model_cfg.to_dict(), "train": cfg.to_dict()}, indent=2))
            return None
        if cfg.context > model_cfg.max_seq_len:  # fail before tokenizing anything
            raise UserError(f"context {cfg.context} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
        if args.sample_tokens and DemoConfig.prompt_tokens + args.sample_tokens >= model_cfg.max_seq_len:
            raise UserError(
                f"--sample-tokens {args.sample_tokens} + a {DemoConfig.prompt_tokens}-token prompt exceed the model's "
                f"max_seq_len {model_cfg.max_seq_len}; ask for fewer"
            )
    result = train(
        args.out, model_cfg, cfg, sources=args.data or (), tokenizer=args.tokenizer, bpe_vocab_size=args.bpe_vocab,
        cache_dir=args.cache_dir, resume=args.resume, progress=not args.quiet, overrides=overrides,
        parallel=args.parallel, activation_checkpointing=args.activation_checkpointing, tensorboard=args.tensorboard,
        peak_tflops=args.peak_tflops,
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports and samples
        return None
    summary: dict[str, Any] = {
        "run_dir": str(result.run_dir),
        "steps": result.step,
        "seconds": round(result.seconds, 1),
        "tokens_seen": result.tokens_seen,
        "eval": result.final_eval,
    }
    if result.final_eval:
        print("\nheld-out evaluation per head:")
        print(eval_table(result.final_eval))
    if args.sample_tokens > 0:
        summary["sample"] = show_samples(args.out, args.sample_tokens)
    return summary


def show_samples(run_dir: Path, new_tokens: int) -> dict[str, Any]:
    """Print held-out code continued plain, with the chain and with calibrated trees (demo.py); return the result."""
    from multitoken.demo import format_showcase, showcase_run

    set_decode_threads(None)
    result = showcase_run(run_dir, new_tokens)
    print("\n" + format_showcase(result))
    if any(r["exact"] < 1 for r in result["greedy"]["decoders"].values()):  # fp32 on the CPU must agree
        print("note: speculative output differs from plain greedy decoding (reduced precision?)", file=sys.stderr)
    return result


def train_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs of `train`: the dataclasses' defaults, then the --config file's fields,
    then the flags that differ from their defaults. Without --max-steps or --time-budget the step count is the
    config's, so every machine trains the same model."""
    from multitoken.config import UNBOUNDED_STEPS, preset

    file = read_config_file(args.config) if args.config else {}
    changed = {dest for dest in (*TRAIN_FLAGS.values(), "preset") if getattr(args, dest) != args.flag_default(dest)}
    model_fields = dict(file.get("model", {}))
    name = args.preset if "preset" in changed else model_fields.pop("preset", args.preset)
    model_fields.pop("preset", None)
    model_fields.update({k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None})
    fields = dict(file.get("train", {}))
    fields.update({field: getattr(args, flag) for field, flag in TRAIN_FLAGS.items() if flag in changed})
    if args.summed_loss:
        fields["sequential"] = False
    if args.time_budget is not None:
        fields["time_budget_s"] = args.time_budget
    if args.max_steps is not None:
        fields["max_steps"] = args.max_steps
    elif args.time_budget is not None:
        fields["max_steps"] = UNBOUNDED_STEPS  # the time decides
    where = f"{args.config}: " if args.config else ""
    try:
        return preset(name, **model_fields), TrainConfig(**fields)
    except TypeError as e:  # an unknown field, or a value of the wrong type
        raise UserError(f"{where}{e}".replace("__init__() ", "")) from None


def read_config_file(path: Path) -> dict[str, Any]:
    """A --config file: JSON, or YAML (safe loader) for .yaml/.yml; a mapping of model and train sections."""
    if not path.is_file():
        raise UserError(f"no config file at {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    yaml_file = path.suffix in (".yaml", ".yml")
    try:
        if yaml_file:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ImportError:
        raise UserError("YAML configs need PyYAML: pip install pyyaml (or write the config as JSON)") from None
    except Exception as e:  # any parse error of the user's file is theirs to fix
        raise UserError(f"{path} is not valid {'YAML' if yaml_file else 'JSON'}: {e}") from None
    if not isinstance(data, dict) or set(data) - {"model", "train"}:
        raise UserError(f"{path}: expected a mapping with 'model' and/or 'train' sections")
    for section in ("model", "train"):
        if not isinstance(data.get(section, {}), dict):
            raise UserError(f"{path}: the {section!r} section must be a mapping of field names to values")
    return data
