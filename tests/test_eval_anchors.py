"""Evaluation scores the anchors training uses: CFM and the FM profile over answer blocks (``eval.anchors``),
within examples with ``data.document_mask``; results record the setting and are paired only on the same."""

import json
import math
from pathlib import Path

import pytest
import torch

from ebft.config import CalibrationSettings, ConfigError, TaskSettings
from ebft.data.packing import PackedChunks
from ebft.eval import report
from ebft.eval.calibration import Estimate, context_fm
from ebft.eval.paired import paired_by_chunk, paired_difference
from ebft.eval.runner import calibrate, check_scored
from ebft.files import write_json
from ebft.models.features import FeatureNetwork
from ebft.core.layout import StridedLayout
from tests.test_answer_training import answer_chunks
from tests.test_evaluate import make_settings

NAN = math.nan
TASK = TaskSettings("qa_code", 32, 4, 4, 4)          # NB = 7; answer blocks k = 1, 2, 5, 6 of answer_chunks
ANSWER = CalibrationSettings(cfm_num_samples=2, profile_lengths=(1, 4), chunk_batch_size=2, anchors="answer")


def chunks(count: int = 3) -> PackedChunks:
    fields = answer_chunks(count)
    ids = torch.randint(0, 256, (count, 32), generator=torch.Generator().manual_seed(4))
    return PackedChunks(ids, fields["answer_mask"], fields["doc_ids"], fields["doc_pos"], fields["last_answer_mask"])


def test_estimate_is_over_the_scored_contexts():
    values = torch.tensor([[1.0, NAN, 3.0], [NAN, NAN, NAN], [4.0, 4.0, 4.0]])
    estimate = Estimate.of(values)
    assert estimate.mean == pytest.approx(3.2)                                # (1 + 3 + 4 * 3) / 5
    assert estimate.se == pytest.approx(torch.tensor([2.0, 4.0]).std().item() / math.sqrt(2))
    full = torch.rand(4, 3)
    assert Estimate.of(full).mean == pytest.approx(full.mean().item())


@pytest.mark.parametrize("document_mask", [False, True])
def test_calibration_scores_the_answer_blocks(tiny_model, document_mask):
    data = chunks()
    network = FeatureNetwork(tiny_model)
    out, profile, units = calibrate(tiny_model, network, data, TASK, ANSWER, ("ce", "cfm", "profile"),
                                    progress=False, document_mask=document_mask)
    cfm = torch.tensor(units["cfm"])
    assert torch.equal(~cfm.isnan(), torch.tensor([[False, True, True, False, False, True, True]] * 3))
    assert out["contexts"] == 12 and out["cfm"] == pytest.approx(cfm.nanmean().item(), abs=1e-6)
    # the scored values are those of all blocks' CFM at the same seed: only the averaging changes
    layout = StridedLayout(*TASK.geometry, 2)
    docs = data.doc_ids if document_mask else None
    every, _ = context_fm(tiny_model, network, data.input_ids, layout, seed=ANSWER.seed, batch_size=2,
                          progress=False, doc_ids=docs)
    scored = ~cfm.isnan()
    torch.testing.assert_close(cfm[scored].double(), every[scored].double(), atol=1e-6, rtol=0)
    # the profile scores the same contexts at every G (the first NB(G_max) blocks)
    assert profile["G"] == [1, 4]
    for g in ("1", "4"):
        assert torch.equal(~torch.tensor(units["profile"][g]).isnan(), scored)


def test_document_masking_changes_what_evaluation_sees(tiny_model):
    data, network = chunks(2), FeatureNetwork(tiny_model)
    plain = calibrate(tiny_model, network, data, TASK, ANSWER, ("ce", "cfm"), progress=False)[0]
    masked = calibrate(tiny_model, network, data, TASK, ANSWER, ("ce", "cfm"), progress=False, document_mask=True)[0]
    assert plain["ce"] != masked["ce"] and plain["cfm"] != masked["cfm"]


def test_too_few_answer_contexts_are_refused_before_any_model():
    data = chunks(1)
    prefix = CalibrationSettings(cfm_num_samples=2, anchors="answer", min_answer_prefix=6)
    check_scored(data, TASK, prefix, ("cfm",))                     # blocks 2 and 6 have 6 answer tokens before
    with pytest.raises(ConfigError, match="eval.anchors=answer leaves 0 context"):
        check_scored(data, TASK, CalibrationSettings(cfm_num_samples=2, anchors="answer", min_answer_prefix=7),
                     ("cfm",))


def test_units_neither_model_scored_are_left_out_of_the_pairing():
    a = torch.tensor([[1.0, NAN, 2.0], [NAN, NAN, NAN], [3.0, 3.5, NAN]])
    b = a - torch.tensor([[0.1, NAN, 0.3], [NAN, NAN, NAN], [0.2, 0.0, NAN]])
    d = paired_difference(a, b, n_permutations=0)
    assert d.n == 4 and d.mean == pytest.approx(0.15)
    assert paired_by_chunk(a, b, n_permutations=0).n == 2
    with pytest.raises(ValueError, match="non-finite"):
        paired_difference(torch.tensor([1.0, NAN]), torch.tensor([1.0, 2.0]))


def _result(root: Path, index: int, name: str, settings: dict, values: torch.Tensor) -> None:
    d = root / f"0{index}-{name}"
    write_json({"model": name, "ckpt": name, "task": "qa_code", "order": [0, index], "settings": settings,
                "calibration": {"cfm": values.nanmean().item()}, "downstream": {}}, d / report.RESULTS_FILE)
    write_json({"cfm": values.tolist()}, d / report.UNITS_FILE)


def test_results_are_paired_only_on_the_same_anchors(tmp_path):
    values = torch.rand(4, 3).masked_fill(torch.tensor([True, False, False]), NAN)
    base = {"seed": 43, "cfm_num_samples": 4, "cfm_temperature": 0.6, "feature_network": "tiny",
            "whitening": "reference", "cfm_skip": 0}
    _result(tmp_path, 0, "old", base, torch.rand(4, 3))                              # before anchors were recorded
    _result(tmp_path, 1, "all", {**base, "anchors": "all", "document_mask": False}, torch.rand(4, 3))
    _result(tmp_path, 2, "answer", {**base, "anchors": "answer", "document_mask": False}, values)
    _result(tmp_path, 3, "answer_docs", {**base, "anchors": "answer", "document_mask": True}, values + 0.1)
    rows, notes = report.paired_rows(report.collect(tmp_path), reference="old")
    assert [r[1] for r in rows] == ["all"]                                           # old results mean anchors=all
    assert any("answer not paired with old: settings differ (anchors)" in n for n in notes)
    rows, notes = report.paired_rows(report.collect(tmp_path), reference="answer")
    assert rows == [] and any("answer_docs not paired" in n and "document_mask" in n for n in notes)
    text = json.loads((tmp_path / "02-answer" / report.UNITS_FILE).read_text())
    assert math.isnan(text["cfm"][0][0])                                             # NaN round-trips through JSON


@pytest.mark.parametrize("overrides,fragment", [
    (["eval.min_answer_prefix=3"], "eval.anchors=all uses every block; set eval.anchors=answer"),
    (["eval.anchors=answers"], "eval.anchors='answers'"),
    (["eval.anchors=answer", "task.seq_len=32", "eval.min_answer_prefix=30"], "eval.min_answer_prefix=30 leaves no block"),
])
def test_bad_evaluation_anchors_are_refused(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make_settings(tmp_path, *overrides)
