import json

import pytest
import torch

from multitoken.checkpoint import (
    latest_checkpoint,
    load_optimizer,
    load_run,
    read_checkpoint_state,
    read_run_config,
    save_checkpoint,
    write_run_config,
)
from multitoken.errors import CheckpointError
from tests.conftest import make_model


def make_run(tmp_path, tie=False, head_type="parallel"):
    model = make_model(tie_embeddings=tie, head_type=head_type)
    write_run_config(tmp_path, model.cfg, train={"lr": 1e-3})
    return model


@pytest.mark.parametrize("tie, head_type", [(False, "parallel"), (True, "parallel"), (False, "mtp")])
def test_round_trip_weights_and_optimizer(tmp_path, tie, head_type):
    model = make_run(tmp_path, tie, head_type)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 61, (1, 8))).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 7, model, opt, {"rng": [1, 2, 3]})
    run = load_run(tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), run.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    if tie:
        assert run.model.output.weight is run.model.tok_embeddings.weight
    assert run.state["step"] == 7 and run.state["rng"] == [1, 2, 3]
    opt2 = torch.optim.AdamW(run.model.parameters(), lr=1e-3)
    load_optimizer(run.checkpoint, opt2, run.state)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for idx in s1["state"]:
        for key in s1["state"][idx]:
            torch.testing.assert_close(s1["state"][idx][key], s2["state"][idx][key], rtol=0, atol=0)


def test_keeps_newest_and_latest_pointer(tmp_path):
    model = make_run(tmp_path)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, keep=2)
    assert latest_checkpoint(tmp_path).name == "step_000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000003"]


def test_truncated_and_corrupt_files_are_detected(tmp_path):
    model = make_run(tmp_path)
    ckpt = save_checkpoint(tmp_path, 1, model)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="missing or truncated"):
        load_run(tmp_path)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_checkpoint_state(ckpt)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        read_run_config(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        read_run_config(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_run_config(tmp_path)


def test_shape_mismatch_is_refused(tmp_path):
    model = make_run(tmp_path)
    save_checkpoint(tmp_path, 1, model)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["dim"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape"):
        load_run(tmp_path)


def test_no_checkpoint_yet(tmp_path):
    make_run(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_run(tmp_path)


@pytest.mark.parametrize(
    "files",
    [
        None,
        {},
        {"model.safetensors": {"bytes": "12"}},
        {"model.safetensors": 3},
        {"../outside": {"bytes": 1, "sha256": "0"}},
    ],
)
def test_a_state_without_a_valid_file_table_is_refused(tmp_path, files):
    """A state.json stripped of its file table (or with a malformed one) would skip every checksum."""
    ckpt = save_checkpoint(tmp_path, 1, make_run(tmp_path))
    state = json.loads((ckpt / "state.json").read_text())
    if files is None:
        del state["files"]
    else:
        state["files"] = files
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_run(tmp_path)
