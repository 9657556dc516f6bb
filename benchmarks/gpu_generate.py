"""GPU-specific decoding checks on a trained run directory: numerics of verification and the block cost curve.

The speed tables come from the CLI (`multitoken bench generate RUN --tree --device cuda --dtype bf16`,
see benchmarks/gpu.sh); this script adds what the CLI does not print:

- the divergence report (multitoken.generate.numerics): greedy plain vs chain and vs tree decoding on the
  run's held-out prompts in each dtype, with head 1's top-2 logit gap (model dtype and float32) at every
  first divergence, and whether it is a near-tie;
- the verify cost curve (`time_blocks`): seconds per decode forward against block size, per dtype, which
  shows whether decoding is launch-bound (flat curve) or compute-bound.

    multitoken train --out RUN ... && multitoken calibrate RUN
    python benchmarks/gpu_generate.py RUN                      # cuda, fp32 and bf16
    python benchmarks/gpu_generate.py RUN --device cpu --dtypes fp32 --prompts 4 --max-new-tokens 32

Prints a readable summary and, as the last line, a JSON document.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from multitoken.checkpoint import load_run
from multitoken.eval.heldout import load_heldout, prompt_windows
from multitoken.generate.bench import time_blocks
from multitoken.generate.numerics import divergence_report, format_report
from multitoken.generate.tree import load_tree

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run directory (with tree.json from `multitoken calibrate` for trees)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts for the divergence report")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--block-sizes", default="1,2,3,4,6,8,12,16,24,32", help="verify block sizes to time")
    ap.add_argument("--block-repeats", type=int, default=20)
    ap.add_argument("--cache-dir", type=Path, help="token cache (default: beside the run directory)")
    args = ap.parse_args()

    tree_path = args.run / "tree.json"
    tree = load_tree(tree_path) if tree_path.is_file() else None
    result: dict = {"device": args.device, "run": str(args.run), "dtypes": {}}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    for name in args.dtypes.split(","):
        run = load_run(args.run, args.device, DTYPES[name])
        model = run.model
        if not result.get("params"):
            held = load_heldout(args.run, run.config, cache_dir=args.cache_dir)
            prompts = prompt_windows(held.tokens, args.prompts, args.prompt_tokens)
            result.update(params=model.num_parameters(), n_future=model.cfg.n_future, prompts=len(prompts))
        entry: dict = {}
        for decoder, t in (("chain", None), ("tree", tree)):
            if decoder == "tree" and tree is None:
                continue
            start = time.perf_counter()
            report = divergence_report(model, prompts, args.max_new_tokens, tree=t)
            report["seconds"] = time.perf_counter() - start
            print(f"[{name} {decoder}] " + format_report(report), flush=True)
            entry[f"divergence_{decoder}"] = report
        context = args.prompt_tokens + args.max_new_tokens // 2
        sizes = [int(s) for s in args.block_sizes.split(",")]
        costs = time_blocks(model, sizes, context=context, repeats=args.block_repeats)
        entry["block_cost_s"] = costs
        print(f"[{name}] verify forward ms by block size (context {context}): "
              + ", ".join(f"{k}: {v * 1e3:.3f}" for k, v in costs.items()), flush=True)  # fmt: skip
        result["dtypes"][name] = entry
        del run, model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
