"""Translation metrics agree with sacreBLEU; best-of-k; COMET out of process."""

import importlib.util
import random
import sys

import pytest
import sacrebleu

from ebft.eval.translation import MetricUnavailable, best_of_k, comet_scores, oracle_indices
from ebft.execution.bleu import bleu_tokenizer, corpus_bleu, corpus_chrf, sentence_bleu

HYPS = ["The cat sat on the mat.", "He read the book yesterday evening.", "It is raining today."]
REFS = ["The cat sat on the mat.", "Yesterday evening he read a book.", "Today it rains."]
ZH_HYP, ZH_REF = "我们今天去公园散步。", "今天我们去公园散步。"


def test_corpus_bleu_equals_sacrebleu():
    assert corpus_bleu(HYPS, REFS, "en") == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert corpus_bleu(REFS, REFS, "de") == pytest.approx(100.0)
    assert 0 < corpus_bleu(HYPS, REFS, "en") < 100


def test_chinese_targets_use_the_zh_tokenizer():
    assert [bleu_tokenizer(x) for x in ("zh", "zh_Hans", "zh-TW", "ZH", "de", "cs", "en")] == \
        ["zh", "zh", "zh", "zh", "13a", "13a", "13a"]
    zh = corpus_bleu([ZH_HYP], [ZH_REF], "zh")
    assert zh == pytest.approx(sacrebleu.corpus_bleu([ZH_HYP], [[ZH_REF]], tokenize="zh").score)
    assert zh > 0 == corpus_bleu([ZH_HYP], [ZH_REF], "en")  # 13a sees one unmatched "word"
    assert sentence_bleu(ZH_HYP, ZH_REF, "zh") == pytest.approx(
        sacrebleu.sentence_bleu(ZH_HYP, [ZH_REF], tokenize="zh").score)


def test_sentence_bleu_equals_sacrebleu_with_effective_order():
    for hyp, ref in zip(HYPS, REFS):
        assert sentence_bleu(hyp, ref, "en") == pytest.approx(sacrebleu.sentence_bleu(hyp, [ref]).score)
    # two-word hypothesis: no 3/4-gram matches, still non-zero thanks to effective order
    assert sentence_bleu("the cat", "the cat sat", "en") > 0


def test_corpus_chrf_equals_sacrebleu():
    assert corpus_chrf(HYPS, REFS) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)


def test_length_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="one reference"):
        corpus_bleu(HYPS, REFS[:2], "en")


def test_best_of_k_is_the_mean_per_instance_maximum():
    scores = [[0.1, 0.9, 0.3, 0.2], [0.5, 0.4, 0.8, 0.1]]
    assert best_of_k(scores, 1) == pytest.approx((0.1 + 0.5) / 2)
    assert best_of_k(scores, 2) == pytest.approx((0.9 + 0.5) / 2)
    assert best_of_k(scores, 4) == pytest.approx((0.9 + 0.8) / 2)
    assert oracle_indices(scores, 4) == [1, 2]
    with pytest.raises(ValueError, match="samples per instance"):
        best_of_k(scores, 5)
    with pytest.raises(ValueError):
        best_of_k(scores, 0)


def test_best_of_k_never_below_best_of_1():
    rng = random.Random(0)
    scores = [[rng.random() for _ in range(16)] for _ in range(50)]
    values = [best_of_k(scores, k) for k in range(1, 17)]
    assert all(later >= earlier for earlier, later in zip(values, values[1:]))
    assert values[-1] > values[0]


def test_comet_unconfigured_or_missing_says_how_to_set_it_up(tmp_path):
    with pytest.raises(MetricUnavailable, match="pip install unbabel-comet"):
        comet_scores(["a"], ["b"], ["c"])
    with pytest.raises(MetricUnavailable, match="does not exist"):
        comet_scores(["a"], ["b"], ["c"], comet_python=str(tmp_path / "nope" / "python"))


@pytest.mark.skipif(importlib.util.find_spec("comet") is not None, reason="unbabel-comet is installed here")
def test_comet_without_the_package_is_unavailable():
    with pytest.raises(MetricUnavailable, match="not installed"):
        comet_scores(["a"], ["b"], ["c"], comet_python=sys.executable)


def test_comet_round_trip_through_a_separate_interpreter(tmp_path):
    """A stand-in ``comet`` package behind a wrapper interpreter: the request goes out,
    scores come back in order, and the model name is passed through."""
    package = tmp_path / "site" / "comet"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "class _Out:\n    def __init__(self, scores):\n        self.scores = scores\n\n"
        "class _Model:\n    def predict(self, data, batch_size, gpus, progress_bar):\n"
        "        print('noise on stdout')\n"
        "        return _Out([len(d['mt']) / 10 + (d['src'] == d['ref']) for d in data])\n\n"
        "def download_model(name):\n    assert name == 'Unbabel/wmt22-comet-da', name\n    return '/ckpt'\n\n"
        "def load_from_checkpoint(path):\n    return _Model()\n")
    wrapper = tmp_path / "comet-python"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path / 'site'} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    scores = comet_scores(["x", "same"], ["abc", "abcdefghij"], ["y", "same"], comet_python=str(wrapper))
    assert scores == pytest.approx([0.3, 2.0])
    with pytest.raises(MetricUnavailable, match="COMET failed"):
        comet_scores(["x"], ["a"], ["y"], comet_python=str(wrapper), model="other/model")


def test_corpus_bleu_over_several_target_languages_sums_their_statistics():
    hyps, refs = ["the cat sat on the mat", "heute gehen wir"], ["the cat sat on a mat", "heute gehen wir nicht"]
    assert corpus_bleu(hyps, refs, ["en", "de"]) == pytest.approx(corpus_bleu(hyps, refs, "en"))
    zh_hyp, zh_ref = "我们今天去公园散步。", "今天我们去公园散步。"
    assert corpus_bleu([zh_hyp], [zh_ref], ["zh"]) == pytest.approx(corpus_bleu([zh_hyp], [zh_ref], "zh"))
    assert corpus_bleu([zh_hyp], [zh_ref], "en") == 0.0  # one 13a token each: no n-gram matches
    mixed = corpus_bleu([hyps[0], zh_hyp], [refs[0], zh_ref], ["en", "zh"])
    tokens = sacrebleu.metrics.BLEU(tokenize="zh").tokenizer
    by_hand = sacrebleu.corpus_bleu([hyps[0], tokens(zh_hyp)], [[refs[0], tokens(zh_ref)]], tokenize="13a").score
    assert mixed == pytest.approx(by_hand) and mixed > 0
