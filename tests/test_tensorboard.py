"""TensorBoard scalars carry the same numbers as metrics.jsonl, for pretraining and for head training."""

import json

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from multitoken.cli import main  # noqa: E402
from multitoken.tensorboard import TensorBoardLog  # noqa: E402


@pytest.fixture
def corpus(tmp_path):
    for i in range(40):  # documents, so that some are held out for evaluation
        code = f"def add{i}(a, b):\n    return a + b * {i}\n\n\nclass Box:\n    size = 3\n"
        (tmp_path / f"m{i}.py").write_text(code * 20)
    return tmp_path


def scalars(log_dir) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_train_writes_every_metric_of_its_records(tmp_path, corpus):
    board = tmp_path / "tb"
    argv = ["train", "--out", str(tmp_path / "run"), "--data", str(corpus), "--preset", "tiny", "--batch-size", "2",
            "--context", "32", "--max-steps", "4", "--eval-every", "2", "--quiet", "--sample-tokens", "0",
            "--tensorboard", str(board), "--peak-tflops", "1"]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    got = scalars(board)
    train = [r for r in records if r["kind"] == "train"]
    assert got["train/loss/head1"] == pytest.approx({r["step"]: r["per_head"][0] for r in train})  # float32 there
    assert got["train/lr"] == pytest.approx({r["step"]: r["lr"] for r in train})
    assert {"train/loss/head2", "train/grad_norm", "train/tokens_per_s", "train/mfu"} <= set(got)
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and got["eval/agreement_with_head1/head2"] == pytest.approx(
        {r["step"]: r["agreement_with_head1"][1] for r in evals}
    )


def test_mfu_is_tokens_times_flops_over_the_peak():
    sink = TensorBoardLog.__new__(TensorBoardLog)  # the arithmetic alone, no event file
    sink.flops_per_token, sink.peak_flops = 6e6, 1e12
    out = sink.scalars({"step": 1, "kind": "train", "tokens_per_s": 1000.0, "per_head": [2.0, float("nan")]})
    assert out["mfu"] == pytest.approx(1000 * 6e6 / 1e12) and out["loss/head1"] == 2.0 and "loss/head2" not in out
