"""Offline corpora: standard-library Q&A and sources, MBPP train, Django translations."""

import ast
import doctest
import importlib
import shutil
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from ebft.config import DataConfigError
from ebft.data import embedded
from ebft.data.embedded import (MAX_BODY_CHARS, django_translation_rows, embedded_rows, mbpp_train_rows,
                                parse_po, stdlib_qa_rows, stdlib_root, stdlib_source_rows)

MBPP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"
needs_mbpp = pytest.mark.skipif(not MBPP.is_file(), reason="MBPP data file not present")


@pytest.fixture(scope="module")
def qa_rows():
    return stdlib_qa_rows()


@pytest.fixture(scope="module")
def translation_rows():
    return django_translation_rows()


def _run_doctest(row, namespace):
    exec(compile(row["question"] + row["answer"], "<row>", "exec"), namespace)
    test = doctest.DocTestParser().get_doctest(row["tests"], namespace, row["entry_point"], None, 0)
    return doctest.DocTestRunner(verbose=False).run(test, out=lambda _: None)


def test_stdlib_qa_rows_are_valid_unique_functions(qa_rows):
    assert len(qa_rows) > 3000
    assert len({(r["question"], r["answer"]) for r in qa_rows}) == len(qa_rows)
    for row in qa_rows[::7]:
        assert row["question"].startswith(("def ", "async def ")), row["source"]
        assert row["answer"].endswith("\n") and len(row["answer"]) <= MAX_BODY_CHARS
        ast.parse(row["question"] + row["answer"])
        path = row["source"].split(":")[1]
        assert not set(path.split("/")[:-1]) & {"test", "tests", "idlelib", "site-packages"}, path


def test_stdlib_question_is_header_and_docstring(qa_rows):
    row = next(r for r in qa_rows if r["module"] == "textwrap" and r["question"].startswith("def dedent("))
    tree = ast.parse(row["question"] + "    pass\n")
    func = tree.body[0]
    assert func.name == "dedent" and ast.get_docstring(func).startswith("Remove any common leading whitespace")
    assert '"""' not in row["answer"]


def test_methods_are_dedented_and_not_doctest_rows(qa_rows):
    methods = [r for r in qa_rows if r["question"].startswith("def __init__(self")]
    assert methods and all(r.get("test_type") != "doctest" for r in methods)
    doctest_rows = [r for r in qa_rows if r.get("test_type") == "doctest"]
    assert len(doctest_rows) > 50
    assert all(">>>" in r["tests"] and r["entry_point"] in r["question"] for r in doctest_rows)


def test_doctest_row_of_stdlib_function_passes_and_detects_wrong_body(qa_rows):
    row = next(r for r in qa_rows if r["module"] == "statistics" and r.get("entry_point") == "median")
    module = importlib.import_module(row["module"])
    result = _run_doctest(row, dict(vars(module)))
    assert result.attempted >= 2 and result.failed == 0
    wrong = {**row, "answer": "    return 0\n"}
    assert _run_doctest(wrong, dict(vars(module))).failed > 0


def _fake_stdlib(root: Path) -> Path:
    root.mkdir()
    shutil.copy(stdlib_root() / "textwrap.py", root / "textwrap.py")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text('def f():\n    """Doc."""\n    return 1\n')
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text(textwrap.dedent('''\
        class A:
            def method(self, x):
                """Double x.

                >>> A().method(2)
                4
                """
                return 2 * x

        def top(x):
            """Add one.

            >>> top(1)
            2
            """
            return x + 1

        def stub():
            """Nothing to learn."""
            pass

        def nodoc():
            return 3
        '''))
    return root


def test_stdlib_qa_parse_is_cached_atomically_and_deterministic(tmp_path, monkeypatch):
    root = _fake_stdlib(tmp_path / "lib")
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path / "cache"))
    first = stdlib_qa_rows(root)
    assert first == embedded._parse_stdlib_qa(root)
    cached = list((tmp_path / "cache" / "embedded").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".jsonl"
    monkeypatch.setattr(embedded, "_parse_stdlib_qa", lambda root: pytest.fail("cache not used"))
    assert stdlib_qa_rows(root) == first

    by_name = {ast.parse(r["question"] + "    pass\n").body[0].name: r for r in first}
    assert "f" not in by_name and "stub" not in by_name and "nodoc" not in by_name
    assert by_name["method"]["question"].startswith("def method(self, x):\n    \"\"\"Double x.")
    assert by_name["method"]["answer"] == "    return 2 * x\n" and "test_type" not in by_name["method"]
    assert by_name["top"]["test_type"] == "doctest" and by_name["top"]["module"] == "pkg"
    assert _run_doctest(by_name["top"], {}).failed == 0
    assert by_name["dedent"]["module"] == "textwrap"


def test_stdlib_source_rows_are_sorted_unique_files():
    rows = stdlib_source_rows()
    assert len(rows) > 300
    assert all(r["question"] == "" and r["answer"].strip() for r in rows)
    assert len({r["answer"] for r in rows}) == len(rows)
    paths = [r["source"].removeprefix("stdlib:") for r in rows]
    assert paths == sorted(paths) and "textwrap.py" in paths
    assert not [p for p in paths if p.startswith(("test/", "idlelib/")) or "/tests/" in p]


def test_stdlib_source_rows_deterministic_and_deduplicated(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    shutil.copy(root / "textwrap.py", root / "pkg" / "copy_of_textwrap.py")
    (root / "empty.py").write_text("\n")
    rows = stdlib_source_rows(root)
    assert rows == stdlib_source_rows(root)
    assert [r["source"] for r in rows] == ["stdlib:pkg/__init__.py", "stdlib:pkg/copy_of_textwrap.py"]
    assert rows[1]["answer"] == (stdlib_root() / "textwrap.py").read_text()


@needs_mbpp
def test_mbpp_train_rows_are_the_train_split_and_pass_their_tests():
    rows = mbpp_train_rows(MBPP)
    ids = [int(r["source"].split(":")[1]) for r in rows]
    assert ids == list(range(601, 975))
    assert all("\r" not in r["answer"] and r["answer"].endswith("\n") for r in rows)
    for row in rows[:5]:
        assert row["test_type"] == "asserts" and len(row["tests"]) == 3
        assert all(t in row["question"] for t in row["tests"])
        namespace = {}
        exec(row["answer"] + row["test_setup"] + "\n" + "\n".join(row["tests"]), namespace)


def test_mbpp_path_missing_or_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("EBFT_MBPP", raising=False)
    assert mbpp_train_rows() == []
    with pytest.raises(DataConfigError, match="nope.jsonl.*data.mbpp_path"):
        mbpp_train_rows(tmp_path / "nope.jsonl")


def test_translation_rows_cover_five_languages_both_directions(translation_rows):
    counts = Counter((r["source_lang"], r["target_lang"]) for r in translation_rows)
    for lang in ("cs", "de", "is", "ru", "zh"):
        assert counts[("en", lang)] > 500 and counts[(lang, "en")] > 500, counts
    keys = [(r["source_lang"], r["target_lang"], r["question"]) for r in translation_rows]
    assert len(set(keys)) == len(keys)
    assert {"question": "Translate this from English to German:\nEnglish: Czech\nGerman:", "answer": " Tschechisch",
            "source_lang": "en", "target_lang": "de", "source": "django"} in translation_rows
    zh = [r for r in translation_rows if r["target_lang"] == "zh"]
    assert sum(any("\u4e00" <= ch <= "\u9fff" for ch in r["answer"]) for r in zh) > 0.9 * len(zh)
    assert all(r["answer"].startswith(" ") and r["answer"].strip() for r in translation_rows)


def test_translation_rows_deterministic_and_language_checked(translation_rows):
    assert django_translation_rows() == translation_rows
    assert embedded_rows("translation", langs=("de",)) == [r for r in translation_rows if "de" in
                                                           (r["source_lang"], r["target_lang"])]
    with pytest.raises(DataConfigError, match="data.langs.*'xx'"):
        django_translation_rows(("de", "xx"))


def test_parse_po_skips_header_fuzzy_obsolete_and_empty():
    po = textwrap.dedent(r'''
        msgid ""
        msgstr ""
        "Language: de\n"

        msgid "Hello"
        msgstr "Hallo"

        #, fuzzy
        msgid "Fuzzy"
        msgstr "Unscharf"

        msgid "Untranslated"
        msgstr ""

        msgctxt "month"
        msgid ""
        "Multi "
        "line \"quoted\"\n"
        msgstr "Mehr\tzeilig"

        #, python-format
        msgid "%(n)s file"
        msgid_plural "%(n)s files"
        msgstr[0] "%(n)s Datei"
        msgstr[1] "%(n)s Dateien"

        #~ msgid "Old"
        #~ msgstr "Alt"
        ''')
    assert parse_po(po) == [("Hello", "Hallo"), ('Multi line "quoted"\n', "Mehr\tzeilig"),
                            ("%(n)s file", "%(n)s Datei")]


def test_placeholder_only_entries_are_skipped(translation_rows):
    assert not [r for r in translation_rows if r["question"].endswith("English: %(value)s\nGerman:")]
    assert not embedded._has_words("%(size)s, {0} %s") and embedded._has_words("%(n)s Datei")


def test_embedded_rows_dispatch(tmp_path, monkeypatch):
    monkeypatch.delenv("EBFT_MBPP", raising=False)
    with pytest.raises(DataConfigError, match="no embedded data for task 'chess'"):
        embedded_rows("chess")
    assert embedded_rows("qa_code") == stdlib_qa_rows()


@needs_mbpp
def test_embedded_qa_code_appends_mbpp(qa_rows):
    rows = embedded_rows("qa_code", mbpp_path=MBPP)
    assert rows[:len(qa_rows)] == qa_rows and len(rows) == len(qa_rows) + 374
