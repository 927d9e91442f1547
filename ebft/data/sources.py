"""Training rows ``{question, answer, ...}`` from the hub, local files, a known synthetic process or the
embedded offline corpora, and the held-out validation split.

The ``data`` config group::

    data:
      kind: embedded        # embedded | hub | local | synthetic
      name: null            # hub: dataset id (a preset below fills `fields`);
                            # local: optional preset name for a downloaded copy
      config: null          # hub: dataset config (haoranxu/ALMA-Human-Parallel: de-en, ...)
      split: train          # hub: split, slicing allowed (train[:10%])
      files: null           # local: path or list of paths (.jsonl/.json/.parquet/.csv)
      file_type: null       # local: json | parquet | csv (default: from the extension)
      format: null          # chat | prompt_completion | fields | text (default: from the
                            # columns; see ebft/data/formats.py)
      chat_template: false  # render rows with the tokenizer's chat template when packing
      document_mask: false  # attend within each example only (ebft/core/documents.py; not recorded)
      packing: stream       # chunks cut every T tokens | examples: each starts at an example (not recorded)
      fields: {}            # our field -> their column, merged over the preset;
                            # a field mapped to null becomes "" (a dataset without questions)
      mbpp_path: null       # embedded qa_code: MBPP jsonl (default $EBFT_MBPP; none = no MBPP)
      langs: [cs, de, is, ru, zh]   # embedded translation languages
      process: {}           # synthetic: the known process (ebft/data/synthetic.py)
      rows: null            # synthetic: number of sequences
      row_len: null         # synthetic: symbols per sequence
      limit: null           # keep N rows: a seeded random subset, in source order
      val_size: 1000        # held-out validation rows (see train_val_split)
      seed: 43              # seed of the validation split

Our fields: ``question`` and ``answer`` (required strings), and optional
``tests``, ``test_type``, ``test_setup``, ``entry_point``, ``source_lang``,
``target_lang``. Without a preset or ``fields``, columns named like our fields
are used as they are. Exact duplicate (question, answer) rows are dropped,
the first one kept.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import socket
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ebft.config import DataConfigError, DataSettings
from ebft.data.embedded import LANGUAGE_NAMES, embedded_rows, translation_prompt, translation_source
from ebft.data.formats import detect_format, format_row
from ebft.data.synthetic import synthetic_rows
from ebft.models.loading import ModelSourceError, resolve_source

KINDS = ("embedded", "hub", "local", "synthetic")
ROW_FIELDS = ("question", "answer", "tests", "test_type", "test_setup", "entry_point", "source_lang", "target_lang")
CONFIG_KEYS = {"kind", "name", "config", "split", "files", "file_type", "format", "chat_template", "document_mask",
               "packing", "fields", "mbpp_path", "langs", "process", "rows", "row_len", "limit", "val_size", "seed"}
NOT_RECORDED = {"document_mask", "packing"}   # how chunks are cut and attended to, not which rows they hold
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# ---------------------------------------------------------------- presets

def _split_lang_pair(row: dict, cfg: Mapping, index: int) -> list[dict]:
    pair = row.pop("lang_pair")
    source, sep, target = str(pair).partition("-")
    if not sep or not source or not target:
        raise DataConfigError(f"row {index}: language pair '{pair}' is not of the form 'de-en'")
    return [{**row, "source_lang": source, "target_lang": target}]


def _decode_tests(row: dict, cfg: Mapping, index: int) -> list[dict]:
    tests = row.get("tests")
    if isinstance(tests, str) and tests.lstrip().startswith("["):
        try:
            row["tests"] = json.loads(tests)
        except json.JSONDecodeError:
            row["tests"] = ast.literal_eval(tests)
    return [{**row, "test_type": "asserts"}]


def _translation_pairs(row: dict, cfg: Mapping, index: int) -> list[dict]:
    pair = str(cfg.get("config") or "")
    xx, _, en = pair.partition("-")
    if xx not in LANGUAGE_NAMES or en not in LANGUAGE_NAMES:
        raise DataConfigError(
            f"data.config='{cfg.get('config')}' must name a language pair such as de-en "
            f"(languages: {sorted(LANGUAGE_NAMES)})")
    texts = row["translation"]
    rows = []
    for src, tgt in ((en, xx), (xx, en)):
        rows.append({"question": translation_prompt(src, tgt, texts[src]), "answer": " " + texts[tgt],
                     "source_lang": src, "target_lang": tgt})
    return rows


@dataclass(frozen=True)
class Preset:
    """Column mapping (our field -> their column) and an optional per-row
    conversion ``convert(row, cfg, index) -> rows`` of a known dataset."""

    fields: dict[str, str | None]
    convert: Callable[[dict, Mapping, int], list[dict]] | None = None
    required: tuple[str, ...] = ("question", "answer")


PRESETS = {
    "sjelassi/opencode-instruct_100k_200tok": Preset({"question": "question", "answer": "answer"}),
    "sjelassi/swallow_code_20m": Preset({"question": None, "answer": "text"}),
    "sjelassi/alma": Preset({"question": "question", "answer": "answer", "lang_pair": "source-target"},
                            _split_lang_pair),
    "nvidia/OpenCodeInstruct": Preset({"question": "input", "answer": "output", "tests": "unit_tests"},
                                      _decode_tests),
    "haoranxu/ALMA-Human-Parallel": Preset({"translation": "translation"}, _translation_pairs,
                                           required=("translation",)),
}


# ---------------------------------------------------------------- config

def _as_dict(cfg_data) -> dict:
    if not isinstance(cfg_data, Mapping):
        raise DataConfigError(f"the data config must be a mapping, got {type(cfg_data).__name__}")
    unknown = sorted(set(cfg_data) - CONFIG_KEYS)
    if unknown:
        raise DataConfigError(f"unknown data key(s) {unknown}; known keys: {sorted(CONFIG_KEYS)}")
    return dict(cfg_data)


def _preset(cfg: Mapping, columns: list[str]) -> Preset:
    """The preset named by ``data.name`` with ``data.fields`` merged over it; with
    neither, the identity mapping of the columns named like our fields."""
    base = PRESETS.get(cfg.get("name") or "")
    user = dict(cfg.get("fields") or {})
    if base is None:
        fields = {f: f for f in ROW_FIELDS if f in columns}
        fields.setdefault("question", "question")
        fields.setdefault("answer", "answer")
        return Preset({**fields, **user})
    return Preset({**base.fields, **user}, base.convert, base.required)


# ---------------------------------------------------------------- table -> rows

def rows_from_table(table, cfg: Mapping) -> list[dict]:
    """Map a ``datasets.Dataset`` to rows: a ``chat`` / ``prompt_completion`` / ``text`` table by its
    format (``ebft.data.formats``), a ``fields`` one with the preset / ``data.fields`` mapping."""
    columns = list(table.column_names)
    fmt = detect_format(columns, cfg.get("format"), bool(cfg.get("fields")) or (cfg.get("name") or "") in PRESETS)
    if fmt != "fields":
        return [format_row(record, fmt, index) for index, record in enumerate(table)]
    preset = _preset(cfg, columns)
    for ours, theirs in preset.fields.items():
        if theirs is not None and theirs not in columns:
            raise DataConfigError(
                f"the dataset has no column '{theirs}' for field '{ours}' (columns: {columns}); "
                f"set data.fields.{ours}=<column>")
    used = sorted({c for c in preset.fields.values() if c is not None})
    rows = []
    for index, record in enumerate(table.select_columns(used)):
        row = {ours: ("" if theirs is None else record[theirs]) for ours, theirs in preset.fields.items()}
        for name in preset.required:
            if row.get(name) is None:
                raise DataConfigError(
                    f"row {index} has no value for field '{name}' (column '{preset.fields[name]}'); "
                    "fix or drop that row, or map the field to another column with data.fields")
        converted = preset.convert(row, cfg, index) if preset.convert else [row]
        for out in converted:
            for name in ("question", "answer"):
                if not isinstance(out[name], str):
                    raise DataConfigError(
                        f"row {index}: field '{name}' is {type(out[name]).__name__}, not text; "
                        f"map data.fields.{name} to a text column")
        rows.extend(converted)
    return rows


def _dedup(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for row in rows:
        key = (row["question"], row["answer"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


# ---------------------------------------------------------------- hub and local

def _offline_env() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint (``$HF_ENDPOINT``, default huggingface.co) accepts a
    TCP connection; assumed so behind an HTTPS proxy, which cannot be probed this way."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _no_hub(name: str) -> DataConfigError:
    return DataConfigError(
        f"data.name='{name}' needs the dataset hub, and no hub is reachable from here; "
        "use data=embedded (offline corpora) or data=local with data.files=<your copy>, "
        "or set HF_HUB_OFFLINE=1 to read a copy already in the Hugging Face cache")


def _connection_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import requests

        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:
        pass
    return tuple(errors)


def _load_hub(cfg: Mapping):
    import datasets

    name = cfg.get("name")
    if not name:
        raise DataConfigError("data.kind=hub needs data.name=<owner/dataset>, e.g. sjelassi/alma")
    if not _offline_env() and not hub_reachable():
        raise _no_hub(name)
    try:
        return datasets.load_dataset(name, cfg.get("config"), split=cfg.get("split") or "train")
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DataConfigError(f"data.name='{name}' is not a dataset on the hub (or not cached): {err}") from err
    except _connection_errors() as err:
        raise _no_hub(name) from err


def _local_files(cfg: Mapping) -> tuple[str, list[str]]:
    files = cfg.get("files")
    if not files:
        raise DataConfigError(
            "data.kind=local needs data.files=<path or list of paths> (.jsonl, .json, .parquet, .csv)")
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    paths = [Path(f).expanduser() for f in files]
    for path in paths:
        if not path.is_file():
            raise DataConfigError(f"data.files: '{path}' does not exist; give an existing file")
    fmt = cfg.get("file_type")
    if fmt is None:
        formats = {_FORMATS.get(p.suffix.lower()) for p in paths}
        if None in formats or len(formats) != 1:
            raise DataConfigError(
                f"data.files {[str(p) for p in paths]}: cannot tell one file type from the extensions; "
                f"use {sorted(_FORMATS)} or set data.file_type to json, parquet or csv")
        fmt = formats.pop()
    if fmt not in set(_FORMATS.values()):
        raise DataConfigError(f"data.file_type='{fmt}' is not supported; use json, parquet or csv")
    return fmt, [str(p) for p in paths]


def _load_local(cfg: Mapping):
    import datasets

    fmt, files = _local_files(cfg)
    for path in files:
        if os.path.getsize(path) == 0:
            raise DataConfigError(f"data.files: '{path}' is empty; give a file with rows")
        if fmt != "parquet":
            _check_utf8(path)
    try:
        return datasets.load_dataset(fmt, data_files=files, split="train")
    except Exception as err:
        for path in files:
            if fmt == "json":
                _check_json_lines(path)
        raise DataConfigError(f"data.files {files} could not be read as {fmt}: {err}") from err


def _check_utf8(path: str, block: int = 1 << 24) -> None:
    """Raise naming the line of ``path`` that is not UTF-8 text (read in blocks)."""
    carry, lines = b"", 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            data = carry + chunk
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as err:
                if not (chunk and err.reason == "unexpected end of data"):
                    line = lines + data.count(b"\n", 0, err.start)
                    raise DataConfigError(f"data.files: '{path}' line {line}: not UTF-8 text (byte "
                                          f"0x{data[err.start]:02x}); re-save the file as UTF-8") from None
                carry, data = data[err.start:], data[:err.start]  # a character split by the block's end
            if not chunk:
                return
            lines += data.count(b"\n")


def _check_json_lines(path: str) -> None:
    """Raise naming the first line of a JSON-lines ``path`` that is not a JSON value (nothing for one
    JSON document)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        json.loads(text)
        return
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                raise DataConfigError(f"data.files: '{path}' line {number}: not valid JSON ({err.msg} at column "
                                      f"{err.colno}); fix or delete that line") from None


# ---------------------------------------------------------------- entry points

def subset_indices(size: int, limit: int | None, seed: int) -> range | list[int]:
    """Indices of ``limit`` of ``size`` items drawn with ``seed``, in increasing
    order (all of them when ``limit`` is None or not smaller than ``size``)."""
    if limit is None or limit >= size:
        return range(size)
    if limit < 1:
        raise DataConfigError(f"data.limit={limit} must be a positive number of rows (or null for all)")
    return sorted(random.Random(seed).sample(range(size), limit))


def load_rows(cfg_data, task: str) -> list[dict]:
    """Rows of ``task`` (qa_code, unstructured_code, translation) from the
    source the ``data`` config names (shape in the module docstring)."""
    cfg = _as_dict(cfg_data)
    kind = cfg.get("kind", "embedded")
    limit, seed = cfg.get("limit"), cfg.get("seed", 43)
    if kind == "embedded":
        langs = cfg.get("langs") or ("cs", "de", "is", "ru", "zh")
        rows = embedded_rows(task, mbpp_path=cfg.get("mbpp_path"), langs=tuple(langs))
        rows = [rows[i] for i in subset_indices(len(rows), limit, seed)]
    elif kind in ("hub", "local"):
        table = _load_hub(cfg) if kind == "hub" else _load_local(cfg)
        if limit is not None:
            table = table.select(subset_indices(len(table), limit, seed))
        rows = rows_from_table(table, cfg)
    elif kind == "synthetic":
        rows = synthetic_rows(cfg)
        rows = [rows[i] for i in subset_indices(len(rows), limit, seed)]
    else:
        raise DataConfigError(f"data.kind='{kind}' is not one of {list(KINDS)}")
    rows = _dedup(rows)
    if not rows:
        raise DataConfigError(
            f"data ({kind}) gave no rows for task '{task}'; check data.files / data.name / data.limit")
    return rows


def split_key(row: Mapping) -> str:
    """The group a row is held out with: all rows of one group land on the same side of the split.

    A translation row's group is its English text (the source of en->xx, the reference of xx->en),
    so both directions of a pair, and the pairs of every language sharing that English text, stay
    together; any other row's group is its exact ``(question, answer)``.
    """
    english = None
    if row.get("target_lang") == "en":
        english = row["answer"].strip()
    elif row.get("source_lang") == "en":
        english = translation_source(row["question"])
    if english is not None:
        return "en:" + english.strip()
    return json.dumps([row["question"], row["answer"]], ensure_ascii=False)


def held_out_score(key: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) of a group key and the split seed (SHA-256, no
    process-dependent hashing), so held-out membership depends on the row, not on its position."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def train_val_split(rows: list[dict], val_size: int, seed: int = 43) -> tuple[list[dict], list[dict]]:
    """Deterministic held-out split ``(train, val)``, both in the rows' order.

    Every group (``split_key``) gets a score (``held_out_score``); groups are held out in
    increasing score until they hold ``val_size`` distinct (question, answer) rows (whole groups,
    so a few more), i.e. a row is held out iff its group scores below a cutoff. Membership is a
    property of the row: the order of the rows does not matter, and adding rows only lowers the
    cutoff, so a row trained on never becomes a held-out row of a larger data set (a smaller one
    can move it in, which is why evaluation warns when the data config differs from training's).
    Rows with the same (question, answer) share a group, so no text is on both sides. When
    ``val_size`` is half of the distinct rows or more, a tenth of them (at least 1) is held out
    instead, with a warning; ``val_size=0`` gives an empty validation set.
    """
    if val_size < 0:
        raise DataConfigError(f"data.val_size={val_size} must be >= 0")
    if not val_size:
        return list(rows), []
    groups: dict[str, set] = {}
    for r in rows:
        groups.setdefault(split_key(r), set()).add((r["question"], r["answer"]))
    distinct = sum(map(len, groups.values()))
    if len(groups) < 2:
        raise DataConfigError(f"{len(groups)} group(s) of rows cannot be split; add data or set data.val_size=0")
    if val_size * 2 >= distinct:
        fallback = max(1, distinct // 10)
        warnings.warn(f"data.val_size={val_size} is at least half of the {distinct} rows; "
                      f"holding out {fallback} instead", stacklevel=2)
        val_size = fallback
    held, count = set(), 0
    for key in sorted(groups, key=lambda k: held_out_score(k, seed)):
        if count >= val_size:
            break
        held.add(key)
        count += len(groups[key])
    train = [r for r in rows if split_key(r) not in held]
    val = [r for r in rows if split_key(r) in held]
    return train, val


# ---------------------------------------------------------------- the data a model was trained on

DATA_RECORD = "training_data.json"
"""Written beside a saved model: the task and data settings its training rows and held-out split came from."""


def data_record(data: DataSettings) -> dict:
    """The settings that decide the rows and the held-out split: ``task.name`` and ``data`` (resolved,
    so an MBPP path taken from ``$EBFT_MBPP`` is recorded as the path)."""
    return {"task": data.task, "data": {k: v for k, v in data.source.items() if k in CONFIG_KEYS - NOT_RECORDED}}


def write_data_record(data: DataSettings, directory: str | os.PathLike) -> None:
    (Path(directory) / DATA_RECORD).write_text(json.dumps(data_record(data), indent=1, sort_keys=True) + "\n")


def check_data_record(model: str, data: DataSettings, key: str) -> list[str]:
    """Warn when the model ``key=model`` names was trained on other data settings than ``data``.

    Held-out rows are those of ``data``; with other settings they can include rows the model
    was trained on. Returns the differing settings (empty when they agree or nothing was recorded:
    a hub model, or a model saved before records were written).
    """
    try:
        source = resolve_source(model)
    except ModelSourceError:
        return []
    path = Path(source.path) / DATA_RECORD
    if source.kind != "local" or not path.is_file():
        return []
    saved, here = json.loads(path.read_text()), data_record(data)
    differ = [f"task.name: {saved['task']!r} there, {here['task']!r} here"] if saved["task"] != here["task"] else []
    for name in sorted(set(saved["data"]) | set(here["data"])):
        there, now = saved["data"].get(name), here["data"].get(name)
        if there != now:
            differ.append(f"data.{name}: {there!r} there, {now!r} here")
    if differ:
        warnings.warn(f"{key}={model} was trained with other data settings ({'; '.join(differ)}): the held-out "
                      "rows here can include rows it was trained on. Use the training run's data settings "
                      f"(recorded in {path}).", stacklevel=2)
    return differ
