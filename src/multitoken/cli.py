"""`multitoken <subcommand>`: a thin layer over the library; all logic lives in the modules.

Every subcommand that produces machine-readable output prints a JSON document as its last stdout
line. User mistakes (a `UserError`) print one line on stderr and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from multitoken.argtypes import COUNT, NATURAL, NONNEGATIVE, POSITIVE, PROBABILITY
from multitoken.config import (
    DEFAULT_PRESET,
    INITS,
    MODES,
    PRESETS,
    TARGETS,
    DemoConfig,
    HeadsConfig,
    ModelConfig,
    TrainConfig,
    default_heads_train_config,
)
from multitoken.errors import UserError

# `multitoken bench NAME`: modules with add_arguments(parser) and run(args) -> dict.
BENCHES: dict[str, str] = {"memory": "multitoken.bench.memory", "train": "multitoken.bench.train_speed"}


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


def _check_out_dir(path: Path) -> None:
    """Refuse, before any work, an output directory that names a file."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file, not a directory; choose another --out")


def _check_out_file(path: Path | None) -> None:
    """Refuse, before any work, an output file whose folder does not exist or that names a directory."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"--out {path}: folder {path.parent} does not exist")


def _print_json(data: dict[str, Any]) -> None:
    print(json.dumps(data))


# --------------------------------------------------------------------------------------------------
# train


TRAIN = TrainConfig()  # the defaults of `multitoken train` are the config's
HEADS, HEADS_TRAIN = HeadsConfig(), default_heads_train_config()  # and those of `multitoken heads`


def _add_train(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--head-type",
        choices=["parallel", "causal", "anticausal", "linear"],
        help="head architecture (default: parallel)",
    )
    p.add_argument("--n-layers", type=COUNT, help="total blocks, trunk + heads (default: the preset's)")
    p.add_argument("--dim", type=COUNT, help="model width (default: the preset's)")
    p.add_argument("--tokenizer", default="bpe", help="bpe (trained on the corpus), bytes, or a tokenizer.json")
    p.add_argument("--bpe-vocab", type=COUNT, default=4096, help="vocabulary size when training a BPE tokenizer")
    p.add_argument("--time-budget", type=POSITIVE, help="stop after this many seconds of training (default: none)")
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
    p.set_defaults(func=_cmd_train, flag_default=p.get_default)


def _cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.pretrain import train

    _check_out_dir(args.out)
    time_budget = args.time_budget
    if args.resume:
        model_cfg = cfg = None
        overrides = {"max_steps": args.max_steps, "time_budget_s": time_budget}
        overrides = {k: v for k, v in overrides.items() if v is not None}
    else:
        model_cfg, cfg = _train_configs(args)
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
        parallel=args.parallel,
        activation_checkpointing=args.activation_checkpointing,
        tensorboard=args.tensorboard,
        peak_tflops=args.peak_tflops,
    )
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
        print(_eval_table(result.final_eval))
    if args.sample_tokens > 0:
        summary["sample"] = _final_sample(args.out, args.sample_tokens)
    return summary


# TrainConfig field -> the train flag that sets it (the flag's default is the field's).
TRAIN_FLAGS = {
    "batch_size": "batch_size", "context": "context", "grad_accum": "grad_accum", "lr": "lr",
    "warmup_steps": "warmup", "eval_every": "eval_every", "checkpoint_every": "checkpoint_every",
    "loss_chunk": "loss_chunk", "head_weights": "head_weights", "compile": "compile", "seed": "seed",
}  # fmt: skip
MODEL_FLAGS = ("n_future", "head_type", "n_layers", "dim")


def _train_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs of `train`: the dataclasses' defaults, then the --config file's fields,
    then the flags that differ from their defaults. Without --max-steps or --time-budget the step count is the
    config's, so every machine trains the same model."""
    from multitoken.config import UNBOUNDED_STEPS, preset

    file = _read_config_file(args.config) if args.config else {}
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


def _read_config_file(path: Path) -> dict[str, Any]:
    """A --config file: JSON, or YAML (safe loader) for .yaml/.yml; a mapping of model and train sections."""
    if not path.is_file():
        raise UserError(f"no config file at {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ImportError:
        raise UserError("YAML configs need PyYAML: pip install pyyaml (or write the config as JSON)") from None
    except Exception as e:  # any parse error of the user's file is theirs to fix
        raise UserError(f"{path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {e}") from None
    if not isinstance(data, dict) or set(data) - {"model", "train"}:
        raise UserError(f"{path}: expected a mapping with 'model' and/or 'train' sections")
    for section in ("model", "train"):
        if not isinstance(data.get(section, {}), dict):
            raise UserError(f"{path}: the {section!r} section must be a mapping of field names to values")
    return data


def _eval_table(ev: dict[str, Any]) -> str:
    unit = "bits/byte" if "bits_per_byte" in ev else "loss (nats)"
    values = ev.get("bits_per_byte", ev["loss"])
    rows = [f"{'head':>4}  {unit:>11}  {'top-1 acc':>9}  {'agrees w/ head 1':>16}"]
    for i, (v, acc, agr) in enumerate(zip(values, ev["accuracy"], ev["agreement_with_head1"], strict=True)):
        rows.append(f"{i + 1:>4}  {v:>11.3f}  {acc:>9.3f}  {agr:>16.3f}")
    return "\n".join(rows)


def _final_sample(run_dir: Path, new_tokens: int) -> dict[str, Any]:
    """Held-out code continued plain, with the chain and with calibrated trees, greedy and sampled (demo.py)."""
    from multitoken.checkpoint import load_run
    from multitoken.demo import decode_showcase, format_showcase
    from multitoken.eval.heldout import load_heldout, split_heldout

    _set_decode_threads(None)
    run = load_run(run_dir)
    held = load_heldout(run_dir, run.config)
    cfg = DemoConfig(new_tokens=new_tokens)
    held_out = len(held.tokens) > 4 * cfg.prompt_tokens
    tokens = held.tokens if held_out else held.train_tokens  # a tiny corpus has no held-out split to speak of
    source = "held-out" if held_out else "training-text (the corpus has no held-out split)"
    calibration_tokens, evaluation_tokens = split_heldout(tokens)
    result = decode_showcase(run.model, held.tokenizer, calibration_tokens, evaluation_tokens, run_dir, cfg, source)
    print("\n" + format_showcase(result))
    if any(r["exact"] < 1 for r in result["greedy"]["decoders"].values()):  # fp32 on the CPU must agree
        print("note: speculative output differs from plain greedy decoding (reduced precision?)", file=sys.stderr)
    return result


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--temperature", type=NONNEGATIVE, default=0.0, help="0 = greedy; above 0: sampling (lossless when speculative)"
    )
    p.add_argument("--top-k", type=COUNT, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=PROBABILITY, help="sample within the top-p probability mass (default: 1, all)")
    p.add_argument("--seed", type=NATURAL, default=0, help="seed of the sampler")


def _add_decode_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and KV cache dtype")


def _decode_device(args: argparse.Namespace) -> tuple[str, Any]:
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


def _set_decode_threads(threads: int | None) -> None:
    """CPU threads for decoding: as asked, else one.

    A decode step multiplies a handful of rows by each weight matrix: splitting that across threads
    gains little, and OpenMP's barriers collapse when another process holds a core (measured on 2 cores,
    demo model, 200 tokens: 1 thread 2.9 s plain and 1.1 s speculative; 2 threads beside one busy
    process 12 s and 57 s).
    """
    import torch

    torch.set_num_threads(threads or 1)


# --------------------------------------------------------------------------------------------------
# eval


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="per-head loss and accuracy on held-out data (JSON); `eval humaneval RUN`, `eval mbpp RUN` for code",
    )
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument(
        "--data", nargs="+", action="extend", help="evaluate on these files (default: the run's held-out split)"
    )
    p.add_argument("--batches", type=COUNT, default=16, help="at most this many batches")
    p.add_argument("--batch-size", type=COUNT, default=8, help="windows per batch")
    p.add_argument("--context", type=COUNT, help="window length (default: the run's training context)")
    p.add_argument("--cache-dir", type=Path, help="where token stores are cached (default: beside the run)")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.checkpoint import load_run
    from multitoken.eval.heldout import load_heldout
    from multitoken.pretrain import evaluate

    run = load_run(args.run)
    held = load_heldout(args.run, run.config, args.data, args.cache_dir)
    context = args.context or min(run.config.get("train", {}).get("context", 256), run.model.cfg.max_seq_len)
    result = evaluate(run.model, held.tokens, context, args.batch_size, args.batches, 1024, held.bytes_per_token)
    print(_eval_table(result), file=sys.stderr)
    return {"run": str(args.run), "step": run.state.get("step"), **result}


def _add_humaneval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-humaneval",
        help="HumanEval pass@k, completions run in a sandbox (also spelled `multitoken eval humaneval RUN`)",
    )
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--n-samples", type=COUNT, default=1, help="completions per problem")
    p.add_argument("--k", type=COUNT, nargs="+", default=[1], help="report pass@k for these k")
    p.add_argument("--limit", type=COUNT, help="only the first N problems (default: all 164)")
    p.add_argument("--max-new-tokens", type=NATURAL, default=256, help="tokens per completion at most")
    p.add_argument("--temperature", type=NONNEGATIVE, default=0.0, help="0 = greedy (use > 0 with --n-samples > 1)")
    p.add_argument("--top-p", type=PROBABILITY, help="sample within the top-p probability mass (default: 1, all)")
    p.add_argument("--seed", type=NATURAL, default=0, help="seed of the sampler")
    p.add_argument("--plain", action="store_true", help="plain decoding instead of self-speculative")
    p.add_argument("--timeout", type=POSITIVE, default=5.0, help="seconds per program")
    p.add_argument("--out", type=Path, help="write the full report (per-problem results) here as JSON (default: none)")
    p.set_defaults(func=_cmd_humaneval)


def _cmd_humaneval(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from multitoken.checkpoint import atomic_write_text, load_run
    from multitoken.data.tokenizers import load_tokenizer
    from multitoken.eval.humaneval import evaluate_humaneval
    from multitoken.generate.autoregressive import generate
    from multitoken.generate.sampling import SamplingConfig
    from multitoken.generate.speculative import speculative_generate

    _check_out_file(args.out)  # before the evaluation runs, not after
    _set_decode_threads(None)
    run = load_run(args.run)
    tok = load_tokenizer(args.run)
    sampling = SamplingConfig(args.temperature, None, args.top_p)
    gen = torch.Generator().manual_seed(args.seed)
    limit = run.model.cfg.max_seq_len
    totals = {"tokens": 0, "forwards": 0, "seconds": 0.0}

    def complete(prompt: str, n: int) -> list[str]:
        ids = tok.encode(prompt)[-(limit - 1) :]  # keep the end of an over-long prompt: that is where code goes on
        max_new = min(args.max_new_tokens, limit - len(ids))
        prompts = [ids] * n
        if args.plain:
            result = generate(run.model, prompts, max_new, sampling=sampling, generator=gen, eos_id=tok.eos_id)
            forwards = result.n_forwards * n
        else:
            result = speculative_generate(
                run.model, prompts, max_new, sampling=sampling, generator=gen, eos_id=tok.eos_id
            )
            forwards = result.n_generated / result.stats["tokens_per_forward"]
        totals["tokens"] += result.n_generated
        totals["forwards"] += forwards
        totals["seconds"] += result.seconds
        return [tok.decode([t for t in new if t != tok.eos_id]) for new in result.tokens]

    report = evaluate_humaneval(complete, args.n_samples, args.k, limit=args.limit, timeout_s=args.timeout)
    if args.out:
        atomic_write_text(args.out, report.to_json())
    print(" ".join(f"{k}={v:.3f}" for k, v in report.pass_at_k.items()), file=sys.stderr)
    return {
        "run": str(args.run),
        "problems": len(report.results),
        "n_samples": args.n_samples,
        **report.pass_at_k,
        "decoder": "plain" if args.plain else "self-speculative",
        "tokens_per_forward": totals["tokens"] / max(totals["forwards"], 1),
        "tokens_per_second": totals["tokens"] / max(totals["seconds"], 1e-9),
        "sandbox": report.isolation,
    }


def _add_mbpp(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-mbpp",
        help="MBPP pass@k, 3-shot, completions run in a sandbox (also spelled `multitoken eval mbpp RUN`)",
    )
    p.add_argument("run", type=Path, help="run directory, Hugging Face Llama folder or .gguf file")
    p.add_argument("--data", type=Path, required=True, help="mbpp.jsonl or sanitized-mbpp.json (Google's release)")
    p.add_argument("--samples", "--n-samples", type=COUNT, default=1, help="completions per task")
    p.add_argument("--k", type=COUNT, nargs="+", default=[1], help="report pass@k for these k")
    p.add_argument("--limit", type=COUNT, help="only the first N of the chosen tasks (default: all of them)")
    p.add_argument("--task-ids", type=COUNT, nargs="+", help="evaluate these task ids (default: the test split)")
    p.add_argument(
        "--shots", type=int, choices=range(4), default=3, help="few-shot examples in each prompt, from tasks 2, 3, 4"
    )
    p.add_argument("--challenge-tests", action="store_true", help="run challenge_test_list too (full file)")
    p.add_argument("--max-new-tokens", type=NATURAL, default=256, help="tokens per completion at most")
    _add_sampling(p)
    p.add_argument(
        "--decoding", choices=["plain", "chain", "tree"],
        help="plain, or self-speculative with a chain of heads or the calibrated tree "
        "(default: the tree if the run has one, else the chain, else plain)",
    )  # fmt: skip
    _add_decode_device(p)
    p.add_argument("--timeout", type=POSITIVE, default=5.0, help="seconds per program")
    p.add_argument(
        "--out", type=Path,
        help="write the report here as JSON, and the samples beside it as NAME.samples.jsonl (default: none)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_mbpp)


def _cmd_mbpp(args: argparse.Namespace) -> dict[str, Any]:
    import zlib

    from multitoken.api import load
    from multitoken.checkpoint import atomic_write_text
    from multitoken.eval import mbpp
    from multitoken.eval.humaneval import check_sample_counts, samples_jsonl

    _check_out_file(args.out)  # before the evaluation runs, not after
    check_sample_counts(args.samples, args.k)
    if args.samples > 1 and args.temperature == 0:
        raise UserError(f"--samples {args.samples} at --temperature 0 gives identical greedy samples; sample above 0")
    suite = mbpp.load_tasks(args.data)
    tasks = mbpp.select_tasks(suite, args.task_ids, args.limit)
    shots = mbpp.few_shot(suite, args.shots)
    _set_decode_threads(None)
    lm = load(args.run, *_decode_device(args))
    mbpp.check_context(tasks, shots, lambda text: len(lm.tokenizer.encode(text)), lm.model.cfg.max_seq_len)
    eos_text = lm.tokenizer.decode([lm.tokenizer.eos_id])
    totals = {"tokens": 0, "forwards": 0.0, "seconds": 0.0}
    stats: dict[str, Any] = {}

    def complete(prompt: str, n: int) -> list[str]:
        # A seed of its own for each task, from --seed and the prompt: tasks do not share random draws, and a
        # task's samples do not depend on which other tasks run.
        seed = (args.seed * 2**32 + zlib.crc32(prompt.encode())) % 2**64
        outs = lm.generate(
            [prompt] * n, max_new_tokens=args.max_new_tokens, decoding=args.decoding, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=seed, stop=eos_text,
        )  # fmt: skip
        totals["tokens"] += sum(len(o.token_ids) for o in outs)
        totals["forwards"] += sum(len(o.token_ids) / o.tokens_per_forward for o in outs if o.token_ids)
        totals["seconds"] += outs[0].stats["seconds"]
        stats.update(outs[0].stats)
        return [o.text for o in outs]

    report, samples = mbpp.evaluate_mbpp(
        complete, tasks, shots, args.samples, args.k, challenge=args.challenge_tests, timeout_s=args.timeout
    )
    files = {}
    if args.out:
        files = {"report": str(args.out), "samples": str(args.out.with_suffix(".samples.jsonl"))}
        # The report last: once it exists, its samples are complete too.
        atomic_write_text(Path(files["samples"]), samples_jsonl(samples))
        atomic_write_text(args.out, report.to_json())
    print(" ".join(f"{k}={v:.3f}" for k, v in report.pass_at_k.items()), file=sys.stderr)
    return {
        "run": str(args.run),
        "data": str(args.data),
        "problems": len(report.results),
        "n_samples": args.samples,
        "shots": args.shots,
        **report.pass_at_k,
        "decoding": args.decoding or "default",
        "heads_used": stats.get("heads_used"),
        "tree_size": stats.get("tree_size"),
        "tokens_per_forward": totals["tokens"] / max(totals["forwards"], 1),
        "tokens_per_second": totals["tokens"] / max(totals["seconds"], 1e-9),
        "sandbox": report.isolation,
        **files,
    }


# --------------------------------------------------------------------------------------------------
# generate


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a run directory")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--prompt", help="prompt text (default: none; this or --batch)")
    p.add_argument(
        "--batch", type=Path, help="a file of prompts, one per line, JSON strings allowed (default: none)"
    )
    p.add_argument("--max-new-tokens", type=NATURAL, default=200, help="tokens to generate at most")
    _add_sampling(p)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    p.add_argument("--speculative", action="store_true", help="self-speculative decoding (a chain of heads by default)")
    p.add_argument("--heads-used", type=COUNT, help="heads k used by speculative decoding (1..n; default all)")
    p.add_argument(
        "--tree", nargs="?", const="", metavar="TREE_JSON",
        help="draft with a tree (alone: RUN/tree.json from `multitoken calibrate`; default: no tree)",
    )  # fmt: skip
    p.add_argument(
        "--draft-vocab", nargs="?", const="", metavar="VOCAB_JSON",
        help="draft only among a draft vocabulary's tokens (alone: RUN/draft_vocab.json; default: all tokens)",
    )  # fmt: skip
    p.add_argument("--threads", type=COUNT, help="CPU threads (default 1: decode steps are too small to split)")
    p.add_argument(
        "--compile", action="store_true",
        help="run the decode step under torch.compile (the first steps pay for compiling; pays off on long outputs)",
    )  # fmt: skip
    p.add_argument(
        "--cuda-graphs", action="store_true",
        help="replay the decode step from CUDA graphs (CUDA, greedy): one launch per step instead of one per kernel",
    )  # fmt: skip
    _add_decode_device(p)
    p.add_argument("--stream", action="store_true", help="print the continuation as it is decoded (one --prompt)")
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


def _resolve_tree(run_dir: Path, tree_arg: str | None):
    """None for a chain; else the tree named by --tree (empty: the run's own calibrated tree.json)."""
    from multitoken.generate.tree import TREE_FILE, load_tree

    if tree_arg is None:
        return None
    return load_tree(Path(tree_arg) if tree_arg else Path(run_dir) / TREE_FILE)


def _resolve_draft_vocab(run_dir: Path, vocab_arg: str | None):
    """None for the full vocabulary; else the draft vocabulary named by --draft-vocab (empty: the run's own)."""
    from multitoken.generate.draft_vocab import DRAFT_VOCAB_FILE, DraftVocab

    if vocab_arg is None:
        return None
    return DraftVocab.load(Path(vocab_arg) if vocab_arg else Path(run_dir) / DRAFT_VOCAB_FILE)


def _cmd_generate(args: argparse.Namespace) -> dict[str, Any] | None:
    from multitoken.api import load

    _set_decode_threads(args.threads)
    prompts = _read_prompts(args)
    speculative = args.speculative or args.tree is not None or args.heads_used is not None
    speculative = speculative or args.draft_vocab is not None
    device, dtype = _decode_device(args)
    lm = load(args.run, device, dtype)
    lm.tree = _resolve_tree(args.run, args.tree)
    lm.draft_vocab = _resolve_draft_vocab(args.run, args.draft_vocab)
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


# --------------------------------------------------------------------------------------------------
# calibrate


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure each head's top-k acceptance on held-out data and build a draft tree (RUN/tree.json)",
    )
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument(
        "--budget", type=_budget, default=16,
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
    _add_sampling(p)  # a tree for sampling: acceptance of independent draws at these settings
    _add_decode_device(p)
    p.add_argument("--threads", type=COUNT, help="CPU threads (default 1, as decoding uses)")
    p.set_defaults(func=_cmd_calibrate)




def _budget(value: str) -> int | str:
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


def _cmd_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import asdict

    from multitoken.checkpoint import load_run
    from multitoken.eval.heldout import load_heldout, split_heldout
    from multitoken.generate.autotune import fit_tree
    from multitoken.generate.draft_vocab import DRAFT_VOCAB_FILE
    from multitoken.generate.sampling import SamplingConfig
    from multitoken.generate.tree import TREE_FILE, save_tree

    _check_out_file(args.out)
    _set_decode_threads(args.threads)
    device, dtype = _decode_device(args)
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


# --------------------------------------------------------------------------------------------------
# bench


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: a readable table, then a JSON document as the last line")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    g = bench.add_parser("generate", help="plain vs chain vs tree decoding on held-out prompts of a run")
    g.add_argument("run", type=Path, help="run directory")
    g.add_argument(
        "--prompts", type=COUNT, default=8,
        help="prompts from the second half of the held-out text (`calibrate` reads the first)",
    )  # fmt: skip
    g.add_argument("--prompt-tokens", type=COUNT, default=64, help="tokens per prompt")
    g.add_argument("--max-new-tokens", type=NATURAL, default=128, help="tokens generated per prompt")
    g.add_argument("--heads-used", type=COUNT, help="heads k the chain drafts with (1..n; default: all)")
    g.add_argument(
        "--tree",
        nargs="?",
        const="",
        metavar="TREE_JSON",
        help="also time a tree (alone: RUN/tree.json; default: no tree)",
    )
    g.add_argument(
        "--draft-vocab", nargs="?", const="", metavar="VOCAB_JSON",
        help="also decode with drafts restricted to a draft vocabulary (alone: RUN/draft_vocab.json; default: none)",
    )  # fmt: skip
    g.add_argument("--batch", action="store_true", help="decode the prompts as one batch (default: one at a time)")
    _add_sampling(g)
    g.add_argument("--repeats", type=COUNT, default=1, help="timed runs per decoder, the fastest kept")
    g.add_argument("--threads", type=COUNT, help="CPU threads (default 1: decode steps are too small to split)")
    g.add_argument(
        "--data", nargs="+", action="extend", help="take prompts from these files (default: the run's held-out split)"
    )
    g.add_argument("--cache-dir", type=Path, help="where token stores are cached (default: beside the run)")
    _add_decode_device(g)
    g.add_argument(
        "--compile", action="store_true",
        help="also time the decoders with the step under torch.compile (rows plain-c, chain-c, tree-c)",
    )  # fmt: skip
    g.add_argument(
        "--cuda-graphs", action="store_true",
        help="also time the decoders with the step replayed from CUDA graphs (rows plain-g, chain-g, tree-g; "
        "with --compile also the compiled step replayed: rows -cg)",
    )  # fmt: skip
    g.set_defaults(func=_cmd_bench_generate)
    for name, module in BENCHES.items():
        mod = __import__(module, fromlist=["add_arguments"])
        summary = (mod.__doc__ or "").strip().splitlines()[0].split(": ", 1)[-1]
        b = bench.add_parser(name, help=summary)
        mod.add_arguments(b)
        b.set_defaults(func=mod.run)


def _cmd_bench_generate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from multitoken.checkpoint import load_run
    from multitoken.eval.heldout import load_heldout, prompt_windows, split_heldout
    from multitoken.generate.bench import bench_generate, bench_one_at_a_time
    from multitoken.generate.sampling import SamplingConfig
    from multitoken.generate.session import check_cuda_graphs

    _set_decode_threads(args.threads)
    device, dtype = _decode_device(args)
    run = load_run(args.run, device, dtype)
    held = load_heldout(args.run, run.config, args.data, args.cache_dir)
    prompts = prompt_windows(split_heldout(held.tokens)[1], args.prompts, args.prompt_tokens)
    tree = _resolve_tree(args.run, args.tree)
    vocab = _resolve_draft_vocab(args.run, args.draft_vocab)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    step_modes = ["c"] * args.compile + ["g"] * args.cuda_graphs + ["cg"] * (args.compile and args.cuda_graphs)
    if args.cuda_graphs:
        check_cuda_graphs(run.model, sampling)
    bench = bench_generate if args.batch else bench_one_at_a_time
    result = bench(
        run.model, prompts, args.max_new_tokens, heads_used=args.heads_used, tree=tree, repeats=args.repeats,
        step_modes=step_modes, draft_vocab=vocab, sampling=sampling, seed=args.seed,
    )  # fmt: skip
    print(result["table"])
    return {
        "run": str(args.run),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "device": device,
        "dtype": args.dtype,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed},
        "decoders": result["decoders"],
    }


# --------------------------------------------------------------------------------------------------
# heads


def _add_heads(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--data", nargs="+", action="extend", help="corpus (default: this Python's standard library)")
    p.add_argument(
        "--prompt-data",
        nargs="+",
        action="append",
        metavar="SOURCE",
        help="targets=generated: draw the prompts from these sources' training split; repeat the flag for "
        "groups that get an equal share each, say code, then prose (default: --data)",
    )
    p.add_argument("--time-budget", type=POSITIVE, default=HEADS_TRAIN.time_budget_s, help="seconds of training")
    p.add_argument("--max-steps", type=COUNT, help="optimizer steps at most (default: the time budget alone decides)")
    p.add_argument("--batch-size", type=COUNT, default=HEADS_TRAIN.batch_size, help="windows per step")
    p.add_argument("--context", type=COUNT, default=HEADS_TRAIN.context, help="tokens per window")
    p.add_argument("--lr", type=POSITIVE, default=HEADS_TRAIN.lr, help="peak learning rate")
    p.add_argument("--tensorboard", type=Path, help="also write the metrics here for TensorBoard (default: none)")
    p.add_argument("--cache-dir", type=Path, help="where token stores are cached (default: beside --out)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_heads)  # fmt: skip


def _cmd_heads(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.heads import train_heads

    _check_out_dir(args.out)
    heads = HeadsConfig(
        n_future=args.n_future, mode=args.mode, targets=args.targets, init=args.init,
        trunk_lr_scale=args.trunk_lr_scale, generated_prompts=args.generated_prompts,
        generated_tokens=args.generated_tokens, generation_batch=args.generation_batch, draft_vocab=args.draft_vocab,
        trunk_cache_gib=args.trunk_cache_gib,
    )  # fmt: skip
    budget = {"max_steps": args.max_steps} if args.max_steps else {}
    train = default_heads_train_config(
        batch_size=args.batch_size, context=args.context, lr=args.lr, time_budget_s=args.time_budget, **budget
    )
    data, prompts = args.data or (), args.prompt_data or ()
    return train_heads(
        args.run, args.out, heads, train, data, args.cache_dir, prompts, progress=not args.quiet,
        tensorboard=args.tensorboard,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# experiments


def _add_experiment(sub: argparse._SubParsersAction) -> None:
    from multitoken.experiments import EXPERIMENTS

    p = sub.add_parser("experiment", help="reproduce one of the paper's small-scale findings, with a report")
    p.add_argument("name", choices=list(EXPERIMENTS), help="; ".join(f"{k}: {v}" for k, v in EXPERIMENTS.items()))
    p.add_argument("--full", action="store_true", help="the full setting (a GPU or a long CPU run)")
    p.add_argument("--out", type=Path, help="report folder (default docs/results/NAME)")
    p.add_argument("--seeds", type=NATURAL, nargs="+", help="seeds of each arm (default: the setting's)")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
        help="change one field of the setting, e.g. --set steps=2000 (repeatable; default: none)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=COUNT, help="CPU threads (default: torch's; on a shared machine 1 avoids OpenMP stalls)"
    )
    p.set_defaults(func=_cmd_experiment)


def _cmd_experiment(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from multitoken.experiments import run_experiment
    from multitoken.experiments.common import parse_overrides

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.overrides)
    return run_experiment(args.name, "full" if args.full else "quick", args.out, args.seeds, overrides)


# --------------------------------------------------------------------------------------------------
# import / export


def _add_import(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=_cmd_import)


def _cmd_import(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.checkpoint import resolve_dtype
    from multitoken.interop.hf import import_to_run

    _check_out_dir(args.out)
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


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run as a Hugging Face Llama (next-token model) or the official layout")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--out", required=True, type=Path, help="folder to write")
    p.add_argument(
        "--format", choices=["hf", "meta"], default="hf", help="hf: a transformers Llama; meta: the official release"
    )
    p.add_argument(
        "--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="the exported weights: auto keeps the run's"
    )
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.checkpoint import resolve_dtype
    from multitoken.interop.hf import export_run

    _check_out_dir(args.out)
    dtype = None if args.dtype == "auto" else resolve_dtype(args.dtype)
    return {"out": str(export_run(args.run, args.out, args.format, dtype)), "format": args.format}


def _add_serve(sub: argparse._SubParsersAction) -> None:
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
    _add_decode_device(p)
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
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> None:
    from multitoken.serve import serve  # a one-line UserError when the serve extra is missing

    _set_decode_threads(args.threads)
    device, dtype = _decode_device(args)
    serve(
        args.path, host=args.host, port=args.port, device=device, dtype=dtype, decoding=args.decoding,
        batch_window_ms=args.batch_window_ms, max_batch=args.max_batch,
    )  # fmt: skip


def _add_consolidate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("consolidate", help="gather a sharded (FSDP2) checkpoint into model.safetensors")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--step", type=NATURAL, help="checkpoint step (default: the latest)")
    p.set_defaults(func=_cmd_consolidate)


def _cmd_consolidate(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.dcp import consolidate

    return {"checkpoint": str(consolidate(args.run, args.step))}


def _add_lm_eval(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the model `--model multitoken` registered; every argument is lm-eval's "
        "(needs the lm-eval extra)",
        add_help=False,  # `multitoken lm-eval --help` is lm-eval's help
    )


def _cmd_lm_eval(args: argparse.Namespace) -> None:
    from multitoken.eval.lm_eval import main as lm_eval_main  # a one-line UserError when lm-eval is missing

    lm_eval_main(args.lm_eval_args)


# --------------------------------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="multitoken",
        description="Multi-token prediction training and self-speculative decoding (Gloeckle et al., 2024).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_humaneval(sub)
    _add_mbpp(sub)
    _add_generate(sub)
    _add_calibrate(sub)
    _add_bench(sub)
    _add_heads(sub)
    _add_experiment(sub)
    _add_import(sub)
    _add_export(sub)
    _add_consolidate(sub)
    _add_serve(sub)
    _add_lm_eval(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["eval", "humaneval"]:  # `multitoken eval humaneval RUN`, as users spell it
        argv = ["eval-humaneval", *argv[2:]]
    if argv[:2] == ["eval", "mbpp"]:
        argv = ["eval-mbpp", *argv[2:]]
    try:
        if argv[:1] == ["lm-eval"]:  # the other arguments are lm-eval's, --help included: argparse never sees them
            args = argparse.Namespace(command="lm-eval", func=_cmd_lm_eval, lm_eval_args=argv[1:])
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
        _print_json(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
