"""`multitoken eval`: held-out loss per head; `eval humaneval` and `eval mbpp`: pass@k, completions sandboxed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from multitoken.argtypes import COUNT, NATURAL, POSITIVE
from multitoken.cli.common import (
    Subparsers,
    add_decode_device,
    add_decoding,
    add_sampling,
    check_out_file,
    decode_device,
    eval_table,
    set_decode_threads,
)
from multitoken.errors import UserError


def add(sub: Subparsers) -> None:
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
    p.set_defaults(func=run_heldout)

    p = sub.add_parser(
        "eval-humaneval",
        help="HumanEval pass@k, completions run in a sandbox (also spelled `multitoken eval humaneval RUN`)",
    )
    p.add_argument("run", type=Path, help="run directory, Hugging Face Llama folder or .gguf file")
    p.add_argument("--n-samples", "--samples", type=COUNT, default=1, help="completions per problem")
    p.add_argument("--k", type=COUNT, nargs="+", default=[1], help="report pass@k for these k")
    p.add_argument("--limit", type=COUNT, help="only the first N problems (default: all 164)")
    _add_completion_flags(p)
    p.set_defaults(func=run_humaneval)

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
    _add_completion_flags(p)
    p.set_defaults(func=run_mbpp)


def _add_completion_flags(p: argparse.ArgumentParser) -> None:
    """How completions are decoded and run: the flags HumanEval and MBPP share."""
    p.add_argument("--max-new-tokens", type=NATURAL, default=256, help="tokens per completion at most")
    add_sampling(p)
    add_decoding(p)
    add_decode_device(p)
    p.add_argument("--timeout", type=POSITIVE, default=5.0, help="seconds per program")
    p.add_argument(
        "--out", type=Path,
        help="write the report here as JSON, and the samples beside it as NAME.samples.jsonl (default: none)",
    )  # fmt: skip


def run_heldout(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.checkpoint import load_run
    from multitoken.eval.heldout import load_heldout
    from multitoken.pretrain import evaluate

    run = load_run(args.run)
    held = load_heldout(args.run, run.config, args.data, args.cache_dir)
    context = args.context or min(run.config.get("train", {}).get("context", 256), run.model.cfg.max_seq_len)
    result = evaluate(run.model, held.tokens, context, args.batch_size, args.batches, 1024, held.bytes_per_token)
    print(eval_table(result), file=sys.stderr)
    return {"run": str(args.run), "step": run.state.get("step"), **result}


def _completer(args: argparse.Namespace, samples: int, keep_prompt_end: bool):
    """The model of args.run, loaded for decoding, wrapped as the benchmarks' `generate_fn`."""
    from multitoken.api import load
    from multitoken.eval.completion import Completer

    check_out_file(args.out)  # before the evaluation runs, not after
    if samples > 1 and args.temperature == 0:
        raise UserError(f"{samples} samples at --temperature 0 are identical greedy samples; sample above 0")
    set_decode_threads(None)
    lm = load(args.run, *decode_device(args))
    return Completer(
        lm, args.max_new_tokens, args.decoding, args.temperature, args.top_k, args.top_p, args.seed, keep_prompt_end
    )


def _write_report(out: Path | None, report: Any, samples: list[Any] | None = None) -> dict[str, str]:
    """The report as JSON at `out` and its samples, if given, beside it (NAME.samples.jsonl); the report last, so
    that once it exists its samples are complete too."""
    from multitoken.checkpoint import atomic_write_text
    from multitoken.eval.humaneval import samples_jsonl

    if out is None:
        return {}
    files = {"report": str(out)}
    if samples is not None:
        files["samples"] = str(out.with_suffix(".samples.jsonl"))
        atomic_write_text(Path(files["samples"]), samples_jsonl(samples))
    atomic_write_text(out, report.to_json())
    return files


def run_humaneval(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.eval.humaneval import check_sample_counts, evaluate_humaneval

    check_sample_counts(args.n_samples, args.k)
    complete = _completer(args, args.n_samples, keep_prompt_end=True)  # HumanEval prompts are not cut by us
    report = evaluate_humaneval(complete, args.n_samples, args.k, limit=args.limit, timeout_s=args.timeout)
    files = _write_report(args.out, report)
    print(" ".join(f"{k}={v:.3f}" for k, v in report.pass_at_k.items()), file=sys.stderr)
    return {
        "run": str(args.run), "problems": len(report.results), "n_samples": args.n_samples, **report.pass_at_k,
        **complete.summary(), "sandbox": report.isolation, **files,
    }  # fmt: skip


def run_mbpp(args: argparse.Namespace) -> dict[str, Any]:
    from multitoken.eval import mbpp
    from multitoken.eval.humaneval import check_sample_counts

    check_sample_counts(args.samples, args.k)
    suite = mbpp.load_tasks(args.data)
    tasks = mbpp.select_tasks(suite, args.task_ids, args.limit)
    shots = mbpp.few_shot(suite, args.shots)
    complete = _completer(args, args.samples, keep_prompt_end=False)  # a prompt cut would lose its task
    tokenizer, context = complete.lm.tokenizer, complete.lm.model.cfg.max_seq_len
    mbpp.check_context(tasks, shots, lambda text: len(tokenizer.encode(text)), context)
    report, samples = mbpp.evaluate_mbpp(
        complete, tasks, shots, args.samples, args.k, challenge=args.challenge_tests, timeout_s=args.timeout
    )
    files = _write_report(args.out, report, samples)
    print(" ".join(f"{k}={v:.3f}" for k, v in report.pass_at_k.items()), file=sys.stderr)
    return {
        "run": str(args.run), "data": str(args.data), "problems": len(report.results), "n_samples": args.samples,
        "shots": args.shots, **report.pass_at_k, **complete.summary(), "sandbox": report.isolation, **files,
    }  # fmt: skip
