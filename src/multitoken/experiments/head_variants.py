"""Head variants (paper App. B, Table S4 layout): parallel, causal, anticausal and linear heads.

Byte-level models with n=4 heads of each kind, the same total depth and the same training bytes (the
Python standard library). Reported: each head's bits per byte on held-out bytes and how far
self-speculative decoding gets with all 4 heads (bytes per forward, speedup over plain decoding of the
same model). The paper (7B code models) found parallel best on MBPP/HumanEval and causal best on APPS;
it reports benchmark scores, not per-head losses, so only the ordering can be compared.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitoken.config import ModelConfig, TrainConfig, param_count
from multitoken.data.corpus import default_corpus_paths
from multitoken.eval.heldout import prompt_windows, split_heldout
from multitoken.experiments.common import (
    default_command,
    grouped_bars,
    line_plot,
    markdown_table,
    start_run,
    train_corpus_model,
    write_report,
)
from multitoken.generate.bench import bench_generate

NAME = "head_variants"


TABLE_S4 = ("parallel", "causal", "anticausal", "linear")  # the head kinds the paper compares


@dataclass
class Setting:
    dim: int
    n_layers: int
    n_heads: int
    n_future: int
    head_types: list[str]
    seeds: list[int]
    steps: int
    batch_size: int
    context: int
    lr: float
    n_prompts: int
    prompt_len: int
    new_tokens: int
    n_source_files: int | None  # None: the whole default corpus


SETTINGS = {
    "test": Setting(32, 5, 2, 4, list(TABLE_S4), [0], 3, 2, 32, 3e-3, 2, 16, 8, 60),
    "quick": Setting(128, 8, 4, 4, list(TABLE_S4), [0], 200, 8, 128, 3e-3, 4, 64, 96, None),
    "full": Setting(512, 16, 8, 4, list(TABLE_S4), [0, 1], 20_000, 32, 512, 1e-3, 16, 128, 256, None),
}


def run(
    setting: str = "quick",
    out_dir: Path | None = None,
    command: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one model per head type (and seed), measure per-head bits per byte and speculative decoding."""
    s, out_dir, device, t0, commit = start_run(NAME, SETTINGS, setting, out_dir, overrides)
    sources = [str(p) for p in default_corpus_paths()][: s.n_source_files]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="multitoken-heads-") as tmp:
        for head_type in s.head_types:
            for seed in s.seeds:
                model_cfg = ModelConfig(
                    dim=s.dim, n_layers=s.n_layers, n_heads=s.n_heads, n_future=s.n_future, head_type=head_type,
                    max_seq_len=max(512, s.context),
                )  # fmt: skip
                cfg = TrainConfig(
                    batch_size=s.batch_size, context=s.context, max_steps=s.steps, lr=s.lr,
                    warmup_steps=max(1, s.steps // 10), seed=seed, eval_every=s.steps, checkpoint_every=s.steps,
                )  # fmt: skip
                run_ = train_corpus_model(model_cfg, cfg, Path(tmp) / f"{head_type}-s{seed}", sources, device)
                prompts = prompt_windows(split_heldout(run_.val_tokens)[1], s.n_prompts, s.prompt_len)
                bench = bench_generate(run_.model, prompts, s.new_tokens, heads_used=s.n_future)["decoders"]
                runs.append({
                    "head_type": head_type, "seed": seed,
                    "non_embedding_params": param_count(model_cfg, embeddings=False),
                    "train_seconds": round(run_.seconds, 1), "tokens_seen": run_.tokens_seen,
                    "bits_per_byte": run_.final_eval.get("bits_per_byte"),
                    "agreement_with_head1": run_.final_eval.get("agreement_with_head1"),
                    "decoding": bench,
                })  # fmt: skip
    seconds = time.perf_counter() - t0
    sections = _report_sections(runs, s, out_dir)
    return write_report(
        out_dir, title="Head variants (paper Table S4 layout)", name=NAME, setting=setting,
        command=command or default_command(NAME, setting, out_dir, overrides), seeds=s.seeds, sections=sections,
        results={"settings": s.__dict__, "runs": runs}, seconds=seconds, commit=commit, device=device,
    )  # fmt: skip


def _report_sections(runs: list[dict[str, Any]], s: Setting, out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    tpf: dict[str, list[float]] = {"bytes per forward": [], "speedup (x)": []}
    for r in runs:
        bpb = r["bits_per_byte"] or [float("nan")] * s.n_future
        chain = r["decoding"]["chain"]
        label = f"{r['head_type']} (seed {r['seed']})"
        rows.append([label, f"{r['non_embedding_params'] / 1e6:.2f}M", *bpb, chain["tokens_per_forward"],
                     chain["speedup"], chain["exact"], r["train_seconds"]])  # fmt: skip
        curves[label] = (list(range(1, len(bpb) + 1)), bpb)
        tpf["bytes per forward"].append(chain["tokens_per_forward"])
        tpf["speedup (x)"].append(chain["speedup"])
    line_plot(out_dir / "bits_per_byte_by_head.png", curves, "head i (predicts byte t+i)",
              "bits per byte (held-out stdlib bytes)", f"Per-head bits per byte, n={s.n_future}",
              xticks=range(1, s.n_future + 1))  # fmt: skip
    grouped_bars(out_dir / "decoding.png", [r["head_type"] for r in runs], tpf, "bytes per forward / speedup",
                 f"Greedy self-speculative decoding with all {s.n_future} heads", xlabel="head type")  # fmt: skip
    head_cols = [f"head {i + 1} bpb" for i in range(s.n_future)]
    return [
        "## Setup\n\n"
        f"Byte-level models, dim {s.dim}, {s.n_layers} blocks in all, n={s.n_future} heads of each type "
        "(parallel: every head reads the trunk; causal: head i reads head i-1; anticausal: head i reads head "
        "i+1; linear: a d x d map per head, the trunk keeping all blocks), trained "
        f"{s.steps} steps of {s.batch_size} x {s.context} bytes of the Python standard library, AdamW lr "
        f"{s.lr}. Decoding: {s.n_prompts} held-out prompts, {s.new_tokens} new bytes, greedy chain with all "
        "heads, fp32, speedup over plain decoding of the same model.",
        "## Results\n\n"
        + markdown_table(["head type", "non-emb. params", *head_cols, "bytes/forward", "speedup", "exact",
                          "train s"], rows)  # fmt: skip
        + "\n\n![bits per byte by head](bits_per_byte_by_head.png)\n\n![decoding](decoding.png)",
    ]
