"""`multitoken bench train`: training throughput and model FLOPs utilisation against n (paper Table S5).

For each n in the list, a model of the same total depth (n_layers - n trunk blocks + n head blocks) runs
warm-up and timed training steps in its own fresh process (memory.py's worker). Reported per n: step
time, tokens/s, achieved FLOP/s from the analytic count (flops.py), MFU against a peak, and the step-time
ratio against n=1 beside the FLOP ratio: the time ratio should track the FLOP ratio (the unembedding is
computed n times), and the gap between them is overhead of the multi-token step itself.

The peak for MFU is `--peak-tflops`; without it, a table of known GPUs' dense bf16 peaks, and otherwise
(the CPU, fp32, an unknown GPU) the measured throughput of a large matmul in this same run, so that a CPU
MFU reads as "fraction of what this machine's matmul achieves right now".
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from multitoken.argtypes import COUNT, POSITIVE, integer_list
from multitoken.bench.memory import (
    StepSpec,
    add_step_arguments,
    machine_info,
    median_of_runs,
    resolve_dtype,
    run_worker,
)
from multitoken.pretrain import default_device

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name in
# order (the PCIe and NVL H100s are slower than the SXM part).
GPU_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
)


def measure_matmul_tflops(device: torch.device, dtype: str, size: int | None = None, seconds: float = 2.0) -> float:
    """Throughput of repeated square matmuls (TFLOP/s): the practical peak of this device and dtype."""
    size = size or (8192 if device.type == "cuda" else 2048)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    for _ in range(2):  # warm-up: kernel selection, page faults
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e12


def peak_tflops(device: torch.device, dtype: str, override: float | None) -> tuple[float, str]:
    """The MFU denominator and where it came from."""
    if override:
        return override, "--peak-tflops"
    if device.type == "cuda" and dtype == "bf16":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_BF16_PEAK_TFLOPS:
            if key in name:
                return value, f"table ({key} dense bf16)"
    return measure_matmul_tflops(device, dtype), f"measured {dtype} matmul on {device.type}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `multitoken bench train` (defaults sized for a 2-core CPU in fp32)."""
    parser.add_argument("--dim", type=COUNT, default=256, help="model width (attention heads of 64 dims)")
    parser.add_argument("--layers", type=COUNT, default=12, help="total blocks (trunk + heads); must exceed max n")
    parser.add_argument("--vocab", type=COUNT, default=32000, help="vocabulary size")
    parser.add_argument("--n-list", type=integer_list(), default=[1, 2, 4, 8], help="head counts n, comma-separated")
    parser.add_argument(
        "--method", choices=("summed", "sequential", "chunked"), default="chunked", help="how the n losses are taken"
    )
    add_step_arguments(parser, repeats=2)
    parser.add_argument(
        "--peak-tflops", type=POSITIVE, default=None,
        help="MFU denominator (default: a known GPU's bf16 peak, else a large matmul measured here)",
    )  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (warm-up steps compile)")
    parser.add_argument("--plot-dir", default=None, help="write the PNG plot here (default: none)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every n, print the Table S5-style table, return the JSON document."""
    device = torch.device(args.device) if args.device else default_device()
    dtype = resolve_dtype(args.dtype, device)
    if args.threads:  # the CPU peak must be measured with the threads the workers get
        torch.set_num_threads(args.threads)
    peak, peak_source = peak_tflops(device, dtype, args.peak_tflops)
    specs = [
        StepSpec(
            dim=args.dim, n_layers=args.layers, vocab_size=args.vocab, n_future=n, method=args.method,
            chunk=args.chunk, batch=args.batch, context=args.context, warmup=args.warmup, steps=args.steps,
            device=str(device), dtype=dtype, threads=args.threads, compile=args.compile,
        )  # fmt: skip
        for n in args.n_list
    ]
    runs: list[list[dict[str, Any]]] = [[] for _ in specs]
    for _ in range(args.repeats):  # round-robin: a slow spell of a shared machine hits every n alike
        for i, spec in enumerate(specs):
            runs[i].append(run_worker(spec))
            print(f"  measured n={spec.n_future}", file=sys.stderr, flush=True)
    rows = [median_of_runs(r) for r in runs]
    ref = next((r for r in rows if r["spec"]["n_future"] == 1 and "error" not in r), None)
    for row in rows:
        if "error" in row:
            continue
        row["tflops"] = row["flops_per_token"] * row["tokens_per_s"] / 1e12
        row["mfu"] = row["tflops"] / peak
        if ref is not None:
            row["time_ratio"] = row["step_time_s"] / ref["step_time_s"]
            row["flop_ratio"] = row["flops_per_token"] / ref["flops_per_token"]
            row["time_over_flop"] = row["time_ratio"] / row["flop_ratio"]
            # Spread of the repeats: the ratio of the fastest and slowest step of this n to n=1's median.
            row["time_ratio_range"] = [min(row["step_times_s"]) / ref["step_time_s"],
                                       max(row["step_times_s"]) / ref["step_time_s"]]  # fmt: skip
    doc: dict[str, Any] = {
        "benchmark": "train",
        "machine": machine_info(device),
        "settings": {
            "dim": args.dim, "layers": args.layers, "vocab": args.vocab, "method": args.method, "chunk": args.chunk,
            "batch": args.batch, "context": args.context, "warmup": args.warmup, "steps": args.steps,
            "repeats": args.repeats, "device": str(device), "dtype": dtype, "threads": args.threads,
            "compile": args.compile,
        },  # fmt: skip
        "peak_tflops": peak,
        "peak_source": peak_source,
        "rows": rows,
    }
    params = rows[0].get("params", 0)
    print(
        f"bench train on {doc['machine']}, {dtype}, {params / 1e6:.1f}M params, d={args.dim}, {args.layers} "
        f"blocks, V={args.vocab}, batch {args.batch} x {args.context}, method {args.method}"
        f"{', compiled blocks' if args.compile else ''}; "
        f"peak {peak:.3g} TFLOP/s ({peak_source})"
    )
    print(
        f"{'n':>3}{'trunk+heads':>12}{'step s':>9}{'tok/s':>9}{'TFLOP/s':>9}{'MFU':>7}"
        f"{'time x':>8}{'FLOP x':>8}{'time/FLOP':>10}"
    )
    for r in rows:
        n = r["spec"]["n_future"]
        if "error" in r:
            print(f"{n:>3}  {r['error']}")
            continue
        print(
            f"{n:>3}{f'{args.layers - n}+{n}':>12}{r['step_time_s']:>9.3f}{r['tokens_per_s']:>9.0f}"
            f"{r['tflops']:>9.3f}{r['mfu']:>7.1%}{r.get('time_ratio', float('nan')):>8.3f}"
            f"{r.get('flop_ratio', float('nan')):>8.3f}{r.get('time_over_flop', float('nan')):>10.3f}"
        )
    if args.plot_dir:
        from multitoken.bench.plots import plot_train_document

        doc["plots"] = [str(plot_train_document(doc, args.plot_dir))]
        print("plots: " + ", ".join(doc["plots"]))
    return doc

