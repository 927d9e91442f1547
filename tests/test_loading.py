"""Model loading: name classification, a local HF directory, a run directory and the embedded GGUF."""

import pytest
import torch

from ebft.models.loading import (EMBEDDED_DEFAULT, HF_SUBDIR, ModelSourceError, build_tiny_model, load_model,
                                 resolve_source)


def test_names_are_classified_without_loading(tmp_path):
    assert resolve_source("tiny").kind == "tiny"
    assert resolve_source("Qwen/Qwen2.5-1.5B") == resolve_source("Qwen/Qwen2.5-1.5B")
    assert resolve_source("Qwen/Qwen2.5-1.5B").kind == "hub"
    src = resolve_source(EMBEDDED_DEFAULT)
    assert src.kind == "gguf" and src.path.endswith(".gguf")
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
