"""Prompt data for RLVR: each training row's ``question`` is a prompt, served with the row its
verifier needs.

Split and validation (``ebft.data.datamodule.PromptDataModule``): the rows are split by the one
held-out pipeline (``ebft.data.heldout``) exactly as the chunk data, and validation CE runs on the
same packed held-out chunks, so the validation curves of SFT, EBFT and RLVR are comparable.

Prompt format: the question tokenised without special tokens, nothing added (the packed chunks
join question and answer the same way), so the completion plays the answer's part; with
``data.chat_template=true`` the turns before the answer rendered with the tokenizer's chat template
and its generation prompt (``ebft.data.formats.prompt_text``). Rows of ``data=local`` / ``data=hub``
in any format of ``ebft.data.formats`` carry ``tests`` (code) or a reference answer (translation):

- stdlib Q&A rows (``test_type="doctest"``): the prompt is the ``def`` line and docstring, the
  completion is the body; the verifier runs ``question + body`` and then the docstring's examples.
  The examples and the body use the names of the function's module (``os``, private helpers), so
  such a row gets a ``test_setup`` that copies that module's namespace into the program, all but
  the function itself (``with_module_namespace``).
- MBPP rows: the prompt is the task text and its asserts, the completion a whole solution.
- translation rows: the ALMA prompt; the whole completion is scored by sentence BLEU.

Training prompts are the training rows that have a verifier (code: unit tests or doctests;
translation: a reference and a target language), whose reference answer earns the full reward
1.0 while the empty completion does not (``method.check_references``; drops rows whose tests
cannot pass here or pass without the solution), and whose prompt fits in
``method.max_prompt_tokens``. Every drop is counted in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from ebft.config import DataConfigError
from ebft.data.formats import prompt_text
from ebft.data.packing import leading_special_ids
from ebft.objectives.verifiable import RewardFn, code_problem, reward_fn_for

log = logging.getLogger(__name__)

_NAMESPACE_SETUP = (
    "import importlib as _importlib\n"
    "globals().update({{_k: _v for _k, _v in vars(_importlib.import_module({module!r})).items()\n"
    "                  if not _k.startswith('__') and _k != {entry_point!r}}})\n")


def with_module_namespace(row: dict) -> dict:
    """A standard-library doctest row (with ``module`` and ``entry_point``) with a ``test_setup``
    that gives the program its module's globals, except the function under test; other rows as given."""
    if row.get("test_type") != "doctest" or not row.get("module") or row.get("test_setup"):
        return row
    setup = _NAMESPACE_SETUP.format(module=row["module"], entry_point=row.get("entry_point", ""))
    return {**row, "test_setup": setup}


def has_verifier(row: dict, task: str) -> bool:
    """Whether the task's verifier can score completions of ``row`` (code: tests; translation: a reference)."""
    if task == "qa_code":
        try:
            code_problem(row)
        except ValueError:
            return False
        return True
    if task == "translation":
        return bool(row.get("answer", "").strip()) and bool(row.get("target_lang"))
    raise DataConfigError(f"task '{task}' has no verifiable reward; RLVR runs on qa_code or translation")


def informative(rows: Sequence[dict], reward_fn: RewardFn) -> list[bool]:
    """Per row: its reference ``answer`` earns the full reward 1.0 (up to float rounding: BLEU of an
    exact match is 1.0000000000000004) and the empty completion does not."""
    rewards = reward_fn([r["answer"] for r in rows] + [""] * len(rows), [*rows, *rows])
    full = 1.0 - 1e-9
    return [ref >= full > empty for ref, empty in zip(rewards[:len(rows)], rewards[len(rows):])]


def select_prompts(rows: Sequence[dict], task: str, tokenizer, max_prompt_tokens: int,
                   check_references: bool, chat_template: bool = False) -> tuple[list[dict], list[list[int]]]:
    """Training rows and their prompt token ids, after the filters of the module docstring (the
    sandbox runs of ``check_references`` last, on the rows the cheap filters kept)."""
    counts = {"rows": len(rows)}
    rows = [with_module_namespace(r) for r in rows if has_verifier(r, task)]
    counts["without a verifier"] = counts["rows"] - len(rows)
    prompts = [prompt_text(r, tokenizer, chat_template) for r in rows]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"] if rows else []
    keep = [0 < len(ids) <= max_prompt_tokens for ids in encoded]
    counts[f"empty or longer than {max_prompt_tokens} tokens"] = keep.count(False)
    lead = [] if chat_template else leading_special_ids(tokenizer)
    rows, encoded = [r for r, k in zip(rows, keep) if k], [lead + e for e, k in zip(encoded, keep) if k]
    if check_references and rows:
        keep = informative(rows, reward_fn_for(task))
        counts["reference fails or empty passes"] = keep.count(False)
        rows, encoded = [r for r, k in zip(rows, keep) if k], [e for e, k in zip(encoded, keep) if k]
    dropped = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "rows")
    log.info("rlvr prompts: %d of %d training rows (dropped: %s)", len(rows), counts["rows"], dropped)
    if not rows:
        raise DataConfigError(f"no RLVR prompt is left of {counts['rows']} training rows ({dropped}); "
                              "use rows with unit tests (e.g. data.mbpp_path=<mbpp.jsonl>) or more data")
    return rows, encoded


class PromptDataset(Dataset):
    """Item ``i``: ``{"prompt_ids": list of token ids, "row": the row}``."""

    def __init__(self, rows: list[dict], prompt_ids: list[list[int]]):
        self.rows, self.prompt_ids = rows, prompt_ids

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"prompt_ids": self.prompt_ids[i], "row": self.rows[i]}


def left_pad_collate(pad_id: int) -> Callable[[list[dict]], dict]:
    """Collate prompts into ``prompt_ids``/``prompt_mask`` (B, P_max), padded on the left, and ``rows``."""

    def collate(items: list[dict]) -> dict:
        width = max(len(it["prompt_ids"]) for it in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):
            length = len(it["prompt_ids"])
            ids[i, width - length:] = torch.tensor(it["prompt_ids"], dtype=torch.long)
            mask[i, width - length:] = 1
        return {"prompt_ids": ids, "prompt_mask": mask, "rows": [it["row"] for it in items]}

    return collate
