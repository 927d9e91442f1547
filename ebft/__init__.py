"""Energy-Based Fine-Tuning (EBFT) of causal language models.

SFT, EBFT and RLVR as PyTorch Lightning modules composed by Hydra; see README.md.

Layer 0: the modules at this level, ``config`` (typed settings, the allowed values of every
setting) and ``reporting`` (atomic files, tables, figures), import no other ``ebft`` module.
The packages below stack in layers; a module imports only from its own layer or lower ones:

    0  ebft (config, reporting)
    1  ebft.core, ebft.execution
    2  ebft.models, ebft.objectives, ebft.rollout
    3  ebft.data
    4  ebft.methods, ebft.eval
    5  ebft.app
"""

__version__ = "0.1.0"
