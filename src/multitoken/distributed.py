"""Data-parallel training under torchrun: process groups, and DDP-style or FSDP2 parallelism that fits the
memory-efficient multi-head step.

`torchrun --nproc_per_node N -m multitoken train ...` (multi-node: torchrun's --nnodes/--rdzv-* flags) sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `setup_distributed` reads them. Every rank
trains on its own slice of one global batch and keeps a full copy ("ddp") or a shard ("fsdp") of the
model.

Why the stock wrappers do not fit as is: the sequential step (loss.py) never calls the model's `forward`;
it calls its pieces (`embed_and_trunk`, each head, `unembed` once per chunk per head) and runs one
backward per chunk, one per head and a last one through the trunk. `DistributedDataParallel` arms its
gradient reducer only inside its own `forward`, so it would reduce nothing; FSDP2 hooks module calls
and would, left alone, reduce-scatter the shared unembedding's gradient after every chunk's backward.
So: "ddp" averages gradients itself, and "fsdp" places its shard groups and toggles so that each
parameter is reduced exactly once per step (see `FSDPParallel`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from multitoken.errors import UserError
from multitoken.model import MultiTokenModel

STRATEGIES = ("auto", "none", "ddp", "fsdp")
# "auto" shards models from this size on. DDP keeps fp32 weights, gradients and both AdamW moments on every
# rank: 16 bytes per parameter, 16 GB at 1B before any activation, a fifth of an 80 GB GPU. Below that one
# all-reduce per step is cheaper than FSDP's per-block all-gathers; above it sharding buys batch size.
FSDP_MIN_PARAMS = 1_000_000_000
# Bucket size of the "ddp" gradient all-reduce: large enough to amortise launch cost, small enough that the
# flattened copy stays a small fraction of the gradients.
BUCKET_BYTES = 25 * 2**20


@dataclass
class DistEnv:
    """Where this process sits: rank, world size, device, and whether it created the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes metrics, progress and single-file checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """The mean of `values` over ranks (the identity on one process)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def from_main(self, value: float) -> float:
        """Rank 0's `value` on every rank (for decisions that must agree, such as a time budget)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def main_first(self, fn):
        """Run `fn` on rank 0, then (if it succeeded) on the other ranks; return its result.

        For work that writes shared files (token-store cache, run directory): rank 0 does it, the others
        then find it done. A UserError on rank 0 is raised on every rank, with its message, instead of
        leaving the others waiting at a barrier.
        """
        error: list[str | None] = [None]
        result = None
        if self.is_main:
            try:
                result = fn()
            except UserError as e:
                error[0] = str(e)
                if not self.distributed:
                    raise
        if self.distributed:
            dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise UserError(error[0])
        return result if self.is_main else fn()

    def close(self) -> None:
        """Destroy the process group if this process created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup_distributed(device: torch.device | None = None, timeout_s: float = 600.0) -> DistEnv:
    """The DistEnv of this process: from torchrun's environment, or an already initialised group, or single.

    Backend nccl on CUDA (each rank on cuda:LOCAL_RANK), gloo on the CPU. `timeout_s` bounds how long a
    collective waits for a dead peer before raising.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=False)
    if world <= 1:
        return DistEnv(device=device)
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserError(f"WORLD_SIZE={world} but {var} is not set; launch with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=True)


def resolve_strategy(requested: str, n_params: int, world_size: int) -> str:
    """The parallelism to use: "none" on one process; "auto" is fsdp from FSDP_MIN_PARAMS parameters on."""
    if requested not in STRATEGIES:
        raise UserError(f"unknown parallel strategy {requested!r}; choose one of {', '.join(STRATEGIES)}")
    if world_size == 1:
        return "none"  # nothing to replicate or shard
    if requested == "auto":
        return "fsdp" if n_params >= FSDP_MIN_PARAMS else "ddp"
    if requested == "none":
        raise UserError(f"parallel strategy 'none' cannot run on {world_size} processes; use ddp or fsdp")
    return requested


def checkpoint_activations(blocks: nn.ModuleList) -> None:
    """Recompute each block's activations in backward instead of storing them (non-reentrant checkpoint).

    The wrapper replaces the instance's `forward`, so parameter names (and checkpoints) are unchanged and
    module hooks (FSDP's unshard) still run around the call.
    """
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


# --------------------------------------------------------------------------------------------------
# parallelism strategies: each wraps the model once, then brackets every micro-batch's backward


class Parallelism:
    """One process, nothing to do: the base of the data-parallel strategies."""

    name = "none"
    sharded = False  # whether the model's parameters are shards (checkpoints then go through DCP)

    def __init__(self, env: DistEnv) -> None:
        self.env = env

    def wrap(self, model: MultiTokenModel) -> MultiTokenModel:
        return model

    def before_backward(self, last_micro_batch: bool) -> None:
        """Called before each micro-batch's step; `last_micro_batch` is the one whose gradients are reduced."""

    def after_backward(self, model: nn.Module) -> None:
        """Called once all micro-batches of an optimizer step are back-propagated."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip the global gradient norm to `max_norm`; return the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


class DDPParallel(Parallelism):
    """Replicated model, gradients averaged over ranks once per optimizer step, overlapped with the backward.

    The sequential step back-propagates several times per step (each loss chunk, each head, the trunk), so
    "when is a gradient final" is not "when the backward ends". What holds for every head type and both
    loss paths: each block (trunk or head) gets its gradient in exactly one backward per micro-batch (a head
    in its own backward, a trunk block in the trunk backward). On the last micro-batch (earlier ones only
    accumulate, as DDP's `no_sync`) a per-parameter hook counts the arrivals of each block's gradients and,
    when the block's last one lands, launches that block's all-reduce asynchronously: it runs while the next
    head or the next trunk block computes. Only the shared parameters (embedding, final norm, unembedding),
    to which every head's backward adds, are reduced after the backward, in buckets. Every parameter is
    reduced exactly once; a parameter no rank used gets no gradient, as with DDP. Collectives are issued in
    backward order, which is the same on every rank.
    """

    name = "ddp"

    def __init__(self, env: DistEnv) -> None:
        super().__init__(env)
        self._blocks: list[list[nn.Parameter]] = []
        self._shared: list[nn.Parameter] = []
        self._arrivals: list[int] = []
        self._armed = False
        self._in_flight: list[tuple[dist.Work, torch.Tensor, list[torch.Tensor]]] = []
        self.overlapped = 0  # blocks whose all-reduce the last step launched inside the backward

    def wrap(self, model: MultiTokenModel) -> MultiTokenModel:
        # Same seed gives the same init on every rank; broadcasting makes it a guarantee.
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t, src=0)
        self._blocks = [[p for p in block.parameters() if p.requires_grad] for block in [*model.trunk, *model.heads]]
        in_blocks = {id(p) for params in self._blocks for p in params}
        self._shared = [p for p in model.parameters() if p.requires_grad and id(p) not in in_blocks]
        for b, params in enumerate(self._blocks):
            for p in params:
                p.register_post_accumulate_grad_hook(lambda _p, b=b: self._arrived(b))
        return model

    def before_backward(self, last_micro_batch: bool) -> None:
        self._armed = last_micro_batch
        self._arrivals = [0] * len(self._blocks)
        self._in_flight, self.overlapped = [], 0

    @torch.compiler.disable
    def _arrived(self, b: int) -> None:
        if not self._armed:
            return
        self._arrivals[b] += 1
        if self._arrivals[b] == len(self._blocks[b]):  # the block's gradients are final: reduce them now
            grads = [p.grad for p in self._blocks[b]]
            flat = _flatten_dense_tensors(grads)
            self._in_flight.append((dist.all_reduce(flat, async_op=True), flat, grads))
            self.overlapped += 1

    def after_backward(self, model: nn.Module) -> None:
        self._armed = False
        shared = [p.grad for p in self._shared if p.grad is not None]
        for bucket in _buckets(shared, BUCKET_BYTES):
            flat = _flatten_dense_tensors(bucket)
            self._in_flight.append((dist.all_reduce(flat, async_op=True), flat, bucket))
        for work, flat, grads in self._in_flight:
            work.wait()
            flat /= self.env.world_size
            for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(reduced)
        self._in_flight = []


def _buckets(tensors: list[torch.Tensor], max_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of same-dtype tensors of at most `max_bytes` each (a larger tensor goes alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not out or size + nbytes > max_bytes or out[-1][0].dtype != t.dtype:
            out.append([])
            size = 0
        out[-1].append(t)
        size += nbytes
    return out


class FSDPParallel(Parallelism):
    """FSDP2 (`fully_shard`): one shard group per trunk block and per head; embedding, final norm and
    unembedding in the root group.

    What FSDP2 does on each call of the sequential step, and the settings that make it right and fast:

    - Root group (embedding, norm, output; a tied output weight is the embedding's, so they must share a
      group). FSDP2 leaves the root unsharded after its forward (`embed_and_trunk`, registered as a
      forward method so the root's hooks run). So the shared norm+output is all-gathered once per step
      and stays unsharded across every `unembed` call of the head loop; those calls are not the root's
      forward, so they run no hooks at all and the per-chunk backwards accumulate plain gradients.
    - The head backwards do run FSDP's end-of-backward callback, which would reduce-scatter and reshard
      the root's partial gradients after each head. `before_backward` therefore turns off gradient sync
      and reshard-after-backward for the root (not recursively) and marks the backward as not the last;
      a hook on the trunk output turns them back on as the trunk backward begins, so the root's
      accumulated gradient is reduce-scattered once, at the end, and the root is resharded after it.
    - Heads keep `reshard_after_forward=False` (parallel and linear heads): a head's parameters stay
      gathered from its forward to its backward, one all-gather per head instead of two. Each head's
      reduce-scatter is issued in its own backward and overlaps the next head's compute, which recovers
      the comm/compute overlap the paper lost (7-22%) when separate head backwards defeated FSDP's.
      Chained (causal/anticausal) heads all run forward before any backward, so they reshard.
    - Trunk blocks prefetch the next block's all-gather in forward (and the first head's); backward
      prefetch is FSDP's default.

    On CUDA parameters compute in bf16 and gradients are reduced in fp32.
    """

    name = "fsdp"
    sharded = True

    def __init__(self, env: DistEnv, mixed_precision: bool | None = None) -> None:
        super().__init__(env)
        self.mixed_precision = env.device.type == "cuda" if mixed_precision is None else mixed_precision
        self.root: nn.Module | None = None

    def wrap(self, model: MultiTokenModel) -> MultiTokenModel:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kw = {"mp_policy": mp} if self.mixed_precision else {}
        chained = model.cfg.head_kind.chained
        for block in model.trunk:
            fully_shard(block, **kw)
        for head in model.heads:
            fully_shard(head, reshard_after_forward=chained, **kw)
        fully_shard(model, **kw)
        # The sequential step and evaluation enter through these methods, never through forward.
        register_fsdp_forward_method(model, "embed_and_trunk")
        order = [*model.trunk, model.heads[model.head_order()[0]]]
        for block, nxt in zip(order, order[1:], strict=False):
            block.set_modules_to_forward_prefetch([nxt])
        model.trunk[-1].register_forward_hook(self._hook_trunk_output)
        self.root = model
        return model

    def _hook_trunk_output(self, module: nn.Module, args, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(self._trunk_backward_begins)

    @torch.compiler.disable
    def _trunk_backward_begins(self, grad: torch.Tensor) -> None:
        # Only the last micro-batch's trunk backward reduces (grad accumulation without communication).
        if self._sync:
            self._set_root_deferred(False)
        return None

    def _set_root_deferred(self, deferred: bool) -> None:
        assert self.root is not None
        self.root.set_requires_gradient_sync(not deferred, recurse=False)
        self.root.set_reshard_after_backward(not deferred, recurse=False)
        self.root.set_is_last_backward(not deferred)

    def before_backward(self, last_micro_batch: bool) -> None:
        assert self.root is not None
        self._sync = last_micro_batch
        # Blocks and heads reduce in their own (single) backward, except on non-final micro-batches.
        self.root.set_requires_gradient_sync(last_micro_batch, recurse=True)
        self._set_root_deferred(True)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        # DTensor-aware: the norm of sharded gradients is a DTensor reduced across ranks.
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def make_parallelism(strategy: str, env: DistEnv) -> Parallelism:
    """The strategy object for a resolved strategy name."""
    cls = {"none": Parallelism, "ddp": DDPParallel, "fsdp": FSDPParallel}[strategy]
    return cls(env)
