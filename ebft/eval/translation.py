"""Translation metrics: sacreBLEU BLEU and chrF, sentence BLEU (the RLVR reward),
best-of-k aggregation, and COMET-22 run out of process.

BLEU uses sacreBLEU's ``13a`` tokenizer, and its ``zh`` tokenizer when the
target language is Chinese (``zh``, ``zh_Hans``, ``zh-TW``...). Scores are on
sacreBLEU's 0-100 scale. COMET needs torch and a model download of its own, so
it runs in a separate Python environment given by ``comet_python``.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import sacrebleu
from sacrebleu.metrics import BLEU, CHRF

COMET_MODEL = "Unbabel/wmt22-comet-da"
COMET_HOWTO = ("COMET needs its own environment: python -m venv ~/comet-env && ~/comet-env/bin/pip install "
               "unbabel-comet; then set eval.comet_python=~/comet-env/bin/python")


class MetricUnavailable(RuntimeError):
    """A metric that cannot be computed here; the message says how to set it up."""


def bleu_tokenizer(target_lang: str) -> str:
    """sacreBLEU tokenizer for a target language code: ``zh`` for Chinese, else ``13a``."""
    return "zh" if target_lang.lower().replace("-", "_").split("_")[0] == "zh" else "13a"


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str], target_lang: str | Sequence[str]) -> float:
    """Corpus BLEU of hypotheses against one reference each.

    ``target_lang`` is one language, or one per pair: then each pair is tokenised with its own
    language's tokenizer and the n-gram statistics of all pairs are summed into one corpus score
    (what sacreBLEU does within one language; the same number when all pairs share a tokenizer).
    """
    _same_length(hyps, refs)
    if isinstance(target_lang, str):
        return BLEU(tokenize=bleu_tokenizer(target_lang)).corpus_score(list(hyps), [list(refs)]).score
    _same_length(hyps, target_lang)
    tokenizers = {name: BLEU(tokenize=name).tokenizer for name in {bleu_tokenizer(t) for t in target_lang}}
    split = [tokenizers[bleu_tokenizer(t)] for t in target_lang]
    return BLEU(tokenize="none").corpus_score([f(h) for f, h in zip(split, hyps)],
                                              [[f(r) for f, r in zip(split, refs)]]).score


def corpus_chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (sacreBLEU defaults: character 6-grams, beta 2)."""
    _same_length(hyps, refs)
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


def oracle_indices(scores_per_instance: Sequence[Sequence[float]], k: int) -> list[int]:
    """Per instance, the index of the best of its first ``k`` samples (e.g. by COMET,
    to report the BLEU of the COMET-oracle sample)."""
    if k < 1:
        raise ValueError(f"best-of-k needs k >= 1, got {k}")
    short = [i for i, s in enumerate(scores_per_instance) if len(s) < k]
    if short:
        raise ValueError(f"best-of-{k} needs {k} samples per instance; instance {short[0]} has "
                         f"{len(scores_per_instance[short[0]])}")
    return [max(range(k), key=lambda j: scores[j]) for scores in scores_per_instance]


def best_of_k(scores_per_instance: Sequence[Sequence[float]], k: int) -> float:
    """Per-instance maximum over the first ``k`` samples, averaged over instances (the paper's best-of-k)."""
    if not scores_per_instance:
        raise ValueError("best_of_k needs at least one instance")
    best = oracle_indices(scores_per_instance, k)
    return sum(s[j] for s, j in zip(scores_per_instance, best)) / len(best)


_COMET_SCRIPT = """\
import json, sys
try:
    from comet import download_model, load_from_checkpoint
except ImportError as err:
    sys.stderr.write(f"unbabel-comet is not installed in this environment: {err}\\n")
    sys.exit(3)
request = json.load(open(sys.argv[1]))
model = load_from_checkpoint(download_model(request["model"]))
data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(request["srcs"], request["hyps"], request["refs"])]
output = model.predict(data, batch_size=request["batch_size"], gpus=request["gpus"], progress_bar=False)
json.dump([float(x) for x in output.scores], open(sys.argv[2], "w"))
"""


def comet_scores(srcs: Sequence[str], hyps: Sequence[str], refs: Sequence[str], comet_python: str | None = None,
                 model: str = COMET_MODEL, batch_size: int = 32, gpus: int = 0) -> list[float]:
    """Segment-level COMET scores, computed by ``comet_python`` (an interpreter with
    ``unbabel-comet`` installed) in a subprocess. Raises ``MetricUnavailable`` with
    the setup steps when it is not configured or fails."""
    _same_length(hyps, refs)
    _same_length(srcs, hyps)
    if not comet_python:
        raise MetricUnavailable(f"COMET is not configured. {COMET_HOWTO}")
    if not Path(comet_python).expanduser().is_file():
        raise MetricUnavailable(f"comet_python={comet_python} does not exist. {COMET_HOWTO}")
    with tempfile.TemporaryDirectory(prefix="ebft-comet-") as tmp:
        request, result = Path(tmp, "request.json"), Path(tmp, "scores.json")
        request.write_text(json.dumps({"srcs": list(srcs), "hyps": list(hyps), "refs": list(refs),
                                       "model": model, "batch_size": batch_size, "gpus": gpus}))
        proc = subprocess.run([str(Path(comet_python).expanduser()), "-c", _COMET_SCRIPT, str(request), str(result)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            raise MetricUnavailable(f"COMET failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}\n"
                                    f"{COMET_HOWTO}")
        return json.loads(result.read_text())


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"need one reference (and source) per hypothesis, got {len(a)} and {len(b)}")
