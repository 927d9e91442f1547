"""Layer 2: sampling from the generator: the KV-cached strided sampler (EBFT) and left-padded
completions (RLVR); imports layers 0-1."""
