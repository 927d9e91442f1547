"""The architectures of the paper's models and the project's defaults, shipped with the project: the
fields of each model's ``config.json`` that fix its shapes and its family, keyed by hub id. They let the
memory planner (``bench/memory.py``) size a 7B run and tests build a model of the true shape (or a tiny
one of the same family) with random weights, without a download.

Model names that use them (``ebft.models.loading``):

- ``random:<hub id>``: the architecture at its true shape with random weights (seeded);
- ``tiny:<hub id>``: the same family (``model_type``, attention biases, tied embeddings, rope) shrunk to
  4 layers of width 64, with the tokenizer's vocabulary.

Both use the embedded SmolLM2 tokenizer; its 49,152 ids are a subset of every vocabulary here.
"""

from __future__ import annotations

from types import MappingProxyType

_QWEN2 = {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
          "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151643}
_LLAMA3 = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                            "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
           "bos_token_id": 128000, "eos_token_id": 128001}

ARCHITECTURES = MappingProxyType({
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
        "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    "Qwen/Qwen2.5-0.5B": {
        **_QWEN2, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
        "max_position_embeddings": 32768},
    "Qwen/Qwen2.5-1.5B": {
        **_QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
        "max_position_embeddings": 131072},
    "Qwen/Qwen2.5-3B": {
        **_QWEN2, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
        "max_position_embeddings": 32768},
    "Qwen/Qwen2.5-7B": {
        **_QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
        "max_position_embeddings": 131072},
    "meta-llama/Llama-3.2-1B": {
        **_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "tie_word_embeddings": True, "max_position_embeddings": 131072},
})
# The project's embedded default is SmolLM2-135M-Instruct.
ALIASES = MappingProxyType({"embedded:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"})

TINY_SHAPE = MappingProxyType({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})


class UnknownArchitecture(KeyError):
    """A name with no shipped architecture; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def architecture(name: str) -> dict:
    """The shipped ``config.json`` fields of hub id ``name`` (or an alias), a fresh copy."""
    key = ALIASES.get(name, name)
    if key not in ARCHITECTURES:
        raise UnknownArchitecture(f"no shipped architecture for '{name}'; known: {', '.join(ARCHITECTURES)}")
    return dict(ARCHITECTURES[key])


def shipped_config(name: str, tiny: bool = False, **fields):
    """A ``transformers`` config of ``name``'s architecture (``tiny``: its family at the tiny shape, the
    rope scaling and ``max_position_embeddings`` kept), with ``fields`` (e.g. ``vocab_size``) replaced."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = architecture(name)
    if tiny:
        config.update(TINY_SHAPE)
    config.update(fields)
    return CONFIG_MAPPING[config["model_type"]].from_dict(config)
