"""Config composition for every task x method x model, and one clear error per mistake."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import open_dict

from ebft.config import ConfigError
from tests.test_train import validate

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.output_dir = "unused"
    return cfg


@pytest.mark.parametrize("task", options("task"))
@pytest.mark.parametrize("method", options("method"))
@pytest.mark.parametrize("model", options("model"))
def test_every_combination_composes(task, method, model):
    cfg = make(f"task={task}", f"method={method}", f"model={model}")
    assert cfg.task.name == task and cfg.method.name == method
    if method == "rlvr" and not cfg.task.verifiable:           # unstructured_code, synthetic
        with pytest.raises(ConfigError, match="use method=ebft"):
            validate(cfg)
        return
    if model in ("tiny", "smollm2"):
        validate(cfg)


@pytest.mark.parametrize("group,name", [("task", "qa_cod"), ("method", "ebfttt"), ("model", "gpt5")])
def test_unknown_group_option_lists_the_choices(group, name):
    with pytest.raises(MissingConfigException) as err:
        make(f"{group}={name}")
    message = str(err.value)
    assert name in message and options(group)[0] in message


@pytest.mark.parametrize("overrides,fragment", [
    (["task.seq_len=10"], "task.seq_len=10 is too small"),
    (["task.gen_len=0"], "task.gen_len=0"),
    (["method.lr=0"], "method.lr=0"),
    (["method.schedule=linear"], "method.schedule='linear'"),
    (["method=sft", "method.loss_on=prompt"], "method.loss_on='prompt'"),
    (["logger.kind=mlflow"], "logger.kind='mlflow'"),
    (["model.name=/does/not/exist"], "neither an existing local path"),
    (["model.name=missing.gguf"], "GGUF file 'missing.gguf' does not exist"),
    (["init_from=/nope"], "init_from=/nope does not exist"),
    (["ckpt_path=/nope.ckpt"], "ckpt_path=/nope.ckpt does not exist"),
    (["method.top_p=0.9"], "method.top_p=0.9: training scores each sampled token under the full distribution"),
    (["method=rlvr", "task=qa_code", "method.top_p=0.95"], "nucleus sampling (top_p < 1) would make the update"),
    (["method.num_samples=1", "alpha=0"], "method.baseline=rloo_corrected needs n >= 2 samples per context"),
    (["method.num_samples=1", "method.baseline=rloo", "alpha=0"], "method.baseline=reinforce alpha=0"),
    (["method.baseline=ppo"], "method.baseline='ppo'"),
    (["method.anchors=prompt"], "method.anchors='prompt'"),
    (["method.answer_turns=first"], "method.answer_turns='first'"),
    (["method.min_answer_prefix=4"], "method.anchors=all uses every block; set method.anchors=answer"),
    (["method.answer_turns=last"], "method.anchors=all uses every block"),
    (["method.anchors=answer", "method.min_answer_prefix=-1"], "must be a whole number of answer tokens >= 0"),
    (["method.anchors=answer", "task.seq_len=32", "method.min_answer_prefix=24"],
     "method.min_answer_prefix=24 leaves no block in any chunk: the longest context (C + (NB-1)*s = 24 tokens"),
    (["method.num_samples=1", "method.baseline=reinforce", "alpha=0", "method.skip_flat_groups=true"],
     "every block would be skipped"),
    (["data.document_mask=true", "model.attn_implementation=flash_attention_2"],
     "data.document_mask=true needs a custom attention mask"),
    (["data.packing=docs"], "data.packing='docs'"),
])
def test_bad_values_are_refused_with_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        validate(make("model=tiny", *overrides))
    assert fragment in str(err.value)


def test_plain_reinforce_is_taken_only_when_asked_for_and_says_so(caplog):
    settings = validate(make("model=tiny", "method.num_samples=1", "alpha=0", "method.baseline=reinforce"))
    assert settings.method.baseline == "reinforce" and settings.method.sampling.num_samples == 1
    assert "plain REINFORCE" in caplog.text


def test_the_recorded_config_names_the_run_directory_relative_to_the_working_directory(tmp_path, monkeypatch):
    cfg = make("model=tiny")
    monkeypatch.chdir(tmp_path)
    cfg.output_dir = str(tmp_path / "results" / "run")
    assert validate(cfg).record["output_dir"] == "results/run"       # inside: relative, machine-free
    cfg.output_dir = "/elsewhere/run"
    assert validate(cfg).record["output_dir"] == "/elsewhere/run"    # outside: as given


def test_answer_anchors_take_the_ce_over_answers_unless_told_otherwise():
    assert validate(make("model=tiny")).method.ce_on == "all"
    answer = validate(make("model=tiny", "method.anchors=answer", "task.seq_len=32", "method.min_answer_prefix=23"))
    assert (answer.method.anchors, answer.method.ce_on, answer.method.min_answer_prefix) == ("answer", "answer", 23)
    assert validate(make("model=tiny", "method.anchors=answer", "method.ce_on=all")).method.ce_on == "all"
