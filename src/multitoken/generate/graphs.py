"""The decode step as a CUDA graph: one replay per step instead of a launch per kernel.

A small model decodes launch-bound on a GPU: the naive eager loop of DESIGN.md §5 accepted 3.39 bytes per
forward on an H200 and still ran at 0.89x plain decoding, because each verify forward launched hundreds of
tiny kernels from Python. A CUDA graph records those launches once and replays them with one call.

Graphs need fixed addresses and shapes. The decode step already has static shapes (a full-length cache read,
a fixed tree), the weights, the KV cache and the tree index keep their addresses for a whole generation,
and the step's changing tensors (the pending tokens, positions and drafts) are copied into buffers the graph
owns before each replay. The step's outputs are the graph's own tensors, overwritten by the next replay; the
decode loop reads them (one host sync) before it replays again.

Inductor's graphs (`torch.compile(mode="reduce-overhead")`) skip a function that writes into a tensor it is
given, and the step writes the KV cache it is given, which is why the capture is done here. The step may be
eager or compiled; either is captured the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: Tensors = ()
        self.outputs: Tensors = ()

    def __call__(self, *tensors: torch.Tensor | None) -> Tensors:
        if self.graph is None:
            return self._run_and_capture(tensors)
        for buffer, t in zip(self.inputs, tensors, strict=True):
            if buffer is not None:
                buffer.copy_(t)
        self.graph.replay()
        return self.outputs

    def _run_and_capture(self, tensors: Tensors) -> Tensors:
        self.inputs = tuple(t.clone() if t is not None else None for t in tensors)
        # Capture wants the step warmed up on a side stream (PyTorch's CUDA graph notes).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            result = self.fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.fn(*self.inputs)
        return result
