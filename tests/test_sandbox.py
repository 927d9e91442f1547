"""The code sandbox survives hostile programs and leaves the machine as it was."""

import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from ebft.execution import sandbox
from ebft.execution.sandbox import (OUTPUT_CAP, UID_POOL, IsolationUnavailable, Limits, isolation_level, parallel_map,
                                    require_isolation, run_command, run_python)

LEVEL = isolation_level()
ISOLATED = LEVEL == "bwrap"
needs_isolation = pytest.mark.skipif(not ISOLATED, reason="needs bubblewrap isolation (apt-get install bubblewrap)")
MODES = ["process", "bwrap"] if ISOLATED else ["process"]


def _procs_with(token: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if token.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def _token() -> str:
    """A unique number usable as a ``sleep`` duration and findable in /proc."""
    return f"{900 + uuid.uuid4().int % 99}.{uuid.uuid4().int % 10**9:09d}"


def test_exit_codes_map_to_statuses():
    ok = run_python("print('hi')")
    assert (ok.status, ok.returncode, ok.stdout) == ("passed", 0, "hi\n")
    bad = run_python("assert 1 == 2, 'nope'")
    assert bad.status == "failed" and bad.returncode == 1 and "AssertionError: nope" in bad.stderr
    exited = run_python("raise SystemExit(3)")
    assert (exited.status, exited.returncode) == ("failed", 3)


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_times_out(mode):
    result = run_command([sys.executable, "-c", "while True: pass"], timeout=1.0, isolation=mode)
    assert result.status == "timeout"
    assert 1.0 <= result.wall_s < 2.5


def test_cpu_limit_kills_with_sigxcpu_as_error():
    result = run_command([sys.executable, "-c", "while True: pass"], timeout=10.0, limits=Limits(cpu_s=1))
    assert result.status == "error" and "SIGXCPU" in result.detail
    assert result.wall_s < 10.0   # the CPU limit, not the wall timeout, ended it (wall time varies with load)


def test_file_size_limit():
    result = run_command([sys.executable, "-c", "open('big', 'wb').write(b'x' * (3 << 20))"],
                         limits=Limits(fsize_mb=1))
    assert result.status == "failed" and "File too large" in result.stderr


def test_memory_bomb_fails_fast():
    t0 = time.monotonic()
    result = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))\n", timeout=10.0,
                        memory_mb=512)
    assert result.status in ("failed", "error")
    assert "MemoryError" in result.stderr or result.status == "error"
    assert time.monotonic() - t0 < 5


@pytest.mark.skipif(not ISOLATED and os.geteuid() == 0,
                    reason="RLIMIT_NPROC does not bind root without bubblewrap: a real fork bomb")
def test_fork_bomb_is_contained_and_cleaned_up():
    token = _token()
    program = (f"import os, subprocess\nsubprocess.Popen(['sleep', '{token}'])\n"
               "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    t0 = time.monotonic()
    result = run_command([sys.executable, "-c", program], timeout=2.0)
    assert result.status in ("timeout", "error", "failed")
    assert time.monotonic() - t0 < 6
    assert _procs_with(token) == []  # neither the sleeper nor a bomb process (their argv holds the token)


@pytest.mark.parametrize("mode", MODES)
def test_setsid_descendants_do_not_outlive_the_run(mode):
    token = _token()
    program = (f"import subprocess\nsubprocess.Popen(['setsid', 'sleep', '{token}'], start_new_session=True,\n"
               "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\nprint('spawned')\n")
    result = run_command([sys.executable, "-c", program], isolation=mode)
    assert result.status == "passed" and result.stdout == "spawned\n"
    assert _procs_with(token) == []


@pytest.mark.parametrize("mode", MODES)
def test_orphan_holding_stdout_does_not_stall(mode):
    token = _token()
    program = f"import subprocess\nsubprocess.Popen(['setsid', 'sleep', '{token}'])\nprint('done')\n"
    result = run_command([sys.executable, "-c", program], timeout=5.0, isolation=mode)
    assert result.status == "passed" and result.wall_s < 3
    assert _procs_with(token) == []


@needs_isolation
def test_cannot_write_or_delete_outside_working_dir():
    outside = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="ebft-sandbox-test-"))
    try:
        outside.chmod(0o777)  # only the sandbox, not permissions, stands in the way
        keep = outside / "keep.txt"
        keep.write_text("original")
        keep.chmod(0o666)
        escape = Path(tempfile.gettempdir()) / f"ebft-escape-{uuid.uuid4().hex}"
        program = (
            "import os\n"
            f"for action in (lambda: os.remove({str(keep)!r}), lambda: open({str(keep)!r}, 'w').write('x'),\n"
            f"               lambda: open({str(outside / 'new.txt')!r}, 'w').write('x'),\n"
            f"               lambda: open({str(escape)!r}, 'w').write('x')):\n"
            "    try:\n        action()\n    except OSError as err:\n        print(type(err).__name__)\n"
            "open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())\n")
        result = run_python(program)
        assert result.status == "passed" and result.stdout.endswith("fine\n")
        assert keep.read_text() == "original"
        assert not (outside / "new.txt").exists()
        assert not escape.exists()
    finally:
        for f in outside.iterdir():
            f.unlink()
        outside.rmdir()


def test_working_dir_is_fresh_and_removed(monkeypatch):
    made = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        made.append(real_mkdtemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", recording_mkdtemp)
    program = ("import os\nprint(sorted(os.listdir('.')))\nos.makedirs('d/e')\n"
               "open('d/e/f', 'w').write('x')\nos.chmod('d/e', 0)\nos.chmod('d', 0)\n")
    result = run_python(program)
    assert result.status == "passed" and result.stdout == "['program.py']\n"
    assert len(made) == 1 and not os.path.exists(made[0])


@needs_isolation
def test_killing_the_parent_does_not_reach_the_runner():
    program = (f"import os, signal\nfor pid in (os.getppid(), {os.getpid()}, {os.getppid()}):\n"
               "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n")
    result = run_python(program)
    assert result.status in ("passed", "failed", "error")
    assert os.getppid() > 1  # the runner and its parent are alive: we are still here


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("EBFT_TEST_SECRET", "hunter2")
    result = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('EBFT_TEST_SECRET'))\n")
    assert result.status == "passed"
    assert "hunter2" not in result.stdout
    names = eval(result.stdout.splitlines()[0])
    assert set(names) <= {"PATH", "LANG", "HOME", "PWD", sandbox.MARKER_VAR, "LC_CTYPE"}


@needs_isolation
def test_runner_environment_unreadable_through_proc(monkeypatch):
    monkeypatch.setenv("EBFT_TEST_SECRET", "hunter2")
    program = (f"for pid in ({os.getpid()}, 1):\n    try:\n        print(open(f'/proc/{{pid}}/environ').read())\n"
               "    except OSError as err:\n        print(type(err).__name__)\n")
    result = run_python(program)
    assert "hunter2" not in result.stdout


def test_huge_output_is_truncated_in_bounded_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_python("import sys\nsys.stdout.write('x' * 10**8)\nsys.stderr.write('e' * 10**7)\n", timeout=20.0)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert result.status == "passed"
    assert result.stdout.startswith("x" * OUTPUT_CAP) and len(result.stdout) < OUTPUT_CAP + 100
    assert result.stdout.endswith(f"[... {10**8 - OUTPUT_CAP} more bytes]")
    assert len(result.stderr) < OUTPUT_CAP + 100
    assert grown_mb < 50


def test_stdin_is_closed_unless_given():
    t0 = time.monotonic()
    hung = run_python("input()", timeout=5.0)
    assert hung.status == "failed" and "EOFError" in hung.stderr and time.monotonic() - t0 < 3
    fed = run_python("print(int(input()) * 2)", stdin="21\n")
    assert (fed.status, fed.stdout) == ("passed", "42\n")


def test_given_stdin_keeps_nothing_once_read():
    """Input larger than a pipe's buffer arrives whole; reopened afterwards (the program's and its
    launcher's fd 0) it is empty, or cannot be opened at all (bubblewrap's sandbox uid); input the
    program never reads leaves no thread behind."""
    threads = threading.active_count()
    program = ("import os, sys\nprint(len(sys.stdin.read()))\n"
               "def left(p):\n"
               "    try:\n        return len(open(f'/proc/{p}/fd/0', 'rb').read())\n"
               "    except PermissionError:\n        return 'denied'\n"
               "print([left(p) for p in ('self', os.getppid())])\n")
    result = run_python(program, stdin="x" * 300_000)
    assert result.status == "passed", result.stderr
    size, reopened = result.stdout.splitlines()
    assert size == "300000" and all(r in ("0", "'denied'") for r in reopened.strip("[]").split(", ")), reopened
    assert run_python("pass", stdin="x" * 300_000).status == "passed"
    until = time.monotonic() + 2.0
    while threading.active_count() > threads and time.monotonic() < until:
        time.sleep(0.01)
    assert threading.active_count() == threads


def test_missing_command_is_an_error_not_an_exception():
    result = run_command(["ebft-no-such-command-xyz"])
    assert result.status == "error" and "not found" in result.detail and result.returncode is None


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="timeout"):
        run_python("pass", timeout=0)
    with pytest.raises(ValueError, match="relative"):
        run_command([sys.executable, "x.py"], {"../x.py": "pass"})
    with pytest.raises(ValueError, match="isolation"):
        run_command([sys.executable, "-c", "pass"], isolation="docker")


def test_parallel_runs_keep_order_and_overlap():
    programs = [f"import time\ntime.sleep(0.5)\nprint({i})" for i in range(4)]
    t0 = time.monotonic()
    results = parallel_map(lambda p: run_python(p, timeout=5.0), programs, workers=4)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
    assert time.monotonic() - t0 < 4 * 0.5 + 0.5


def test_missing_bwrap_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_level", None)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="ebft.execution.sandbox"):
        assert isolation_level() == "process"
        assert isolation_level() == "process"
    warnings = [r for r in caplog.records if "bubblewrap" in r.getMessage()]
    assert len(warnings) == 1 and "apt-get install bubblewrap" in warnings[0].getMessage()


# --------------------------------------------------------------------------- wherever Python lives

ROOT = Path(__file__).resolve().parent.parent
EXPECT_BWRAP = "EBFT_TEST_EXPECT_BWRAP"


@pytest.mark.skipif(not os.environ.get(EXPECT_BWRAP), reason="only when run through another interpreter below")
def test_bubblewrap_works_with_this_interpreter():
    assert (LEVEL, sys.executable) == ("bwrap", os.environ[EXPECT_BWRAP])


def _venv(parent: Path) -> str:
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(parent / "venv")],
                   check=True)
    return str(parent / "venv" / "bin" / "python")


def _symlink(parent: Path) -> str:
    (parent / "bin").mkdir()
    (parent / "bin" / "python").symlink_to(os.path.realpath(sys.executable))
    return str(parent / "bin" / "python")


@needs_isolation
@pytest.mark.parametrize("where, make", [
    ("tmp", _venv),
    pytest.param("home", _venv, marks=pytest.mark.slow),
    pytest.param("tmp", _symlink, marks=pytest.mark.slow)])
def test_hostile_programs_contained_with_the_interpreter_elsewhere(where, make):
    """The tests above, run by an interpreter in a virtualenv under /tmp (which the sandbox replaces by a
    fresh tmpfs) or under the home directory (closed to the sandbox uid), or symlinked from /tmp."""
    parent = Path(tempfile.mkdtemp(prefix="ebft-python-", dir="/tmp" if where == "tmp" else Path.home()))
    try:
        python = make(parent)
        run = subprocess.run([python, "-B", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__,
                              "-k", "not interpreter_elsewhere and not fallback_as"],
                             cwd=ROOT, env={**os.environ, EXPECT_BWRAP: python}, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0 and " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], \
            run.stdout[-3000:] + run.stderr[-2000:]
    finally:
        shutil.rmtree(parent)


# --------------------------------------------------------------------------- the fallback cannot reach the runner

KILLER = ("import os, signal\n"
          "def attempt(pid):\n"
          "    try:\n        os.kill(pid, signal.SIGKILL)\n        return 'killed'\n"
          "    except Exception as err:\n        return type(err).__name__\n"
          "parent = os.getppid()\n"
          "runner = int(open(f'/proc/{parent}/stat').read().rsplit(')', 1)[1].split()[1])\n"
          "print(attempt(runner), attempt(-1), attempt(parent))\n")


def test_fallback_guards_keep_the_runner_alive():
    """Under process isolation ``run_python`` removes os.kill & co. before the program runs."""
    result = run_python(KILLER + "import subprocess\nsubprocess.run(['kill', '-9', str(runner)])\n",
                        isolation="process")
    assert result.stdout == "TypeError TypeError TypeError\n"
    assert result.status == "failed" and "TypeError" in result.stderr  # subprocess.Popen is gone too
    assert os.getppid() > 1


def test_fallback_guards_keep_ordinary_programs_working():
    program = ("import math, collections\nopen('f.txt', 'w').write('x')\n"
               "def f(n):\n    '''\n    >>> f(3)\n    6\n    '''\n    return math.factorial(n)\n"
               "import doctest\nassert doctest.testmod().attempted == 1\nprint(__name__, f(4), open('f.txt').read())\n")
    for mode in MODES:
        assert run_python(program, isolation=mode).stdout == "__main__ 24 x\n"
    failing = run_python("def g():\n    assert 1 == 2, 'nope'\ng()\n", isolation="process")
    assert failing.status == "failed" and 'File "program.py", line 2, in g' in failing.stderr


SYSTEM_PYTHON = "/usr/bin/python3"
as_root_with_system_python = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON) or sandbox._closed_to_others(str(ROOT)),
    reason="needs root, /usr/bin/python3 and a checkout other users can read")


@as_root_with_system_python
def test_fallback_as_root_runs_the_program_under_a_sandbox_uid():
    result = run_command([SYSTEM_PYTHON, "-c", KILLER + "print(os.getuid())\n"], isolation="process")
    attempts, uid = result.stdout.split("\n")[:2]
    assert attempts == "PermissionError killed PermissionError"  # kill(-1) reaches only the sandbox uid's own
    assert int(uid) in UID_POOL and os.getppid() > 1


@as_root_with_system_python
def test_fallback_as_a_user_killing_the_parent_ends_only_the_run():
    """A runner that is not root: the program (same uid) kills its parent, the disposable launcher; the
    runner reports the run as killed and goes on. Guards stop ``run_python`` programs from going further."""
    runner = ("import os, sys\nfrom ebft.execution.sandbox import run_command, run_python\n"
              "hit = run_command([sys.executable, '-c', 'import os, signal; os.kill(os.getppid(), signal.SIGKILL)'],"
              " isolation='process')\n"
              "print(hit.status, hit.detail)\n"
              "guarded = run_python(sys.argv[1], isolation='process')\n"
              "print(guarded.stdout.strip(), os.getuid())\n")
    run = subprocess.run([SYSTEM_PYTHON, "-B", "-c", runner, KILLER], cwd=ROOT, user=65534, group=65534,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["error killed by SIGKILL (memory, or killed from outside)",
                                       "TypeError TypeError TypeError 65534"]


def test_require_isolation_refuses_the_fallback(monkeypatch):
    monkeypatch.setattr(sandbox, "_required", False)
    monkeypatch.setattr(sandbox, "_level", "process")
    with pytest.raises(IsolationUnavailable, match="eval.require_isolation"):
        require_isolation()
    with pytest.raises(IsolationUnavailable, match="apt-get install bubblewrap"):
        run_python("print(1)")
    require_isolation(False)
    assert run_python("print(1)").stdout == "1\n"
