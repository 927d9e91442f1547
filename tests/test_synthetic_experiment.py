"""The synthetic testbed's driver end to end (cut-down settings), and the orderings its report claims."""

import json
from pathlib import Path

import numpy as np

import pytest

from experiments.synthetic import report
from experiments.synthetic.__main__ import main

RESULTS = Path(__file__).resolve().parents[1] / "results" / "synthetic"


def read_claims(out: Path) -> list[dict]:
    return json.loads((out / report.CLAIMS_FILE).read_text())


def check_claims(claims: list[dict], tests: dict[str, list[dict]]) -> list[str]:
    """The claims whose ordering does not hold (point estimate of the paired difference) in ``tests``;
    claims about variants or metrics ``tests`` does not have are skipped."""
    broken = []
    for c in claims:
        if c["variant"] not in tests or c["reference"] not in tests:
            continue
        a, b = report.seed_mean(tests[c["variant"]]), report.seed_mean(tests[c["reference"]])
        if c["metric"] not in a:
            continue
        diff = float(np.mean(a[c["metric"]] - b[c["metric"]]))
        if (diff < 0) != (c["sign"] == "lower"):
            broken.append(f"{c['variant']} - {c['reference']} on {c['metric']}: claimed {c['sign']}, "
                          f"measured {diff:+.5f}")
    return broken


@pytest.mark.slow
def test_quick_driver_keeps_the_claimed_orderings(tmp_path):
    """``python -m experiments.synthetic --quick`` runs every stage, writes the report, and every
    ordering that results/synthetic/claims.json claims (a paired 95% interval excluding 0 in the full
    run) holds in the quick run's point estimates for the variants and metrics it has."""
    claims = read_claims(RESULTS)
    result = main(["--quick", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "README.md").read_text()
    assert "## Verdict" in text and (tmp_path / "out" / "horizons.png").is_file()
    assert check_claims(claims, result["tests"]) == []
    # resumable: a second call finds every run and evaluation on disk
    again = main(["--quick", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert json.dumps(again["summary"]) == json.dumps(result["summary"])    # NaN cells compare as text
