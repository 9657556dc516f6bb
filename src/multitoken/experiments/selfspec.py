"""Byte-level self-speculative decoding (paper Table S3 layout).

Two byte-level models of equal total depth, n=1 and n=8, trained on the same bytes (the Python standard
library). Reported: each head's bits per byte on held-out bytes, then greedy self-speculative decoding
with the n=8 model using heads 2, 4 and 8 (chain) and a calibrated draft tree: bytes per forward, bytes
per second, speedup over plain decoding of the same model, and whether the output equals plain greedy
decoding. The paper (7B, 314B bytes, batch 16) reports 7.04 bytes per forward and a 6.39x speedup with
n=8 heads.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
from multitoken.generate.calibration import build_tree, calibrate_decoding

NAME = "selfspec"


@dataclass
class Setting:
    dim: int
    n_layers: int
    n_heads: int
    n_values: list[int]  # the models; the largest is the one decoded with its heads
    heads_used: list[int]
    seeds: list[int]
    steps: int
    batch_size: int
    context: int
    lr: float
    n_prompts: int
    prompt_len: int
    new_tokens: int
    tree_budget: int  # nodes per forward of the calibrated tree (0: no tree)
    n_source_files: int | None  # None: the whole default corpus


SETTINGS = {
    "test": Setting(32, 9, 2, [1, 8], [2, 8], [0], 3, 2, 32, 3e-3, 2, 16, 12, 6, 60),
    "quick": Setting(128, 10, 4, [1, 8], [2, 4, 8], [0], 200, 8, 128, 3e-3, 4, 64, 96, 16, None),
    "full": Setting(512, 16, 8, [1, 8], [2, 4, 8], [0], 20_000, 32, 512, 1e-3, 16, 128, 256, 32, None),
}


def run(
    setting: str = "quick",
    out_dir: Path | None = None,
    command: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the n=1 and n=8 byte models, measure per-head bits per byte and speculative decoding."""
    s, out_dir, device, t0, commit = start_run(NAME, SETTINGS, setting, out_dir, overrides)
    sources = [str(p) for p in default_corpus_paths()][: s.n_source_files]
    models: dict[str, Any] = {}
    decoding: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="multitoken-selfspec-") as tmp:
        for seed in s.seeds:
            for n in s.n_values:
                model_cfg = ModelConfig(
                    dim=s.dim, n_layers=s.n_layers, n_heads=s.n_heads, n_future=n, max_seq_len=max(512, s.context)
                )
                cfg = TrainConfig(
                    batch_size=s.batch_size, context=s.context, max_steps=s.steps, lr=s.lr,
                    warmup_steps=max(1, s.steps // 10), seed=seed, eval_every=s.steps, checkpoint_every=s.steps,
                )  # fmt: skip
                run_ = train_corpus_model(model_cfg, cfg, Path(tmp) / f"n{n}-s{seed}", sources, device)
                key = f"n={n} seed={seed}"
                models[key] = {
                    "n": n, "seed": seed, "non_embedding_params": param_count(model_cfg, embeddings=False),
                    "train_seconds": round(run_.seconds, 1), "tokens_seen": run_.tokens_seen,
                    "bits_per_byte": run_.final_eval.get("bits_per_byte"),
                    "agreement_with_head1": run_.final_eval.get("agreement_with_head1"),
                }  # fmt: skip
                if n != max(s.n_values):
                    continue
                calibration, evaluation = split_heldout(run_.val_tokens)
                prompts = prompt_windows(evaluation, s.n_prompts, s.prompt_len)
                decoding[key] = _decode(run_.model, calibration, prompts, s)
    seconds = time.perf_counter() - t0
    results = {"settings": s.__dict__, "models": models, "decoding": decoding}
    sections = _report_sections(models, decoding, s, out_dir)
    return write_report(
        out_dir, title="Byte-level self-speculative decoding (paper Table S3 layout)", name=NAME, setting=setting,
        command=command or default_command(NAME, setting, out_dir, overrides), seeds=s.seeds, sections=sections,
        results=results, seconds=seconds, commit=commit, device=device,
    )  # fmt: skip


def _decode(model, calibration: np.ndarray, prompts: list[list[int]], s: Setting) -> dict[str, Any]:
    """Plain vs chain decoding for each number of heads used, and a calibrated tree with all heads."""
    rows: dict[str, Any] = {"plain": None}  # first in the table; filled from the first call's baseline
    for k in s.heads_used:
        tree = None
        if k == model.cfg.n_future and s.tree_budget:
            # Calibrated on what greedy decoding reads: the model's continuations of 16 other prompts.
            prompt_len = s.context // 4
            calib = torch.from_numpy(calibration[: 16 * prompt_len].astype(np.int64)).view(16, prompt_len)
            tree = build_tree(calibrate_decoding(model, calib, s.context, max_rank=4), s.tree_budget)
        bench = bench_generate(model, prompts, s.new_tokens, heads_used=k, tree=tree)["decoders"]
        rows[f"chain k={k}"] = bench["chain"]
        rows["plain"] = rows["plain"] or bench["plain"]
        if "tree" in bench:
            rows[f"tree ({tree.size} nodes, k={k})"] = bench["tree"]
    return rows


def _report_sections(models: dict[str, Any], decoding: dict[str, Any], s: Setting, out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    n_max = max(s.n_values)
    bpb_rows = []
    curves = {}
    for key, m in models.items():
        bpb = m["bits_per_byte"] or []
        bpb_rows.append([key, f"{m['non_embedding_params'] / 1e6:.2f}M", m["tokens_seen"], *bpb[:1],
                         " / ".join(f"{x:.2f}" for x in bpb[1:]) or "–", m["train_seconds"]])  # fmt: skip
        curves[key] = (list(range(1, len(bpb) + 1)), bpb)
    line_plot(out_dir / "bits_per_byte_by_head.png", curves, "head i (predicts byte t+i)",
              "bits per byte (held-out stdlib bytes)", "Per-head bits per byte",
              xticks=range(1, max(s.n_values) + 1))  # fmt: skip
    dec_rows, labels, bpf, speed = [], [], [], []
    for key, rows in decoding.items():
        for name, r in rows.items():
            dec_rows.append([key, name, r["tokens_per_forward"], r["tokens_per_second"], r["speedup"],
                             r["efficiency"], r["exact"]])  # fmt: skip
            labels.append(name.replace(" nodes", "").replace("chain ", ""))
            bpf.append(r["tokens_per_forward"])
            speed.append(r["speedup"])
    grouped_bars(out_dir / "bytes_per_forward.png", labels, {"bytes per forward": bpf, "speedup (x)": speed},
                 "bytes per forward / speedup over plain", f"Greedy self-speculative decoding, n={n_max} model",
                 xlabel="decoder (heads used)")  # fmt: skip
    return [
        "## Setup\n\n"
        f"Byte-level models, dim {s.dim}, {s.n_layers} blocks in all (n={n_max}: {s.n_layers - n_max} trunk + "
        f"{n_max} head blocks), trained {s.steps} steps of {s.batch_size} x {s.context} bytes on the Python "
        f"standard library; AdamW lr {s.lr}. Decoding: {s.n_prompts} held-out prompts of {s.prompt_len} bytes "
        f"decoded as one batch, {s.new_tokens} new bytes each, greedy, fp32; speedup is over plain decoding of "
        "the same model in the same call (fastest of one timed run after a warm-up). `exact` = fraction of "
        f"outputs equal to plain greedy decoding. The tree ({s.tree_budget} nodes, up to 4 candidates per head) "
        f"is calibrated on the model's greedy continuations of 16 other held-out prompts of {s.context // 4} "
        "bytes (the first half of the held-out bytes; the prompts above come from the second).",
        "## Bits per byte by head\n\n"
        + markdown_table(["model", "non-emb. params", "train bytes", "head 1 bpb", "heads 2.. bpb", "train s"],
                         bpb_rows)  # fmt: skip
        + "\n\n![bits per byte by head](bits_per_byte_by_head.png)",
        "## Self-speculative decoding\n\n"
        + markdown_table(["model", "decoder", "bytes/forward", "bytes/s", "speedup", "efficiency", "exact"],
                         dec_rows, digits=2)  # fmt: skip
        + "\n\nPaper (Table S3, 7B byte model, n=8, batch 16): 7.04 bytes/forward, 6.39x speedup."
        + "\n\n![bytes per forward](bytes_per_forward.png)",
    ]
