"""The Python API: load a model with what it came with, generate text with statistics, save it back."""

from pathlib import Path

import pytest
import torch

import multitoken
from multitoken.api import MultiTokenLM, TextStream
from multitoken.data.tokenizers import ByteTokenizer
from multitoken.errors import UserError
from multitoken.generate.tree import Tree
from tests.conftest import make_model
from tests.generate.test_speculative import trained_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained model (token ids as bytes) with a tree, saved as a run directory."""
    model = trained_model()
    lm = MultiTokenLM(model, ByteTokenizer(), tree=Tree(((0,), (1,), (0, 0))))
    return lm, lm.save(tmp_path_factory.mktemp("api") / "run")


def test_save_then_load_gives_the_same_model_tree_and_text(saved):
    lm, path = saved
    back = multitoken.load(path)
    assert back.tree == lm.tree and back.draft_vocab is None and back.tokenizer.kind == "bytes"
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, back.model.state_dict()[name]), name
    prompt = "".join(chr(t) for t in (3, 5, 7, 9, 11))
    assert back.generate(prompt, max_new_tokens=16).token_ids == lm.generate(prompt, max_new_tokens=16).token_ids


def test_every_decoding_gives_plain_greedy_text_with_its_statistics(saved):
    lm, _ = saved
    prompts = ["".join(chr(t) for t in range(s, s + 8)) for s in (2, 20)]
    plain = lm.generate(prompts, max_new_tokens=24, decoding="plain", stop_at_eos=False)
    assert [o.tokens_per_forward for o in plain] == [1.0, 1.0]
    for decoding in ("chain", "tree"):
        outs = lm.generate(prompts, max_new_tokens=24, decoding=decoding, stop_at_eos=False)
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
        assert all(o.tokens_per_forward >= 1.0 and o.stop_reason == "length" for o in outs)
        assert outs[0].stats["accept_histogram"] and outs[0].stats["forwards"] >= 1
    assert lm.generate(prompts[0], max_new_tokens=24).token_ids[:1] == plain[0].token_ids[:1]  # the default: tree


def test_stop_strings_cut_the_text(saved):
    lm, _ = saved
    prompt = "".join(chr(t) for t in range(2, 10))
    full = lm.generate(prompt, max_new_tokens=24, stop_at_eos=False)
    stop = full.text[5:7]
    cut = lm.generate(prompt, max_new_tokens=24, stop=["\x00\x00\x00", stop], stop_at_eos=False)
    assert cut.stop_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    # Decoding itself ended at the stop string: within one step (at most the model's heads) past its end.
    end = len(full.text[: full.text.find(stop)]) + len(stop)
    assert end <= len(cut.token_ids) < end + lm.model.cfg.n_future


def test_an_over_long_prompt_keeps_its_end_only_when_asked(saved):
    lm, _ = saved
    limit = lm.model.cfg.max_seq_len
    prompt = "".join(chr(2 + i % 50) for i in range(limit + 7))
    with pytest.raises(UserError, match="the model's context"):
        lm.generate(prompt, max_new_tokens=4)
    kept = lm.generate(prompt, max_new_tokens=4, keep_prompt_end=True, stop_at_eos=False)
    end = lm.generate(prompt[-(limit - 1) :], max_new_tokens=4, stop_at_eos=False)
    assert kept.token_ids == end.token_ids and kept.stop_reason == "context"  # one token fits after the prompt


def test_code_benchmark_completions_pool_their_statistics(saved):
    from multitoken.eval.completion import Completer

    lm, _ = saved
    complete = Completer(lm, max_new_tokens=12, decoding="chain", temperature=0.8, seed=1)
    prompt = "".join(chr(t) for t in range(2, 10))
    first = complete(prompt, 3)
    assert len(first) == 3 and complete(prompt, 3) == first  # each prompt draws from a seed of its own
    summary = complete.summary()
    assert summary["decoding"] == "chain" and complete.tokens >= 2 * 3
    assert summary["tokens_per_forward"] == complete.tokens / complete.forwards >= 1.0


def test_sampling_is_seeded_and_streams_its_text(saved):
    lm, _ = saved
    prompt = "".join(chr(t) for t in range(2, 10))
    pieces = []
    a = lm.generate(prompt, max_new_tokens=20, temperature=1.0, seed=3, stream=pieces.append, stop_at_eos=False)
    b = lm.generate(prompt, max_new_tokens=20, temperature=1.0, seed=3, stop_at_eos=False)
    assert a.token_ids == b.token_ids and "".join(pieces) == a.text


def test_mistakes_are_user_errors(saved, tmp_path):
    lm, path = saved
    no_tree = MultiTokenLM(lm.model, lm.tokenizer)
    with pytest.raises(UserError, match="no draft tree"):
        no_tree.generate("ab", decoding="tree")
    with pytest.raises(UserError, match="decoding must be one of"):
        lm.generate("ab", decoding="fast")
    with pytest.raises(UserError, match="no draft vocabulary"):
        lm.generate("ab", draft_vocab=True)
    with pytest.raises(UserError, match="one prompt"):
        lm.generate(["a", "b"], stream=print)
    with pytest.raises(UserError, match="already exists"):
        lm.save(path)
    with pytest.raises(UserError, match="not a run directory"):
        multitoken.load(tmp_path)
    with pytest.raises(UserError, match="dtype must be"):
        multitoken.load(path, dtype="fp8")


def test_text_stream_holds_back_half_a_character():
    pieces = []
    stream = TextStream(ByteTokenizer(), pieces.append)
    for piece in (b"caf", b"\xc3", b"\xa9!"):  # é is two bytes, here split across two steps
        stream(0, list(piece))
        assert "\ufffd" not in "".join(pieces)
    stream.finish()
    assert "".join(pieces) == "café!"
    pieces.clear()
    stream = TextStream(ByteTokenizer(), pieces.append)
    stream(0, list(b"caf"))
    stream(0, list(b"\xc3"))
    stream.finish()  # a character never completed is shown as it decodes
    assert "".join(pieces) == "caf\ufffd"


def test_training_sources_are_a_list_whatever_the_user_passes():
    from multitoken.api import _sources

    assert _sources("src/") == ["src/"]  # not its characters
    assert _sources(Path("a.txt")) == ["a.txt"]
    assert _sources(["a", Path("b/*.py")]) == ["a", "b/*.py"]
    assert _sources(()) == []


def test_training_from_python_reports_mistakes_as_user_errors(tmp_path):
    with pytest.raises(UserError):
        multitoken.train(multitoken.TrainConfig(max_steps=1), data=tmp_path / "missing", out=tmp_path / "run")
    with pytest.raises(UserError, match="unknown preset|preset"):
        multitoken.train(data=tmp_path, model="enormous", out=tmp_path / "run")


def test_heads_added_from_python_and_a_tree_calibrated_on_text(tmp_path):
    base = MultiTokenLM(make_model(vocab_size=257, n_future=2, max_seq_len=128), ByteTokenizer()).save(tmp_path / "b")
    text = "the cat sat on the mat; the dog ate the log. " * 200
    (tmp_path / "corpus.txt").write_text(text)
    lm = multitoken.add_heads(
        base, tmp_path / "more", multitoken.HeadsConfig(n_future=4),
        multitoken.TrainConfig(max_steps=2, context=32, batch_size=2, eval_batches=1), data=tmp_path / "corpus.txt",
        progress=False,
    )  # fmt: skip
    assert lm.model.cfg.n_future == 4
    report = lm.calibrate(text[:3000], budget=5, on="data", windows=4, length=48)
    assert lm.tree.size == report["size"] <= 5 and len(report["acceptance"]) == 3
    plain = lm.generate("the cat", max_new_tokens=16, decoding="plain", stop_at_eos=False)
    assert lm.generate("the cat", max_new_tokens=16, decoding="tree", stop_at_eos=False).text == plain.text
