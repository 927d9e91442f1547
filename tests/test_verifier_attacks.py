"""Wrong completions that try to forge the code verifier's verdict score 0, on HumanEval, on MBPP
and as the RLVR reward; correct ones still pass.

Each attack is a function body. The leaks look for the run's completion marker where a program
could read it (its own source, ``inspect``, ``/proc``, the environment, the working directory),
print whatever looks like one (32 or more hex digits, bare and after ``COMPLETED``) to stdout and
stderr, and exit 0. The others fail the tests and then try to pass anyway.
"""

import textwrap
from pathlib import Path

import pytest

from ebft.eval.code import load_humaneval, load_mbpp
from ebft.execution.programs import COMPLETED, run_problems, score_completions
from ebft.objectives.verifiable import code_rewards

MBPP_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"

LEAK = f"""\
    import inspect, os, re, sys
    def grab(path):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return b""
        try:
            return os.read(fd, 1 << 20)
        except OSError:
            return b""
        finally:
            os.close(fd)
    def fds(pid):
        try:
            return b"".join(grab(f"/proc/{{pid}}/fd/{{n}}") for n in os.listdir(f"/proc/{{pid}}/fd"))
        except OSError:
            return b""
    texts = []
    for read in SOURCES:
        try:
            text = read()
        except Exception:
            continue
        texts.append(text.decode("latin-1") if isinstance(text, bytes) else str(text))
    for token in set(re.findall(r"[0-9a-f]{{32,}}", "\\n".join(texts))):
        for line in (token, {COMPLETED!r} + " " + token):
            os.write(1, (line + "\\n").encode())
            os.write(2, (line + "\\n").encode())
    os._exit(0)
"""

SOURCES = {
    "own source via sys.argv[0]": "lambda: grab(sys.argv[0])",
    "inspect.getsource of __main__": "lambda: inspect.getsource(sys.modules['__main__'])",
    "/proc/self/cmdline": "lambda: grab('/proc/self/cmdline')",
    "/proc/self/environ": "lambda: grab('/proc/self/environ')",
    "/proc/self/fd/*": "lambda: fds('self')",
    "the parent's cmdline, environ and fds": "lambda: grab(f'/proc/{os.getppid()}/cmdline') + "
                                              "grab(f'/proc/{os.getppid()}/environ') + fds(os.getppid())",
    "the environment": "lambda: repr(dict(os.environ))",
    "every file in the working directory": "lambda: b''.join(grab(os.path.join(d, f)) for d, _, fs in "
                                           "os.walk('.') for f in fs)",
}


def _leak(sources: str) -> str:
    return LEAK.replace("SOURCES", f"({sources},)")


ATEXIT = (  # fail the asserts quietly, then print what the program's own file holds and exit 0
    "    import atexit, sys\n"
    "    sys.excepthook = lambda *args: None\n"
    f"    atexit.register(exec, {textwrap.dedent(_leak(SOURCES['own source via sys.argv[0]']))!r}, {{}})\n"
    "    return None\n")
PATCHED_RUNTIME = (  # a runner that looked these up after the program ran would skip the tests and pass
    "    return None\n"
    "import builtins, os, sys\n"
    "builtins.exec = lambda *args, **kwargs: None\n"
    "builtins.BaseException = type('Never', (Exception,), {})\n"
    "os._exit = lambda status, exit_=os._exit: exit_(0)\n"
    "os.getpid = lambda: 1\n")
FORK_SEARCH = (  # every answer tried in a forked copy: a copy that passed the tests would vouch for all
    "    import os, posix\n"
    "    child = posix.fork()\n"
    "    if child == 0:\n"
    "        return True\n"
    "    if os.waitpid(child, 0)[1] == 0:\n"
    "        os._exit(0)\n"
    "    return False\n")
FAKE_MARKERS = (
    "    import os\n"
    f"    print({COMPLETED!r}, flush=True)\n"
    f"    print({COMPLETED + ' ' + '0' * 32!r}, flush=True)\n"
    "    os._exit(0)\n")

ATTACKS = {name: _leak(source) for name, source in SOURCES.items()} | {
    "every source at once": _leak(", ".join(SOURCES.values())),
    "atexit hook with a silenced sys.excepthook": ATEXIT,
    "patched builtins and os": PATCHED_RUNTIME,
    "fork and search for a passing copy": FORK_SEARCH,
    "fake marker literals": FAKE_MARKERS,
}
"""Bodies of a boolean function of any signature (HumanEval/0, MBPP/19)."""

TRACED_CHECK = (  # from its top level, turns the tests' check() into a no-op when it is called
    "    return None\n"
    "import sys\n"
    "hook = lambda frame, event, arg: (frame.f_globals.__setitem__('check', lambda candidate: None)\n"
    "    if frame.f_code.co_name == '<module>' and 'check' in frame.f_globals else None, hook)[1]\n"
    "sys.settrace(hook)\n"
    "sys._getframe().f_trace = hook\n")
HUMANEVAL_ATTACKS = ATTACKS | {"trace hook that replaces check": TRACED_CHECK}

QUIET_CORRECT = (  # correct, but it closes and replaces the standard streams and leaves a thread running
    "\nimport os, sys, threading, time\n"
    "threading.Thread(target=time.sleep, args=(60,)).start()\n"
    "sys.stdout = sys.stderr = open(os.devnull, 'w')\n"
    "os.close(1)\n"
    "os.close(2)\n")


@pytest.fixture(scope="module")
def humaneval_0():
    return load_humaneval()[0]


@pytest.fixture(scope="module")
def mbpp_19():
    if not MBPP_FILE.is_file():
        pytest.skip(f"MBPP data file {MBPP_FILE} not present")
    return {p.task_id: p for p in load_mbpp("test", MBPP_FILE)}["MBPP/19"]


def _mbpp(body: str) -> str:
    return "def test_duplicate(arraynums):\n" + body


def test_attacks_fail_on_humaneval(humaneval_0):
    p = humaneval_0
    passed = score_completions(p, list(HUMANEVAL_ATTACKS.values()), timeout=10.0)
    assert dict(zip(HUMANEVAL_ATTACKS, passed)) == dict.fromkeys(HUMANEVAL_ATTACKS, False)
    assert score_completions(p, [p.reference, p.reference + QUIET_CORRECT], timeout=10.0) == [True, True]


def test_attacks_fail_on_mbpp(mbpp_19):
    p = mbpp_19
    passed = score_completions(p, [_mbpp(body) for body in ATTACKS.values()], timeout=10.0)
    assert dict(zip(ATTACKS, passed)) == dict.fromkeys(ATTACKS, False)
    assert score_completions(p, [p.reference, p.reference + QUIET_CORRECT], timeout=10.0) == [True, True]


def _assert_no_reward(attacks: dict[str, str], row: dict, reference: str) -> None:
    rewards = code_rewards(list(attacks.values()), [row] * len(attacks), timeout=10.0)
    assert dict(zip(attacks, rewards)) == dict.fromkeys(attacks, 0.0)
    assert code_rewards([reference], [row]) == [1.0]


def test_attacks_earn_no_rlvr_reward_on_a_humaneval_row(humaneval_0):
    row = {"question": humaneval_0.prompt, "code_prefix": humaneval_0.program_prefix, "tests": humaneval_0.tests}
    _assert_no_reward(HUMANEVAL_ATTACKS, row, humaneval_0.reference)


def test_attacks_earn_no_rlvr_reward_on_an_mbpp_row(mbpp_19):
    attacks = {name: _mbpp(body) for name, body in ATTACKS.items()}
    _assert_no_reward(attacks, {"tests": mbpp_19.tests.strip().splitlines()}, mbpp_19.reference)


def test_a_failure_shows_the_failing_test_and_an_exit_is_a_failure(humaneval_0):
    p = humaneval_0
    wrong, exiting = run_problems([p], [["    return None\n", "    raise SystemExit(0)\n"]])[0]
    assert (wrong.status, exiting.status) == ("failed", "failed")
    assert 'File "tests.py"' in wrong.stderr and "assert candidate(" in wrong.stderr
    assert "AssertionError" in wrong.stderr and COMPLETED not in wrong.stdout + wrong.stderr
    assert "SystemExit: 0" in exiting.stderr
