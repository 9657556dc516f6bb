"""Few-row products on this CPU: torch's nn.Linear against the model's Linear (model.py explains the switch).

    python benchmarks/few_rows.py [--threads 2]

Decoding multiplies 1-16 rows by every weight; training and prefill multiply thousands. A decode step
streams the whole model, so no weight is in the cache when its turn comes: each timed product here uses the
next of enough copies of the weight to fill 256 MiB (a weight that stays cached, as in a naive loop over one
weight, times a different, faster case). The table gives milliseconds per product (median over the copies)
for SmolLM2-135M's shapes (d = 576, ffn 1536, V = 49152) and the demo preset's (d = 192); the JSON document on
the last line has the same numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from multitoken.model import Linear

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


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the copies of each weight")
    args = parser.parse_args()
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
