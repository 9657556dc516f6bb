"""Data-parallel training on the CPU with gloo: 2 processes must train like 1 process on the same global batch.

Workers are spawned processes that set torchrun's environment variables, so `train` goes through the same
setup as under torchrun. Every launch has a deadline: a hung collective fails the test instead of the run.
"""

import hashlib
import json
import multiprocessing as mp
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from multitoken.checkpoint import latest_checkpoint, load_run, read_checkpoint_state
from multitoken.config import ModelConfig, TrainConfig
from multitoken.dcp import consolidate
from multitoken.distributed import FSDP_MIN_PARAMS, DDPParallel, DistEnv, resolve_strategy
from multitoken.errors import CheckpointError, UserError
from multitoken.loss import sequential_backward, shift_targets
from multitoken.pretrain import RankSampler, train
from tests.conftest import make_model

CORPUS = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(300))
LAUNCH_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for j in range(6):
        (d / f"m{j}.py").write_text(CORPUS[j * 1500 : (j + 1) * 1500] * 2)
    return d


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(dim=32, n_layers=4, n_heads=4, n_future=2, max_seq_len=64), **kw})


def train_cfg(**kw) -> TrainConfig:
    fields = dict(
        batch_size=4, context=32, max_steps=4, eval_every=1000, checkpoint_every=2, warmup_steps=2, val_fraction=0.2
    )
    return TrainConfig(**{**fields, **kw})


def single(run_dir: Path, corpus: Path, cache: Path, mcfg: ModelConfig, cfg: TrainConfig, **kw) -> list[float]:
    """A one-process run (resumed when mcfg is None); its losses."""
    result = train(run_dir, mcfg, cfg, [str(corpus)], cache_dir=cache, progress=False, device=torch.device("cpu"), **kw)
    return result.losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, kwargs: dict) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)  # two processes share two cores
    die_at = kwargs.pop("die_at", None)

    def on_step(step, report):
        if die_at is not None and rank == 1 and step == die_at:
            os._exit(1)  # a process killed mid-run: no cleanup, no checkpoint

    result = train(progress=False, device=torch.device("cpu"), on_step=on_step, **kwargs)
    if rank == 0:
        Path(out).write_text(json.dumps(result.losses))


def launch(world: int, out: Path, **kwargs) -> tuple[list[int], list[float] | None]:
    """Run `train(**kwargs)` on `world` spawned processes; exit codes and rank 0's losses."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(out), dict(kwargs))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    assert all(c is not None and c >= 0 for c in codes) or time.monotonic() < deadline, f"launch timed out: {codes}"
    return codes, json.loads(out.read_text()) if out.exists() else None


class Payload:
    """What an attacker pickles: unpickling it calls os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_sharded_entries_are_read_as_plain_data_only(tmp_path):
    import io

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from multitoken.dcp import SafeLoadPlanner

    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(Payload(f"touch {marker}"), buffer)
    buffer.seek(0)
    planner, state = SafeLoadPlanner(), {"lr": 0.0}
    planner.set_up_planner(state, None, False)
    index = MetadataIndex("lr")
    item = ReadItem(LoadItemType.BYTE_IO, index, torch.Size([0]), index, torch.Size([0]), torch.Size([0]))
    with pytest.raises(CheckpointError, match="not plain data"):
        planner.load_bytes(item, buffer)
    assert not marker.exists()
    plain = io.BytesIO()
    torch.save(0.25, plain)
    plain.seek(0)
    planner.load_bytes(item, plain)
    assert state["lr"] == 0.25


# Two processes against one: the all-reduce sums each gradient in another order (relative error ~ sqrt(n) * u,
# tests/tolerance.py), and AdamW's update m / sqrt(v) passes a relative gradient change on as a relative update
# change. After a few steps of lr 1e-3, weights then differ by about steps * lr * that, far below 1e-6 absolute,
# while a wrong reduction (a missing rank, a doubled one) moves them by about lr each step. The losses differ
# by the same rounding, relative to the loss (rtol 1e-5: sqrt(n) * u times a margin for the steps).
def assert_same_weights(a: Path, b: Path, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    x, y = load_run(a).model.state_dict(), load_run(b).model.state_dict()
    assert x.keys() == y.keys()
    for name in x:
        torch.testing.assert_close(x[name], y[name], rtol=rtol, atol=atol, msg=name)


# --------------------------------------------------------------------------------------------------
# fast unit tests


def test_strategy_resolution():
    assert resolve_strategy("auto", 10, 1) == "none"
    assert resolve_strategy("fsdp", 10, 1) == "none"
    assert resolve_strategy("auto", 10, 2) == "ddp"
    assert resolve_strategy("auto", FSDP_MIN_PARAMS, 8) == "fsdp"
    assert resolve_strategy("ddp", FSDP_MIN_PARAMS, 8) == "ddp"
    with pytest.raises(UserError, match="unknown parallel strategy"):
        resolve_strategy("zero3", 10, 2)
    with pytest.raises(UserError, match="cannot run on 2 processes"):
        resolve_strategy("none", 10, 2)


def test_rank_slices_make_the_global_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    whole = RankSampler(tokens, 8, 17, seed=3).sample(5)
    parts = [RankSampler(tokens, 8, 17, seed=3, rank=r, world_size=4).sample(5) for r in range(4)]
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(UserError, match="does not split over 3 processes"):
        RankSampler(tokens, 8, 17, seed=3, rank=0, world_size=3)


def test_compile_failure_falls_back_to_eager(tmp_path, corpus, cache):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    eager = single(tmp_path / "eager", corpus, cache, model_cfg(), train_cfg(max_steps=2))
    with pytest.warns(UserWarning, match="torch.compile failed"):
        compiled = single(
            tmp_path / "c",
            corpus,
            cache,
            model_cfg(),
            train_cfg(max_steps=2, compile=True),
            compile_backend=broken_backend,
        )
    assert compiled == eager


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path, corpus, cache):
    plain = single(tmp_path / "plain", corpus, cache, model_cfg(), train_cfg(max_steps=2))
    recomputed = single(
        tmp_path / "ac", corpus, cache, model_cfg(), train_cfg(max_steps=2), activation_checkpointing=True
    )
    assert recomputed == plain
    assert_same_weights(tmp_path / "plain", tmp_path / "ac", rtol=0, atol=0)


@pytest.mark.parametrize("head_type", ["parallel", "causal"])
def test_ddp_launches_each_blocks_all_reduce_inside_the_backward(tmp_path, head_type):
    # A world of one: every all-reduce is the identity, so gradients must come out unchanged, while the
    # launches show the overlap: one per block from the backward, none of them waiting for its end.
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model, ref = make_model(head_type=head_type).train(), make_model(head_type=head_type).train()
        parallel = DDPParallel(DistEnv())
        parallel.wrap(model)
        inputs, targets = shift_targets(torch.randint(0, 61, (2, 20)), 3)
        for micro, last in enumerate([False, True]):  # two micro-batches: the first only accumulates
            parallel.before_backward(last_micro_batch=last)
            sequential_backward(model, inputs, targets, chunk=16)
            sequential_backward(ref, inputs, targets, chunk=16)
            assert parallel.overlapped == (len(model.trunk) + len(model.heads)) * micro
        parallel.after_backward(model)
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)  # one process: nothing to reduce
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# two processes against one


@pytest.mark.parametrize(
    "strategy, mkw, tkw",
    [
        ("ddp", {}, {}),
        # Causal heads change the backward order; accumulation leaves reduction to the last micro-batch.
        pytest.param("ddp", {"head_type": "causal"}, {"grad_accum": 2}, marks=pytest.mark.slow),
        ("fsdp", {}, {}),
        # Tied embeddings share the root shard group; causal heads run all forwards before any backward;
        # gradient accumulation defers every reduction to the last micro-batch.
        pytest.param(
            "fsdp", {"tie_embeddings": True, "head_type": "causal"}, {"grad_accum": 2}, marks=pytest.mark.slow
        ),
        # Token-conditioned modules read the root group's embedding outside the root's forward.
        pytest.param("ddp", {"n_layers": 5, "n_future": 3, "head_type": "mtp"}, {}, marks=pytest.mark.slow),
        pytest.param("fsdp", {"n_layers": 5, "n_future": 3, "head_type": "mtp"}, {}, marks=pytest.mark.slow),
    ],
    ids=["ddp", "ddp-causal-accum", "fsdp", "fsdp-tied-causal-accum", "ddp-mtp", "fsdp-mtp"],
)
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, corpus, cache, strategy, mkw, tkw):
    mcfg = model_cfg(**mkw)
    ref = single(tmp_path / "one", corpus, cache, mcfg, train_cfg(batch_size=8, **tkw))
    codes, losses = launch(
        2,
        tmp_path / "losses.json",
        run_dir=tmp_path / "two",
        model_cfg=mcfg,
        cfg=train_cfg(batch_size=4, **tkw),
        sources=[str(corpus)],
        cache_dir=cache,
        parallel=strategy,
    )
    assert codes == [0, 0]
    np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=1e-6)
    assert_same_weights(tmp_path / "one", tmp_path / "two")  # a sharded run's final checkpoint is consolidated
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]  # rank 0 alone logs


def test_fsdp_checkpoint_resumes_on_one_process_and_detects_a_missing_shard(tmp_path, corpus, cache):
    mcfg = model_cfg()
    # A constant learning rate after warmup: the schedule then does not depend on max_steps, which changes.
    ref = single(tmp_path / "ref", corpus, cache, mcfg, train_cfg(batch_size=8, max_steps=6, min_lr_ratio=1.0))
    kw = dict(model_cfg=mcfg, sources=[str(corpus)], cache_dir=cache, parallel="fsdp")
    cfg = train_cfg(max_steps=4, min_lr_ratio=1.0)
    codes, losses = launch(2, tmp_path / "l.json", run_dir=tmp_path / "run", cfg=cfg, **kw)
    assert codes == [0, 0]
    ckpt = latest_checkpoint(tmp_path / "run")
    state = read_checkpoint_state(ckpt)
    assert state["sharded"] and state["world_size"] == 2 and (ckpt / "dcp" / "__1_0.distcp").is_file()

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "run", broken)
    (latest_checkpoint(broken) / "dcp" / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="missing or truncated"):
        single(broken, corpus, cache, None, None, resume=True, overrides={"max_steps": 6})

    # A hostile .metadata (with a file table that matches it, as its author would write) runs no code.
    hostile = tmp_path / "hostile"
    shutil.copytree(tmp_path / "run", hostile)
    marker = tmp_path / "pwned"
    hostile_ckpt = latest_checkpoint(hostile)
    (hostile_ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(f"touch {marker}")))
    (hostile_ckpt / "model.safetensors").unlink()  # the shards alone, as consolidate and resume read them
    forged = json.loads((hostile_ckpt / "state.json").read_text())
    del forged["files"]["model.safetensors"]
    forged["files"]["dcp/.metadata"] = file_record(hostile_ckpt / "dcp" / ".metadata")
    (hostile_ckpt / "state.json").write_text(json.dumps(forged))
    for load in (lambda: consolidate(hostile), lambda: single(hostile, corpus, cache, None, None, resume=True)):
        with pytest.raises(CheckpointError, match="names posix.system"):
            load()
        assert not marker.exists()

    # One process continues the 2-process run: DCP reshards, and the global batch (2 x 4) is kept.
    resumed = single(tmp_path / "run", corpus, cache, None, None, resume=True, overrides={"max_steps": 6})
    np.testing.assert_allclose(losses + resumed, ref, rtol=1e-5, atol=1e-6)
    assert_same_weights(tmp_path / "ref", tmp_path / "run")


@pytest.mark.slow
def test_a_dead_process_leaves_the_last_complete_checkpoint_loadable(tmp_path, corpus, cache):
    mcfg = model_cfg()
    ref = single(tmp_path / "ref", corpus, cache, mcfg, train_cfg(batch_size=8, max_steps=4))
    codes, _ = launch(
        2,
        tmp_path / "l.json",
        run_dir=tmp_path / "run",
        model_cfg=mcfg,
        cfg=train_cfg(max_steps=4),
        sources=[str(corpus)],
        cache_dir=cache,
        parallel="fsdp",
        die_at=3,  # after checkpoint 2
    )
    assert codes[1] == 1 and codes[0] != 0  # rank 0 fails at its next collective instead of hanging
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_000002"
    assert not (ckpt / "model.safetensors").exists()
    consolidate(tmp_path / "run")  # shards -> model.safetensors, for load_run
    assert load_run(tmp_path / "run").state["step"] == 2
    resumed = single(tmp_path / "run", corpus, cache, None, None, resume=True)
    np.testing.assert_allclose(resumed, ref[2:], rtol=1e-5, atol=1e-6)
    assert_same_weights(tmp_path / "ref", tmp_path / "run")


@pytest.mark.slow
def test_torchrun_cli(tmp_path, corpus):
    """`torchrun --nproc_per_node 2 -m multitoken train` end to end (auto: ddp for a small model)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "multitoken"]
    cmd += ["train", "--out", str(out), "--data", str(corpus), "--preset", "tiny", "--max-steps", "3"]
    cmd += ["--batch-size", "2", "--context", "32", "--sample-tokens", "0", "--quiet", "--eval-every", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_run(out).state["step"] == 3
    assert json.loads((out / "config.json").read_text())["parallel"]["world_size"] == 2
