#!/usr/bin/env python
"""The summary table of ``bench/gpu_check.sh``: one row per gpu-marked test (from pytest's JUnit XML),
one per ``step_cost.py --json`` result (ebft_over_sft, the generator's fwd+bwd MFU) and one per
``memory.py --measure --json`` result (the planned against the measured peak; FAILED beyond 15%).

    python bench/gpu_summary.py --junit OUT/gpu_tests.xml [OUT/qlora_tests.xml ...] \
        --step-cost OUT/step_cost_*.json [--memory OUT/memory_*.json] [--seconds S]

Missing files (a stage that timed out or crashed) become rows saying so, so the table always prints.
Exit status 0 when every test passed or was skipped and every step-cost result exists, else 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def test_rows(junit: Path) -> tuple[list[tuple[str, str, str]], bool]:
    """``(name, outcome, detail)`` per test case of a JUnit XML file, and whether all passed or skipped."""
    if not junit.is_file():
        return [("pytest -m gpu", "MISSING", f"no {junit.name}: the test stage did not finish")], False
    rows, ok = [], True
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "?")
        outcome, detail = "passed", f"{float(case.get('time', 0)):.1f} s"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "FAILED"
                detail = (node.get("message") or node.text or "").strip().splitlines()[0][:120] if (
                    node.get("message") or node.text) else tag
                ok &= tag == "skipped"
                break
        rows.append((name, outcome, detail))
    if not rows:
        return [("pytest -m gpu", "EMPTY", "no test case was collected")], False
    return rows, ok


def step_cost_rows(paths: list[Path]) -> tuple[list[tuple[str, str, str]], bool]:
    rows, ok = [], True
    for path in paths:
        if not path.is_file():
            rows.append((f"step_cost {path.stem}", "MISSING", "no result: the run timed out or failed (see its log)"))
            ok = False
            continue
        r = json.loads(path.read_text())
        mfu = "n/a" if r.get("actor_mfu") is None else f"{r['actor_mfu']:.3f}"
        rows.append((f"step_cost {r['model']} ({r['device']}, {r['attn']}, T={r['T']}, batch {r['batch']})",
                     f"ebft_over_sft={r['ebft_over_sft']:.2f}",
                     f"generator fwd+bwd MFU {mfu} ({r['actor_tflops']:.1f} TFLOP/s); EBFT step "
                     f"{r['ebft_step_s']:.3f} s, SFT step {r['sft_step_s']:.3f} s, peak {r['peak_gib']:.1f} GiB"))
    return rows, ok


def memory_rows(paths: list[Path]) -> tuple[list[tuple[str, str, str]], bool]:
    rows, ok = [], True
    for path in paths:
        if not path.is_file():
            rows.append((f"memory plan {path.stem}", "MISSING", "no result: the run timed out or failed (see its log)"))
            ok = False
            continue
        r = json.loads(path.read_text())
        within = abs(r["error"]) <= r["tolerance"]
        ok &= within
        rows.append((f"memory plan: {r['describe']}", "passed" if within else "FAILED",
                     f"planned {r['planned_gib']:.2f} GiB, measured {r['measured_gib']:.2f} GiB ({r['error']:+.1%}; "
                     f"tolerance {r['tolerance']:.0%})"))
    return rows, ok


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| check | result | detail |", "|---|---|---|"]
    lines += [f"| {name} | {outcome} | {detail.replace('|', '/')} |" for name, outcome, detail in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--junit", type=Path, nargs="+", required=True, help="pytest --junitxml files of the gpu tests")
    p.add_argument("--step-cost", type=Path, nargs="*", default=[], help="step_cost.py --json files")
    p.add_argument("--memory", type=Path, nargs="*", default=[], help="memory.py --measure --json files")
    p.add_argument("--seconds", type=float, default=None, help="wall time of the whole check")
    args = p.parse_args(argv)
    tests, tests_ok = [], True
    for junit in args.junit:
        rows, ok = test_rows(junit)
        tests, tests_ok = tests + rows, tests_ok and ok
    costs, costs_ok = step_cost_rows(args.step_cost)
    memory, memory_ok = memory_rows(args.memory)
    rows = tests + costs + memory
    if args.seconds is not None:
        rows.append(("wall time", f"{args.seconds / 60:.1f} min", "whole check, wheels and compilation included"))
    print(table(rows))
    return 0 if tests_ok and costs_ok and memory_ok else 1


if __name__ == "__main__":
    sys.exit(main())
