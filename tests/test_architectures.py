"""The shipped architectures have the published shapes, and the random model sources built from them."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from ebft.models.architectures import ARCHITECTURES, shipped_config
from ebft.models.loading import ModelSourceError, load_config, load_model, load_tokenizer, resolve_source

# Parameter counts published on each model's card (embeddings counted once when tied).
PUBLISHED = {"HuggingFaceTB/SmolLM2-135M-Instruct": 134_515_008, "Qwen/Qwen2.5-0.5B": 494_032_768,
             "Qwen/Qwen2.5-1.5B": 1_543_714_304, "Qwen/Qwen2.5-3B": 3_085_938_688,
             "Qwen/Qwen2.5-7B": 7_615_616_512, "meta-llama/Llama-3.2-1B": 1_235_814_400}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_shipped_shape_has_the_published_parameter_count(name):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shipped_config(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def test_tiny_keeps_the_family_and_random_keeps_the_shape():
    qwen = load_model("tiny:Qwen/Qwen2.5-1.5B")
    assert type(qwen).__name__ == "Qwen2ForCausalLM"
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None      # Qwen2's attention biases
    assert qwen.config.num_hidden_layers == 4 and qwen.config.hidden_size == 64
    assert qwen.config.vocab_size == len(load_tokenizer("tiny:Qwen/Qwen2.5-1.5B"))
    llama = load_config("tiny:meta-llama/Llama-3.2-1B")
    assert llama.model_type == "llama" and llama.rope_parameters["rope_type"] == "llama3"
    full = load_config("random:Qwen/Qwen2.5-7B")
    assert (full.hidden_size, full.vocab_size, full.tie_word_embeddings) == (3584, 152064, False)


def test_random_models_are_seeded_and_built_in_the_dtype_asked():
    a, b = load_model("tiny:Qwen/Qwen2.5-0.5B"), load_model("tiny:Qwen/Qwen2.5-0.5B", dtype=torch.bfloat16)
    assert b.model.embed_tokens.weight.dtype == torch.bfloat16
    c = load_model("tiny:Qwen/Qwen2.5-0.5B")
    assert torch.equal(a.model.layers[1].mlp.up_proj.weight, c.model.layers[1].mlp.up_proj.weight)


def test_unknown_architecture_is_refused_naming_the_known_ones():
    with pytest.raises(ModelSourceError, match="no shipped architecture for 'acme/none'.*Qwen/Qwen2.5-7B"):
        resolve_source("random:acme/none")
