"""The known-answer bench's driver end to end (``--quick``), resumable, and the orderings its committed
report claims."""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.synthetic import report
from experiments.synthetic.__main__ import main

RESULTS = Path(__file__).resolve().parents[1] / "results" / "synthetic"


@pytest.mark.slow
def test_quick_bench_runs_resumes_and_keeps_the_claimed_orderings(tmp_path):
    """``python -m experiments.synthetic --quick`` runs every stage and writes the report; a second call
    finds everything on disk; every ordering results/synthetic/claims.json claims (a 95% interval
    excluding 0 in the full run) for a comparison the quick run also makes holds in its point estimate.
    The quick run keeps the controls at their full size, so their claims are replayed; its finite-data
    sizes differ from the full run's, so no finite-data claim is."""
    args = ["--quick", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    result = main(args)
    text = (tmp_path / "out" / "README.md").read_text()
    assert "## Verdict" in text and (tmp_path / "out" / "kl_vs_size.png").is_file()
    again = main(args)
    assert json.dumps(again["tests"]) == json.dumps(result["tests"])
    tests = result["tests"]
    replayed = 0
    for claim in json.loads((RESULTS / report.CLAIMS_FILE).read_text()):
        if claim["variant"] in tests and claim["reference"] in tests:
            diff = np.mean([np.mean(np.subtract(a[claim["metric"]], b[claim["metric"]]))
                            for a, b in zip(tests[claim["variant"]], tests[claim["reference"]])])
            assert (diff < 0) == (claim["sign"] == "lower"), (claim, diff)
            replayed += 1
    assert replayed >= 4                      # the controls' claims at least
