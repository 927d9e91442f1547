"""Layer 2: loading models (hub, local, GGUF, the embedded default), LoRA adapters and the frozen feature
network; imports layers 0-1."""
