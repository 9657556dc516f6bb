"""`multitoken bench memory`: peak memory and step time of one training step, per method and per n.

Every configuration runs in a fresh subprocess (`python -m multitoken.bench.memory --worker SPEC`) so
that one configuration's peak, allocator caches and warm kernels never leak into the next. Memory is
`torch.cuda.max_memory_allocated` on CUDA and the child's peak RSS (VmHWM) on the CPU; both are
reported as the absolute peak and as the increase over the baseline after model and optimizer creation
(on the CPU the absolute peak carries torch's own ~300 MB, which dilutes ratios).

Two parts, both at the SAME total depth (n_layers blocks: n_layers - n trunk blocks + n head blocks):

- compare: n=1 (a plain causal LM step) against n summed-loss, n sequential, n sequential + chunked,
  with the FLOP ratio beside the time ratio and the memory ratio vs n=1;
- sweep: peak memory against n for the three methods at several vocabulary sizes; n=1 is
  the plain LM that every method's line starts from.

Methods: `summed` builds every head's logits, sums the losses, one backward (`loss.summed_loss`);
`sequential` is the paper's memory-efficient step (`loss.sequential_backward`, chunk 0); `chunked` is the
sequential step with the cross-entropy taken in chunks of tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from multitoken.argtypes import COUNT, NATURAL, integer_list
from multitoken.bench.flops import train_flops_per_token
from multitoken.config import ModelConfig, TrainConfig
from multitoken.data.dataset import WindowSampler
from multitoken.model import MultiTokenModel
from multitoken.pretrain import build_optimizer, compile_blocks, default_device, train_step

METHODS = ("summed", "sequential", "chunked")
MIB = 2**20
# The targets for the memory-efficient step at n=4.
MEMORY_TARGET = 1.05  # peak at most 1.05x the n=1 peak
TIME_TARGET = 1.05  # step-time ratio vs n=1 at most 1.05x the FLOP ratio


@dataclass
class StepSpec:
    """One measured configuration: a model shape, a training method and how long to time it."""

    dim: int
    n_layers: int
    vocab_size: int
    n_future: int
    method: str = "chunked"
    chunk: int = 128
    batch: int = 1
    context: int = 512
    warmup: int = 1
    steps: int = 3
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default (one per core)
    seed: int = 0
    compile: bool = False  # torch.compile each block, as `train --compile` does (the warm-up steps compile)

    def model_config(self) -> ModelConfig:
        """Llama-style shape with 64-dimensional attention heads (the context is the model's maximum)."""
        return ModelConfig(
            vocab_size=self.vocab_size,
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=max(1, self.dim // 64),
            n_future=self.n_future,
            max_seq_len=self.context,
        )


# --------------------------------------------------------------------------------------------------
# the worker (runs in the child process)


def _proc_status_bytes(field: str) -> int | None:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in bytes; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            line = next((x for x in f if x.startswith(field + ":")), None)
    except OSError:
        return None
    return int(line.split()[1]) * 1024 if line else None


def _rss_bytes() -> int:
    """Current resident set size (falls back to the peak so far without /proc)."""
    return _proc_status_bytes("VmRSS") or _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process image.

    VmHWM, not ru_maxrss: on Linux ru_maxrss carries the parent's RSS across fork + exec, so a child
    started by a parent holding 1 GB reports at least 1 GB. ru_maxrss is the fallback without /proc
    (KiB on Linux, bytes on macOS).
    """
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(spec: StepSpec) -> dict[str, Any]:
    """Build the model and optimizer, run `warmup + steps` training steps, return memory and times.

    Meant to run in a fresh process: the CPU peak is the process's peak RSS, which cannot be reset.
    """
    if spec.method not in METHODS:
        raise ValueError(f"unknown method {spec.method!r}; choose one of {', '.join(METHODS)}")
    device = torch.device(spec.device)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = spec.model_config()
    cuda = device.type == "cuda"
    before_model = torch.cuda.memory_allocated(device) if cuda else _rss_bytes()
    torch.manual_seed(spec.seed)
    model = MultiTokenModel(cfg).to(device)
    if spec.compile:
        compile_blocks(model)
    train_cfg = TrainConfig(
        batch_size=spec.batch, context=spec.context, sequential=spec.method != "summed",
        loss_chunk=spec.chunk if spec.method == "chunked" else 0,
    )  # fmt: skip
    optimizer = build_optimizer(model, train_cfg)  # AdamW state is allocated lazily at the first step
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = _rss_bytes()
    window = spec.context + cfg.n_future
    tokens = np.random.default_rng(spec.seed).integers(0, cfg.vocab_size, size=64 * window)
    sampler = WindowSampler(tokens, spec.batch, window, spec.seed)
    times: list[float] = []
    for i in range(spec.warmup + spec.steps):
        _sync(device)
        start = time.perf_counter()
        train_step(model, optimizer, sampler, i, train_cfg, train_cfg.lr, device, bf16=spec.dtype == "bf16")
        _sync(device)
        if i >= spec.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes()
    step_time = statistics.median(times)
    return {
        "spec": asdict(spec),
        "params": model.num_parameters(),
        "flops_per_token": train_flops_per_token(cfg, spec.context),
        "memory_kind": "cuda max_memory_allocated" if cuda else "cpu peak RSS",
        "before_model_mib": before_model / MIB,
        "baseline_mib": baseline / MIB,
        "peak_mib": peak / MIB,
        "peak_increase_mib": (peak - baseline) / MIB,
        "step_times_s": times,
        "step_time_s": step_time,
        "tokens_per_s": spec.batch * spec.context / step_time,
    }


def run_worker(spec: StepSpec, timeout_s: float = 3600.0) -> dict[str, Any]:
    """`measure_step(spec)` in a fresh Python process; a failure (e.g. out of memory) comes back as `error`."""
    # Every allocation above 256 KiB gets its own mmap and goes back to the OS when freed, so the CPU peak
    # RSS tracks live tensors instead of glibc's heap high-water mark (its adaptive threshold would
    # otherwise keep freed activations resident). No effect on CUDA memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(256 * 1024)}
    cmd = [sys.executable, "-m", "multitoken.bench.memory", "--worker", json.dumps(asdict(spec))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"spec": asdict(spec), "error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"spec": asdict(spec), "error": f"worker failed ({proc.returncode}): {tail[0][:300]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_of_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeats of one configuration -> one result: medians of step time and memory, all step times kept."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for key in ("step_time_s", "peak_mib", "peak_increase_mib", "baseline_mib", "before_model_mib"):
        out[key] = statistics.median(r[key] for r in ok)
    out["step_times_s"] = [t for r in ok for t in r["step_times_s"]]
    out["tokens_per_s"] = out["spec"]["batch"] * out["spec"]["context"] / out["step_time_s"]
    out["repeats"] = len(ok)
    return out


# --------------------------------------------------------------------------------------------------
# the benchmark (runs in the parent)


def machine_info(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: CPU model and cores, torch version, GPU name."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`auto` is what pretrain.py trains with: bf16 autocast on CUDA, fp32 elsewhere."""
    if dtype == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `multitoken bench memory` (defaults sized for a 2-core CPU in fp32)."""
    parser.add_argument("--part", choices=("compare", "sweep", "all"), default="all", help="which part to run")
    parser.add_argument("--dim", type=COUNT, default=512, help="model width (attention heads of 64 dims)")
    parser.add_argument("--layers", type=COUNT, default=8, help="total blocks (trunk + heads) in the comparison")
    parser.add_argument("--vocab", type=integer_list(), default=[32000, 128256], help="comparison vocab sizes")
    parser.add_argument("--n", type=COUNT, default=4, help="heads of the multi-token models in the comparison")
    parser.add_argument("--sweep-layers", type=COUNT, default=12, help="total blocks in the sweep (> max n)")
    parser.add_argument("--sweep-vocab", type=integer_list(), default=[256, 32000, 128256], help="sweep vocab sizes")
    parser.add_argument("--sweep-n", type=integer_list(), default=[1, 2, 4, 8], help="sweep head counts")
    add_step_arguments(parser, repeats=1)
    parser.add_argument("--plot-dir", default=None, help="write PNG plots here (default: none)")


def add_step_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The flags both training benchmarks share: how each measured step is shaped, run and repeated."""
    parser.add_argument("--chunk", type=NATURAL, default=128, help="tokens per cross-entropy chunk (chunked)")
    parser.add_argument("--batch", type=COUNT, default=1, help="windows per step")
    parser.add_argument("--context", type=COUNT, default=512, help="tokens per window")
    parser.add_argument("--warmup", type=NATURAL, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--steps", type=COUNT, default=3, help="timed steps per process (median reported)")
    parser.add_argument("--repeats", type=COUNT, default=repeats, help="fresh processes per setting, round-robin")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on CUDA, fp32 on the CPU"
    )
    parser.add_argument("--threads", type=NATURAL, default=0, help="torch threads per worker (0: torch's default)")


def _measure_all(specs: list[StepSpec], repeats: int) -> list[dict[str, Any]]:
    """Each spec `repeats` times, round-robin so that slow drifts of a shared machine hit all alike."""
    runs: list[list[dict[str, Any]]] = [[] for _ in specs]
    for _ in range(repeats):
        for i, spec in enumerate(specs):
            runs[i].append(run_worker(spec))
            print(f"  measured {_label(spec)} V={spec.vocab_size}", file=sys.stderr, flush=True)
    return [median_of_runs(r) for r in runs]


def _label(spec: StepSpec) -> str:
    if spec.n_future == 1 and spec.method == "summed":
        return "n=1"
    name = {"summed": "summed-loss", "sequential": "sequential", "chunked": f"sequential+chunk{spec.chunk}"}
    return f"n={spec.n_future} {name[spec.method]}"


def _add_ratios(rows: list[dict[str, Any]], ref: dict[str, Any] | None) -> None:
    """Labels, and memory, time and FLOP ratios of each row against the reference row (n=1) if there is one."""
    for row in rows:
        row["label"] = _label(StepSpec(**row["spec"]))
        if ref is None or "error" in row or "error" in ref:
            continue
        row["mem_ratio"] = row["peak_mib"] / ref["peak_mib"]
        if ref["peak_increase_mib"] > 0:  # zero only when a step never raised the peak (tests run in-process)
            row["increase_ratio"] = row["peak_increase_mib"] / ref["peak_increase_mib"]
        row["time_ratio"] = row["step_time_s"] / ref["step_time_s"]
        row["flop_ratio"] = row["flops_per_token"] / ref["flops_per_token"]
        row["time_over_flop"] = row["time_ratio"] / row["flop_ratio"]


def _fmt(row: dict[str, Any], key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


def _print_compare(vocab: int, rows: list[dict[str, Any]]) -> None:
    print(f"\nV={vocab}: peak memory ({rows[0].get('memory_kind', '?')}) and step time vs n=1")
    head = f"{'config':<26}{'peak MiB':>10}{'+setup MiB':>11}{'mem x':>7}{'+setup x':>9}"
    print(head + f"{'step s':>9}{'time x':>8}{'FLOP x':>8}{'time/FLOP':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['label']:<26}  {r['error']}")
            continue
        print(
            f"{r['label']:<26}{r['peak_mib']:>10.0f}{r['peak_increase_mib']:>11.0f}{_fmt(r, 'mem_ratio', '.3f'):>7}"
            f"{_fmt(r, 'increase_ratio', '.3f'):>9}{r['step_time_s']:>9.3f}{_fmt(r, 'time_ratio', '.3f'):>8}"
            f"{_fmt(r, 'flop_ratio', '.3f'):>8}{_fmt(r, 'time_over_flop', '.3f'):>10}"
        )


def _targets(vocab: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The two targets (MEMORY_TARGET, TIME_TARGET) for each memory-efficient row of the comparison."""
    out = []
    for r in rows:
        if r["spec"]["method"] == "summed" or "mem_ratio" not in r:
            continue
        out.append(
            {
                "vocab_size": vocab,
                "config": r["label"],
                "mem_ratio": r["mem_ratio"],
                "memory_met": r["mem_ratio"] <= MEMORY_TARGET,
                "increase_ratio": r.get("increase_ratio"),
                "time_over_flop": r["time_over_flop"],
                "time_met": r["time_over_flop"] <= TIME_TARGET,
            }
        )
    return out


def _print_sweep(vocab: int, rows: list[dict[str, Any]], ns: list[int]) -> None:
    print(f"\nV={vocab}: peak MiB (increase over setup) against n")
    print(f"{'n':>3}" + "".join(f"{m:>22}" for m in METHODS))
    for n in ns:
        cells = []
        for m in METHODS:
            # n=1 has one row, the plain LM, shown under every method
            r = next(x for x in rows if x["spec"]["n_future"] == n and (n == 1 or x["spec"]["method"] == m))
            cells.append(r["error"][:20] if "error" in r else f"{r['peak_mib']:.0f} ({r['peak_increase_mib']:.0f})")
        print(f"{n:>3}" + "".join(f"{c:>22}" for c in cells))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the comparison and/or the sweep; print tables; return the JSON document."""
    device = torch.device(args.device) if args.device else default_device()
    dtype = resolve_dtype(args.dtype, device)
    common = dict(
        dim=args.dim, chunk=args.chunk, batch=args.batch, context=args.context, warmup=args.warmup,
        steps=args.steps, device=str(device), dtype=dtype, threads=args.threads,
    )  # fmt: skip
    doc: dict[str, Any] = {"benchmark": "memory", "machine": machine_info(device), "settings": dict(common)}
    print(f"bench memory on {doc['machine']}, {dtype}, batch {args.batch} x context {args.context}")
    if args.part in ("compare", "all"):
        doc["settings"].update(layers=args.layers, n=args.n, vocab=args.vocab)
        doc["compare"], doc["targets"] = [], []
        for vocab in args.vocab:
            base = dict(common, n_layers=args.layers, vocab_size=vocab)
            specs = [StepSpec(n_future=1, method="summed", **base)]
            specs += [StepSpec(n_future=args.n, method=m, **base) for m in METHODS]
            rows = _measure_all(specs, args.repeats)
            _add_ratios(rows, rows[0])
            _print_compare(vocab, rows)
            doc["compare"].append({"vocab_size": vocab, "rows": rows})
            doc["targets"] += _targets(vocab, rows)
        for t in doc["targets"]:
            print(
                f"target V={t['vocab_size']} {t['config']}: memory {t['mem_ratio']:.3f}x n=1 "
                f"({'met' if t['memory_met'] else 'MISSED'}, <= {MEMORY_TARGET}); time {t['time_over_flop']:.3f}x "
                f"the FLOP ratio ({'met' if t['time_met'] else 'MISSED'}, <= {TIME_TARGET})"
            )
    if args.part in ("sweep", "all"):
        doc["settings"].update(sweep_layers=args.sweep_layers, sweep_n=args.sweep_n, sweep_vocab=args.sweep_vocab)
        doc["sweep"] = []
        for vocab in args.sweep_vocab:
            base = dict(common, n_layers=args.sweep_layers, vocab_size=vocab)
            # n=1 is the plain causal LM every line starts from; the methods differ only for n > 1.
            pairs = [(n, m) for n in args.sweep_n for m in METHODS if n > 1 or m == "summed"]
            specs = [StepSpec(n_future=n, method=m, **base) for n, m in pairs]
            rows = _measure_all(specs, args.repeats)
            ref = next((r for r in rows if r["spec"]["n_future"] == 1 and r["spec"]["method"] == "summed"), None)
            _add_ratios(rows, ref)
            _print_sweep(vocab, rows, args.sweep_n)
            doc["sweep"].append({"vocab_size": vocab, "rows": rows})
    if args.plot_dir:
        from multitoken.bench.plots import plot_memory_document

        doc["plots"] = [str(p) for p in plot_memory_document(doc, args.plot_dir)]
        print("plots: " + ", ".join(doc["plots"]))
    return doc


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: `python -m multitoken.bench.memory --worker '<StepSpec JSON>'`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, help="StepSpec as JSON; prints the result as one JSON line")
    spec = StepSpec(**json.loads(parser.parse_args(argv).worker))
    try:
        result = measure_step(spec)
    except torch.OutOfMemoryError as e:  # a real outcome of a sweep, not a crash of the benchmark
        result = {"spec": asdict(spec), "error": f"out of memory: {str(e).splitlines()[0][:200]}"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
