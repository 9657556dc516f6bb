"""Attacks on the sandbox's verdict and isolation: each one must end as a failure and leave nothing behind.

The verdict attacks are wrong HumanEval completions that try to be counted as passes: by reading the run's
secrets from their own process, printing, exiting early, or hooking the interpreter's exit and error paths.
They run end to end through `evaluate_humaneval`, so they hold whatever the sandbox's internals are.
"""

import os
import secrets
import stat
import time
from pathlib import Path

import pytest

from multitoken.eval.humaneval import evaluate_humaneval, load_problems
from multitoken.eval.sandbox import TrustedTests, run_untrusted

IS_ROOT = os.geteuid() == 0

# Every 32-hex-digit string the program can find about itself: its source, its argv, its command line, its
# environment and the constants of every code object on the stack. A run secret of that shape is printed.
_FIND_SECRETS = """\
    import os, re, sys
    found = set()
    texts = [" ".join(sys.argv), " ".join(os.environ.values())]
    for path in [globals().get("__file__", ""), *sys.argv]:
        try:
            texts.append(open(path, errors="replace").read())
        except OSError:
            pass
    try:
        texts.append(open("/proc/self/cmdline", "rb").read().decode(errors="replace"))
    except OSError:
        pass
    frame = sys._getframe()
    while frame is not None:
        texts += [c for c in frame.f_code.co_consts if isinstance(c, str)]
        frame = frame.f_back
    for text in texts:
        found.update(re.findall(r"[0-9a-f]{32}", text))
    for s in found:
        print(s, flush=True)
"""

FORGERIES = {
    "print every secret it can read, then exit 0": _FIND_SECRETS + "    os._exit(0)\n",
    "print 'passed' and every marker-like line": "    print('passed')\n    print('OK', flush=True)\n    return None\n",
    "sys.exit(0) before the tests": "    import sys\n    sys.exit(0)\n",
    "os._exit(0) before the tests": "    import os\n    os._exit(0)\n",
    "an atexit hook printing the secrets and exiting 0": (
        "    import atexit\n"
        "    def forge():\n"
        + "".join("    " + line + "\n" for line in _FIND_SECRETS.splitlines())
        + "        os._exit(0)\n"
        "    atexit.register(forge)\n"
        "    return None\n"
    ),
    "an atexit hook raising SystemExit(0)": (
        "    import atexit\n"
        "    def leave():\n"
        "        raise SystemExit(0)\n"
        "    atexit.register(leave)\n"
        "    return None\n"
    ),
    "an excepthook printing the secrets and exiting 0": (
        "    import sys\n"
        "    def hook(*args):\n"
        + "".join("    " + line + "\n" for line in _FIND_SECRETS.splitlines())
        + "        os._exit(0)\n"
        "    sys.excepthook = hook\n"
        "    return None\n"
    ),
    "AssertionError replaced in builtins": (
        "    import builtins\n    builtins.AssertionError = type('AssertionError', (Exception,), {})\n    return None\n"
    ),
}


@pytest.fixture(scope="module")
def first_problem():
    return load_problems()[:1]


@pytest.mark.parametrize("completion", FORGERIES.values(), ids=FORGERIES.keys())
def test_a_wrong_completion_cannot_forge_a_pass(first_problem, completion):
    report = evaluate_humaneval(lambda prompt, n: [completion], 1, [1], problems=first_problem, progress=False)
    result = report.results[0]
    assert result.n_correct == 0, result


def world_writable_dirs(depth: int = 4) -> list[Path]:
    """Directories on the host that others may write to (mode o+w or the sticky bit), /proc and /sys aside.

    Such directories sit near the root (/tmp, /var/tmp, /run/lock, /dev/shm, /dev/mqueue, /var/lib/php/...),
    so the walk stops `depth` levels down, which keeps it to a fraction of a second.
    """
    found, level = [], [Path("/")]
    for _ in range(depth):
        below = []
        for directory in level:
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                path = Path(entry.path)
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode) and path not in (Path("/proc"), Path("/sys")):
                    below.append(path)
                    if st.st_mode & (stat.S_IWOTH | stat.S_ISVTX):
                        found.append(path)
        level = below
    return found


def test_nothing_written_anywhere_persists():
    """A file created in any world-writable host directory (/run/lock, /var/tmp, ...) is gone after the run."""
    dirs = world_writable_dirs()
    assert dirs, "no world-writable directory found; the test would prove nothing"
    name = "multitoken-persist-" + secrets.token_hex(8)
    program = (
        "import os\n"
        f"written = []\n"
        f"for d in {[str(d) for d in dirs]!r}:\n"
        "    try:\n"
        f"        with open(os.path.join(d, {name!r}), 'x') as f:\n"
        "            f.write('x')\n"
        "        written.append(d)\n"
        "    except OSError:\n"
        "        pass\n"
        "raise SystemExit('wrote ' + repr(written))\n"
    )
    try:
        result = run_untrusted(program, timeout_s=10.0, guard=False)
        assert result.status == "failed" and "wrote" in result.detail, result
        left = [d for d in dirs if (d / name).exists()]
        assert left == [], f"the program's files outlived it in {left}"
    finally:
        for d in dirs:
            try:
                (d / name).unlink()
            except OSError:
                pass


@pytest.mark.skipif(not IS_ROOT, reason="the root backend's namespaces need root")
def test_only_the_sandbox_processes_are_visible():
    program = (
        "import os\n"
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "raise SystemExit('pids ' + ' '.join(map(str, pids[:20])) + ' of ' + str(len(pids)))\n"
    )
    result = run_untrusted(program, timeout_s=5.0, guard=False)
    assert "pids" in result.detail, result
    pids = [int(p) for p in result.detail.split("pids ")[1].split(" of ")[0].split()]
    assert pids == [1], f"the program sees other processes: {result.detail}"


def test_host_processes_cannot_be_signalled():
    """A program that SIGKILLs every pid it can see ends as a failure and kills nothing of the host's."""
    witness = os.getpid()
    program = (
        "import os, signal\n"
        "for p in os.listdir('/proc'):\n"
        "    if p.isdigit() and int(p) != os.getpid():\n"
        "        try:\n"
        "            os.kill(int(p), signal.SIGKILL)\n"
        "        except OSError:\n"
        "            pass\n"
        "raise SystemExit('done')\n"
    )
    start = time.monotonic()
    result = run_untrusted(program, timeout_s=5.0, guard=False)
    assert not result.passed and time.monotonic() - start < 8
    assert os.getpid() == witness


def judged(program: str, code: str, **kwargs) -> object:
    """Run `program` against trusted tests `code`."""
    kwargs.setdefault("timeout_s", 5.0)
    return run_untrusted(program, tests=TrustedTests(code=code), **kwargs)


def test_trusted_tests_judge_the_program():
    assert judged("def f(x):\n    return x + 1\n", "assert f(1) == 2").passed
    wrong = judged("def f(x):\n    return x\n", "assert f(1) == 2")
    assert wrong.status == "failed" and wrong.detail == "AssertionError"


# Programs that stop instead of answering, trying to end the run as a pass; the tests call `f()`.
STOPPERS = {
    "write a pass into every descriptor, then exit 0": (
        "import os\n"
        "def f():\n"
        "    for fd in range(1024):\n"
        '        for line in (b\'{"status": "passed", "detail": ""}\\n\', b\'["value", null]\\n\'):\n'
        "            try:\n"
        "                os.write(fd, line)\n"
        "            except OSError:\n"
        "                pass\n"
        "    os._exit(0)\n"
    ),
    "exit from inside the call": "def f():\n    raise SystemExit(0)\n",
    "interrupt from inside the call": "def f():\n    raise KeyboardInterrupt\n",
    "die from inside the call": "import os\ndef f():\n    os._exit(0)\n",
}


@pytest.mark.parametrize("program", STOPPERS.values(), ids=STOPPERS.keys())
@pytest.mark.parametrize("code", ["assert f() == 1", "try:\n    assert f() == 1\nexcept BaseException:\n    pass"])
def test_a_program_that_stops_fails_even_if_the_tests_catch_everything(program, code):
    """The second form of the tests swallows every error; the run fails all the same."""
    result = judged(program, code, guard=False)
    assert not result.passed, result


# Wrong values dressed as right ones. Only plain data reaches the tests, so they compare unequal.
LIARS = {
    "an object equal to everything": "class Yes:\n    def __eq__(self, other):\n        return True\n",
    "an int whose __eq__ lies": "class Yes(int):\n    def __eq__(self, other):\n        return True\n",
}


@pytest.mark.parametrize("liar", LIARS.values(), ids=LIARS.keys())
def test_a_lying_value_never_reaches_the_comparison(liar):
    result = judged(liar + "    __hash__ = object.__hash__\n\ndef f():\n    return Yes()\n", "assert f() == 1")
    assert result.status == "failed" and result.detail == "AssertionError", result


def test_the_program_exceptions_reach_the_tests_as_themselves():
    program = "def f(k):\n    raise KeyError(k)\n\nclass Oops(Exception):\n    pass\n\n"
    program += "def g():\n    raise Oops('why')\n"
    code = "try:\n    f('k')\nexcept KeyError as e:\n    assert e.args == ('k',)\nelse:\n    raise AssertionError\n"
    assert judged(program, code).passed
    result = judged(program, "g()")
    assert result.status == "failed" and result.detail.endswith("Oops: why")


def test_values_cross_as_data_and_objects_as_references():
    program = (
        "DATA = [1, (2, 3.5), {'a': {4}}, b'x', None]\n"
        "class Node:\n"
        "    def __init__(self, value, left=None):\n"
        "        self.value, self.left = value, left\n"
        "def total(node):\n"
        "    return 0 if node is None else node.value + total(node.left)\n"
        "root = Node(5, Node(6))\n"
    )
    code = (
        "assert DATA == [1, (2, 3.5), {'a': {4}}, b'x', None] and type(DATA[1]) is tuple\n"
        "assert total(root) == 11 and total(Node(1, root)) == 12\n"
    )
    assert judged(program, code).passed


def test_names_override_the_setup():
    """A prompt's stub in `setup` is replaced by the program's function only when `names` says so."""
    program = "def f(x):\n    return x + 1\n"
    setup = "def f(x):\n    'stub'\n\ndef twice(x):\n    return 2 * x\n"
    code = "assert f(twice(1)) == 3"
    assert run_untrusted(program, tests=TrustedTests(code, setup, names=("f",))).passed
    assert not run_untrusted(program, tests=TrustedTests(code, setup)).passed


def test_builtins_stay_the_runners_unless_named():
    """A program's own `set` cannot answer for the tests' `set(...) == set(...)`; a named `sum` is the program's."""
    program = "def set(*args):\n    return 0\n\ndef f():\n    return [2, 1]\n\ndef sum(a, b):\n    return a * b\n"
    assert not judged(program, "assert set(f()) == set([3])").passed
    assert run_untrusted(program, tests=TrustedTests("assert sum(2, 3) == 6", names=("sum",))).passed


def test_a_name_the_program_lacks_is_a_failure():
    result = judged("x = 1\n", "assert f(1) == 2")
    assert result.status == "failed" and "NameError" in result.detail


@pytest.mark.skipif(not IS_ROOT, reason="both backends drop to a leased uid only as root")
@pytest.mark.parametrize("backend", ["namespaces", "rlimits"])
def test_the_runner_is_out_of_reach(backend):
    """No process the program can see and shares its uid with (the runner, the launcher) lets it read or
    write its memory or its descriptors."""
    program = (
        "import os\n"
        "reached = []\n"
        "me = os.getuid()\n"
        "for p in os.listdir('/proc'):\n"
        "    if not p.isdigit() or int(p) == os.getpid():\n"
        "        continue\n"
        "    try:\n"
        "        if 'Uid:\\t%d\\t' % me not in open('/proc/%s/status' % p).read():\n"
        "            continue\n"
        "    except OSError:\n"
        "        continue\n"
        "    for path, mode in (('mem', 'rb+'), ('environ', 'rb')):\n"
        "        try:\n"
        "            open('/proc/%s/%s' % (p, path), mode).read(1)\n"
        "            reached.append((p, path))\n"
        "        except OSError:\n"
        "            pass\n"
        "    try:\n"
        "        reached.append((p, os.listdir('/proc/%s/fd' % p)))\n"
        "    except OSError:\n"
        "        pass\n"
        "raise SystemExit('reached ' + repr(reached))\n"
    )
    result = run_untrusted(program, backend=backend, guard=False)
    if "cannot start the sandboxed interpreter" in result.detail:
        pytest.skip("without a mount namespace the sandbox uid cannot reach this interpreter")
    assert result.detail == "SystemExit: reached []", result
