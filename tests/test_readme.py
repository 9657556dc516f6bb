"""The README's Python examples run as written."""

import os
import re
import shutil
import sysconfig
from pathlib import Path

import torch

import multitoken
from multitoken.api import MultiTokenLM

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    # What the examples read: a folder of the user's code (some standard-library modules stand in).
    project = tmp_path / "my_project"
    project.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "bisect.py", "heapq.py"):
        shutil.copy(stdlib / name, project / name)
    shutil.copy(stdlib / "fractions.py", project / "held_out.py")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in blocks:
            scope: dict = {}
            exec(compile(block, str(README), "exec"), scope)
    finally:
        os.chdir(cwd)
    assert capsys.readouterr().out
    trained = multitoken.load(tmp_path / "runs" / "mine")
    loaded: MultiTokenLM = scope["lm"]  # read back from the Hugging Face folder
    assert loaded.model.cfg == trained.model.cfg and loaded.tree is not None and loaded.tree.size <= 8
    for name, tensor in trained.model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name  # every head, bitwise
    greedy = loaded.generate("def fib(n):", max_new_tokens=24)
    assert greedy.text == trained.generate("def fib(n):", max_new_tokens=24, decoding="plain").text
