"""Every numeric option of every subcommand refuses bad values with one line and exit status 2, no traceback,
and nothing written (property-based: hypothesis draws the option and the value)."""

import argparse
import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multitoken.cli import build_parser, main

# Values each kind of option must refuse, by the rule its type states (multitoken/argtypes.py).
BAD = {
    "integer >= 1": ["0", "-1", "-7", "1.5", "nan", "abc", ""],
    "integer >= 0": ["-1", "-7", "2.5", "nan", "inf", "abc", ""],
    "number > 0": ["0", "-1", "-0.5", "nan", "inf", "-inf", "abc", "1e999"],
    "number >= 0": ["-1", "-1e-9", "nan", "inf", "-inf", "abc"],
    "number > 0 and <= 1": ["0", "-0.1", "1.5", "nan", "inf", "abc"],
    "number >= 0 and <= 1": ["-0.1", "1.5", "nan", "inf", "abc"],
    "list of integers >= 1": ["0", "1,0", "a,b", ",", "-3", "1.5"],
    "list of integers >= 0": ["-1", "a,b", ","],
}


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(argv prefix, positionals, action) for every typed option of every (sub)command; a positional is a
    path placeholder, or its first choice."""
    positionals = [
        a.choices[0] if a.choices else None
        for a in parser._actions
        if not a.option_strings and not isinstance(a.choices, dict)
    ]
    for action in parser._actions:
        if isinstance(action.choices, dict):  # subcommands
            for name, sub in action.choices.items():
                yield from commands(sub, (*prefix, name))
        elif action.option_strings and getattr(action.type, "__name__", "") in BAD:
            yield prefix, positionals, action


CASES = [
    (prefix, positionals, action.option_strings[0], value)
    for prefix, positionals, action in commands(build_parser())
    for value in BAD[action.type.__name__]
]


def test_every_numeric_option_has_a_checked_type():
    typed = {(p, a.option_strings[0]) for p, _, a in commands(build_parser())}
    assert len(typed) > 60  # every subcommand's counts, sizes, rates and probabilities
    for parser_prefix, option in [(("train",), "--lr"), (("generate",), "--top-p"), (("bench", "memory"), "--steps")]:
        assert (parser_prefix, option) in typed


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad-input")
    (d / "file.txt").write_text("keep me\n")
    return d


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES))
def test_bad_values_give_one_line_and_exit_2(case, workdir, capsys):
    prefix, positionals, option, value = case
    before = snapshot(workdir)
    argv = [*prefix, *[p or str(workdir / f"pos{i}") for i, p in enumerate(positionals)], option, value]
    if prefix and prefix[-1] in ("train", "heads", "import", "export"):
        argv += ["--out", str(workdir / "out")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and option in lines[0], (argv, err)
    assert snapshot(workdir) == before
