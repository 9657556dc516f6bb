"""Tokenizers: round-trips, BPE training, saving and loading."""

import json
from pathlib import Path

import pytest

from multitoken.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    build_tokenizer,
    load_tokenizer,
)
from multitoken.errors import DataError

SAMPLES = ["hello world", "héllo wörld — ünïcode ✓ 日本語 🙂", "def f(x):\n    return x * 2\n", ""]
TRAIN_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i, i * i)\n",
] * 40  # a few KB


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TRAIN_TEXT, vocab_size=320)


def test_bytes_round_trip() -> None:
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.kind) == (257, 256, "bytes")
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


def test_bytes_decode_invalid_utf8_and_eos() -> None:
    tok = ByteTokenizer()
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # truncated 3-byte sequence
    assert tok.decode([104, 105, 256, 0xFF]) == "hi<|endoftext|>\ufffd"
    with pytest.raises(ValueError):
        tok.decode([257])


def test_bpe_round_trip(bpe: BPETokenizer) -> None:
    assert bpe.kind == "bpe"
    assert 257 < bpe.vocab_size <= 320
    assert bpe.decode([bpe.eos_id]) == "<|endoftext|>"
    for text in SAMPLES + TRAIN_TEXT[:3]:
        assert bpe.decode(bpe.encode(text)) == text  # unseen characters too: all 256 bytes are known
    assert len(bpe.encode(TRAIN_TEXT[0])) < len(TRAIN_TEXT[0])  # merges were learnt
    assert bpe.encode_batch(SAMPLES) == [bpe.encode(t) for t in SAMPLES]


def test_bpe_literal_eos_is_text(bpe: BPETokenizer) -> None:
    ids = bpe.encode("a<|endoftext|>b")
    assert bpe.eos_id not in ids
    assert bpe.decode(ids) == "a<|endoftext|>b"


def test_bpe_decode_invalid_utf8(bpe: BPETokenizer) -> None:
    emoji = bpe.encode("🙂")
    assert len(emoji) == 4  # one byte-level token per byte: unseen in training
    assert "\ufffd" in bpe.decode(emoji[:2])


def test_save_load_bytes(tmp_path: Path) -> None:
    ByteTokenizer().save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"kind": "bytes"}
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_save_load_bpe(bpe: BPETokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["kind"] == "bpe"
    for source in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = load_tokenizer(source)
        assert isinstance(loaded, BPETokenizer)
        assert (loaded.vocab_size, loaded.eos_id) == (bpe.vocab_size, bpe.eos_id)
        assert loaded.fingerprint == bpe.fingerprint
        assert loaded.encode(SAMPLES[1]) == bpe.encode(SAMPLES[1])


def test_from_file_eos_fallback(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    hf = HFTokenizer(models.BPE())
    hf.add_special_tokens(["<s>", "</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    assert BPETokenizer.from_file(tmp_path / "tokenizer.json").eos_id == hf.token_to_id("</s>")

    hf = HFTokenizer(models.BPE())
    hf.add_special_tokens(["<pad>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="no end-of-text token"):
        BPETokenizer.from_file(tmp_path / "tokenizer.json")


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"no tokenizer in {tmp_path}"):
        load_tokenizer(tmp_path)


def test_build_tokenizer(bpe: BPETokenizer, tmp_path: Path) -> None:
    assert isinstance(build_tokenizer("bytes", None, 0), ByteTokenizer)
    assert build_tokenizer("bpe", TRAIN_TEXT, 300).vocab_size <= 300
    bpe.save(tmp_path)
    assert build_tokenizer(str(tmp_path / "tokenizer.json"), None, 0).fingerprint == bpe.fingerprint
    with pytest.raises(DataError, match="unknown tokenizer 'wordpiece'"):
        build_tokenizer("wordpiece", None, 0)
    with pytest.raises(DataError, match="needs texts"):
        build_tokenizer("bpe", None, 300)
    with pytest.raises(DataError, match="at least 257"):
        build_tokenizer("bpe", TRAIN_TEXT, 100)
