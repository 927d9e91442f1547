"""Verifiable rewards for RLVR: unit tests (code) and sentence BLEU (translation).

Row schema of a code row:

- ``tests`` (required): ``test_type="asserts"``: a list of assert statements
  (MBPP ``test_list``, OpenCodeInstruct ``unit_tests``) or one string of test
  code that exits non-zero on failure (e.g. HumanEval's ``check`` plus its call);
  ``test_type="doctest"``: a string holding doctest examples (``>>>`` lines),
  usually the function's docstring text (its ``__doc__``, without the quotes).
- ``test_type``: ``"asserts"`` (default) or ``"doctest"``.
- ``test_setup``: code run after the solution and before the tests (fixtures,
  imports the doctests need).
- ``code_prefix``: code placed before the completion when the completion is
  only a function body (HumanEval: the prompt). In doctest mode the prefix is
  ``question`` (a top-level ``def`` with its docstring; the ``answer`` is the body).

The program is ``prefix + completion``, then ``test_setup + tests``, run in one
namespace; in doctest mode the examples run with ``doctest.DocTestRunner``
(default flags, as ``testmod``) in the program's globals. A body completion is cut
at HumanEval's stop sequences; a whole solution is taken as it is (or its first
fenced code block) up to a top-level ``if __name__`` block, so other test code the
model appends runs too. Reward 1.0 when the program passes
``ebft.execution.programs.run_to_the_end``: it exits 0 and the sandboxed runner
printed the run's random marker, which it does only after the tests returned and
which the program cannot read; else 0.0 (wrong answer, crash, timeout, an exit
before the tests finished, e.g. ``exit()`` or ``os._exit(0)`` in the completion,
or a forged marker; that module's docstring lists what is and is not defended).
``entry_point`` and other fields are ignored.

A translation row has ``answer`` (the reference) and ``target_lang``; the reward
is sentence BLEU (effective order; zh tokenizer for Chinese) divided by 100.
"""

from __future__ import annotations

import doctest
from typing import Callable, Mapping, Sequence

from ebft.execution.bleu import sentence_bleu
from ebft.execution.programs import HUMANEVAL_STOPS, CodeProblem, score_problems

RewardFn = Callable[[Sequence[str], Sequence[Mapping]], list[float]]
"""A batch reward: (completions, their rows) -> one float per completion."""

TEST_TYPES = ("asserts", "doctest")


def code_problem(row: Mapping) -> CodeProblem:
    """The executable problem a code row describes (see the module docstring)."""
    test_type = row.get("test_type", "asserts")
    if test_type not in TEST_TYPES:
        raise ValueError(f"row test_type={test_type!r} is not one of {', '.join(TEST_TYPES)}")
    tests = row.get("tests")
    if not tests:
        raise ValueError("code row has no 'tests'; a verifiable reward needs unit tests or doctests")
    setup = row.get("test_setup") or ""
    if test_type == "doctest":
        if not isinstance(tests, str) or not doctest.DocTestParser().get_examples(tests):
            raise ValueError("doctest row: 'tests' must be a string holding doctest examples (>>> lines)")
        if not row.get("question"):
            raise ValueError("doctest row needs 'question': the function's def line and docstring")
        prefix, test_code = row["question"], _doctest_runner(tests)
    else:
        prefix = row.get("code_prefix") or ""
        test_code = tests if isinstance(tests, str) else "\n".join(tests)
    return CodeProblem(task_id=str(row.get("task_id", "")), prompt=row.get("question", ""),
                       tests=f"{setup}\n{test_code}", entry_point=str(row.get("entry_point", "")),
                       stop_sequences=HUMANEVAL_STOPS if prefix else (), program_prefix=prefix)


def _doctest_runner(examples: str) -> str:
    return (
        "import doctest as _doctest, sys as _sys\n"
        f"_test = _doctest.DocTestParser().get_doctest({examples!r}, dict(globals()), 'row', None, 0)\n"
        "_runner = _doctest.DocTestRunner()\n"
        "_runner.run(_test)\n"
        "if _runner.failures:\n"
        "    _sys.exit(1)\n")


def code_rewards(completions: Sequence[str], rows: Sequence[Mapping], timeout: float = 3.0,
                 workers: int | None = None) -> list[float]:
    """1.0 per completion that passes all of its row's tests, else 0.0; runs in parallel."""
    _check_pairs(completions, rows)
    problems = [code_problem(row) for row in rows]
    passed = score_problems(problems, [[c] for c in completions], timeout=timeout, workers=workers)
    return [1.0 if ok else 0.0 for [ok] in passed]


def bleu_rewards(completions: Sequence[str], rows: Sequence[Mapping]) -> list[float]:
    """Sentence BLEU / 100 of each (stripped) completion against its row's ``answer``."""
    _check_pairs(completions, rows)
    for row in rows:
        if "answer" not in row or "target_lang" not in row:
            raise ValueError("translation row needs 'answer' (the reference) and 'target_lang' (e.g. 'de', 'zh')")
    return [sentence_bleu(c.strip(), row["answer"], row["target_lang"]) / 100.0 for c, row in zip(completions, rows)]


REWARDS: dict[str, RewardFn] = {"qa_code": code_rewards, "translation": bleu_rewards}


def reward_fn_for(task: str) -> RewardFn:
    """The batch reward of a task name (``qa_code``, ``translation``)."""
    if task not in REWARDS:
        raise ValueError(f"task {task!r} has no verifiable reward (RLVR needs one of {', '.join(REWARDS)}); "
                         "use method=ebft or method=sft for it")
    return REWARDS[task]


def _check_pairs(completions: Sequence[str], rows: Sequence[Mapping]) -> None:
    if len(completions) != len(rows):
        raise ValueError(f"need one row per completion, got {len(completions)} completions and {len(rows)} rows")
