"""Compare plain, chain and tree decoding on one model and one set of prompts.

Speed is what counts, and tokens per forward only bounds it: a verify forward over a block of N tokens
costs more than a one-token forward (and on small CPU matmuls a block of 2-3 rows can cost more than one
of 4). `efficiency` = speedup / tokens per forward shows how much of the bound survives; `time_blocks`
measures the block cost curve itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from multitoken.generate.autoregressive import generate
from multitoken.generate.common import GenerationResult
from multitoken.generate.draft_vocab import DraftVocab
from multitoken.generate.speculative import speculative_generate
from multitoken.generate.tree import Tree
from multitoken.model import MultiTokenModel


def bench_generate(
    model: MultiTokenModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    heads_used: int | None = None,
    tree: Tree | None = None,
    repeats: int = 1,
    compile_mode: str | None = None,
    draft_vocab: DraftVocab | None = None,
) -> dict[str, Any]:
    """Greedy plain vs chain (vs tree, if given) decoding: each warmed up once, then timed `repeats` times
    (the fastest run counts).

    compile_mode "default" or "reduce-overhead" adds rows plain-c, chain-c (and tree-c): the same decoders
    with the step under `torch.compile` and a static full-length cache read (`compile_step`); plain-c is
    the one-head chain, i.e. plain decoding through the same compiled step. "reduce-overhead" also turns
    on Inductor's CUDA graphs (what that mode of torch.compile sets) while they run. Speedups stay
    relative to eager plain; the warm-up run pays for compilation. A `draft_vocab` adds rows chain-v (and
    tree-v): the same decoders with the drafts restricted to its tokens.

    Returns {"decoders": {name: {tokens_per_forward, tokens_per_second, speedup, efficiency, forwards,
    exact}}, "table": str, "outputs": {name: generated tokens per prompt}}. `speedup` is against eager
    plain decoding; `efficiency` is the speedup against the plain decoder of the same kind (plain-c for
    the compiled rows) per token per forward, i.e. how much of the tokens per forward survives as speed
    once both sides have the same step machinery. `exact` is the fraction of prompts whose output equals
    plain decoding's (1.0 in fp32 on the CPU; in bf16 near-ties of head 1's top two logits can flip).
    """
    decoders: dict[str, Callable[[int], GenerationResult]] = {
        "plain": lambda n: generate(model, prompts, n),
        "chain": lambda n: speculative_generate(model, prompts, n, heads_used=heads_used),
    }
    if tree is not None:
        decoders["tree"] = lambda n: speculative_generate(model, prompts, n, tree=tree)
    if draft_vocab is not None:
        decoders["chain-v"] = lambda n: speculative_generate(model, prompts, n, heads_used, draft_vocab=draft_vocab)
        if tree is not None:
            decoders["tree-v"] = lambda n: speculative_generate(model, prompts, n, tree=tree, draft_vocab=draft_vocab)
    if compile_mode is not None:
        if compile_mode not in ("default", "reduce-overhead"):
            raise ValueError(f"compile_mode must be 'default' or 'reduce-overhead', got {compile_mode!r}")
        decoders["plain-c"] = lambda n: speculative_generate(model, prompts, n, heads_used=1, compile_step=True)
        decoders["chain-c"] = lambda n: speculative_generate(model, prompts, n, heads_used, compile_step=True)
        if tree is not None:
            decoders["tree-c"] = lambda n: speculative_generate(model, prompts, n, tree=tree, compile_step=True)
    results: dict[str, GenerationResult] = {}
    for name, run in decoders.items():
        graphs = compile_mode == "reduce-overhead" and name.endswith("-c")
        with _cuda_graphs() if graphs else contextlib.nullcontext():
            run(min(max_new_tokens, 8))  # warm-up: allocator, kernels, lazy initialisation, compilation
            results[name] = min((run(max_new_tokens) for _ in range(repeats)), key=lambda r: r.seconds)
    plain = results["plain"]
    rows: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        rows[name] = {
            "tokens_per_forward": r.stats.get("tokens_per_forward", 1.0),  # plain: one token per forward
            "tokens_per_second": r.n_generated / r.seconds,
            "seconds": r.seconds,
            "forwards": r.n_forwards,
            "exact": sum(a == b for a, b in zip(r.tokens, plain.tokens, strict=True)) / len(prompts),
        }
        if name.startswith("tree"):
            rows[name]["tree_size"] = tree.size
    add_ratios(rows)
    outputs = {name: r.tokens for name, r in results.items()}
    return {"decoders": rows, "table": format_table(rows), "outputs": outputs}


def bench_one_at_a_time(
    model: MultiTokenModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs: Any
) -> dict[str, Any]:
    """`bench_generate` on each prompt alone (batch 1), pooled: tokens, forwards and seconds summed over the
    prompts, then the ratios. Pooling weighs each token equally, so one prompt that loops (and drafts
    perfectly) cannot dominate as it would in a mean of per-prompt ratios.

    kwargs go to `bench_generate`. Returns {"decoders": rows, "table": str, "outputs": {name: [tokens of
    each prompt]}}.
    """
    per_prompt = [bench_generate(model, [p], max_new_tokens, **kwargs) for p in prompts]
    rows: dict[str, dict[str, Any]] = {}
    for name in per_prompt[0]["decoders"]:
        rs = [g["decoders"][name] for g in per_prompt]
        tokens = [r["tokens_per_second"] * r["seconds"] for r in rs]
        seconds = sum(r["seconds"] for r in rs)
        row_forwards = sum(t / r["tokens_per_forward"] for t, r in zip(tokens, rs, strict=True))
        rows[name] = {
            "tokens_per_forward": sum(tokens) / row_forwards,
            "tokens_per_second": sum(tokens) / seconds,
            "seconds": seconds,
            "forwards": sum(r["forwards"] for r in rs),
            "exact": sum(r["exact"] for r in rs) / len(rs),
        }
        if "tree_size" in rs[0]:
            rows[name]["tree_size"] = rs[0]["tree_size"]
    add_ratios(rows)
    outputs = {name: [g["outputs"][name][0] for g in per_prompt] for name in rows}
    return {"decoders": rows, "table": format_table(rows), "outputs": outputs}


def add_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """Set each row's `speedup` (against eager plain) and `efficiency` from its seconds and tokens per forward.

    A compiled decoder's efficiency is judged against compiled plain decoding (plain-c: the same step with
    one head), the others' against eager plain decoding.
    """
    for name, r in rows.items():
        baseline = rows["plain-c" if name.endswith("-c") else "plain"]
        r["speedup"] = rows["plain"]["seconds"] / r["seconds"]
        r["efficiency"] = baseline["seconds"] / r["seconds"] / r["tokens_per_forward"]


def _cuda_graphs():
    """Inductor's CUDA graphs on, as torch.compile(mode="reduce-overhead") would set them."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch({"triton.cudagraphs": True})


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A readable table of `bench_generate`'s rows."""
    header = f"{'decoder':<8} {'tok/fwd':>8} {'tok/s':>9} {'speedup':>8} {'effic.':>7} {'fwds':>6} {'exact':>6}"
    lines = [header, "-" * len(header)]
    for name, r in rows.items():
        lines.append(
            f"{name:<8} {r['tokens_per_forward']:>8.2f} {r['tokens_per_second']:>9.1f} {r['speedup']:>7.2f}x "
            f"{r['efficiency']:>7.2f} {r['forwards']:>6d} {r['exact']:>6.2f}"
        )
    return "\n".join(lines)


@torch.no_grad()
def time_blocks(
    model: MultiTokenModel, sizes: Sequence[int], context: int, heads: int | None = None, repeats: int = 20
) -> dict[int, float]:
    """Seconds per decode forward over a block of each size, with `context` positions cached (batch 1).

    The cost curve of verification: with it, a tree budget can be chosen by expected tokens per second,
    and one sees whether padding short blocks to a cheaper size pays.
    """
    heads_list = list(range(heads or model.cfg.n_future))
    device = model.tok_embeddings.weight.device
    cache = model.make_cache(1)
    costs = {}
    for size in sizes:
        tokens = torch.zeros(1, size, dtype=torch.long, device=device)
        positions = context + torch.arange(size, device=device)[None]  # (1, size)
        kv_len = context + size

        times = []
        for _ in range(repeats + 2):
            start = time.perf_counter()
            ctx = model.attention_context(size, positions, cache, kv_len=kv_len)
            z = model.run_heads(model.embed_and_trunk(tokens, ctx, cache), ctx, cache, heads_list)
            model.unembed(z[0]).argmax(-1).tolist()  # the step's sync
            times.append(time.perf_counter() - start)
        costs[size] = sorted(times[2:])[len(times[2:]) // 2]  # median after two warm-up runs
    return costs
