"""The row formats of ``data=local`` / ``data=hub`` files, and the masked segments a row is packed as.

``data.format`` (null = detected from the columns, in this order):

- ``chat``: ``messages``, a list of ``{role, content}`` turns (roles system / user / assistant;
  a JSON string in a csv cell is decoded);
- ``prompt_completion``: ``prompt`` and ``completion`` columns;
- ``fields``: our ``question`` / ``answer`` fields, or any columns mapped onto them with
  ``data.fields`` or a known dataset's preset (``data.name``);
- ``text``: one ``text`` column of plain text (all of it is answer).

Every format keeps the optional columns ``tests``, ``test_type``, ``test_setup``, ``entry_point``,
``source_lang`` and ``target_lang`` for the verifiers, and takes ``reference`` as the answer
of a prompt-only row (RLVR needs a prompt plus ``tests`` or a ``reference``). A row becomes
``{question, answer, ...}``: for a chat, ``answer`` is the last assistant turn and ``question``
everything before it, and the turns are kept as ``messages`` so that packing marks every
assistant turn as answer.

Packing (paper section on data: question and answer joined with no template) turns a row into
segments ``(text, is_answer)``: ``(question, False), (answer, True)``, or per chat turn
``(content, role == "assistant")``. With ``data.chat_template=true`` a row's turns (a prompt /
completion row is one user and one assistant turn) are rendered with the tokenizer's chat
template instead; an assistant segment is what the template adds after the generation prompt,
i.e. the turn's content and its end-of-turn marker, so exactly the assistant's tokens are
marked (the role header belongs to the prompt). Segments are tokenised apart, so a prompt
ends on the same token as the generation prompt does when the model is sampled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from ebft.config import DataConfigError

FORMATS = ("chat", "prompt_completion", "fields", "text")
EXTRA_FIELDS = ("tests", "test_type", "test_setup", "entry_point", "source_lang", "target_lang")
ROLES = ("system", "user", "assistant")
EXPECTED = {"chat": "messages (a list of {role, content} turns ending with an assistant turn, "
                    "or a prompt-only chat with a reference)",
            "prompt_completion": "prompt, and completion or reference",
            "text": "text"}


def detect_format(columns: Sequence[str], fmt: str | None, mapped: bool) -> str:
    """``data.format`` checked, or (null) the format the columns show; ``mapped`` = a preset or
    ``data.fields`` maps columns onto our fields."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataConfigError(f"data.format='{fmt}' is not one of {list(FORMATS)} (null = from the columns)")
        return fmt
    if mapped:
        return "fields"
    cols = set(columns)
    if "messages" in cols:
        return "chat"
    if "prompt" in cols and cols & {"completion", "reference"}:
        return "prompt_completion"
    if {"question", "answer"} <= cols:
        return "fields"
    if "text" in cols:
        return "text"
    raise DataConfigError(
        f"cannot tell the data format from the columns {sorted(cols)}: expected messages (chat), prompt + "
        "completion, 'question' + 'answer' (or map yours: data.fields.question=<column> "
        "data.fields.answer=<column>), or text; or set data.format")


def _bad_row(index: int, record: Mapping, fmt: str, why: str) -> DataConfigError:
    found = sorted(k for k, v in record.items() if v is not None)
    return DataConfigError(f"row {index} ({fmt} format): {why}; fields found: {found}; expected: {EXPECTED[fmt]}")


def _messages(value, index: int, record: Mapping) -> list[dict]:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise _bad_row(index, record, "chat", f"messages is not valid JSON ({err})") from None
    if not isinstance(value, list) or not value:
        raise _bad_row(index, record, "chat", "messages is missing or not a non-empty list")
    turns = []
    for t, turn in enumerate(value):
        if (not isinstance(turn, Mapping) or turn.get("role") not in ROLES
                or not isinstance(turn.get("content"), str)):
            raise _bad_row(index, record, "chat", f"turn {t} is not a {{role: {'/'.join(ROLES)}, content: text}} "
                                                  f"mapping ({turn!r:.80})")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def format_row(record: Mapping, fmt: str, index: int) -> dict:
    """Row ``index`` of a ``chat`` / ``prompt_completion`` / ``text`` table as ``{question, answer, ...}``."""
    row = {k: record[k] for k in EXTRA_FIELDS if record.get(k) is not None}
    reference = record.get("reference")
    if fmt == "text":
        if not isinstance(record.get("text"), str):
            raise _bad_row(index, record, fmt, "text is missing or not a string")
        return {**row, "question": "", "answer": record["text"]}
    if fmt == "prompt_completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        completion = reference if completion is None else completion
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise _bad_row(index, record, fmt, "prompt or completion is missing or not a string")
        return {**row, "question": prompt, "answer": completion}
    turns = _messages(record.get("messages"), index, record)
    if turns[-1]["role"] == "assistant":
        prompt_turns, answer = turns[:-1], turns[-1]["content"]
    elif isinstance(reference, str):
        prompt_turns, answer = turns, reference
    else:
        raise _bad_row(index, record, fmt, f"the last turn is {turns[-1]['role']!r}, not 'assistant', "
                                           "and there is no reference")
    question = "".join(t["content"] for t in prompt_turns)
    return {**row, "question": question, "answer": answer, "messages": prompt_turns + [
        {"role": "assistant", "content": answer}]}


def _template(tokenizer, turns: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def chat_turns(row: Mapping) -> list[dict] | None:
    """The turns a row stands for: its ``messages``, or one user + one assistant turn (None for plain text)."""
    if row.get("messages"):
        return list(row["messages"])
    if not row["question"]:
        return None
    return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]


def templated_segments(tokenizer, turns: list[dict]) -> list[tuple[str, bool]]:
    """``turns`` rendered with the tokenizer's chat template as ``(text, is_assistant)`` segments.

    Each assistant turn ``i`` is the text ``render(turns[:i+1])`` adds to
    ``render(turns[:i], add_generation_prompt=True)``; the text between is prompt.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataConfigError("data.chat_template=true but the tokenizer has no chat template; "
                              "use data.chat_template=false (raw text, as the paper) or a model with one")
    segments, done = [], ""
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt = _template(tokenizer, turns[:i], True)
        full = _template(tokenizer, turns[:i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataConfigError("the tokenizer's chat template does not render a conversation as the "
                                  "concatenation of its prefixes, so assistant turns cannot be marked; "
                                  "use data.chat_template=false")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


def row_segments(row: Mapping, tokenizer=None, chat_template: bool = False) -> list[tuple[str, bool]]:
    """The ``(text, is_answer)`` segments packing joins for ``row`` (module docstring)."""
    turns = chat_turns(row)
    if chat_template and turns is not None:
        return templated_segments(tokenizer, turns)
    if row.get("messages"):
        return [(t["content"], t["role"] == "assistant") for t in row["messages"]]
    return [(row["question"], False), (row["answer"], True)]


def prompt_text(row: Mapping, tokenizer=None, chat_template: bool = False) -> str:
    """The prompt a completion of ``row`` continues: ``question``, or the templated turns before the
    answer followed by the generation prompt."""
    turns = chat_turns(row)
    if chat_template and turns is not None:
        return "".join(text for text, _ in templated_segments(tokenizer, turns)[:-1])
    return row["question"]
