import json
from pathlib import Path

import pytest

from multitoken.data.corpus import load_corpus
from multitoken.data.dataset import split_documents
from multitoken.data.heldout import code_and_prose, held_out_prompts
from multitoken.data.tokenizers import ByteTokenizer
from multitoken.errors import DataError

LENGTH = 8  # documents need at least 2 * 8 + 200 bytes


def make_sources(root: Path, n: int = 12) -> list[str]:
    """n code files and a JSON-lines file of n prose documents, each long enough and distinct."""
    code = []
    for i in range(n):
        path = root / f"mod{i}.py"
        path.write_text("".join(f"x{i}_{j} = {j}\n" for j in range(60)))
        code.append(str(path))
    prose = root / "prose.jsonl"
    lines = (json.dumps({"text": f"Topic {i}. " + "words and more words " * 20}) + "\n" for i in range(n))
    prose.write_text("".join(lines))
    return code + [str(prose)]


def test_prompts_come_from_validation_documents_of_their_kind(tmp_path: Path) -> None:
    sources, tok = make_sources(tmp_path), ByteTokenizer()
    prompts = held_out_prompts(sources, tok, n=50, val_fraction=0.4, length=LENGTH)
    _, val = split_documents(load_corpus(sources).documents, 0.4)
    val_code = [d for d in val if d.name.endswith(".py")]
    val_text = [d for d in val if ".jsonl:" in d.name]
    assert len(prompts["code"]) == len(val_code) and len(prompts["text"]) == len(val_text)
    for kind, docs in (("code", val_code), ("text", val_text)):
        for prompt, doc in zip(prompts[kind], docs, strict=True):
            ids = tok.encode(doc.text)
            start = len(ids) // 3 if kind == "code" else 0  # code skips its head, text starts at the top
            assert prompt == ids[start : start + LENGTH]


def test_prompts_from_the_training_split(tmp_path: Path) -> None:
    sources, tok = make_sources(tmp_path), ByteTokenizer()
    train, _ = split_documents(load_corpus(sources).documents, 0.4)
    prompts = held_out_prompts(sources, tok, n=50, val_fraction=0.4, length=LENGTH, split="train")
    for kind in ("code", "text"):
        docs = [d for d in train if (d.name.endswith(".py") if kind == "code" else ".jsonl:" in d.name)]
        assert len(prompts[kind]) == len(docs) > 0
        for prompt, doc in zip(prompts[kind], docs, strict=True):
            ids = tok.encode(doc.text)
            start = len(ids) // 3 if kind == "code" else 0
            assert prompt == ids[start : start + LENGTH]


def test_per_doc_and_count(tmp_path: Path) -> None:
    sources, tok = make_sources(tmp_path), ByteTokenizer()
    one = held_out_prompts(sources, tok, n=50, val_fraction=0.4, length=LENGTH)
    three = held_out_prompts(sources, tok, n=50, val_fraction=0.4, length=LENGTH, per_doc=3)
    assert len(three["code"]) == 3 * len(one["code"]) and len(three["text"]) == 3 * len(one["text"])
    assert all(len(p) == LENGTH for ps in three.values() for p in ps)
    capped = held_out_prompts(sources, tok, n=2, val_fraction=0.4, length=LENGTH, per_doc=3)
    assert len(capped["code"]) == 2 and len(capped["text"]) == 2


def test_no_long_enough_document_is_a_clear_error(tmp_path: Path) -> None:
    sources = make_sources(tmp_path)
    with pytest.raises(DataError, match="no held-out code or text document of at least"):
        held_out_prompts(sources, ByteTokenizer(), n=4, val_fraction=0.4, length=1000)


def test_code_and_prose_splits_the_stdlib_topics_out(tmp_path: Path) -> None:
    code, prose = code_and_prose(tmp_path)
    assert code and not any(p.endswith("pydoc_data/topics.py") for p in code)
    topics = [json.loads(line)["text"] for line in Path(prose[0]).read_text().splitlines()]
    assert len(topics) > 50 and all(isinstance(t, str) for t in topics)
