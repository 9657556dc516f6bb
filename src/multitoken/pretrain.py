"""The training loop as functions: data, optimizer, schedule, step, evaluation, save and resume.

No module-level state. `train` runs a whole job; its parts (`build_optimizer`, `lr_at`, `train_step`,
`evaluate`) are usable on their own. On the CPU in fp32 a resumed run reproduces the losses of an
uninterrupted one exactly: batches depend only on (seed, step), and the optimizer state and step are
restored from the checkpoint.

Under torchrun each of the N processes trains on its slice of one global batch of N * batch_size windows
(`RankSampler`), with replicated ("ddp") or sharded ("fsdp") weights (distributed.py); rank 0 alone logs,
shows progress and writes single-file checkpoints; sharded runs checkpoint through DCP (dcp.py).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multitoken.checkpoint import CONFIG_FILE as RUN_CONFIG_FILE
from multitoken.checkpoint import (
    atomic_write_text,
    latest_checkpoint,
    load_optimizer,
    load_weights,
    read_checkpoint_state,
    read_run_config,
    remove_stale_temps,
    save_checkpoint,
    write_run_config,
)
from multitoken.config import ModelConfig, TrainConfig
from multitoken.data.dataset import WindowSampler, iter_eval_windows
from multitoken.data.prepare import DataBundle, bytes_per_token, prepare_data
from multitoken.data.tokenizers import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from multitoken.data.tokenizers import TOKENIZER_FILE, load_tokenizer
from multitoken.dcp import is_sharded, load_sharded_checkpoint, save_sharded_checkpoint
from multitoken.distributed import (
    DistEnv,
    Parallelism,
    checkpoint_activations,
    make_parallelism,
    resolve_strategy,
    setup_distributed,
)
from multitoken.errors import CheckpointError, UserError
from multitoken.loop import budget_clock, training_loop
from multitoken.loss import LossReport, evaluate_heads, sequential_backward, shift_targets, summed_loss
from multitoken.model import MultiTokenModel

METRICS_FILE = "metrics.jsonl"
# What a new run writes before its first checkpoint; a directory holding only these is a start that failed.
STARTED_FILES = (RUN_CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, METRICS_FILE)


class TrainingDiverged(UserError):
    """A non-finite loss: the run stops and its last good checkpoint stays in place."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_context(device: torch.device, bf16: bool | None = None):
    """bf16 autocast (fp32 master weights) if `bf16`, by default on CUDA only; plain fp32 elsewhere (exactness
    on the CPU)."""
    if device.type == "cuda" if bf16 is None else bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# --------------------------------------------------------------------------------------------------
# optimisation


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=False)


class RankSampler:
    """One rank's rows of the global batch of a step.

    The global batch (`global_batch` windows) is a pure function of (seed, step), whatever the number of
    processes: N processes with batch B train on exactly the windows one process with batch N * B sees,
    and a run resumed on another number of processes continues the same stream of data.
    """

    def __init__(
        self, tokens: np.ndarray, global_batch: int, window: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if global_batch % world_size:
            raise UserError(f"a global batch of {global_batch} windows does not split over {world_size} processes")
        per_rank = global_batch // world_size
        self.sampler = WindowSampler(tokens, global_batch, window, seed)
        self.rows = slice(rank * per_rank, (rank + 1) * per_rank)

    def sample(self, step: int) -> torch.Tensor:
        """(global_batch / world_size, window) int64 token ids of this rank."""
        return self.sampler.sample(step)[self.rows]


def train_step(
    model: MultiTokenModel,
    optimizer: torch.optim.Optimizer,
    sampler: WindowSampler | RankSampler,
    step: int,
    cfg: TrainConfig,
    lr: float,
    device: torch.device,
    parallel: Parallelism | None = None,
    bf16: bool | None = None,
) -> tuple[LossReport, float]:
    """One optimizer step over `grad_accum` micro-batches; returns the mean loss report and grad norm.

    `parallel` (default: one process) reduces gradients across ranks; the returned loss is averaged over
    ranks, so every rank sees the same report. `bf16`: autocast (`autocast_context`; default on CUDA). Raises
    TrainingDiverged before touching the weights if the loss is not finite (on every rank at once).
    """
    parallel = parallel or Parallelism(DistEnv(device=device))
    n = model.cfg.n_future
    total, per_head = 0.0, [0.0] * n
    for micro in range(cfg.grad_accum):
        parallel.before_backward(last_micro_batch=micro == cfg.grad_accum - 1)
        window = sampler.sample(step * cfg.grad_accum + micro).to(device)  # (B, context + n_future)
        inputs, targets = shift_targets(window, n)
        with autocast_context(device, bf16):
            if cfg.sequential:
                report = sequential_backward(
                    model, inputs, targets, cfg.head_weights, cfg.loss_chunk, loss_scale=1.0 / cfg.grad_accum
                )
            else:
                loss, report = summed_loss(model, inputs, targets, cfg.head_weights)
                (loss / cfg.grad_accum).backward()
        total += report.total / cfg.grad_accum
        per_head = [a + b / cfg.grad_accum for a, b in zip(per_head, report.per_head, strict=True)]
    parallel.after_backward(model)
    total, *per_head = parallel.env.mean([total, *per_head])
    return LossReport(total, per_head), apply_update(model, optimizer, total, step, lr, cfg, parallel)


def apply_update(
    model: MultiTokenModel,
    optimizer: torch.optim.Optimizer,
    loss: float,
    step: int,
    lr: float,
    cfg: TrainConfig,
    parallel: Parallelism | None = None,
) -> float:
    """The optimizer step after a backward gave `loss`: clip the gradients to `cfg.grad_clip`, step at `lr`,
    clear them; returns the norm before clipping. Raises TrainingDiverged, the weights untouched, if the loss
    is not finite."""
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"loss became {loss} at step {step}; stopped, the last good checkpoint is kept")
    grad_norm = (parallel or Parallelism(DistEnv())).clip_grad_norm(model, cfg.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# --------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(
    model: MultiTokenModel,
    tokens: np.ndarray,
    context: int,
    batch_size: int = 8,
    max_batches: int | None = 8,
    chunk: int = 1024,
    bytes_per_token: float | None = None,
) -> dict[str, Any]:
    """Per-head loss, top-1 accuracy and agreement with head 1 on held-out windows.

    `bytes_per_token` (1.0 for byte models) adds bits per byte. Agreement of head i is how often its
    top-1 equals what head 1 predicts i-1 positions later: a forecast of self-speculative acceptance.
    """
    was_training = model.training
    model.eval()
    device = model.tok_embeddings.weight.device
    n = model.cfg.n_future
    sums: dict[str, torch.Tensor] = {}
    for window in iter_eval_windows(tokens, batch_size, context + n, max_batches):
        inputs, targets = shift_targets(window.to(device), n)
        with autocast_context(device):
            stats = evaluate_heads(model, inputs, targets, chunk)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0) + v
    model.train(was_training)
    loss = (sums["loss_sum"] / sums["count"]).tolist()
    result: dict[str, Any] = {
        "loss": loss,
        "accuracy": (sums["correct"] / sums["count"]).tolist(),
        "agreement_with_head1": (sums["agree"] / sums["agree_count"]).tolist(),
        "tokens": int(sums["count"][0]),
    }
    if bytes_per_token:
        result["bits_per_byte"] = [x / math.log(2) / bytes_per_token for x in loss]
    return result


# --------------------------------------------------------------------------------------------------
# the job


@dataclass
class RunResult:
    run_dir: Path
    step: int
    seconds: float
    tokens_seen: int
    final_eval: dict[str, Any] | None
    losses: list[float] = field(default_factory=list)


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(run_dir: Path, step: int) -> dict[str, Any] | None:
    """Drop metrics logged after `step` by a run that died before checkpointing them (atomically: a kill
    leaves the old file or the new one). Returns the last eval record kept at `step`, if any."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return None
    records = [(line, json.loads(line)) for line in path.read_text().splitlines() if line]
    kept = [(line, record) for line, record in records if record["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line, _ in kept))
    evals = [record for _, record in kept if record.get("kind") == "eval"]
    if evals and evals[-1]["step"] == step:
        return {k: v for k, v in evals[-1].items() if k not in ("step", "kind")}
    return None


def _is_compile_error(exc: BaseException) -> bool:
    """Whether `exc` came from torch.compile (Dynamo tracing or a backend such as Inductor)."""
    import torch._dynamo.exc as dynamo_exc

    return isinstance(exc, dynamo_exc.TorchDynamoException) or type(exc).__module__.startswith(
        ("torch._dynamo", "torch._inductor")
    )


def compile_blocks(model: MultiTokenModel, backend: str | Callable = "inductor") -> None:
    """torch.compile each trunk and head block in place (the hot, shape-stable part of the step).

    The loss loop stays eager: its chunk count and the per-head control flow would only add recompiles.
    Compilation happens lazily at the first call; `uncompile_blocks` undoes it.
    """
    for block in [*model.trunk, *model.heads]:
        block.compile(backend=backend)


def uncompile_blocks(model: MultiTokenModel) -> None:
    """Back to eager: drop the compiled call that `nn.Module.compile` installed on each block."""
    for block in [*model.trunk, *model.heads]:
        block._compiled_call_impl = None


def train(
    run_dir: Path,
    model_cfg: ModelConfig | None,
    cfg: TrainConfig | None,
    sources: Sequence[str | Path] = (),
    tokenizer: str = "bytes",
    bpe_vocab_size: int = 8192,
    cache_dir: Path | None = None,
    resume: bool = False,
    device: torch.device | None = None,
    progress: bool = True,
    on_step: Callable[[int, LossReport], None] | None = None,
    overrides: dict[str, Any] | None = None,
    parallel: str = "auto",
    activation_checkpointing: bool = False,
    compile_backend: str | Callable = "inductor",
    tensorboard: str | Path | None = None,
    peak_tflops: float | None = None,
) -> RunResult:
    """Train a model in `run_dir` (new, or resumed from its latest checkpoint).

    On resume the run's own config.json is used; `overrides` may change the budget fields
    (max_steps, time_budget_s). `sources` empty means the standard library of the running Python.

    Under torchrun (WORLD_SIZE > 1) every process calls this; `parallel` is "auto" (fsdp for models of
    FSDP_MIN_PARAMS parameters or more, else ddp), "ddp", "fsdp" or "none" (one process only).
    `cfg.batch_size` is per process; a resumed run keeps its global batch and splits it over the processes
    it now has. `activation_checkpointing` recomputes trunk blocks in backward. With `cfg.compile`, a
    compile failure at the first step falls back to eager with a warning. `on_step` runs on every rank.
    `tensorboard`: also write the metrics there as TensorBoard scalars (rank 0), with MFU if `peak_tflops`.
    """
    env = setup_distributed(device)
    try:
        return _train(
            env,
            Path(run_dir),
            model_cfg,
            cfg,
            sources,
            tokenizer,
            bpe_vocab_size,
            cache_dir,
            resume,
            progress,
            on_step,
            overrides,
            parallel,
            activation_checkpointing,
            compile_backend,
            tensorboard,
            peak_tflops,
        )
    finally:
        env.close()


def _train(
    env: DistEnv,
    run_dir: Path,
    model_cfg: ModelConfig | None,
    cfg: TrainConfig | None,
    sources: Sequence[str | Path],
    tokenizer: str,
    bpe_vocab_size: int,
    cache_dir: Path | None,
    resume: bool,
    progress: bool,
    on_step: Callable[[int, LossReport], None] | None,
    overrides: dict[str, Any] | None,
    parallel_name: str,
    activation_checkpointing: bool,
    compile_backend: str | Callable,
    tensorboard: str | Path | None,
    peak_tflops: float | None,
) -> RunResult:
    device = env.device
    cache_dir = Path(cache_dir) if cache_dir else run_dir.parent / ".multitoken-cache"
    started_world = env.world_size
    if resume:
        saved = read_run_config(run_dir)
        model_cfg = ModelConfig.from_dict(saved["model"])
        cfg = TrainConfig.from_dict({**saved["train"], **(overrides or {})})
        sources = saved["data"]["sources"]
        started_world = saved.get("parallel", {}).get("world_size", 1)
    else:
        assert model_cfg is not None and cfg is not None
        from multitoken.data.corpus import default_corpus_paths

        sources = [str(s) for s in (sources or default_corpus_paths())]

    def load_data() -> tuple[DataBundle, ModelConfig]:
        """Rank 0 first: it tokenises into the shared cache and creates the run directory."""
        if env.is_main and not resume and (run_dir / RUN_CONFIG_FILE).exists():
            if latest_checkpoint(run_dir) is not None:
                raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
            for name in STARTED_FILES:  # a start that failed before its first checkpoint: begin again
                (run_dir / name).unlink(missing_ok=True)
        if env.is_main and resume:
            remove_stale_temps(run_dir)
        # Other ranks reuse the tokenizer rank 0 built (a BPE is trained once) and its token store.
        tok = load_tokenizer(run_dir) if resume or not env.is_main else tokenizer
        data = prepare_data(sources, tok, cache_dir, cfg.val_fraction, bpe_vocab_size)
        mcfg = model_cfg
        if mcfg.vocab_size != data.tokenizer.vocab_size:
            mcfg = mcfg.replace(vocab_size=data.tokenizer.vocab_size)
        if cfg.context > mcfg.max_seq_len:
            raise UserError(f"context {cfg.context} exceeds the model's max_seq_len {mcfg.max_seq_len}")
        if env.is_main and not resume:
            run_dir.mkdir(parents=True, exist_ok=True)
            data.tokenizer.save(run_dir)
            sections = {"sources": list(map(str, sources)), "tokenizer": data.tokenizer.kind}
            write_run_config(
                run_dir,
                mcfg,
                train=cfg.to_dict(),
                data={**sections, "n_documents": data.n_documents},
                parallel={"world_size": env.world_size},  # the global batch on resume is batch_size * this
            )
        return data, mcfg

    data, model_cfg = env.main_first(load_data)
    window = cfg.context + model_cfg.n_future
    global_batch = cfg.batch_size * started_world
    sampler = RankSampler(data.store.train, global_batch, window, cfg.seed, env.rank, env.world_size)
    can_eval = len(data.store.val) >= window

    torch.manual_seed(cfg.seed)
    model = MultiTokenModel(model_cfg)
    model.reset_parameters(seed=cfg.seed)
    model.to(device).train()
    strategy = resolve_strategy(parallel_name, model.num_parameters(), env.world_size)
    par = make_parallelism(strategy, env)

    ckpt = latest_checkpoint(run_dir) if resume else None
    state: dict[str, Any] = {}
    if ckpt is not None:
        # Rank 0 verifies every file's hash; the others check sizes (a missing shard is caught either way).
        state = env.main_first(lambda: read_checkpoint_state(ckpt, verify=env.is_main))
        if not is_sharded(state):
            load_weights(ckpt, model)  # full weights into the plain model, before any sharding
    if activation_checkpointing:
        checkpoint_activations(model.trunk)
    if cfg.compile:
        compile_blocks(model, compile_backend)
    model = par.wrap(model)
    optimizer = build_optimizer(model, cfg)
    start_step, elapsed_before = 0, 0.0
    if ckpt is not None:
        if is_sharded(state):
            load_sharded_checkpoint(ckpt, model, optimizer)
        elif par.sharded:
            raise CheckpointError(
                f"{ckpt} is a single-file checkpoint; resume it with --parallel ddp (fsdp resumes sharded ones)"
            )
        else:
            load_optimizer(ckpt, optimizer, state)
        start_step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    resumed_eval = None  # the eval already logged at the step a resumed run starts from
    if resume and env.is_main:
        resumed_eval = _trim_metrics(run_dir, start_step)
    evaluated_at_start = bool(env.from_main(float(resumed_eval is not None)))  # every rank must agree

    bpt = bytes_per_token(data.tokenizer, data.store) if can_eval else None
    tokens_per_step = global_batch * cfg.context * cfg.grad_accum
    board = None
    if tensorboard is not None and env.is_main:
        from multitoken.bench.flops import train_flops_per_token
        from multitoken.tensorboard import TensorBoardLog

        peak = peak_tflops * 1e12 * env.world_size if peak_tflops else None  # tokens/s count every process
        board = TensorBoardLog(tensorboard, train_flops_per_token(model_cfg, cfg.context), peak)

    def log(record: dict[str, Any]) -> None:
        _append_metrics(run_dir, record)
        if board is not None:
            board(record)

    saved_step = start_step if resume else -1

    def checkpoint(step: int, final: bool = False) -> None:
        nonlocal saved_step
        elapsed = elapsed_before + clock() - t0
        state = {
            "elapsed_s": elapsed,
            "torch_rng": torch.get_rng_state().tolist(),
            "tokens_seen": step * tokens_per_step,
        }
        if par.sharded:
            save_sharded_checkpoint(run_dir, step, model, optimizer, state, env, consolidate=final)
        else:
            if env.is_main:
                save_checkpoint(run_dir, step, model, optimizer, state)
            env.barrier()
        saved_step = step

    def run_eval(step: int) -> dict[str, Any]:
        # Every rank evaluates (sharded weights need all of them); rank 0 logs.
        result = evaluate(model, data.store.val, cfg.context, cfg.batch_size, cfg.eval_batches, cfg.loss_chunk, bpt)
        if env.is_main:
            log({"step": step, "kind": "eval", **result})
        return result

    def first_step(*args: Any) -> tuple[LossReport, float]:
        """The first step, where a lazy torch.compile fails if it is going to: then retry it eagerly."""
        try:
            return train_step(*args)
        except Exception as e:
            if not (cfg.compile and _is_compile_error(e)):
                raise
            warnings.warn(f"torch.compile failed ({type(e).__name__}); training eagerly instead", stacklevel=2)
            uncompile_blocks(model)
            optimizer.zero_grad(set_to_none=True)
            if hasattr(model, "reset_iter_state"):  # FSDP2: forget the half-done iteration
                model.reset_iter_state()
            return train_step(*args)

    def step_fn(step: int, lr: float) -> tuple[LossReport, float]:
        run = first_step if step == start_step else train_step
        return run(model, optimizer, sampler, step, cfg, lr, device, par)

    def after_step(step: int, report: LossReport) -> None:
        nonlocal last_eval
        if on_step is not None:
            on_step(step, report)
        if can_eval and step % cfg.eval_every == 0:
            last_eval = run_eval(step)
        if step % cfg.checkpoint_every == 0:
            checkpoint(step)

    clock = budget_clock(cfg)  # what the time budget counts, and so what a resumed run carries on from
    t0 = clock()
    last_eval = None
    loop = training_loop(
        step_fn, cfg, tokens_per_step=tokens_per_step, start_step=start_step, elapsed_before=elapsed_before,
        shared_clock=env.from_main, log=log if env.is_main else None,
        after_step=after_step, progress=progress and env.is_main,
    )  # fmt: skip
    step = loop.step
    # A sharded run's last checkpoint is written again with consolidated weights, for load_run.
    if step != saved_step or latest_checkpoint(run_dir) is None or par.sharded:
        checkpoint(step, final=True)
    if step == start_step and evaluated_at_start:  # a finished run resumed: nothing new to evaluate or log
        last_eval = resumed_eval
    elif can_eval and (last_eval is None or step % cfg.eval_every):
        last_eval = run_eval(step)
    if board is not None:
        board.close()
    return RunResult(run_dir, step, loop.elapsed_s, step * tokens_per_step, last_eval, loop.losses)
