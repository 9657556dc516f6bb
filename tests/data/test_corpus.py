"""Corpus loading: files, folders, globs, JSON lines, skipped files and the default corpus."""

import json
from pathlib import Path

import pytest

from multitoken.data.corpus import default_corpus_paths, load_corpus
from multitoken.errors import DataError


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("print('a')\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("print('b')\n")
    (tmp_path / "pkg" / "sub" / "notes.txt").write_text("some notes\n")
    (tmp_path / "pkg" / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "pkg" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "pkg" / "empty.py").write_text("")
    (tmp_path / "pkg" / ".git").mkdir()
    (tmp_path / "pkg" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.cpython.txt").write_text("cached\n")
    return tmp_path


def test_single_file(tree: Path) -> None:
    corpus = load_corpus([tree / "pkg" / "a.py"])
    assert [d.text for d in corpus.documents] == ["print('a')\n"]
    assert corpus.n_skipped == 0


def test_folder_skips_non_text_hidden_and_cache(tree: Path) -> None:
    corpus = load_corpus([tree / "pkg"])
    names = sorted(Path(d.name).name for d in corpus.documents)
    assert names == ["a.py", "b.py", "notes.txt"]
    assert sorted(reason for _, reason in corpus.skipped) == ["binary", "empty", "not UTF-8"]
    assert corpus.n_skipped == 3


def test_glob(tree: Path) -> None:
    corpus = load_corpus([str(tree / "pkg" / "**" / "*.py")])
    assert sorted(Path(d.name).name for d in corpus.documents) == ["a.py", "b.py"]
    assert corpus.n_skipped == 1  # empty.py


def test_duplicates_read_once(tree: Path) -> None:
    corpus = load_corpus([tree / "pkg" / "a.py", tree / "pkg"])
    assert len(corpus.documents) == 3


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [{"text": "first doc"}, {"text": "second doc", "id": 2}, {"text": ""}, {"a": "x", "text": "third"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = load_corpus([path])
    assert [d.text for d in corpus.documents] == ["first doc", "second doc", "third"]
    assert len({d.name for d in corpus.documents}) == 3


def test_jsonl_text_field(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"content": "body", "text": 1}) + "\n")
    assert [d.text for d in load_corpus([path], text_field="content").documents] == ["body"]


def test_jsonl_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="data.jsonl:1: no string field 'text'"):
        load_corpus([path])
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="data.jsonl:1: invalid JSON"):
        load_corpus([path])


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder: .*nope.txt"):
        load_corpus([tmp_path / "nope.txt"])
    with pytest.raises(DataError, match=r"no files match .*\*\.rs"):
        load_corpus([str(tmp_path / "*.rs")])


def test_no_documents(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text documents found in .*empty"):
        load_corpus([tmp_path / "empty"])
    (tmp_path / "empty" / "x.bin").write_bytes(b"\x00")
    with pytest.raises(DataError, match=r"no text documents found .*\(1 files skipped\)"):
        load_corpus([tmp_path / "empty"])


def test_fingerprint(tree: Path) -> None:
    first = load_corpus([tree / "pkg"]).fingerprint
    assert load_corpus([tree / "pkg"]).fingerprint == first
    (tree / "pkg" / "a.py").write_text("print('A')\n")
    assert load_corpus([tree / "pkg"]).fingerprint != first


def test_default_corpus_paths() -> None:
    paths = default_corpus_paths()
    assert paths and paths == sorted(paths)
    assert all(p.suffix == ".py" for p in paths)
    excluded = {"test", "tests", "idle_test", "site-packages"}
    assert not any(excluded & set(p.parts) for p in paths)
    total = sum(p.stat().st_size for p in paths)
    assert 5e6 < total < 40e6
