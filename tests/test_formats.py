"""Row formats of local / hub files (text, prompt/completion, chat) in every file type, their answer
masks (raw and with the real SmolLM2 chat template), RLVR prompts from them, and bad rows."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ebft.config import DataConfigError
from ebft.data.formats import row_segments
from ebft.data.packing import pack_rows
from ebft.data.prompts import select_prompts
from ebft.data.sources import load_rows

CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2."},
     {"role": "assistant", "content": "3"}, {"role": "user", "content": "And 2 and 2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
]
RECORDS = {
    "text": [{"text": "import os\n"}, {"text": "x = 1\n"}],
    "prompt_completion": [{"prompt": "def f():\n", "completion": "    return 1\n"},
                          {"prompt": "def g():\n", "completion": "    return 2\n"}],
    "chat": [{"messages": m} for m in CHATS],
}
EXPECTED = {
    "text": [{"question": "", "answer": "import os\n"}, {"question": "", "answer": "x = 1\n"}],
    "prompt_completion": [{"question": "def f():\n", "answer": "    return 1\n"},
                          {"question": "def g():\n", "answer": "    return 2\n"}],
    "chat": [{"question": "Be brief.Add 1 and 2.3And 2 and 2?", "answer": "4", "messages": CHATS[0]},
             {"question": "Name a prime.", "answer": "7", "messages": CHATS[1]}],
}


def _write(path, records):
    """``records`` as a .jsonl / .json / .parquet / .csv file (a chat as a JSON string in a csv cell)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_each_format_is_detected_in_each_file_type(tmp_path, fmt, suffix):
    path = _write(tmp_path / f"d{suffix}", RECORDS[fmt])
    assert load_rows({"kind": "local", "files": str(path)}, "qa_code") == EXPECTED[fmt]
    assert load_rows({"kind": "local", "files": str(path), "format": fmt}, "qa_code") == EXPECTED[fmt]


def test_format_setting_overrides_detection_and_extra_fields_are_kept(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"text": "raw", "question": "q", "answer": "a",
                                          "prompt": "p", "completion": "c", "tests": ["assert 1"]}])
    local = {"kind": "local", "files": str(path)}
    assert load_rows(local, "qa_code") == [{"question": "p", "answer": "c", "tests": ["assert 1"]}]
    assert load_rows({**local, "format": "text"}, "qa_code") == [{"question": "", "answer": "raw",
                                                                   "tests": ["assert 1"]}]
    assert load_rows({**local, "format": "fields"}, "qa_code") == [{"question": "q", "answer": "a",
                                                                     "tests": ["assert 1"]}]
    with pytest.raises(DataConfigError, match=r"data.format='sharegpt' is not one of \['chat'"):
        load_rows({**local, "format": "sharegpt"}, "qa_code")


def test_a_bad_row_names_its_number_the_fields_found_and_expected(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"messages": CHATS[1]},
                                         {"messages": [{"role": "user", "content": "hi"}], "id": 3}])
    with pytest.raises(DataConfigError) as err:
        load_rows({"kind": "local", "files": str(path)}, "qa_code")
    assert str(err.value) == (
        "row 1 (chat format): the last turn is 'user', not 'assistant', and there is no reference; "
        "fields found: ['id', 'messages']; expected: messages (a list of {role, content} turns ending "
        "with an assistant turn, or a prompt-only chat with a reference)")
    path = _write(tmp_path / "e.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p2", "answer": "x"}])
    with pytest.raises(DataConfigError, match=r"^row 1 \(prompt_completion format\): prompt or completion is "
                                              r"missing.*fields found: \['answer', 'prompt'\]; expected: prompt, "
                                              r"and completion or reference$"):
        load_rows({"kind": "local", "files": str(path)}, "qa_code")
    path = _write(tmp_path / "f.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataConfigError, match=r"^row 0 \(chat format\): turn 0 is not a \{role: "
                                              r"system/user/assistant, content: text\}"):
        load_rows({"kind": "local", "files": str(path)}, "qa_code")


def _masked(packed, tokenizer):
    ids, mask = packed.input_ids.flatten(), packed.answer_mask.flatten()
    eos = ids == tokenizer.eos_token_id
    return tokenizer.decode(ids[mask & ~eos]), tokenizer.decode(ids[~mask])


def test_raw_chat_marks_every_assistant_turn(tokenizer):
    rows = EXPECTED["chat"] + EXPECTED["prompt_completion"] + EXPECTED["text"]
    total = sum(len(tokenizer.encode(t, add_special_tokens=False)) for r in rows for t, _ in row_segments(r)) + 6
    answers, prompts = _masked(pack_rows(rows, tokenizer, total), tokenizer)
    assert answers == "34" + "7" + "    return 1\n    return 2\n" + "import os\nx = 1\n"
    assert prompts == "Be brief.Add 1 and 2.And 2 and 2?" + "Name a prime." + "def f():\ndef g():\n"


def test_chat_template_marks_exactly_the_assistant_tokens(tokenizer):
    """SmolLM2's ChatML template: the answer tokens are each assistant turn's content and its
    ``<|im_end|>\\n``, the role headers and all other turns are prompt. The chats' tokens are those of
    tokenising the whole rendering; an answer starting with spaces is tokenised apart from the header's
    newline, as it is at generation time after the prompt."""
    rows = EXPECTED["chat"] + EXPECTED["prompt_completion"]
    convs = [r["messages"] for r in EXPECTED["chat"]] + [
        [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        for r in EXPECTED["prompt_completion"]]
    rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
    whole = [tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id] for r in rendered[:2]]
    chats = pack_rows(rows[:2], tokenizer, sum(map(len, whole)), chat_template=True)
    assert chats.input_ids.flatten().tolist() == [t for w in whole for t in w]
    total = sum(len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in rendered) + 2  # 2 split newlines
    packed = pack_rows(rows, tokenizer, total, chat_template=True)
    assert tokenizer.decode(packed.input_ids.flatten()) == "<|im_end|>".join(rendered) + "<|im_end|>"
    ids, mask = packed.input_ids.flatten(), packed.answer_mask.flatten()
    answers, prompts = tokenizer.decode(ids[mask]), tokenizer.decode(ids[~mask])
    assistant = [t["content"] for c in convs for t in c if t["role"] == "assistant"]
    ends = "".join(a + "<|im_end|>\n" + "<|im_end|>" * (t["role"] == "assistant" and t is c[-1])  # + packing's EOS
                   for c in convs for t in c for a in [t["content"]] if t["role"] == "assistant")
    assert answers == ends and ends.count("<|im_end|>") == len(assistant) + len(convs)
    assert "<|im_start|>assistant\n" in prompts and "Add 1 and 2." in prompts
    assert prompts.count("<|im_start|>assistant\n") == len(assistant)
    # plain text has no turns: it stays raw text, all answer
    text = pack_rows(EXPECTED["text"], tokenizer, 4, chat_template=True)
    assert text.answer_mask.all()


def test_rlvr_prompts_come_from_the_same_formats(tmp_path, tokenizer):
    code = _write(tmp_path / "c.jsonl", [{"prompt": "Write one().\n", "reference": "def one():\n    return 1\n",
                                          "tests": ["assert one() == 1"]}])
    chat = _write(tmp_path / "cc.jsonl", [{"messages": [{"role": "user", "content": "Write two()."}],
                                           "reference": "def two():\n    return 2\n", "tests": ["assert two() == 2"]}])
    rows = [r for f in (code, chat) for r in load_rows({"kind": "local", "files": str(f)}, "qa_code")]
    assert rows[0] == {"question": "Write one().\n", "answer": "def one():\n    return 1\n",
                       "tests": ["assert one() == 1"]}
    assert rows[1]["question"] == "Write two()." and rows[1]["answer"] == "def two():\n    return 2\n"
    kept, ids = select_prompts(rows, "qa_code", tokenizer, 1024, check_references=True)
    assert kept == rows and ids == [tokenizer.encode(q, add_special_tokens=False)
                                    for q in ("Write one().\n", "Write two().")]

    chat = _write(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "Say yes in German."}],
                                          "reference": "Ja", "target_lang": "de"}])
    rows = load_rows({"kind": "local", "files": str(chat)}, "translation")
    assert rows[0]["answer"] == "Ja" and rows[0]["target_lang"] == "de"
    kept, ids = select_prompts(rows, "translation", tokenizer, 1024, check_references=True, chat_template=True)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Say yes in German."}],
                                             tokenize=False, add_generation_prompt=True)
    assert ids == [tokenizer.encode(expected, add_special_tokens=False)]
