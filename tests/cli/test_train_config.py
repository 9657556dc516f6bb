"""`multitoken train --config FILE` and `--print-config`: defaults once (the dataclasses), then the file, then
the flags a user changed; every TrainConfig field reachable; bad files are one-line errors."""

import json

import pytest

from multitoken.cli import main
from multitoken.config import TrainConfig, preset


def resolved(tmp_path, capsys, *extra) -> dict:
    assert main(["train", "--out", str(tmp_path / "r"), "--print-config", *extra]) == 0
    out = capsys.readouterr().out
    return json.loads(out[: out.rindex("}") + 1])


def test_without_a_file_the_config_is_the_dataclasses_defaults(tmp_path, capsys):
    config = resolved(tmp_path, capsys)
    assert config["train"] == TrainConfig().to_dict() | {"betas": list(TrainConfig().betas)}
    assert config["model"] == preset("mini").to_dict()
    assert not (tmp_path / "r").exists()  # printing trains nothing


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_file_sets_any_field_and_changed_flags_override_it(tmp_path, capsys, suffix):
    fields = {"model": {"preset": "tiny", "n_future": 3}, "train": {"weight_decay": 0.0, "min_lr_ratio": 0.5,
                                                                   "eval_batches": 3, "lr": 1e-3, "max_steps": 77}}
    path = tmp_path / f"cfg{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(fields))
    else:
        import yaml

        path.write_text(yaml.safe_dump(fields))
    config = resolved(tmp_path, capsys, "--config", str(path), "--lr", "0.02", "--dim", "32")
    train, model = config["train"], config["model"]
    assert [train[k] for k in ("weight_decay", "min_lr_ratio", "eval_batches", "max_steps")] == [0.0, 0.5, 3, 77]
    assert train["lr"] == 0.02  # the flag, changed from its default, wins over the file
    assert model == preset("tiny", n_future=3, dim=32).to_dict()
    config = resolved(tmp_path, capsys, "--config", str(path), "--max-steps", "5")
    assert config["train"]["max_steps"] == 5


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ('{"train": {"learning_rate": 1}}', "learning_rate"),
        ('{"train": {"batch_size": 0}}', "batch_size must be >= 1"),
        ('{"model": {"dim": "wide"}}', "cfg.json"),
        ('{"optimizer": {}}', "expected a mapping with 'model' and/or 'train'"),
        ('{"train": [1, 2]}', "must be a mapping"),
    ],
)
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "cfg.json"
    path.write_text(content)
    assert main(["train", "--out", str(tmp_path / "r"), "--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
