import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from multitoken.checkpoint import latest_checkpoint, load_run, read_checkpoint_state
from multitoken.config import ModelConfig, TrainConfig
from multitoken.loop import lr_at
from multitoken.pretrain import TrainingDiverged, train

CORPUS = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(300))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small code corpus of several files (so there is a held-out split)."""
    d = tmp_path / "corpus"
    d.mkdir()
    for j in range(6):
        (d / f"m{j}.py").write_text(CORPUS[j * 1500 : (j + 1) * 1500] * 2)
    return d


def tiny_model() -> ModelConfig:
    return ModelConfig(dim=32, n_layers=3, n_heads=4, n_future=2, max_seq_len=64)


def tiny_train(**kw) -> TrainConfig:
    fields = dict(
        batch_size=4, context=32, max_steps=8, eval_every=4, checkpoint_every=3, warmup_steps=2, val_fraction=0.2
    )
    fields.update(kw)
    return TrainConfig(**fields)


def run_train(run_dir, corpus, cache, model_cfg=None, cfg=None, **kw):
    return train(
        run_dir,
        model_cfg or tiny_model(),
        cfg or tiny_train(),
        [str(corpus)],
        cache_dir=cache,
        progress=False,
        device=torch.device("cpu"),
        **kw,
    )


def test_training_reduces_loss_and_writes_a_run(tmp_path, corpus):
    result = run_train(tmp_path / "run", corpus, tmp_path / "cache", cfg=tiny_train(max_steps=30, lr=3e-3))
    assert result.losses[-1] < result.losses[0] - 1.0
    run = load_run(tmp_path / "run")
    assert run.state["step"] == 30
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 31))
    assert len(result.final_eval["loss"]) == 2 and "bits_per_byte" in result.final_eval


def test_resume_reproduces_uninterrupted_losses(tmp_path, corpus):
    full = run_train(tmp_path / "full", corpus, tmp_path / "cache")

    def interrupt(step, report):
        if step == 5:  # after checkpoint 3, before checkpoint 6
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path / "split", corpus, tmp_path / "cache", on_step=interrupt)
    resumed = run_train(tmp_path / "split", corpus, tmp_path / "cache", model_cfg=None, cfg=None, resume=True)
    assert resumed.losses == full.losses[3:]  # steps 4..8 again, exactly (fp32 on the CPU)
    logged = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged if r["kind"] == "train"] == full.losses
    a, b = load_run(tmp_path / "full").model, load_run(tmp_path / "split").model
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=n)


def test_existing_run_is_not_overwritten(tmp_path, corpus):
    run_train(tmp_path / "run", corpus, tmp_path / "cache", cfg=tiny_train(max_steps=1))
    with pytest.raises(ValueError, match="already holds a run"):
        run_train(tmp_path / "run", corpus, tmp_path / "cache", cfg=tiny_train(max_steps=1))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus):
    def poison(step, report):
        if step == 4:  # corrupt a weight after step 4: step 5's loss is NaN
            with torch.no_grad():
                model_holder["model"].trunk[0].attention.wq.weight.fill_(float("nan"))

    model_holder = {}
    real_init = torch.nn.Module.train

    def capture(self, mode=True):
        from multitoken.model import MultiTokenModel

        if isinstance(self, MultiTokenModel):
            model_holder["model"] = self
        return real_init(self, mode)

    torch.nn.Module.train = capture
    try:
        with pytest.raises(TrainingDiverged, match="at step 4"):
            run_train(tmp_path / "run", corpus, tmp_path / "cache", on_step=poison)
    finally:
        torch.nn.Module.train = real_init
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_000003"
    assert all(torch.isfinite(p).all() for p in load_run(tmp_path / "run").model.parameters())


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0.0, 0, cfg) == pytest.approx(0.1)
    assert lr_at(0.0, 10, cfg) == pytest.approx(1.0)
    assert lr_at(0.5, 50, cfg) == pytest.approx(0.55)
    assert lr_at(1.0, 100, cfg) == pytest.approx(0.1)


KILL_SCRIPT = """
import sys, torch
from multitoken.config import ModelConfig, TrainConfig
from multitoken.pretrain import train
cfg = TrainConfig(batch_size=4, context=32, max_steps=int(sys.argv[4]), eval_every=1000, checkpoint_every=1,
                  warmup_steps=2, val_fraction=0.2)
model = ModelConfig(dim=32, n_layers=3, n_heads=4, n_future=2, max_seq_len=64)
resume = sys.argv[3] == "resume"
train(sys.argv[1], None if resume else model, None if resume else cfg, [sys.argv[2]], cache_dir=sys.argv[1] + "-cache",
      progress=False, resume=resume, device=torch.device("cpu"))
"""


def test_sigkill_at_random_moments_resumes_from_a_complete_checkpoint(tmp_path, corpus):
    """Kill training with SIGKILL (checkpoints every step, so often mid-write); every resume must load
    a complete checkpoint, and the final weights must equal an uninterrupted run's."""
    script = tmp_path / "t.py"
    script.write_text(KILL_SCRIPT)
    steps = 30
    reference = tmp_path / "ref"
    subprocess.run([sys.executable, str(script), str(reference), str(corpus), "new", str(steps)], check=True)
    run = tmp_path / "run"
    rng = torch.Generator().manual_seed(0)

    def latest_step() -> int:
        return read_checkpoint_state(latest_checkpoint(run))["step"] if (run / "latest").exists() else 0

    mode, kills, seen_steps = "new", 0, []
    for _ in range(4):
        before = latest_step()
        proc = subprocess.Popen([sys.executable, str(script), str(run), str(corpus), mode, str(steps)])
        # Wait for two steps of progress (process start-up takes seconds), which times one step on this machine,
        # then kill at a random moment within the next step: with a checkpoint every step, many kills land in the
        # middle of a checkpoint write, however fast the machine.
        deadline, marks = time.monotonic() + 120, []
        while proc.poll() is None and len(marks) < 2 and time.monotonic() < deadline:
            step = latest_step()
            if step > (marks[-1][0] if marks else before):
                marks.append((step, time.monotonic()))
            time.sleep(0.001)
        if len(marks) == 2:
            step_s = (marks[1][1] - marks[0][1]) / (marks[1][0] - marks[0][0])
            time.sleep(step_s * torch.rand(1, generator=rng).item())
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        mode = "resume"
        seen_steps.append(latest_step())  # every load verifies a complete checkpoint, or raises
    subprocess.run([sys.executable, str(script), str(run), str(corpus), "resume", str(steps)], check=True)
    assert kills >= 3 and len(set(seen_steps)) >= 3, f"training was not interrupted mid-run: {seen_steps}"
    final, ref = load_run(run), load_run(reference)
    assert final.state["step"] == steps
    for (n, x), (_, y) in zip(final.model.state_dict().items(), ref.model.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=n)
    assert math.isfinite(final.state["elapsed_s"])


def run_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_changes_nothing(tmp_path, corpus):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    first = run_train(run_dir, corpus, cache)
    before = run_files(run_dir)
    again = run_train(run_dir, corpus, cache, model_cfg=None, cfg=None, resume=True)
    assert run_files(run_dir) == before  # no second final eval, no new checkpoint
    assert again.step == first.step and again.final_eval == first.final_eval


def test_killed_writes_are_cleaned_on_resume(tmp_path, corpus):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    run_train(run_dir, corpus, cache, cfg=tiny_train(max_steps=4))
    (run_dir / "checkpoints" / ".step_000006.x1y2").mkdir()  # a checkpoint save killed half-way
    (run_dir / "checkpoints" / ".step_000006.x1y2" / "model.safetensors").write_bytes(b"half")
    (run_dir / ".metrics.jsonl.abc.tmp").write_text("half")  # an atomic rewrite killed before its rename
    run_train(run_dir, corpus, cache, cfg=None, resume=True, overrides={"max_steps": 6})
    assert not list((run_dir / "checkpoints").glob(".*")) and not list(run_dir.glob(".*.tmp"))
    assert read_checkpoint_state(latest_checkpoint(run_dir))["step"] == 6


def test_a_start_that_failed_before_its_first_checkpoint_can_be_retried(tmp_path, corpus):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"

    def crash(step, report):
        raise RuntimeError("killed at step 1")

    with pytest.raises(RuntimeError, match="killed"):  # config, tokenizer and metrics written, no checkpoint
        run_train(run_dir, corpus, cache, on_step=crash)
    assert (run_dir / "config.json").is_file() and latest_checkpoint(run_dir) is None
    result = run_train(run_dir, corpus, cache)  # the corrected retry is not refused
    assert result.step == 8 and latest_checkpoint(run_dir) is not None
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and steps.count(1) == 1  # the failed start's records are gone
