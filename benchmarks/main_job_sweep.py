"""Held-out loss reached per CPU-minute by candidate settings of the main job (`multitoken train`).

    python benchmarks/main_job_sweep.py [--seconds 150] [--arms ARM ...]

Each arm trains on the default corpus (this Python's standard library) for the same wall-clock budget, one
arm at a time (never beside other load), and is scored by head 1's held-out bits per byte: a unit that
compares byte and BPE tokenizers. The table lists steps, tokens/s and bits per byte per head; the JSON
document on the last line has the same numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from multitoken.experiments.common import cpu_model

BPE2K = ["--tokenizer", "bpe", "--bpe-vocab", "2048"]
BPE4K = ["--tokenizer", "bpe", "--bpe-vocab", "4096"]
D192L10 = ["--preset", "demo"]  # dim 192, 6 trunk blocks + 4 heads
D128 = ["--preset", "induction-1m", "--n-future", "4"]  # dim 128, 4 attention heads


def shape(batch: int, context: int, lr: float) -> list[str]:
    """Every arm names its batch, context, learning rate and warmup: no arm depends on TrainConfig's defaults."""
    return ["--batch-size", str(batch), "--context", str(context), "--lr", str(lr), "--warmup", "30"]


ARMS: dict[str, list[str]] = {
    "bytes-d192L10-b16c256-lr2e-3": ["--tokenizer", "bytes", *D192L10, *shape(16, 256, 2e-3)],
    "bpe2k-d192L10-b16c256-lr2e-3": [*BPE2K, *D192L10, *shape(16, 256, 2e-3)],
    "bpe2k-d192L10-b8c256-lr2e-3": [*BPE2K, *D192L10, *shape(8, 256, 2e-3)],
    "bpe2k-d192L10-b8c256-lr4e-3": [*BPE2K, *D192L10, *shape(8, 256, 4e-3)],
    "bpe2k-d192L10-b8c128-lr2e-3": [*BPE2K, *D192L10, *shape(8, 128, 2e-3)],
    "bpe2k-d128L10-b16c128-lr3e-3": [*BPE2K, *D128, "--n-layers", "10", *shape(16, 128, 3e-3)],
    "bpe2k-d128L10-b8c128-lr3e-3": [*BPE2K, *D128, "--n-layers", "10", *shape(8, 128, 3e-3)],
    "bpe4k-d128L10-b8c128-lr3e-3": [*BPE4K, *D128, "--n-layers", "10", *shape(8, 128, 3e-3)],
    "bpe2k-d128L8-b8c128-lr3e-3": [*BPE2K, *D128, "--n-layers", "8", *shape(8, 128, 3e-3)],
    "bpe2k-d128L8-b2c128-lr3e-3": [*BPE2K, *D128, "--n-layers", "8", *shape(2, 128, 3e-3)],
    "bpe2k-d128L8-b4c256-lr3e-3": [*BPE2K, *D128, "--n-layers", "8", *shape(4, 256, 3e-3)],
    "bpe2k-d128L8-b4c128-lr5e-3": [*BPE2K, *D128, "--n-layers", "8", *shape(4, 128, 5e-3)],
    "bpe2k-d128L8-b4c128-lr3e-3": [*BPE2K, *D128, "--n-layers", "8", *shape(4, 128, 3e-3)],
    "bpe4k-d128L8-b4c128-lr3e-3": [*BPE4K, *D128, "--n-layers", "8", *shape(4, 128, 3e-3)],
    "bpe8k-d128L8-b4c128-lr3e-3": ["--tokenizer", "bpe", "--bpe-vocab", "8192", *D128, "--n-layers", "8",
                                   *shape(4, 128, 3e-3)],
}  # fmt: skip


def run_arm(name: str, flags: list[str], seconds: float, root: Path, cache: Path) -> dict:
    out = root / name
    cmd = [sys.executable, "-m", "multitoken.cli", "train", "--out", str(out), "--cache-dir", str(cache),
           "--time-budget", str(seconds), "--sample-tokens", "0", "--quiet", "--eval-every", "1000000",
           *flags]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    ev = summary["eval"]
    return {
        "arm": name,
        "flags": " ".join(flags),
        "steps": summary["steps"],
        "train_seconds": summary["seconds"],
        "wall_seconds": round(wall, 1),
        "tokens_per_s": round(summary["tokens_seen"] / summary["seconds"]),
        "bits_per_byte": [round(x, 3) for x in ev["bits_per_byte"]],
        "agreement_with_head1": [round(x, 3) for x in ev["agreement_with_head1"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=150.0, help="training seconds per arm (default 150)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="default: all")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in args.arms:
            rows.append(run_arm(name, ARMS[name], args.seconds, root, root / "cache"))
            r = rows[-1]
            print(f"{r['arm']:<24} {r['steps']:>5} steps {r['tokens_per_s']:>6} tok/s  head-1 bits/byte "
                  f"{r['bits_per_byte'][0]:.3f}  all {r['bits_per_byte']}  (wall {r['wall_seconds']} s)",
                  flush=True)  # fmt: skip
    best = min(rows, key=lambda r: r["bits_per_byte"][0])
    print(f"best head-1 bits/byte after {args.seconds:.0f} s: {best['arm']} ({best['bits_per_byte'][0]:.3f})")
    print(json.dumps({"cpu": cpu_model(), "seconds": args.seconds, "arms": rows, "best": best["arm"]}))


if __name__ == "__main__":
    main()
