"""Offline corpora built from files that ship inside installed packages.

Every builder is deterministic (sorted file order, file order within a file)
and deduplicated, and returns rows ``{question, answer, ...}``:

- ``stdlib_qa_rows``: Q&A code. Functions and methods of the Python standard
  library with a docstring; question = the ``def`` header and the docstring as
  written in the source, answer = the rest of the body. Methods are dedented
  to top level. Top-level functions whose docstring holds ``>>>`` examples are
  verifiable: ``tests`` = the docstring, ``test_type`` = ``"doctest"``,
  ``entry_point`` = the function name and ``module`` = its dotted module (a
  verifier runs the examples in a copy of that module's namespace after
  executing ``question + answer``). Parsing takes tens of seconds, so the rows
  are cached as jsonl under ``$EBFT_CACHE`` (default ``~/.cache/ebft``).
- ``mbpp_train_rows``: MBPP's train split (task_id 601-974) with its asserts.
- ``stdlib_source_rows``: unstructured code, raw standard-library files.
- ``django_translation_rows``: human translations from Django's gettext
  catalogues, both directions, in the ALMA prompt format.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
from pathlib import Path

from ebft.config import DataConfigError
from ebft.models.loading import cache_dir
from ebft.files import atomic_path

EMBEDDED_TASKS = ("qa_code", "unstructured_code", "translation")
MAX_BODY_CHARS = 4000
MBPP_TRAIN_IDS = range(601, 975)
LANGUAGE_NAMES = {"en": "English", "cs": "Czech", "de": "German", "is": "Icelandic",
                  "ru": "Russian", "zh": "Chinese"}
_DJANGO_LOCALE = {"zh": "zh_Hans"}
_EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib-dynload"}
_QA_CACHE_FORMAT = 1


# ---------------------------------------------------------------- standard library files

def stdlib_root() -> Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, without tests, idlelib,
    site-packages, build configuration and byte-code caches."""
    root = root or stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(p in _EXCLUDED_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        if parts[-1].startswith("_sysconfigdata"):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def stdlib_source_rows(root: Path | None = None) -> list[dict]:
    """Raw standard-library files for pretraining-style training: question
    ``""``, answer = the file text; empty files and exact duplicates dropped."""
    root = root or stdlib_root()
    rows, seen = [], set()
    for path in stdlib_files(root):
        text = _read_source(path)
        if not text or not text.strip():
            continue
        digest = hashlib.sha1(text.encode()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        rows.append({"question": "", "answer": text, "source": f"stdlib:{path.relative_to(root).as_posix()}"})
    return rows


# ---------------------------------------------------------------- stdlib Q&A pairs

def _functions(tree: ast.Module):
    """Yield ``(node, top_level)`` for module functions and methods (also of
    nested classes); functions nested inside functions are closures and skipped."""
    stack = [(node, True) for node in reversed(tree.body)]
    while stack:
        node, top = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, top
        elif isinstance(node, ast.ClassDef):
            stack.extend((child, False) for child in reversed(node.body))


def _dedent(lines: list[str], indent: str) -> str:
    """Remove the def line's indentation from every line (less where a line,
    inside a string literal, is indented less)."""
    return "".join(line[len(indent):] if line.startswith(indent) else line.lstrip(" \t") for line in lines)


def _is_trivial(body: list[ast.stmt]) -> bool:
    if len(body) != 1:
        return False
    stmt = body[0]
    return isinstance(stmt, ast.Pass) or (
        isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis)


def _qa_from_function(node, top: bool, lines: list[str], module: str, rel: str) -> dict | None:
    docstring = ast.get_docstring(node)
    if not docstring or len(node.body) < 2:
        return None
    doc_node, rest = node.body[0], node.body[1:]
    if rest[0].lineno <= doc_node.end_lineno or _is_trivial(rest):
        return None
    def_line = lines[node.lineno - 1]
    indent = def_line[: len(def_line) - len(def_line.lstrip())]
    question = _dedent(lines[node.lineno - 1: doc_node.end_lineno], indent)
    answer = _dedent(lines[doc_node.end_lineno: node.end_lineno], indent)
    if not answer.strip() or len(answer) > MAX_BODY_CHARS:
        return None
    if not answer.endswith("\n"):
        answer += "\n"
    row = {"question": question, "answer": answer, "source": f"stdlib:{rel}:{node.lineno}", "module": module}
    if top and ">>>" in docstring:
        row.update(tests=docstring, test_type="doctest", entry_point=node.name)
    return row


def _parse_stdlib_qa(root: Path) -> list[dict]:
    rows, seen = [], set()
    for path in stdlib_files(root):
        text = _read_source(path)
        if text is None:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        module, rel = _module_name(path, root), path.relative_to(root).as_posix()
        for node, top in _functions(tree):
            row = _qa_from_function(node, top, lines, module, rel)
            if row is None or (row["question"], row["answer"]) in seen:
                continue
            seen.add((row["question"], row["answer"]))
            rows.append(row)
    return rows


def _qa_cache_path(root: Path) -> Path:
    key = hashlib.sha1(f"{_QA_CACHE_FORMAT}:{sys.version}:{root.resolve()}".encode()).hexdigest()[:12]
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir() / "embedded" / f"stdlib_qa-{version}-{key}.jsonl"


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def stdlib_qa_rows(root: Path | None = None) -> list[dict]:
    """(signature + docstring -> body) rows from the standard library, cached
    on disk per Python version and library path (see the module docstring)."""
    root = root or stdlib_root()
    path = _qa_cache_path(root)
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    rows = _parse_stdlib_qa(root)
    _write_jsonl_atomic(path, rows)
    return rows


# ---------------------------------------------------------------- MBPP

def mbpp_question(text: str, tests: list[str]) -> str:
    """MBPP prompt: the task text, then its asserts as examples, one per line::

        Write a function to ...
        Your code should pass these tests:
        assert f(1) == 2
        ...
    """
    return f"{text.strip()}\nYour code should pass these tests:\n" + "".join(t.strip() + "\n" for t in tests)


def mbpp_train_rows(path: str | os.PathLike | None = None) -> list[dict]:
    """MBPP train split (task_id 601-974) as rows with ``tests`` = its asserts.

    ``path`` defaults to ``$EBFT_MBPP``; with neither, there are no rows. A path
    that is given but missing is an error.
    """
    path = path or os.environ.get("EBFT_MBPP")
    if not path:
        return []
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataConfigError(
            f"MBPP file '{path}' does not exist: set data.mbpp_path (or $EBFT_MBPP) to mbpp.jsonl, or leave it unset")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            task = json.loads(line)
            if task["task_id"] not in MBPP_TRAIN_IDS:
                continue
            code = task["code"].replace("\r\n", "\n").rstrip() + "\n"
            rows.append({"question": mbpp_question(task["text"], task["test_list"]), "answer": code,
                         "tests": list(task["test_list"]), "test_type": "asserts",
                         "test_setup": task.get("test_setup_code", "").replace("\r\n", "\n"),
                         "source": f"mbpp:{task['task_id']}"})
    return rows


# ---------------------------------------------------------------- Django translations

_PO_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}
_PLACEHOLDER = re.compile(r"%(\([^)]*\))?[-#0 +]*\d*(\.\d+)?[sdifrxXeEgGc%]|\{[^{}]*\}")


def _po_string(token: str) -> str:
    return re.sub(r"\\(.)", lambda m: _PO_ESCAPES.get(m.group(1), "\\" + m.group(1)), token[1:-1])


def parse_po(text: str) -> list[tuple[str, str]]:
    """``(msgid, msgstr)`` pairs of a gettext catalogue, skipping the header,
    fuzzy, obsolete and untranslated entries; plural entries give their
    singular (``msgid`` -> ``msgstr[0]``)."""
    pairs = []
    for block in re.split(r"\n\s*\n", text):
        fields, key, fuzzy = {}, None, False
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("#,") and "fuzzy" in line:
                fuzzy = True
            elif line.startswith('"') and key is not None:
                fields[key] += _po_string(line)
            elif line and not line.startswith("#"):
                key, _, value = line.partition(" ")
                fields[key] = _po_string(value.strip())
        source, target = fields.get("msgid", ""), fields.get("msgstr", fields.get("msgstr[0]", ""))
        if not fuzzy and source and target:
            pairs.append((source, target))
    return pairs


def _has_words(text: str) -> bool:
    return any(ch.isalpha() for ch in _PLACEHOLDER.sub("", text))


def translation_prompt(source_lang: str, target_lang: str, text: str) -> str:
    """The ALMA prompt: ``Translate this from German to English:\\nGerman: {text}\\nEnglish:``."""
    src, tgt = LANGUAGE_NAMES[source_lang], LANGUAGE_NAMES[target_lang]
    return f"Translate this from {src} to {tgt}:\n{src}: {text}\n{tgt}:"


_ALMA_PROMPT = re.compile(r"^Translate this from (.+?) to (.+?):\n\1: (.*)\n\2:$", re.DOTALL)


def translation_source(prompt: str) -> str | None:
    """The source text inside an ALMA prompt (the inverse of ``translation_prompt``); None for another format."""
    match = _ALMA_PROMPT.match(prompt)
    return None if match is None else match.group(3)


def _django_root() -> Path:
    try:
        import django
    except ImportError as err:
        raise DataConfigError("embedded translation data needs Django's catalogues: pip install django") from err
    return Path(django.__file__).parent


def _django_catalogues(root: Path, lang: str) -> list[Path]:
    locale = _DJANGO_LOCALE.get(lang, lang)
    files = [*root.glob(f"conf/locale/{locale}/LC_MESSAGES/*.po"),
             *root.glob(f"contrib/*/locale/{locale}/LC_MESSAGES/*.po")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def django_translation_rows(langs: tuple[str, ...] = ("cs", "de", "is", "ru", "zh")) -> list[dict]:
    """Human translations from Django's catalogues (all apps), en->xx and
    xx->en for each language; answer = ``" " + target``. Entries without words
    (only placeholders or punctuation) are skipped; rows are unique per
    (direction, source text)."""
    root = _django_root()
    unknown = [lang for lang in langs if lang not in LANGUAGE_NAMES or lang == "en"]
    if unknown:
        raise DataConfigError(
            f"data.langs has unknown language(s) {unknown}; choose from {sorted(set(LANGUAGE_NAMES) - {'en'})}")
    rows, seen = [], set()
    for lang in langs:
        files = _django_catalogues(root, lang)
        if not files:
            raise DataConfigError(f"Django ships no catalogue for '{lang}'; remove it from data.langs")
        pairs = [(en, xx) for f in files for en, xx in parse_po(f.read_text(encoding="utf-8"))
                 if _has_words(en) and _has_words(xx)]
        for src_lang, tgt_lang in (("en", lang), (lang, "en")):
            for en, xx in pairs:
                src, tgt = (en, xx) if src_lang == "en" else (xx, en)
                if (src_lang, tgt_lang, src) in seen:
                    continue
                seen.add((src_lang, tgt_lang, src))
                rows.append({"question": translation_prompt(src_lang, tgt_lang, src), "answer": " " + tgt,
                             "source_lang": src_lang, "target_lang": tgt_lang, "source": "django"})
    return rows


# ---------------------------------------------------------------- dispatch

def embedded_rows(task: str, mbpp_path: str | os.PathLike | None = None,
                  langs: tuple[str, ...] = ("cs", "de", "is", "ru", "zh")) -> list[dict]:
    """The offline corpus of a task: ``qa_code`` = stdlib Q&A (+ MBPP train when
    a file is given or ``$EBFT_MBPP`` is set), ``unstructured_code`` = stdlib
    sources, ``translation`` = Django catalogues in ``langs``."""
    if task == "qa_code":
        return stdlib_qa_rows() + mbpp_train_rows(mbpp_path)
    if task == "unstructured_code":
        return stdlib_source_rows()
    if task == "translation":
        return django_translation_rows(tuple(langs))
    raise DataConfigError(f"no embedded data for task '{task}'; embedded tasks are {list(EMBEDDED_TASKS)}")
