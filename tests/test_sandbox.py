"""The code sandbox survives hostile programs and leaves the machine as it was."""

import logging
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from ebft.eval import sandbox
from ebft.eval.sandbox import OUTPUT_CAP, Limits, isolation_level, run_command, run_many, run_python

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
    assert result.wall_s < 5


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


def test_run_many_keeps_order_and_runs_in_parallel():
    programs = [f"import time\ntime.sleep(0.5)\nprint({i})" for i in range(4)]
    t0 = time.monotonic()
    results = run_many(programs, timeout=5.0, workers=4)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
    assert time.monotonic() - t0 < 4 * 0.5 + 0.5


def test_missing_bwrap_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_level", None)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="ebft.eval.sandbox"):
        assert isolation_level() == "process"
        assert isolation_level() == "process"
    warnings = [r for r in caplog.records if "bubblewrap" in r.getMessage()]
    assert len(warnings) == 1 and "apt-get install bubblewrap" in warnings[0].getMessage()
