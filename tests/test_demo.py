"""The main job's decoding showcase: prompts that ask for real code, loops named, speeds on the shown text."""

import numpy as np
import pytest
import torch

from multitoken.config import DemoConfig
from multitoken.data.tokenizers import ByteTokenizer
from multitoken.demo import code_prompts, decode_showcase, format_showcase, repeated_share
from tests.conftest import make_model

SOURCE = "import os\n\nX = 1\n\n\nclass A:\n    y = 2\n\n    def method(self, a):\n        return a\n\n\ndef top(b):\n"


def test_code_prompts_end_after_a_signature_and_start_lines_before():
    prompts = code_prompts([SOURCE], 2, context_lines=4)
    assert prompts == [
        "class A:\n    y = 2\n\n    def method(",
        "    def method(self, a):\n        return a\n\n\ndef top(",
    ]
    assert code_prompts([SOURCE], 5, context_lines=4) == prompts  # fewer signatures than asked: all of them
    assert code_prompts(["def f(x):\n    pass\n"], 1, context_lines=4) == []  # no code before it


def test_repeated_share():
    assert repeated_share([1, 2, 3, 4, 5, 6, 7, 8]) == 0.0
    assert repeated_share([1, 2, 3] * 4) == pytest.approx(7 / 10)  # every 3-gram after the first three repeats
    assert repeated_share([5] * 12) == pytest.approx(9 / 10)
    assert repeated_share([1, 2]) == 0.0  # too short to hold a 3-gram


def test_showcase_on_a_tiny_model(tmp_path):
    tok = ByteTokenizer()
    text = ("x = 1\ny = 2\nz = 3\nw = 4\n" + SOURCE) * 3
    tokens = np.array(tok.encode(text) + [tok.eos_id] + tok.encode(text), dtype=np.int64)
    model = make_model(vocab_size=257, n_future=3, max_seq_len=256)
    cfg = DemoConfig(prompts=2, new_tokens=12, tree_budgets=(2, 4), calibration_windows=2, calibration_tokens=32)
    torch.manual_seed(0)
    result = decode_showcase(model, tok, tokens, tokens, tmp_path, cfg)
    assert all(p.endswith("(") for p in result["prompts"])
    greedy, sampled = result["greedy"], result["sampled"]
    assert greedy["texts"]["chain"] == greedy["texts"]["plain"] == greedy["texts"]["tree"]  # exact in fp32
    assert all(r["exact"] == 1 for r in greedy["decoders"].values()) and sampled["shown"] == "tree"
    assert len(greedy["per_prompt"]) == 2 and set(greedy["per_prompt"][0]) == {"plain", "chain", "tree"}
    assert (tmp_path / "tree.json").is_file() and (tmp_path / "tree-sampled.json").is_file()
    shown = format_showcase(result)
    assert result["prompts"][0].rstrip("\n") in shown
    assert "calibrated tree" in shown and "sampled at temperature" in shown


def test_code_prompts_reach_the_first_line_and_async_functions():
    assert code_prompts(["a = 1\nb = 2\nc = 3\ndef f(x):\n    pass\n"], 1, context_lines=6) == [
        "a = 1\nb = 2\nc = 3\ndef f("
    ]
    assert code_prompts(["x = 1\n\nasync def g(y):\n"], 1, context_lines=4) == ["x = 1\n\nasync def g("]


def test_a_next_token_model_shows_plain_decoding_only(tmp_path):
    tok = ByteTokenizer()
    tokens = np.array(tok.encode(("x = 1\ny = 2\nz = 3\nw = 4\n" + SOURCE) * 3), dtype=np.int64)
    model = make_model(vocab_size=257, n_future=1, n_layers=3, max_seq_len=256)
    cfg = DemoConfig(prompts=1, new_tokens=8, calibration_windows=2, calibration_tokens=32)
    shown = format_showcase(decode_showcase(model, tok, tokens, tokens, tmp_path, cfg))
    assert "chain" not in shown and "tree" not in shown and "plain decoding:" in shown
    assert not (tmp_path / "tree.json").exists()
