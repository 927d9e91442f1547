"""Verifiable rewards: unit tests and doctests in the sandbox, sentence BLEU."""

import ast
import json
from pathlib import Path

import pytest
import sacrebleu

from ebft.eval.code import load_humaneval
from ebft.objectives.verifiable import bleu_rewards, code_problem, code_rewards, reward_fn_for

MBPP_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"

# A standard-library style row: signature + docstring as the question, the body as the answer.
SPLITEXT_QUESTION = '''def splitext(path):
    """Split the extension from a path; leading dots of the base name are not an extension.

    >>> splitext('archive.tar.gz')
    ('archive.tar', '.gz')
    >>> splitext('/home/user/.bashrc')
    ('/home/user/.bashrc', '')
    >>> splitext('notes')
    ('notes', '')
    """
'''
SPLITEXT_BODY = '''    sep = path.rfind(os.sep)
    dot = path.rfind('.')
    if dot > sep and path[sep + 1:dot].strip('.'):
        return path[:dot], path[dot:]
    return path, ''
'''
DOCTEST_ROW = {"question": SPLITEXT_QUESTION, "answer": SPLITEXT_BODY,
               "tests": ast.get_docstring(ast.parse(SPLITEXT_QUESTION + "    pass\n").body[0], clean=False),
               "test_type": "doctest", "test_setup": "import os"}


def _mbpp_rows(ids):
    if not MBPP_FILE.is_file():
        pytest.skip(f"MBPP data file {MBPP_FILE} not present")
    rows = {r["task_id"]: r for r in map(json.loads, MBPP_FILE.read_text().splitlines())}
    return [rows[i] for i in ids]


def test_mbpp_reference_solutions_earn_one():
    raw = _mbpp_rows([11, 19, 367, 601, 700])  # 367 needs its test_setup_code
    rows = [{"tests": r["test_list"], "test_setup": r["test_setup_code"], "entry_point": "ignored"} for r in raw]
    assert code_rewards([r["code"] for r in raw], rows) == [1.0] * 5


def test_humaneval_canonical_solutions_earn_one():
    problems = load_humaneval()[:5]
    rows = [{"question": p.prompt, "code_prefix": p.program_prefix, "tests": p.tests} for p in problems]
    assert code_rewards([p.reference for p in problems], rows) == [1.0] * 5


def test_wrong_crashing_and_hanging_completions_earn_zero():
    [raw] = _mbpp_rows([11])
    row = {"tests": raw["test_list"]}
    completions = [raw["code"], "def remove_Occ(s, ch):\n    return s\n", "def remove_Occ(s, ch):\n    return 1 / 0\n",
                   "def remove_Occ(s, ch):\n    while True:\n        pass\n", "def remove_Occ(s, ch) return s"]
    assert code_rewards(completions, [row] * 5, timeout=1.0) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_full_solution_is_taken_whole_or_from_its_fence():
    [raw] = _mbpp_rows([11])
    row = {"tests": raw["test_list"]}
    fenced = f"Sure!\n```python\n{raw['code']}\n```\nIt removes both occurrences."
    self_tested = raw["code"] + "\nassert remove_Occ('aa', 'a') == 'wrong'\n"
    assert code_rewards([fenced, self_tested], [row, row]) == [1.0, 0.0]


def test_doctest_reward_on_a_stdlib_like_function():
    assert code_rewards([SPLITEXT_BODY], [DOCTEST_ROW])[0] == 1.0
    assert code_rewards(["    return path, ''\n"], [DOCTEST_ROW])[0] == 0.0  # wrong on the first example
    assert code_rewards(["    raise NotImplementedError\n"], [DOCTEST_ROW])[0] == 0.0
    assert code_rewards([""], [DOCTEST_ROW])[0] == 0.0  # docstring only: returns None
    rambling = SPLITEXT_BODY + "\n\ndef unrelated(:\n"
    assert code_rewards([rambling], [DOCTEST_ROW])[0] == 1.0  # the body is cut at the next top-level def


def test_code_rewards_cannot_be_gamed_by_leaving_before_the_tests():
    """The exploits of an MBPP-style row (whole solution) and a doctest row (function body): a wrong
    answer followed by code that exits with status 0 before any test ran earns 0."""
    [raw] = _mbpp_rows([11])
    row = {"tests": raw["test_list"]}
    wrong = "def remove_Occ(s, ch):\n    return s\n"
    exploits = ["\nif __name__ == '__main__':\n    import unittest\n    unittest.main()\n", "\nexit()\n",
                "\nimport os\nos._exit(0)\n", "\nimport sys\nsys.exit(0)\n"]
    assert code_rewards([wrong + e for e in exploits], [row] * 4) == [0.0] * 4
    # a correct solution with a main block: the block is cut, the tests run
    assert code_rewards([raw["code"] + exploits[0]], [row])[0] == 1.0
    wrong_body = "    return path, ''\n"
    for exit_ in ("import os\nos._exit(0)\n", "exit()\n", "raise SystemExit(0)\n"):
        assert code_rewards([wrong_body + exit_], [DOCTEST_ROW])[0] == 0.0
    assert code_rewards([SPLITEXT_BODY + "```\n\nThis skips leading dots."], [DOCTEST_ROW])[0] == 1.0
    assert code_rewards([wrong_body + "```\n"], [DOCTEST_ROW])[0] == 0.0


def test_doctest_program_runs_the_examples_against_the_body():
    problem = code_problem(DOCTEST_ROW)
    program = problem.program(problem.extract(SPLITEXT_BODY))
    assert program.startswith(SPLITEXT_QUESTION + SPLITEXT_BODY)
    assert "DocTestRunner" in program and "import os" in program


def test_row_schema_errors_name_the_field():
    with pytest.raises(ValueError, match="'tests'"):
        code_rewards(["pass"], [{"question": "x"}])
    with pytest.raises(ValueError, match="test_type"):
        code_rewards(["pass"], [{"tests": ["assert True"], "test_type": "pytest"}])
    with pytest.raises(ValueError, match="doctest examples"):
        code_rewards(["pass"], [{**DOCTEST_ROW, "tests": "no examples here"}])
    with pytest.raises(ValueError, match="one row per completion"):
        code_rewards(["a", "b"], [{"tests": ["assert True"]}])
    with pytest.raises(ValueError, match="target_lang"):
        bleu_rewards(["Hallo"], [{"answer": "Hallo"}])


def test_bleu_reward_is_sentence_bleu_over_100():
    row = {"answer": "Yesterday evening he read a book.", "target_lang": "en"}
    hyp = "He read the book yesterday evening."
    assert bleu_rewards([hyp], [row])[0] == pytest.approx(sacrebleu.sentence_bleu(hyp, [row["answer"]]).score / 100)
    assert bleu_rewards(["  " + row["answer"] + "\n"], [row])[0] == pytest.approx(1.0)
    zh = {"answer": "今天我们去公园散步。", "target_lang": "zh"}
    assert bleu_rewards(["我们今天去公园散步。"], [zh])[0] == pytest.approx(
        sacrebleu.sentence_bleu("我们今天去公园散步。", [zh["answer"]], tokenize="zh").score / 100)
    assert bleu_rewards(["a b c", row["answer"]], [row, row])[1] == pytest.approx(1.0)


def test_reward_dispatch_by_task():
    assert reward_fn_for("qa_code") is code_rewards
    assert reward_fn_for("translation") is bleu_rewards
    with pytest.raises(ValueError, match="unstructured_code"):
        reward_fn_for("unstructured_code")
