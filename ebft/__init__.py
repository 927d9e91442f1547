"""Energy-Based Fine-Tuning (EBFT) of causal language models.

SFT, EBFT and RLVR as PyTorch Lightning modules composed by Hydra; see README.md.
"""

__version__ = "0.1.0"
