"""Layer 1: the ground floor of the strided computation, imports only layer 0.

``layout`` (the strided index contract), ``masks`` (its attention rule for sdpa, eager and flex),
``compat`` (the transformers and model-family shims: backbone, LM head, caches) and ``strided``
(THE strided forward every user of a strided row calls: generator loss, feature network, samplers).
"""
