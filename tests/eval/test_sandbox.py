"""The sandbox reports broken and hostile programs as failures, never hangs and leaves nothing behind.

Most hostile programs run with `guard=False` so that the OS-level limits are what stops them, not the
Python prelude. Wall-time bounds are safety bounds (nothing may hang the host), not benchmarks.
"""

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from multitoken.errors import UserError
from multitoken.eval import sandbox
from multitoken.eval.sandbox import TrustedTests, bwrap_command, living_processes, run_many, run_untrusted

TIMEOUT = 2.0
IS_ROOT = os.geteuid() == 0


def run(program: str, **kwargs):
    """Run with a short timeout and check the safety bound on wall time."""
    kwargs.setdefault("timeout_s", TIMEOUT)
    start = time.monotonic()
    result = run_untrusted(program, **kwargs)
    assert time.monotonic() - start < kwargs["timeout_s"] + 3
    return result


@pytest.fixture
def own_tempdir(tmp_path, monkeypatch):
    """This test's runs get their workdirs under `tmp_path`, so that `sandbox_processes` tells their processes
    from those of other sessions sandboxing on the same machine."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def sandbox_processes(tempdir: Path) -> list[int]:
    """Pids of live sandbox processes whose workdir is under `tempdir` (their command line names it)."""
    pids = []
    for name in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if name.isdigit() and f"{tempdir}/multitoken-sandbox-".encode() in cmdline and int(name) != os.getpid():
            pids.append(int(name))
    return _alive(pids)


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            alive.append(pid)
    return alive


def leased_uid(result) -> int | None:
    return next((int(i.split("=")[1]) for i in result.isolation if i.startswith("uid=")), None)


@pytest.mark.parametrize("guard", [True, False])
def test_correct_program_passes(guard):
    result = run("def f(x):\n    return x + 1\n\nassert f(1) == 2\n", guard=guard)
    assert result.passed and result.status == "passed", result
    assert "rlimits" in result.isolation
    assert ("guard" in result.isolation) == guard


def test_wrong_answer_fails():
    result = run("def f(x):\n    return x\n\nassert f(1) == 2\n")
    assert not result.passed and result.status == "failed"
    assert result.detail == "AssertionError"


@pytest.mark.parametrize(
    "exit_call, why",
    [("import sys\nsys.exit(0)", "SystemExit: 0"), ("import os\nos._exit(0)", "ended before the tests finished")],
)
def test_exit_zero_before_the_checks_is_not_a_pass(exit_call, why):
    result = run(f"{exit_call}\nassert False\n", guard=False)
    assert not result.passed and result.status == "failed"
    assert why in result.detail


def test_printing_a_fake_marker_is_not_a_pass():
    result = run("print('passed')\nimport sys\nsys.exit(0)\n")
    assert not result.passed


@pytest.mark.parametrize("guard", [True, False])
def test_infinite_loop_times_out(guard):
    result = run("while True:\n    pass\n", guard=guard)
    assert not result.passed and result.status == "timeout"


def test_huge_allocation_fails_with_memory_error():
    result = run("x = bytearray(10**11)\n", guard=False)
    assert not result.passed and result.status == "failed"
    assert "MemoryError" in result.detail


def test_segfault_is_reported_as_killed():
    result = run("import ctypes\nctypes.string_at(0)\n", guard=False)
    assert not result.passed and result.status == "killed"
    assert "SIGSEGV" in result.detail


def test_huge_file_is_stopped():
    result = run("open('big', 'wb').write(b'x' * (64 * 2**20))\n", guard=False, file_mb=8)
    assert not result.passed and result.status in ("failed", "killed")


def test_fork_bomb_is_contained_and_leaves_no_process(own_tempdir):
    # Keeps forking after EAGAIN so it runs until the timeout; children start new sessions to try to
    # escape the process group.
    bomb = (
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"
        "    except OSError:\n"
        "        time.sleep(0.001)\n"
    )
    result = run(bomb, guard=False)
    assert not result.passed and result.status == "timeout"
    assert sandbox_processes(own_tempdir) == []
    uid = leased_uid(result)
    if uid is not None:
        assert living_processes(uid) == []


def test_plain_fork_bomb_with_guard_fails_fast(own_tempdir):
    result = run("import os\nwhile True:\n    os.fork()\n")
    assert not result.passed and result.status == "failed"
    assert sandbox_processes(own_tempdir) == []


PRIVATE_MOUNTS = ("/tmp", "/var/tmp", "/dev/shm")  # the sandbox covers these with its own tmpfs


def _visible_to_sandbox(path: Path) -> bool:
    """Outside the private mounts, with every ancestor traversable by others."""
    resolved = path.resolve()
    if any(resolved == Path(m) or Path(m) in resolved.parents for m in PRIVATE_MOUNTS):
        return False
    return all(p.stat().st_mode & 0o001 for p in resolved.parents)


@pytest.fixture
def root_owned_dir(request):
    """A directory the test process owns with mode 0o755 that the sandboxed program can see.

    The checkout itself may sit under /tmp (hidden inside the sandbox) or under /root (not traversable),
    so the first visible candidate is used.
    """
    candidates = [request.config.rootpath / ".pytest_cache", Path("/var/lib"), Path("/srv"), Path("/opt")]
    parent = next((c for c in candidates if _visible_to_sandbox(c if c.exists() else c.parent)), None)
    if parent is None:
        pytest.skip("no directory visible to the sandbox to test writes in")
    parent.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="multitoken-sandbox-write-", dir=parent))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(not IS_ROOT, reason="privileges are dropped only when running as root")
def test_cannot_write_outside_the_sandbox(root_owned_dir):
    target = root_owned_dir / "pwned.txt"
    # The directory is visible to the program, so a failure below is a permission failure.
    assert run(f"import os\nassert os.path.isdir({str(root_owned_dir)!r})\n", guard=False).passed
    result = run(f"open({str(target)!r}, 'w').write('x')\n", guard=False)
    assert not result.passed and ("PermissionError" in result.detail or "Read-only file system" in result.detail)
    assert not target.exists()


def test_workdir_is_writable_and_removed_afterwards():
    result = run("import os\nopen('scratch.txt', 'w').write('x')\nraise SystemExit(os.getcwd())\n", guard=False)
    assert result.status == "failed"
    workdir = result.detail
    assert "multitoken-sandbox-" in workdir
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("guard", [True, False])
def test_socket_to_localhost_fails(guard):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')\n"
        result = run(program, guard=guard)
        if not guard and "netns" not in result.isolation:
            pytest.skip("no network namespace here; only the guard prelude blocks sockets")
        assert not result.passed and result.status == "failed"
        assert "Error" in result.detail
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()


def test_run_many_keeps_order():
    programs = ["assert True\n", "assert False\n", "x = 1\n", "raise ValueError('no')\n"]
    results = run_many(programs, workers=2, timeout_s=TIMEOUT)
    assert [r.status for r in results] == ["passed", "failed", "passed", "failed"]
    assert results[3].detail == "ValueError: no"


def test_invalid_limits_raise_user_error():
    with pytest.raises(UserError):
        run_untrusted("pass", timeout_s=0)
    with pytest.raises(UserError):
        run_many(["pass"], workers=0)


def test_backend_choice_errors(monkeypatch):
    with pytest.raises(UserError, match="backend must be one of"):
        run_untrusted("pass", backend="docker")
    with pytest.raises(UserError, match="namespaces=False"):
        run_untrusted("pass", namespaces=False, backend="bwrap")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UserError, match="needs root"):
        run_untrusted("pass", backend="namespaces")
    monkeypatch.setattr(sandbox, "_bwrap", lambda: None)
    with pytest.raises(UserError, match="bubblewrap"):
        run_untrusted("pass", backend="bwrap")


def test_auto_backend_is_the_strongest_that_works(monkeypatch):
    assert sandbox._choose_backend("auto", namespaces=False) == "rlimits"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert sandbox._choose_backend("auto", namespaces=True) == "namespaces"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for works, expected in ((True, "bwrap"), (False, "rlimits")):
        monkeypatch.setattr(sandbox, "_bwrap_works", lambda works=works: works)
        assert sandbox._choose_backend("auto", namespaces=True) == expected


def test_bwrap_command_line():
    command = bwrap_command("/tmp/multitoken-sandbox-x", 8, "/usr/bin/bwrap")
    assert command[0] == "/usr/bin/bwrap" and command[-1] == "--"
    flags = set(command)
    assert {"--unshare-all", "--die-with-parent", "--new-session"} <= flags
    assert command[command.index("--cap-drop") + 1] == "ALL"
    # The host read-only first; the private mounts on top of it, each of the given size.
    assert command.index("--ro-bind") < min(i for i, a in enumerate(command) if a in ("--tmpfs", "--dev", "--proc"))
    assert command[command.index("--ro-bind") + 1 : command.index("--ro-bind") + 3] == ["/", "/"]
    sized = [command[i + 1] for i, a in enumerate(command) if a == "--tmpfs" and command[i - 2] == "--size"]
    assert sized == ["/tmp", "/var/tmp", "/dev/shm"] and command[command.index("--size") + 1] == str(8 * 2**20)
    assert "/run" in [command[i + 1] for i, a in enumerate(command) if a == "--tmpfs"]
    assert command[command.index("--proc") + 1] == "/proc" and command[command.index("--dev") + 1] == "/dev"
    assert command[command.index("--chdir") + 1] == "/tmp/multitoken-sandbox-x"
    assert "--size" not in bwrap_command("/tmp/w", 8, sized_tmpfs=False)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_bwrap_backend():
    """The same verdicts through bubblewrap; the host's world-writable directories stay untouched and the
    program sees only the sandbox's processes."""
    right = run("def f(x):\n    return x + 1\n", backend="bwrap", tests=TrustedTests("assert f(1) == 2"))
    assert right.passed, right
    assert right.isolation[0] == "bwrap" and "readonly-root" in right.isolation
    wrong = run("def f(x):\n    return x\n", backend="bwrap", tests=TrustedTests("assert f(1) == 2"))
    assert wrong.status == "failed" and wrong.detail == "AssertionError"
    name = "multitoken-bwrap-" + os.urandom(8).hex()
    dirs = ["/run/lock", "/var/tmp", "/dev/shm", "/tmp"]
    program = (
        "import os\n"
        f"for d in {dirs!r}:\n"
        "    try:\n"
        f"        open(os.path.join(d, {name!r}), 'x').close()\n"
        "    except OSError:\n"
        "        pass\n"
        "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "raise SystemExit(str(len(pids)))\n"
    )
    result = run(program, backend="bwrap", guard=False)
    assert not any(os.path.exists(os.path.join(d, name)) for d in dirs)
    # bubblewrap's init, the launcher, the runner and the program
    assert result.detail == "SystemExit: 4", result
