"""Batched text generation for downstream evaluation: a greedy completion and ``n`` samples per prompt.

Prompts are tokenised as the training chunks' examples are (the tokenizer's own leading special
tokens, e.g. Llama-3.2's BOS, then the text without special tokens), left-padded into one
batch and completed with ``model.generate`` and the KV cache. Sampling draws from
``softmax(logits / temperature)`` restricted to the top-p nucleus (no top-k cut); the paper's
downstream evaluation states temperature 0.6 and no nucleus, so ``top_p`` defaults to 1.0 (the
full distribution). A prompt's completion ends at EOS, after
``max_new_tokens`` tokens, or as soon as its ``done(text)`` predicate holds for the text generated
so far (e.g. a stop sequence appeared); each sequence of the batch stops on its own.

The draws come from a ``torch`` RNG seeded per call inside ``torch.random.fork_rng``, so a fixed
``seed`` gives the same samples for the same model and the caller's RNG state is left untouched.

Every call states its whole decoding (:func:`decoding`): greedy is ``do_sample=False`` (argmax at
every step), sampling is ``do_sample=True`` with the given temperature and top-p and no top-k.
Nothing comes from the checkpoint's ``generation_config`` (transformers fills every field a call
leaves unset from it, and e.g. Llama-3.2-1B ships ``do_sample=True, temperature=0.6, top_p=0.9``):
during the call the model's generation config is a neutral ``GenerationConfig()``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ebft.config import DecodingSettings
from ebft.data.packing import leading_special_ids

Done = Callable[[str], bool]
"""Whether a completion is finished, judged on its decoded text so far."""


@dataclass(frozen=True)
class Completions:
    """The greedy completion and the sampled ones of one prompt (raw generated text)."""

    greedy: str
    samples: list[str]


class _TextDone(StoppingCriteria):
    """Per-sequence stop: decode each unfinished sequence's new tokens and ask its ``done`` predicate."""

    def __init__(self, tokenizer, prompt_len: int, done: Sequence[Done]):
        self.tokenizer, self.prompt_len, self.done = tokenizer, prompt_len, list(done)
        self.finished = [False] * len(self.done)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        open_rows = [i for i, f in enumerate(self.finished) if not f]
        texts = self.tokenizer.batch_decode(input_ids[open_rows, self.prompt_len:], skip_special_tokens=True)
        for i, text in zip(open_rows, texts):
            self.finished[i] = self.done[i](text)
        return torch.tensor(self.finished, dtype=torch.bool, device=input_ids.device)


def left_padded(tokenizer, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (batch, L) of ``prompts``, padded on the left."""
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("an empty prompt cannot be completed; drop it from the benchmark")
    lead = leading_special_ids(tokenizer)
    encoded = [lead + e for e in encoded]
    width = max(map(len, encoded))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    return ids, mask


def decoding(temperature: float, top_p: float) -> dict:
    """The full decoding of a call: greedy when ``temperature == 0``, else nucleus sampling."""
    if temperature == 0:
        return {"do_sample": False, "num_beams": 1}
    return {"do_sample": True, "num_beams": 1, "temperature": temperature, "top_p": top_p, "top_k": 0}


@contextmanager
def _neutral_generation_config(model):
    """The model's ``generation_config`` is the library default while inside (restored after), so a
    call's unset fields cannot be filled from the checkpoint's sampling defaults."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def generate(model, tokenizer, prompts: Sequence[str], *, num_return: int, temperature: float, top_p: float,
             max_new_tokens: int, seed: int, done: Sequence[Done] | None = None) -> list[list[str]]:
    """``num_return`` completions per prompt (greedy when ``temperature == 0``), as decoded text.

    ``done`` holds one predicate per prompt (None: stop at EOS or ``max_new_tokens`` only).
    """
    ids, mask = left_padded(tokenizer, prompts, next(model.parameters()).device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_return_sequences=num_return, use_cache=True,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              **decoding(temperature, top_p))
    stops = None
    if done is not None:
        per_row = [d for d in done for _ in range(num_return)]
        stops = StoppingCriteriaList([_TextDone(tokenizer, ids.shape[1], per_row)])
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []), \
                torch.inference_mode(), _neutral_generation_config(model):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                 stopping_criteria=stops)
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return [texts[i * num_return:(i + 1) * num_return] for i in range(len(prompts))]


def complete(model, tokenizer, prompts: Sequence[str], sampling: DecodingSettings, done: Sequence[Done] | None = None,
             call_index: int = 0) -> list[Completions]:
    """Greedy completion plus ``sampling.num_samples`` samples for each prompt (one call each).

    ``call_index`` offsets the seed so successive calls of one evaluation draw independently.
    """
    common = {"max_new_tokens": sampling.max_new_tokens, "top_p": sampling.top_p, "done": done}
    greedy = generate(model, tokenizer, prompts, num_return=1, temperature=0.0, seed=0, **common)
    samples = [[] for _ in prompts]
    if sampling.num_samples:
        samples = generate(model, tokenizer, prompts, num_return=sampling.num_samples,
                           temperature=sampling.temperature, seed=sampling.seed + call_index, **common)
    return [Completions(g[0], s) for g, s in zip(greedy, samples)]
