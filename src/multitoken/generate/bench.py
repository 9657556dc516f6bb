"""Compare plain, chain and tree decoding on one model and one set of prompts.

Speed is what counts, and tokens per forward only bounds it: a verify forward over a block of N tokens
costs more than a one-token forward (and on small CPU matmuls a block of 2-3 rows can cost more than one
of 4). `efficiency` = speedup / tokens per forward shows how much of the bound survives; `time_blocks`
measures the block cost curve itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from multitoken.generate.autoregressive import generate
from multitoken.generate.calibration import build_tree, choose_tree
from multitoken.generate.common import GenerationResult
from multitoken.generate.draft_vocab import DraftVocab
from multitoken.generate.graphs import GraphSession
from multitoken.generate.sampling import SamplingConfig
from multitoken.generate.speculative import speculative_generate
from multitoken.generate.tree import Calibration, Tree
from multitoken.model import MultiTokenModel

K = TypeVar("K")

# How a decoder's step runs besides eagerly: the suffix of its rows -> speculative_generate's flags.
STEP_MODES: dict[str, dict[str, bool]] = {
    "c": {"compile_step": True},
    "g": {"cuda_graphs": True},
    "cg": {"compile_step": True, "cuda_graphs": True},
}


def bench_generate(
    model: MultiTokenModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    heads_used: int | None = None,
    tree: Tree | None = None,
    repeats: int = 1,
    step_modes: Sequence[str] = (),
    draft_vocab: DraftVocab | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
) -> dict[str, Any]:
    """Plain vs chain (vs tree, if given) decoding, greedy or `sampling` (each run from generator seed
    `seed`): each decoder warmed up once, then timed `repeats` times (the fastest run counts).

    Each of `step_modes` (keys of STEP_MODES) adds rows plain-M, chain-M (and tree-M): the same decoders
    with the step compiled ("c"), replayed from CUDA graphs ("g") or both ("cg"), over a static full-length
    cache read; plain-M is the one-head chain, i.e. plain decoding through the same step. Speedups stay
    relative to eager plain; the warm-up run pays for compilation and capture. A `draft_vocab` adds rows
    chain-v (and tree-v): the same decoders with the drafts restricted to its tokens.

    Returns {"decoders": {name: {tokens_per_forward, tokens_per_second, speedup, efficiency, forwards,
    exact}}, "table": str, "outputs": {name: generated tokens per prompt}}. A step mode that fails on this
    platform (a compiler error, a graph that cannot be captured) leaves {"error": message} as its rows
    and the other rows stand; eager decoders never fail silently. `speedup` is against eager
    plain decoding; `efficiency` is the speedup against the plain decoder of the same kind (plain-M for
    the rows of step mode M) per token per forward, i.e. how much of the tokens per forward survives as speed
    once both sides have the same step machinery. `exact` is the fraction of prompts whose output equals
    plain decoding's (1.0 in fp32 on the CPU; in bf16 near-ties of head 1's top two logits can flip;
    None when sampling, whose decoders draw differently from the same seed).
    """
    device = model.tok_embeddings.weight.device

    def rng() -> torch.Generator:  # every run of every decoder draws from the same seed
        return torch.Generator(device).manual_seed(seed)

    def spec(**kwargs: Any) -> Callable[[int], GenerationResult]:
        session = GraphSession()  # the warm-up run captures the graphs (if any); the timed runs replay them
        return lambda n: speculative_generate(
            model, prompts, n, sampling=sampling, generator=rng(), graph_session=session, **kwargs
        )

    decoders: dict[str, Callable[[int], GenerationResult]] = {
        "plain": lambda n: generate(model, prompts, n, sampling=sampling, generator=rng()),
        "chain": spec(heads_used=heads_used),
    }
    if tree is not None:
        decoders["tree"] = spec(tree=tree)
    if draft_vocab is not None:
        decoders["chain-v"] = spec(heads_used=heads_used, draft_vocab=draft_vocab)
        if tree is not None:
            decoders["tree-v"] = spec(tree=tree, draft_vocab=draft_vocab)
    for mode in step_modes:
        if mode not in STEP_MODES:
            raise ValueError(f"step mode must be one of {', '.join(STEP_MODES)}, got {mode!r}")
        decoders[f"plain-{mode}"] = spec(heads_used=1, **STEP_MODES[mode])
        decoders[f"chain-{mode}"] = spec(heads_used=heads_used, **STEP_MODES[mode])
        if tree is not None:
            decoders[f"tree-{mode}"] = spec(tree=tree, **STEP_MODES[mode])
    results: dict[str, GenerationResult] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name, run in decoders.items():
        try:
            run(min(max_new_tokens, 8))  # warm-up: allocator, kernels, lazy initialisation, compilation
            results[name] = min((run(max_new_tokens) for _ in range(repeats)), key=lambda r: r.seconds)
        except Exception as e:  # a compiler or a graph capture that fails on this platform
            if step_mode(name) is None:
                raise
            rows[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    plain = results["plain"]
    for name, r in results.items():
        rows[name] = {
            "tokens_per_forward": r.stats.get("tokens_per_forward", 1.0),  # plain: one token per forward
            "tokens_per_second": r.n_generated / r.seconds,
            "seconds": r.seconds,
            "forwards": r.n_forwards,
            "exact": sum(a == b for a, b in zip(r.tokens, plain.tokens, strict=True)) / len(prompts)
            if sampling.greedy
            else None,
        }
        if name.startswith("tree"):
            rows[name]["tree_size"] = tree.size
    rows = {name: rows[name] for name in decoders}  # in the decoders' order, failed rows included
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
    each prompt]}, "per_prompt": [{name: tokens per forward} for each prompt]}.
    """
    per_prompt = [bench_generate(model, [p], max_new_tokens, **kwargs) for p in prompts]
    rows: dict[str, dict[str, Any]] = {}
    for name in per_prompt[0]["decoders"]:
        rs = [g["decoders"][name] for g in per_prompt]
        errors = [r["error"] for r in rs if "error" in r]
        if errors:
            rows[name] = {"error": errors[0]}
            continue
        tokens = [r["tokens_per_second"] * r["seconds"] for r in rs]
        seconds = sum(r["seconds"] for r in rs)
        row_forwards = sum(t / r["tokens_per_forward"] for t, r in zip(tokens, rs, strict=True))
        rows[name] = {
            "tokens_per_forward": sum(tokens) / row_forwards,
            "tokens_per_second": sum(tokens) / seconds,
            "seconds": seconds,
            "forwards": sum(r["forwards"] for r in rs),
            "exact": None if rs[0]["exact"] is None else sum(r["exact"] for r in rs) / len(rs),
        }
        if "tree_size" in rs[0]:
            rows[name]["tree_size"] = rs[0]["tree_size"]
    add_ratios(rows)
    outputs = {name: [g["outputs"][name][0] for g in per_prompt] for name in rows if "error" not in rows[name]}
    tokens_per_forward = [
        {name: r["tokens_per_forward"] for name, r in g["decoders"].items() if "error" not in r} for g in per_prompt
    ]
    return {"decoders": rows, "table": format_table(rows), "outputs": outputs, "per_prompt": tokens_per_forward}


def add_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """Set each row's `speedup` (against eager plain) and `efficiency` from its seconds and tokens per forward.

    A decoder of step mode M (compiled, CUDA graphs) is judged against plain decoding through the same step
    (plain-M: the step with one head), the others against eager plain decoding.
    """
    for name, r in rows.items():
        if "error" in r:
            continue
        mode = step_mode(name)
        baseline = rows[f"plain-{mode}" if mode else "plain"]
        r["speedup"] = rows["plain"]["seconds"] / r["seconds"]
        r["efficiency"] = None if "error" in baseline else baseline["seconds"] / r["seconds"] / r["tokens_per_forward"]


def step_mode(name: str) -> str | None:
    """The step mode of a decoder row ("chain-cg" -> "cg"), or None for an eager decoder."""
    mode = name.rpartition("-")[2]
    return mode if "-" in name and mode in STEP_MODES else None


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A readable table of `bench_generate`'s rows."""
    header = f"{'decoder':<8} {'tok/fwd':>8} {'tok/s':>9} {'speedup':>8} {'effic.':>7} {'fwds':>6} {'exact':>6}"
    lines = [header, "-" * len(header)]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"{name:<8} failed: {r['error']}")
            continue
        efficiency = "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        exact = "-" if r["exact"] is None else f"{r['exact']:.2f}"
        lines.append(
            f"{name:<8} {r['tokens_per_forward']:>8.2f} {r['tokens_per_second']:>9.1f} {r['speedup']:>7.2f}x "
            f"{efficiency:>7} {r['forwards']:>6d} {exact:>6}"
        )
    return "\n".join(lines)


def seconds_per_step(
    decoders: Mapping[K, Callable[[int], GenerationResult]], short: int = 16, long: int = 48, rounds: int = 3
) -> dict[K, float]:
    """Seconds per decoding step of each `decode(max_new_tokens)`, the prefill left out: the difference between
    a `long` and a `short` generation (fastest of `rounds` each) over the difference of their forwards. This
    is what a step costs in the real loop, its bookkeeping and host sync included.

    The decoders run round by round (each one's short and long generation, then the next decoder's), so that
    a slow spell of a shared machine falls on every decoder's slower runs rather than on all of one's.
    """
    for decode in decoders.values():
        decode(min(short, 8))  # warm-up
    fastest: dict[tuple[K, int], GenerationResult] = {}
    for _ in range(rounds):
        for key, decode in decoders.items():
            for n in (short, long):
                result = decode(n)
                if (key, n) not in fastest or result.seconds < fastest[key, n].seconds:
                    fastest[key, n] = result
    seconds = {}
    for key in decoders:
        steps = fastest[key, long].n_forwards - fastest[key, short].n_forwards
        if steps <= 0:
            raise ValueError(f"decoding {long} tokens took no more forwards than {short}")
        seconds[key] = (fastest[key, long].seconds - fastest[key, short].seconds) / steps
    return seconds


def choose_tree_by_speed(
    model: MultiTokenModel,
    calibration: Calibration,
    prompt: Sequence[int],
    budgets: Sequence[int],
    draft_vocab: DraftVocab | None = None,
    tokens: int = 48,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
) -> tuple[Tree, list[dict[str, Any]], float]:
    """`choose_tree` with each tree's decoding step timed on this machine, continuing `prompt` for up to
    `tokens` tokens with `sampling`, against a plain decoding step timed in the same rounds (`seconds_per_step`).

    Returns the chosen tree, one row per budget (see `choose_tree`) and the plain step's seconds.
    """

    def decoder(tree: Tree | None) -> Callable[[int], GenerationResult]:
        if tree is None:
            return lambda n: generate(model, [prompt], n, sampling=sampling, generator=generator)
        return lambda n: speculative_generate(
            model, [prompt], n, sampling=sampling, generator=generator, tree=tree, draft_vocab=draft_vocab
        )

    trees = [None, *dict.fromkeys(build_tree(calibration, b) for b in budgets)]  # plain, then each distinct tree
    seconds = seconds_per_step({tree: decoder(tree) for tree in trees}, long=tokens)
    tree, rows = choose_tree(calibration, budgets, seconds.__getitem__, seconds[None])
    return tree, rows, seconds[None]


@torch.no_grad()
def time_blocks(
    model: MultiTokenModel, sizes: Sequence[int], context: int, heads: int | None = None, repeats: int = 20
) -> dict[int, float]:
    """Seconds per decode forward over a block of each size, with `context` positions cached (batch 1).

    The cost curve of verification: it shows how a verify forward's cost grows with its block, and whether
    padding short blocks to a cheaper size pays. (`calibrate --budget auto` times whole decoding steps
    instead, with `seconds_per_step`.)
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
