"""The decoding session: one loop for plain and self-speculative decoding.

A drafter says how a decode starts (the prefill) and what a step feeds and how it decides: `NextToken`
(autoregressive.py) feeds the pending token alone and samples head 1; `HeadDrafter` (speculative.py) feeds it
with the heads' drafts and verifies them; `ConditionedDrafter` (conditioned.py) does the same with
token-conditioned modules, which draft one after another. The session owns everything else, once: the cache,
the host sync, the stop rule (`max_new_tokens`, `eos_id`, the context end), streaming, compilation, CUDA graphs
and the statistics.

A step is a free function of tensors, `step(model, cache, index, root, pos, *proposal, kv_len, **constants)
-> (new, n_new, pos, *proposal)`: root (B,) the pending tokens at positions pos (B,), index the tree of nodes it
feeds (the one-node chain for plain decoding), new (B, D+1) the tokens gained of which the first n_new (B,)
count. Being free of hidden state, it can be compiled or captured in a CUDA graph as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

import torch

from multitoken.errors import UserError
from multitoken.generate.common import GenerationResult, TokenCallback, check_prompts
from multitoken.generate.graphs import CudaGraphStep, GraphSession
from multitoken.generate.sampling import SamplingConfig
from multitoken.generate.stats import AcceptanceHistogram, decode_stats
from multitoken.generate.tree import Tree, TreeIndex
from multitoken.kv_cache import ModelCache
from multitoken.model import MultiTokenModel

Proposal = tuple[torch.Tensor | None, ...]


class Drafter(Protocol):
    """What the session needs from a way of drafting tokens for head 1 to verify."""

    tree: Tree  # the nodes a step feeds per sequence; the root is the pending token
    heads: list[int]  # the heads the prefill and every verify forward run
    step: Callable[..., tuple[torch.Tensor | None, ...]]  # the step function (module docstring)

    def prepare(self, model: MultiTokenModel, sampling: SamplingConfig, device: torch.device) -> Drafter:
        """Check the drafter against the model; return it ready to run on `device`."""
        ...

    def start(
        self,
        model: MultiTokenModel,
        cache: ModelCache,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, Proposal]:
        """Prefill `cache` with the prompts (`common.prefill`, and whatever else the drafter's heads keep): the
        first token (B,), its position (B,) and the first proposal."""
        ...

    def graph_key(self) -> tuple[Any, ...]:
        """What a captured step depends on besides the model and the batch size (asked before `prepare`)."""
        ...

    def constants(self) -> dict[str, Any]:
        """The step's keyword arguments besides kv_len, sampling and generator."""
        ...

    def stats(self) -> dict[str, Any]:
        """What the statistics record says about the drafter."""
        ...


@torch.no_grad()
def decode(
    model: MultiTokenModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    drafter: Drafter,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    on_tokens: TokenCallback | None = None,
    stop_when: Callable[[int, list[int]], bool] | None = None,
    compile_step: bool = False,
    cuda_graphs: bool = False,
    graph_session: GraphSession | None = None,
) -> GenerationResult:
    """Decode up to `max_new_tokens` per prompt with `drafter`; prompts may differ in length.

    A sequence stops at `eos_id` (kept in its output), after `max_new_tokens` ("length"), when it fills the
    context ("context"), or when stop_when(row, its tokens so far) says so after a step ("stop"; e.g. a stop
    string appeared; the tokens of that step are kept). compile_step: run the step under `torch.compile` with
    a full-length, static-shaped cache read (the first steps pay for compilation). cuda_graphs: replay the
    step from a CUDA graph captured after its first run (graphs.py); CUDA and greedy only. graph_session:
    where the graphs and their cache are kept for the next call of the same shape (default: a new one,
    dropped at the end). on_tokens(row, tokens): called with each row's new tokens as soon as they are
    decided (e.g. to stream them).
    """
    check_prompts(model, prompts, max_new_tokens)
    if cuda_graphs:
        check_cuda_graphs(model, sampling)
    start = time.perf_counter()
    L, B = model.cfg.max_seq_len, len(prompts)
    if cuda_graphs:
        session = graph_session if graph_session is not None else GraphSession()
        key = (id(model), B, compile_step, *drafter.graph_key())
        cache, graphs = session.prepare(key, lambda: model.make_cache(B)), session.graphs
    else:
        cache = model.make_cache(B)
    device = cache.trunk[0].k.device
    drafter = drafter.prepare(model, sampling, device)
    tree = drafter.tree
    indices = {tree.size: TreeIndex.build(tree, device)}  # prefixes are added near the context limit
    step = torch.compile(drafter.step) if compile_step else drafter.step
    constants = dict(sampling=sampling, generator=generator, **drafter.constants())
    root, pos, proposal = drafter.start(model, cache, prompts, sampling, generator)  # (B,), (B,)
    new, n_new = root[:, None], torch.ones_like(root)

    lengths = [len(p) for p in prompts]
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    active = [max_new_tokens > 0] * B
    row_forwards = [1] * B
    histogram = AcceptanceHistogram(tree.depth)
    while True:
        new_host, n_host = new.tolist(), n_new.tolist()  # the one host sync of the step
        if max(row_forwards) > 1:  # a step ran: count what each row active in it accepted
            histogram.add([n_host[b] - 1 for b in range(B) if active[b]])
        for b in range(B):
            if not active[b]:
                continue
            taken = new_host[b][: n_host[b]]
            taken = taken[: min(max_new_tokens - len(out[b]), L - lengths[b] - len(out[b]))]
            if eos_id is not None and eos_id in taken:
                taken = taken[: taken.index(eos_id) + 1]
                active[b], reasons[b] = False, "eos"
            out[b].extend(taken)
            if on_tokens is not None and taken:
                on_tokens(b, taken)
            if not active[b]:
                continue
            if stop_when is not None and taken and stop_when(b, out[b]):
                active[b], reasons[b] = False, "stop"
            elif len(out[b]) == max_new_tokens:
                active[b] = False
            elif lengths[b] + len(out[b]) == L:
                active[b], reasons[b] = False, "context"
        if not any(active):
            break
        # The pending token of an active row is its last output, at position len(sequence) - 1. Near the
        # context end the tree shrinks to a prefix so no scratch slot falls outside the cache.
        last = max(lengths[b] + len(out[b]) - 1 for b in range(B) if active[b])
        size = min(tree.size, L - last)
        if size not in indices:
            indices[size] = TreeIndex.build(tree.prefix(size), device)
        # Finished rows keep running (static batch) below the active ones, so their slots stay readable.
        inputs = (root_of(new, n_new), pos.clamp(max=last), *proposal)
        if cuda_graphs:
            if size not in graphs:
                graphs[size] = CudaGraphStep(partial(step, model, cache, indices[size], kv_len=L, **constants))
            new, n_new, pos, *proposal = graphs[size](*inputs)
        else:
            kv_len = L if compile_step else last + size  # static shapes for the compiler
            new, n_new, pos, *proposal = step(model, cache, indices[size], *inputs, kv_len=kv_len, **constants)
        for b in range(B):
            row_forwards[b] += active[b]
    seconds = time.perf_counter() - start
    stats = decode_stats(out, row_forwards, seconds, histogram)
    stats.update(drafter.stats())
    return GenerationResult(out, max(row_forwards), reasons, seconds, stats)


def check_cuda_graphs(model: MultiTokenModel, sampling: SamplingConfig) -> None:
    """Raise UserError unless the step can be captured: a model on a CUDA device, greedy decoding."""
    if not sampling.greedy:
        raise UserError("CUDA graphs replay greedy decoding only; sample without them")
    device = model.tok_embeddings.weight.device
    if device.type != "cuda":
        raise UserError(f"CUDA graphs need the model on a CUDA device; it is on {device.type}")


def root_of(new: torch.Tensor, n_new: torch.Tensor) -> torch.Tensor:
    """The pending token of each row: the last of its new tokens (B,)."""
    return new.gather(1, (n_new - 1)[:, None])[:, 0]
