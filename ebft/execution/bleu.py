"""Translation metrics: sacreBLEU BLEU and chrF, and sentence BLEU (the RLVR reward).

BLEU uses sacreBLEU's ``13a`` tokenizer, and its ``zh`` tokenizer when the
target language is Chinese (``zh``, ``zh_Hans``, ``zh-TW``...). Scores are on
sacreBLEU's 0-100 scale.
"""

from __future__ import annotations

from typing import Sequence

import sacrebleu
from sacrebleu.metrics import BLEU, CHRF


def bleu_tokenizer(target_lang: str) -> str:
    """sacreBLEU tokenizer for a target language code: ``zh`` for Chinese, else ``13a``."""
    return "zh" if target_lang.lower().replace("-", "_").split("_")[0] == "zh" else "13a"


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str], target_lang: str | Sequence[str]) -> float:
    """Corpus BLEU of hypotheses against one reference each.

    ``target_lang`` is one language, or one per pair: then each pair is tokenised with its own
    language's tokenizer and the n-gram statistics of all pairs are summed into one corpus score
    (what sacreBLEU does within one language; the same number when all pairs share a tokenizer).
    """
    same_length(hyps, refs)
    if isinstance(target_lang, str):
        return BLEU(tokenize=bleu_tokenizer(target_lang)).corpus_score(list(hyps), [list(refs)]).score
    same_length(hyps, target_lang)
    tokenizers = {name: BLEU(tokenize=name).tokenizer for name in {bleu_tokenizer(t) for t in target_lang}}
    split = [tokenizers[bleu_tokenizer(t)] for t in target_lang]
    return BLEU(tokenize="none").corpus_score([f(h) for f, h in zip(split, hyps)],
                                              [[f(r) for f, r in zip(split, refs)]]).score


def corpus_chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (sacreBLEU defaults: character 6-grams, beta 2)."""
    same_length(hyps, refs)
    return CHRF().corpus_score(list(hyps), [list(refs)]).score


def signatures(target_langs: Sequence[str]) -> dict[str, str]:
    """sacreBLEU's signatures of the scores reported for pairs into ``target_langs``: ``BLEU`` and
    ``chrF`` (the table's columns: per-sentence scores, averaged) and ``corpus BLEU`` (the details'
    ``corpus_greedy``), one per tokenizer (``tok:zh`` for Chinese, ``tok:13a`` else)."""
    def signature(metric) -> str:
        metric.corpus_score(["a"], [["a"]])  # sacreBLEU knows the number of references once it has scored
        return metric.get_signature().format()

    toks = sorted({bleu_tokenizer(lang) for lang in target_langs})
    return {"BLEU": " ; ".join(signature(BLEU(tokenize=t, effective_order=True)) for t in toks),
            "chrF": signature(CHRF()),
            "corpus BLEU": " ; ".join(signature(BLEU(tokenize=t)) for t in toks)}


def sentence_bleu(hyp: str, ref: str, target_lang: str) -> float:
    """Sentence BLEU with effective order (sacreBLEU's ``sentence_bleu``), 0-100."""
    return sacrebleu.sentence_bleu(hyp, [ref], tokenize=bleu_tokenizer(target_lang)).score


def same_length(a: Sequence, b: Sequence) -> None:
    """Raise a ``ValueError`` unless ``a`` and ``b`` pair up one to one (hypotheses with references or sources)."""
    if len(a) != len(b):
        raise ValueError(f"need one reference (and source) per hypothesis, got {len(a)} and {len(b)}")
