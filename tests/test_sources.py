"""Row sources (local files, hub presets on local stand-ins, embedded) and the validation split."""

import csv
import json
import warnings

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from ebft.config import DataConfigError
from ebft.data import sources
from ebft.data.sources import load_rows, subset_indices, train_val_split

ROWS = [{"prompt": f"q{i}", "solution": f"a{i}", "unit": [f"assert f({i})"]} for i in range(6)]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _parquet(path, columns: dict):
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def hub_stub(monkeypatch):
    """A reachable 'hub' whose load_dataset reads a local parquet file instead."""
    calls = []

    def serve(path):
        def load_dataset(name, config=None, split=None):
            calls.append((name, config, split))
            return datasets.Dataset.from_parquet(str(path))
        monkeypatch.setattr(datasets, "load_dataset", load_dataset)
        return calls

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: True)
    return serve


def test_local_jsonl_with_field_mapping(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    rows = load_rows({"kind": "local", "files": str(path),
                      "fields": {"question": "prompt", "answer": "solution", "tests": "unit"}}, "qa_code")
    assert rows == [{"question": f"q{i}", "answer": f"a{i}", "tests": [f"assert f({i})"]} for i in range(6)]


def test_local_csv_and_parquet_identity_mapping(tmp_path):
    csv_path = tmp_path / "d.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer", "entry_point", "other"])
        writer.writerows([["q1", "a1", "f", "x"], ["q2", "a2", "g", "y"]])
    pq_path = _parquet(tmp_path / "d.parquet", {"question": ["q1", "q2"], "answer": ["a1", "a2"],
                                                "entry_point": ["f", "g"]})
    expected = [{"question": "q1", "answer": "a1", "entry_point": "f"},
                {"question": "q2", "answer": "a2", "entry_point": "g"}]
    assert load_rows({"kind": "local", "files": str(csv_path)}, "qa_code") == expected
    assert load_rows(OmegaConf.create({"kind": "local", "files": [str(pq_path)]}), "qa_code") == expected


def test_local_limit_and_duplicates(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}] * 3 + [{"question": "r", "answer": "b"}])
    assert load_rows({"kind": "local", "files": str(path)}, "qa_code") == [
        {"question": "q", "answer": "a"}, {"question": "r", "answer": "b"}]
    assert len(load_rows({"kind": "local", "files": str(path), "limit": 1}, "qa_code")) == 1
    with pytest.raises(DataConfigError, match="data.limit=0"):
        load_rows({"kind": "local", "files": str(path), "limit": 0}, "qa_code")


def test_limit_is_a_seeded_subset_in_source_order():
    assert subset_indices(5, None, 0) == range(5) and subset_indices(5, 9, 0) == range(5)
    picked = subset_indices(1000, 20, seed=43)
    assert picked == subset_indices(1000, 20, seed=43) != subset_indices(1000, 20, seed=44)
    assert picked == sorted(set(picked)) and len(picked) == 20 and picked[-1] > 100


def test_alma_preset_on_local_copy(tmp_path):
    path = _parquet(tmp_path / "alma.parquet", {
        "question": ["Translate this from German to English:\nGerman: Ja\nEnglish:"], "answer": [" Yes"],
        "source-target": ["de-en"]})
    rows = load_rows({"kind": "local", "name": "sjelassi/alma", "files": str(path)}, "translation")
    assert rows == [{"question": "Translate this from German to English:\nGerman: Ja\nEnglish:", "answer": " Yes",
                     "source_lang": "de", "target_lang": "en"}]


def test_hub_presets_through_the_hub_code_path(tmp_path, hub_stub):
    path = _parquet(tmp_path / "oci.parquet", {"id": ["1"], "input": ["Write f."], "output": ["def f(): return 1"],
                                               "unit_tests": ['["assert f() == 1"]']})
    calls = hub_stub(path)
    rows = load_rows({"kind": "hub", "name": "nvidia/OpenCodeInstruct", "split": "train"}, "qa_code")
    assert calls == [("nvidia/OpenCodeInstruct", None, "train")]
    assert rows == [{"question": "Write f.", "answer": "def f(): return 1", "tests": ["assert f() == 1"],
                     "test_type": "asserts"}]

    hub_stub(_parquet(tmp_path / "swallow.parquet", {"text": ["import os\n", "x = 1\n"]}))
    rows = load_rows({"kind": "hub", "name": "sjelassi/swallow_code_20m"}, "unstructured_code")
    assert rows == [{"question": "", "answer": "import os\n"}, {"question": "", "answer": "x = 1\n"}]


def test_alma_human_parallel_gives_both_directions(tmp_path, hub_stub):
    hub_stub(_parquet(tmp_path / "a.parquet", {"translation": [{"de": "Hallo", "en": "Hello"}]}))
    rows = load_rows({"kind": "hub", "name": "haoranxu/ALMA-Human-Parallel", "config": "de-en"}, "translation")
    assert rows == [
        {"question": "Translate this from English to German:\nEnglish: Hello\nGerman:", "answer": " Hallo",
         "source_lang": "en", "target_lang": "de"},
        {"question": "Translate this from German to English:\nGerman: Hallo\nEnglish:", "answer": " Hello",
         "source_lang": "de", "target_lang": "en"}]
    with pytest.raises(DataConfigError, match="data.config='None'.*de-en"):
        load_rows({"kind": "hub", "name": "haoranxu/ALMA-Human-Parallel"}, "translation")


def test_offline_hub_is_a_clear_error(monkeypatch, hub_stub):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'sjelassi/alma' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataConfigError, match="sjelassi/alma.*no hub is reachable.*data=embedded.*data=local"):
        load_rows({"kind": "hub", "name": "sjelassi/alma"}, "translation")

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("probe should fail first"))
    with pytest.raises(DataConfigError, match="no hub is reachable"):
        load_rows({"kind": "hub", "name": "sjelassi/alma"}, "translation")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataConfigError, match="data.files: '.*missing.jsonl' does not exist"):
        load_rows({"kind": "local", "files": str(tmp_path / "missing.jsonl")}, "qa_code")


def test_missing_field_names_field_columns_and_key(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataConfigError) as err:
        load_rows({"kind": "local", "files": str(path)}, "qa_code")
    message = str(err.value)
    assert "'question'" in message and "prompt" in message and "data.fields.question=" in message


def test_row_missing_a_value_names_the_row(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2", "answer": None}])
    with pytest.raises(DataConfigError, match="row 1 has no value for field 'answer'"):
        load_rows({"kind": "local", "files": str(path)}, "qa_code")
    numbers = _jsonl(tmp_path / "n.jsonl", [{"question": "q", "answer": 3}])
    with pytest.raises(DataConfigError, match="row 0: field 'answer' is int, not text"):
        load_rows({"kind": "local", "files": str(numbers)}, "qa_code")


def test_bad_config_values(tmp_path):
    with pytest.raises(DataConfigError, match="data.kind='ftp'"):
        load_rows({"kind": "ftp"}, "qa_code")
    with pytest.raises(DataConfigError, match=r"unknown data key\(s\) \['filez'\]"):
        load_rows({"kind": "local", "filez": "x"}, "qa_code")
    with pytest.raises(DataConfigError, match="data.name"):
        load_rows({"kind": "hub"}, "qa_code")
    odd = tmp_path / "d.txt"
    odd.write_text("x")
    with pytest.raises(DataConfigError, match="data.file_type"):
        load_rows({"kind": "local", "files": str(odd)}, "qa_code")


def test_embedded_kind_with_limit():
    rows = load_rows({"kind": "embedded", "langs": ["de"], "limit": 20, "seed": 1}, "translation")
    assert len(rows) == 20 and {r["target_lang"] for r in rows} == {"de", "en"}
    assert rows == load_rows(OmegaConf.create({"kind": "embedded", "langs": ["de"], "limit": 20, "seed": 1}),
                             "translation")


def test_train_val_split_disjoint_and_deterministic():
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(100)]
    train, val = train_val_split(rows, 10, seed=43)
    assert len(val) == 10 and len(train) == 90
    assert not {r["question"] for r in train} & {r["question"] for r in val}
    assert train_val_split(rows, 10, seed=43) == (train, val)
    assert train_val_split(rows, 10, seed=44)[1] != val
    assert [r for r in rows if r in train] == train


def test_train_val_split_keeps_duplicates_together_and_falls_back():
    rows = [{"question": f"q{i % 5}", "answer": "a"} for i in range(50)]
    with pytest.warns(UserWarning, match="val_size=1000.*holding out 1"):
        train, val = train_val_split(rows, 1000, seed=0)
    assert len(val) == 10 and len({r["question"] for r in val}) == 1
    assert not {r["question"] for r in train} & {r["question"] for r in val}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train_val_split(rows, 0) == (rows, [])
    with pytest.raises(DataConfigError, match="val_size"):
        train_val_split(rows, -1)


def _pairs(rows):
    """Each translation row as its unordered pair {(lang, text), (lang, text)}."""
    from ebft.data.embedded import translation_source

    return [frozenset({(r["source_lang"], translation_source(r["question"])), (r["target_lang"], r["answer"][1:])})
            for r in rows]


def test_translation_split_keeps_both_directions_of_a_pair_on_one_side(tmp_path, hub_stub):
    rows = load_rows({"kind": "embedded", "langs": ["de", "cs"]}, "translation")
    train, val = train_val_split(rows, 300, seed=43)
    assert len(val) >= 300 and not set(_pairs(train)) & set(_pairs(val))
    english = lambda part: {r["answer"] if r["target_lang"] == "en" else r["question"].split("\n")[1][9:]
                            for r in part}
    assert not english(train) & english(val)  # an English text held out is held out in every language
    hub_stub(_parquet(tmp_path / "a.parquet", {"translation": [{"de": f"Satz {i}", "en": f"Sentence {i}"}
                                                               for i in range(100)]}))
    rows = load_rows({"kind": "hub", "name": "haoranxu/ALMA-Human-Parallel", "config": "de-en"}, "translation")
    train, val = train_val_split(rows, 20, seed=43)
    assert len(val) == 20 and len(set(_pairs(val))) == 10 and not set(_pairs(train)) & set(_pairs(val))


def test_held_out_membership_is_a_property_of_the_row():
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(2000)]
    train, val = train_val_split(rows, 100, seed=43)
    assert len(val) == 100
    shuffled_train, shuffled_val = train_val_split(rows[::-1], 100, seed=43)
    assert shuffled_val == val[::-1] and shuffled_train == train[::-1]
    # more rows (another data config at evaluation): no row trained on becomes a held-out row
    more = [{"question": f"extra{i}", "answer": "x"} for i in range(700)]
    for bigger in (more + rows, rows + more, rows[:1000] + more + rows[1000:]):
        _, val_bigger = train_val_split(bigger, 100, seed=43)
        assert not [r for r in val_bigger if r in train]
    # the same with the embedded translation data and one more language
    train_de, _ = train_val_split(load_rows({"kind": "embedded", "langs": ["de"]}, "translation"), 300, seed=43)
    _, val_more = train_val_split(load_rows({"kind": "embedded", "langs": ["de", "cs"]}, "translation"), 300, 43)
    assert not {r["question"] for r in val_more} & {r["question"] for r in train_de}
