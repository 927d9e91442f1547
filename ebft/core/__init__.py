"""Layer 1: the ground floor of the strided computation, imports only layer 0.

``layout`` (the strided index contract), ``anchors`` (which of its blocks are used: answer anchors),
``documents`` (document masking: the rule within each example), ``masks`` (the attention rule for sdpa,
eager and flex), ``compat`` (the transformers and model-family shims: backbone, LM head, caches) and
``strided`` (THE strided forward every user of a strided row calls: generator loss, feature network,
samplers).
"""
