"""`multitoken bench`: benchmarks that print a readable table, then a JSON document as the last line."""

from __future__ import annotations

import argparse
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

# `multitoken bench NAME`: modules with add_arguments(parser) and run(args) -> dict.
BENCHES: dict[str, str] = {"memory": "multitoken.bench.memory", "train": "multitoken.bench.train_speed"}


def add(sub: Subparsers) -> None:
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
    add_tree_flags(
        g,
        tree_help="also time a tree (alone: RUN/tree.json; default: no tree)",
        vocab_help="also decode with drafts restricted to a draft vocabulary (alone: RUN/draft_vocab.json; "
        "default: none)",
    )
    g.add_argument("--batch", action="store_true", help="decode the prompts as one batch (default: one at a time)")
    add_sampling(g)
    g.add_argument("--repeats", type=COUNT, default=1, help="timed runs per decoder, the fastest kept")
    g.add_argument("--threads", type=COUNT, help="CPU threads (default 1: decode steps are too small to split)")
    g.add_argument(
        "--data", nargs="+", action="extend", help="take prompts from these files (default: the run's held-out split)"
    )
    g.add_argument("--cache-dir", type=Path, help="where token stores are cached (default: beside the run)")
    add_decode_device(g)
    g.add_argument(
        "--compile", action="store_true",
        help="also time the decoders with the step under torch.compile (rows plain-c, chain-c, tree-c)",
    )  # fmt: skip
    g.add_argument(
        "--cuda-graphs", action="store_true",
        help="also time the decoders with the step replayed from CUDA graphs (rows plain-g, chain-g, tree-g; "
        "with --compile also the compiled step replayed: rows -cg)",
    )  # fmt: skip
    g.set_defaults(func=run_generate)
    for name, module in BENCHES.items():
        mod = __import__(module, fromlist=["add_arguments"])
        summary = (mod.__doc__ or "").strip().splitlines()[0].split(": ", 1)[-1]
        b = bench.add_parser(name, help=summary)
        mod.add_arguments(b)
        b.set_defaults(func=mod.run)


def run_generate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from multitoken.checkpoint import load_run
    from multitoken.eval.heldout import load_heldout, prompt_windows, split_heldout
    from multitoken.generate.bench import bench_generate, bench_one_at_a_time
    from multitoken.generate.sampling import SamplingConfig
    from multitoken.generate.session import check_cuda_graphs

    set_decode_threads(args.threads)
    device, dtype = decode_device(args)
    run = load_run(args.run, device, dtype)
    held = load_heldout(args.run, run.config, args.data, args.cache_dir)
    prompts = prompt_windows(split_heldout(held.tokens)[1], args.prompts, args.prompt_tokens)
    tree = resolve_tree(args.run, args.tree)
    vocab = resolve_draft_vocab(args.run, args.draft_vocab)
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
