"""Text corpora: files, folders, glob patterns and JSON-lines files turned into documents.

A document is the unit of the train/validation split and is followed by `<|endoftext|>` in the token
stream. The default corpus is the running Python's standard library without its tests: a code
corpus that exists on every machine, with no download.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from multitoken.errors import DataError

# Directory names left out of the default corpus: installed packages and the stdlib's own tests.
_EXCLUDED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Document:
    """One document: `name` identifies it (and decides its split), `text` is its content."""

    name: str
    text: str


@dataclass
class Corpus:
    """The documents of a corpus and the files that were skipped as not text or empty."""

    documents: list[Document]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def n_skipped(self) -> int:
        """Number of files skipped (binary, not UTF-8, or empty)."""
        return len(self.skipped)

    @property
    def n_chars(self) -> int:
        """Total characters over all documents."""
        return sum(len(doc.text) for doc in self.documents)

    @cached_property
    def fingerprint(self) -> str:
        """Hash of every document's name and content: equal fingerprints mean the same corpus."""
        digest = hashlib.blake2b(digest_size=16)
        for doc in self.documents:
            name = doc.name.encode("utf-8")
            text = doc.text.encode("utf-8")
            # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
            digest.update(len(name).to_bytes(8, "little") + name + len(text).to_bytes(8, "little") + text)
        return digest.hexdigest()


def default_corpus_paths() -> list[Path]:
    """The `.py` files of this Python's standard library, without site-packages and test folders."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [path for path in _walk_files(stdlib, _EXCLUDED_STDLIB_DIRS) if path.suffix == ".py"]


def _walk_files(root: Path, excluded_dirs: frozenset[str] = frozenset({"__pycache__"})) -> list[Path]:
    """Regular files under `root`, sorted, without hidden files/folders or `excluded_dirs`."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into them.
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in excluded_dirs]
        files.extend(Path(dirpath) / name for name in filenames if not name.startswith("."))
    return sorted(path for path in files if path.is_file())


def resolve_sources(sources: Sequence[str | Path]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a list of files, without duplicates."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(_walk_files(path))
        elif _GLOB_CHARS & set(str(source)):
            matches = sorted(glob.glob(str(source), recursive=True))
            if not matches:
                raise DataError(f"no files match {source}")
            for match in map(Path, matches):
                files.extend(_walk_files(match) if match.is_dir() else [match])
        else:
            raise DataError(f"no such file or folder: {source}")
    seen: set[Path] = set()
    unique: list[Path] = []
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _read_text(path: Path) -> tuple[str | None, str]:
    """The file's text, or None and the reason it is not usable text."""
    data = path.read_bytes()
    if b"\x00" in data:
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    if not text.strip():
        return None, "empty"
    return text, ""


def _jsonl_documents(path: Path, text: str, text_field: str) -> Iterator[Document]:
    """One document per non-blank line of a JSON-lines file, taken from `text_field`."""
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from exc
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DataError(f"{path}:{line_no}: no string field {text_field!r}")
        if value.strip():
            yield Document(f"{path}:{line_no}", value)


def iter_documents(
    sources: Sequence[str | Path],
    text_field: str = "text",
    on_skip: Callable[[str, str], None] | None = None,
) -> Iterator[Document]:
    """Documents of `sources` in order; `.jsonl` files give one document per line.

    Files that are binary, not UTF-8 or empty are skipped and reported as `on_skip(path, reason)`.
    """
    for path in resolve_sources(sources):
        text, reason = _read_text(path)
        if text is None:
            if on_skip is not None:
                on_skip(str(path), reason)
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text, text_field)
        else:
            yield Document(str(path), text)


def load_corpus(sources: Sequence[str | Path], text_field: str = "text") -> Corpus:
    """Read every document of `sources` into memory; DataError if there are none."""
    skipped: list[tuple[str, str]] = []
    documents = list(iter_documents(sources, text_field, lambda path, reason: skipped.append((path, reason))))
    if not documents:
        shown = ", ".join(map(str, sources[:3])) + (", ..." if len(sources) > 3 else "")
        raise DataError(f"no text documents found in {shown or 'no sources'} ({len(skipped)} files skipped)")
    return Corpus(documents, skipped)
