"""The synthetic testbed's driver end to end (cut-down settings), and the orderings its report claims."""

import json
from pathlib import Path

import pytest

from experiments.synthetic import report
from experiments.synthetic.__main__ import main

RESULTS = Path(__file__).resolve().parents[1] / "results" / "synthetic"


@pytest.mark.slow
def test_quick_driver_keeps_the_claimed_orderings(tmp_path):
    """``python -m experiments.synthetic --quick`` runs every stage, writes the report, and every
    ordering that results/synthetic/claims.json claims (a paired 95% interval excluding 0 in the full
    run) holds in the quick run's point estimates for the variants and metrics it has."""
    claims = report.read_claims(RESULTS)
    result = main(["--quick", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "README.md").read_text()
    assert "## Verdict" in text and (tmp_path / "out" / "horizons.png").is_file()
    assert report.check_claims(claims, result["tests"]) == []
    # resumable: a second call finds every run and evaluation on disk
    again = main(["--quick", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert json.dumps(again["summary"]) == json.dumps(result["summary"])    # NaN cells compare as text
