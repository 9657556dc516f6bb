"""The README's Python examples run as written."""

import os
import re
from pathlib import Path

from multitoken.api import MultiTokenLM
from multitoken.data.tokenizers import ByteTokenizer
from multitoken.generate.tree import Tree
from tests.conftest import make_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    # What the examples read: a run directory where the main job writes one (a small model stands in).
    model = make_model(vocab_size=257, n_future=3, max_seq_len=256)
    MultiTokenLM(model, ByteTokenizer(), tree=Tree(((0,), (1,), (0, 0)))).save(tmp_path / "runs" / "demo")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), {})
    finally:
        os.chdir(cwd)
    assert (tmp_path / "runs" / "demo-copy" / "config.json").is_file() and capsys.readouterr().out
