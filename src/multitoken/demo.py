"""What the main job shows after training: held-out code continued plain, with a chain and with a tree.

The prompts are held-out functions cut just after `def name(`, so the continuation is real work (the
parameters and the body), not the blank line after an indentation. Each prompt is decoded greedily and by
sampling, plainly and self-speculatively, one at a time (batch 1); the speeds printed are measured on the
very continuations printed. Each tree is calibrated on the model's own continuations of prompts from the
other half of the held-out text (greedy for the greedy tree, sampled at the same settings for the sampled
one), so the shown prompts stay unseen by the calibration; its size is the one whose decoding steps, timed
on this machine, promise the highest speed.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multitoken.config import DemoConfig
from multitoken.data.tokenizers import Tokenizer
from multitoken.errors import UserError
from multitoken.eval.heldout import prompt_windows, windows_tensor
from multitoken.generate.bench import bench_one_at_a_time, choose_tree_by_speed
from multitoken.generate.calibration import calibrate_decoding
from multitoken.generate.sampling import SamplingConfig
from multitoken.generate.tree import TREE_FILE, Tree, save_tree
from multitoken.model import MultiTokenModel

SAMPLED_TREE_FILE = "tree-sampled.json"
LOOP_SHARE = 0.5  # a continuation most of whose 3-token runs repeat earlier ones is reported as a loop
SIGNATURE = re.compile(r"^[ \t]*(?:async )?def [A-Za-z_]\w*\(", re.MULTILINE)


def code_prompts(documents: list[str], n: int, context_lines: int) -> list[str]:
    """`n` prompts from `documents`, evenly spaced over their function signatures: each ends just after
    `def name(` and starts `context_lines` lines before it, within one document (deterministic). Fewer
    (all there are) when the documents hold fewer signatures."""
    candidates = []
    for doc in documents:
        for match in SIGNATURE.finditer(doc):
            start = match.start()
            for _ in range(context_lines):  # back up whole lines, at most to the document's start
                if start == 0:
                    break
                start = doc.rfind("\n", 0, start - 1) + 1
            if doc.count("\n", start, match.start()) >= context_lines // 2:  # enough code before it
                candidates.append(doc[start : match.end()].lstrip("\n"))
    if len(candidates) < n:
        return candidates
    return [candidates[i] for i in np.linspace(0, len(candidates) - 1, n).astype(int)]


def repeated_share(tokens: list[int], n: int = 3) -> float:
    """The share of a continuation's n-token sequences that already occurred earlier in it: 0 for text that
    never repeats itself, near 1 for a loop of any period."""
    seen: set[tuple[int, ...]] = set()
    repeats = total = 0
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        repeats, total = repeats + (gram in seen), total + 1
        seen.add(gram)
    return repeats / total if total else 0.0


def calibrated_tree(
    model: MultiTokenModel, tokens: np.ndarray, cfg: DemoConfig, sampling: SamplingConfig, path: Path
) -> tuple[Tree, list[dict[str, Any]]]:
    """The tree, among `cfg.tree_budgets`, with the highest expected speed on this machine: acceptance measured
    on the model's own continuations (decoded with `sampling`) of windows of `tokens`, decoding steps timed
    here (`choose_tree_by_speed`). Written to `path`; returns the tree and one row per budget."""
    length = min(cfg.calibration_tokens, model.cfg.max_seq_len)
    prompts = windows_tensor(tokens, cfg.calibration_windows, length // 4)
    generator = torch.Generator().manual_seed(cfg.seed)
    calibration = calibrate_decoding(model, prompts, length, max_rank=4, sampling=sampling, generator=generator)
    prompt = prompts[0].tolist()
    tree, rows, _ = choose_tree_by_speed(model, calibration, prompt, cfg.tree_budgets, sampling=sampling,
                                         generator=generator)  # fmt: skip
    save_tree(tree, path, calibration)
    return tree, rows


def decode_showcase(
    model: MultiTokenModel,
    tokenizer: Tokenizer,
    calibration_tokens: np.ndarray,
    evaluation_tokens: np.ndarray,
    run_dir: Path,
    cfg: DemoConfig | None = None,
    prompt_source: str = "held-out",
) -> dict[str, Any]:
    """Decode held-out code prompts plainly, with the chain and with calibrated trees, greedy and sampled.

    Returns {"prompts": [text], "greedy"/"sampled": {"decoders": pooled rows, "texts": {decoder: [text]},
    "per_prompt": [{decoder: tokens_per_forward}], "repeated_share": [per prompt], "tree_choice": [row per
    timed tree size]}, "config": ..., "n_future", "prompt_source"}; the trees are written to RUN/tree.json and
    RUN/tree-sampled.json. `prompt_source` names where the prompts come from, as printed.
    """
    cfg = cfg or DemoConfig()
    ids = evaluation_tokens.tolist()
    bounds = [-1, *(i for i, t in enumerate(ids) if t == tokenizer.eos_id), len(ids)]
    documents = [tokenizer.decode(ids[a + 1 : b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a + 1]
    prompts_text = code_prompts(documents, cfg.prompts, cfg.context_lines)
    if len(prompts_text) < cfg.prompts:  # not code (or too little of it): evenly spaced windows instead
        prompts_text = [tokenizer.decode(w) for w in prompt_windows(evaluation_tokens, cfg.prompts, cfg.prompt_tokens)]
    for i, text in enumerate(prompts_text):  # drop whole lines from the top until the prompt fits
        while len(tokenizer.encode(text)) > cfg.prompt_tokens and "\n" in text:
            text = text.split("\n", 1)[1]
        prompts_text[i] = text
    prompts = [tokenizer.encode(p)[-cfg.prompt_tokens :] for p in prompts_text]
    prompts_text = [tokenizer.decode(p) for p in prompts]
    limit = model.cfg.max_seq_len
    if max(len(p) for p in prompts) + cfg.new_tokens >= limit:
        raise UserError(f"prompts of {max(map(len, prompts))} tokens + {cfg.new_tokens} new exceed the context {limit}")
    sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p)
    out: dict[str, Any] = {"prompts": prompts_text, "config": asdict(cfg), "n_future": model.cfg.n_future,
                           "prompt_source": prompt_source}  # fmt: skip
    modes = {"greedy": (SamplingConfig(), TREE_FILE), "sampled": (sampling, SAMPLED_TREE_FILE)}
    for mode, (how, tree_file) in modes.items():
        tree, choice = None, []
        if model.cfg.n_future > 1:
            tree, choice = calibrated_tree(model, calibration_tokens, cfg, how, Path(run_dir) / tree_file)
        bench = bench_one_at_a_time(model, prompts, cfg.new_tokens, tree=tree, sampling=how, seed=cfg.seed)
        # Greedy decoders agree, so plain's text stands for all; a sampled text printed is the tree's own draw.
        shown = "tree" if tree is not None and mode == "sampled" else "plain"
        out[mode] = {
            "decoders": bench["decoders"],
            "texts": {name: [tokenizer.decode(t) for t in tokens] for name, tokens in bench["outputs"].items()},
            "per_prompt": bench["per_prompt"],
            "repeated_share": [repeated_share(t) for t in bench["outputs"][shown]],
            "shown": shown,
            "tree_size": None if tree is None else tree.size,
            "tree_choice": choice,
        }
    return out


def showcase_run(run_dir: Path, new_tokens: int) -> dict[str, Any]:
    """The main job's last act: a run's held-out code (its training text when the corpus is too small for a
    held-out split) continued by `decode_showcase`, `new_tokens` per prompt. The trees land in the run."""
    from multitoken.checkpoint import load_run
    from multitoken.eval.heldout import load_heldout, split_heldout

    run = load_run(run_dir)
    held = load_heldout(run_dir, run.config)
    cfg = DemoConfig(new_tokens=new_tokens)
    held_out = len(held.tokens) > 4 * cfg.prompt_tokens
    tokens = held.tokens if held_out else held.train_tokens
    source = "held-out" if held_out else "training-text (the corpus has no held-out split)"
    calibration_tokens, evaluation_tokens = split_heldout(tokens)
    return decode_showcase(run.model, held.tokenizer, calibration_tokens, evaluation_tokens, run_dir, cfg, source)


def format_showcase(result: dict[str, Any]) -> str:
    """The prompts, their continuations and a speed table, as the main job prints them."""
    cfg, greedy, sampled = result["config"], result["greedy"], result["sampled"]
    speculative = "chain" in greedy["per_prompt"][0] and result["n_future"] > 1
    exact = all(r["exact"] == 1 for r in greedy["decoders"].values())
    lines, rule = [], "-" * 72
    for i, prompt in enumerate(result["prompts"]):
        lines += [rule, f"{result['prompt_source']} prompt {i + 1} of {len(result['prompts'])}:", prompt.rstrip("\n")]
        for mode, r in (("greedy", greedy), ("sampled", sampled)):
            if mode == "greedy":
                same = "plain = chain = tree" if exact else "plain; the others differ"
                what = f"greedy ({same})" if speculative else "greedy"
            else:
                what = f"sampled at temperature {cfg['temperature']}, top-p {cfg['top_p']}"
                what += f" (the {r['shown']}'s draw)" if speculative else ""
            speeds = ", ".join(f"{k} {v:.2f}" for k, v in r["per_prompt"][i].items() if k != "plain")
            share = r["repeated_share"][i]
            note = f"; LOOPS: {share:.0%} of its 3-token runs repeat earlier ones" if share > LOOP_SHARE else ""
            speeds = f"; tokens per forward: {speeds}" if speculative else ""
            lines += [f"---- {what}{speeds}{note} ----", r["texts"][r["shown"]][i].rstrip("\n")]
    lines.append(rule)
    n, new = len(result["prompts"]), cfg["new_tokens"]
    lines.append(f"decoding these {n} prompts x {new} tokens, batch 1, one at a time (pooled):")
    lines.append(f"{'decoder':<18} {'greedy: tok/fwd':>15} {'speedup':>8}   {'sampled: tok/fwd':>16} {'speedup':>8}")
    names = {"plain": "plain"} | ({"chain": "chain of heads"} if speculative else {})
    if speculative and "tree" in greedy["decoders"]:
        names["tree"] = "calibrated tree"
    for key, name in names.items():
        g, s = greedy["decoders"][key], sampled["decoders"][key]
        lines.append(
            f"{name:<18} {g['tokens_per_forward']:>15.2f} {g['speedup']:>7.2f}x   "
            f"{s['tokens_per_forward']:>16.2f} {s['speedup']:>7.2f}x"
        )
    if "tree" in names:
        best = max(row["expected_speedup"] for mode in (greedy, sampled) for row in mode["tree_choice"])
        why = "the sizes whose decoding steps, timed here, promised the most speed"
        why += "" if best >= 1 else " (none promised to beat plain decoding)"
        lines.append(f"trees of {greedy['tree_size']} (greedy) and {sampled['tree_size']} (sampled) nodes: {why}")
    if speculative:
        lines.append("sampled rows: each decoder's speed on its own draw (same law; the texts are in the JSON line)")
    plain_g = greedy["decoders"]["plain"]["tokens_per_second"]
    plain_s = sampled["decoders"]["plain"]["tokens_per_second"]
    same = f"; greedy outputs identical to plain: {'yes' if exact else 'no'}" if speculative else ""
    lines.append(f"plain decoding: {plain_g:.0f} tokens/s greedy, {plain_s:.0f} sampled{same}")
    return "\n".join(lines)
