"""Few-row products on this CPU: F.linear against the weight-stationary product, and what the calibration chose.

    python benchmarks/few_rows.py [--threads 2] [--cold-mib 256]
    python benchmarks/few_rows.py --forwards     # whole decode forwards: F.linear, weight-stationary, calibrated

Decoding multiplies 1-64 rows by every weight; training and prefill multiply thousands. A decode step
streams the whole model, so no weight is in the cache when its turn comes: each timed product here uses the
next of enough copies of the weight to fill `--cold-mib` MiB (a weight that stays cached, as in a naive loop
over one weight, times a different, faster case). The table gives milliseconds per product (median over the
copies) for SmolLM2-135M's shapes (d = 576, ffn 1536, V = 49152) and the demo preset's (d = 192), and beside
each shape the choice that `kernels.calibrate` (what decoding runs, once per machine) makes for it here. The
JSON document on the last line has the same numbers and names the CPU.

--forwards times decode forwards of whole models (the demo preset, and SmolLM2-135M's shape with 3 added
heads) over blocks of 1-32 tokens (`time_blocks`), on 1 and 2 threads, three ways: every product of up to 64
rows through F.linear, every one weight-stationary, and as this machine's calibration chose. The three
alternate, each first in turn, and each keeps its fastest of `--repeats` medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from multitoken import kernels
from multitoken.cli.common import HelpFormatter
from multitoken.config import ModelConfig, param_count, preset
from multitoken.generate.bench import time_blocks
from multitoken.model import Linear, MultiTokenModel

SHAPES = {"unembed 576->49152": (576, 49152), "ffn 576->1536": (576, 1536), "ffn 1536->576": (1536, 576),
          "attn 576->576": (576, 576), "ffn 192->768": (192, 768), "unembed 192->32768": (192, 32768)}  # fmt: skip
ROWS = (1, 2, 3, 4, 8, 16, 32, 64)


def median_ms(product: Callable, x: torch.Tensor, weights: list[torch.Tensor], repeats: int) -> float:
    """Median milliseconds of product(x, w) over `repeats` passes through `weights`, each weight cold when used."""
    times = []
    for _ in range(repeats):
        for w in weights:
            start = time.perf_counter()
            product(x, w)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def describe(choice: kernels.Choice) -> str:
    """A choice in words: the row counts that go weight-stationary."""
    if choice.bound < 2:
        return "1 row" if choice.one_row else "none"
    return f"{'1' if choice.one_row else '2'}-{choice.bound} rows"


def products(threads: int, repeats: int, cold_mib: int) -> None:
    """One product at a time: F.linear / weight-stationary per shape and row count, and the calibrated choice."""
    torch.set_num_threads(threads)
    copies = {name: [torch.randn(d_out, d_in) for _ in range(max(4, cold_mib * 2**20 // (4 * d_in * d_out)))]
              for name, (d_in, d_out) in SHAPES.items()}  # fmt: skip
    start = time.perf_counter()
    groups = {(torch.float32, d_out, d_in): copies[name] for name, (d_in, d_out) in SHAPES.items()}
    timings, _ = kernels.measure(groups, budget_s=float("inf"))  # six shapes of two models: no one model's budget
    calibration_s = time.perf_counter() - start
    chosen = {g: kernels.choose(t) for g, t in timings.items()}
    cpu = kernels.cpu_model()
    print(f"{cpu}, torch {torch.__version__}, {threads} threads, weights cold ({cold_mib} MiB of copies)")
    print("ms per product: F.linear / weight-stationary (ratio); last column: the calibration's choice here")
    print("| shape | " + " | ".join(f"{r} rows" for r in ROWS) + " | calibrated |")
    print("| --- |" + " --- |" * (len(ROWS) + 1))
    results: dict[str, dict] = {}
    for name, (d_in, d_out) in SHAPES.items():
        row, cells = {}, []
        for rows in ROWS:
            x = torch.randn(rows, d_in)
            base = median_ms(F.linear, x, copies[name], repeats)
            ours = median_ms(kernels.weight_stationary, x, copies[name], repeats)
            row[rows] = {"f_linear_ms": base, "stationary_ms": ours, "speedup": base / ours}
            cells.append(f"{base:.3g} / {ours:.3g} ({base / ours:.2f}x)")
        choice = chosen[torch.float32, d_out, d_in]
        results[name] = {"rows": row, "calibrated": {"bound": choice.bound, "one_row": choice.one_row}}
        print(f"| {name} | " + " | ".join(cells) + f" | {describe(choice)} |", flush=True)
    print(f"calibration: {calibration_s:.2f} s for the {len(SHAPES)} shapes")
    print(json.dumps({"cpu": cpu, "torch": torch.__version__, "threads": threads, "cold_mib": cold_mib,
                      "calibration_s": calibration_s, "results": results}))  # fmt: skip


MODELS = {
    "demo preset": lambda: preset("demo"),
    "SmolLM2-135M + 3 heads": lambda: ModelConfig(vocab_size=49152, dim=576, n_layers=33, n_heads=9, n_kv_heads=3,
                                                  ffn_dim=1536, max_seq_len=512, tie_embeddings=True),
}  # fmt: skip
BLOCK_SIZES = (1, 2, 4, 8, 12, 16, 24, 32)
# How decoding's own choice (`make_cache` -> `kernels.prepare`) is steered for each setting.
SETTINGS = {"F.linear": "0", "stationary": "64", "calibrated": None}


def forwards(repeats: int) -> None:
    """Decode forwards of whole models: F.linear, weight-stationary (up to 64 rows) and the calibrated choice."""
    os.environ[kernels.CACHE_ENV] = "off"  # the calibrated setting measures in this run, whatever a cache holds
    cpu = kernels.cpu_model()
    results: dict[str, dict] = {}
    notes = []
    print(f"{cpu}, torch {torch.__version__}, 150 cached positions")
    print("ms per decode forward over a block of N tokens: F.linear / weight-stationary / calibrated")
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
            os.environ.pop(kernels.FEW_ROWS_ENV, None)
            start = time.perf_counter()
            chosen = kernels.prepare(m.weight for m in model.modules() if isinstance(m, Linear))
            calibration_s = time.perf_counter() - start
            best: dict[tuple[str, int], float] = {}
            order = list(SETTINGS)
            for r in range(repeats):
                for setting in order[r % 3 :] + order[: r % 3]:
                    if SETTINGS[setting] is None:
                        os.environ.pop(kernels.FEW_ROWS_ENV, None)
                    else:
                        os.environ[kernels.FEW_ROWS_ENV] = SETTINGS[setting]
                    for n, seconds in time_blocks(model, BLOCK_SIZES, 150, repeats=7).items():
                        best[setting, n] = min(best.get((setting, n), float("inf")), seconds * 1e3)
            row = {n: {s: best[s, n] for s in SETTINGS} for n in BLOCK_SIZES}
            shapes = {f"{o}x{i}": describe(c) for (_, o, i), c in chosen.items()}
            results[label][threads] = {"ms": row, "calibrated": shapes, "calibration_s": calibration_s}
            cells = [" / ".join(f"{c[s]:.3g}" for s in SETTINGS) for c in row.values()]
            print(f"| {label} | {threads} | " + " | ".join(cells) + " |", flush=True)
            notes.append(f"{label}, {threads} threads ({calibration_s:.2f} s): "
                         + ", ".join(f"{k}: {v}" for k, v in shapes.items()))  # fmt: skip
    os.environ.pop(kernels.FEW_ROWS_ENV, None)
    print("calibrated (weight shape out x in: rows taken weight-stationary):")
    for note in notes:
        print(f"  {note}")
    print(json.dumps({"cpu": cpu, "torch": torch.__version__, "forwards": results}))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the products")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the copies of each weight")
    parser.add_argument("--cold-mib", type=int, default=256, help="MiB of copies of each weight, to keep it cold")
    parser.add_argument("--forwards", action="store_true", help="whole-model decode forwards instead (1 and 2 threads)")
    args = parser.parse_args()
    if args.forwards:
        forwards(max(args.repeats, 3))
    else:
        products(args.threads, args.repeats, args.cold_mib)


if __name__ == "__main__":
    main()
