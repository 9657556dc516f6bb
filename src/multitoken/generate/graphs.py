"""The decode step as a CUDA graph: one replay per step instead of a launch per kernel.

A small model decodes launch-bound on a GPU: a naive eager loop (a 128M byte model, n = 8) accepted 3.39 bytes per
forward on an H200 and still ran at 0.89x plain decoding, because each verify forward launched hundreds of
tiny kernels from Python. A CUDA graph records those launches once and replays them with one call.

Graphs need fixed addresses and shapes. The decode step already has static shapes (a full-length cache read,
a fixed tree), the weights, the KV cache and the tree index keep their addresses for a whole generation,
and the step's changing tensors (the pending tokens, positions and drafts) are copied into buffers the graph
owns before each replay. The step's outputs are the graph's own tensors, overwritten by the next replay; the
decode loop reads them (one host sync) before it replays again.

Inductor's graphs (`torch.compile(mode="reduce-overhead")`) skip a function that writes into an input it
does not know to be static ("skipping cudagraphs due to mutated inputs"), and the step writes the KV cache
it is given, which is why the capture is done here. The step may be eager or compiled; either is captured
the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from multitoken.kv_cache import ModelCache

Tensors = tuple[torch.Tensor | None, ...]


class CudaGraphStep:
    """`fn(*tensors) -> tuple of tensors` run for real on its first call, then replayed from a CUDA graph.

    The first call is a real step (and the warm-up that capture needs: lazy initialisation, cuBLAS
    workspaces, compilation); the graph is captured right after it, which records kernels without running
    them, so the step's side effects (cache writes) happen exactly once per call. Later calls copy their
    tensors into the captured inputs and replay. None entries (an absent input, e.g. greedy decoding's
    draft distribution) pass through as None. Every call must give tensors of the first call's shapes,
    dtypes and devices.
    """

    def __init__(self, fn: Callable[..., Tensors]) -> None:
        self.fn = fn
        self.replay: Callable[[], None] | None = None
        self.inputs: Tensors = ()
        self.outputs: Tensors = ()

    def __call__(self, *tensors: torch.Tensor | None) -> Tensors:
        if self.replay is None:
            self.inputs = tuple(t.clone() if t is not None else None for t in tensors)
            result = warm_up(lambda: self.fn(*self.inputs))
            self.replay, self.outputs = capture(lambda: self.fn(*self.inputs))
            return result
        for buffer, t in zip(self.inputs, tensors, strict=True):
            if buffer is not None:
                buffer.copy_(t)
        self.replay()
        return self.outputs


def warm_up(run: Callable[[], Tensors]) -> Tensors:
    """`run()` for real on a side stream, as capture wants (PyTorch's notes on CUDA graphs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        result = run()
    torch.cuda.current_stream().wait_stream(stream)
    return result


def capture(run: Callable[[], Tensors]) -> tuple[Callable[[], None], Tensors]:
    """Record `run()`'s kernels without running them; return the graph's replay and its output tensors."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    return graph.replay, outputs


@dataclass
class GraphSession:
    """Graphs kept from one generation to the next of the same shape, with the KV cache they write.

    A graph reads and writes the tensors it was captured with, at their addresses, so the cache must outlive
    it; kept together, a later generation with the same model, batch size, tree and draft vocabulary replays
    at once instead of capturing again (a capture costs about one eager step, a real share of a short
    generation). `key` says what they were made for; `prepare` starts afresh for anything else. Stale cache
    slots are harmless: every slot a query can see is written earlier in the same generation.
    """

    key: tuple[Any, ...] = ()
    cache: ModelCache | None = None
    graphs: dict[int, CudaGraphStep] = field(default_factory=dict)  # by tree size

    def prepare(self, key: tuple[Any, ...], make_cache: Callable[[], ModelCache]) -> ModelCache:
        """The session's cache for a generation described by `key`, after dropping what another key left."""
        if key != self.key or self.cache is None:
            self.key, self.cache, self.graphs = key, make_cache(), {}
        return self.cache
