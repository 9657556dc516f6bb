"""Benchmark plain vs chain vs tree self-speculative decoding on one model (GPU by default, or the CPU).

Trains a small byte-level MTP model on the running Python's standard library for `--train-steps` (a
step count, not a time, so the model does not depend on the machine's load; nothing is downloaded),
calibrates a draft tree on held-out windows, measures the verify-block cost curve, then decodes
held-out prompts with each decoder (fp32). Prints a readable table and, as the last line, a JSON document.

    python benchmarks/gpu_generate.py                       # CUDA if present
    python benchmarks/gpu_generate.py --device cpu --threads 1 --train-steps 200 --layers 10
"""

from __future__ import annotations

import argparse
import json
import platform
import sysconfig
import time
from pathlib import Path

import torch

from multitoken.config import ModelConfig
from multitoken.generate.bench import bench_generate, time_blocks
from multitoken.generate.tree import Tree, build_tree, calibrate
from multitoken.loss import sequential_backward, shift_targets
from multitoken.model import MultiTokenModel


def stdlib_bytes(limit: int) -> torch.Tensor:
    """Up to `limit` bytes of the standard library's .py files (tests excluded), as a uint8 tensor."""
    root, chunks, total = Path(sysconfig.get_paths()["stdlib"]), [], 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or total >= limit:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def train(model: MultiTokenModel, data: torch.Tensor, steps: int, batch: int, seq: int) -> float:
    """Train for `steps` steps on random windows of `data`; return the seconds it took."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    n = model.cfg.n_future
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(len(data) - seq - n, (batch,), generator=g).tolist()
        window = torch.stack([data[s : s + seq + n] for s in starts]).to(model.output.weight.device)
        inputs, targets = shift_targets(window, n)
        opt.zero_grad(set_to_none=True)
        sequential_backward(model, inputs, targets)
        opt.step()
    model.eval().requires_grad_(False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4, help="n_future")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--budgets", default="2,3,4,6,8,12,16", help="tree node budgets to consider")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    data = stdlib_bytes(12_000_000)
    split = int(0.95 * len(data))
    cfg = ModelConfig(
        vocab_size=256, dim=args.dim, n_layers=args.layers, n_heads=max(1, args.dim // 32),
        n_future=args.heads, max_seq_len=max(512, args.prompt_len + args.new_tokens + 32),
    )  # fmt: skip
    torch.manual_seed(0)
    model = MultiTokenModel(cfg).to(device)
    train_seconds = train(model, data[:split], args.train_steps, args.batch, args.seq)

    held_out = data[split:]
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(len(held_out) - 4096, (64,), generator=g).tolist()
    windows = torch.stack([held_out[s : s + 128] for s in starts[:32]]).to(device)
    acceptance = calibrate(model, windows, max_rank=8)
    prompts = [held_out[s : s + args.prompt_len].tolist() for s in starts[32 : 32 + args.prompts]]

    budgets = [int(b) for b in args.budgets.split(",")]
    costs = time_blocks(model, sorted({1, *budgets, args.heads}), context=args.prompt_len + args.new_tokens // 2)
    # The budget with the most expected tokens per second of verification (calibrated, measured cost).
    trees = {b: build_tree(acceptance, b) for b in budgets}
    best = max(budgets, key=lambda b: trees[b].expected_length(acceptance) / costs[trees[b].size])
    tree = trees[best]

    per_prompt = []
    for p in prompts:  # batch 1, as the headline
        per_prompt.append(bench_generate(model, [p], args.new_tokens, tree=tree)["decoders"])
    names = per_prompt[0].keys()
    summary = {
        name: {
            key: sum(r[name][key] for r in per_prompt) / len(per_prompt)
            for key in ("tokens_per_forward", "tokens_per_second", "speedup", "efficiency", "exact")
        }
        for name in names
    }
    batched = bench_generate(model, prompts, args.new_tokens, tree=tree)

    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}),"
          f" threads {torch.get_num_threads()}, {model.num_parameters() / 1e6:.2f}M params, "
          f"{args.train_steps} train steps in {train_seconds:.0f} s")
    print("calibrated acceptance (head 2.., rank 0..3):", [[round(x, 3) for x in r[:4]] for r in acceptance.tolist()])
    print("verify cost per block size (ms):", {k: round(v * 1e3, 2) for k, v in costs.items()})
    print(f"tree: budget {best}, expected tok/fwd {tree.expected_length(acceptance):.2f} "
          f"(chain {Tree.chain(args.heads).expected_length(acceptance):.2f}): {tree}")
    print("batch 1, mean over prompts:")
    for name, r in summary.items():
        print(f"  {name:<6} tok/fwd {r['tokens_per_forward']:.2f}  tok/s {r['tokens_per_second']:.1f}  "
              f"speedup {r['speedup']:.2f}x  efficiency {r['efficiency']:.2f}  exact {r['exact']:.2f}")
    print(f"batch {len(prompts)}:")
    print(batched["table"])
    print(json.dumps({
        "device": str(device), "threads": torch.get_num_threads(), "params": model.num_parameters(),
        "train_steps": args.train_steps, "acceptance": acceptance.tolist(),
        "block_cost_s": costs, "tree": [list(p) for p in tree.paths], "batch1": summary,
        "batched": batched["decoders"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
