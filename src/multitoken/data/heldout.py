"""Code and English prose from this Python's own files, and held-out prompts of each kind.

The default corpus is the standard library's `.py` files. Its English prose lives in one of them,
`pydoc_data/topics.py` (the reference manual's topics as Python strings), which as code would be one huge
document; `code_and_prose` writes those topics out as JSON lines, one document each, so that prose gets a
document split of its own and decoding can be measured on code and on text separately.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from multitoken.data.corpus import default_corpus_paths, load_corpus
from multitoken.data.dataset import split_documents
from multitoken.data.tokenizers import Tokenizer
from multitoken.errors import DataError

PROSE_FILE = "pydoc_topics.jsonl"


def code_and_prose(work_dir: Path) -> tuple[list[str], list[str]]:
    """(code, prose) sources: the stdlib's `.py` files without `pydoc_data/topics.py`, and that file's topics
    written to `work_dir/pydoc_topics.jsonl`, one JSON line each (about 4 % of the corpus's bytes).

    The train/validation split hashes document names, which hold the file's path: keep `work_dir` fixed
    across runs that must share a split.
    """
    from pydoc_data.topics import topics

    work_dir.mkdir(parents=True, exist_ok=True)
    prose = work_dir / PROSE_FILE
    prose.write_text("".join(json.dumps({"text": text}) + "\n" for text in topics.values()))
    code = [str(p) for p in default_corpus_paths() if not str(p).endswith("pydoc_data/topics.py")]
    return code, [str(prose)]


def held_out_prompts(
    sources: Sequence[str | Path],
    tokenizer: Tokenizer,
    n: int,
    val_fraction: float,
    length: int = 96,
    per_doc: int = 1,
    split: str = "val",
) -> dict[str, list[list[int]]]:
    """Up to `n` code and `n` text prompts of `length` tokens from the validation documents of `sources`.

    The split is `split_documents(..., val_fraction)`, the one training uses, so no prompt was trained on;
    `split="train"` takes them from the training documents instead (e.g. to calibrate a draft tree without
    spending held-out documents).
    A document from a JSON-lines source is text, any other code. Documents shorter than `2 * length + 200`
    tokens are skipped. One prompt per document (code: from a third of the way in, past the imports and
    docstring; text: its start), or `per_doc` prompts at evenly spaced offsets of each. Raises DataError if
    a kind has no document long enough.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train, val = split_documents(load_corpus(sources).documents, val_fraction)
    sets: dict[str, list[list[int]]] = {"code": [], "text": []}
    for doc in val if split == "val" else train:
        kind = "text" if ".jsonl:" in doc.name else "code"
        if len(sets[kind]) >= n:
            continue
        ids = tokenizer.encode(doc.text)
        if len(ids) < 2 * length + 200:
            continue
        starts = [len(ids) // 3 if kind == "code" else 0]
        if per_doc > 1:
            starts = [j * (len(ids) - length) // per_doc for j in range(per_doc)]
        sets[kind] += [ids[start : start + length] for start in starts][: n - len(sets[kind])]
    empty = [kind for kind, prompts in sets.items() if not prompts]
    if empty:
        which = "held-out" if split == "val" else "training"
        raise DataError(f"no {which} {' or '.join(empty)} document of at least {2 * length + 200} tokens")
    return sets
