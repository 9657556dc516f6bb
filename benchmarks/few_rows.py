"""Few-row products on this CPU: torch's nn.Linear against the model's Linear (model.py explains the switch).

    python benchmarks/few_rows.py [--threads 2]
    python benchmarks/few_rows.py --forwards     # where the weight-stationary path stops paying, in whole models

Decoding multiplies 1-16 rows by every weight; training and prefill multiply thousands. A decode step
streams the whole model, so no weight is in the cache when its turn comes: each timed product here uses the
next of enough copies of the weight to fill 256 MiB (a weight that stays cached, as in a naive loop over one
weight, times a different, faster case). The table gives milliseconds per product (median over the copies)
for SmolLM2-135M's shapes (d = 576, ffn 1536, V = 49152) and the demo preset's (d = 192); the JSON document on
the last line has the same numbers.

--forwards times what decides the row bound: decode forwards of whole models (the demo preset, and
SmolLM2-135M's shape with 3 added heads) over blocks of 1-32 tokens (`time_blocks`), every product of 2 rows
or more either weight-stationary or through F.linear, on 1 and 2 threads. The two settings alternate, each
first in turn, and each keeps its fastest of `--repeats` medians; cells: F.linear ms / weight-stationary ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import multitoken.model as model_module
from multitoken.config import ModelConfig, param_count, preset
from multitoken.generate.bench import time_blocks
from multitoken.model import Linear, MultiTokenModel

SHAPES = {"unembed 576->49152": (576, 49152), "ffn 576->1536": (576, 1536), "ffn 1536->576": (1536, 576),
          "attn 576->576": (576, 576), "ffn 192->768": (192, 768), "unembed 192->32768": (192, 32768)}  # fmt: skip
ROWS = (1, 2, 3, 4, 8, 16, 64, 512)


COLD_BYTES = 256 * 2**20


def median_ms(fn, layers: list[torch.nn.Module], repeats: int) -> float:
    """Median milliseconds of fn(layer) over `repeats` passes through `layers`, each layer cold when used."""
    times = []
    for _ in range(repeats):
        for layer in layers:
            start = time.perf_counter()
            fn(layer)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


MODELS = {
    "demo preset": lambda: preset("demo"),
    "SmolLM2-135M + 3 heads": lambda: ModelConfig(vocab_size=49152, dim=576, n_layers=33, n_heads=9, n_kv_heads=3,
                                                  ffn_dim=1536, max_seq_len=512, tie_embeddings=True),
}  # fmt: skip
BLOCK_SIZES = (1, 2, 4, 8, 12, 16, 24, 32)


def forwards(repeats: int) -> None:
    """Decode forwards of whole models with the weight-stationary path up to 64 rows against none (above 1)."""
    results: dict[str, dict[int, dict[int, dict[str, float]]]] = {}
    print("ms per decode forward over a block of N tokens (150 cached): F.linear / weight-stationary (ratio)")
    print("| model | threads | " + " | ".join(f"{n}" for n in BLOCK_SIZES) + " |")
    print("| --- | --- |" + " --- |" * len(BLOCK_SIZES))
    for name, make_cfg in MODELS.items():
        cfg = make_cfg()
        torch.manual_seed(0)
        model = MultiTokenModel(cfg).eval()
        label = f"{name} ({param_count(cfg) * 4 / 2**20:.0f} MiB)"
        results[label] = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            best: dict[tuple[str, int], float] = {}
            for r in range(repeats):
                for path in ("stationary", "F.linear") if r % 2 == 0 else ("F.linear", "stationary"):
                    bound = 64 if path == "stationary" else 1
                    model_module.FEW_ROWS = model_module.FEW_ROWS_THREADED = bound
                    for n, seconds in time_blocks(model, BLOCK_SIZES, 150, repeats=7).items():
                        best[path, n] = min(best.get((path, n), float("inf")), seconds * 1e3)
            row = {n: {"f_linear_ms": best["F.linear", n], "stationary_ms": best["stationary", n]} for n in BLOCK_SIZES}
            results[label][threads] = row
            cells = [f"{c['f_linear_ms']:.3g} / {c['stationary_ms']:.3g} ({c['f_linear_ms'] / c['stationary_ms']:.2f}x)"
                     for c in row.values()]  # fmt: skip
            print(f"| {label} | {threads} | " + " | ".join(cells) + " |", flush=True)
    print(json.dumps({"forwards": results}))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the copies of each weight")
    parser.add_argument("--forwards", action="store_true", help="whole-model decode forwards instead (1 and 2 threads)")
    args = parser.parse_args()
    if args.forwards:
        forwards(max(args.repeats, 4))
        return
    torch.set_num_threads(args.threads)
    results: dict[str, dict[int, dict[str, float]]] = {}
    print(f"ms per product, {args.threads} threads: nn.Linear / multitoken's Linear (ratio)")
    print("| shape | " + " | ".join(f"{r} rows" for r in ROWS) + " |")
    print("| --- |" + " --- |" * len(ROWS))
    for name, (d_in, d_out) in SHAPES.items():
        copies = max(4, COLD_BYTES // (4 * d_in * d_out))
        ours_layers = [Linear(d_in, d_out) for _ in range(copies)]
        stock_layers = [torch.nn.Linear(d_in, d_out, bias=False) for _ in range(copies)]
        row, cells = {}, []
        for rows in ROWS:
            x = torch.randn(rows, d_in)
            base = median_ms(lambda f, x=x: f(x), stock_layers, args.repeats)
            ours = median_ms(lambda f, x=x: f(x), ours_layers, args.repeats)
            row[rows] = {"nn_linear_ms": base, "linear_ms": ours, "speedup": base / ours}
            cells.append(f"{base:.3g} / {ours:.3g} ({base / ours:.2f}x)")
        results[name] = row
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(json.dumps({"threads": args.threads, "cold_bytes": COLD_BYTES, "results": results}))


if __name__ == "__main__":
    main()
